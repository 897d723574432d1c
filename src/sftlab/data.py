"""Data: load what users have, audit it, tokenize it exactly as it will be trained.

Pipeline, one way:

    sources (files, save_to_disk directories, hub ids)
      -> records, each remembering its file and line
      -> examples: a conversation, or raw prompt/completion text   (formats normalized)
      -> de-duplicated, split into train/eval without leakage, mixed by source weight
      -> rendered with the model's chat template, trained character spans found
      -> token ids + `assistant_masks`                              (what SFTTrainer gets)
      -> audit                                                      (what `sftlab check` shows)

Trade-offs:
- Loss masks are derived from the model's own chat template by rendering conversation
  prefixes, not from `{% generation %}` markers, which most shipped templates lack. This
  works for any template, at the cost of rendering each conversation once per turn.
- Templates that rewrite earlier turns (DeepSeek-R1-Distill drops the reasoning of every
  assistant turn) are not prefix-preserving: no single rendering shows each turn as the
  model sees it at inference. Such conversations become one example per assistant turn:
  the history rendered by the template, then the generation prompt, then the raw
  response and the end-of-turn marker, trained on that response only. This matches
  inference exactly and costs more tokens.
- Raw text (`text`, `template`, prompt/completion strings) is not passed through the chat
  template, as in TRL; the EOS token is appended so the model learns to stop.
- Bad rows never crash the loader: each becomes a problem with its file and line, which
  stops the run (`on_error: fail`) or is counted and skipped (`on_error: skip`).
- The tokenized result is cached by a hash of the files' contents, the data config and
  the tokenizer, so an unchanged second run loads it instead of recomputing.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import os
import random
import re
import shutil
import string
import sys
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Iterator

from sftlab.config import DataConfig, SourceConfig
from sftlab.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "template", "text")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "assistant"}
FILE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"}
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "eval", "dev")
SENTINEL = "\uE000sftlab-response\uE001"  # private-use characters: no template or text contains them
CACHE_VERSION = "2"
TRAIN_SAMPLE_SIZE = 64  # training examples kept as Examples: few-shot prompts for the prompted baseline (evaluate.py)
MAX_PROMPT_OVERLAP = 256  # generation prompts end with short markers; longer overlaps are coincidence


# =========================================================================== records and examples


@dataclass
class Record:
    """One raw row and where it came from, so every problem can name its file and line."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line for text files, 1-based row number otherwise


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


@dataclass
class Problem:
    file: str
    line: int
    message: str


class BadRow(Exception):
    """A row that cannot be used; its message is the reason shown in the audit."""


# =========================================================================== sources


def source_list(spec) -> list[SourceConfig]:
    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    return [SourceConfig(path=item) if isinstance(item, str) else item for item in items]


@dataclass
class SourceRows:
    label: str
    records: list[Record]
    own_eval: list[Record] = field(default_factory=list)  # the dataset's own test/validation split


