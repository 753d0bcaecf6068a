#!/usr/bin/env python3
"""Score raw CSV rows with a model from `mdl export --format onnx`, in onnxruntime.

A reference serving client: it encodes each row's raw values with the model's
`<name>.features.json` (format `mdl-features/1` or `/2`, docs/serving.md) exactly as mdl does,
feeds the model in batches and writes one score per task per row (a probability, or a
regression task's prediction), as `mdl predict` does. With `--compare PREDICTED.csv` (the
output of `mdl predict` on the same rows) it prints the largest difference per task
(absolute, relative to values above 1) and fails when one is above `--tolerance`.

    python3 scripts/onnx_score.py model.onnx rows.csv.gz --out scores.csv
    python3 scripts/onnx_score.py model.onnx rows.csv --batch 4096 --compare predicted.csv

Needs numpy and onnxruntime.
"""

import argparse
import csv
import gzip
import io
import json
import re
import sys

import numpy as np
import onnxruntime as ort

# mdl splits sequence cells on ASCII whitespace (Rust's split_ascii_whitespace).
ITEM = re.compile(r"[^ \t\n\x0c\r]+")


def read_rows(path):
    """The header and the records of a .csv or .csv.gz file (gzip told by its magic bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    header = next(reader)
    return header, [r for r in reader if r]


MASK64 = (1 << 64) - 1


def bucket_hash(value):
    """mdl's hash of a value a vocabulary does not keep (mdl-features/2 `buckets`): over the
    value's UTF-8 bytes as little-endian 64-bit words, the last one zero-padded and xored
    with its byte count shifted left by 59, h = (rotl(h, 5) ^ word) * 0x517CC1B727220A95 from
    h = 0, then murmur3's 64-bit finaliser."""
    data = value.encode("utf-8")
    h = 0

    def add(h, word):
        return ((((h << 5) | (h >> 59)) & MASK64) ^ word) * 0x517CC1B727220A95 & MASK64

    whole = len(data) // 8 * 8
    for at in range(0, whole, 8):
        h = add(h, int.from_bytes(data[at : at + 8], "little"))
    rest = data[whole:]
    if rest:
        h = add(h, int.from_bytes(rest.ljust(8, b"\0"), "little") ^ (len(rest) << 59))
    h = (h ^ (h >> 33)) * 0xFF51AFD7ED558CCD & MASK64
    h = (h ^ (h >> 33)) * 0xC4CEB9FE1A85EC53 & MASK64
    return h ^ (h >> 33)


class Vocabulary:
    """One vocabulary of the features file: kept values, then hashed ids (`buckets`)."""

    def __init__(self, offset, values, buckets, oov):
        self.ids = {v: offset + 2 + i for i, v in enumerate(values)}
        self.first_bucket, self.buckets, self.oov = offset + 2 + len(values), buckets, offset + oov

    def get(self, value):
        found = self.ids.get(value)
        if found is not None:
            return found
        if self.buckets:
            return self.first_bucket + bucket_hash(value) % self.buckets
        return self.oov


