#!/usr/bin/env bash
# Issue 6's ablation end to end: train recipes/ablation_augmentation.yaml (one base, four SR
# stages that differ only in conditioning augmentation), evaluate each SR stage (FID vs the test
# split with classifier features, CAS), sweep the sampling level s of the two Gaussian stages
# (generated and ground-truth inputs), and export the report to $OUT/report. The stages train as
# concurrent jobs (with the FID feature classifier beside them), then the evaluations and sweeps
# run concurrently: these nets are too small to fill a GPU one at a time. $OUT/logs has a log per job.
#   device:  OUT=... bash scripts/ablation_gpu.sh   carrying data/fashion-mnist (Fashion-MNIST's
#            IDX files: cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/) and .whl (the
#            clean-fid wheel FID needs: pip download --no-deps -d .whl clean-fid; the device
#            machine has its other needs, scipy, matplotlib, timm)
#   check:   SCALE=smoke OUT=/tmp/abl bash scripts/ablation_gpu.sh   (same procedure, tiny, CPU)
#   CPU:     SCALE=cpu OUT=/tmp/abl bash scripts/ablation_gpu.sh     (the ablation shrunk to a 2-core CPU)
# Arguments go to every `cdmbench prepare` and `cdmbench run`, e.g. --set stages.base16.train.steps=4000.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 CDMBENCH_CACHE="$OUT/cache"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
RUN="$OUT/run"
DATA=(--set "data.args.path=${FMNIST:-data/fashion-mnist}")
case "${SCALE:-full}" in
full)  FLAGS=("${DATA[@]}"); SWEEP=(--num-samples 2000); GAUSS=0,0.02,0.05,0.1,0.2,0.3,0.5; TRUNC=0.05,0.1,0.2,0.3,0.5;;
smoke) # shrunk stages, generated shapes data, a few samples
    FLAGS=(--smoke); SWEEP=(); GAUSS=0,0.05,0.1,0.2,0.3,0.5; TRUNC=0.05,0.1,0.2,0.3,0.5;;
cpu)   # the same ablation on Fashion-MNIST shrunk to ~2 h of a 2-core CPU: quickstart-sized
       # nets, fp32, fewer steps and samples, a 4-epoch feature classifier; every SR stage
       # predicts x0 (at this budget eps-prediction drifts in colour: recipes/quickstart.yaml)
    FLAGS=("${DATA[@]}" --set sample.batch_size=100
        --set "stages.base16.backbone.args={channels: 32, channel_mult: [1, 2, 2], num_res_blocks: 1, attention_resolutions: [8]}"
        --set "stages.base16.train={steps: 2500, batch_size: 32, lr: 2.0e-3, ema: 0.995, checkpoint_every: 500, log_every: 100}"
        --set "stages.base16.sampler.args.steps=50"
        --set "evaluate.num_samples=1000" --set evaluate.batch_size=250 --set evaluate.shard_size=250
        --set "evaluate.metrics=[{name: fid, args: {features: classifier, features_args: {epochs: 4}, reference: [test]}}, {name: cas, args: {epochs: 30}}]")
    for s in sr_none sr_gauss sr_trunc sr_blur; do
        FLAGS+=(--set "stages.$s.backbone.args={channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: []}"
            --set "stages.$s.train={steps: 1000, batch_size: 32, lr: 2.0e-3, ema: 0.995, checkpoint_every: 500, log_every: 100}"
            --set "stages.$s.loss=x0" --set "stages.$s.sampler.args.steps=25")
    done
    SWEEP=(--num-samples 1000 --metrics fid); GAUSS=0,0.1,0.2,0.3,0.5; TRUNC=0.1,0.2,0.3,0.5;;
*) echo "SCALE must be full, smoke or cpu, got '$SCALE'" >&2; exit 2;;
esac
phase() { echo "== $(date +%T) $*"; }
LOGS="$OUT/logs"
mkdir -p "$LOGS"
# Run jobs "NAME COMMAND..." in parallel, each logging to $LOGS/NAME.log; fail with the log of the
# first job that failed. The stages are independent jobs on one run directory (the SR stages
# train on ground-truth inputs), and these nets are too small to fill a GPU alone.
parallel() {
    local names=() pids=() failed=0
    while [ $# -gt 0 ]; do
        local name=$1 line=$2; shift 2
        bash -c "$line" >"$LOGS/$name.log" 2>&1 &
        names+=("$name"); pids+=($!)
    done
    for i in "${!pids[@]}"; do
        if wait "${pids[$i]}"; then echo "   ${names[$i]}: ok ($(date +%T))"
        else echo "   ${names[$i]}: FAILED, $LOGS/${names[$i]}.log:"; tail -20 "$LOGS/${names[$i]}.log"; failed=1; fi
    done
    return $failed
}
q() { [ $# -eq 0 ] || printf '%q ' "$@"; }   # quote an argument list for bash -c
RECIPE=recipes/ablation_augmentation.yaml
CD="python -m cdmbench"
ARGS=$(q "${FLAGS[@]}" "$@")
phase "prepare the data (train and test splits)"
$CD prepare $RECIPE --no-progress "${FLAGS[@]}" "$@"
$CD prepare $RECIPE --split test --no-progress "${FLAGS[@]}" "$@"
phase "train the five stages and the FID feature classifier, concurrently"
jobs=()
for s in base16 sr_none sr_gauss sr_trunc sr_blur; do
    jobs+=("train-$s" "$CD run $RECIPE --out $RUN --stage $s --no-progress $ARGS")
done
parallel "${jobs[@]}" "features" "$CD prepare $RECIPE --split test --metrics sr_none --no-progress $ARGS"
phase "evaluate each SR stage, sweep the Gaussian stages' s, sample the grids, concurrently"
# evaluate reads cascade.json (a sweep's best s) as it starts, long before a sweep writes it, so
# every stage is evaluated at its recipe's s
jobs=()
for s in sr_none sr_gauss sr_trunc sr_blur; do
    jobs+=("evaluate-$s" "$CD evaluate $RUN --stage $s --no-progress")
done
SW=$(q "${SWEEP[@]}")
parallel "${jobs[@]}" \
    "sweep-sr_gauss-generated" "$CD sweep $RUN --stage sr_gauss --levels $GAUSS --inputs generated --no-progress $SW" \
    "sweep-sr_gauss-ground-truth" "$CD sweep $RUN --stage sr_gauss --levels $GAUSS --inputs ground-truth --no-progress $SW" \
    "sweep-sr_trunc-generated" "$CD sweep $RUN --stage sr_trunc --levels $TRUNC --inputs generated --no-progress $SW" \
    "grids" "$CD run $RECIPE --out $RUN --no-progress $ARGS"
phase "report"
$CD report "$RUN" --out "$OUT/report"
phase "done"