class _Collector:
    """Gathers problems and drop reasons; raises at the first one when on_error is fail."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.problems: list[Problem] = []
        self.dropped: dict[str, int] = {}

    def bad_row(self, file: str, line: int, message: str) -> None:
        if self.on_error == "fail":
            raise DataError(f"{file}:{line}: {message}", hint="fix the row, or set data.on_error: skip to drop bad rows")
        self.problems.append(Problem(file, line, message))
        self.drop(_reason_category(message))

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def _reason_category(message: str) -> str:
    """'missing field 'x' (has a, b)' -> 'missing field': counts group by kind, not by detail."""
    return re.split(r" [('\"\d]|:", message, maxsplit=1)[0]


def read_source(source: SourceConfig, collector: _Collector, max_chars: int) -> SourceRows:
    rows = _read_rows(source, collector)
    rows.records = _drop_unusable(rows.records, collector, max_chars)
    rows.own_eval = _drop_unusable(rows.own_eval, collector, max_chars)
    return rows


def _read_rows(source: SourceConfig, collector: _Collector) -> SourceRows:
    path = Path(source.path).expanduser()
    if path.is_dir() and _written_by_save_to_disk(path):
        return _read_saved_dataset(path, source)
    if path.is_dir():
        return _read_hub_dataset(source)  # a dataset repository on disk loads like one on the hub
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}",
                            hint="use .jsonl, .json, .csv, .tsv, .parquet, or a directory written by save_to_disk")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty", hint="point data.train/data.eval at a file with rows")
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".tsv": _read_csv, ".parquet": _read_parquet}
        return SourceRows(str(path), list(readers[suffix](path, collector)))
    if source.path.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES or source.path.count("/") > 1:
        raise DataError(f"data file not found: {source.path}", hint="relative paths start from the directory you run sftlab in")
    return _read_hub_dataset(source)


def _drop_unusable(records: list[Record], collector: _Collector, max_chars: int) -> list[Record]:
    kept = []
    for record in records:
        try:
            _inspect(record.data, max_chars)
        except BadRow as reason:
            collector.bad_row(record.source, record.line, str(reason))
            continue
        kept.append(record)
    return kept


def _inspect(value: Any, max_chars: int, max_depth: int = 64) -> None:
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


def _decode(raw: bytes, path: Path, line: int, collector: _Collector) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        collector.bad_row(str(path), line, f"invalid UTF-8 (byte {exc.start} of the line)")
        return None


def _read_jsonl(path: Path, collector: _Collector) -> Iterator[Record]:
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM is not part of the first record
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        line = _decode(line_bytes, path, number, collector)
        if line is None or not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            collector.bad_row(str(path), number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            collector.bad_row(str(path), number, "invalid JSON: nested too deeply")
            continue
        if not isinstance(row, dict):
            collector.bad_row(str(path), number, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield Record(row, str(path), number)


def _read_whole_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8", hint="re-save the file as UTF-8") from None


def _read_json(path: Path, collector: _Collector) -> Iterator[Record]:
    try:
        document = json.loads(_read_whole_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}",
                        hint="a .json file holds one array of records; use .jsonl for one record per line") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected an array of records, or an object holding exactly one list",
                            hint=f"this object has {len(lists)} lists")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected an array of records, got {type(document).__name__}")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            collector.bad_row(str(path), number, f"record {number} is not an object")
            continue
        yield Record(row, str(path), number)


def _read_csv(path: Path, collector: _Collector) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = _read_whole_text(path)
    csv.field_size_limit(sys.maxsize)  # long responses are data; size is checked per example instead
    # newline="" leaves line breaks to the csv module: str.splitlines would also break rows
    # at U+2028, form feeds and other characters that csv.writer does not quote.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row")
        for row in reader:
            if None in row:
                collector.bad_row(str(path), reader.line_num, "more fields than the header has")
                continue
            # csv yields None for missing trailing fields: that is a missing value, not text.
            yield Record({key: value for key, value in row.items() if value is not None}, str(path), reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _read_parquet(path: Path, collector: _Collector) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    for number, row in enumerate(rows, start=1):
        yield Record(row, str(path), number)


def _split_dataset_dict(loaded, label: str, source: SourceConfig) -> SourceRows:
    """Pick the train split of a DatasetDict, and its own eval split when it has one."""
    if source.split:
        if source.split not in loaded:
            raise DataError(f"{label}: no split {source.split!r} (has {', '.join(loaded)})", hint="set the source's split")
        return SourceRows(f"{label}[{source.split}]", _records(loaded[source.split], f"{label}[{source.split}]"))
    train_name = "train" if "train" in loaded else next(iter(loaded))
    eval_name = next((name for name in EVAL_SPLIT_NAMES if name in loaded and name != train_name), None)
    rows = SourceRows(f"{label}[{train_name}]", _records(loaded[train_name], f"{label}[{train_name}]"))
    if eval_name:
        rows.own_eval = _records(loaded[eval_name], f"{label}[{eval_name}]")
    return rows


def _records(dataset, label: str) -> list[Record]:
    return [Record(row, label, number) for number, row in enumerate(dataset, start=1)]


def _written_by_save_to_disk(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _read_saved_dataset(path: Path, source: SourceConfig) -> SourceRows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _split_dataset_dict(loaded, str(path), source)
    return SourceRows(str(path), _records(loaded, str(path)))


def _read_hub_dataset(source: SourceConfig) -> SourceRows:
    import datasets

    try:
        # Only the asked-for split when there is one: hub datasets can be large.
        loaded = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as exc:  # the hub client raises many types: offline, missing repo, missing config...
        raise DataError(f"cannot load dataset {source.path!r} (config {source.name}): {str(exc).strip().splitlines()[0]}",
                        hint="check the path or hub id; with HF_HUB_OFFLINE=1 only cached datasets load") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _split_dataset_dict(loaded, source.path, source)
    label = f"{source.path}[{source.split}]"
    return SourceRows(label, _records(loaded, label))


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
        messages, used = checked_messages(_field(data, "conversations"), "from", "value", SHAREGPT_ROLES), {"conversations", "tools"}
    elif fmt == "alpaca":
        messages, used = _alpaca_messages(data), {"instruction", "input", "output", "system"}
    elif fmt == "prompt_completion":
        prompt, completion = _field(data, "prompt"), _field(data, "completion")
        used = {"prompt", "completion", "tools"}
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = checked_messages(prompt + completion, "role", "content", None)
            if not any(m["role"] == "assistant" for m in messages[len(prompt):]):
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
    messages += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction},
                 {"role": "assistant", "content": output}]
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
        raise DataError(f"data.template is not a valid template: {exc}", hint='use {field} placeholders, e.g. "Q: {question}\\nA: {answer}"') from None
    if not fields:
        raise DataError("data.template has no {field} placeholders", hint='e.g. "### Question: {question}\\n### Answer: {answer}"')
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


# =========================================================================== rendering and masks


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


class TemplateRejected(BadRow):
    """The chat template raised an error for this conversation."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools)
    except Exception as exc:  # jinja's TemplateError, or a raise_exception() inside the template
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TemplateRejected(f"chat template rejects this conversation: {reason}") from None


