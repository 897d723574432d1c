"""The data stage against the data users actually have: every source kind, every format,
duplicates and leakage, and bad input of every kind (never a crash, always FILE:LINE).

Each test builds its files on the fly in tmp_path; nothing is downloaded. The CLI is run
as a subprocess only where the exit code and the message on stderr are the point; the
rest goes through `prepare_data`, which is what `sftlab check` runs.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from statistics import median

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import chat_rows, sftlab_subprocess, tiny_config_file, write_jsonl
from sftlab.config import DataConfig, ModelConfig, SourceConfig, validate_config
from sftlab.data import FORMATS, prepare_data
from sftlab.errors import ConfigError, DataError
from sftlab.model import load_tokenizer

EOT = "<|im_end|>"  # the tiny model's end-of-turn marker, and its EOS token
TEMPLATE = "### Question: {question}\n### Answer: {answer}"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))


@pytest.fixture
def hf_datasets_cache(tmp_path, monkeypatch):
    """`datasets.load_dataset` on a local directory writes Arrow files to its cache: keep them in tmp."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


# =========================================================================== helpers


def prepare(tokenizer, max_length=None, seed=42, **data):
    return prepare_data(DataConfig(**data), tokenizer, assistant_only_loss=True, seed=seed, max_length=max_length)


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([token for token, bit in zip(ids, mask) if bit])


def trained_texts(tokenizer, dataset) -> list[str]:
    return [trained_text(tokenizer, row["input_ids"], row["assistant_masks"]) for row in dataset]


def all_texts(tokenizer, dataset) -> list[str]:
    return [tokenizer.decode(ids) for ids in dataset["input_ids"]]


def distribution(values):
    ordered = sorted(values)
    return {"min": ordered[0], "median": median(ordered), "max": ordered[-1]}


# =========================================================================== 1. sources

ALPACA_FIELDS = ["instruction", "input", "output", "tag"]


def alpaca_rows(count: int, offset: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"Add {i} and {i}.",
            "input": "" if i % 2 else f"Show the sum of {i} twice.",
            "output": f"The sum is {2 * i}.",
            "tag": f"t{i}",
        }
        for i in range(offset, offset + count)
    ]


def write_delimited(path: Path, rows: list[dict], delimiter: str) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ALPACA_FIELDS, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_source(kind: str, directory: Path) -> tuple[str, str, int]:
    """Six rows of one source kind: (path, expected label in the audit, line of the first row)."""
    import datasets

    if kind == "jsonl":
        return str(write_jsonl(directory / "d.jsonl", chat_rows(6))), str(directory / "d.jsonl"), 1
    if kind == "json_array":
        (directory / "d.json").write_text(json.dumps(chat_rows(6)), encoding="utf-8")
        return str(directory / "d.json"), str(directory / "d.json"), 1
    if kind == "json_object":
        (directory / "d.json").write_text(json.dumps({"version": 2, "rows": chat_rows(6)}), encoding="utf-8")
        return str(directory / "d.json"), str(directory / "d.json"), 1
    if kind == "csv":
        path = write_delimited(directory / "d.csv", alpaca_rows(6), ",")
        return str(path), str(path), 2  # line 1 is the header
    if kind == "tsv":
        path = write_delimited(directory / "d.tsv", alpaca_rows(6), "\t")
        return str(path), str(path), 2
    if kind == "parquet":
        datasets.Dataset.from_list(chat_rows(6)).to_parquet(str(directory / "d.parquet"))
        return str(directory / "d.parquet"), str(directory / "d.parquet"), 1
    if kind == "save_to_disk":
        datasets.Dataset.from_list(chat_rows(6)).save_to_disk(str(directory / "saved"))
        return str(directory / "saved"), str(directory / "saved"), 1
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, fmt",
    [
        ("jsonl", "messages"),
        ("json_array", "messages"),
        ("json_object", "messages"),
        ("csv", "alpaca"),
        ("tsv", "alpaca"),
        ("parquet", "messages"),
        ("save_to_disk", "messages"),
    ],
)
def test_every_local_source_kind_loads(tmp_path, tokenizer, kind, fmt):
    path, label, first_line = make_source(kind, tmp_path)
    data = prepare(tokenizer, train=path, eval_split=0)
    audit = data.audit
    assert audit["splits"]["train"]["rows"] == 6
    assert audit["formats"] == {label: fmt}
    assert audit["sources"][label] == {"rows": 6, "usable": 6}
    assert audit["problems"] == [] and audit["dropped"]["count"] == 0
    assert (audit["examples"][0]["source"], audit["examples"][0]["line"]) == (label, first_line)
    expected = (
        {f"{i} plus {i} is {2 * i}.{EOT}" for i in range(6)}
        if fmt == "messages"
        else {f"The sum is {2 * i}.{EOT}" for i in range(6)}
    )
    assert set(trained_texts(tokenizer, data.train)) == expected


