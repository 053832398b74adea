# Sourced by the device scripts. `phase NAME COMMAND...` runs COMMAND unless an earlier run of
# the script finished it: $OUT/done/NAME marks a finished phase, so a rerun after a cut skips
# whole finished phases (no re-sampled grids, no retrained classifiers, no second compile);
# delete the marker to run a phase again. Each phase prints "== HH:MM:SS NAME" first, the
# wall times in a log.
mkdir -p "$OUT/done"
phase() {
    local name=$1; shift
    if [ -e "$OUT/done/$name" ]; then echo "== $(date +%T) $name: done before"; return; fi
    echo "== $(date +%T) $name"
    "$@"
    touch "$OUT/done/$name"
}
