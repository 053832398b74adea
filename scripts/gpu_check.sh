#!/usr/bin/env bash
# GPU check: the gpu-marked tests (when pytest is importable there: carry its wheel otherwise),
# then a tiny 8 -> 16 cascade trained, sampled and evaluated (IS analogue and CAS with classifier
# features) on CUDA, from the source tree. Writes everything under $OUT.
set -euxo pipefail
export PYTHONPATH=. CDMBENCH_CACHE="$OUT/cache"
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
if python -c "import pytest" 2>/dev/null; then python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py; fi
python - "$OUT/tiny.yaml" <<'PY'
import sys
sys.path.insert(0, "tests")
from conftest import TINY_RECIPE
open(sys.argv[1], "w").write(TINY_RECIPE.replace("device: cpu", "device: cuda"))
PY
time python -m cdmbench run "$OUT/tiny.yaml" --out "$OUT/run" --no-progress
time python -m cdmbench evaluate "$OUT/run" --no-progress \
  --set 'evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 2}}}, {name: cas, args: {epochs: 2}}]' \
  --set evaluate.num_samples=200 --set evaluate.shard_size=100 --set evaluate.batch_size=100