def test_a_saved_dataset_dict_uses_its_own_test_split_as_eval(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict(
        train=datasets.Dataset.from_list(chat_rows(6)),
        test=datasets.Dataset.from_list(chat_rows(2, offset=100)),
    ).save_to_disk(str(tmp_path / "saved"))
    data = prepare(tokenizer, train=str(tmp_path / "saved"))
    assert data.audit["splits"]["train"]["rows"] == 6
    assert data.audit["splits"]["eval"]["rows"] == 2
    assert [example.messages[0]["content"] for example in data.eval_examples] == [
        "What is 100 plus 100?",
        "What is 101 plus 101?",
    ]
    assert {example.source for example in data.eval_examples} == {f"{tmp_path / 'saved'}[test]"}

    # With data.eval set, that is the eval data and the dict's own test split is not used.
    other_eval = write_jsonl(tmp_path / "eval.jsonl", chat_rows(3, offset=200))
    data = prepare(tokenizer, train=str(tmp_path / "saved"), eval=str(other_eval))
    assert data.audit["splits"]["eval"]["rows"] == 3
    assert all(example.source == str(other_eval) for example in data.eval_examples)


def test_a_local_dataset_repository_loads_like_a_hub_dataset(tmp_path, tokenizer, hf_datasets_cache):
    repo = tmp_path / "my-dataset"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", chat_rows(6))
    write_jsonl(repo / "test.jsonl", chat_rows(2, offset=100))
    data = prepare(tokenizer, train=str(repo))
    audit = data.audit
    assert audit["splits"]["train"]["rows"] == 6 and audit["splits"]["eval"]["rows"] == 2
    assert audit["formats"][f"{repo}[train]"] == "messages"
    assert {example.messages[0]["content"] for example in data.eval_examples} == {
        "What is 100 plus 100?",
        "What is 101 plus 101?",
    }

    # A split asked for by name: only that one is read, and eval_split carves eval out of it.
    data = prepare(tokenizer, train=[SourceConfig(path=str(repo), split="train")], eval_split=0.5)
    assert (data.audit["splits"]["train"]["rows"], data.audit["splits"]["eval"]["rows"]) == (3, 3)


def test_mixed_sources_with_weight_and_fraction(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")  # the second run must draw the sample again, not load it
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha number {i}"} for i in range(4)])
    b = write_delimited(tmp_path / "b.csv", alpaca_rows(10), ",")
    train = [SourceConfig(path=str(a), weight=2), SourceConfig(path=str(b), fraction=0.5)]
    data = prepare(tokenizer, train=train, eval_split=0)
    audit = data.audit
    assert audit["splits"]["train"]["rows"] == 4 * 2 + 5
    assert audit["formats"] == {str(a): "text", str(b): "alpaca"}
    texts = trained_texts(tokenizer, data.train)
    for i in range(4):  # weight 2: every row twice
        assert texts.count(f"alpha number {i}{EOT}") == 2
    from_b = sorted(t for t in texts if t.startswith("The sum is"))
    assert len(from_b) == 5 and len(set(from_b)) == 5
    assert set(from_b) <= {f"The sum is {2 * i}.{EOT}" for i in range(10)}

    # The fraction is a seeded sample: the same seed draws the same rows.
    again = prepare(tokenizer, train=train, eval_split=0)
    assert sorted(trained_texts(tokenizer, again.train)) == sorted(texts)


def test_weight_and_fraction_together_is_a_config_error():
    with pytest.raises(ValueError, match="weight or fraction"):
        SourceConfig(path="a.jsonl", weight=2, fraction=0.5)
    with pytest.raises(ConfigError):
        validate_config({"data": {"train": [{"path": "a.jsonl", "weight": 2, "fraction": 0.5}]}})


def test_weight_and_fraction_together_says_so():
    """The config error names the conflict, not an unrelated union member's complaint."""
    for train in (
        [{"path": "a.jsonl", "weight": 2, "fraction": 0.5}],
        {"path": "a.jsonl", "weight": 2, "fraction": 0.5},
    ):
        with pytest.raises(ConfigError) as error:
            validate_config({"data": {"train": train}})
        assert "weight or fraction" in str(error.value), str(error.value)


# =========================================================================== 2. formats

FORMAT_CASES = ["messages", "sharegpt", "alpaca", "prompt_completion", "prompt_completion_messages", "template", "text"]


def question_answer(i: int, near: bool = False) -> tuple[str, str]:
    question = f"What is {i} plus {i}?"
    if near:  # the same question up to case, spacing and punctuation
        question = f"  WHAT is {i}   PLUS {i}!?"
    return question, f"The answer is {2 * i}."


def format_record(case: str, i: int, near: bool = False, bad: bool = False) -> dict:
    """Row i in the given format; `bad` puts a null where the response text belongs."""
    question, answer = question_answer(i, near)
    answer = None if bad else answer
    meta = {"id": i, "category": "arithmetic"}
    if case == "messages":
        return {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": question},
                # The tiny ChatML template does not render tool calls; the content names the tool instead.
                {
                    "role": "assistant",
                    "content": f"Let me add {i} and {i}.",
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": i, "b": i}}}],
                },
                {"role": "tool", "name": "add", "content": str(2 * i)},
                {"role": "assistant", "content": answer},
            ],
            **meta,
        }
    if case == "sharegpt":
        return {
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ],
            **meta,
        }
    if case == "alpaca":
        return {"instruction": question, "input": "", "output": answer, **meta}
    if case == "prompt_completion":
        return {"prompt": f"Question: {question}\nAnswer:", "completion": None if bad else f" {answer}", **meta}
    if case == "prompt_completion_messages":
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
            **meta,
        }
    if case == "template":
        return {"question": question, "answer": answer, **meta}
    if case == "text":
        return {"text": None if bad else f"Question: {question} {answer}", **meta}
    raise AssertionError(case)