def render_example(tokenizer, example: Example) -> list[Rendered]:
    """Render one example; several when the chat template is not prefix-preserving for it."""
    if example.messages is None:
        text = example.prompt + example.completion + (tokenizer.eos_token or "")
        return [Rendered(text, [(len(example.prompt), len(text))], prompt_end=len(example.prompt))]
    messages = example.messages
    try:
        return _render_conversation(tokenizer, messages, example.tools)
    except TemplateRejected as rejected:
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
        if span is None or not full.startswith(through):
            return _render_turn_by_turn(tokenizer, messages, tools)
        spans.append(span)
    return [Rendered(full, spans)]


def _turn_span(tokenizer, messages: list[dict], index: int, tools,
               through: str | None = None) -> tuple[str, tuple[int, int] | None]:
    """Render messages[:index + 1] and find the span of its last (assistant) turn in it.

    The span starts where the rendering departs from the generation prompt, so the role
    header is not trained, and ends after the end-of-turn marker. It is None when the
    template does not show the response as written (it rewrote it, e.g. dropped reasoning).
    """
    if through is None:
        through = render(tokenizer, messages[: index + 1], tools=tools)
    prompt = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools) if index else ""
    if through.startswith(prompt):
        start = len(prompt)
    else:
        start = _outside_special_tokens(through, _common_prefix_length(prompt, through), tokenizer)
    end = len(through.rstrip())
    if end <= start or any(part not in through[start:end] for part in _visible_parts(messages[index])):
        return through, None
    return through, (start, end)


def _visible_parts(message: dict) -> list[str]:
    """Text a faithful rendering of an assistant turn must contain: its content and the names of its tool calls."""
    parts = [(message.get("content") or "").strip()]
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        parts.append(str(function.get("name", "")) if isinstance(function, dict) else "")
    return [part for part in parts if part]


