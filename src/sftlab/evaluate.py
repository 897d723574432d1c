"""Evaluate: the base model, the base model prompted, and the tuned one, on the same held-out prompts.

The chapter opens by asking whether a prompted model would do, and closes by asking for
held-out evaluation, template adherence, domain knowledge retention and a qualitative
review of outputs, warning that a good loss can hide bad behaviour. Each question gets
a number, for three models, and the verdict (verdict.py) answers the first one:

    RUN_DIR/eval/before.json    the base model (when eval.baseline, the default)
    RUN_DIR/eval/prompted.json  the base model with `shots` training examples before each prompt
                                (eval.prompted_baseline, on by default)
    RUN_DIR/eval/after.json     the tuned model (final/)
    RUN_DIR/eval/samples.jsonl  per held-out prompt: {"prompt", "reference", and for each of base, prompted,
                                tuned: "<side>_output", "<side>_follows_format", "<side>_scores"} (null when
                                that model was not evaluated); the scores are the per-answer metrics the
                                verdict resamples
    RUN_DIR/eval/verdict.json   did it work? (verdict.py)

before.json, prompted.json and after.json share one schema (report.py reads them; a
metric that cannot be computed is null, never missing; shares are in [0, 1];
perplexity = exp(loss)):

    {"model": name or path, "label": "before" | "prompted" | "after", "step": int | null,
     "num_prompts": int, "max_new_tokens": int, "seconds": float,
     "prompting":    {"shots", "system_prompt"} | null   how the prompted base model was prompted
     "loss":         {"loss", "perplexity", "tokens"}     held-out loss on the trained tokens
     "adherence":    {"chat", "format", "format_spec"}     answers that end their turn cleanly; that follow eval.format
     "reference":    {"exact_match", "rougeL"}             agreement with the reference responses
     "metrics":      {NAME: mean}                          the user's own metrics (eval.metrics)
     "diversity":    {"distinct_1", "distinct_2", "duplicate_share"}
     "memorization": {"verbatim_share", "mean_longest_common_ngram"}   against the training responses
     "retention":    {"loss", "perplexity", "tokens", "source"}}       loss on general text (eval.retention)

- chat adherence: the answer ended with the end-of-turn token within max_new_tokens, is
  not empty, and leaks no template: no special token, no role header of the chat
  template, no line that is a role name ("assistant") or opens another turn ("User:").
- the prompted base model: the same weights as the base model, with `shots` training
  examples (a seeded sample, never eval rows) as earlier turns of each conversation, and
  eval.prompted_baseline.system_prompt as its system message. Its held-out loss is the
  loss of each example's last response with the shots in context (for single-turn data,
  the tokens before.json counts); its retention is the base model's (same weights).

Trade-offs:
- Greedy decoding by default: deterministic, so the models differ only by weights and
  prompt. `eval.do_sample` samples instead, seeded with training.seed.
- Generation is batched (`eval.generation_batch_size` prompts, sorted by length so
  little is padding), left-padded, with the KV cache; a batch ends as soon as every
  answer in it has. `eval.num_prompts` and `eval.max_new_tokens` bound the work:
  bench/eval_generation.py measures 100 prompts x 64 tokens with SmolLM2-135M on CPU,
  and what the prompted baseline adds.
- Shots are drawn once and shared by every prompt (the usual few-shot setup), the
  shortest-fitting first within max_length / (shots + 1) tokens each, so the prompted
  prompts stay within what the model was trained on.
- The held-out loss is computed on the rows of the same `num_prompts` examples,
  tokenized exactly as trained (token-weighted, trained tokens only): bounded work, and
  the same number as the trainer's eval_loss when they cover the whole eval set (and
  training ran without autocast). It is a forward pass over every prompt and response
  token, about as costly on a CPU as the generation itself.
- Both models are measured in the model's own dtype: the tuned model in memory loses the
  bf16 autocast wrapper training may have given it, so before and after compare.
- Memorization reads the trained spans of the prepared training rows (also from the
  cache), at most MEMORIZATION_MAX_RESPONSES.
- Retention defaults to a small general question-answer set shipped with sftlab
  (retention_data/general.jsonl, 56 pairs): a cheap signal of forgetting, not a
  benchmark; point `eval.retention` at your own reference data for a real one.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.config import CONFIG_FILE, DataConfig, EvalConfig, ModelConfig, SftlabConfig, load_config
from sftlab.data import BadRow, Example, PreparedData, preparation_settings, prepare_data, render, render_example
from sftlab.diagnose import diagnose, read_history
from sftlab.errors import DataError, ModelError, UserError
from sftlab.metrics import (
    UserMetric, distinct_n, duplicate_share, exact_matches, format_value, load_user_metrics, mean, memorization,
    metric_rows, primary_location, rouge_l_scores, share, user_metric_scores,
)
from sftlab.model import FINAL_DIR, add_default_chat_template, load_model, load_tokenizer
from sftlab.terminal import literal
from sftlab.monitor import follows_format, generate, generation_prompts, read_jsonl, stop_token_ids, write_atomically
from sftlab.verdict import Verdict, caveats, decide

EVAL_DIR = "eval"
BEFORE_FILE = "before.json"
PROMPTED_FILE = "prompted.json"
AFTER_FILE = "after.json"
SAMPLES_FILE = "samples.jsonl"
VERDICT_FILE = "verdict.json"
SIDES = ("base", "prompted", "tuned")  # the models of samples.jsonl, with their files:
SIDE_FILES = {"base": BEFORE_FILE, "prompted": PROMPTED_FILE, "tuned": AFTER_FILE}
RETENTION_DATA = Path(__file__).parent / "retention_data" / "general.jsonl"
RETENTION_BUILTIN = "sftlab general set (retention_data/general.jsonl)"
LOSS_BATCH_TOKENS = 4096  # tokens per forward pass for the losses: bounds the full-vocabulary logits in memory
MEMORIZATION_MAX_RESPONSES = 100_000  # a seeded sample beyond this keeps the check to seconds
ROLE_NAMES = ("system", "user", "assistant", "human")
ROLE_LINE = re.compile(r"^\s*(?:system|user|assistant|human)\s*:?\s*$", re.IGNORECASE | re.MULTILINE)
TURN_OPENING = re.compile(r"^\s*(?:User|USER|Human|HUMAN|Assistant|ASSISTANT)\s*:", re.MULTILINE)


# =========================================================================== what is evaluated


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


# =========================================================================== the prompted baseline


def prompted_set(cfg: SftlabConfig, tokenizer, examples: list[Example], rows, row_counts: list[int],
                 train_sample: list[Example]) -> PromptedSet | None:
    """Each held-out prompt with `shots` training examples before it (and the system prompt), and
    the rows for its loss; None when the prompted baseline is off or the template cannot render it."""
    setting = cfg.eval.prompted_baseline
    if setting is False or not examples:
        return None
    chat = examples[0].messages is not None
    shots = choose_shots(tokenizer, [e for e in train_sample if (e.messages is not None) == chat], setting.shots,
                         cfg.training.get("max_length") or 1024, seed=cfg.training.get("seed", 42))
    try:
        prompts = [_prompted_prompt(tokenizer, example, shots, setting.system_prompt) for example in examples]
    except BadRow:
        return None  # a template that refuses the earlier turns (or the system message): nothing to compare
    return PromptedSet(prompts=prompts, rows=_prompted_rows(tokenizer, prompts, rows, row_counts, chat),
                       shots=len(shots), system_prompt=setting.system_prompt)


def choose_shots(tokenizer, candidates: list[Example], count: int, max_length: int, seed: int = 42) -> list[Example]:
    """`count` training examples for the few-shot prompt: seeded, each within max_length / (count + 1)
    tokens when possible so that the prompt and the answer still fit; else the shortest."""
    if count == 0 or not candidates:
        return []
    order = random.Random(seed).sample(candidates, len(candidates))
    lengths = [len(tokenizer(_shot_text(tokenizer, example), add_special_tokens=False)["input_ids"]) for example in order]
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
    messages += history[len(own_system):]
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
        prepared = prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer, **preparation_settings(cfg.training))
    except DataError as error:
        raise DataError(f"eval.retention: {error.message}",
                        hint=error.hint or "eval.retention takes a data file like data.train, null (the shipped set) or false") from None
    return prepared.train, source


# =========================================================================== one model


@dataclass
class EvalResult:
    """What `sftlab eval` reports: the tuned model's summary (after.json) and the verdict, when there is one."""

    summary: dict
    verdict: Verdict | None


