"""Plots: the curves of a run as PNGs (loss.png with the findings shaded, learning_rate.png, grad_norm.png).

The monitor redraws them at each evaluation; the report redraws them with its own diagnosis
(or shows the run's PNGs when the metrics are gone). Every file is written atomically: a
browser showing the live report never reads half a PNG.

Trade-off: matplotlib (Agg, no display) is imported only when a plot is drawn, so neither the
CLI nor the diagnosis pays for it; a plot costs a few tenths of a second per evaluation.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from sftlab.rundir import PLOT_FILES, write_bytes_atomically

if TYPE_CHECKING:
    from sftlab.diagnose import Diagnosis


def plot_curves(run_dir: Path, records: list[dict], diagnosis: Diagnosis | None = None) -> list[Path]:
    """loss.png (train and eval, findings shaded), learning_rate.png, grad_norm.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, filename in PLOT_FILES.items():
        series = {"train loss" if metric == "loss" else metric: _series(records, metric)}
        if metric == "loss":
            series["eval loss"] = _series(records, "eval_loss")
        if not any(points for points in series.values()):
            continue
        figure, axes = plt.subplots(figsize=(7, 3.6), dpi=110)
        for label, points in series.items():
            if points:
                axes.plot(*zip(*points), label=label, marker="o" if label == "eval loss" else None, markersize=3)
        if metric == "loss" and diagnosis is not None:
            _shade_findings(axes, diagnosis)
        axes.set_xlabel("step")
        axes.set_title(metric.replace("_", " "))
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend()
        figure.tight_layout()
        path = Path(run_dir) / filename
        png = io.BytesIO()
        figure.savefig(png, format="png")
        plt.close(figure)
        write_bytes_atomically(path, png.getvalue())
        written.append(path)
    return written


def _shade_findings(axes, diagnosis: Diagnosis) -> None:
    """The steps of each warning (orange) and error (red), labelled with its code."""
    for finding in diagnosis.findings:
        if finding.severity in {"warning", "error"}:
            first, last = finding.steps
            color = "tab:red" if finding.severity == "error" else "tab:orange"
            axes.axvspan(first, max(last, first + 0.5), alpha=0.15, color=color)
            axes.annotate(finding.code, (first, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [
        (record["step"], record[key])
        for record in records
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key]) and "train_runtime" not in record
    ]