def _render_turn_by_turn(tokenizer, messages: list[dict], tools) -> list[Rendered]:
    """One example per assistant turn, exactly as the model sees it at inference:
    history (as the template renders it) + generation prompt + response + end-of-turn marker."""
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
        text = prompt + response + end_of_turn_marker(tokenizer, messages[:index], tools)
        pieces.append(Rendered(text, [(len(prompt), len(text.rstrip()))]))
    return pieces


def end_of_turn_marker(tokenizer, history: list[dict], tools=None) -> str:
    """What the template writes after an assistant response (e.g. '<|im_end|>\\n')."""
    rendered = render(tokenizer, [*history, {"role": "assistant", "content": SENTINEL}], tools=tools)
    return rendered[rendered.index(SENTINEL) + len(SENTINEL):] if SENTINEL in rendered else (tokenizer.eos_token or "")


def _strip_prompt_overlap(prompt: str, response: str) -> str:
    """A response that repeats the end of the generation prompt (DeepSeek-R1's '<think>\\n') loses the repeat."""
    for size in range(min(len(prompt), len(response), MAX_PROMPT_OVERLAP), 0, -1):
        if prompt.endswith(response[:size]) and response[:size].strip():
            return response[size:]
    return response


def _outside_special_tokens(text: str, position: int, tokenizer) -> int:
    """Move a position that falls inside a special token (two markers sharing their first
    characters, like '<think>' and '<｜tool▁calls▁begin｜>') back to that token's start."""
    for token in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})):
        found = text.find(token, max(0, position - len(token) + 1), position + len(token))
        if found != -1 and found < position < found + len(token):
            return found
    return position