@dataclass
class Evaluation:
    summary: dict  # before.json / prompted.json / after.json
    answers: list[dict]  # per held-out prompt, in order: output, follows_format, scores (the per-answer metrics)


def evaluate_model(model, tokenizer, cfg: EvalConfig, held_out: HeldOut, label: str, model_name: str,
                   step: int | None, seed: int = 42, prompted: bool = False, retention: dict | None = None) -> Evaluation:
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
            retention = {**trained_token_loss(model, held_out.retention_rows, held_out.max_length),
                         "source": held_out.retention_source}
    rows = held_out.prompted.rows if prompted else held_out.rows
    summary = {
        "model": model_name,
        "label": label,
        "step": step,
        "num_prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "seconds": None,
        "prompting": {"shots": held_out.prompted.shots, "system_prompt": held_out.prompted.system_prompt}
        if prompted else None,
        # Prompted rows are longer than anything trained: cut them and the answer would be cut first.
        "loss": trained_token_loss(model, rows, None if prompted else held_out.max_length),
        "adherence": {
            "chat": share([s["chat"] for s in scores]),
            "format": share([s["format"] for s in scores]) if cfg.format is not None else None,
            "format_spec": cfg.format.model_dump(mode="json", exclude_none=True) if cfg.format is not None else None,
        },
        "reference": {"exact_match": share([s["exact_match"] for s in scores]),
                      "rougeL": mean([s["rougeL"] for s in scores])},
        "metrics": {metric.name: mean([s[metric.name] for s in scores]) for metric in held_out.user_metrics},
        "diversity": {"distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2),
                      "duplicate_share": duplicate_share(outputs)},
        "memorization": memorization(outputs, held_out.train_responses),
        "retention": retention,
    }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return Evaluation(summary, [{"output": output, "follows_format": score["format"], "scores": score}
                                for output, score in zip(outputs, scores)])


