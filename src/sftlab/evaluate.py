"""Evaluate: the base model against the tuned one, on the same held-out prompts.

The chapter opens by asking whether a prompted model would do, and closes by asking for
held-out evaluation, template adherence, domain knowledge retention and a qualitative
review of outputs, warning that a good loss can hide bad behaviour. Each question gets
a number, for the base model before training and the tuned model after:

    RUN_DIR/eval/before.json    the base model (when eval.baseline, the default)
    RUN_DIR/eval/after.json     the tuned model (final/)
    RUN_DIR/eval/samples.jsonl  per held-out prompt: {"prompt", "reference", "base_output", "tuned_output",
                                "base_follows_format", "tuned_follows_format"} (base_* null without a baseline)

before.json and after.json (report.py reads them; a metric that cannot be computed is
null, never missing; shares are in [0, 1]; perplexity = exp(loss)):

    {"model": name or path, "label": "before" | "after", "step": int | null,
     "num_prompts": int, "max_new_tokens": int, "seconds": float,
     "loss":         {"loss", "perplexity", "tokens"}     held-out loss on the trained tokens
     "adherence":    {"chat", "format", "format_spec"}     answers that end their turn cleanly; that follow eval.format
     "reference":    {"exact_match", "rougeL"}             agreement with the reference responses
     "diversity":    {"distinct_1", "distinct_2", "duplicate_share"}
     "memorization": {"verbatim_share", "mean_longest_common_ngram"}   against the training responses
     "retention":    {"loss", "perplexity", "tokens", "source"}}       loss on general text (eval.retention)

- chat adherence: the answer ended with the end-of-turn token within max_new_tokens, is
  not empty, and leaks no template: no special token, no role header of the chat
  template, no line that is a role name ("assistant") or opens another turn ("User:").
- memorization: an answer copies a training response when it equals one, or contains
  one of at least MIN_COPIED_WORDS words; the longest common n-gram is counted in words.

Trade-offs:
- Greedy decoding by default: deterministic, so before and after differ only by the
  weights. `eval.do_sample` samples instead, seeded with training.seed.
- Generation is batched (`eval.generation_batch_size` prompts, sorted by length so
  little is padding), left-padded, with the KV cache; a batch ends as soon as every
  answer in it has. `eval.num_prompts` and `eval.max_new_tokens` bound the work:
  bench/eval_generation.py measures 100 prompts x 64 tokens with SmolLM2-135M on CPU.
- The held-out loss is computed on the rows of the same `num_prompts` examples,
  tokenized exactly as trained (token-weighted, trained tokens only): bounded work, and
  the same number as the trainer's eval_loss when they cover the whole eval set (and
  training ran without autocast). It is a forward pass over every prompt and response
  token, about as costly on a CPU as the generation itself.
- Both models are measured in the model's own dtype: the tuned model in memory loses the
  bf16 autocast wrapper training may have given it, so before and after compare.
- Exact match compares whitespace-stripped text: strict, as format-bound tasks need.
  ROUGE-L is Google's rouge-score, whose tokenizer keeps ASCII letters and digits only:
  text in other scripts scores 0.
- Diversity and memorization count whitespace-separated words, so every model is
  measured the same way whatever its tokenizer. Memorization reads the trained spans of
  the prepared training rows (also from the cache), at most MEMORIZATION_MAX_RESPONSES.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.config import CONFIG_FILE, DataConfig, EvalConfig, ModelConfig, SftlabConfig, load_config
from sftlab.data import BadRow, PreparedData, preparation_settings, prepare_data, render, render_example
from sftlab.errors import DataError, ModelError, UserError
from sftlab.model import FINAL_DIR, add_default_chat_template, load_model, load_tokenizer
from sftlab.monitor import follows_format, generate, generation_prompts, read_jsonl, stop_token_ids, write_atomically

EVAL_DIR = "eval"
BEFORE_FILE = "before.json"
AFTER_FILE = "after.json"
SAMPLES_FILE = "samples.jsonl"
RETENTION_DATA = Path(__file__).parent / "retention_data" / "general.jsonl"
RETENTION_BUILTIN = "sftlab general set (retention_data/general.jsonl)"
LOSS_BATCH_TOKENS = 4096  # tokens per forward pass for the losses: bounds the full-vocabulary logits in memory
MIN_COPIED_WORDS = 5  # a shorter training response ("Yes.") found inside an answer is coincidence, not copying
MEMORIZATION_MAX_RESPONSES = 100_000  # a seeded sample beyond this keeps the check to seconds
ROLE_NAMES = ("system", "user", "assistant", "human")
ROLE_LINE = re.compile(r"^\s*(?:system|user|assistant|human)\s*:?\s*$", re.IGNORECASE | re.MULTILINE)
TURN_OPENING = re.compile(r"^\s*(?:User|USER|Human|HUMAN|Assistant|ASSISTANT)\s*:", re.MULTILINE)


# =========================================================================== what is evaluated


@dataclass
class HeldOut:
    """Everything an evaluation reads, prepared once and shared by the base and the tuned model."""

    prompts: list[str]  # rendered with the chat template, ready for generation
    chat: list[bool]  # False for raw prompt/completion examples (no template; the tokenizer adds BOS)
    questions: list[str]  # the prompt as people read it: the last message before the answer
    references: list[str]
    rows: Any  # datasets.Dataset: the held-out rows of these examples, input_ids + assistant_masks as trained
    max_length: int | None
    train_responses: list[str]
    retention_rows: Any | None
    retention_source: str | None


def held_out_set(cfg: SftlabConfig, tokenizer, data: PreparedData) -> HeldOut | None:
    """The held-out prompts, references and rows, training responses and retention data; None without eval data."""
    if data.eval is None or not data.eval_examples:
        return None
    examples, row_count = _first_examples(tokenizer, data.eval_examples, cfg.eval.num_prompts)
    retention_rows, retention_source = retention_data(cfg, tokenizer)
    return HeldOut(
        prompts=generation_prompts(tokenizer, examples, len(examples)),
        chat=[example.messages is not None for example in examples],
        questions=[_question(example) for example in examples],
        references=[_reference(example) for example in examples],
        rows=data.eval.select(range(min(row_count, len(data.eval)))),
        max_length=cfg.training.get("max_length"),
        train_responses=trained_responses(tokenizer, data.train, seed=cfg.training.get("seed", 42)),
        retention_rows=retention_rows,
        retention_source=retention_source,
    )


def _first_examples(tokenizer, examples: list, count: int) -> tuple[list, int]:
    """The first `count` held-out examples, and how many tokenized held-out rows they make.

    The rows follow the examples in order; an example can make several rows (templates
    that rewrite earlier turns) or none (rejected by the template, with data.on_error: skip).
    """
    kept, rows = [], 0
    for example in examples:
        if len(kept) == count:
            break
        try:
            pieces = len(render_example(tokenizer, example))
        except BadRow:
            continue  # not among the tokenized rows either
        kept.append(example)
        rows += pieces
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
class Evaluation:
    summary: dict  # before.json / after.json
    answers: list[dict]  # per held-out prompt, in order: output, follows_format


def evaluate_model(model, tokenizer, cfg: EvalConfig, held_out: HeldOut, label: str, model_name: str,
                   step: int | None, seed: int = 42) -> Evaluation:
    """Every number of before.json / after.json for one model."""
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, held_out, cfg, seed)
    outputs = [answer["output"] for answer in answers]
    formats = [follows_format(output, cfg.format) for output in outputs]
    markers = template_markers(tokenizer)
    raw = [tokenizer.decode(answer["token_ids"], skip_special_tokens=False) for answer in answers]
    retention = {"loss": None, "perplexity": None, "tokens": None, "source": None}
    if held_out.retention_rows is not None:
        retention = {**trained_token_loss(model, held_out.retention_rows, held_out.max_length),
                     "source": held_out.retention_source}
    summary = {
        "model": model_name,
        "label": label,
        "step": step,
        "num_prompts": len(held_out.prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "seconds": None,
        "loss": trained_token_loss(model, held_out.rows, held_out.max_length),
        "adherence": {
            "chat": _share([ends_turn_cleanly(answer["output"], answer["stopped"], text, markers)
                            for answer, text in zip(answers, raw)]),
            "format": _share(formats) if cfg.format is not None else None,
            "format_spec": cfg.format.model_dump(mode="json", exclude_none=True) if cfg.format is not None else None,
        },
        "reference": {"exact_match": exact_match(outputs, held_out.references),
                      "rougeL": rouge_l(outputs, held_out.references)},
        "diversity": {"distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2),
                      "duplicate_share": duplicate_share(outputs)},
        "memorization": memorization(outputs, held_out.train_responses),
        "retention": retention,
    }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return Evaluation(summary, [{"output": output, "follows_format": follows} for output, follows in zip(outputs, formats)])


def generate_answers(model, tokenizer, held_out: HeldOut, cfg: EvalConfig, seed: int = 42) -> list[dict]:
    """monitor.generate over every held-out prompt: batches of similar lengths, answers back in prompt order."""
    import torch

    stop_ids = stop_token_ids(tokenizer)
    lengths = [len(ids) for ids in tokenizer(held_out.prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(held_out.prompts)), key=lambda i: (held_out.chat[i], lengths[i]))
    batches = []
    for chat in (False, True):  # raw prompts get the tokenizer's BOS, chat prompts carry their own markers
        group = [i for i in order if held_out.chat[i] == chat]
        batches += [(chat, group[start: start + cfg.generation_batch_size])
                    for start in range(0, len(group), cfg.generation_batch_size)]
    answers: list[dict | None] = [None] * len(held_out.prompts)
    with torch.random.fork_rng():  # sampling must not move the training's random state
        torch.manual_seed(seed)
        for chat, batch in batches:
            results = generate(model, tokenizer, [held_out.prompts[i] for i in batch], cfg.max_new_tokens, stop_ids,
                               chat=chat, do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p)
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


# =========================================================================== metrics (pure functions)


def _share(values: list) -> float | None:
    return sum(bool(value) for value in values) / len(values) if values else None


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


def exact_match(outputs: list[str], references: list[str]) -> float | None:
    return _share([output.strip() == reference.strip() for output, reference in zip(outputs, references)])


def rouge_l(outputs: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F-measure (rouge-score, without stemming)."""
    if not outputs:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(reference, output)["rougeL"].fmeasure for output, reference in zip(outputs, references)]
    return sum(scores) / len(scores)