def _common_prefix_length(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for position in range(length):
        if a[position] != b[position]:
            return position
    return length


def tokenize_rendered(tokenizer, rendered: list[Rendered], batch_size: int = 1000) -> tuple[list[list[int]], list[list[int]]]:
    """Batched tokenization with a response mask for each item."""
    all_ids: list[list[int]] = [[] for _ in rendered]
    all_masks: list[list[int]] = [[] for _ in rendered]
    chat = [i for i, item in enumerate(rendered) if item.prompt_end is None]
    raw = [i for i, item in enumerate(rendered) if item.prompt_end is not None]
    for chunk in _chunks(chat, batch_size):
        encoded = tokenizer([rendered[i].text for i in chunk], add_special_tokens=False, return_offsets_mapping=True)
        for position, i in enumerate(chunk):
            all_ids[i] = encoded["input_ids"][position]
            all_masks[i] = _span_mask(encoded["offset_mapping"][position], rendered[i].spans)
    for chunk in _chunks(raw, batch_size):
        # The tokenizer's own BOS (if it adds one) goes before the prompt, nothing special inside the response.
        prompts = tokenizer([rendered[i].text[: rendered[i].prompt_end] for i in chunk], add_special_tokens=True)["input_ids"]
        responses = tokenizer([rendered[i].text[rendered[i].prompt_end:] for i in chunk], add_special_tokens=False)["input_ids"]
        for position, i in enumerate(chunk):
            all_ids[i] = prompts[position] + responses[position]
            all_masks[i] = [0] * len(prompts[position]) + [1] * len(responses[position])
    return all_ids, all_masks


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _span_mask(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained when it overlaps a response span. A token that merges the end of a
    role header with the response's first characters (' Paris' after 'Answer:') is trained:
    leaving it out would lose the response's first word."""
    ends = [end for _, end in spans]
    mask = []
    for token_start, token_end in offsets:
        slot = bisect_left(ends, token_start + 1)  # first span ending after the token starts
        inside = slot < len(spans) and token_end > spans[slot][0] and token_end > token_start
        mask.append(1 if inside else 0)
    return mask


# =========================================================================== the stage


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, assistant_masks
    eval: Any | None
    eval_examples: list[Example]
    audit: dict[str, Any]
    # A seeded sample of normalized training examples (never eval rows), in the order drawn.
    train_sample: list[Example] = field(default_factory=list)


def preparation_settings(training: dict[str, Any]) -> dict[str, Any]:
    """What a run's `training` section decides about its data: the loss masks, the seed of the
    eval split and the mixing, the cut. Training and evaluation prepare data with the same."""
    return {"assistant_only_loss": bool(training.get("assistant_only_loss", True)), "seed": training.get("seed", 42),
            "max_length": training.get("max_length")}


def prepare_data(cfg: DataConfig, tokenizer, assistant_only_loss: bool = True, seed: int = 42,
                 max_length: int | None = None, cache_dir: Path | None = None) -> PreparedData:
    """Load, audit, split and tokenize train and eval data. Raises DataError when training cannot go ahead."""
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    key = cache_key(cfg, tokenizer, assistant_only_loss, seed, max_length)
    if cache_dir and (cached := _load_cached(cache_dir / key)) is not None:
        return cached
    # Millions of small lists and dicts are built here and all stay alive: the cyclic garbage
    # collector would rescan them again and again for nothing (~15% of the time at 100k rows).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        prepared = _prepare(cfg, tokenizer, assistant_only_loss, seed, max_length)
    finally:
        if gc_was_enabled:
            gc.enable()
    if cache_dir:
        _save_cached(cache_dir / key, prepared)
    return prepared


def _prepare(cfg: DataConfig, tokenizer, assistant_only_loss: bool, seed: int, max_length: int | None) -> PreparedData:
    collector = _Collector(cfg.on_error)
    formats: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}

    # 1. Read and normalize every source; a source's own test split becomes eval data.
    train_by_source, own_eval = [], []
    for source in source_list(cfg.train):
        rows = read_source(source, collector, cfg.max_example_chars)
        examples = _normalize(rows.label, rows.records, cfg, collector, formats, counts)
        train_by_source.append((source, examples))
        if rows.own_eval:
            own_eval += _normalize(rows.label + " (its eval split)", rows.own_eval, cfg, collector, formats, counts)
    eval_examples = []
    for source in source_list(cfg.eval):
        rows = read_source(source, collector, cfg.max_example_chars)
        eval_examples += _normalize(rows.label, rows.records, cfg, collector, formats, counts)
    if not cfg.eval:
        eval_examples = own_eval

    # 2. Duplicates and leakage: each example once, and never in both train and eval.
    duplicates = {"exact": 0, "near": 0, "examples": []}
    seen: dict[str, Example] = {}
    train_by_source = [(source, _dedup(examples, seen, duplicates, collector, cfg.dedup))
                       for source, examples in train_by_source]
    eval_examples = _dedup(eval_examples, {}, duplicates, collector, cfg.dedup)
    eval_keys = {_near_key(example) for example in eval_examples}
    leaked = 0
    for position, (source, examples) in enumerate(train_by_source):
        kept = [example for example in examples if _near_key(example) not in eval_keys]
        leaked += len(examples) - len(kept)
        train_by_source[position] = (source, kept)
    if leaked:
        collector.drop("also in eval (leakage)", leaked)

    # 3. A seeded eval split when no eval data was given, after de-duplication.
    rng = random.Random(seed)
    if not eval_examples and cfg.eval_split > 0:
        pooled = [(source, example) for source, examples in train_by_source for example in examples]
        rng.shuffle(pooled)
        held_out = max(1, round(len(pooled) * cfg.eval_split)) if len(pooled) > 1 else 0
        eval_examples = [example for _, example in pooled[:held_out]]
        held = {id(example) for example in eval_examples}
        train_by_source = [(source, [e for e in examples if id(e) not in held]) for source, examples in train_by_source]

    # 4. Mix sources by weight (fraction < 1 samples, weight > 1 repeats).
    train_examples = []
    for source, examples in train_by_source:
        train_examples += _weighted(examples, source.weight, rng)
    if not train_examples:
        raise DataError("no usable training rows", hint=_why_empty(collector))
    train_sample = random.Random(seed).sample(train_examples, min(TRAIN_SAMPLE_SIZE, len(train_examples)))

    # 5. Render with the chat template and tokenize: exactly what the trainer receives.
    train_ids, train_masks, train_shown = _tokenize_examples(tokenizer, train_examples, collector)
    eval_ids, eval_masks, _ = _tokenize_examples(tokenizer, eval_examples, collector)
    if not train_ids:
        raise DataError("no training row could be rendered with the model's chat template", hint=_why_empty(collector))

    audit = build_audit(
        tokenizer, train_ids, train_masks, eval_ids, eval_masks, train_shown, formats, counts, collector,
        duplicates, leaked, max_length, cfg, assistant_only_loss,
    )
    trained_masks = train_masks if assistant_only_loss else [[1] * len(ids) for ids in train_ids]
    eval_trained = eval_masks if assistant_only_loss else [[1] * len(ids) for ids in eval_ids]
    return PreparedData(
        train=_dataset(train_ids, trained_masks),
        eval=_dataset(eval_ids, eval_trained) if eval_ids else None,
        eval_examples=eval_examples,
        audit=audit,
        train_sample=train_sample,
    )


def _normalize(label: str, records: list[Record], cfg: DataConfig, collector: _Collector,
               formats: dict[str, str], counts: dict[str, dict[str, int]]) -> list[Example]:
    if not records:
        if collector.problems or collector.dropped:
            return []
        raise DataError(f"{label}: no rows", hint="the file holds no records")
    columns = set().union(*(record.data.keys() for record in records[:1000]))
    fmt = cfg.format or detect_format(columns, cfg.template)
    if fmt is None:
        raise DataError(f"{records[0].source}:{records[0].line}: cannot tell the data format from the columns "
                        f"({', '.join(sorted(map(str, columns)))})",
                        hint="set data.format (messages, sharegpt, alpaca, prompt_completion, text) or data.template")
    formats[label] = fmt
    examples = []
    for record in records:
        try:
            examples.append(to_example(record, fmt, cfg.template))
        except BadRow as reason:
            collector.bad_row(record.source, record.line, str(reason))
    counts[label] = {"rows": len(records), "usable": len(examples)}
    return examples


def _near_key(example: Example) -> str:
    return re.sub(r"[\W_]+", " ", example.key().casefold()).strip()


def _dedup(examples: list[Example], seen: dict[str, Example], duplicates: dict, collector: _Collector,
           enabled: bool) -> list[Example]:
    if not enabled:
        return examples
    exact_seen = {example.key() for example in seen.values()}
    kept = []
    for example in examples:
        near = _near_key(example)
        if near in seen:
            kind = "exact" if example.key() in exact_seen else "near"
            duplicates[kind] += 1
            if len(duplicates["examples"]) < 5:
                first = seen[near]
                duplicates["examples"].append({"kind": kind, "first": f"{first.source}:{first.line}",
                                               "again": f"{example.source}:{example.line}"})
            collector.drop(f"{kind} duplicate")
            continue
        seen[near] = example
        exact_seen.add(example.key())
        kept.append(example)
    return kept


def _weighted(examples: list[Example], weight: float | None, rng: random.Random) -> list[Example]:
    if weight is None or weight == 1:
        return examples
    whole, part = int(weight), weight - int(weight)
    return examples * whole + rng.sample(examples, round(len(examples) * part))


def _tokenize_examples(tokenizer, examples: list[Example], collector: _Collector):
    rendered, owners = [], []
    for example in examples:
        try:
            pieces = render_example(tokenizer, example)
        except BadRow as reason:
            collector.bad_row(example.source, example.line, str(reason))
            continue
        rendered += pieces
        owners += [example] * len(pieces)
    ids, masks = tokenize_rendered(tokenizer, rendered)
    return ids, masks, owners


def _dataset(ids: list[list[int]], masks: list[list[int]]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})