def answer_scores(tokenizer, answers: list[dict], held_out: HeldOut, cfg: EvalConfig) -> list[dict]:
    """Per answer, every metric a verdict can rest on: format, chat, exact_match, rougeL and the user's metrics."""
    outputs = [answer["output"] for answer in answers]
    markers = template_markers(tokenizer)
    raw = [tokenizer.decode(answer["token_ids"], skip_special_tokens=False) for answer in answers]
    columns = {
        "format": [follows_format(output, cfg.format) if cfg.format is not None else None for output in outputs],
        "chat": [ends_turn_cleanly(answer["output"], answer["stopped"], text, markers)
                 for answer, text in zip(answers, raw)],
        "exact_match": exact_matches(outputs, held_out.references),
        "rougeL": rouge_l_scores(outputs, held_out.references),
    }
    for metric in held_out.user_metrics:
        columns[metric.name] = user_metric_scores(metric, outputs, held_out.references, held_out.questions)
    return [{name: values[i] for name, values in columns.items()} for i in range(len(outputs))]


def generate_answers(model, tokenizer, prompts: list[str], chat: list[bool], cfg: EvalConfig,
                     seed: int = 42) -> list[dict]:
    """monitor.generate over every prompt: batches of similar lengths, answers back in prompt order."""
    import torch

    stop_ids = stop_token_ids(tokenizer)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (chat[i], lengths[i]))
    batches = []
    for is_chat in (False, True):  # raw prompts get the tokenizer's BOS, chat prompts carry their own markers
        group = [i for i in order if chat[i] == is_chat]
        batches += [(is_chat, group[start: start + cfg.generation_batch_size])
                    for start in range(0, len(group), cfg.generation_batch_size)]
    answers: list[dict | None] = [None] * len(prompts)
    with torch.random.fork_rng():  # sampling must not move the training's random state
        torch.manual_seed(seed)
        for is_chat, batch in batches:
            results = generate(model, tokenizer, [prompts[i] for i in batch], cfg.max_new_tokens, stop_ids,
                               chat=is_chat, do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p)
            for i, result in zip(batch, results):
                answers[i] = result
    return answers