def expected_trained(case: str, i: int) -> str:
    """What assistant-only loss trains for row i: the response(s) and the end-of-turn/EOS token."""
    question, answer = question_answer(i)
    if case == "messages":
        return f"Let me add {i} and {i}.{EOT}{answer}{EOT}"
    if case == "text":
        return f"Question: {question} {answer}{EOT}"  # raw text: everything, ending with EOS
    if case == "prompt_completion":
        return f" {answer}{EOT}"
    return f"{answer}{EOT}"


EXPECTED_FORMAT = {"prompt_completion_messages": "prompt_completion"}


def build_format_case(case: str, directory: Path) -> dict:
    """train: rows 0-9, an exact duplicate of row 1 (line 11), a near duplicate of row 2 (line 12)
    and a bad row (line 13); eval: rows 100 and 101 and a copy of train row 3 (leakage)."""
    train_rows = [format_record(case, i) for i in range(10)]
    train_rows += [format_record(case, 1), format_record(case, 2, near=True), format_record(case, 7, bad=True)]
    train = write_jsonl(directory / f"{case}-train.jsonl", train_rows)
    evaluation = write_jsonl(directory / f"{case}-eval.jsonl", [format_record(case, i) for i in (100, 101, 3)])
    data = {"train": str(train), "eval": str(evaluation), "on_error": "skip"}
    if case == "template":
        data["template"] = TEMPLATE
    return {
        "data": data,
        "train": train,
        "eval": evaluation,
        "format": EXPECTED_FORMAT.get(case, case),
        "trained": sorted(expected_trained(case, i) for i in range(10) if i != 3),
    }


def assert_format_audit(audit: dict, built: dict) -> None:
    train, evaluation = str(built["train"]), str(built["eval"])
    assert audit["splits"]["train"]["rows"] == 9  # 10 unique, less the one also in eval
    assert audit["splits"]["eval"]["rows"] == 3
    assert audit["formats"] == {train: built["format"], evaluation: built["format"]}
    assert audit["sources"][train] == {"rows": 13, "usable": 12}

    duplicates = audit["duplicates"]
    assert (duplicates["exact"], duplicates["near"], duplicates["leakage"]) == (1, 1, 1)
    assert {(d["kind"], d["first"], d["again"]) for d in duplicates["examples"]} == {
        ("exact", f"{train}:2", f"{train}:11"),
        ("near", f"{train}:3", f"{train}:12"),
    }

    assert audit["dropped"]["count"] == 4
    reasons = dict(audit["dropped"]["reasons"])
    assert reasons.pop("exact duplicate") == 1 and reasons.pop("near duplicate") == 1
    assert reasons.pop("also in eval (leakage)") == 1
    assert list(reasons.values()) == [1]  # the bad row, under its own reason

    assert len(audit["problems"]) == 1
    problem = audit["problems"][0]
    assert (problem["file"], problem["line"]) == (train, 13)
    assert re.search(r"null|empty", problem["message"]), problem

    for part in ("prompt", "response", "total"):
        assert set(audit["lengths"][part]) >= {"min", "median", "p95", "max"}
        assert (
            audit["lengths"][part]["min"]
            <= audit["lengths"][part]["median"]
            <= audit["lengths"][part]["p95"]
            <= audit["lengths"][part]["max"]
        )
    assert 0 < audit["trained_token_share"] <= 1
    assert set(audit["truncation"]) >= {"max_length", "examples_over", "tokens_cut", "trained_tokens_cut"}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_each_format_is_detected_audited_and_trained_on_the_response(tmp_path, tokenizer, case):
    built = build_format_case(case, tmp_path)
    data = prepare(tokenizer, max_length=40, **built["data"])
    audit = data.audit
    assert_format_audit(audit, built)

    # The audit's numbers are those of the tokenized data the trainer receives.
    ids, masks = data.train["input_ids"], data.train["assistant_masks"]
    assert audit["splits"]["train"]["tokens"] == sum(map(len, ids))
    for part, values in (
        ("prompt", [len(m) - sum(m) for m in masks]),
        ("response", [sum(m) for m in masks]),
        ("total", [len(i) for i in ids]),
    ):
        assert {k: audit["lengths"][part][k] for k in ("min", "median", "max")} == distribution(values)
    assert audit["trained_token_share"] == pytest.approx(sum(map(sum, masks)) / sum(map(len, ids)))
    over = [len(row) for row in ids if len(row) > 40]
    assert audit["truncation"]["max_length"] == 40
    assert audit["truncation"]["examples_over"] == len(over)
    assert audit["truncation"]["tokens_cut"] == sum(length - 40 for length in over)

    # Only the response (and the end-of-turn marker) is trained; raw text is trained whole.
    trained = sorted(text.strip() for text in trained_texts(tokenizer, data.train))
    assert trained == sorted(text.strip() for text in built["trained"])
    if case == "text":
        assert audit["trained_token_share"] == 1.0
        for row in data.train:
            assert row["input_ids"][-1] == tokenizer.eos_token_id and row["assistant_masks"][-1] == 1

    # Columns the format does not use are kept as metadata.
    assert [example.metadata for example in data.eval_examples] == [
        {"id": i, "category": "arithmetic"} for i in (100, 101, 3)
    ]


