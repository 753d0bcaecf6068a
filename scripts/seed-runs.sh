#!/usr/bin/env bash
# Trains experiments over several seeds, one run at a time, and prints the seeds table
# (scripts/seed_table.py): the fidelity comparisons of specs/README.md. Run from the project
# root:
#   bash scripts/seed-runs.sh OUT_DIR "SEEDS" RUN...
# A RUN is LABEL=EXPERIMENT[:KEY=VALUE[,KEY=VALUE...]] (or just EXPERIMENT): the run folder is
# OUT_DIR/LABEL-sSEED, made by
#   mdl run experiments/EXPERIMENT.yaml --set train.seed=SEED [--set KEY=VALUE ...]
# e.g. `mnse_plain=mnse:hyper.plain=true`. A folder that already holds a finished run
# (metrics.json) is kept, so an interrupted series resumes where it stopped; delete it to
# re-run. The binary is $MDL (default target/release/mdl, built first); runs are niced
# (`nice -n $NICE`, default 19) to leave the shared cores to builds and measurements.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash scripts/seed-runs.sh OUT_DIR \"SEEDS\" RUN..." >&2
  exit 2
fi
out=$1
seeds=$2
shift 2
if [ -z "${MDL:-}" ]; then
  cargo build --release --quiet
  MDL=./target/release/mdl
fi
mkdir -p "$out"
# The runs read the specs and experiments of the tree: say whether they differ from HEAD.
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 'specs/*.mdl' experiments || echo ' (specs or experiments modified)'), binary $MDL" \
  | tee -a "$out/runs.log" >&2
for run in "$@"; do
  label=${run%%=*}
  rest=${run#*=}
  experiment=${rest%%:*}
  sets=()
  if [ "$rest" != "$experiment" ]; then
    IFS=, read -ra pairs <<< "${rest#*:}"
    for kv in "${pairs[@]}"; do sets+=(--set "$kv"); done
  fi
  for seed in $seeds; do
    dir="$out/$label-s$seed"
    if [ -f "$dir/metrics.json" ]; then
      echo "== $label seed $seed: kept ($dir)" >&2
      continue
    fi
    echo "== $label seed $seed: start $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/runs.log" >&2
    nice -n "${NICE:-19}" "$MDL" run "experiments/$experiment.yaml" --out "$dir" --force \
      --set "train.seed=$seed" "${sets[@]}" > "$dir.log" 2>&1
    echo "== $label seed $seed: end $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/runs.log" >&2
  done
done
python3 scripts/seed_table.py "$out"
