"""`diagnose`: the logged metrics (and the samples generated at each evaluation) turned into a `Diagnosis`.

The order of the rules matters, because some signs explain others away: a train loss that
jumped or climbed and stays up makes a rising eval loss instability, not overfitting; a
loss of exactly 0 is a bug, so underfitting and memorization say nothing then; `healthy`
is said only when nothing else was.

Trade-off: the diagnosis runs live at every evaluation (where a finding can stop the run),
so it sees the curves as they are now; a sign can appear at one evaluation and be gone at
the next, which is why the rules ask for evidence that lasts.
"""

from __future__ import annotations

from sftlab.diagnose.curves import Curves
from sftlab.diagnose.findings import ADVICE, DIVERGING, SEVERITY_ORDER, Diagnosis, Finding
from sftlab.diagnose.instability import instability
from sftlab.diagnose.signs import (
    healthy,
    inconsistent_format,
    memorization,
    overfitting,
    phase_of,
    underfitting,
    zero_loss,
)


def diagnose(records: list[dict], samples: list[dict] = (), memorization_loss: float = 0.05) -> Diagnosis:
    """The phase of a run and its findings, from its logged metrics and sampled generations."""
    curves = Curves.from_records(records)
    train_steps, train = curves.train.finite()
    eval_steps, evals = curves.eval.finite()
    _, grad = curves.grad_norm.finite()
    lr_steps, lr = curves.learning_rate.finite()

    phase, summary = phase_of(train_steps, train)
    findings: list[Finding] = []
    notes: list[str] = []
    zero = zero_loss(train_steps, train, grad)

    unstable = instability(curves)
    if unstable.diverging:
        phase = DIVERGING
    if unstable.finding:
        findings.append(unstable.finding)
    train_rising = unstable.train_rising

    if len(evals):
        overfit = overfitting(train_steps, train, eval_steps, evals, train_rising)
        if overfit:
            findings.append(overfit)
    elif len(train):
        findings.append(
            Finding(
                "no_eval_data",
                "info",
                (int(train_steps[0]), int(train_steps[-1])),
                "no eval loss was logged, so overfitting and the train/eval gap cannot be checked",
                ADVICE["no_eval_data"],
            )
        )

    # a loss of exactly 0 is a bug, not a model that learned (underfitting and memorization say nothing then)
    underfit = (
        None if train_rising or zero else underfitting(train_steps, train, eval_steps, evals, lr_steps, lr, phase)
    )
    for rule in (
        zero,
        underfit,
        None if zero else memorization(train_steps, train, eval_steps, evals, memorization_loss, curves.epochs),
        inconsistent_format(samples),
    ):
        if rule:
            findings.append(rule)

    serious = any(finding.severity in {"warning", "error"} for finding in findings)
    if not serious and len(train) and len(evals):
        finding, note = healthy(train_steps, train, eval_steps, evals)
        findings += [finding] if finding else []
        notes += [note] if note else []

    findings.sort(key=lambda finding: SEVERITY_ORDER.get(finding.severity, 3))
    return Diagnosis(phase=phase, findings=findings, summary=summary, notes=notes)
