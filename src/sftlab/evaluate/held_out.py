"""What is evaluated: the held-out prompts and references, the prompted set, the training responses, retention data.

Prepared once per run and shared by the base, the prompted base and the tuned model, so the
three differ only by weights and prompt.

Trade-offs:
- The held-out loss is computed on the rows of the same `num_prompts` examples, tokenized
  exactly as trained (the data stage's rows): bounded work, and the same number as the
  trainer's eval_loss when they cover the whole eval set.
- Shots are drawn once and shared by every prompt (the usual few-shot setup), the
  shortest-fitting first within max_length / (shots + 1) tokens each, so the prompted
  prompts stay within what the model was trained on; never eval rows.
- Memorization reads the trained spans of the prepared training rows (also from the
  cache), at most MEMORIZATION_MAX_RESPONSES.
- Retention defaults to a small general question-answer set shipped with sftlab
  (retention_data/general.jsonl, 56 pairs): a cheap signal of forgetting, not a
  benchmark; point `eval.retention` at your own reference data for a real one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.config import DataConfig, SftlabConfig
from sftlab.data import Example, PreparedData, preparation_settings, prepare_data, render_example
from sftlab.errors import BadRow, DataError
from sftlab.generation import generation_prompts
from sftlab.metrics import UserMetric, load_user_metrics
from sftlab.templates import render

RETENTION_DATA = Path(__file__).parent.parent / "retention_data" / "general.jsonl"
RETENTION_BUILTIN = "sftlab general set (retention_data/general.jsonl)"
MEMORIZATION_MAX_RESPONSES = 100_000  # a seeded sample beyond this keeps the check to seconds


@dataclass
class PromptedSet:
    """The held-out prompts with the few-shot examples in front: what the prompted base model answers."""

    prompts: list[str]
    rows: dict  # input_ids + assistant_masks: each example's last response after its prompted prompt
    shots: int
    system_prompt: str | None


@dataclass
class HeldOut:
    """Everything an evaluation reads, prepared once and shared by the base, prompted and tuned model."""

    prompts: list[str]  # rendered with the chat template, ready for generation
    chat: list[bool]  # False for raw prompt/completion examples (no template; the tokenizer adds BOS)
    questions: list[str]  # the prompt as people read it: the last message before the answer
    references: list[str]
    rows: Any  # datasets.Dataset: the held-out rows of these examples, input_ids + assistant_masks as trained
    max_length: int | None
    train_responses: list[str]
    retention_rows: Any | None
    retention_source: str | None
    prompted: PromptedSet | None = None  # None when eval.prompted_baseline is off or no shot fits
    user_metrics: list[UserMetric] = field(default_factory=list)


def held_out_set(cfg: SftlabConfig, tokenizer, data: PreparedData) -> HeldOut | None:
    """The held-out prompts, references and rows, training responses and retention data; None without eval data."""
    if data.eval is None or not data.eval_examples:
        return None
    user_metrics = load_user_metrics(cfg.eval.metrics)  # before anything slow: a broken metric fails now
    examples, row_counts = _first_examples(tokenizer, data.eval_examples, cfg.eval.num_prompts)
    rows = data.eval.select(range(min(sum(row_counts), len(data.eval))))
    retention_rows, retention_source = retention_data(cfg, tokenizer)
    return HeldOut(
        prompts=generation_prompts(tokenizer, examples, len(examples)),
        chat=[example.messages is not None for example in examples],
        questions=[_question(example) for example in examples],
        references=[_reference(example) for example in examples],
        rows=rows,
        max_length=cfg.training.get("max_length"),
        train_responses=trained_responses(tokenizer, data.train, seed=cfg.training.get("seed", 42)),
        retention_rows=retention_rows,
        retention_source=retention_source,
        prompted=prompted_set(cfg, tokenizer, examples, rows, row_counts, data.train_sample),
        user_metrics=user_metrics,
    )


def _first_examples(tokenizer, examples: list, count: int) -> tuple[list, list[int]]:
    """The first `count` held-out examples, and how many tokenized held-out rows each makes.

    The rows follow the examples in order; an example can make several rows (templates
    that rewrite earlier turns) or none (rejected by the template, with data.on_error: skip).
    """
    kept, rows = [], []
    for example in examples:
        if len(kept) == count:
            break
        try:
            pieces = len(render_example(tokenizer, example))
        except BadRow:
            continue  # not among the tokenized rows either
        kept.append(example)
        rows.append(pieces)
    return kept, rows


def _reference(example) -> str:
    if example.messages is None:
        return example.completion
    return next(m for m in reversed(example.messages) if m["role"] == "assistant").get("content") or ""


def _question(example) -> str:
    if example.messages is None:
        return example.prompt
    last = max(i for i, message in enumerate(example.messages) if message["role"] == "assistant")
    before = [m for m in example.messages[:last] if m.get("content")]
    return before[-1]["content"] if before else ""


# =========================================================================== the prompted baseline


def prompted_set(
    cfg: SftlabConfig, tokenizer, examples: list[Example], rows, row_counts: list[int], train_sample: list[Example]
) -> PromptedSet | None:
    """Each held-out prompt with `shots` training examples before it (and the system prompt), and
    the rows for its loss; None when the prompted baseline is off or the template cannot render it."""
    setting = cfg.eval.prompted_baseline
    if setting is False or not examples:
        return None
    chat = examples[0].messages is not None
    shots = choose_shots(
        tokenizer,
        [e for e in train_sample if (e.messages is not None) == chat],
        setting.shots,
        cfg.training.get("max_length") or 1024,
        seed=cfg.training.get("seed", 42),
    )
    try:
        prompts = [_prompted_prompt(tokenizer, example, shots, setting.system_prompt) for example in examples]
    except BadRow:
        return None  # a template that refuses the earlier turns (or the system message): nothing to compare
    return PromptedSet(
        prompts=prompts,
        rows=_prompted_rows(tokenizer, prompts, rows, row_counts, chat),
        shots=len(shots),
        system_prompt=setting.system_prompt,
    )


def choose_shots(tokenizer, candidates: list[Example], count: int, max_length: int, seed: int = 42) -> list[Example]:
    """`count` training examples for the few-shot prompt: seeded, each within max_length / (count + 1)
    tokens when possible so that the prompt and the answer still fit; else the shortest."""
    if count == 0 or not candidates:
        return []
    order = random.Random(seed).sample(candidates, len(candidates))
    lengths = [
        len(tokenizer(_shot_text(tokenizer, example), add_special_tokens=False)["input_ids"]) for example in order
    ]
    budget = max_length // (count + 1)
    fitting = [example for example, length in zip(order, lengths) if length <= budget]
    if len(fitting) < count:
        shortest = [example for _, example in sorted(zip(lengths, order), key=lambda pair: pair[0])]
        fitting += [example for example in shortest if example not in fitting]
    return fitting[:count]


def _shot_text(tokenizer, example: Example) -> str:
    if example.messages is None:
        return example.prompt + example.completion
    try:
        return render(tokenizer, _shot_turns(example))
    except BadRow:
        return "\n".join(str(m.get("content") or "") for m in example.messages)


def _shot_turns(example: Example) -> list[dict]:
    """A training conversation as earlier turns: without its system message, ending with its last answer."""
    last = max(i for i, message in enumerate(example.messages) if message["role"] == "assistant")
    return [message for message in example.messages[: last + 1] if message["role"] != "system"]


def _prompted_prompt(tokenizer, example: Example, shots: list[Example], system_prompt: str | None) -> str:
    if example.messages is None:
        prefix = "".join(f"{shot.prompt}{shot.completion}\n\n" for shot in shots)
        return (f"{system_prompt}\n\n" if system_prompt else "") + prefix + example.prompt
    last = max(i for i, message in enumerate(example.messages) if message["role"] == "assistant")
    history = example.messages[:last]
    own_system = [m for m in history[:1] if m["role"] == "system"]
    system = "\n\n".join(text for text in [system_prompt, *(m.get("content") or "" for m in own_system)] if text)
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += _shot_turns(shot)
    messages += history[len(own_system) :]
    return render(tokenizer, messages, add_generation_prompt=True, tools=example.tools)


def _prompted_rows(tokenizer, prompts: list[str], rows, row_counts: list[int], chat: bool) -> dict:
    """The trained tokens of each example's last response, after its prompted prompt instead of its own."""
    ids_out, masks_out = [], []
    end = 0
    for prompt, count in zip(prompts, row_counts):
        end += count
        ids, mask = list(rows[end - 1]["input_ids"]), list(rows[end - 1]["assistant_masks"])
        start = _last_trained_span_start(mask)
        prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        ids_out.append(prompt_ids + ids[start:])
        masks_out.append([0] * len(prompt_ids) + mask[start:])
    return {"input_ids": ids_out, "assistant_masks": masks_out}


