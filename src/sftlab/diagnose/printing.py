"""A diagnosis as plain text for the terminal (`sftlab diagnose`): the phase, each finding, its first remedies.

Trade-off: the terminal shows the first two remedies of each warning; `--json` (and
diagnosis.json) has them all. Plain text, no markup: the CLI shows it literally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftlab.diagnose.findings import Diagnosis

RENDER_ADVICE = 2  # the terminal form shows the first two remedies of each warning; --json has them all


def render_diagnosis(diagnosis: Diagnosis) -> str:
    phase = diagnosis.phase.replace("_", " ")
    lines = [f"phase: {phase}" + (f" ({diagnosis.summary})" if diagnosis.summary else "")]
    for finding in diagnosis.findings:
        first, last = finding.steps
        where = f"step {first}" if first == last else f"steps {first}-{last}"
        lines.append(f"{finding.severity.upper()} {finding.code} ({where}): {finding.evidence}")
        if finding.severity != "info":
            lines += [f"  - {advice}" for advice in finding.advice[:RENDER_ADVICE]]
    lines += [f"note: {note}" for note in diagnosis.notes]
    if not diagnosis.findings and not diagnosis.notes:
        lines.append("no findings")
    return "\n".join(lines)
