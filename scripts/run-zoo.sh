#!/usr/bin/env bash
# Trains every model of the zoo with its committed experiment (experiments/<spec>.yaml) and
# prints the results table (`mdl report`). Run from the project root:
#   bash scripts/run-zoo.sh [OUT_DIR] [MODEL...]      # default runs/zoo, every spec
# Each model's folder OUT_DIR/<model> is replaced by the new run (`--force`).
# Extra arguments for every run can be passed in MDL_ZOO_ARGS (e.g. "--set backend=interp").
set -euo pipefail
out=${1:-runs/zoo}
shift || true
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for spec in specs/*.mdl; do
    name=$(basename "$spec" .mdl)
    [ "$name" = std ] || models+=("$name")
  done
fi
cargo build --release --quiet
mkdir -p "$out"
for name in "${models[@]}"; do
  echo "== $name" >&2
  # shellcheck disable=SC2086
  ./target/release/mdl run "experiments/$name.yaml" --out "$out/$name" --force ${MDL_ZOO_ARGS:-}
done
dirs=()
for name in "${models[@]}"; do dirs+=("$out/$name"); done
./target/release/mdl report "${dirs[@]}" | tee "$out/table.md"