def trained_token_loss(model, rows, max_length: int | None = None) -> dict:
    """Token-weighted mean loss over the trained tokens (assistant_masks) of tokenized rows, and its perplexity.

    Rows are cut to max_length as the trainer cuts them, and run in length-sorted batches
    of at most LOSS_BATCH_TOKENS tokens.
    """
    import torch

    ids = [list(row)[:max_length] if max_length else list(row) for row in rows["input_ids"]]
    masks = [list(row)[:max_length] if max_length else list(row) for row in rows["assistant_masks"]]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in _token_batches(order, [len(row) for row in ids]):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            trained = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):
                length = len(ids[i])
                input_ids[row, :length] = torch.tensor(ids[i])
                attention[row, :length] = 1
                trained[row, :length] = torch.tensor(masks[i], dtype=torch.bool)
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            # Token t is predicted from the positions before it: it counts when it was trained.
            targets = trained[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device),
                                                       reduction="none")
            total += losses[targets].sum().item()
            count += int(targets.sum().item())
    finally:
        model.train(was_training)
    loss = total / count if count else None
    if loss is not None and not math.isfinite(loss):
        loss = None  # JSON has no NaN; a non-finite loss is a loss that could not be measured
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": count}


def _token_batches(order: list[int], lengths: list[int]):
    batch: list[int] = []
    for i in order:  # ascending lengths: the newest row is the longest in its batch
        if batch and (len(batch) + 1) * lengths[i] > LOSS_BATCH_TOKENS:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


# =========================================================================== chat adherence


def template_markers(tokenizer) -> list[str]:
    """Text that must never appear in an answer: the tokenizer's special tokens, and the
    parts of the chat template's turn headers that are neither special tokens nor a bare role name."""
    specials = {token for token in tokenizer.all_special_tokens if token and token.strip()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {token.content for token in added.values() if getattr(token, "special", False) and token.content.strip()}
    sentinels = [f"\uE000sftlab-{index}\uE001" for index in range(4)]
    conversation = [{"role": role, "content": sentinel}
                    for role, sentinel in zip(("user", "assistant", "user", "assistant"), sentinels)]
    pieces = set()
    try:
        text = render(tokenizer, conversation) if tokenizer.chat_template else ""
    except BadRow:
        text = ""
    splitter = re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) or r"(?!)")
    for first, second in zip(sentinels, sentinels[1:]):
        if first in text and second in text:
            between = text[text.index(first) + len(first): text.index(second)]
            for piece in splitter.split(between):
                piece = piece.strip()
                if len(piece) >= 2 and piece.lower().rstrip(":") not in ROLE_NAMES:
                    pieces.add(piece)
    return sorted(specials) + sorted(pieces)


def leaks_template(raw_text: str, markers: list[str]) -> bool:
    """Whether an answer (decoded with its special tokens) shows template tokens or role markers."""
    return (any(marker in raw_text for marker in markers) or ROLE_LINE.search(raw_text) is not None
            or TURN_OPENING.search(raw_text) is not None)


def ends_turn_cleanly(output: str, stopped: bool, raw_text: str, markers: list[str]) -> bool:
    """Chat adherence of one answer: ended with the end-of-turn token, not empty, no template leaked."""
    return stopped and bool(output.strip()) and not leaks_template(raw_text, markers)


# =========================================================================== runs


