"""Results: the one table of metrics before and after, and the answers to show side by side.

The rows are metrics.METRIC_ROWS (and the user's eval.metrics), the table the terminal
prints too, each formatted by metrics.format_value for the base model (before.json), the
prompted base model (prompted.json) and the tuned model (after.json), with the tuned
model's change against each and whether it is better; the verdict's primary metric is
marked. A metric no model measured is left out.

Trade-off: a change is called better or worse by its sign alone; whether it is
significant is the verdict's question (verdict.py), asked of the primary metric only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sftlab.contracts import EvalSummary
from sftlab.metrics import MetricRow, format_value, metric_rows, primary_location
from sftlab.report.run import Run
from sftlab.report.text import fmt
from sftlab.rundir import EVAL_SAMPLES_FILE, relative


def measured(result: EvalSummary | None, group: str, key: str) -> float | None:
    """A metric of before/prompted/after.json by the table's (group, key); None when the file or value is missing."""
    return result.value(group, key) if result is not None else None


@dataclass
class ResultRow:
    """One metric of the results table, formatted, with the tuned model's changes and whether they are better."""

    label: str
    before: str
    prompted: str
    after: str
    primary: bool
    change: str = ""  # vs the base model
    verdict: str = ""  # "better" | "worse" | ""
    change_prompted: str = ""  # vs the prompted base model
    verdict_prompted: str = ""


def results(run: Run) -> list[ResultRow]:
    """Each metric of metrics.METRIC_ROWS (and the user's) that some model measured; the verdict's primary marked."""
    user_metrics = sorted({key for result in (run.before, run.prompted, run.after) if result for key in result.metrics})
    primary = primary_location(run.verdict.primary) if run.verdict else None
    rows = []
    for metric in metric_rows(user_metrics):
        before, prompted, after = (
            measured(result, metric.group, metric.key) for result in (run.before, run.prompted, run.after)
        )
        if before is None and prompted is None and after is None:
            continue
        row = ResultRow(
            metric.label,
            fmt(before, metric.kind),
            fmt(prompted, metric.kind),
            fmt(after, metric.kind),
            primary=(metric.group, metric.key) == primary,
        )
        row.change, row.verdict = _change(after, before, metric)
        row.change_prompted, row.verdict_prompted = _change(after, prompted, metric)
        rows.append(row)
    return rows


def _change(after: float | None, other: float | None, metric: MetricRow) -> tuple[str, str]:
    if other is None or after is None:
        return "", ""
    delta = after - other
    if not delta:
        return "no change", ""
    return format_value(delta, metric.kind, signed=True), "better" if (delta < 0) == (
        metric.better == "lower"
    ) else "worse"


def evaluation_setup(run: Run) -> str:
    result = run.after or run.before
    if not result:
        return ""
    parts = []
    if result.num_prompts:
        parts.append(f"{result.num_prompts} held-out prompts")
    if result.max_new_tokens:
        parts.append(f"greedy answers of at most {result.max_new_tokens} new tokens")
    if result.retention.source:
        parts.append(f"retention measured on {result.retention.source}")
    if result.adherence.format_spec is not None:
        parts.append("eval.format " + json.dumps(result.adherence.format_spec, ensure_ascii=False))
    return "; ".join(parts)


def side_by_side(run: Run) -> tuple[list[dict], str]:
    """Answers to show side by side, and where they come from."""
    samples_file = relative(EVAL_SAMPLES_FILE)
    if run.eval_samples:
        return run.eval_samples, f"{samples_file}: the base model and the fine-tuned model on the same held-out prompts"
    steps = sorted({s.get("step") for s in run.training_samples if isinstance(s.get("step"), int)})
    if not steps:
        return [], ""
    first, last = steps[0], steps[-1]
    early = {s.get("prompt"): s for s in run.training_samples if s.get("step") == first}
    rows = [
        {
            "prompt": s.get("prompt"),
            "reference": None,
            "base_output": early.get(s.get("prompt"), {}).get("output"),
            "tuned_output": s.get("output"),
            "base_follows_format": early.get(s.get("prompt"), {}).get("follows_format"),
            "tuned_follows_format": s.get("follows_format"),
        }
        for s in run.training_samples
        if s.get("step") == last
    ]
    return rows, (
        f"{samples_file} is missing: held-out answers during training instead, "
        f"at the first evaluation (step {first}) and the last (step {last})"
    )