@pytest.mark.parametrize("case", ["sharegpt", "alpaca"])
def test_check_json_through_the_cli(tmp_path, tiny_model, case):
    built = build_format_case(case, tmp_path)
    config = tiny_config_file(tmp_path / "c.yaml", tiny_model, data=built["data"], training={"max_length": 64})
    result = sftlab_subprocess("check", config, "--json", tmp_path / "audit.json", cwd=tmp_path, timeout=300)
    # Warnings (duplicates, leakage, a dropped row) do not stop training: exit 0.
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] is True and audit["warnings"]
    assert_format_audit(audit, built)
    for example in audit["examples"]:
        shown = "".join(segment["text"] for segment in example["segments"] if segment["trained"])
        assert shown.strip() in {text.strip() for text in built["trained"]}
    assert f"{built['train']}:13" in "".join(result.stdout.split())  # the problem is shown (rich may wrap it)

    # The same file with on_error: fail stops at the bad row, naming file and line.
    result = sftlab_subprocess("check", config, "--set", "data.on_error=fail", cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {built['train']}:13: "), result.stderr


def test_data_format_overrides_detection(tmp_path, tokenizer):
    rows = [
        {"prompt": f"Question {i}?", "completion": f" Answer {i}.", "text": f"Plain text number {i}."} for i in range(4)
    ]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    detected = prepare(tokenizer, train=str(path), eval_split=0)
    assert detected.audit["formats"] == {str(path): "prompt_completion"}
    assert sorted(trained_texts(tokenizer, detected.train)) == [f" Answer {i}.{EOT}" for i in range(4)]

    forced = prepare(tokenizer, train=str(path), eval_split=0, format="text")
    assert forced.audit["formats"] == {str(path): "text"}
    assert sorted(trained_texts(tokenizer, forced.train)) == [f"Plain text number {i}.{EOT}" for i in range(4)]
    assert forced.audit["trained_token_share"] == 1.0


def test_sharegpt_maps_roles_and_trains_every_gpt_turn(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi."},
                    {"from": "gpt", "value": "Hello."},
                    {"from": "human", "value": "Bye."},
                    {"from": "gpt", "value": "Goodbye."},
                ]
            }
        ],
    )
    data = prepare(tokenizer, train=str(path), eval_split=0)
    assert trained_texts(tokenizer, data.train) == [f"Hello.{EOT}Goodbye.{EOT}"]
    text = all_texts(tokenizer, data.train)[0]
    assert "<|im_start|>system\nBe brief." in text and "<|im_start|>user\nHi." in text


# =========================================================================== 3. duplicates and leakage


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def near_key(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def test_exact_and_near_duplicates_are_removed_and_counted(tmp_path, tokenizer):
    rows = [conversation(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)]
    rows += [
        conversation("What is 3 plus 3?", "It is 6."),  # exact
        conversation("what is 3   PLUS 3", "it is 6"),  # case, spacing, punctuation
        conversation("What is 4 plus 4?!", "  It is 8 ... "),
    ]  # punctuation and spacing
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare(tokenizer, train=str(path), eval_split=0)
    audit = data.audit
    assert audit["splits"]["train"]["rows"] == 10
    assert (audit["duplicates"]["exact"], audit["duplicates"]["near"]) == (1, 2)
    assert audit["dropped"]["reasons"] == {"exact duplicate": 1, "near duplicate": 2}
    assert any("duplicate" in warning for warning in audit["warnings"])
    assert len(set(all_texts(tokenizer, data.train))) == 10

    kept = prepare(tokenizer, train=str(path), eval_split=0, dedup=False)
    assert kept.audit["splits"]["train"]["rows"] == 13
    assert kept.audit["duplicates"]["exact"] == kept.audit["duplicates"]["near"] == 0


def test_rows_also_in_eval_are_removed_from_train_as_leakage(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(f"Question {i}?", f"Answer {i}.") for i in range(10)])
    evaluation = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            conversation("Question 2?", "Answer 2."),  # exactly in train
            conversation("QUESTION 5", "answer 5"),  # in train up to case and punctuation
            conversation("Question 50?", "Answer 50."),
        ],
    )
    data = prepare(tokenizer, train=str(train), eval=str(evaluation))
    audit = data.audit
    assert audit["duplicates"]["leakage"] == 2
    assert audit["dropped"]["reasons"].get("also in eval (leakage)") == 2
    assert (audit["splits"]["train"]["rows"], audit["splits"]["eval"]["rows"]) == (8, 3)
    train_keys = {near_key(text) for text in all_texts(tokenizer, data.train)}
    assert not train_keys & {near_key(text) for text in all_texts(tokenizer, data.eval)}
    assert any("also appear in eval" in warning for warning in audit["warnings"])