def evaluate_before_training(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None,
                             console=None) -> dict | None:
    """The base model, before the first step: eval/before.json, then the prompted base model
    (eval/prompted.json), and their halves of eval/samples.jsonl.

    Skipped without eval data, each with its setting off, and on resume when its file exists.
    """
    console = console or _console()
    if held_out is None:
        _say(console, "no eval data: the models will not be evaluated (set data.eval or data.eval_split)")
        return None
    eval_dir = Path(run_dir) / EVAL_DIR
    wanted = [side for side, on in (("base", cfg.eval.baseline), ("prompted", held_out.prompted is not None))
              if on and not (eval_dir / SIDE_FILES[side]).exists()]
    if not wanted:
        return None
    if weights_partitioned():
        _say(console, "DeepSpeed ZeRO-3 spreads each weight over the processes: evaluate the run once it has "
             "finished, with `sftlab eval RUN_DIR`")
        return None
    summary = None
    for side in wanted:
        summary = _evaluate_base(run_dir, model, tokenizer, cfg, held_out, console, prompted=side == "prompted")
    return summary


def _evaluate_base(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut, console,
                   prompted: bool = False) -> dict:
    eval_dir = Path(run_dir) / EVAL_DIR
    what = f"the base model prompted with {held_out.prompted.shots} examples" if prompted else "the base model"
    _say(console, f"evaluating {what} on {len(held_out.prompts)} held-out prompts...")
    retention = (_read_json(eval_dir / BEFORE_FILE) or {}).get("retention") if prompted else None
    evaluation = evaluate_model(model, tokenizer, cfg.eval, held_out, "prompted" if prompted else "before",
                                cfg.model.name_or_path, step=0, seed=cfg.training.get("seed", 42), prompted=prompted,
                                retention=retention if isinstance(retention, dict) else None)
    write_evaluation(eval_dir, held_out, {"prompted" if prompted else "base": evaluation})
    _say(console, f"{what} evaluated in {evaluation.summary['seconds']:.1f} s: "
         f"{eval_dir / (PROMPTED_FILE if prompted else BEFORE_FILE)}")
    return evaluation.summary


def evaluate_after_training(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None,
                            step: int | None, console=None) -> EvalResult | None:
    """The tuned model: eval/after.json, eval/samples.jsonl, eval/verdict.json, and the verdict and the
    table printed.

    `model` is the trained model in memory; None loads final/ (after an early stop, or
    when the weights are spread over several processes).
    """
    console = console or _console()
    final_dir = Path(run_dir) / FINAL_DIR
    if held_out is None:
        return None
    if not has_model(final_dir):
        _say(console, f"no final model in {final_dir}: the tuned model is not evaluated")
        return None
    if weights_partitioned():
        return None
    if model is None:
        model = load_final_model(final_dir, cfg.model, tokenizer)
    else:
        from accelerate.utils import extract_model_from_parallel

        # Training may have wrapped forward in bf16 autocast: measure in the model's own dtype, as the base was.
        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    _say(console, f"evaluating the tuned model on {len(held_out.prompts)} held-out prompts...")
    after = evaluate_model(model, tokenizer, cfg.eval, held_out, "after", str(final_dir), step=step,
                           seed=cfg.training.get("seed", 42))
    eval_dir = Path(run_dir) / EVAL_DIR
    samples = write_evaluation(eval_dir, held_out, {"tuned": after})
    records, training_samples = read_history(Path(run_dir))
    findings = diagnose(records, training_samples, memorization_loss=cfg.monitor.memorization_loss).findings
    verdict = write_verdict(eval_dir, cfg, samples, findings)
    summaries = {side: _read_json(eval_dir / SIDE_FILES[side]) for side in ("base", "prompted")}
    print_comparison({**summaries, "tuned": after.summary}, samples, verdict, console, cfg.eval.show_samples)
    return EvalResult(after.summary, verdict)


