"""Curves of a run: every numeric metric of ``metrics.jsonl`` against the optimizer step, to PNG.

One figure per metric *group*: a training metric and its evaluation counterpart share a figure
(``loss`` with ``eval_loss``, ``rewards/margins`` with ``eval_rewards/margins``), so
``loss.png`` shows the training and held-out losses together. Figures are drawn on matplotlib's
Agg canvas directly (no pyplot, no global backend switch), so plotting works without a display
and does not disturb a caller's own matplotlib state.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

PLOTS_DIR = "plots"
EVAL_PREFIX = "eval_"
# Record bookkeeping, not metrics: the x axis and the data position.
_NOT_PLOTTED = frozenset({"step", "epoch"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped; a bad line names its number)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}:{lineno} is not a metrics record (a JSON object with a 'step')")
            records.append(record)
    return records


def metric_groups(records: list[dict]) -> dict[str, list[str]]:
    """Group name -> metric keys (training key first, then ``eval_`` key) over every numeric value
    seen, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for record in records:
        for key, value in record.items():
            if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            group = key.removeprefix(EVAL_PREFIX)
            keys = groups.setdefault(group, [])
            if key not in keys:
                keys.append(key)
                keys.sort(key=lambda k: k.startswith(EVAL_PREFIX))
    return groups


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw the curves of ``run_dir/metrics.jsonl`` into ``out_dir`` (default ``run_dir/plots``),
    one ``<group>.png`` per metric group, replacing earlier drawings; returns the files written.

    A series with a single point is drawn as a marker, so an end-of-run evaluation still shows.
    Non-finite values are left out of the curve (its other points are still drawn).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"run_dir: {str(run_dir)!r} has no metrics.jsonl (is it a run directory?)")
    records = read_metrics(metrics)
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, keys in metric_groups(records).items():
        fig = Figure(figsize=(6.4, 4.0))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key in keys:
            steps, values = _series(records, key)
            label = "eval" if key.startswith(EVAL_PREFIX) else "train"
            ax.plot(steps, values, marker="o" if len(steps) < 2 or label == "eval" else None, markersize=3,
                    label=f"{label}: {key}")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(group)
        ax.set_title(f"{run_dir.name}: {group}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = out / f"{_UNSAFE.sub('_', group)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