def distinct_n(outputs: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all answers (words); None when the answers hold no n-gram."""
    grams = [tuple(words[i: i + n]) for words in (output.split() for output in outputs) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def duplicate_share(outputs: list[str]) -> float | None:
    """Share of answers identical (up to surrounding whitespace) to another answer."""
    counts: dict[str, int] = {}
    for output in outputs:
        counts[output.strip()] = counts.get(output.strip(), 0) + 1
    return _share([counts[output.strip()] > 1 for output in outputs])


def memorization(outputs: list[str], train_responses: list[str]) -> dict:
    """Share of answers that copy a training response verbatim, and the mean longest word
    n-gram each answer shares with the training responses.

    The answers' word suffixes go into a trie; each training response is walked through
    it from each of its words, marking the n-grams it shares with some answer. One pass
    over the training words, however many answers.
    """
    if not outputs:
        return {"verbatim_share": None, "mean_longest_common_ngram": None}
    answers = [output.split() for output in outputs]
    children: dict[tuple[int, str], int] = {}  # (node, word) -> node; node 0 is the root
    for words in answers:
        for start in range(len(words)):
            node = 0
            for word in words[start:]:
                node = children.setdefault((node, word), len(children) + 1)
    shared: set[int] = set()
    exact = {response.strip() for response in train_responses}
    copied = [bool(output.strip()) and output.strip() in exact for output in outputs]
    padded = [f" {' '.join(words)} " for words in answers]
    for response in train_responses:
        words = response.split()
        for start in range(len(words)):
            node, depth = 0, 0
            for word in words[start:]:
                node = children.get((node, word))
                if node is None:
                    break
                shared.add(node)
                depth += 1
            if start == 0 and depth == len(words) >= MIN_COPIED_WORDS:  # the whole response appears in an answer
                needle = f" {' '.join(words)} "
                copied = [was or needle in text for was, text in zip(copied, padded)]
    longest = []
    for words in answers:
        best = 0
        for start in range(len(words)):
            node, depth = 0, 0
            for word in words[start:]:
                node = children[(node, word)]
                if node not in shared:
                    break
                depth += 1
            best = max(best, depth)
        longest.append(best)
    return {"verbatim_share": _share(copied), "mean_longest_common_ngram": sum(longest) / len(longest)}


# =========================================================================== runs


def evaluate_before_training(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None,
                             console=None) -> dict | None:
    """The base model, before the first step: eval/before.json and the base half of eval/samples.jsonl.

    Skipped without eval data or with eval.baseline off, and on resume when before.json exists.
    """
    console = console or _console()
    if held_out is None:
        _say(console, "no eval data: the models will not be evaluated (set data.eval or data.eval_split)")
        return None
    if not cfg.eval.baseline or (Path(run_dir) / EVAL_DIR / BEFORE_FILE).exists():
        return None
    if weights_partitioned():
        _say(console, "DeepSpeed ZeRO-3 spreads each weight over the processes: evaluate the run once it has "
             "finished, with `sftlab eval RUN_DIR`")
        return None
    return _evaluate_base(run_dir, model, tokenizer, cfg, held_out, console)


def _evaluate_base(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut, console) -> dict:
    _say(console, f"evaluating the base model on {len(held_out.prompts)} held-out prompts...")
    before = evaluate_model(model, tokenizer, cfg.eval, held_out, "before", cfg.model.name_or_path, step=0,
                            seed=cfg.training.get("seed", 42))
    write_evaluation(Path(run_dir) / EVAL_DIR, held_out, before=before)
    _say(console, f"base model evaluated in {before.summary['seconds']:.1f} s: {Path(run_dir) / EVAL_DIR / BEFORE_FILE}")
    return before.summary


def evaluate_after_training(run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None,
                            step: int | None, console=None) -> dict | None:
    """The tuned model: eval/after.json, eval/samples.jsonl, and the before/after table printed.

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
    samples = write_evaluation(eval_dir, held_out, after=after)
    print_comparison(_read_json(eval_dir / BEFORE_FILE), after.summary, samples, console, cfg.eval.show_samples)
    return after.summary


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


def evaluate_run(run_dir: Path, baseline: bool | None = None, overrides: list[str] = (), console=None) -> dict:
    """`sftlab eval RUN_DIR`: evaluate final/ again (after.json), and the base model when before.json is missing."""
    run_dir = Path(run_dir)
    cfg, final_dir, tokenizer = open_finished_run(run_dir, overrides)
    console = console or _console()
    held_out = _require_held_out(cfg, tokenizer, run_dir / CONFIG_FILE)
    if (baseline if baseline is not None else cfg.eval.baseline) and not (run_dir / EVAL_DIR / BEFORE_FILE).exists():
        _evaluate_base(run_dir, load_model(cfg.model, tokenizer), tokenizer, cfg, held_out, console)
    previous = _read_json(run_dir / EVAL_DIR / AFTER_FILE) or {}
    step = previous.get("step") if previous.get("model") == str(final_dir) else None
    return evaluate_after_training(run_dir, None, tokenizer, cfg, held_out, step, console)


def evaluate_model_path(model_path: str | None, config_path: Path, baseline: bool = False, output: Path | None = None,
                        overrides: list[str] = (), console=None) -> dict:
    """`sftlab eval --model PATH_OR_ID --config CONFIG`: any model (or a LoRA adapter, on the config's model)
    on the config's eval data; without `model_path`, the config's own model. With `baseline`, the
    config's model is evaluated too, side by side."""
    cfg = load_config(config_path, list(overrides))
    console = console or _console()
    if output is not None:
        taken = [Path(output) / name for name in (BEFORE_FILE, AFTER_FILE, SAMPLES_FILE) if (Path(output) / name).exists()]
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
    before = None
    if baseline:
        _say(console, f"evaluating {cfg.model.name_or_path} on {len(held_out.prompts)} held-out prompts...")
        before = evaluate_model(load_model(cfg.model, tokenizer), tokenizer, cfg.eval, held_out, "before",
                                cfg.model.name_or_path, step=0, seed=seed)
    model = load_final_model(path, cfg.model, tokenizer) if adapter else load_model(model_cfg, tokenizer)
    _say(console, f"evaluating {model_path} on {len(held_out.prompts)} held-out prompts...")
    after = evaluate_model(model, tokenizer, cfg.eval, held_out, "after", model_path, step=None, seed=seed)
    samples = samples_rows(held_out, before.answers if before else None, after.answers)
    if output is not None:
        write_evaluation(Path(output), held_out, before=before, after=after)
    print_comparison(before.summary if before else None, after.summary, samples, console, cfg.eval.show_samples)
    return after.summary


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


def samples_rows(held_out: HeldOut, base: list[dict] | None, tuned: list[dict] | None) -> list[dict]:
    rows = []
    for i, (question, reference) in enumerate(zip(held_out.questions, held_out.references)):
        rows.append({
            "prompt": question, "reference": reference,
            "base_output": base[i]["output"] if base else None,
            "tuned_output": tuned[i]["output"] if tuned else None,
            "base_follows_format": base[i]["follows_format"] if base else None,
            "tuned_follows_format": tuned[i]["follows_format"] if tuned else None,
        })
    return rows


def write_evaluation(eval_dir: Path, held_out: HeldOut, before: Evaluation | None = None,
                     after: Evaluation | None = None) -> list[dict]:
    """Write before.json / after.json and samples.jsonl; answers of the other model come from the samples
    already written, when they are for the same prompts."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    existing = read_jsonl(eval_dir / SAMPLES_FILE)
    same_prompts = [row.get("prompt") for row in existing] == held_out.questions
    kept = {side: [{"output": row.get(f"{side}_output"), "follows_format": row.get(f"{side}_follows_format")}
                   for row in existing] if same_prompts and all(row.get(f"{side}_output") is not None for row in existing)
            else None for side in ("base", "tuned")}
    for evaluation, name in ((before, BEFORE_FILE), (after, AFTER_FILE)):
        if evaluation is not None:
            _write_json(eval_dir / name, evaluation.summary)
    rows = samples_rows(held_out, before.answers if before else kept["base"], after.answers if after else kept["tuned"])
    write_atomically(eval_dir / SAMPLES_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


TABLE_ROWS = (  # (label, group, key, kind)
    ("held-out loss (trained tokens)", "loss", "loss", "number"),
    ("held-out perplexity", "loss", "perplexity", "number"),
    ("chat adherence (ends turn, no leaks)", "adherence", "chat", "share"),
    ("format adherence (eval.format)", "adherence", "format", "share"),
    ("exact match", "reference", "exact_match", "share"),
    ("ROUGE-L", "reference", "rougeL", "number"),
    ("distinct-1", "diversity", "distinct_1", "number"),
    ("distinct-2", "diversity", "distinct_2", "number"),
    ("duplicate answers", "diversity", "duplicate_share", "share"),
    ("copies a training response", "memorization", "verbatim_share", "share"),
    ("longest n-gram shared with training", "memorization", "mean_longest_common_ngram", "number"),
    ("retention loss (general text)", "retention", "loss", "number"),
    ("retention perplexity", "retention", "perplexity", "number"),
)


def print_comparison(before: dict | None, after: dict, samples: list[dict], console=None, show: int = 3) -> None:
    """The before/after table, then `show` held-out prompts with reference, base and tuned answers."""
    from rich.table import Table

    console = console or _console()
    table = Table("metric", *(["base (before)"] if before else []), "tuned (after)", *(["change"] if before else []),
                  title=f"held-out evaluation: {after['num_prompts']} prompts, up to {after['max_new_tokens']} new tokens",
                  title_justify="left")
    for label, group, key, kind in TABLE_ROWS:
        new = (after.get(group) or {}).get(key)
        if before is None:
            table.add_row(label, _format(new, kind))
            continue
        old = (before.get(group) or {}).get(key)
        change = _format(new - old, kind, signed=True) if new is not None and old is not None else ""
        table.add_row(label, _format(old, kind), _format(new, kind), change)
    console.print(table)
    source = (after.get("retention") or {}).get("source")
    if source:
        _say(console, f"retention measured on {source}")
    for number, row in enumerate(samples[:show], start=1):
        console.print(f"\n[bold]sample {number}[/]")
        for label, key in (("prompt", "prompt"), ("reference", "reference"), ("base", "base_output"), ("tuned", "tuned_output")):
            if row.get(key) is not None:
                _say(console, f"  {label + ':':<10} {_clip(row[key])}")


def _format(value, kind: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if kind == "share":
        return f"{value * 100:+.1f} pts" if signed else f"{value:.1%}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _clip(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines())  # one line per answer in the terminal
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _console():
    from rich.console import Console

    return Console(highlight=False)
