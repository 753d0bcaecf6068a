#!/usr/bin/env bash
# kill -9 / resume trials (docs/reliability.md): trains an experiment once without
# interruption, then, per trial, starts the same run in a fresh folder, kills it with
# SIGKILL at a random moment (data preparation, mid-epoch, inside a checkpoint write),
# sometimes kills the resume too, resumes until the run finishes, and compares
# metrics.json, curve.csv, best.ckpt and last.ckpt byte for byte with the uninterrupted
# run. A run killed before it wrote config.yaml is started again (it had nothing to resume).
#
#   scripts/kill_resume.sh [TRIALS] [SEED] [EXPERIMENT]      (defaults: 20, 1, the quickstart)
#
# Prints one line per trial and a summary; exits 1 if any trial's files differ.
set -u
cd "$(dirname "$0")/.."
trials=${1:-20}
seed=${2:-1}
experiment=${3:-experiments/quickstart.yaml}
mdl=${MDL:-target/release/mdl}
[ -x "$mdl" ] || cargo build --release --quiet || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/mdl-kill-resume.XXXXXX")
trap 'rm -rf "$work"' EXIT
export MDL_CACHE_DIR="$work/cache"
files="metrics.json curve.csv best.ckpt last.ckpt"

# A fresh run into a folder that may hold a killed run's files: with `--force` where this
# build has it (an explicit --out that holds anything is refused without it).
force=""
"$mdl" run --help 2>/dev/null | grep -q -- '--force' && force="--force"

# Uniform random numbers in [0, 1), reproducible from the seed.
randoms=$(awk -v s="$seed" -v n=$((trials * 3)) 'BEGIN { srand(s); for (i = 0; i < n; i++) print rand() }')
draw() { echo "$randoms" | sed -n "$1p"; }

start=$(date +%s.%N)
"$mdl" run "$experiment" --out "$work/reference" > "$work/reference.out" 2>&1 || { cat "$work/reference.out"; exit 2; }
reference_secs=$(echo "$(date +%s.%N) - $start" | bc)
echo "uninterrupted run: ${reference_secs}s; $(grep -o 'test: auc [0-9.]*' "$work/reference/train.log")"

# Runs a command and kills it with SIGKILL after $2 seconds if it has not ended.
# Returns 0 when it ran to the end, 1 when it was killed.
run_or_kill() {
    local seconds=$1
    shift
    "$@" > /dev/null 2>&1 &
    local pid=$!
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(echo "$waited >= $seconds" | bc)" = 1 ]; then
            kill -9 "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            return 1
        fi
        sleep 0.05
        waited=$(echo "$waited + 0.05" | bc)
    done
    wait "$pid" 2>/dev/null
    return 0
}

identical=0
for t in $(seq 1 "$trials"); do
    out="$work/trial-$t"
    # Every third trial starts without the data cache, so kills also land in parsing and
    # in the cache write.
    [ $((t % 3)) = 1 ] && rm -rf "$MDL_CACHE_DIR"
    at=$(echo "$(draw $((3 * t - 2))) * $reference_secs * 1.1" | bc -l | xargs printf '%.2f')
    phase="finished before the kill"
    if ! run_or_kill "$at" "$mdl" run "$experiment" --out "$out"; then
        if [ ! -f "$out/config.yaml" ]; then
            phase="killed before config.yaml"
        elif [ ! -f "$out/last.ckpt" ]; then
            phase="killed before the first checkpoint"
        else
            phase="killed at step $(grep -o 'step [0-9]*' "$out/train.log" | tail -1 | cut -d' ' -f2), last.ckpt written"
        fi
        # Sometimes the resume is killed too.
        if [ "$(echo "$(draw $((3 * t - 1))) < 0.3" | bc -l)" = 1 ] && [ -f "$out/config.yaml" ]; then
            again=$(echo "$(draw $((3 * t))) * $reference_secs * 0.8" | bc -l | xargs printf '%.2f')
            run_or_kill "$again" "$mdl" run --resume "$out" || phase="$phase, resume killed at ${again}s"
        fi
        if [ -f "$out/config.yaml" ]; then
            "$mdl" run --resume "$out" > "$work/resume-$t.out" 2>&1 || { echo "trial $t: resume failed:"; cat "$work/resume-$t.out"; }
        else
            "$mdl" run "$experiment" --out "$out" $force > "$work/resume-$t.out" 2>&1 || { echo "trial $t: rerun failed:"; cat "$work/resume-$t.out"; }
        fi
    fi
    differ=""
    for f in $files; do
        cmp -s "$work/reference/$f" "$out/$f" || differ="$differ $f"
    done
    if [ -z "$differ" ]; then
        identical=$((identical + 1))
        echo "trial $t: kill at ${at}s ($phase): identical"
    else
        echo "trial $t: kill at ${at}s ($phase): DIFFERENT:$differ"
    fi
    rm -rf "$out"
done
echo "$identical of $trials trials byte-identical to the uninterrupted run ($files)"
[ "$identical" = "$trials" ]