def _why_empty(collector: _Collector) -> str:
    if not collector.dropped:
        return "the data holds no rows"
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(collector.dropped.items(), key=lambda kv: -kv[1]))
    return f"every row was dropped: {reasons}"


# =========================================================================== audit


def build_audit(tokenizer, train_ids, train_masks, eval_ids, eval_masks, owners, formats, counts, collector,
                duplicates, leaked, max_length, cfg: DataConfig, assistant_only_loss: bool) -> dict[str, Any]:
    prompt_lengths = [len(mask) - sum(mask) for mask in train_masks]
    response_lengths = [sum(mask) for mask in train_masks]
    total_tokens = sum(len(ids) for ids in train_ids)
    trained_tokens = sum(response_lengths) if assistant_only_loss else total_tokens
    truncation = _truncation(train_ids, train_masks, max_length)
    eot_untrained = _untrained_end_of_turn(tokenizer, train_ids, train_masks) if assistant_only_loss else 0
    rows_in = sum(count["rows"] for count in counts.values())
    audit: dict[str, Any] = {
        "ok": True,
        "splits": {"train": {"rows": len(train_ids), "tokens": total_tokens},
                   "eval": {"rows": len(eval_ids), "tokens": sum(len(ids) for ids in eval_ids)}},
        "sources": counts,
        "formats": formats,
        "dropped": {"count": sum(collector.dropped.values()), "reasons": collector.dropped},
        "problems": [asdict(problem) for problem in collector.problems],
        "duplicates": {**duplicates, "leakage": leaked},
        "lengths": {"prompt": _distribution(prompt_lengths), "response": _distribution(response_lengths),
                    "total": _distribution([len(ids) for ids in train_ids])},
        "truncation": truncation,
        "trained_token_share": trained_tokens / total_tokens if total_tokens else 0.0,
        "trained_tokens": trained_tokens,
        "end_of_turn_untrained": eot_untrained,
        "examples": [_marked_example(tokenizer, owners[i], train_ids[i], train_masks[i] if assistant_only_loss else [1] * len(train_ids[i]))
                     for i in range(min(3, len(train_ids)))],
        "warnings": [],
        "errors": [],
    }
    _judge(audit, cfg, rows_in)
    return audit


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


