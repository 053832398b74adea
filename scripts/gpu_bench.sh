#!/usr/bin/env bash
# Issue 4's device check in one command (H100, < 10 min): `cdmbench bench` of ADM-64's U-Net
# (eager and compiled; MFU against a bf16 matmul ceiling measured in the same run; where the step
# time goes: --profile's phases and operator kinds, for the MFU work; eager again without cuDNN
# benchmark mode), the gpu-marked tests, the
# CDM ImageNet-64 base stage, and adm-unet beside diffusers' UNet2DModel when diffusers imports.
# Tables land in $OUT/bench/<part>/ (copy them to reports/bench/). Every part is a phase: a
# rerun on the same machine skips the parts that finished (scripts/phase.sh).
# diffusers is not on the device machine: carry its wheel in .whl/ (carry: [".whl"]; made by
# `pip download --no-deps -d .whl diffusers==0.42.1 clean-fid`; its needs regex, huggingface-hub
# and safetensors are there), or the diffusers row is skipped.
set -euo pipefail
export PYTHONPATH=.:plugins/cdmbench-diffusers/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CDMBENCH_CACHE=/tmp/cdmbench-cache
if ls .whl/*.whl >/dev/null 2>&1; then  # once per machine
    [ -d /tmp/site/cleanfid ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
source scripts/phase.sh
BENCH=(python -m cdmbench bench recipes/bench_adm64.yaml --stage base64 --steps 20 --warmup 5)
# Most wanted first, each writing its own folder, so a run cut short keeps what finished.
phase bench-adm-unet "${BENCH[@]}" --profile --backbone adm-unet --out "$OUT/bench/adm-unet"
if python -c "import pytest" 2>/dev/null; then
    phase gpu-tests python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
fi
# eager, with cuDNN's heuristics instead of benchmark mode
phase bench-no-cudnn-benchmark "${BENCH[@]}" --no-compile --backbone adm-unet \
    --set stages.base64.train.cudnn_benchmark=false --out "$OUT/bench/no-cudnn-benchmark"
# CDM ImageNet-64's base at batch 256 per GPU, eager (compiling its 825M parameters takes long):
# bench trains on synthetic batches and needs only the class count, which it knows for the Hub
# id (no `datasets` and no network on the device)
phase bench-cdm64 python -m cdmbench bench recipes/cdm_imagenet64.yaml --stage base32 --steps 20 --warmup 5 \
    --no-compile --set stages.base32.train.batch_size=256 --set sample.batch_size=256 --out "$OUT/bench/cdm64"
if python -c "import diffusers" 2>/dev/null; then  # no entry point without pip install: name the plugin
    phase bench-diffusers "${BENCH[@]}" --backbone adm-unet --backbone diffusers-unet2d \
        --set 'plugins=[cdmbench_diffusers.plugin]' --out "$OUT/bench/diffusers"
fi
echo "== $(date +%T) done"
