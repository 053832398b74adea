#!/usr/bin/env bash
# One device session for both open GPU checks: issue 4's H100 bench (scripts/gpu_bench.sh: the
# ADM-64 bench with its profile, then the gpu tests, ...) for at most BENCH seconds, then issue
# 6's ablation (scripts/ablation_gpu.sh) for the rest of LIMIT (with time to spare, again with
# REPLICATES=2: a second training run of each SR stage); then what is worth keeping goes
# into $OUT/results.tgz (the device returns a few files only). The work stays in runs/device/
# while the machine is warm, and every part is made of phases: the same command again finishes
# what the first left, redoing nothing finished (a failed phase is not repeated either).
#   call 1: carry ["data/fashion-mnist", ".whl"], timeout_s 590:
#           LIMIT=550 BENCH=200 bash scripts/device_session.sh
#   call 2, at once (the machine goes back after 30 s idle): the ablation only, BENCH=0, with
#           LIMIT = the budget left minus about 60 s, timeout_s 10 s above LIMIT.
# results.tgz holds bench/ (the tables for reports/bench/), ablation/ (the run without
# checkpoints and sample arrays, report/ for reports/ablation_augmentation/) and both logs.
set -uo pipefail
LIMIT=${LIMIT:-550}
BENCH=${BENCH:-200}
RESULTS=$OUT
WORK=${WORK:-runs/device}
PACK=30  # seconds kept for packing
mkdir -p "$WORK"
left() { echo $((LIMIT - PACK - SECONDS)); }
# `timeout -k`: a process that ignored SIGTERM would hold tee's pipe and the packing forever
if ((BENCH > 0 && $(left) > 60)); then
    OUT=$WORK/bench timeout -k 15 "$((BENCH < $(left) ? BENCH : $(left)))" bash scripts/gpu_bench.sh 2>&1 \
        | tee -a "$RESULTS/bench.log"
fi
if (($(left) > 60)); then
    OUT=$WORK/ablation timeout -k 15 "$(left)" bash scripts/ablation_gpu.sh 2>&1 | tee -a "$RESULTS/ablation.log"
fi
# time to spare: a second training run of every SR stage, so that the findings weigh the spread
# between training runs (the first report stays unless this one finishes)
if (($(left) > 120)); then
    OUT=$WORK/ablation REPLICATES=2 timeout -k 15 "$(left)" bash scripts/ablation_gpu.sh 2>&1 \
        | tee -a "$RESULTS/ablation.log"
fi
tar czf "$RESULTS/results.tgz" --exclude='*.npz' --exclude=checkpoints --exclude=cache --exclude='*.lock' \
    -C "$WORK" . && ls -la "$RESULTS"