def _truncation(ids, masks, max_length: int | None) -> dict[str, Any]:
    if not max_length:
        return {"max_length": None, "examples_over": 0, "tokens_cut": 0, "trained_tokens_cut": 0, "examples_emptied": 0}
    over = [i for i, row in enumerate(ids) if len(row) > max_length]
    return {
        "max_length": max_length,
        "examples_over": len(over),
        "tokens_cut": sum(len(ids[i]) - max_length for i in over),
        "trained_tokens_cut": sum(sum(masks[i][max_length:]) for i in over),
        # TRL keeps the start: a row whose responses all lie past max_length trains nothing and is dropped.
        "examples_emptied": sum(1 for i in over if not any(masks[i][:max_length])),
    }


def _untrained_end_of_turn(tokenizer, ids, masks) -> int:
    """Rows that train no end-of-turn token: the model would never learn to stop."""
    stops = {tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)} - {None}
    return sum(1 for row, mask in zip(ids, masks) if not any(bit and token in stops for token, bit in zip(row, mask)))


def end_of_turn_token_id(tokenizer) -> int | None:
    """The first token the chat template writes after an assistant response (<|im_end|>, <|eot_id|>, ...)."""
    if not tokenizer.chat_template:
        return None
    try:
        marker = end_of_turn_marker(tokenizer, [{"role": "user", "content": "hi"}]).strip()
    except BadRow:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return ids[0] if ids else None


def _marked_example(tokenizer, example: Example, ids: list[int], mask: list[int]) -> dict[str, Any]:
    """The example as trained: runs of tokens, each marked trained or not."""
    segments, run, state = [], [], None
    for token, bit in zip(ids, mask):
        if state is not None and bit != state:
            segments.append({"text": tokenizer.decode(run), "trained": bool(state)})
            run = []
        run.append(token)
        state = bit
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": bool(state)})
    return {"source": example.source, "line": example.line, "segments": segments}


