"""report.html: the run on one self-contained page.

The data audit, the training curves with the diagnosis marked on them, the evaluation
before and after with answers side by side, the verdict, the known limitations and the
model card, rendered from templates/report.html.j2 with the facts of report/facts.py.

Trade-offs:
- One file with inline CSS and the plots as base64 data URIs, no script and no external
  URL, behind a Content-Security-Policy that forbids both: it opens offline and can be
  mailed, at the cost of ~100 KB of embedded images.
- Jinja escapes everything it inserts (autoescape), and the card is rendered by
  markdown-it with raw HTML, links and images off: a dataset holding `<script>` shows it
  as text.
- A report written during training (`live`) reloads itself every LIVE_REFRESH_SECONDS, a
  meta refresh rather than a script.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import re

from sftlab.contracts import Audit
from sftlab.report.facts import Status, exported_files, hardware, run_status, training_facts, training_parameters
from sftlab.report.limitations import known_limitations
from sftlab.report.results import evaluation_setup, results, side_by_side
from sftlab.report.run import Run
from sftlab.report.text import duration, fmt
from sftlab.rundir import AFTER_FILE, AUDIT_FILE, BEFORE_FILE, CARD_FILE, EVAL_SAMPLES_FILE, FINAL_DIR, relative

HTML_TEMPLATE = "report.html.j2"
LIVE_REFRESH_SECONDS = 30  # a report written during training reloads itself this often in the browser
SAMPLES_SHOWN = 8  # side-by-side answers in the HTML, enough to read; the rest stay in eval/samples.jsonl
PROBLEMS_SHOWN = 20  # data problems listed in the HTML; the rest are in eval/audit.json
DUPLICATES_SHOWN = 5
# Files the page names when they are missing, as rundir.py spells them.
REPORTED_FILES = {
    "audit": relative(AUDIT_FILE),
    "before": relative(BEFORE_FILE),
    "after": relative(AFTER_FILE),
    "card": CARD_FILE,
}


@functools.cache
def _templates():
    """One environment per process: it keeps the compiled template, which a live report renders at every evaluation."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("sftlab.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(run: Run, card: str, status: Status | None = None, live: bool = False) -> str:
    from markupsafe import Markup

    status = status or run_status(run)
    samples, samples_source = side_by_side(run)
    front, body = _split_card(card)
    return (
        _templates()
        .get_template(HTML_TEMPLATE)
        .render(
            run=run,
            status=status,
            name=run.name,
            generated=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            audit_view=_audit_view(run.audit),
            params=training_parameters(run),
            hardware=hardware(run),
            facts=training_facts(run),
            plots={name: base64.b64encode(png).decode("ascii") for name, png in run.plots.items()},
            diagnosis=run.diagnosis,
            results=results(run),
            evaluation_setup=evaluation_setup(run),
            samples=samples[:SAMPLES_SHOWN],
            samples_total=len(samples),
            samples_source=samples_source,
            limitations=known_limitations(run, status),
            card_front=front,
            card_html=Markup(_markdown_to_html(body)),
            fmt=fmt,
            duration=duration,
            final_dir=FINAL_DIR,
            eval_samples_file=relative(EVAL_SAMPLES_FILE),
            files=REPORTED_FILES,
            verdict=run.verdict,
            live=live,
            refresh_seconds=LIVE_REFRESH_SECONDS,
            has_prompted=run.prompted is not None or any(s.get("prompted_output") is not None for s in samples),
            exports=exported_files(run.path),
        )
    )


def _split_card(card: str) -> tuple[str, str]:
    match = re.match(r"---\n(.*?\n)---\n", card, flags=re.DOTALL)
    return (match.group(1), card[match.end() :]) if match else ("", card)


def _markdown_to_html(markdown: str) -> str:
    """CommonMark with tables; raw HTML shows as text, and no link or image can point anywhere."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["image", "link", "autolink"])
    return renderer.render(markdown)


def _audit_view(audit: Audit | None) -> dict | None:
    """The audit as the template shows it, every number formatted."""
    if audit is None:
        return None
    splits, duplicates, truncation = audit.splits, audit.duplicates, audit.truncation
    lengths = [
        (part, [fmt(getattr(stats, key)) for key in ("min", "median", "p95", "max", "mean")])
        for part, stats in (
            ("prompt", audit.lengths.prompt),
            ("response", audit.lengths.response),
            ("total", audit.lengths.total),
        )
    ]
    examples = [
        {
            "where": f"{example.source}:{example.line}",
            "segments": [(segment.text or "", bool(segment.trained)) for segment in example.segments],
        }
        for example in audit.examples
        if example.segments
    ]
    return {
        "train_rows": fmt(splits.train.rows, "int"),
        "train_tokens": fmt(splits.train.tokens, "int"),
        "eval_rows": fmt(splits.eval.rows, "int"),
        "eval_tokens": fmt(splits.eval.tokens, "int"),
        "sources": [
            (label, audit.formats.get(label, "?"), fmt(counts.rows, "int"), fmt(counts.usable, "int"))
            for label, counts in audit.sources.items()
        ],
        "dropped": fmt(audit.dropped.count, "int"),
        "dropped_reasons": [(reason, str(count)) for reason, count in audit.dropped.reasons.items()],
        "problems": [(str(p.file), str(p.line), str(p.message)) for p in audit.problems[:PROBLEMS_SHOWN]],
        "problems_total": len(audit.problems),
        "exact": fmt(duplicates.exact, "int"),
        "near": fmt(duplicates.near, "int"),
        "leakage": fmt(duplicates.leakage, "int"),
        "duplicate_examples": [
            (str(d.kind), str(d.again), str(d.first)) for d in duplicates.examples[:DUPLICATES_SHOWN]
        ],
        "lengths": lengths,
        "max_length": truncation.max_length,
        "examples_over": fmt(truncation.examples_over, "int"),
        "tokens_cut": fmt(truncation.tokens_cut, "int"),
        "trained_tokens_cut": fmt(truncation.trained_tokens_cut, "int"),
        "trained_tokens": fmt(audit.trained_tokens, "int"),
        "trained_share": fmt(audit.trained_token_share, "share"),
        "warnings": audit.warnings,
        "examples": examples,
    }
