"""Formats: records of any supported shape -> normalized `Example`s, stored as Arrow rows.

Formats are detected from the columns (`data.format` overrides): `messages` (OpenAI
role/content, with system and tool turns), ShareGPT `conversations` (from/value), Alpaca
(instruction/input/output), `prompt`/`completion` (strings or message lists), raw `text`,
and any other record through a formatting template (`data.template`).

Normalizing runs as a batched `datasets.map` over a source's records (`normalize_batch`,
in several processes for large data): each record becomes one row holding the normalized
example (messages, tools and metadata as JSON text), its status (usable, a problem with
its reason, or a blank line) and two 64-bit hashes used for de-duplication and leakage.

Trade-offs:
- Examples are stored as JSON text in Arrow rather than as nested Arrow structs: rows of
  any shape (tool calls with differing arguments, metadata of any type) fit one schema, at
  the cost of parsing the JSON again when an example is rendered.
- Duplicates are found by hashes of the text (blake2b, 64 bits), not by the text itself:
  memory is 16 bytes a row, and two different examples share a hash with a probability
  of about n^2 / 2^65 (1 in 30 million for a million rows).
- Metadata values JSON cannot hold (dates, bytes from Parquet) are kept as their text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.sources import BadRow, Record, parse_json_record
from sftlab.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "template", "text")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
FORMAT_SAMPLE_ROWS = 1000  # format detection looks at the columns of the first usable rows
FORMAT_SCAN_LIMIT = 20_000  # ... reading at most this many rows to find them
# The status of a normalized row: an example; a record that cannot be read (bad JSON, too large...); a blank
# line; a record that is not a usable example of its format (a missing field, an empty response...).
USABLE, BAD_RECORD, BLANK, BAD_EXAMPLE = 0, 1, 2, 3


@dataclass
class Example:
    """A normalized example: a conversation (`messages`), or raw `prompt` + `completion` text."""

    messages: list[dict[str, Any]] | None = None
    prompt: str = ""
    completion: str = ""
    tools: list | None = None
    source: str = ""
    line: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """The text that identifies the example, for de-duplication and leakage checks."""
        if self.messages is None:
            return self.prompt + "\x00" + self.completion
        return "\x00".join(f"{m['role']}\x01{m.get('content') or ''}" for m in self.messages)


def near_key(example: Example) -> str:
    """The key up to case, spacing and punctuation: near-exact duplicates share it."""
    return re.sub(r"[\W_]+", " ", example.key().casefold()).strip()


def _hash64(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def inspect_value(value: Any, max_chars: int, max_depth: int = 64) -> None:
    """Reject what would break later stages: too much text, too deep nesting, text that is not Unicode.

    Iterative, so a hostile 10,000-level nesting cannot exhaust the stack.
    """
    size, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise BadRow(f"nested too deeply (over {max_depth} levels)")
        if isinstance(item, str):
            size += len(item)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRow("invalid Unicode text (a lone surrogate escape)") from None
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
            stack.extend((key, depth + 1) for key in item if isinstance(key, str))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)
    if size > max_chars:
        raise BadRow(f"example too large: {size:,} characters (data.max_example_chars is {max_chars:,})")


# =========================================================================== records -> normalized rows


@functools.cache
def normalized_features():
    import datasets

    text = datasets.Value("large_string")
    return datasets.Features(
        {
            "source": datasets.Value("int32"),
            "line": datasets.Value("int64"),
            "status": datasets.Value("int8"),
            "problem": datasets.Value("string"),
            "messages": text,
            "prompt": text,
            "completion": text,
            "tools": text,
            "metadata": text,
            "exact": datasets.Value("int64"),
            "near": datasets.Value("int64"),
        }
    )


def batch_records(batch: dict[str, list], indices: list[int], raw: bool) -> Iterator[tuple[int, dict | None | BadRow]]:
    """(line, record) for each row of a batch of records: a dict, None for a blank line, or the BadRow why not."""
    if raw:
        for line, data in zip(batch["line"], batch["raw"]):
            try:
                yield line, parse_json_record(data)
            except BadRow as reason:
                yield line, reason
        return
    names = list(batch)
    for index, values in zip(indices, zip(*(batch[name] for name in names))):
        yield index + 1, dict(zip(names, values))


def normalize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    raw: bool,
    fmt: str,
    template: str | None,
    max_chars: int,
    label: str,
    source_id: int,
) -> dict[str, list]:
    """`datasets.map` function: a batch of records -> normalized rows (one per record)."""
    out: dict[str, list] = {
        name: []
        for name in (
            "source",
            "line",
            "status",
            "problem",
            "messages",
            "prompt",
            "completion",
            "tools",
            "metadata",
            "exact",
            "near",
        )
    }
    for line, data in batch_records(batch, indices, raw):
        example, problem, status = None, None, BLANK
        if isinstance(data, BadRow):
            problem, status = str(data), BAD_RECORD
        elif data is not None:
            try:
                inspect_value(data, max_chars)
            except BadRow as reason:
                problem, status = str(reason), BAD_RECORD
            else:
                try:
                    example, status = to_example(Record(data, label, line), fmt, template), USABLE
                except BadRow as reason:
                    problem, status = str(reason), BAD_EXAMPLE
        row = example_row(example) if example is not None else {}
        out["source"].append(source_id)
        out["line"].append(line)
        out["status"].append(status)
        out["problem"].append(problem)
        for name in ("messages", "prompt", "completion", "tools", "metadata"):
            out[name].append(row.get(name))
        out["exact"].append(_hash64(example.key()) if example is not None else 0)
        out["near"].append(_hash64(near_key(example)) if example is not None else 0)
    return out


def example_row(example: Example) -> dict[str, str | None]:
    def dump(value):
        return json.dumps(value, ensure_ascii=False, default=str)

    return {
        "messages": None if example.messages is None else dump(example.messages),
        "prompt": example.prompt,
        "completion": example.completion,
        "tools": None if example.tools is None else dump(example.tools),
        "metadata": dump(example.metadata),
    }


def row_example(row: dict[str, Any], labels: Sequence[str]) -> Example:
    return Example(
        messages=None if row["messages"] is None else json.loads(row["messages"]),
        prompt=row["prompt"] or "",
        completion=row["completion"] or "",
        tools=None if row["tools"] is None else json.loads(row["tools"]),
        source=labels[row["source"]],
        line=row["line"],
        metadata=json.loads(row["metadata"] or "{}"),
    )


def batch_examples(batch: dict[str, list], labels: Sequence[str]) -> list[Example]:
    names = ("messages", "prompt", "completion", "tools", "source", "line", "metadata")
    return [row_example(dict(zip(names, values)), labels) for values in zip(*(batch[name] for name in names))]


def sample_columns(records, max_chars: int) -> tuple[set[str], int | None]:
    """The columns of the first usable records (sources.Records) and the line of the first;
    (set(), None) when none is found."""
    columns: set[str] = set()
    found, first_line = 0, None
    scanned = min(records.rows, FORMAT_SCAN_LIMIT)
    for start in range(0, scanned, FORMAT_SAMPLE_ROWS):
        stop = min(start + FORMAT_SAMPLE_ROWS, scanned)
        for line, data in batch_records(records.batch(start, stop), list(range(start, stop)), records.raw):
            if not isinstance(data, dict):
                continue
            try:
                inspect_value(data, max_chars)
            except BadRow:
                continue
            columns |= set(data)
            first_line = line if first_line is None else first_line
            found += 1
            if found == FORMAT_SAMPLE_ROWS:
                return columns, first_line
    return columns, first_line


class ExampleSequence(Sequence):
    """Normalized examples read on demand from an Arrow dataset of normalized rows (eval sets can be large)."""

    def __init__(self, rows, labels: Sequence[str]):
        self.rows, self.labels = rows, list(labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return batch_examples(self.rows[index], self.labels)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return row_example(self.rows[index], self.labels)

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), 256):
            yield from self[start : start + 256]

    def __repr__(self) -> str:
        return f"ExampleSequence({len(self)} examples)"


# =========================================================================== formats


def detect_format(columns: set[str], template: str | None = None) -> str | None:
    if template:
        return "template"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    return None


def to_example(record: Record, fmt: str, template: str | None = None) -> Example:
    """Normalize one record; raises BadRow with the reason when it cannot be used."""
    data = record.data
    tools = data.get("tools") if isinstance(data.get("tools"), list) else None
    if fmt == "messages":
        messages, used = checked_messages(_field(data, "messages"), "role", "content", None), {"messages", "tools"}
    elif fmt == "sharegpt":
        messages, used = (
            checked_messages(_field(data, "conversations"), "from", "value", SHAREGPT_ROLES),
            {"conversations", "tools"},
        )
    elif fmt == "alpaca":
        messages, used = _alpaca_messages(data), {"instruction", "input", "output", "system"}
    elif fmt == "prompt_completion":
        prompt, completion = _field(data, "prompt"), _field(data, "completion")
        used = {"prompt", "completion", "tools"}
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = checked_messages(prompt + completion, "role", "content", None)
            if not any(m["role"] == "assistant" for m in messages[len(prompt) :]):
                raise BadRow("no assistant turn in the completion")
        elif isinstance(prompt, list) or isinstance(completion, list):
            raise BadRow("prompt and completion must both be text or both be message lists")
        else:
            return _raw_example(record, _text(data, "prompt"), _text(data, "completion"), used)
    elif fmt == "template":
        prompt, completion, used = _apply_template(template or "", data)
        return _raw_example(record, prompt, completion, used)
    elif fmt == "text":
        return _raw_example(record, "", _text(data, "text"), {"text"})
    else:
        raise ValueError(f"unknown format {fmt}")
    metadata = {key: value for key, value in data.items() if key not in used}
    return Example(messages=messages, tools=tools, source=record.source, line=record.line, metadata=metadata)


def _alpaca_messages(data: dict) -> list[dict]:
    instruction, output = _text(data, "instruction"), _text(data, "output")
    extra = data.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"field 'input' is {type(extra).__name__}, expected text")
    system = data.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    messages += [
        {"role": "user", "content": f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction},
        {"role": "assistant", "content": output},
    ]
    return checked_messages(messages, "role", "content", None)


def _raw_example(record: Record, prompt: str, completion: str, used: set[str]) -> Example:
    if not completion.strip():
        raise BadRow("empty or whitespace-only response")
    metadata = {key: value for key, value in record.data.items() if key not in used}
    return Example(prompt=prompt, completion=completion, source=record.source, line=record.line, metadata=metadata)


def _field(data: dict, name: str) -> Any:
    if name not in data:
        raise BadRow(f"missing field {name!r} (has {', '.join(map(str, data)) or 'no fields'})")
    if data[name] is None:
        raise BadRow(f"null field {name!r}")
    return data[name]


def _text(data: dict, name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise BadRow(f"non-text field {name!r}: {type(value).__name__}")
    return value


def checked_messages(turns: Any, role_key: str, content_key: str, role_map: dict | None) -> list[dict[str, Any]]:
    """Validate and normalize a conversation to OpenAI-style role/content messages."""
    if not isinstance(turns, list) or not turns:
        raise BadRow("empty conversation" if isinstance(turns, list) else "conversation is not a list")
    messages = []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {index} is not an object")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise BadRow(f"missing role in turn {index} (no {role_key!r})")
        role = role_map.get(role.lower(), role) if role_map else role
        if role not in ROLES:
            raise BadRow(f"unknown role {role!r} in turn {index}")
        calls = turn.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(call, dict) for call in calls)):
            raise BadRow(f"malformed tool_calls in turn {index} (expected a list of objects)")
        message = {"role": role, "content": _content_text(turn.get(content_key), index, role, turn)}
        for key in ("tool_calls", "name", "tool_call_id"):
            if turn.get(key) is not None:
                message[key] = turn[key]
        messages.append(message)
    _check_role_order(messages)
    assistant_turns = [m for m in messages if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRow("no assistant turn")
    if any(not m["content"].strip() and not m.get("tool_calls") for m in assistant_turns):
        raise BadRow("empty or whitespace-only response")
    return messages


def _content_text(content: Any, index: int, role: str, turn: dict) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant" and turn.get("tool_calls"):
            return ""
        raise BadRow(f"null content in turn {index}")
    if isinstance(content, list):  # OpenAI-style content parts
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRow(f"non-text content in turn {index} ({kind})")
        return "".join(texts)
    raise BadRow(f"non-text content in turn {index} ({type(content).__name__})")


def _check_role_order(messages: list[dict]) -> None:
    previous = None
    for index, message in enumerate(messages, start=1):
        role = message["role"]
        if role == "system" and previous is not None:
            raise BadRow(f"roles out of order: system message at turn {index}, after the conversation started")
        if role == "tool" and previous not in {"assistant", "tool"}:
            raise BadRow(f"roles out of order: tool result at turn {index} does not follow an assistant turn")
        if role == "assistant" and previous in {None, "system"}:
            raise BadRow(f"roles out of order: assistant speaks first (turn {index})")
        if role in {"user", "assistant"} and role == previous:
            raise BadRow(f"roles out of order: two {role} turns in a row (turns {index - 1} and {index})")
        previous = role


def _apply_template(template: str, data: dict) -> tuple[str, str, set[str]]:
    """Split a formatting template at its last field: before it is the prompt, from it on the response."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise DataError(
            f"data.template is not a valid template: {exc}",
            hint='use {field} placeholders, e.g. "Q: {question}\\nA: {answer}"',
        ) from None
    if not fields:
        raise DataError(
            "data.template has no {field} placeholders", hint='e.g. "### Question: {question}\\n### Answer: {answer}"'
        )
    missing = [name for name in fields if name not in data]
    if missing:
        raise BadRow(f"missing field {missing[0]!r} (used by data.template; row has {', '.join(map(str, data))})")
    values = {name: "" if data[name] is None else str(data[name]) for name in fields}
    if not values[fields[-1]].strip():
        raise BadRow(f"empty or whitespace-only response in field {fields[-1]!r}")
    cut = template.rindex("{" + fields[-1])
    try:
        return template[:cut].format(**values), template[cut:].format(**values), set(fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"data.template cannot be filled: {exc}") from None


def check_template(template: str | None) -> None:
    """Raise DataError for a formatting template that no row could fill (checked once, before the rows)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template or "") if name]
    except ValueError as exc:
        raise DataError(
            f"data.template is not a valid template: {exc}",
            hint='use {field} placeholders, e.g. "Q: {question}\\nA: {answer}"',
        ) from None
    if not fields:
        raise DataError(
            "data.template has no {field} placeholders", hint='e.g. "### Question: {question}\\n### Answer: {answer}"'
        )
    try:
        (template or "").format(**{name: "" for name in fields})
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"data.template cannot be filled: {exc}") from None