class Encoder:
    """Raw CSV values to the model's inputs, by the rules of mdl-features/1 and /2."""

    def __init__(self, features, header):
        if features["format"] not in ("mdl-features/1", "mdl-features/2"):
            raise SystemExit(f"unknown features format {features['format']!r}")
        self.oov, self.pad = features["oov"], features["pad"]
        self.groups = features["inputs"]
        self.column = {name: i for i, name in enumerate(header)}
        self.index = []
        for g in self.groups:
            if g["kind"] == "categorical":
                self.index.append(
                    [Vocabulary(c["offset"], c["values"], c.get("buckets", 0), self.oov) for c in g["columns"]]
                )
            elif g["kind"] == "sequence":
                self.index.append(Vocabulary(g["offset"], g["values"], g.get("buckets", 0), self.oov))
            else:
                self.index.append(None)

    def cell(self, row, column):
        if column not in self.column:
            raise SystemExit(f"no column {column!r} in the header")
        return row[self.column[column]]

    def encode(self, rows):
        feeds = {}
        for g, index in zip(self.groups, self.index):
            kind = g["kind"]
            if kind == "categorical":
                ids = [
                    [index[j].get(self.cell(r, c["column"])) for j, c in enumerate(g["columns"])]
                    for r in rows
                ]
                feeds[g["name"]] = np.array(ids, dtype=np.int64).reshape(len(rows), len(g["columns"]))
            elif kind == "sequence":
                n = g["max_len"]
                ids = np.full((len(rows), len(g["columns"]), n), self.pad, dtype=np.int64)
                for i, r in enumerate(rows):
                    for j, column in enumerate(g["columns"]):
                        items = ITEM.findall(self.cell(r, column))[-n:] if n else []
                        for k, item in enumerate(items):
                            ids[i, j, n - len(items) + k] = index.get(item)
                feeds[g["name"]] = ids
                if "mask" in g:  # absent when the model reads no mask of the group
                    feeds[g["mask"]] = (ids != self.pad).astype(np.float32)
            elif kind == "numeric":
                values = np.zeros((len(rows), len(g["columns"])), dtype=np.float32)
                for i, r in enumerate(rows):
                    for j, c in enumerate(g["columns"]):
                        text = self.cell(r, c["column"]).strip()
                        if text:
                            values[i, j] = np.float32((float(text) - c["shift"]) * c["scale"])
                feeds[g["name"]] = values
            elif kind == "domain":
                ids = []
                for r in rows:
                    d = int(self.cell(r, g["column"]).strip())
                    if d >= g["domains"]:
                        if g["unknown_domain"] is None:
                            raise SystemExit(f"domain id {d} is outside 0..{g['domains']}")
                        d = g["unknown_domain"]
                    ids.append(d)
                feeds[g["name"]] = np.array(ids, dtype=np.int64)
            else:
                raise SystemExit(f"unknown input kind {kind!r}")
        return feeds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--features", help="default: the model's .features.json beside it")
    p.add_argument("--batch", type=int, default=4096, help="rows per model call (the run's batch size)")
    p.add_argument("--out", help="write the scores here as CSV")
    p.add_argument("--compare", help="mdl predict's output for the same rows")
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args()

    features_path = args.features or re.sub(r"\.onnx$", "", args.model) + ".features.json"
    with open(features_path) as f:
        features = json.load(f)
    header, rows = read_rows(args.data)
    encoder = Encoder(features, header)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    tasks = features["tasks"]
    scores = np.zeros((len(rows), len(tasks)), dtype=np.float32)
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        out = session.run(tasks, encoder.encode(chunk))
        for t, values in enumerate(out):
            scores[start : start + len(chunk), t] = values

    if args.out:
        with open(args.out, "w") as f:
            f.write(",".join(tasks) + "\n")
            for row in scores:
                f.write(",".join(f"{s:.6f}" for s in row) + "\n")
    if args.compare:
        theirs_header, theirs = read_rows(args.compare)
        if len(theirs) != len(rows):
            raise SystemExit(f"{args.compare} has {len(theirs)} rows, {args.data} has {len(rows)}")
        worst = 0.0
        for t, task in enumerate(tasks):
            column = theirs_header.index(task)
            # Absolute for values up to 1 (probabilities), relative above (a regression
            # task's prediction, float32 either way).
            want = np.array([float(r[column]) for r in theirs], dtype=np.float64)
            diff = float(np.max(np.abs(scores[:, t] - want) / np.maximum(1.0, np.abs(want))))
            print(f"{task}: max |diff| {diff:.3e} over {len(rows)} rows")
            worst = max(worst, diff)
        if not worst <= args.tolerance:
            print(f"max |diff| {worst:.3e} is above {args.tolerance:g}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
