#!/usr/bin/env bash
# kill -9 / resume trials (docs/reliability.md): trains an experiment once without
# interruption, then, per trial, starts the same run in a fresh folder, kills it with
# SIGKILL at a random moment (data preparation, mid-epoch, inside a checkpoint write),
# sometimes kills the resume too, resumes until the run finishes, and compares
# metrics.json, curve.csv, best.ckpt and last.ckpt byte for byte with the uninterrupted
# run (checkpoints: their tensors and loop state byte for byte, all but the run id each
# run's checkpoints carry). A run killed before it wrote config.yaml is started again (it
# had nothing to resume).
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

# Runs a command (its output appended to $log) and kills it with SIGKILL after $1 seconds
# if it has not ended. Returns 0 when it ran to the end and succeeded, 1 when it was
# killed, 2 when it failed.
run_or_kill() {
    local seconds=$1
    shift
    echo "\$ $*" >> "$log"
    "$@" >> "$log" 2>&1 &
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
    wait "$pid" 2>/dev/null || return 2
    return 0
}

# A checkpoint without its run id: the metadata (JSON) with the run id field removed, then
# the tensors' bytes (the checkpoint format is in runtime/src/checkpoint.rs: a 24-byte
# header, the metadata's length and text, the tensors, an 8-byte checksum).
without_run_id() {
    local meta_len
    meta_len=$(od -An -tu8 -j24 -N8 "$1" | tr -d ' ')
    tail -c +33 "$1" | head -c "$meta_len" | sed 's/"run_id":"[^"]*",\{0,1\}//'
    echo
    tail -c +$((33 + meta_len)) "$1" | head -c -8
}

same_file() {
    case "$1" in
    *.ckpt) cmp -s <(without_run_id "$2/$1") <(without_run_id "$3/$1") ;;
    *) cmp -s "$2/$1" "$3/$1" ;;
    esac
}

identical=0
for t in $(seq 1 "$trials"); do
    out="$work/trial-$t"
    log="$work/trial-$t.log"
    : > "$log"
    # Every third trial starts without the data cache, so kills also land in parsing and
    # in the cache write.
    [ $((t % 3)) = 1 ] && rm -rf "$MDL_CACHE_DIR"
    at=$(echo "$(draw $((3 * t - 2))) * $reference_secs * 1.1" | bc -l | xargs printf '%.2f')
    phase="finished before the kill"
    run_or_kill "$at" "$mdl" run "$experiment" --out "$out"
    case $? in
    2) phase="failed before the kill" ;;
    1)
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
            run_or_kill "$again" "$mdl" run --resume "$out"
            [ $? = 1 ] && phase="$phase, resume killed at ${again}s"
        fi
        if [ -f "$out/config.yaml" ]; then
            run_or_kill 100000 "$mdl" run --resume "$out" || phase="$phase, resume FAILED"
        else
            run_or_kill 100000 "$mdl" run "$experiment" --out "$out" $force || phase="$phase, rerun FAILED"
        fi
        ;;
    esac
    differ=""
    for f in $files; do
        [ -f "$out/$f" ] && same_file "$f" "$work/reference" "$out" || differ="$differ $f"
    done
    if [ -z "$differ" ]; then
        identical=$((identical + 1))
        echo "trial $t: kill at ${at}s ($phase): identical"
    else
        echo "trial $t: kill at ${at}s ($phase): DIFFERENT:$differ"
        sed 's/^/    /' "$log" | tail -20
    fi
    rm -rf "$out"
done
echo "$identical of $trials trials byte-identical to the uninterrupted run ($files)"
[ "$identical" = "$trials" ]
