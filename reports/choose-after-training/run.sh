#!/usr/bin/env bash
# The worked example of issue 27 (reports/choose-after-training/README.md): the quickstart cascade
# trained with post-hoc EMA snapshots, then its EMA lengths and guidance chosen after training.
# Usage: bash reports/choose-after-training/run.sh [RUN_DIR]   (README.md: the time it took)
set -euo pipefail
RUN=${1:-runs/quickstart-posthoc}
SNAPSHOTS=(--set name=quickstart-posthoc
           --set 'stages.base16.train.posthoc_ema={sigma_rels: [0.05, 0.10], snapshot_every: 50}'
           --set 'stages.sr32.train.posthoc_ema={sigma_rels: [0.05, 0.10], snapshot_every: 25}')
# 1. train: the quickstart recipe, plus two stored power-function EMAs per stage (EDM2)
cdmbench run recipes/quickstart.yaml --out "$RUN" --no-progress "${SNAPSHOTS[@]}"
# 2. the recipe's defaults (classic EMA 0.995, guidance 3): FID and the IS analogue on 400 samples
cdmbench evaluate "$RUN" --metrics fid,is --num-samples 400 --no-search --no-progress
# 3. the search on 200 samples a point, chosen by fid_train (coordinate: base16's guidance scale,
#    then its EMA length, null being the classic EMA; the first point is step 2's samples, reused),
#    then the chosen point on the 400
SEARCH='evaluate.search={metric: fid_train, metrics: [fid, is], strategy: coordinate, num_samples: 200,
  space: {stages.base16.guidance.scale: [3.0, 1.5, 5.0], stages.base16.posthoc_sigma_rel: [null, 0.1]}}'
cdmbench evaluate "$RUN" --metrics fid,is --num-samples 400 --no-progress --set "$SEARCH"
# 4. the report, with the search table and the trade-off plot
cdmbench report "$RUN" --out reports/choose-after-training