def test_eval_split_is_seeded_and_made_after_deduplication(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")  # the second run must draw the split again, not load it
    rows = []
    for i in range(30):  # every example twice: once as written, once up to case and punctuation
        rows += [
            conversation(f"Tell me about item {i}.", f"Item {i} is fine."),
            conversation(f"TELL me about item {i}!!", f"item {i} is fine"),
        ]
    path = write_jsonl(tmp_path / "twice.jsonl", rows)
    first = prepare(tokenizer, train=str(path), eval_split=0.1, seed=7)
    assert first.audit["duplicates"]["near"] == 30
    assert (first.audit["splits"]["train"]["rows"], first.audit["splits"]["eval"]["rows"]) == (27, 3)
    train_keys = {near_key(text) for text in all_texts(tokenizer, first.train)}
    eval_keys = {near_key(text) for text in all_texts(tokenizer, first.eval)}
    assert len(train_keys) == 27 and len(eval_keys) == 3 and not train_keys & eval_keys

    again = prepare(tokenizer, train=str(path), eval_split=0.1, seed=7)
    assert again.eval["input_ids"] == first.eval["input_ids"]
    assert [e.line for e in again.eval_examples] == [e.line for e in first.eval_examples]


# =========================================================================== 4. bad input

GOOD_LINES = [json.dumps(row).encode() for row in chat_rows(4)]

BAD_LINES = {
    "truncated_line": (b'{"messages": [{"role": "user", "content": "What is', r"invalid JSON"),
    "invalid_utf8": (
        b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}, {"role": "assistant", "content": "ok"}]}',
        r"UTF-8",
    ),
    "null_text": (
        json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]}).encode(),
        r"null",
    ),
    "null_conversation": (b'{"messages": null}', r"null"),
    "ten_megabytes": (
        json.dumps(
            {"messages": [{"role": "user", "content": "x" * 10_000_000}, {"role": "assistant", "content": "ok"}]}
        ).encode(),
        r"too large",
    ),
    "assistant_first": (
        json.dumps(
            {
                "messages": [
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Hi."},
                    {"role": "assistant", "content": "Bye."},
                ]
            }
        ).encode(),
        r"out of order",
    ),
    "two_user_turns": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi."},
                    {"role": "user", "content": "Hello?"},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        ).encode(),
        r"out of order",
    ),
    "system_in_the_middle": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi."},
                    {"role": "system", "content": "Be brief."},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        ).encode(),
        r"out of order",
    ),
    "unknown_role": (
        json.dumps(
            {
                "messages": [
                    {"role": "narrator", "content": "Once upon a time."},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        ).encode(),
        r"unknown role",
    ),
    "no_assistant_turn": (
        json.dumps({"messages": [{"role": "user", "content": "Hi."}]}).encode(),
        r"no assistant turn",
    ),
    "empty_response": (json.dumps(conversation("Hi.", "")).encode(), r"empty"),
    "whitespace_response": (json.dumps(conversation("Hi.", " \n\t ")).encode(), r"empty"),
    "image_part": (
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "What is this?"}],
                    },
                    {"role": "assistant", "content": "A cat."},
                ]
            }
        ).encode(),
        r"non-text content",
    ),
    "not_an_object": (b'["user", "assistant"]', r"object"),
    "tool_calls_not_a_list": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Add 2 and 2."},
                    {"role": "assistant", "content": "", "tool_calls": 5},
                ]
            }
        ).encode(),
        r"tool",
    ),
}


