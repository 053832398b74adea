# Sourced by the device scripts. `phase NAME COMMAND...` runs COMMAND unless an earlier run of
# the script finished it: $OUT/done/NAME marks a finished phase, so a rerun after a cut skips
# whole finished phases (no re-sampled grids, no retrained classifiers, no second compile);
# delete the marker to run a phase again. A phase that fails is marked too ("failed, exit N"),
# and the later phases still run: one failure must not cost the rest of a device session, nor
# be repeated by the next call. A phase cut by `timeout` is not marked: the next call resumes
# it. Each phase prints "== HH:MM:SS NAME" first, the wall times in a log.
mkdir -p "$OUT/done"
phase() {
    local name=$1; shift
    if [ -e "$OUT/done/$name" ]; then echo "== $(date +%T) $name: done before ($(cat "$OUT/done/$name"))"; return; fi
    echo "== $(date +%T) $name"
    local status=0
    "$@" || status=$?
    if ((status)); then
        echo "== $(date +%T) $name FAILED (exit $status)"
        echo "failed, exit $status" > "$OUT/done/$name"
    else
        echo "finished" > "$OUT/done/$name"
    fi
}
