"""Known limitations: what this run's measurements say a user of the model must know.

Each limitation is derived from a measurement of the run by an explicit threshold (the
named constants below, each with its reason): prompts to look closer, not verdicts. The
chapter asks a fine-tune's documentation for its "known limitations"; these are the ones
the run can show, in plain text (the card escapes them, the HTML lists them).

Trade-off: thresholds are fixed, not tuned to the task: a task with few distinct answers
trips the copying limitation, a tiny test run the short-training ones. They say what was
measured, so a reader can judge.
"""

from __future__ import annotations

from sftlab.diagnose import UNDERFIT_MIN_STEPS
from sftlab.report.facts import Status, training_facts
from sftlab.report.results import measured
from sftlab.report.run import Run
from sftlab.rundir import AFTER_FILE, EVAL_SAMPLES_FILE, FINAL_DIR, relative
from sftlab.verdict import RETENTION_RISE_REL

ADHERENCE_MIN = 0.9  # under 90% of held-out answers in format (or ending their turn), a caller must expect and handle
#   failures on every tenth request: worth saying, whatever the cause.
SHORT_EPOCHS = 1.0  # under one epoch, part of the training data was never seen (the chapter advises 1-3 epochs) ...
SHORT_STEPS = UNDERFIT_MIN_STEPS  # ... and under this many steps the diagnosis cannot yet judge the curves at all.
MANY_EPOCHS = 3.0  # over 3 epochs: past the chapter's 1-3, where memorization becomes likely.
SMALL_DATASET_ROWS = 1000  # under a thousand examples cover few kinds of prompts: the chapter's SFT datasets (smoltalk)
#   hold hundreds of thousands; behaviour on prompts unlike them is untested.


def known_limitations(run: Run, status: Status) -> list[str]:
    """Plain-text limitations, each derived from a measurement of this run."""
    return [
        *_training_limitations(run, status),
        *_data_limitations(run),
        *_evaluation_limitations(run),
        *_warning_signs(run),
    ]


def _training_limitations(run: Run, status: Status) -> list[str]:
    out = []
    if status.state == "incomplete":
        of = f" of {status.planned_steps:,}" if status.planned_steps else ""
        final = (
            "no final model exists."
            if not run.has_final
            else f"{FINAL_DIR}/ may not hold the weights of the last logged step."
        )
        out.append(f"Training did not finish (last logged step {status.last_step:,}{of}): {final}")
    elif status.state == "no_final_model":
        out.append("Training ended without saving a final model.")
    if run.stopped:
        out.append(
            f"Training stopped early at step {run.stopped.step} on {run.stopped.reason}: {run.stopped.evidence}."
        )
    facts = training_facts(run)
    steps, epochs = facts.steps, facts.epochs
    if steps and epochs is not None and epochs < SHORT_EPOCHS:
        out.append(
            f"Short training: {steps:,} steps, {epochs:.2f} epochs: part of the training data was never seen "
            f"(the chapter advises 1-3 epochs)."
        )
    elif steps and steps < SHORT_STEPS:
        out.append(
            f"Short training: {steps:,} optimizer steps, too few for the diagnosis to judge under- or overfitting."
        )
    if epochs is not None and epochs > MANY_EPOCHS:
        out.append(
            f"{epochs:.1f} epochs over the same data, more than the 1-3 the chapter advises: memorization is likely."
        )
    return out


def _data_limitations(run: Run) -> list[str]:
    if run.audit is None:
        return []
    out = []
    audit = run.audit
    rows = audit.splits.train.rows
    if rows is not None and rows < SMALL_DATASET_ROWS:
        out.append(f"Trained on {rows:,} examples only: behaviour on prompts unlike them is untested.")
    if audit.splits.eval.rows == 0:
        out.append("No held-out data: overfitting could not be detected during training.")
    over = audit.truncation.examples_over
    if over and rows:
        out.append(
            f"{over:,} training examples ({over / rows:.1%}) were longer than max_length "
            f"{audit.truncation.max_length} and were cut "
            f"({audit.truncation.trained_tokens_cut or 0:,} trained tokens lost): "
            "long answers were never seen to their end."
        )
    if audit.end_of_turn_untrained:
        out.append(
            f"{audit.end_of_turn_untrained:,} training examples do not train the end-of-turn token: "
            "the model may not learn to stop."
        )
    return out


def _evaluation_limitations(run: Run) -> list[str]:
    after, before = run.after, run.before
    if after is None:
        return [
            f"The fine-tuned model was not evaluated ({relative(AFTER_FILE)} is missing): its quality is unmeasured."
        ]
    out = []
    format_after, format_before = after.adherence.format, measured(before, "adherence", "format")
    if format_after is not None and format_after < ADHERENCE_MIN:
        failing = sum(1 for s in run.eval_samples if s.get("tuned_follows_format") is False)
        out.append(
            f"Follows the required format (eval.format) in {format_after:.1%} of held-out answers"
            + (f" ({format_before:.1%} before fine-tuning)" if format_before is not None else "")
            + (f"; the {failing} answers out of format are in {relative(EVAL_SAMPLES_FILE)}" if failing else "")
            + "."
        )
    if after.adherence.chat is not None and after.adherence.chat < ADHERENCE_MIN:
        out.append(
            f"Ends its answer with the end-of-turn token in {after.adherence.chat:.1%} of held-out answers: "
            "expect run-on answers; cap max_new_tokens."
        )
    retention_after, retention_before = after.retention.loss, measured(before, "retention", "loss")
    if retention_after is not None and retention_before:
        rise = retention_after / retention_before - 1
        if rise > RETENTION_RISE_REL:
            out.append(
                f"General-text loss rose from {retention_before:.4f} to {retention_after:.4f} ({rise:+.1%}) "
                f"on {after.retention.source or 'the retention text'}: "
                "some general ability was lost (catastrophic forgetting)."
            )
    loss_after, loss_before = after.loss.loss, measured(before, "loss", "loss")
    if loss_after is not None and loss_before is not None and loss_after >= loss_before:
        out.append(f"Held-out loss did not improve ({loss_before:.4f} before, {loss_after:.4f} after).")
    if after.memorization.verbatim_share:
        out.append(
            f"{after.memorization.verbatim_share:.1%} of held-out answers copy a training response verbatim: "
            "a memorization signal."
        )
    if after.num_prompts:
        out.append(
            f"Measured on {after.num_prompts} held-out prompts from the same data as training: "
            "quality on other kinds of prompts is not measured."
        )
    return out


def _warning_signs(run: Run) -> list[str]:
    return [
        f"Warning sign during training: {finding.code} (steps {finding.steps[0]}-{finding.steps[1]}): "
        f"{finding.evidence}."
        for finding in (run.diagnosis.findings if run.diagnosis else [])
        if finding.severity in {"warning", "error"}
    ]