def write_with_bad_line(path: Path, bad: bytes) -> Path:
    path.write_bytes(b"\n".join([*GOOD_LINES[:2], bad, *GOOD_LINES[2:]]) + b"\n")
    return path


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_row_names_file_and_line_and_can_be_skipped(tmp_path, tokenizer, name):
    bad, message = BAD_LINES[name]
    path = write_with_bad_line(tmp_path / f"{name}.jsonl", bad)
    with pytest.raises(DataError) as error:
        prepare(tokenizer, train=str(path), eval_split=0)
    assert str(error.value).startswith(f"{path}:3: "), str(error.value)
    assert re.search(message, str(error.value)), str(error.value)

    data = prepare(tokenizer, train=str(path), eval_split=0, on_error="skip")
    audit = data.audit
    assert audit["splits"]["train"]["rows"] == 4  # the good rows are still used
    assert audit["dropped"]["count"] == 1
    assert len(audit["problems"]) == 1
    assert (audit["problems"][0]["file"], audit["problems"][0]["line"]) == (str(path), 3)
    assert re.search(message, audit["problems"][0]["message"])
    assert any("dropped" in warning for warning in audit["warnings"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_simply_works(tmp_path, tokenizer, suffix):
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in chat_rows(4))
    elif suffix == ".json":
        text = json.dumps(chat_rows(4))
    else:
        write_delimited(path, alpaca_rows(4), ",")
        text = path.read_text(encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    data = prepare(tokenizer, train=str(path), eval_split=0)
    assert data.audit["splits"]["train"]["rows"] == 4
    assert data.audit["problems"] == [] and data.audit["dropped"]["count"] == 0


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", b""),
        ("empty.json", b""),
        ("empty.csv", b""),
        ("empty.parquet", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("header-only.csv", b"instruction,input,output\n"),
    ],
)
def test_an_empty_file_is_a_data_error_naming_it(tmp_path, tokenizer, on_error, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path))):
        prepare(tokenizer, train=str(path), on_error=on_error)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_wrong_column_names_are_a_data_error_naming_the_file(tmp_path, tokenizer, on_error):
    path = write_jsonl(tmp_path / "columns.jsonl", [{"question_text": "Hi?", "reply": "Hello."}] * 3)
    with pytest.raises(DataError, match=re.escape(str(path))) as error:
        prepare(tokenizer, train=str(path), on_error=on_error)
    assert "format" in str(error.value)


def test_a_malformed_csv_is_a_data_error(tmp_path, tokenizer):
    extra = tmp_path / "extra.csv"
    extra.write_text("instruction,input,output\nq1,,a1\nq2,,a2,surplus\nq3,,a3\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{extra}:3: ")):
        prepare(tokenizer, train=str(extra), eval_split=0)
    data = prepare(tokenizer, train=str(extra), eval_split=0, on_error="skip")
    assert data.audit["splits"]["train"]["rows"] == 2
    assert [(p["file"], p["line"]) for p in data.audit["problems"]] == [(str(extra), 3)]

    unterminated = tmp_path / "quote.csv"
    unterminated.write_text('instruction,input,output\nq1,,a1\n"q2 never closed,,a2\nq3,,a3\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(unterminated))):
        prepare(tokenizer, train=str(unterminated), eval_split=0)

    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes("instruction,input,output\nq1,,a1\nqu\u00e9,,a2\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{not_utf8}:3")):
        prepare(tokenizer, train=str(not_utf8), eval_split=0)


def test_csv_text_keeps_unicode_line_separators(tmp_path, tokenizer):
    """U+2028, form feed and friends are text inside a field (csv.writer does not even quote them), not row ends."""
    rows = [
        {"instruction": "Say hi\u2028twice.", "input": "", "output": "Hi\x0chi.", "tag": "a"},
        {"instruction": "Say bye.", "input": "", "output": "Bye\u2029bye.", "tag": "b"},
    ]
    path = write_delimited(tmp_path / "separators.csv", rows, ",")
    data = prepare(tokenizer, train=str(path), eval_split=0)
    assert data.audit["splits"]["train"]["rows"] == 2
    assert sorted(trained_texts(tokenizer, data.train)) == sorted(["Hi\x0chi." + EOT, "Bye\u2029bye." + EOT])


def test_a_corrupt_parquet_file_is_a_data_error(tmp_path, tokenizer):
    import datasets

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DataError, match=re.escape(str(garbage))):
        prepare(tokenizer, train=str(garbage))

    datasets.Dataset.from_list(chat_rows(50)).to_parquet(str(tmp_path / "whole.parquet"))
    whole = (tmp_path / "whole.parquet").read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=re.escape(str(truncated))):
        prepare(tokenizer, train=str(truncated))


def test_malformed_json_documents_are_data_errors(tmp_path, tokenizer):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "one"},\n{"text": "two"\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{broken}:")):
        prepare(tokenizer, train=str(broken))
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(two_lists))):
        prepare(tokenizer, train=str(two_lists))


def test_every_row_bad_is_a_data_error_even_when_skipping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "allbad.jsonl", [conversation("Hi.", "")] * 3)
    with pytest.raises(DataError, match="no usable training rows"):
        prepare(tokenizer, train=str(path), on_error="skip")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_not_a_crash(tmp_path, tokenizer, suffix):
    """Nesting json.loads accepts (600 levels) must not overflow the stack further on."""
    deep = json.loads("[" * 600 + "]" * 600)
    rows = [*chat_rows(2), {**conversation("Nested?", "Yes."), "extra": deep}, *chat_rows(2, offset=2)]
    path = tmp_path / f"deep{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    try:  # kept as metadata, or refused as a bad row naming its line: both are fine, a crash is not
        prepare(tokenizer, train=str(path), eval_split=0)
    except DataError as error:
        assert str(error).startswith(f"{path}:3: "), str(error)
    data = prepare(tokenizer, train=str(path), eval_split=0, on_error="skip")
    assert data.audit["splits"]["train"]["rows"] >= 4


