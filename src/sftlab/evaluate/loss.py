"""Held-out loss: the token-weighted mean loss over the trained tokens of tokenized rows, and its perplexity.

The same number as the trainer's eval_loss when the rows cover the whole eval set (and
training ran without autocast): the rows are tokenized exactly as trained and cut to
max_length as the trainer cuts them. Retention (general text) is measured the same way.

Trade-offs:
- A forward pass over every prompt and response token, about as costly on a CPU as the
  generation itself.
- Length-sorted batches of at most LOSS_BATCH_TOKENS tokens bound the full-vocabulary
  logits in memory.
- The model is measured in its own dtype (the caller unwraps training's autocast), so
  before and after compare.
- Tokens every row starts with before its first trained token (the few-shot examples of the
  prompted baseline, a shared system prompt) are encoded once and their KV cache copied to
  each batch (generation.shared_prefix): the loss is the same, the shots are paid for once.
"""

from __future__ import annotations

import math

from sftlab.generation import shared_prefix
from sftlab.model import eval_mode

LOSS_BATCH_TOKENS = 4096  # tokens per forward pass for the losses: bounds the full-vocabulary logits in memory


def trained_token_loss(model, rows, max_length: int | None = None) -> dict:
    """Token-weighted mean loss over the trained tokens (assistant_masks) of tokenized rows, and its perplexity.

    Rows are cut to max_length as the trainer cuts them, and run in length-sorted batches
    of at most LOSS_BATCH_TOKENS tokens.
    """
    import torch

    ids = [list(row)[:max_length] if max_length else list(row) for row in rows["input_ids"]]
    masks = [list(row)[:max_length] if max_length else list(row) for row in rows["assistant_masks"]]
    # Token t is predicted from the positions before it: a prefix must end before every row's first trained token.
    first_trained = min((mask.index(1) for mask in masks if 1 in mask), default=0)
    prefix = shared_prefix(model, ids, limit=first_trained - 1)
    start = len(prefix.ids) if prefix is not None else 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in _token_batches(order, [len(row) - start for row in ids]):
            width = max(len(ids[i]) for i in batch) - start
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), start + width), dtype=torch.long)
            trained = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, i in enumerate(batch):
                length = len(ids[i]) - start
                input_ids[row, :length] = torch.tensor(ids[i][start:])
                attention[row, : start + length] = 1
                trained[row, :length] = torch.tensor(masks[i][start:], dtype=torch.bool)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            if prefix is not None:
                inputs["past_key_values"] = prefix.for_batch(len(batch))
            with torch.no_grad():
                logits = model(**inputs, use_cache=prefix is not None).logits
            targets = trained[:, 1:].to(device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
            )
            total += losses[targets].sum().item()
            count += int(targets.sum().item())
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
