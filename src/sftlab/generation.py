"""Generation: the model answering held-out prompts, as evaluation, training samples, chat and export see it.

- `generation_prompts` renders each example's conversation up to its last answer with the
  chat template and the generation prompt (raw prompt/completion examples: the prompt as is);
- `generate` answers a batch of prompts (`generate_from_ids` a batch of tokenized ones):
  left-padded, with the KV cache, greedy unless sampling, stopping on the template's
  end-of-turn token or EOS (`stop_token_ids`);
- `generate_answers` runs `generate` over any number of prompts in batches of similar
  lengths, seeded, and gives the answers back in prompt order;
- `shared_prefix` encodes once the tokens every prompt of a set starts with (the system
  prompt, the few-shot examples) and hands each batch a copy of their KV cache;
- `follows_format` checks an answer against the user's `eval.format`.

Trade-offs:
- Prompts are sorted by length before batching, so little of a batch is padding; a batch
  ends as soon as every answer in it has stopped.
- With a shared prefix a batch reads [prefix][padding][rest of the prompt]: the attention
  mask hides the padding and positions follow the mask, so the answers are those of the
  plain left-padded batch (equal up to float rounding), and the few-shot baseline pays for
  its shots once instead of once per prompt. Models whose cache cannot be copied per batch
  (no `batch_repeat_interleave`) or whose forward refuses it are run without.
- Raw prompts get the tokenizer's BOS; rendered chat prompts carry their own markers, so
  the two never share a batch.
- Sampling runs under a forked torch RNG: evaluating never moves the training's random state.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import re
from dataclasses import dataclass

from sftlab.config import EvalConfig, FormatSpec
from sftlab.model import eval_mode
from sftlab.templates import render, stop_token_ids

__all__ = [
    "SharedPrefix",
    "follows_format",
    "generate",
    "generate_answers",
    "generate_from_ids",
    "generation_prompts",
    "shared_prefix",
    "stop_token_ids",
]

log = logging.getLogger(__name__)

# A shared prefix shorter than this saves less than its own forward pass and cache copies cost.
PREFIX_MIN_TOKENS = 16


def generation_prompts(tokenizer, examples, count: int) -> list[str]:
    """The prompts of the first `count` held-out examples, ready for generation."""
    prompts = []
    for example in examples[:count]:
        if example.messages is None:
            prompts.append(example.prompt)
            continue
        last = max(i for i, message in enumerate(example.messages) if message["role"] == "assistant")
        prompts.append(render(tokenizer, example.messages[:last], add_generation_prompt=True, tools=example.tools))
    return prompts


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, stop_ids: list[int], chat: bool = True, **options
):
    """`generate_from_ids` on prompt texts (`chat`: rendered with the template, so no BOS is added)."""
    ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens, stop_ids, **options)


def generate_from_ids(
    model,
    tokenizer,
    ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefix: SharedPrefix | None = None,
) -> list[dict]:
    """Batched, left-padded generation with the KV cache, greedy unless `do_sample`.

    `prefix`, when given, holds the first tokens of every prompt already encoded. Returns,
    per prompt, the text (special tokens skipped), the new token ids before the stop token
    (to look for leaked template tokens), and whether it stopped.
    """
    import torch

    input_ids, attention_mask = _left_padded(ids, tokenizer.pad_token_id, prefix)
    device = _device(model)
    # Sampling settings only when sampling: with greedy decoding transformers warns about them.
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    cache = {"past_key_values": prefix.for_batch(len(ids))} if prefix is not None else {}
    with eval_mode(model), torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor(input_ids, device=device),
            attention_mask=torch.tensor(attention_mask, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            use_cache=True,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **cache,
            **sampling,
        )
    results = []
    for row in output[:, len(input_ids[0]) :].tolist():
        stop_at = next((i for i, token in enumerate(row) if token in stop_ids), None)
        new = row if stop_at is None else row[:stop_at]
        results.append(
            {
                "output": tokenizer.decode(new, skip_special_tokens=True),
                "token_ids": new,
                "stopped": stop_at is not None,
            }
        )
    return results


def _left_padded(ids: list[list[int]], pad_id: int | None, prefix: SharedPrefix | None):
    """Input ids and attention mask, padded on the left, or between the shared prefix and the rest."""
    pad_id = 0 if pad_id is None else pad_id
    head = prefix.ids if prefix is not None else []
    tails = [row[len(head) :] for row in ids]
    width = max(len(tail) for tail in tails)
    input_ids = [head + [pad_id] * (width - len(tail)) + tail for tail in tails]
    attention_mask = [[1] * len(head) + [0] * (width - len(tail)) + [1] * len(tail) for tail in tails]
    return input_ids, attention_mask


def generate_answers(
    model, tokenizer, prompts: list[str], chat: list[bool], cfg: EvalConfig, seed: int = 42
) -> list[dict]:
    """`generate` over every prompt: batches of similar lengths, a shared prefix encoded once,
    answers back in prompt order."""
    import torch

    ids = [tokenizer(prompt, add_special_tokens=not is_chat)["input_ids"] for prompt, is_chat in zip(prompts, chat)]
    order = sorted(range(len(prompts)), key=lambda i: (chat[i], len(ids[i])))
    answer = functools.partial(
        generate_from_ids,
        model,
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=stop_token_ids(tokenizer),
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    answers: list[dict | None] = [None] * len(prompts)
    with torch.random.fork_rng():  # sampling must not move the training's random state
        torch.manual_seed(seed)
        for is_chat in (False, True):  # raw prompts get the tokenizer's BOS, chat prompts carry their own markers
            group = [i for i in order if chat[i] == is_chat]
            prefix = shared_prefix(model, [ids[i] for i in group])
            for start in range(0, len(group), cfg.generation_batch_size):
                batch = group[start : start + cfg.generation_batch_size]
                batch_ids = [ids[i] for i in batch]
                try:
                    results = answer(batch_ids, prefix=prefix)
                except (TypeError, ValueError, AttributeError, IndexError) as error:
                    if prefix is None:
                        raise
                    log.debug("the shared prefix cache does not work with this model (%s): generating without", error)
                    prefix = None
                    results = answer(batch_ids)
                for i, result in zip(batch, results):
                    answers[i] = result
    return answers


# =========================================================================== a prefix every prompt shares


@dataclass
class SharedPrefix:
    """The tokens every sequence of a set starts with, and their KV cache for one sequence."""

    ids: list[int]
    cache: object  # a transformers Cache

    def for_batch(self, size: int):
        """A copy of the cache for `size` sequences (the model appends to the cache it is given)."""
        cache = copy.deepcopy(self.cache)
        if size > 1:
            cache.batch_repeat_interleave(size)
        return cache


def shared_prefix(model, sequences: list[list[int]], limit: int | None = None) -> SharedPrefix | None:
    """The tokens all `sequences` start with, encoded once; None when shorter than PREFIX_MIN_TOKENS
    or when the model's cache cannot be copied per batch.

    At least one token of each sequence stays outside the prefix (its logits start the answer);
    `limit` caps the prefix further."""
    if len(sequences) < 2:
        return None
    length = min(len(sequence) for sequence in sequences) - 1
    if limit is not None:
        length = min(length, limit)
    first = sequences[0]
    for sequence in sequences[1:]:
        length = next((i for i in range(length) if sequence[i] != first[i]), length)
    if length < PREFIX_MIN_TOKENS:
        return None
    import torch

    inputs = {"input_ids": torch.tensor([first[:length]], device=_device(model)), "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1  # the prefix's logits are never read: do not hold them all
    with eval_mode(model), torch.no_grad():
        cache = getattr(model(**inputs), "past_key_values", None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    return SharedPrefix(first[:length], cache)


def _device(model):
    return next(model.parameters()).device


def follows_format(text: str, spec: FormatSpec | None) -> bool | None:
    """Whether a response follows the user's format (None when no format is set)."""
    if spec is None:
        return None
    text = text.strip()
    if spec.type == "regex":
        return re.fullmatch(spec.pattern, text, flags=re.DOTALL) is not None
    if spec.type == "prefix":
        return text.startswith(spec.text)
    if spec.type == "contains":
        return spec.text in text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if spec.type == "json":
        return True
    import jsonschema

    return jsonschema.Draft202012Validator(spec.schema_).is_valid(value)