def test_a_lone_surrogate_escape_is_a_bad_row_not_a_crash(tmp_path, tokenizer):
    """JSON may hold "\\ud83d" (half an emoji, e.g. from text cut by a JavaScript tool): not valid text."""
    bad = (
        b'{"messages": [{"role": "user", "content": "Smile \\ud83d please"}, {"role": "assistant", "content": "OK."}]}'
    )
    path = write_with_bad_line(tmp_path / "surrogate.jsonl", bad)
    with pytest.raises(DataError) as error:
        prepare(tokenizer, train=str(path), eval_split=0)
    assert str(error.value).startswith(f"{path}:3: "), str(error.value)
    data = prepare(tokenizer, train=str(path), eval_split=0, on_error="skip")
    assert data.audit["splits"]["train"]["rows"] == 4
    assert [(p["file"], p["line"]) for p in data.audit["problems"]] == [(str(path), 3)]


@pytest.mark.parametrize("kind", ["save_to_disk", "dataset_repository"])
def test_max_example_chars_applies_to_every_source_kind(tmp_path, tokenizer, hf_datasets_cache, kind):
    """data.max_example_chars: "Rows with more text than this are bad rows" — not only in plain files."""
    import datasets

    rows = [{"text": f"short row {i}"} for i in range(3)] + [{"text": "long " * 40}]
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        path, label = tmp_path / "saved", str(tmp_path / "saved")
    else:
        path = tmp_path / "repo"
        path.mkdir()
        write_jsonl(path / "train.jsonl", rows)
        label = f"{path}[train]"
    with pytest.raises(DataError, match=re.escape(f"{label}:4: ")):
        prepare(tokenizer, train=str(path), eval_split=0, max_example_chars=100)
    data = prepare(tokenizer, train=str(path), eval_split=0, max_example_chars=100, on_error="skip")
    assert data.audit["splits"]["train"]["rows"] == 3
    assert [(p["file"], p["line"]) for p in data.audit["problems"]] == [(label, 4)]


# =========================================================================== 5. property-based: only DataError

KNOWN_KEYS = [
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "text",
    "question",
    "answer",
    "tools",
    "role",
    "content",
]
scalars = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
roles = (
    st.sampled_from(
        ["system", "user", "assistant", "tool", "human", "gpt", "function_call", "observation", "narrator", "", "USER"]
    )
    | scalars
)
content_parts = st.lists(
    st.text(max_size=8)
    | st.integers()
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "image_url", "audio"])},
        optional={"text": scalars, "url": st.text(max_size=5)},
    ),
    max_size=3,
)
contents = (
    st.text(max_size=16)
    | st.just("   ")
    | st.none()
    | st.integers()
    | content_parts
    | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
)
tool_calls = (
    st.none()
    | st.text(max_size=4)
    | st.integers()
    | st.booleans()
    | st.lists(json_values, max_size=2)
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.just("function")},
            optional={
                "function": st.fixed_dictionaries({}, optional={"name": scalars, "arguments": json_values})
                | json_values,
                "id": scalars,
            },
        ),
        max_size=2,
    )
)
turns = st.fixed_dictionaries(
    {},
    optional={
        "role": roles,
        "content": contents,
        "from": roles,
        "value": contents,
        "tool_calls": tool_calls,
        "name": scalars,
        "tool_call_id": scalars,
    },
)


def plausible_turn(role: str):
    """Mostly a valid turn, sometimes with one field of a random shape: reaches rendering and tokenizing."""
    return st.fixed_dictionaries(
        {
            "role": st.one_of(st.just(role), st.just(role), st.just(role), roles),
            "content": st.one_of(st.text(min_size=1, max_size=16), st.text(min_size=1, max_size=16), contents),
        },
        optional={"tool_calls": tool_calls, "name": scalars, "tool_call_id": scalars},
    )


plausible_conversations = st.lists(
    st.tuples(plausible_turn("user"), plausible_turn("assistant")), min_size=1, max_size=3
).map(lambda pairs: [turn for pair in pairs for turn in pair])
conversations = st.lists(turns, max_size=6) | plausible_conversations | json_values
records = st.fixed_dictionaries(
    {"messages": plausible_conversations},
    optional={
        "tools": st.none() | st.lists(json_values, max_size=2),
        "id": json_values,
    },
) | st.fixed_dictionaries(
    {},
    optional={
        "messages": conversations,
        "conversations": conversations,
        "prompt": conversations | st.text(max_size=10),
        "completion": conversations | st.text(max_size=10),
        "instruction": scalars,
        "input": scalars,
        "output": scalars,
        "system": scalars,
        "text": scalars,
        "question": scalars,
        "answer": scalars,
        "tools": st.none() | st.lists(json_values, max_size=2) | json_values,
        "id": json_values,
    },
)


