"""What a diagnosis says: the `Diagnosis` (the phase and its findings), each `Finding`'s code and remedies.

The chapter describes three phases of a training loss curve (an initial sharp drop, a
gradual stabilization, convergence) and five warning signs: overfitting, underfitting,
memorization, instability and inconsistent output formatting. `zero_loss` is not the
chapter's (a loss of exactly 0 trains nothing: a masking or label bug); `healthy` and
`no_eval_data` say that nothing was found, or what could not be checked. `ADVICE` holds the
chapter's remedies for each.

The models are pydantic, like the config: `to_json()` writes diagnosis.json with the keys it
has always had (phase, findings: code, severity, steps, evidence, advice); `Diagnosis.parse`
reads one back leniently (a finding without its two steps is dropped, never raised on).

Trade-off: `summary` and `notes` are for people reading the terminal or the report, and are
recomputed from the curves; diagnosis.json keeps only what a program needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError, WrapValidator

from sftlab.diagnose.printing import render_diagnosis
from sftlab.rundir import DIAGNOSIS_FILE, read_json, write_json

PHASES = ("initial_sharp_drop", "gradual_stabilization", "converged")
NOT_STARTED = "not_started"
DIVERGING = "diverging"  # not one of the chapter's phases: the loss climbs instead of settling
SEVERITIES = ("info", "warning", "error")
CODES = (
    "overfitting",
    "underfitting",
    "memorization",
    "instability",
    "inconsistent_format",
    "zero_loss",
    "healthy",
    "no_eval_data",
)

ADVICE = {
    "overfitting": [
        "Reduce the training steps (or epochs); keep the checkpoint with the lowest eval loss (best_checkpoint.json).",
        "Increase the dataset size.",
        "Validate dataset quality and diversity.",
    ],
    "underfitting": [
        "If it is learning too slowly, try increasing the learning rate.",
        "If it is struggling with the task, check the data quality and the task complexity.",
        "If it hits the model's architecture limitations, consider a different model.",
    ],
    "memorization": [
        "Compare outputs on held-out prompts with the training examples: near copies mean memorization.",
        "Check the diversity of the outputs: responses too similar to each other or to the training examples "
        "are a sign.",
        "Use more, and more varied, training data.",
        "Train for fewer epochs.",
    ],
    "memorization_low_both": [
        "A deterministic task (such as strict JSON extraction) can reach a very low loss on train and eval alike; "
        "still check the outputs on new, similar prompts.",
    ],
    "instability": [
        "Lower the learning rate: too high a learning rate causes instability.",
        "Add or lengthen the warmup (warmup_ratio).",
        "Check gradient clipping (max_grad_norm; 1.0 by default).",
        "Check the data for extreme examples (very long, empty or garbled rows): `sftlab check` lists lengths "
        "and problems.",
    ],
    "non_finite": [
        "A NaN or infinite value stops the run: go back to the last good checkpoint and change what follows.",
        "In fp16, prefer bf16 or fp32.",
    ],
    "inconsistent_format": [
        "Check the chat template and that the end-of-turn token is trained (`sftlab check` shows it).",
        "Make the training examples more consistent in format.",
        "Train longer.",
        "Read the outputs in samples_during_training.jsonl.",
    ],
    "zero_loss": [
        "A loss of exactly 0 trains nothing: check that some labels are not -100 (`sftlab check` shows the trained "
        "part of each example and the trained-token share).",
        "With a response template or assistant-only loss, check that its markers occur in the rendered data.",
        "Check that the collator keeps the labels (a custom collator or `labels` column can zero them).",
    ],
    "eval_non_finite": [
        "An eval loss of NaN while training stays finite usually means eval batches without a trained token (0/0): "
        "check what max_length cuts from the eval examples (`sftlab check`), and the eval data's format.",
    ],
    "healthy": ["Evaluate the best checkpoint on held-out prompts before using it."],
    "no_eval_data": ["Hold out an eval set (data.eval_split or data.eval) and evaluate regularly (eval_steps)."],
}

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _two_steps(value, handler):
    """Steps that are not two integers (a hand-edited diagnosis.json) read as (0, 0): a report, not a crash."""
    try:
        return handler(value)
    except ValidationError:
        return (0, 0)


class Finding(BaseModel):
    """One warning sign (or the absence of any): built positionally, like the dataclass it was."""

    code: str
    severity: str  # "info" | "warning" | "error"
    steps: Annotated[tuple[int, int], WrapValidator(_two_steps)]  # first and last step concerned
    evidence: str  # the numbers that triggered it
    advice: list[str]

    def __init__(self, code: str, severity: str, steps: tuple[int, int], evidence: str, advice: list[str]):
        super().__init__(code=code, severity=severity, steps=steps, evidence=evidence, advice=advice)

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "steps": [int(self.steps[0]), int(self.steps[1])],
            "evidence": self.evidence,
            "advice": list(self.advice),
        }


class Diagnosis(BaseModel):
    phase: str
    findings: list[Finding]
    summary: str = ""  # one line on the curve behind the phase, for `render`
    notes: list[str] = Field(default_factory=list)  # context without a finding (e.g. a gap that is not small)

    def to_json(self) -> dict:
        return {"phase": self.phase, "findings": [finding.to_json() for finding in self.findings]}

    def codes(self) -> set[str]:
        return {finding.code for finding in self.findings}

    def render(self) -> str:
        return render_diagnosis(self)

    @classmethod
    def parse(cls, value) -> Diagnosis | None:
        """A diagnosis.json read back: None when it is not an object; findings without two steps are dropped."""
        if not isinstance(value, dict):
            return None
        items = value.get("findings")
        findings = []
        for item in items if isinstance(items, list) else []:
            steps = item.get("steps") if isinstance(item, dict) else None
            if isinstance(steps, list) and len(steps) == 2:
                advice = item.get("advice")
                findings.append(
                    Finding(
                        str(item.get("code")),
                        str(item.get("severity")),
                        (steps[0], steps[1]),
                        str(item.get("evidence", "")),
                        [str(a) for a in advice] if isinstance(advice, list) else [],
                    )
                )
        return cls(phase=str(value.get("phase", "unknown")), findings=findings)


def write_diagnosis(run_dir: str | Path, diagnosis: Diagnosis) -> None:
    write_json(Path(run_dir) / DIAGNOSIS_FILE, diagnosis.to_json())


def read_diagnosis(run_dir: str | Path) -> Diagnosis | None:
    """The run's diagnosis.json; None when it is missing or not an object."""
    return Diagnosis.parse(read_json(Path(run_dir) / DIAGNOSIS_FILE))
