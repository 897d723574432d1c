"""One model on the held-out set: every number of eval/before.json, prompted.json or after.json, as an EvalSummary.

The model answers the held-out prompts (generation.py), each answer is scored (format, chat
adherence, agreement with the reference, the user's metrics), and the held-out loss,
diversity, memorization and retention are measured. The summary is the typed EvalSummary
(contracts.py) that is written to the file; the per-answer scores go to samples.jsonl,
where the verdict resamples them.

Chat adherence: the answer ended with the end-of-turn token within max_new_tokens, is not
empty, and leaks no template: no special token, no role header of the chat template
(templates.template_markers), no line that is a role name ("assistant") or opens another
turn ("User:").

Trade-off: greedy decoding by default, deterministic, so the models differ only by weights
and prompt; `eval.do_sample` samples instead, seeded with training.seed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sftlab.config import EvalConfig
from sftlab.contracts import EvalSummary
from sftlab.evaluate.held_out import HeldOut
from sftlab.evaluate.loss import trained_token_loss
from sftlab.generation import follows_format, generate_answers
from sftlab.metrics import (
    distinct_n,
    duplicate_share,
    exact_matches,
    mean,
    memorization,
    rouge_l_scores,
    share,
    user_metric_scores,
)
from sftlab.templates import template_markers

ROLE_LINE = re.compile(r"^\s*(?:system|user|assistant|human)\s*:?\s*$", re.IGNORECASE | re.MULTILINE)
TURN_OPENING = re.compile(r"^\s*(?:User|USER|Human|HUMAN|Assistant|ASSISTANT)\s*:", re.MULTILINE)


@dataclass
class Evaluation:
    record: EvalSummary  # before.json / prompted.json / after.json
    answers: list[dict]  # per held-out prompt, in order: output, follows_format, scores (the per-answer metrics)

    @property
    def summary(self) -> dict:
        """The summary as its file holds it."""
        return self.record.to_json()


def evaluate_model(
    model,
    tokenizer,
    cfg: EvalConfig,
    held_out: HeldOut,
    label: str,
    model_name: str,
    step: int | None,
    seed: int = 42,
    prompted: bool = False,
    retention: dict | None = None,
) -> Evaluation:
    """Every number of before.json / prompted.json / after.json for one model.

    `prompted` answers the few-shot prompts (held_out.prompted) instead of the plain ones;
    `retention` reuses a retention result already measured for the same weights.
    """
    start = time.perf_counter()
    prompts = held_out.prompted.prompts if prompted else held_out.prompts
    answers = generate_answers(model, tokenizer, prompts, held_out.chat, cfg, seed)
    outputs = [answer["output"] for answer in answers]
    scores = answer_scores(tokenizer, answers, held_out, cfg)
    if retention is None:
        retention = {"loss": None, "perplexity": None, "tokens": None, "source": None}
        if held_out.retention_rows is not None:
            retention = {
                **trained_token_loss(model, held_out.retention_rows, held_out.max_length),
                "source": held_out.retention_source,
            }
    rows = held_out.prompted.rows if prompted else held_out.rows
    summary = {
        "model": model_name,
        "label": label,
        "step": step,
        "num_prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "prompting": {"shots": held_out.prompted.shots, "system_prompt": held_out.prompted.system_prompt}
        if prompted
        else None,
        # Prompted rows are longer than anything trained: cut them and the answer would be cut first.
        "loss": trained_token_loss(model, rows, None if prompted else held_out.max_length),
        "adherence": {
            "chat": share([s["chat"] for s in scores]),
            "format": share([s["format"] for s in scores]) if cfg.format is not None else None,
            "format_spec": cfg.format.model_dump(mode="json", exclude_none=True) if cfg.format is not None else None,
        },
        "reference": {
            "exact_match": share([s["exact_match"] for s in scores]),
            "rougeL": mean([s["rougeL"] for s in scores]),
        },
        "metrics": {metric.name: mean([s[metric.name] for s in scores]) for metric in held_out.user_metrics},
        "diversity": {
            "distinct_1": distinct_n(outputs, 1),
            "distinct_2": distinct_n(outputs, 2),
            "duplicate_share": duplicate_share(outputs),
        },
        "memorization": memorization(outputs, held_out.train_responses),
        "retention": retention,
    }
    record = EvalSummary.parse({**summary, "seconds": round(time.perf_counter() - start, 2)})
    return Evaluation(
        record,
        [
            {"output": output, "follows_format": score["format"], "scores": score}
            for output, score in zip(outputs, scores)
        ],
    )


def answer_scores(tokenizer, answers: list[dict], held_out: HeldOut, cfg: EvalConfig) -> list[dict]:
    """Per answer, every metric a verdict can rest on: format, chat, exact_match, rougeL and the user's metrics."""
    outputs = [answer["output"] for answer in answers]
    markers = template_markers(tokenizer)
    raw = [tokenizer.decode(answer["token_ids"], skip_special_tokens=False) for answer in answers]
    columns = {
        "format": [follows_format(output, cfg.format) if cfg.format is not None else None for output in outputs],
        "chat": [
            ends_turn_cleanly(answer["output"], answer["stopped"], text, markers) for answer, text in zip(answers, raw)
        ],
        "exact_match": exact_matches(outputs, held_out.references),
        "rougeL": rouge_l_scores(outputs, held_out.references),
    }
    for metric in held_out.user_metrics:
        columns[metric.name] = user_metric_scores(metric, outputs, held_out.references, held_out.questions)
    return [{name: values[i] for name, values in columns.items()} for i in range(len(outputs))]


# =========================================================================== chat adherence


def leaks_template(raw_text: str, markers: list[str]) -> bool:
    """Whether an answer (decoded with its special tokens) shows template tokens or role markers."""
    return (
        any(marker in raw_text for marker in markers)
        or ROLE_LINE.search(raw_text) is not None
        or TURN_OPENING.search(raw_text) is not None
    )


def ends_turn_cleanly(output: str, stopped: bool, raw_text: str, markers: list[str]) -> bool:
    """Chat adherence of one answer: ended with the end-of-turn token, not empty, no template leaked."""
    return stopped and bool(output.strip()) and not leaks_template(raw_text, markers)