@st.composite
def options(draw) -> dict:
    """Data options; mostly format detection, so that rows get as far as rendering and tokenizing."""
    fmt = draw(st.sampled_from([None, None, None, *FORMATS]))
    template = "Q: {question}\nA: {answer}" if fmt == "template" or draw(st.integers(0, 9)) == 0 else None
    return {
        "on_error": draw(st.sampled_from(["fail", "skip"])),
        "format": fmt,
        "template": template,
        "eval_split": draw(st.sampled_from([0, 0.5])),
    }


FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def only_data_errors(tokenizer, path: Path, **data) -> None:
    """prepare_data either succeeds with a coherent audit or raises DataError; anything else is a bug."""
    try:
        prepared = prepare(tokenizer, train=str(path), **data)
    except DataError as error:
        assert str(error).strip()
        event("DataError")
        return
    event("prepared")
    audit = prepared.audit
    json.dumps(audit)  # `sftlab check --json` writes it
    assert audit["splits"]["train"]["rows"] == len(prepared.train) > 0
    for problem in audit["problems"]:
        assert problem["file"] == str(path) and problem["line"] >= 1 and problem["message"]


@FUZZ
@given(lines=st.lists(json_values, min_size=1, max_size=6), good=st.integers(0, 2), opts=options())
def test_random_json_values_only_ever_raise_data_error(tokenizer, fuzz_dir, lines, good, opts):
    path = fuzz_dir / "values.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [*lines, *chat_rows(good)]), encoding="utf-8")
    only_data_errors(tokenizer, path, **opts)


@FUZZ
@given(
    chunks=st.lists(
        st.binary(max_size=40)
        | st.sampled_from(GOOD_LINES)
        | st.sampled_from(
            [b'{"messages": [', b'{"text": "\xff"}', b"\xef\xbb\xbf", b"\r", b"{}", b"null", b'{"text": ""}']
        ),
        min_size=1,
        max_size=8,
    ),
    opts=options(),
)
def test_random_bytes_lines_only_ever_raise_data_error(tokenizer, fuzz_dir, chunks, opts):
    path = fuzz_dir / "bytes.jsonl"
    path.write_bytes(b"\n".join(chunks))
    only_data_errors(tokenizer, path, **opts)


@FUZZ
@given(rows=st.lists(records, min_size=1, max_size=5), good=st.integers(0, 2), opts=options())
def test_random_records_with_messages_of_random_shapes_only_ever_raise_data_error(
    tokenizer, fuzz_dir, rows, good, opts
):
    path = fuzz_dir / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, *chat_rows(good)]), encoding="utf-8")
    only_data_errors(tokenizer, path, **opts)


@st.composite
def perturbed_conversations(draw) -> list[dict]:
    """Valid conversations (with tool turns) where a few fields get a random shape: the rows that get furthest."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Use the tools."},
                {"role": "user", "content": f"Add {i} and {i}."},
                {
                    "role": "assistant",
                    "content": "Calling add.",
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": i, "b": i}}}],
                },
                {"role": "tool", "content": str(2 * i), "tool_call_id": "call-1"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(draw(st.integers(1, 3)))
    ]
    for _ in range(draw(st.integers(1, 3))):
        row = draw(st.sampled_from(rows))
        if draw(st.booleans()):
            row[draw(st.sampled_from(["tools", "messages", "id"]))] = draw(json_values | tool_calls)
            continue
        if not isinstance(row.get("messages"), list) or not row["messages"]:
            continue
        turn = draw(st.sampled_from(row["messages"]))
        if isinstance(turn, dict):
            key = draw(st.sampled_from(["role", "content", "tool_calls", "name", "tool_call_id"]))
            turn[key] = draw(scalars | tool_calls | contents | roles)
    return rows


@FUZZ
@given(rows=perturbed_conversations(), on_error=st.sampled_from(["fail", "skip"]))
def test_perturbed_conversations_only_ever_raise_data_error(tokenizer, fuzz_dir, rows, on_error):
    path = fuzz_dir / "perturbed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    only_data_errors(tokenizer, path, on_error=on_error, eval_split=0)


# =========================================================================== 6. the check command's exit code


def test_check_exits_2_when_nothing_would_be_trained(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    config = tiny_config_file(tmp_path / "c.yaml", tiny_model, train, training={"max_length": 4})
    result = sftlab_subprocess("check", config, "--json", tmp_path / "audit.json", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "training cannot go ahead" in result.stdout
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] is False and audit["errors"]
    assert audit["truncation"]["max_length"] == 4
    assert audit["truncation"]["examples_emptied"] == audit["splits"]["train"]["rows"]
