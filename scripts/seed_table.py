#!/usr/bin/env python3
"""The seeds table of a folder of runs made by scripts/seed-runs.sh (OUT_DIR/LABEL-sSEED).

For each label: test AUC as mean ± sd (sample sd over the seeds) with every run's value,
gAUC and LogLoss means, each task's AUC (multi-task), the AUC of domains 1 and 2 (the
largest), and the 10 smallest test domains: how many rows and positives they hold, the mean
AUC over those with both classes, and their row-weighted LogLoss. Ranking metrics (HR@k,
NDCG@k of a candidates task) are printed when a run has them.

    python3 scripts/seed_table.py OUT_DIR
"""
import json
import os
import re
import statistics
import sys


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def mean(values):
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.4f}" if values else "–"


def small_domains(per_domain, k=10):
    """The k smallest domains by rows: (rows, positives, mean AUC of those with both
    classes and their number, row-weighted LogLoss)."""
    items = sorted(per_domain.items(), key=lambda kv: (kv[1]["count"], kv[0]))[:k]
    rows = sum(v["count"] for _, v in items)
    positives = sum(v.get("positives", 0) for _, v in items)
    aucs = [v["auc"] for _, v in items if v.get("auc") is not None]
    losses = [(v["count"], v["logloss"]) for _, v in items if v.get("logloss") is not None]
    logloss = sum(c * l for c, l in losses) / sum(c for c, _ in losses) if losses else None
    return rows, positives, (statistics.mean(aucs) if aucs else None), len(aucs), logloss


def main(out):
    runs = {}
    for name in sorted(os.listdir(out)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        path = os.path.join(out, name, "metrics.json")
        if not m or not os.path.isfile(path):
            continue
        with open(path) as f:
            runs.setdefault(m.group(1), []).append((int(m.group(2)), json.load(f)))
    print("| run | seeds | test AUC (mean ± sd) | runs | gAUC | LogLoss | per-task AUC | tab 1 / tab 2 AUC "
          "| 10 smallest: rows (positives), mean AUC of n with both classes, LogLoss | epochs (best step) |")
    print("|---|---|---:|---|---:|---:|---|---|---|---|")
    for label, items in runs.items():
        items.sort()
        tests = [m["test"] for _, m in items]
        aucs = [t.get("auc") for t in tests]
        per_task = {}
        for t in tests:
            for name, v in (t.get("per_task") or {}).items():
                per_task.setdefault(name, []).append(v.get("auc"))
        tasks = ", ".join(f"{n} {mean_sd(v)}" for n, v in per_task.items()) if len(per_task) > 1 else "–"
        dom = lambda d: mean([(t.get("per_domain") or {}).get(d, {}).get("auc") for t in tests])
        smalls = [small_domains(t["per_domain"]) for t in tests if t.get("per_domain")]
        if smalls:
            rows, positives, _, n_auc, _ = smalls[0]
            small = (f"{rows} ({positives}), {mean_sd([s[2] for s in smalls])} of {n_auc}, "
                     f"{mean([s[4] for s in smalls])}")
        else:
            small = "–"
        more = {}
        for t in tests:
            for k, v in (t.get("more") or {}).items():
                more.setdefault(k, []).append(v)
        extra = "; ".join(f"{k} {mean_sd(v)}" for k, v in sorted(more.items()) if re.match(r"(hr|ndcg)@", k))
        epochs = ", ".join(f"{m.get('epochs')} ({m.get('best_step')})" for _, m in items)
        values = ", ".join("–" if a is None else f"{a:.4f}" for a in aucs)
        seeds = ", ".join(str(s) for s, _ in items)
        head = mean_sd(aucs) if any(a is not None for a in aucs) else extra
        print(f"| {label} | {seeds} | {head} | {values} | {mean([t.get('gauc') for t in tests])} "
              f"| {mean([t.get('logloss') for t in tests])} | {tasks} | {dom('1')} / {dom('2')} | {small} | {epochs} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 scripts/seed_table.py OUT_DIR")
    main(sys.argv[1])
