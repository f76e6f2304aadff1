"""summary.csv (one row per epoch) read and written atomically, and the curves plotted with compare_zoo."""
from __future__ import annotations

import csv
import os
import sys
from typing import Any, Dict, List

SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


def read_summary(path: str) -> List[Dict[str, float]]:
    rows = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("epoch") and row["epoch"] != "epoch":
                    rows.append(row)
    return rows


def write_summary(path: str, rows: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            w.writeheader()
            for row in rows:
                w.writerow({k: row[k] for k in SUMMARY_COLUMNS})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot_runs(out_png: str, runs: Dict[str, str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/
    import compare_zoo
    curves = {label: compare_zoo.read_summary(path) for label, path in runs.items()}
    compare_zoo.plot_curves(curves, out_png, title=" vs ".join(runs))
    print(f"plot: {out_png}", flush=True)