def write_verdict(eval_dir: Path, cfg: SftlabConfig, samples: list[dict], findings: list = ()) -> Verdict | None:
    """eval/verdict.json from the per-answer scores in samples.jsonl; None when the tuned model has none."""
    primary = cfg.eval.primary_metric
    values = {side: _per_prompt(samples, side, primary) for side in SIDES}
    if values["tuned"] is None:
        return None
    base, tuned = _read_json(eval_dir / BEFORE_FILE), _read_json(eval_dir / AFTER_FILE)
    setting = cfg.eval.prompted_baseline
    shots = f"{setting.shots}-shot prompted" if setting is not False and setting.shots else "prompted"
    verdict = decide(primary, values["tuned"], values["base"], values["prompted"], caveats(base, tuned, list(findings)),
                     seed=cfg.training.get("seed", 42), shots=shots)
    _write_json(eval_dir / VERDICT_FILE, verdict.model_dump(mode="json"))
    return verdict


def _per_prompt(samples: list[dict], side: str, metric: str) -> list[float] | None:
    """The metric's value for each prompt, or None when that model has no complete set of them."""
    values = [(row.get(f"{side}_scores") or {}).get(metric) for row in samples]
    if not values or any(value is None for value in values):
        return None
    return [float(value) for value in values]


def open_finished_run(run_dir: Path, overrides: list[str] = ()):
    """A finished run's resolved config, its final/ directory, and the tokenizer it trained with
    (chat template included, saved with the final model). UserError when the run has no final/."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}", hint="pass the training.output_dir of a run")
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} is not an sftlab run directory: it has no {CONFIG_FILE}",
                        hint="pass a directory written by `sftlab train` or `sftlab demo`")
    final_dir = run_dir / FINAL_DIR
    if not has_model(final_dir):
        raise UserError(f"no final model in {final_dir}: the run has not finished",
                        hint="continue it with `sftlab train CONFIG --resume`, or evaluate a checkpoint with "
                        f"`sftlab eval --model {run_dir}/checkpoint-N --config {run_dir / CONFIG_FILE}`")
    cfg = load_config(run_dir / CONFIG_FILE, list(overrides))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(final_dir), trust_remote_code=cfg.model.trust_remote_code))
    add_default_chat_template(tokenizer)
    return cfg, final_dir, tokenizer


def evaluate_run(run_dir: Path, baseline: bool | None = None, overrides: list[str] = (),
                 console=None) -> EvalResult | None:
    """`sftlab eval RUN_DIR`: evaluate final/ again (after.json), the base model when before.json is missing,
    the prompted base model when prompted.json is, and the verdict."""
    run_dir = Path(run_dir)
    cfg, final_dir, tokenizer = open_finished_run(run_dir, overrides)
    console = console or _console()
    held_out = _require_held_out(cfg, tokenizer, run_dir / CONFIG_FILE)
    eval_dir = run_dir / EVAL_DIR
    wanted = [side for side, on in (("base", baseline if baseline is not None else cfg.eval.baseline),
                                    ("prompted", baseline is not False and held_out.prompted is not None))
              if on and not (eval_dir / SIDE_FILES[side]).exists()]
    if wanted:
        base_model = load_model(cfg.model, tokenizer)
        for side in wanted:
            _evaluate_base(run_dir, base_model, tokenizer, cfg, held_out, console, prompted=side == "prompted")
        del base_model
    previous = _read_json(eval_dir / AFTER_FILE) or {}
    step = previous.get("step") if previous.get("model") == str(final_dir) else None
    return evaluate_after_training(run_dir, None, tokenizer, cfg, held_out, step, console)


def evaluate_model_path(model_path: str | None, config_path: Path, baseline: bool = False, output: Path | None = None,
                        overrides: list[str] = (), console=None) -> EvalResult:
    """`sftlab eval --model PATH_OR_ID --config CONFIG`: any model (or a LoRA adapter, on the config's model)
    on the config's eval data; without `model_path`, the config's own model. With `baseline`, the
    config's model is evaluated too, side by side, plain and prompted, and the verdict given."""
    cfg = load_config(config_path, list(overrides))
    console = console or _console()
    if output is not None:
        names = (*SIDE_FILES.values(), SAMPLES_FILE, VERDICT_FILE)
        taken = [Path(output) / name for name in names if (Path(output) / name).exists()]
        if taken:
            raise UserError(f"{taken[0]} already exists", hint="choose another --output directory; nothing is overwritten")
    model_path = model_path or cfg.model.name_or_path
    path = Path(model_path).expanduser()
    adapter = (path / "adapter_config.json").is_file()
    if adapter:  # a LoRA adapter goes on the config's model; its tokenizer is saved next to it, when it is
        model_cfg = cfg.model
        tokenizer_cfg = ModelConfig(name_or_path=str(path)) if (path / "tokenizer_config.json").is_file() else cfg.model
    elif model_path == cfg.model.name_or_path:
        model_cfg = tokenizer_cfg = cfg.model
    else:
        model_cfg = tokenizer_cfg = cfg.model.model_copy(update={"name_or_path": model_path, "gguf_file": None, "revision": None})
    tokenizer = load_tokenizer(tokenizer_cfg)
    add_default_chat_template(tokenizer)
    held_out = _require_held_out(cfg, tokenizer, config_path)
    seed = cfg.training.get("seed", 42)
    evaluations: dict[str, Evaluation] = {}
    if baseline:
        base_model = load_model(cfg.model, tokenizer)
        _say(console, f"evaluating {cfg.model.name_or_path} on {len(held_out.prompts)} held-out prompts...")
        evaluations["base"] = evaluate_model(base_model, tokenizer, cfg.eval, held_out, "before",
                                             cfg.model.name_or_path, step=0, seed=seed)
        if held_out.prompted is not None:
            _say(console, f"evaluating {cfg.model.name_or_path} prompted with {held_out.prompted.shots} examples...")
            evaluations["prompted"] = evaluate_model(base_model, tokenizer, cfg.eval, held_out, "prompted",
                                                     cfg.model.name_or_path, step=0, seed=seed, prompted=True,
                                                     retention=evaluations["base"].summary["retention"])
        del base_model
    model = load_final_model(path, cfg.model, tokenizer) if adapter else load_model(model_cfg, tokenizer)
    _say(console, f"evaluating {model_path} on {len(held_out.prompts)} held-out prompts...")
    evaluations["tuned"] = evaluate_model(model, tokenizer, cfg.eval, held_out, "after", model_path, step=None, seed=seed)
    samples = samples_rows(held_out, {side: evaluation.answers for side, evaluation in evaluations.items()})
    verdict = None
    if output is not None:
        write_evaluation(Path(output), held_out, evaluations)
        verdict = write_verdict(Path(output), cfg, samples) if baseline else None
    elif baseline:
        verdict = decide_in_memory(cfg, samples, {side: e.summary for side, e in evaluations.items()})
    summaries = {side: evaluation.summary for side, evaluation in evaluations.items()}
    print_comparison(summaries, samples, verdict, console, cfg.eval.show_samples)
    return EvalResult(evaluations["tuned"].summary, verdict)


def decide_in_memory(cfg: SftlabConfig, samples: list[dict], summaries: dict[str, dict]) -> Verdict | None:
    values = {side: _per_prompt(samples, side, cfg.eval.primary_metric) for side in SIDES}
    if values["tuned"] is None:
        return None
    return decide(cfg.eval.primary_metric, values["tuned"], values["base"], values["prompted"],
                  caveats(summaries.get("base"), summaries.get("tuned"), []), seed=cfg.training.get("seed", 42))


def _require_held_out(cfg: SftlabConfig, tokenizer, config_path: Path) -> HeldOut:
    data = prepare_data(cfg.data, tokenizer, **preparation_settings(cfg.training))  # as training prepares it
    held_out = held_out_set(cfg, tokenizer, data)
    if held_out is None:
        raise DataError(f"{config_path}: no eval data to evaluate on", hint="set data.eval, or data.eval_split above 0")
    return held_out


def weights_partitioned() -> bool:
    """Under DeepSpeed ZeRO-3 each process holds a slice of every weight: one process alone cannot generate."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def has_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file()


def load_final_model(directory: Path, base: ModelConfig, tokenizer):
    """A saved model, or a LoRA adapter loaded on its base model (the config's)."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(load_model(base, tokenizer), str(directory))
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelError(f"cannot load the LoRA adapter in {directory} on {base.name_or_path}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}",
                             hint="the adapter loads on the model it was trained from: check model.name_or_path") from None
    return load_model(base.model_copy(update={"name_or_path": str(directory), "gguf_file": None, "revision": None}), tokenizer)


# =========================================================================== files and the table


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
    existing = read_jsonl(eval_dir / SAMPLES_FILE)
    same_prompts = [row.get("prompt") for row in existing] == held_out.questions
    answers: dict[str, list[dict] | None] = {}
    for side in SIDES:
        if side in evaluations:
            answers[side] = evaluations[side].answers
            _write_json(eval_dir / SIDE_FILES[side], evaluations[side].summary)
        elif same_prompts and existing and all(row.get(f"{side}_output") is not None for row in existing):
            answers[side] = [{"output": row.get(f"{side}_output"), "follows_format": row.get(f"{side}_follows_format"),
                              "scores": row.get(f"{side}_scores")} for row in existing]
    rows = samples_rows(held_out, answers)
    write_atomically(eval_dir / SAMPLES_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


COLUMNS = (("base", "base"), ("prompted", "prompted base"), ("tuned", "tuned"))


def print_comparison(summaries: dict[str, dict | None], samples: list[dict], verdict: Verdict | None = None,
                     console=None, show: int = 3) -> None:
    """The verdict first, then the table of every metric for each model evaluated (base, prompted base,
    tuned) with the tuned model's differences, then `show` held-out prompts answered side by side."""
    from rich.table import Table

    console = console or _console()
    tuned = summaries["tuned"]
    if verdict is not None:
        console.print(literal(("verdict", "bold"), f": {verdict.headline}"), soft_wrap=True)
        for caveat in verdict.caveats:
            _say(console, f"  caveat: {caveat}")
    present = [(side, label) for side, label in COLUMNS if summaries.get(side)]
    others = [(side, label) for side, label in present if side != "tuned"]
    table = Table("metric", *(label for _, label in present), *(f"tuned - {label}" for _, label in others),
                  title=f"held-out evaluation: {tuned['num_prompts']} prompts, up to {tuned['max_new_tokens']} new tokens",
                  title_justify="left")
    primary = verdict.primary if verdict is not None else None
    user_metrics = sorted(set().union(*((summaries[side].get("metrics") or {}).keys() for side, _ in present)))
    for row in metric_rows(user_metrics):
        values = {side: (summaries[side].get(row.group) or {}).get(row.key) for side, _ in present}
        if all(value is None for value in values.values()):
            continue
        is_primary = primary is not None and (row.group, row.key) == primary_location(primary)
        changes = []
        for side, _ in others:
            if values["tuned"] is None or values[side] is None:
                changes.append("")
                continue
            change = format_value(values["tuned"] - values[side], row.kind, signed=True)
            difference = getattr(verdict, f"tuned_minus_{side}", None) if is_primary else None
            significant = difference is not None and (difference.significantly_better or difference.significantly_worse)
            changes.append(change + (" *" if significant else ""))
        label = row.label + (" (primary)" if is_primary else "")
        table.add_row(literal(label), *(format_value(values[side], row.kind) for side, _ in present), *changes)
    console.print(table)
    if primary is not None:
        _say(console, "* the primary metric's difference is significant: its paired bootstrap 95% CI excludes 0")
    source = (tuned.get("retention") or {}).get("source")
    if source:
        _say(console, f"retention measured on {source}")
    for number, row in enumerate(samples[:show], start=1):
        console.print(f"\n[bold]sample {number}[/]")
        for label, key in (("prompt", "prompt"), ("reference", "reference"), ("base", "base_output"),
                           ("prompted", "prompted_output"), ("tuned", "tuned_output")):
            if row.get(key) is not None:
                _say(console, f"  {label + ':':<10} {_clip(row[key])}")


def _clip(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines())  # one line per answer in the terminal
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(console, text: str) -> None:
    console.print(literal(text), soft_wrap=True)  # prompts and answers: shown as written, never markup or escapes


def _console():
    from rich.console import Console

    return Console(highlight=False)
