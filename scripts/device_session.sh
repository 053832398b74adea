#!/usr/bin/env bash
# One device session for both open GPU checks, under one time limit: issue 6's ablation
# (scripts/ablation_gpu.sh), then issue 4's H100 bench (scripts/gpu_bench.sh); then what is worth
# keeping goes into $OUT/results.tgz (the device returns a few files only). The work stays in
# runs/device/ while the machine is warm, and every part is made of phases: the same command
# again finishes what the first left, redoing nothing finished.
#   call 1: carry ["data/fashion-mnist", ".whl"], timeout_s 590:
#           LIMIT=550 bash scripts/device_session.sh
#   call 2, at once (the machine goes back after 30 s idle): the same with LIMIT = the budget
#           left minus about 60 s, timeout_s 10 s above LIMIT.
# results.tgz holds ablation/ (the run without checkpoints and sample arrays, report/ for
# reports/ablation_augmentation/), bench/ (the tables for reports/bench/) and both logs.
set -uo pipefail
LIMIT=${LIMIT:-550}
RESULTS=$OUT
WORK=${WORK:-runs/device}
PACK=30  # seconds kept for packing
mkdir -p "$WORK"
left() { echo $((LIMIT - PACK - SECONDS)); }
if (($(left) > 60)); then
    OUT=$WORK/ablation timeout "$(left)" bash scripts/ablation_gpu.sh 2>&1 | tee -a "$RESULTS/ablation.log"
fi
if (($(left) > 60)); then
    OUT=$WORK/bench timeout "$(left)" bash scripts/gpu_bench.sh 2>&1 | tee -a "$RESULTS/bench.log"
fi
tar czf "$RESULTS/results.tgz" --exclude='*.npz' --exclude=checkpoints --exclude=cache --exclude='*.lock' \
    -C "$WORK" . && ls -la "$RESULTS"
