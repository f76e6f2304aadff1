"""Result rows to per-configuration means, and the criteria's verdicts against the baseline."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from .experiments import BASELINE, CRITERIA, CRITERION_POINTS

def summarize(rows: Iterable[Dict[str, Any]]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Per (task, configuration): seeds, mean / sample std of final top-1, mean curve, mean wall time."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["config"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        finals = np.array([r["final_top1"] for r in rs], dtype=np.float64)
        n_epochs = min(len(r["curve"]) for r in rs)
        out[key] = dict(seeds=[r["seed"] for r in rs], n=len(rs), mean=float(finals.mean()),
                        std=float(finals.std(ddof=1)) if len(rs) > 1 else 0.0,
                        curve=np.mean([r["curve"][:n_epochs] for r in rs], axis=0).tolist(),
                        train_loss=float(np.mean([r["train_loss"][-1] for r in rs])),
                        wall_s=float(np.mean([r["wall_s"] for r in rs])))
    return out


def compare(summary: Dict[Tuple[str, str], Dict[str, Any]], criteria=CRITERIA, baseline: str = BASELINE,
            points: float = CRITERION_POINTS) -> List[Dict[str, Any]]:
    """Each criterion (task, config): mean difference against the baseline and whether |diff| <= points.

    Missing runs give ``met=None`` (not decided), never a pass.  Only seeds both sides ran count.
    """
    out = []
    for task, config in criteria:
        a, b = summary.get((task, config)), summary.get((task, baseline))
        row = dict(task=task, config=config, baseline=baseline, points=points, diff=None, met=None,
                   mean=None, baseline_mean=None, seeds=[])
        if a is not None and b is not None:
            seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
            if seeds and seeds == sorted(a["seeds"]) == sorted(b["seeds"]):
                row.update(mean=a["mean"], baseline_mean=b["mean"], diff=a["mean"] - b["mean"], seeds=seeds)
                row["met"] = abs(row["diff"]) <= points
        out.append(row)
    return out


def paired_diffs(rows: Iterable[Dict[str, Any]], task: str, config: str, baseline: str = BASELINE):
    """Per-seed final top-1 differences config - baseline (same seed = same init and data)."""
    by = {(r["task"], r["config"], r["seed"]): r["final_top1"] for r in rows}
    return {s: by[(task, config, s)] - by[(task, baseline, s)]
            for (t, c, s) in sorted(by) if t == task and c == config and (task, baseline, s) in by}
