"""The files of eval/: each model's summary, the answers side by side (samples.jsonl), and the verdict.

    eval/before.json prompted.json after.json   one EvalSummary each (one_model.py)
    eval/samples.jsonl   per held-out prompt: {"prompt", "reference", and for each of base, prompted,
                         tuned: "<side>_output", "<side>_follows_format", "<side>_scores"} (null when
                         that model was not evaluated)
    eval/verdict.json    did it work? (verdict.py), from the per-answer scores of samples.jsonl

Every file is written through rundir's writers (a kill leaves the old file or the new one).

Trade-off: the models are evaluated at different times (the base before training, the tuned
model after it, `sftlab eval` later); samples.jsonl is rewritten whole each time, keeping
the answers of the models not evaluated now when they are for the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftlab.config import SftlabConfig
from sftlab.evaluate.held_out import HeldOut
from sftlab.evaluate.one_model import Evaluation
from sftlab.rundir import (
    AFTER_FILE,
    BEFORE_FILE,
    EVAL_SAMPLES_FILE,
    PROMPTED_FILE,
    VERDICT_FILE,
    read_json_object,
    read_jsonl,
    write_json,
    write_jsonl,
)
from sftlab.verdict import Verdict, caveats, decide

SIDES = ("base", "prompted", "tuned")  # the models of samples.jsonl, with their files:
SIDE_FILES = {"base": BEFORE_FILE, "prompted": PROMPTED_FILE, "tuned": AFTER_FILE}


@dataclass
class EvalResult:
    """What `sftlab eval` reports: the tuned model's summary (after.json) and the verdict, when there is one."""

    summary: dict
    verdict: Verdict | None


def samples_rows(held_out: HeldOut, answers: dict[str, list[dict] | None]) -> list[dict]:
    """samples.jsonl: per held-out prompt, the reference and each model's answer, format and scores."""
    rows = []
    for i, (question, reference) in enumerate(zip(held_out.questions, held_out.references)):
        row = {"prompt": question, "reference": reference}
        for side in SIDES:
            given = answers.get(side)
            row[f"{side}_output"] = given[i]["output"] if given else None
            row[f"{side}_follows_format"] = given[i]["follows_format"] if given else None
            row[f"{side}_scores"] = given[i].get("scores") if given else None
        rows.append(row)
    return rows


def write_evaluation(eval_dir: Path, held_out: HeldOut, evaluations: dict[str, Evaluation]) -> list[dict]:
    """Write each evaluated model's JSON file (base, prompted, tuned) and samples.jsonl; the answers of
    the models not evaluated now come from the samples already written, when they are for the same prompts."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    existing = read_jsonl(eval_dir / EVAL_SAMPLES_FILE)
    same_prompts = [row.get("prompt") for row in existing] == held_out.questions
    answers: dict[str, list[dict] | None] = {}
    for side in SIDES:
        if side in evaluations:
            answers[side] = evaluations[side].answers
            write_json(eval_dir / SIDE_FILES[side], evaluations[side].record.to_json())
        elif same_prompts and existing and all(row.get(f"{side}_output") is not None for row in existing):
            answers[side] = [
                {
                    "output": row.get(f"{side}_output"),
                    "follows_format": row.get(f"{side}_follows_format"),
                    "scores": row.get(f"{side}_scores"),
                }
                for row in existing
            ]
    rows = samples_rows(held_out, answers)
    write_jsonl(eval_dir / EVAL_SAMPLES_FILE, rows)
    return rows


def write_verdict(eval_dir: Path, cfg: SftlabConfig, samples: list[dict], findings: list = ()) -> Verdict | None:
    """eval/verdict.json from the per-answer scores in samples.jsonl; None when the tuned model has none."""
    primary = cfg.eval.primary_metric
    values = {side: _per_prompt(samples, side, primary) for side in SIDES}
    if values["tuned"] is None:
        return None
    base, tuned = read_json_object(eval_dir / BEFORE_FILE), read_json_object(eval_dir / AFTER_FILE)
    setting = cfg.eval.prompted_baseline
    shots = f"{setting.shots}-shot prompted" if setting is not False and setting.shots else "prompted"
    verdict = decide(
        primary,
        values["tuned"],
        values["base"],
        values["prompted"],
        caveats(base, tuned, list(findings)),
        seed=cfg.training.get("seed", 42),
        shots=shots,
    )
    write_json(eval_dir / VERDICT_FILE, verdict.model_dump(mode="json"))
    return verdict


def decide_in_memory(cfg: SftlabConfig, samples: list[dict], summaries: dict[str, dict]) -> Verdict | None:
    """The verdict without writing it (`sftlab eval --model ... --baseline` without --output)."""
    values = {side: _per_prompt(samples, side, cfg.eval.primary_metric) for side in SIDES}
    if values["tuned"] is None:
        return None
    return decide(
        cfg.eval.primary_metric,
        values["tuned"],
        values["base"],
        values["prompted"],
        caveats(summaries.get("base"), summaries.get("tuned"), []),
        seed=cfg.training.get("seed", 42),
    )


def _per_prompt(samples: list[dict], side: str, metric: str) -> list[float] | None:
    """The metric's value for each prompt, or None when that model has no complete set of them."""
    values = [(row.get(f"{side}_scores") or {}).get(metric) for row in samples]
    if not values or any(value is None for value in values):
        return None
    return [float(value) for value in values]