def _judge(audit: dict, cfg: DataConfig, rows_in: int) -> None:
    """Warnings (training can go ahead) and errors (it cannot), by the configured thresholds."""
    limits = cfg.warn_if
    train_rows = audit["splits"]["train"]["rows"]
    warn = audit["warnings"].append
    duplicates = audit["duplicates"]["exact"] + audit["duplicates"]["near"]
    if rows_in and duplicates / rows_in > limits.duplicate_share:
        warn(f"{duplicates} duplicate rows ({duplicates / rows_in:.1%}) were removed: check how the data was collected")
    if audit["duplicates"]["leakage"] > limits.leakage_rows:
        warn(f"{audit['duplicates']['leakage']} training rows also appear in eval and were removed from train")
    if rows_in and audit["dropped"]["count"] / rows_in > limits.dropped_share:
        warn(f"{audit['dropped']['count']} of {rows_in} rows dropped ({audit['dropped']['count'] / rows_in:.1%})")
    truncation = audit["truncation"]
    if train_rows and truncation["examples_over"] / train_rows > limits.truncated_share:
        warn(f"{truncation['examples_over']} examples exceed max_length {truncation['max_length']}: "
             f"{truncation['trained_tokens_cut']} trained tokens would be cut; raise training.max_length or shorten them")
    if audit["trained_token_share"] < limits.trained_token_share_below:
        warn(f"only {audit['trained_token_share']:.1%} of tokens are trained: prompts dominate the data")
    if audit["end_of_turn_untrained"]:
        warn(f"{audit['end_of_turn_untrained']} examples do not train the end-of-turn token: the model may not learn to stop")
    if not audit["splits"]["eval"]["rows"]:
        warn("no eval data: overfitting cannot be detected (set data.eval or data.eval_split)")
    if train_rows and truncation["examples_emptied"] == train_rows:
        audit["errors"].append(f"every example loses all its trained tokens to max_length {truncation['max_length']}")
    audit["ok"] = not audit["errors"]


# =========================================================================== cache


def default_cache_dir() -> Path | None:
    if os.environ.get("SFTLAB_NO_CACHE"):
        return None
    root = os.environ.get("SFTLAB_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sftlab")
    return Path(root) / "prepared"


def cache_key(cfg: DataConfig, tokenizer, assistant_only_loss: bool, seed: int, max_length: int | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, cfg.model_dump(mode="json"), assistant_only_loss, seed, max_length],
                             sort_keys=True).encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for source in source_list(cfg.train) + source_list(cfg.eval):
        digest.update(_source_fingerprint(source).encode())
    return digest.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((vocabulary + str(tokenizer.chat_template) + str(tokenizer.eos_token)).encode()).hexdigest()


def _source_fingerprint(source: SourceConfig) -> str:
    path = Path(source.path).expanduser()
    if path.is_file():
        return _file_hash(path)
    if path.is_dir():
        return "".join(_file_hash(p) for p in sorted(path.rglob("*")) if p.is_file())
    return f"hub:{source.path}:{source.name}:{source.split}"  # hub data is versioned by its own cache


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _save_cached(directory: Path, prepared: PreparedData) -> None:
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    try:
        prepared.train.save_to_disk(str(partial / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(partial / "eval"))
        for name, examples in (("eval_examples.jsonl", prepared.eval_examples), ("train_sample.jsonl", prepared.train_sample)):
            (partial / name).write_text(
                "".join(json.dumps(asdict(example), default=str) + "\n" for example in examples), encoding="utf-8")
        (partial / "audit.json").write_text(json.dumps(prepared.audit), encoding="utf-8")
        partial.rename(directory)  # complete or absent: a killed run never leaves half an entry
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # a cache that cannot be written costs time, not correctness


def _load_cached(directory: Path) -> PreparedData | None:
    if not (directory / "audit.json").exists():
        return None
    import datasets

    try:
        train = datasets.load_from_disk(str(directory / "train"))
        evaluation = datasets.load_from_disk(str(directory / "eval")) if (directory / "eval").exists() else None
        examples, sample = ([Example(**json.loads(line)) for line in (directory / name).read_text(encoding="utf-8").splitlines()]
                            for name in ("eval_examples.jsonl", "train_sample.jsonl"))
        audit = json.loads((directory / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    audit["cached"] = True
    return PreparedData(train=train, eval=evaluation, eval_examples=examples, audit=audit, train_sample=sample)
