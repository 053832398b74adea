#!/usr/bin/env bash
# Issue 6's ablation end to end: train recipes/ablation_augmentation.yaml (one base, four SR
# stages that differ only in conditioning augmentation), evaluate each SR stage (FID vs the test
# split with classifier features, CAS), sweep the sampling level s of the two Gaussian stages
# (generated and ground-truth inputs), and export the report to $OUT/report.
# One job at a time: as six concurrent jobs on one H100 (five stages and the feature classifier),
# the SR stages trained at 160 img/s each and the base at 400 img/s (batch 64 and 128), far below
# their FLOP counts (probably the GPU time-slicing between processes that launch small kernels).
# Every phase resumes: when a command is cut short (SIGTERM: training checkpoints first), the same
# command carries on; keep $OUT outside the device's emptied output folder (OUT=runs/ablation_gpu).
#   device:  OUT=runs/ablation_gpu bash scripts/ablation_gpu.sh   carrying data/fashion-mnist
#            (Fashion-MNIST's IDX files: cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/)
#            and .whl (the clean-fid wheel FID needs: pip download --no-deps -d .whl clean-fid;
#            the device machine has its other needs, scipy, matplotlib, timm)
#   check:   SCALE=smoke OUT=/tmp/abl bash scripts/ablation_gpu.sh   (same procedure, tiny, CPU)
#   CPU:     SCALE=cpu OUT=/tmp/abl bash scripts/ablation_gpu.sh     (the ablation shrunk to a 2-core CPU)
# REPLICATES=k trains each SR stage k times (copies sr_none_r2 .. sr_none_rk; their seeds differ
# by position), so that the findings weigh the spread over training runs, not the sampling error
# alone; it extends a finished run (its base and first SR stages are kept). The copies' sweeps
# come after a report with their evaluations, and a second report follows them.
# Arguments go to `cdmbench prepare` and `cdmbench run`, e.g. --set stages.base16.train.steps=2000.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 CDMBENCH_CACHE="$OUT/cache"
if ls .whl/*.whl >/dev/null 2>&1; then  # once per machine
    [ -d /tmp/site/cleanfid ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
RUN="$OUT/run"
DATA=(--set "data.args.path=${FMNIST:-data/fashion-mnist}")
SR=(sr_none sr_gauss sr_trunc sr_blur)
case "${SCALE:-full}" in
full)  FLAGS=("${DATA[@]}"); SWEEP=(--num-samples 2000 --metrics fid); GAUSS=0,0.02,0.05,0.1,0.2,0.3,0.5; TRUNC=0.05,0.1,0.2,0.3,0.5;;
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
    for s in "${SR[@]}"; do
        FLAGS+=(--set "stages.$s.backbone.args={channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: []}"
            --set "stages.$s.train={steps: 1000, batch_size: 32, lr: 2.0e-3, ema: 0.995, checkpoint_every: 500, log_every: 100}"
            --set "stages.$s.loss=x0" --set "stages.$s.sampler.args.steps=25")
    done
    SWEEP=(--num-samples 1000 --metrics fid); GAUSS=0,0.1,0.2,0.3,0.5; TRUNC=0.1,0.2,0.3,0.5;;
*) echo "SCALE must be full, smoke or cpu, got '$SCALE'" >&2; exit 2;;
esac
TRAIN=train REPORT=report STAGES=("${SR[@]}")
if ((${REPLICATES:-1} > 1)); then
    TRAIN=train-x$REPLICATES REPORT=report-x$REPLICATES  # new phases: a finished run gets the copies
    for k in $(seq 2 "$REPLICATES"); do
        for s in "${SR[@]}"; do STAGES+=("${s}_r$k"); done
    done
    for s in "${SR[@]}"; do FLAGS+=(--set "stages.$s.replicates=$REPLICATES"); done
fi
source scripts/phase.sh  # phase NAME COMMAND...: skipped when a rerun finds it done
RECIPE=recipes/ablation_augmentation.yaml
phase prepare-train python -m cdmbench prepare $RECIPE --no-progress "${FLAGS[@]}" "$@"
phase prepare-test python -m cdmbench prepare $RECIPE --split test --no-progress "${FLAGS[@]}" "$@"
# training resumes from checkpoints; at the end the grids of every stage are sampled
phase $TRAIN python -m cdmbench run $RECIPE --out "$RUN" --no-progress "${FLAGS[@]}" "$@"
phase feature-classifier python -m cdmbench prepare $RECIPE --split test --metrics sr_none --no-progress "${FLAGS[@]}" "$@"
for stage in "${STAGES[@]}"; do
    phase "evaluate-$stage" python -m cdmbench evaluate "$RUN" --stage "$stage" --no-progress
done
sweeps() {  # the two Gaussian stages, or with an argument _rK their copies
    phase "sweep-sr_gauss${1:-}" python -m cdmbench sweep "$RUN" --stage "sr_gauss${1:-}" --levels "$GAUSS" \
        --no-progress "${SWEEP[@]}"
    phase "sweep-sr_trunc${1:-}" python -m cdmbench sweep "$RUN" --stage "sr_trunc${1:-}" --levels "$TRUNC" \
        --inputs generated --no-progress "${SWEEP[@]}"
}
sweeps
phase $REPORT python -m cdmbench report "$RUN" --out "$OUT/report"
# the copies' sweeps last: the report above has their evaluations whatever time is left
for k in $(seq 2 "${REPLICATES:-1}"); do sweeps "_r$k"; done
if ((${REPLICATES:-1} > 1)); then
    phase "$REPORT-sweeps" python -m cdmbench report "$RUN" --out "$OUT/report"
fi
echo "== $(date +%T) done"
