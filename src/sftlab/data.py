"""Data: load what users have, normalize it, tokenize it exactly as it will be trained.

Pipeline: sources (files or hub ids) -> records, each remembering its file and line ->
normalized examples (a conversation, or raw prompt/completion text) -> token ids plus an
`assistant_masks` column marking the tokens that are trained. That tokenized dataset is
what SFTTrainer receives, so what `sftlab check` audits is what `sftlab train` trains.

Trade-offs:
- Masks are derived from the model's own chat template by rendering conversation
  prefixes, not from `{% generation %}` markers, which most shipped templates lack. This
  works for any template, at the cost of rendering each conversation once per assistant
  turn.
- Templates that rewrite earlier turns (DeepSeek-R1-Distill drops earlier reasoning) are
  not prefix-preserving: one rendering cannot show every turn as the model will see it at
  inference. Such conversations become one example per assistant turn, each trained only
  on its last turn, which matches inference exactly and costs more tokens.
- Raw text (`text`, `template`, prompt/completion strings) is not passed through the chat
  template, as in TRL; an EOS token is appended so the model learns to stop.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sftlab.config import DataConfig, SourceConfig
from sftlab.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "template", "text")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                  "function_call": "assistant"}


@dataclass
class Record:
    """One raw row and where it came from, so every problem can name its file and line."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line for text files, 1-based row number otherwise


@dataclass
class Example:
    """A normalized example: a conversation, or raw prompt/completion text."""

    messages: list[dict[str, str]] | None = None
    prompt: str = ""
    completion: str = ""
    source: str = ""
    line: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    file: str
    line: int
    message: str


class BadRow(Exception):
    """A row that cannot be used; carries the reason for the audit."""


# --------------------------------------------------------------------------- sources


def source_list(spec) -> list[SourceConfig]:
    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    return [SourceConfig(path=item) if isinstance(item, str) else item for item in items]