def _last_trained_span_start(mask: list[int]) -> int:
    end = max((i for i, bit in enumerate(mask) if bit), default=len(mask) - 1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


# =========================================================================== memorization and retention


def trained_responses(tokenizer, rows, seed: int = 42) -> list[str]:
    """The text of the trained spans (the responses) of the prepared training rows.

    Bounded for large data: at most MEMORIZATION_MAX_RESPONSES rows (a seeded sample, in
    order), read and decoded a batch at a time, and at most that many spans kept."""
    if len(rows) > MEMORIZATION_MAX_RESPONSES:
        rows = rows.select(sorted(random.Random(seed).sample(range(len(rows)), MEMORIZATION_MAX_RESPONSES)))
    texts = []
    for batch in rows.select_columns(["input_ids", "assistant_masks"]).iter(batch_size=1000):
        spans = []
        for ids, mask in zip(batch["input_ids"], batch["assistant_masks"]):
            start = None
            for position, bit in enumerate([*mask, 0]):
                if bit and start is None:
                    start = position
                elif not bit and start is not None:
                    spans.append(ids[start:position])
                    start = None
        texts += [text.strip() for text in tokenizer.batch_decode(spans, skip_special_tokens=True) if text.strip()]
    if len(texts) > MEMORIZATION_MAX_RESPONSES:
        texts = random.Random(seed).sample(texts, MEMORIZATION_MAX_RESPONSES)
    return list(dict.fromkeys(texts))


def retention_data(cfg: SftlabConfig, tokenizer):
    """The general reference rows (`eval.retention`), tokenized as the training data is; (None, None) when off."""
    setting = cfg.eval.retention
    if setting is False:
        return None, None
    path, source = (RETENTION_DATA, RETENTION_BUILTIN) if setting is None else (Path(setting).expanduser(), setting)
    try:
        settings = preparation_settings(cfg.training)
        prepared = prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer, **settings)
    except DataError as error:
        hint = error.hint or "eval.retention takes a data file like data.train, null (the shipped set) or false"
        raise DataError(f"eval.retention: {error.message}", hint=hint) from None
    return prepared.train, source
