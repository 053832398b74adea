#!/usr/bin/env bash
# Issue 6's ablation end to end: train recipes/ablation_augmentation.yaml (one base, four SR
# stages that differ only in conditioning augmentation), evaluate each SR stage (FID vs the test
# split with classifier features, CAS), sweep the sampling level s of the two Gaussian stages
# (generated and ground-truth inputs), and export the report to $OUT/report.
#   device:  OUT=... bash scripts/ablation_gpu.sh   carrying data/fashion-mnist (Fashion-MNIST's
#            IDX files: cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/) and .whl (the
#            clean-fid wheel FID needs: pip download --no-deps -d .whl clean-fid; the device
#            machine has its other needs, scipy, matplotlib, timm)
#   check:   SCALE=smoke OUT=/tmp/abl bash scripts/ablation_gpu.sh   (same procedure, tiny, CPU)
# Arguments go to `cdmbench run` and the bench, e.g. --set stages.base16.train.steps=4000 when the
# first phase's images/s say the budget does not fit.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 CDMBENCH_CACHE="$OUT/cache"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
RUN="$OUT/run"
if [ "${SCALE:-full}" = smoke ]; then
    FLAGS=(--smoke)   # shrunk stages, generated shapes data, a few samples
    SWEEP=()
else
    FLAGS=(--set "data.args.path=${FMNIST:-data/fashion-mnist}")
    SWEEP=(--num-samples 2000)
fi
phase() { echo "== $(date +%T) $*"; }
phase "throughput of one SR stage (decides whether the budget fits)"
python -m cdmbench bench recipes/ablation_augmentation.yaml --stage sr_gauss --steps 20 --no-compile \
    --out "$OUT/bench" "${FLAGS[@]}" "$@"
phase "train"
python -m cdmbench run recipes/ablation_augmentation.yaml --out "$RUN" --no-progress "${FLAGS[@]}" "$@"
for stage in sr_none sr_gauss sr_trunc sr_blur; do
    phase "evaluate $stage"
    python -m cdmbench evaluate "$RUN" --stage "$stage" --no-progress
done
phase "sweep sr_gauss"
python -m cdmbench sweep "$RUN" --stage sr_gauss --levels 0,0.05,0.1,0.2,0.3,0.5 --no-progress "${SWEEP[@]}"
phase "sweep sr_trunc"
python -m cdmbench sweep "$RUN" --stage sr_trunc --levels 0.05,0.1,0.2,0.3,0.5 --inputs generated --no-progress "${SWEEP[@]}"
phase "report"
python -m cdmbench report "$RUN" --out "$OUT/report"
phase "done"