def read_source(source: SourceConfig, problems: list[Problem], on_error: str) -> list[Record]:
    """Read every row of one source. Bad rows become Problems (or a DataError with on_error=fail)."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, source)
    if path.exists():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".tsv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}",
                            hint="use .jsonl, .json, .csv, .tsv, .parquet, or a directory written by save_to_disk")
        return list(readers[suffix](path, problems, on_error))
    if source.path.startswith((".", "/", "~")) or Path(source.path).suffix.lower() in {".jsonl", ".json", ".csv", ".tsv", ".parquet"}:
        raise DataError(f"data file not found: {source.path}", hint="paths are relative to the directory you run sftlab from")
    return _read_hub_dataset(source)


def _fail_or_record(problems: list[Problem], on_error: str, file: str, line: int, message: str) -> None:
    if on_error == "fail":
        raise DataError(f"{file}:{line}: {message}", hint="fix the row, or set data.on_error: skip to drop bad rows")
    problems.append(Problem(file, line, message))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {exc.start})", hint="re-save the file as UTF-8") from None


def _read_jsonl(path: Path, problems: list[Problem], on_error: str) -> Iterator[Record]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail_or_record(problems, on_error, str(path), number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(row, dict):
            _fail_or_record(problems, on_error, str(path), number, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield Record(row, str(path), number)


def _read_json(path: Path, problems: list[Problem], on_error: str) -> Iterator[Record]:
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}", hint="a .json file holds one array of records; use .jsonl for one record per line") from None
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected an array of records, or an object holding exactly one list")
        document = lists[0]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected an array of records, got {type(document).__name__}")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            _fail_or_record(problems, on_error, str(path), number, f"record {number} is not an object")
            continue
        yield Record(row, str(path), number)


def _read_csv(path: Path, problems: list[Problem], on_error: str) -> Iterator[Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True), delimiter=delimiter)
    for row in reader:
        # line_num is where the row ended: rows with quoted newlines span several lines
        if None in row:
            _fail_or_record(problems, on_error, str(path), reader.line_num, "more fields than the header has")
            continue
        yield Record(dict(row), str(path), reader.line_num)


def _read_parquet(path: Path, problems: list[Problem], on_error: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield Record(row, str(path), number)


def _read_saved_dataset(path: Path, source: SourceConfig) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or "train"
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(loaded)})", hint="set the source's split")
        loaded = loaded[split]
    return [Record(row, str(path), number) for number, row in enumerate(loaded, start=1)]


def _read_hub_dataset(source: SourceConfig) -> list[Record]:
    import datasets

    split = source.split or "train"
    try:
        loaded = datasets.load_dataset(source.path, source.name, split=split)
    except Exception as exc:  # the hub client raises many types: offline, missing repo, missing config...
        raise DataError(f"cannot load dataset {source.path!r} (config {source.name}, split {split}): {str(exc).splitlines()[0]}",
                        hint="check the path or hub id; offline (HF_HUB_OFFLINE=1) only cached datasets load") from None
    label = f"{source.path}[{split}]"
    return [Record(row, label, number) for number, row in enumerate(loaded, start=1)]


# --------------------------------------------------------------------------- formats


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
    used: set[str]
    if fmt == "messages":
        messages, used = _checked_messages(_field(data, "messages"), "role", "content", None), {"messages"}
    elif fmt == "sharegpt":
        messages, used = _checked_messages(_field(data, "conversations"), "from", "value", SHAREGPT_ROLES), {"conversations"}
    elif fmt == "alpaca":
        instruction, output = _text(data, "instruction"), _text(data, "output")
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise BadRow("field 'input' is not text")
        messages = [{"role": "system", "content": data["system"]}] if isinstance(data.get("system"), str) and data["system"] else []
        messages += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                     {"role": "assistant", "content": output}]
        messages, used = _checked_messages(messages, "role", "content", None), {"instruction", "input", "output", "system"}
    elif fmt == "prompt_completion":
        prompt, completion = _field(data, "prompt"), _field(data, "completion")
        used = {"prompt", "completion"}
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = _checked_messages(prompt + completion, "role", "content", None)
            if not any(m["role"] == "assistant" for m in messages[len(prompt):]):
                raise BadRow("completion has no assistant turn")
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
    return Example(messages=messages, source=record.source, line=record.line, metadata=metadata)


def _raw_example(record: Record, prompt: str, completion: str, used: set[str]) -> Example:
    if not completion.strip():
        raise BadRow("empty response")
    metadata = {key: value for key, value in record.data.items() if key not in used}
    return Example(prompt=prompt, completion=completion, source=record.source, line=record.line, metadata=metadata)


def _field(data: dict, name: str) -> Any:
    if name not in data:
        raise BadRow(f"missing field {name!r} (has {', '.join(map(str, data)) or 'no fields'})")
    if data[name] is None:
        raise BadRow(f"field {name!r} is null")
    return data[name]


def _text(data: dict, name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} is {type(value).__name__}, expected text")
    return value


def _checked_messages(turns: Any, role_key: str, content_key: str, role_map: dict | None) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRow("conversation is empty or not a list")
    messages = []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {index} is not an object")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise BadRow(f"turn {index} has no {role_key!r}")
        role = role_map.get(role.lower(), role) if role_map else role
        if role not in ROLES:
            raise BadRow(f"turn {index} has unknown role {role!r}")
        content = _content_text(turn.get(content_key), index)
        messages.append({"role": role, "content": content})
    assistant_turns = [m for m in messages if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRow("no assistant turn")
    if any(not m["content"].strip() for m in assistant_turns):
        raise BadRow("empty or whitespace-only assistant response")
    return messages


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise BadRow(f"turn {index} has null content")
    if isinstance(content, list):  # OpenAI-style content parts
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRow(f"turn {index} has non-text content")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRow(f"turn {index} content is {type(content).__name__}, expected text")


def _apply_template(template: str, data: dict) -> tuple[str, str, set[str]]:
    """Split a formatting template at its last field: before it is prompt, from it on is response."""
    import string

    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    if not fields:
        raise BadRow("data.template has no {field} placeholders")
    missing = [name for name in fields if name not in data]
    if missing:
        raise BadRow(f"missing field {missing[0]!r} used by data.template")
    values = {name: "" if data[name] is None else str(data[name]) for name in fields}
    if not values[fields[-1]].strip():
        raise BadRow(f"empty response field {fields[-1]!r}")
    cut = template.rindex("{" + fields[-1])
    return template[:cut].format(**values), template[cut:].format(**values), set(fields)


# --------------------------------------------------------------------------- tokenization


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
    """Render a conversation and find the character span of each assistant turn.

    A turn's span starts where its rendering departs from the generation prompt (so the
    role header the template writes is not trained) and ends after its end-of-turn token.
    Returns None if the template is not prefix-preserving for this conversation.
    """
    full = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(tokenizer, messages[: index + 1])
        if not full.startswith(through):
            return None
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        start = _common_prefix_length(prompt, through)
        start = max(start, len(render(tokenizer, messages[:index])) if index else 0)
        end = len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def _common_prefix_length(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for position in range(length):
        if a[position] != b[position]:
            return position
    return length


def tokenize_example(tokenizer, example: Example, assistant_only_loss: bool) -> list[tuple[list[int], list[int]]]:
    """Token ids and trained-token masks for one example (several when the template rewrites history)."""
    if example.messages is None:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"] if example.prompt else []
        completion_ids = tokenizer(example.completion, add_special_tokens=not example.prompt)["input_ids"]
        ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
        mask = [0 if assistant_only_loss else 1] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
        return [(ids, mask)]
    rendered = assistant_spans(tokenizer, example.messages)
    if rendered is not None:
        return [_ids_and_mask(tokenizer, *rendered, assistant_only_loss)]
    # Not prefix-preserving: one example per assistant turn, trained on that turn only.
    pieces = []
    for index, message in enumerate(example.messages):
        if message["role"] == "assistant":
            text, spans = assistant_spans(tokenizer, example.messages[: index + 1]) or (None, [])
            if text is not None and spans:
                pieces.append(_ids_and_mask(tokenizer, text, spans[-1:], assistant_only_loss))
    return pieces


def _ids_and_mask(tokenizer, text: str, spans: list[tuple[int, int]], assistant_only_loss: bool):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if not assistant_only_loss:
        return ids, [1] * len(ids)
    mask = [1 if any(start <= token_start < end for start, end in spans) else 0 for token_start, _ in encoded["offset_mapping"]]
    return ids, mask


# --------------------------------------------------------------------------- the stage


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and assistant_masks
    eval: Any | None
    eval_examples: list[Example]
    audit: dict[str, Any]


def load_examples(sources: list[SourceConfig], cfg: DataConfig, problems: list[Problem],
                  formats: dict[str, str], dropped: dict[str, int]) -> list[Example]:
    examples: list[Example] = []
    for source in sources:
        records = read_source(source, problems, cfg.on_error)
        if not records:
            raise DataError(f"{source.path}: no rows", hint="the file is empty")
        columns = set().union(*(record.data.keys() for record in records[:100]))
        fmt = cfg.format or detect_format(columns, cfg.template)
        if fmt is None:
            raise DataError(f"{source.path}: cannot tell the data format from its columns ({', '.join(sorted(map(str, columns)))})",
                            hint="set data.format (messages, sharegpt, alpaca, prompt_completion, text) or data.template")
        formats[source.path] = fmt
        for record in records:
            try:
                examples.append(to_example(record, fmt, cfg.template))
            except BadRow as reason:
                _fail_or_record(problems, cfg.on_error, record.source, record.line, str(reason))
                dropped[str(reason).split(" (")[0]] = dropped.get(str(reason).split(" (")[0], 0) + 1
    return examples


def prepare_data(cfg: DataConfig, tokenizer, assistant_only_loss: bool = True, seed: int = 42) -> PreparedData:
    """Load, normalize, split and tokenize train and eval data; audit what was done."""
    import datasets

    problems: list[Problem] = []
    formats: dict[str, str] = {}
    dropped: dict[str, int] = {}
    train_examples = load_examples(source_list(cfg.train), cfg, problems, formats, dropped)
    eval_examples = load_examples(source_list(cfg.eval), cfg, problems, formats, dropped) if cfg.eval else []
    if not cfg.eval and cfg.eval_split > 0 and len(train_examples) > 1:
        random.Random(seed).shuffle(train_examples)
        held_out = max(1, round(len(train_examples) * cfg.eval_split))
        eval_examples, train_examples = train_examples[:held_out], train_examples[held_out:]
    if not train_examples:
        raise DataError("no usable training rows", hint="see the problems listed above")

    def tokenized(examples: list[Example]):
        ids, masks = [], []
        for example in examples:
            for example_ids, mask in tokenize_example(tokenizer, example, assistant_only_loss):
                ids.append(example_ids)
                masks.append(mask)
        return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})

    train, evaluation = tokenized(train_examples), tokenized(eval_examples) if eval_examples else None
    audit = _audit(train, evaluation, formats, dropped, problems)
    return PreparedData(train=train, eval=evaluation, eval_examples=eval_examples, audit=audit)


def _audit(train, evaluation, formats, dropped, problems) -> dict[str, Any]:
    trained = sum(sum(mask) for mask in train["assistant_masks"])
    total = sum(len(ids) for ids in train["input_ids"])
    return {
        "ok": True,
        "splits": {"train": {"rows": len(train)}, "eval": {"rows": len(evaluation) if evaluation is not None else 0}},
        "formats": formats,
        "dropped": {"count": sum(dropped.values()), "reasons": dropped},
        "problems": [problem.__dict__ for problem in problems],
        "trained_token_share": trained / total if total else 0.0,
        "tokens": {"train": total, "trained": trained},
    }
