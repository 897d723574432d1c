"""Generation: the model answering held-out prompts, as evaluation, training samples, chat and export see it.

- `generation_prompts` renders each example's conversation up to its last answer with the
  chat template and the generation prompt (raw prompt/completion examples: the prompt as is);
- `generate` answers a batch of prompts: left-padded, with the KV cache, greedy unless
  sampling, stopping on the template's end-of-turn token or EOS (`stop_token_ids`);
- `generate_answers` runs `generate` over any number of prompts in batches of similar
  lengths, seeded, and gives the answers back in prompt order;
- `follows_format` checks an answer against the user's `eval.format`.

Trade-offs:
- Prompts are sorted by length before batching, so little of a batch is padding; a batch
  ends as soon as every answer in it has stopped.
- Raw prompts get the tokenizer's BOS; rendered chat prompts carry their own markers, so
  the two never share a batch.
- Sampling runs under a forked torch RNG: evaluating never moves the training's random state.
"""

from __future__ import annotations

import json
import re

from sftlab.config import EvalConfig, FormatSpec
from sftlab.templates import render, stop_token_ids

__all__ = ["follows_format", "generate", "generate_answers", "generation_prompts", "stop_token_ids"]


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
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop_ids: list[int],
    chat: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[dict]:
    """Batched, left-padded generation with the KV cache, greedy unless `do_sample`.

    Returns, per prompt, the text (special tokens skipped), the new token ids before the
    stop token (to look for leaked template tokens), and whether it stopped.
    """
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    finally:
        tokenizer.padding_side = side
    # Sampling settings only when sampling: with greedy decoding transformers warns about them.
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_cache=True,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
    finally:
        model.train(was_training)
    results = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
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


def generate_answers(
    model, tokenizer, prompts: list[str], chat: list[bool], cfg: EvalConfig, seed: int = 42
) -> list[dict]:
    """`generate` over every prompt: batches of similar lengths, answers back in prompt order."""
    import torch

    stop_ids = stop_token_ids(tokenizer)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (chat[i], lengths[i]))
    batches = []
    for is_chat in (False, True):  # raw prompts get the tokenizer's BOS, chat prompts carry their own markers
        group = [i for i in order if chat[i] == is_chat]
        batches += [
            (is_chat, group[start : start + cfg.generation_batch_size])
            for start in range(0, len(group), cfg.generation_batch_size)
        ]
    answers: list[dict | None] = [None] * len(prompts)
    with torch.random.fork_rng():  # sampling must not move the training's random state
        torch.manual_seed(seed)
        for is_chat, batch in batches:
            results = generate(
                model,
                tokenizer,
                [prompts[i] for i in batch],
                cfg.max_new_tokens,
                stop_ids,
                chat=is_chat,
                do_sample=cfg.do_sample,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
            )
            for i, result in zip(batch, results):
                answers[i] = result
    return answers


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
