"""The comparison in the terminal: the verdict, every metric for the base, prompted base and tuned model, samples.

One table, its rows from metrics.metric_rows (the table the model card and report.html
show too), each value printed by metrics.format_value. Prompts and answers are the model's
and the user's text: printed literally (terminal.py), never as markup or escape sequences.

Trade-off: the summaries are read leniently (EvalSummary), so a hand-edited or cut
before.json shows dashes where its values were, never a traceback.
"""

from __future__ import annotations

from sftlab.contracts import EvalSummary
from sftlab.metrics import format_value, metric_rows, primary_location
from sftlab.terminal import literal
from sftlab.verdict import Verdict

COLUMNS = (("base", "base"), ("prompted", "prompted base"), ("tuned", "tuned"))
SAMPLE_FIELDS = (
    ("prompt", "prompt"),
    ("reference", "reference"),
    ("base", "base_output"),
    ("prompted", "prompted_output"),
    ("tuned", "tuned_output"),
)


def print_comparison(
    summaries: dict[str, dict | None], samples: list[dict], verdict: Verdict | None = None, console=None, show: int = 3
) -> None:
    """The verdict first, then the table of every metric for each model evaluated (base, prompted base,
    tuned) with the tuned model's differences, then `show` held-out prompts answered side by side."""
    from rich.table import Table

    console = console or new_console()
    parsed = {side: EvalSummary.parse(summaries[side]) for side, _ in COLUMNS if summaries.get(side)}
    records = {side: record for side, record in parsed.items() if record is not None}
    tuned = records["tuned"]
    if verdict is not None:
        console.print(literal(("verdict", "bold"), f": {verdict.headline}"), soft_wrap=True)
        for caveat in verdict.caveats:
            say(console, f"  caveat: {caveat}")
    present = [(side, label) for side, label in COLUMNS if side in records]
    others = [(side, label) for side, label in present if side != "tuned"]
    table = Table(
        "metric",
        *(label for _, label in present),
        *(f"tuned - {label}" for _, label in others),
        title=f"held-out evaluation: {tuned.num_prompts} prompts, up to {tuned.max_new_tokens} new tokens",
        title_justify="left",
    )
    primary = verdict.primary if verdict is not None else None
    user_metrics = sorted(set().union(*(records[side].metrics.keys() for side, _ in present)))
    for row in metric_rows(user_metrics):
        values = {side: records[side].value(row.group, row.key) for side, _ in present}
        if all(value is None for value in values.values()):
            continue
        is_primary = primary is not None and (row.group, row.key) == primary_location(primary)
        changes = [
            _change(values["tuned"], values[side], row.kind, verdict, side if is_primary else None)
            for side, _ in others
        ]
        label = row.label + (" (primary)" if is_primary else "")
        table.add_row(literal(label), *(format_value(values[side], row.kind) for side, _ in present), *changes)
    console.print(table)
    if primary is not None:
        say(console, "* the primary metric's difference is significant: its paired bootstrap 95% CI excludes 0")
    if tuned.retention.source:
        say(console, f"retention measured on {tuned.retention.source}")
    for number, row in enumerate(samples[:show], start=1):
        console.print(f"\n[bold]sample {number}[/]")
        for label, key in SAMPLE_FIELDS:
            if row.get(key) is not None:
                say(console, f"  {label + ':':<10} {_clip(row[key])}")


def _change(tuned: float | None, other: float | None, kind: str, verdict: Verdict | None, primary_side: str | None):
    """The tuned model's difference from another, starred when it is the primary metric's and significant."""
    if tuned is None or other is None:
        return ""
    difference = getattr(verdict, f"tuned_minus_{primary_side}", None) if primary_side else None
    significant = difference is not None and (difference.significantly_better or difference.significantly_worse)
    return format_value(tuned - other, kind, signed=True) + (" *" if significant else "")


def _clip(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines())  # one line per answer in the terminal
    return text if len(text) <= limit else text[: limit - 3] + "..."


def say(console, text: str) -> None:
    console.print(literal(text), soft_wrap=True)  # prompts and answers: shown as written, never markup or escapes


def new_console():
    from rich.console import Console

    return Console(highlight=False)
