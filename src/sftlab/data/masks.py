"""Masks: render examples with the model's chat template, find the trained spans, tokenize.

What the trainer receives is decided here: each example is rendered with the chat
template, the character spans of its responses (and their end-of-turn marker) are found,
and the text is tokenized with offsets so that exactly the tokens of those spans get
`assistant_masks` 1.

Trade-offs:
- Loss masks are derived from the model's own chat template by rendering conversation
  prefixes, not from `{% generation %}` markers, which most shipped templates lack. This
  works for any template, at the cost of rendering each conversation once per turn
  (rendering is a small share of the time next to tokenizing).
- A turn's span starts after its generation prompt (and after the empty think block a
  no-think generation prompt holds) and ends after the template's end-of-turn marker, as
  probed in sftlab.templates: text a template writes only after the last message belongs to
  no turn, so it neither is trained nor breaks prefix preservation. Templates that write
  no end-of-turn marker (GLM-4.x) train the next role marker, or EOS after the last turn.
- Templates that rewrite earlier turns (DeepSeek-R1-Distill drops the reasoning of every
  assistant turn) are not prefix-preserving: no single rendering shows each turn as the
  model sees it at inference; nor are those where a rendering through a turn does not
  begin with its generation prompt (Mistral Nemo shows the system prompt only in the last
  user message). Such conversations become one example per assistant turn: the history
  rendered by the template, then the generation prompt, then the raw response and the
  end-of-turn marker, trained on that response only. This matches inference exactly and
  costs more tokens.
- Raw text (`text`, `template`, prompt/completion strings) is not passed through the chat
  template, as in TRL; the EOS token is appended so the model learns to stop.
- Tokenizing goes straight to the fast tokenizer's backend in batches (what the
  tokenizer's own `__call__` runs, without converting each batch through BatchEncoding),
  checked against `__call__` on one text per batch; masks and the per-row numbers the
  audit needs are computed with numpy for the whole batch and written as Arrow arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from sftlab.data.formats import Example, batch_examples
from sftlab.data.sources import BadRow
from sftlab.templates import (
    NEEDS_TOOLS,
    TemplateNeedsTools,
    TemplateRejected,
    common_prefix_length,
    end_of_turn_marker,
    needs_tools,
    outside_special_tokens,
    render,
    special_token_at,
    turn_end,
)

MAX_PROMPT_OVERLAP = 256  # generation prompts end with short markers; longer overlaps are coincidence


@dataclass
class Rendered:
    """Text to tokenize, and the character spans of the responses in it.

    Raw text (no chat template) is tokenized as prompt and response separately, as TRL
    does and as inference sees it: a prompt ending in a space must not lend that space
    to the response's first token. `prompt_end` marks that cut.
    """

    text: str
    spans: list[tuple[int, int]]
    prompt_end: int | None = None


def render_example(tokenizer, example: Example) -> list[Rendered]:
    """Render one example; several when the chat template is not prefix-preserving for it."""
    if example.messages is None:
        text = example.prompt + example.completion + (tokenizer.eos_token or "")
        return [Rendered(text, [(len(example.prompt), len(text))], prompt_end=len(example.prompt))]
    messages = example.messages
    try:
        return _render_conversation(tokenizer, messages, example.tools)
    except TemplateRejected as rejected:
        if not example.tools and needs_tools(tokenizer):
            reason = str(rejected).removeprefix(TemplateRejected.PREFIX)
            raise TemplateNeedsTools(f"{NEEDS_TOOLS} (without them it fails: {reason})") from None
        # Some templates (Gemma) refuse a system role: fold it into the first user turn, as their docs advise.
        if messages[0]["role"] != "system" or "system" not in str(rejected).lower():
            raise
        merged = [{**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}, *messages[2:]]
        return _render_conversation(tokenizer, merged, example.tools)


def _render_conversation(tokenizer, messages: list[dict], tools) -> list[Rendered]:
    full = render(tokenizer, messages, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The last turn's rendering is the whole conversation's: no need to render it twice.
        through, span = _turn_span(tokenizer, messages, index, tools, full if index == len(messages) - 1 else None)
        # Prefix-preserving up to the end of the turn is enough: what the rendering through this turn writes
        # after it (an EOS, an open header, written after the last message only) belongs to no turn.
        if span is None or not full.startswith(through[: span[1]]):
            return _render_turn_by_turn(tokenizer, messages, tools)
        spans.append(span)
    return [_with_stops(tokenizer, full, spans)]


def _turn_span(
    tokenizer, messages: list[dict], index: int, tools, through: str | None = None
) -> tuple[str, tuple[int, int] | None]:
    """Render messages[:index + 1] and find the span of its last (assistant) turn in it.

    The span starts where the model starts writing, after the generation prompt, so the role
    header is not trained, and ends after the end-of-turn marker. It is None when the template
    does not show the response as written (it rewrote it, e.g. dropped reasoning), or shows it
    after a history other than the generation prompt's (Mistral Nemo moves the system prompt).
    """
    if through is None:
        through = render(tokenizer, messages[: index + 1], tools=tools)
    start = _response_start(tokenizer, messages[:index], through, tools)
    if start is None:
        return through, None
    end = _response_end(tokenizer, through, start)
    if end <= start or any(part not in through[start:end] for part in _visible_parts(messages[index])):
        return through, None
    return through, (start, end)


def _response_start(tokenizer, history: list[dict], through: str, tools) -> int | None:
    """Where the model starts writing in `through`: after the generation prompt it begins with.

    Thinking templates (Qwen3, GLM-4.x) write an empty think block into an answer that has no
    reasoning; their no-think generation prompt (enable_thinking=False) already holds it, so it
    belongs to the prompt and is not trained."""
    if not history:
        return 0
    prompt = render(tokenizer, history, add_generation_prompt=True, tools=tools)
    if through.startswith(prompt):
        no_think = turn_end(tokenizer).no_think
        return len(prompt) + (len(no_think) if no_think and through.startswith(no_think, len(prompt)) else 0)
    # Only the generation prompt's own tail may differ (DeepSeek-R1's '<think>\n' before a tool call): a start
    # inside the history would train user text.
    history_text = render(tokenizer, history, tools=tools)
    shared = common_prefix_length(prompt, through)
    if prompt.startswith(history_text) and shared >= len(history_text):
        return outside_special_tokens(through, shared, tokenizer)
    return None


def _response_end(tokenizer, through: str, start: int) -> int:
    """The end of the turn that starts at `start`: after the template's end-of-turn marker (without the
    whitespace after it, and without what the template writes after the last message only)."""
    marker = turn_end(tokenizer).marker.rstrip()
    found = through.rfind(marker, start) if marker.strip() else -1
    return found + len(marker) if found != -1 else len(through.rstrip())


def _with_stops(tokenizer, text: str, spans: list[tuple[int, int]]) -> Rendered:
    """A template that writes nothing after a response (GLM-4.x) would train no stop: each turn then trains
    the next turn's role marker, or EOS after the last turn, the tokens such models' generation configs stop on."""
    if turn_end(tokenizer).has_marker or not spans:
        return Rendered(text, spans)
    stopped = []
    for start, end in spans:
        after = end + len(text[end:]) - len(text[end:].lstrip())
        role = special_token_at(text, after, tokenizer)
        if role:
            end = after + len(role)
        elif not text[end:].strip() and tokenizer.eos_token:
            text = text[:end] + tokenizer.eos_token + text[end:]
            end += len(tokenizer.eos_token)
        stopped.append((start, end))
    return Rendered(text, stopped)


def _visible_parts(message: dict) -> list[str]:
    """Text a faithful rendering of an assistant turn must contain: its content and the names of its tool calls."""
    parts = [(message.get("content") or "").strip()]
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        parts.append(str(function.get("name", "")) if isinstance(function, dict) else "")
    return [part for part in parts if part]


def _render_turn_by_turn(tokenizer, messages: list[dict], tools) -> list[Rendered]:
    """One example per assistant turn, exactly as the model sees it at inference:
    history (as the template renders it) + generation prompt + response + end-of-turn marker
    (EOS where the template writes none)."""
    pieces = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        if message.get("tool_calls"):
            through, span = _turn_span(tokenizer, messages, index, tools)
            if span is None:
                raise BadRow(f"chat template drops the tool calls of turn {index + 1}: it cannot train tool use")
            pieces.append(Rendered(through, [span]))
            continue
        response = _strip_prompt_overlap(prompt, message["content"])
        marker = end_of_turn_marker(tokenizer, messages[:index], tools)
        text = prompt + response + (marker if marker.strip() else tokenizer.eos_token or "")
        pieces.append(Rendered(text, [(len(prompt), len(text.rstrip()))]))
    return pieces


def _strip_prompt_overlap(prompt: str, response: str) -> str:
    """A response that repeats the end of the generation prompt (DeepSeek-R1's '<think>\\n') loses the repeat."""
    for size in range(min(len(prompt), len(response), MAX_PROMPT_OVERLAP), 0, -1):
        if prompt.endswith(response[:size]) and response[:size].strip():
            return response[size:]
    return response


# =========================================================================== batched tokenizing with masks


def _encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None and texts:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        # The tokenizer's __call__ may do more than its backend (a legacy prefix space...): then use it.
        if encodings[0].ids == tokenizer(texts[0], add_special_tokens=False)["input_ids"]:
            return [encoding.ids for encoding in encodings], [encoding.offsets for encoding in encodings]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def tokenize_rendered(
    tokenizer, rendered: list[Rendered], batch_size: int = 1000
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and a response mask for each rendered item (lists; `tokenize_batch` is the Arrow version)."""
    all_ids: list[list[int]] = []
    all_masks: list[list[int]] = []
    for start in range(0, len(rendered), batch_size):
        ids, masks, _ = _tokenize_chunk(tokenizer, rendered[start : start + batch_size])
        all_ids += ids
        all_masks += [mask.tolist() for mask in masks]
    return all_ids, all_masks


def _tokenize_chunk(tokenizer, rendered: list[Rendered]):
    """Ids (lists) and masks (numpy int8 arrays) of a chunk, in order, and the flat ids as numpy."""
    import numpy as np

    ids: list[list[int]] = [[] for _ in rendered]
    masks: list[Any] = [None] * len(rendered)
    chat = [i for i, item in enumerate(rendered) if item.prompt_end is None]
    if chat:
        chat_ids, offsets = _encode_with_offsets(tokenizer, [rendered[i].text for i in chat])
        for i, row_ids, mask in zip(chat, chat_ids, _span_masks(offsets, [rendered[i] for i in chat])):
            ids[i], masks[i] = row_ids, mask
    raw = [i for i, item in enumerate(rendered) if item.prompt_end is not None]
    if raw:
        # The tokenizer's own BOS (if it adds one) goes before the prompt, nothing special inside the response.
        prompts = tokenizer([rendered[i].text[: rendered[i].prompt_end] for i in raw], add_special_tokens=True)[
            "input_ids"
        ]
        responses = tokenizer([rendered[i].text[rendered[i].prompt_end :] for i in raw], add_special_tokens=False)[
            "input_ids"
        ]
        for i, prompt, response in zip(raw, prompts, responses):
            ids[i] = prompt + response
            masks[i] = np.concatenate([np.zeros(len(prompt), np.int8), np.ones(len(response), np.int8)])
    return ids, masks, np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))


def _span_masks(offsets: list[list[tuple[int, int]]], rendered: list[Rendered]):
    """Response masks of a chunk of rows. A token is trained when it overlaps a response span.
    A token that merges the end of a role header with the response's first characters
    (' Paris' after 'Answer:') is trained: leaving it out would lose the response's first word.

    All rows at once: positions of row r are shifted past those of the rows before it, so
    one sorted search finds, for every token, the first span that ends after it starts."""
    import numpy as np

    counts = np.array([len(row) for row in offsets], dtype=np.int64)
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * int(counts.sum()))
    flat = flat.reshape(-1, 2)
    shift = np.cumsum([0] + [len(item.text) + 1 for item in rendered[:-1]], dtype=np.int64)
    token_shift = np.repeat(shift, counts)
    token_start, token_end = flat[:, 0] + token_shift, flat[:, 1] + token_shift
    spans = [(start + base, end + base) for item, base in zip(rendered, shift.tolist()) for start, end in item.spans]
    span_start = np.array([start for start, _ in spans], dtype=np.int64)
    span_end = np.array([end for _, end in spans], dtype=np.int64)
    if not spans:
        mask = np.zeros(len(flat), dtype=np.int8)
    else:
        slot = np.searchsorted(span_end, token_start + 1, side="left")
        found = slot < len(spans)
        slot = np.minimum(slot, len(spans) - 1)
        mask = (found & (token_end > span_start[slot]) & (token_end > token_start)).astype(np.int8)
    return np.split(mask, np.cumsum(counts)[:-1]) if len(counts) else []


@functools.cache
def tokenized_features():
    import datasets

    count = datasets.Value("int32")
    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "assistant_masks": datasets.List(datasets.Value("int8")),
            "source": datasets.Value("int32"),
            "line": datasets.Value("int64"),
            "problem": datasets.Value("string"),
            "length": count,
            "trained": count,
            "trained_cut": count,
            "emptied": datasets.Value("bool"),
            "stop_trained": datasets.Value("bool"),
            "stops": count,  # bit k set: the row trains stop_ids[k]
        }
    )


def tokenize_batch(
    batch: dict[str, list],
    rank: int | None = None,
    *,
    tokenizer,
    labels: Sequence[str],
    assistant_only_loss: bool,
    max_length: int | None,
    stop_ids: Sequence[int],
):
    """`datasets.map` function: normalized examples -> tokenized rows (one per rendered piece), as an Arrow table.

    Besides `input_ids` and `assistant_masks` (all ones unless assistant_only_loss), each row
    carries what the audit counts, from the response masks: its length, its trained tokens,
    those past max_length, whether max_length leaves it nothing to train, whether it trains a
    stop token and which (`stops`, a bit per stop_ids entry). An example the template rejects
    becomes one empty row with its `problem`.
    """
    import numpy as np
    import pyarrow as pa

    if rank is not None:  # a worker process: the processes already use every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    rendered: list[Rendered | None] = []  # None: the template rejected the example (its problem row)
    sources, lines, problems = [], [], []
    for example, source in zip(batch_examples(batch, labels), batch["source"]):
        try:
            pieces, problem = render_example(tokenizer, example), None
        except BadRow as reason:
            pieces, problem = [None], str(reason)
        rendered += pieces
        sources += [source] * len(pieces)
        lines += [example.line] * len(pieces)
        problems += [problem] * len(pieces)
    _, tokenized_masks, flat_ids = _tokenize_chunk(tokenizer, [item for item in rendered if item is not None])
    tokenized = iter(tokenized_masks)
    masks = [next(tokenized) if item is not None else np.zeros(0, np.int8) for item in rendered]
    counts = np.array([len(mask) for mask in masks], dtype=np.int64)
    mask = np.concatenate(masks) if masks else np.zeros(0, np.int8)
    starts = np.concatenate([[0], np.cumsum(counts)])
    position = np.arange(len(mask)) - np.repeat(starts[:-1], counts)
    row = np.repeat(np.arange(len(counts)), counts)

    def per_row(values):
        return np.bincount(row, weights=values, minlength=len(counts)).astype(np.int64)

    trained = per_row(mask)
    limit = max_length if max_length else np.iinfo(np.int64).max
    trained_cut = per_row(mask * (position >= limit))
    trained_kept = per_row(mask * (position < limit))
    stops = np.zeros(len(counts), dtype=np.int64)
    for bit, stop_id in enumerate(stop_ids):
        stops |= (per_row(mask * (flat_ids == stop_id)) > 0).astype(np.int64) << bit
    offsets = pa.array(starts, pa.int32())
    out_mask = mask if assistant_only_loss else np.ones_like(mask)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids.astype(np.int32))),
            "assistant_masks": pa.ListArray.from_arrays(offsets, pa.array(out_mask.astype(np.int8))),
            "source": pa.array(sources, pa.int32()),
            "line": pa.array(lines, pa.int64()),
            "problem": pa.array(problems, pa.string()),
            "length": pa.array(counts, pa.int32()),
            "trained": pa.array(trained, pa.int32()),
            "trained_cut": pa.array(trained_cut, pa.int32()),
            "emptied": pa.array((counts > limit) & (trained_kept == 0)),
            "stop_trained": pa.array(stops > 0),
            "stops": pa.array(stops, pa.int32()),
        }
    )
