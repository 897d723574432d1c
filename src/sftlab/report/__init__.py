"""Report: the run documents itself, from what it measured.

The chapter ends with "document your training process: dataset characteristics,
training parameters, performance metrics, known limitations". `write_report` writes
that documentation from the run directory alone:

- `final/README.md`: a Hugging Face model card (YAML front matter, then summary,
  dataset characteristics, training parameters, results before and after, warning signs,
  known limitations, how to use it, framework versions);
- `report.html`: one self-contained page with the data audit, the training curves with
  the diagnosis marked on them, the evaluation before/after with side-by-side answers,
  and the model card.

It reads only files the run wrote, so `sftlab report RUN_DIR` rebuilds both at any time,
including for a run that stopped early or was killed: it reports what exists and names
what is missing or unreadable. The stage, one job a module:

    run.py          reading the run directory once, into typed records
    facts.py        status, base model, parameters, hardware, duration, tokens, versions, exports
    results.py      the results table before and after (metrics.METRIC_ROWS), answers side by side
    limitations.py  known limitations, each from a measurement and a named threshold
    card.py         the model card (huggingface_hub ModelCard, templates/model_card.md)
    html.py         report.html (templates/report.html.j2)
    text.py         the one number formatter; Markdown escaping
    run_info.py     run_info.json and eval/audit.json, written by training for the report

Trade-offs:
- Every number is one the run recorded; the report computes nothing new except the
  diagnosis (pure and fast, recomputed from metrics.jsonl so that it covers every logged
  step, also after a kill) and the plots, redrawn from the metrics for the same reason.
- The card is written at the end of a run only; a report written during training is the
  HTML alone, which reloads itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftlab.report.card import CARD_SECTIONS, card_metadata, model_card, usage_snippet
from sftlab.report.facts import Status, exported_files, run_status, training_facts
from sftlab.report.html import LIVE_REFRESH_SECONDS, render_html
from sftlab.report.limitations import known_limitations
from sftlab.report.run import Run, read_run
from sftlab.report.text import duration, fmt, writable
from sftlab.resolve import current_versions, write_run_info
from sftlab.rundir import CARD_FILE, EXPORTS_FILE, REPORT_FILE, RUN_INFO_FILE, write_atomically, write_audit, writing

__all__ = [
    "write_report",
    "write_run_info",
    "write_audit",
    "read_run",
    "model_card",
    "render_html",
    "run_status",
    "Run",
    "Status",
    "ReportResult",
    "known_limitations",
    "training_facts",
    "exported_files",
    "usage_snippet",
    "card_metadata",
    "current_versions",
    "fmt",
    "duration",
    "CARD_SECTIONS",
    "LIVE_REFRESH_SECONDS",
    # run-directory names, spelled in rundir.py; here for code that imported them from the report
    "CARD_FILE",
    "EXPORTS_FILE",
    "REPORT_FILE",
    "RUN_INFO_FILE",
]


@dataclass
class ReportResult:
    html: Path
    card: Path | None  # None when there is no final model to put it in
    status: Status
    missing: list[str]
    unreadable: list[str]


def write_report(run_dir: str | Path, live: bool = False) -> ReportResult:
    """Write final/README.md (when final/ exists) and report.html from the run directory alone.

    `live`: written during training, the page says so and reloads itself every
    LIVE_REFRESH_SECONDS; the card is left for the end of the run.
    """
    run = read_run(run_dir)
    status = run_status(run)
    card = writable(model_card(run, status))
    card_path = None
    if run.has_final and not live:
        card_path = run.final_dir / CARD_FILE
        with writing(card_path):
            write_atomically(card_path, card)
    html_path = run.path / REPORT_FILE
    with writing(html_path):
        write_atomically(html_path, writable(render_html(run, card, status, live=live)))
    return ReportResult(html=html_path, card=card_path, status=status, missing=run.missing, unreadable=run.unreadable)
