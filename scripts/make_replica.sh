#!/usr/bin/env bash
# A scale harness, never a results dataset: writes an N-fold replica of one split (CSV or
# CSV.gz) for measuring memory and throughput on more rows than the bundled data has. The
# rows are the split's rows N times over; in replica r (0 .. N-1) every integer id in the id
# columns is offset by r * 10^12, so each replica brings its own users and items and the
# vocabularies grow as they would with more data (replica 0 is the split itself). Labels,
# features and the row order inside each replica are unchanged, so metrics on a replica mean
# nothing: use it for docs/performance.md's scale figures only.
#
#   scripts/make_replica.sh SPLIT N OUT [ID_COLUMNS]
#
# SPLIT: a .csv or .csv.gz file with a header; OUT: the file to write (gzip when it ends in
# .gz); ID_COLUMNS: comma-separated columns whose cells are integer ids or space-separated
# lists of them (default: user_id,video_id,author_id,music_id,hist_click_seq,
# hist_longview_seq, the id columns of kuairand_pure_tail). A named column missing from the
# header is an error.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
exec python3 - "$@" <<'PY'
import csv, gzip, sys

split, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ids = (sys.argv[4] if len(sys.argv) > 4 else
       "user_id,video_id,author_id,music_id,hist_click_seq,hist_longview_seq").split(",")
if n < 1:
    sys.exit(f"N must be at least 1, found {n}")
STRIDE = 10 ** 12

def opener(path, mode):
    return gzip.open(path, mode + "t", newline="", compresslevel=6) if path.endswith(".gz") \
        else open(path, mode, newline="")

with opener(split, "r") as f:
    rows = list(csv.reader(f))
header, rows = rows[0], rows[1:]
missing = [c for c in ids if c not in header]
if missing:
    sys.exit(f"{split}: no column {', '.join(missing)} in the header")
positions = [header.index(c) for c in ids]

def offset(cell, by):
    items = cell.split(" ")
    if cell == "" or not all(i.lstrip("-").isdigit() for i in items):
        return cell
    return " ".join(str(int(i) + by) for i in items)

with opener(out, "w") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    for r in range(n):
        by = r * STRIDE
        for row in rows:
            if by:
                row = list(row)
                for p in positions:
                    row[p] = offset(row[p], by)
            w.writerow(row)
print(f"wrote {out}: {n} x {len(rows)} = {n * len(rows)} rows", file=sys.stderr)
PY
