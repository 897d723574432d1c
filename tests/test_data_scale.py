"""The data stage at scale: compressed files, worker processes, bounded memory, the cache.

Memory is measured in a subprocess (a fresh interpreter, so nothing earlier tests left on
the heap counts): tracemalloc's peak of the Python heap (numpy's buffers included) while
preparing N and then 4N generated conversations. Holding the rows' tokens in Python lists
(what sftlab did before it streamed through Arrow) grows about 4x; streaming stays nearly
flat. Nothing here times anything.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from bisect import bisect_left
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import chat_rows, write_jsonl
from sftlab.config import DataConfig, ModelConfig
from sftlab.data import ExampleSequence, prepare_data
from sftlab.errors import DataError
from sftlab.model import load_tokenizer

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))


def trained_texts(tokenizer, dataset) -> list[str]:
    return [tokenizer.decode([t for t, bit in zip(row["input_ids"], row["assistant_masks"]) if bit]) for row in dataset]


def compress(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    if kind == "gz":
        target = path.with_name(path.name + ".gz")
        target.write_bytes(gzip.compress(data))
    else:
        import zstandard

        target = path.with_name(path.name + ".zst")
        target.write_bytes(zstandard.ZstdCompressor().compress(data))
    path.unlink()
    return target


def plain_file(directory: Path, suffix: str) -> Path:
    path = directory / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, chat_rows(6))
    elif suffix == ".json":
        path.write_text(json.dumps(chat_rows(6)), encoding="utf-8")
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        lines = [delimiter.join(["instruction", "input", "output"])]
        lines += [delimiter.join([f"What is {i} plus {i}?", "", f"{i} plus {i} is {2 * i}."]) for i in range(6)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# =========================================================================== compressed files


@pytest.mark.parametrize("compression", ["gz", "zst"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_a_compressed_file_loads_like_its_plain_form(tmp_path, tokenizer, suffix, compression):
    plain = prepare_data(DataConfig(train=str(plain_file(tmp_path, suffix)), eval_split=0), tokenizer)
    (tmp_path / "c").mkdir()
    path = compress(plain_file(tmp_path / "c", suffix), compression)
    packed = prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer)
    assert trained_texts(tokenizer, packed.train) == trained_texts(tokenizer, plain.train)
    assert packed.train["input_ids"] == plain.train["input_ids"]
    fmt = "messages" if suffix.startswith(".json") else "alpaca"
    assert packed.audit["formats"] == {str(path): fmt}
    assert packed.audit["sources"][str(path)] == {"rows": 6, "usable": 6}
    first_line = 2 if fmt == "alpaca" else 1  # a header line comes first
    assert (packed.audit["examples"][0]["source"], packed.audit["examples"][0]["line"]) == (str(path), first_line)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_bad_line_in_a_compressed_file_is_named_with_file_and_line(tmp_path, tokenizer, compression):
    lines = [json.dumps(row) for row in chat_rows(4)]
    lines.insert(2, '{"messages": [')
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = compress(path, compression)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON")):
        prepare_data(DataConfig(train=str(path)), tokenizer)
    data = prepare_data(DataConfig(train=str(path), on_error="skip", eval_split=0), tokenizer)
    assert data.audit["splits"]["train"]["rows"] == 4
    assert [(p["file"], p["line"]) for p in data.audit["problems"]] == [(str(path), 3)]

    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("instruction,input,output\nq1,,a1\nqu\u00e9,,a2\n".encode("latin-1"))
    csv_path = compress(csv_path, compression)
    with pytest.raises(DataError, match=re.escape(f"{csv_path}:3: invalid UTF-8")):
        prepare_data(DataConfig(train=str(csv_path), eval_split=0), tokenizer)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_a_damaged_compressed_file_is_a_data_error_naming_it(tmp_path, tokenizer, compression):
    path = compress(write_jsonl(tmp_path / "d.jsonl", chat_rows(200)), compression)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut short, as by an interrupted download
    with pytest.raises(DataError, match=re.escape(str(path))):
        prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer)
    parquet = tmp_path / "d.parquet.gz"
    parquet.write_bytes(b"not really")
    with pytest.raises(DataError, match="unsupported file type .parquet.gz"):
        prepare_data(DataConfig(train=str(parquet)), tokenizer)


# =========================================================================== worker processes


def varied_rows(count: int) -> list[dict]:
    """Conversations of one to three exchanges, some with a system prompt."""
    rows = []
    for i in range(count):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for turn in range(1 + i % 3):
            messages += [
                {"role": "user", "content": f"What is {i} plus {turn}?"},
                {"role": "assistant", "content": f"{i} plus {turn} is {i + turn}. " * (1 + i % 5)},
            ]
        rows.append({"messages": messages, "id": i})
    return rows


def test_worker_processes_prepare_exactly_what_one_process_does(tmp_path, tokenizer, monkeypatch):
    from sftlab.data import prepare

    rows = varied_rows(300)
    rows[7] = {"messages": [{"role": "user", "content": "Hi."}]}  # a bad row, named by its line
    rows[20] = rows[10]  # an exact duplicate
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(path), eval_split=0.1, on_error="skip")
    alone = prepare_data(cfg, tokenizer, max_length=64, cache_dir=tmp_path / "alone")
    calls = []

    def two_processes(self, rows, rows_per_process):
        calls.append(rows)
        return 2

    monkeypatch.setattr(prepare._Preparation, "_processes", two_processes)
    workers = prepare_data(cfg, tokenizer, max_length=64, cache_dir=tmp_path / "workers")
    assert len(calls) == 3  # normalizing, tokenizing train, tokenizing eval: all through datasets.map
    assert workers.train["input_ids"] == alone.train["input_ids"]
    assert workers.train["assistant_masks"] == alone.train["assistant_masks"]
    assert workers.eval["input_ids"] == alone.eval["input_ids"]
    assert list(workers.eval_examples) == list(alone.eval_examples)
    assert workers.train_sample == alone.train_sample
    assert workers.audit == alone.audit
    assert workers.audit["problems"] == [{"file": str(path), "line": 8, "message": "no assistant turn"}]
    assert workers.audit["duplicates"]["exact"] == 1


def test_the_cache_returns_the_same_data_memory_mapped_and_eval_examples_on_demand(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", varied_rows(60))
    cfg = DataConfig(train=str(path), eval_split=0.25)
    first = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    again = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert "cached" not in first.audit and again.audit.pop("cached") is True
    assert again.audit == first.audit
    assert again.train["input_ids"] == first.train["input_ids"]
    assert all(Path(entry["filename"]).is_relative_to(tmp_path / "cache") for entry in again.train.cache_files)
    assert again.train.column_names == ["input_ids", "assistant_masks"]

    examples = again.eval_examples
    assert isinstance(examples, ExampleSequence) and len(examples) == 15 == len(again.eval)
    listed = list(examples)
    assert examples[0] == listed[0] and examples[-1] == listed[-1] and examples[2:5] == listed[2:5]
    assert {example.metadata["id"] for example in listed}.isdisjoint(
        {example.metadata["id"] for example in again.train_sample}
    )
    with pytest.raises(IndexError):
        examples[15]


# =========================================================================== masks, vectorized


def reference_mask(offsets, spans) -> list[int]:
    """The per-token rule, one token at a time (as sftlab computed it before vectorizing)."""
    ends = [end for _, end in spans]
    mask = []
    for start, end in offsets:
        slot = bisect_left(ends, start + 1)
        mask.append(1 if slot < len(spans) and end > spans[slot][0] and end > start else 0)
    return mask


@st.composite
def rows_with_spans(draw):
    length = draw(st.integers(0, 40))
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=8)))
    offsets = [(a, b) for a, b in zip([0, *cuts], [*cuts, length])]
    points = sorted(draw(st.lists(st.integers(0, length), max_size=6, unique=True)))
    spans = [(a, b) for a, b in zip(points[::2], points[1::2]) if b > a]
    return "x" * length, offsets, spans


@settings(max_examples=200, deadline=None)
@given(st.lists(rows_with_spans(), min_size=1, max_size=5))
def test_vectorized_masks_equal_the_per_token_rule(rows):
    from sftlab.data.masks import Rendered, _span_masks

    masks = _span_masks([offsets for _, offsets, _ in rows], [Rendered(text, spans) for text, _, spans in rows])
    assert [mask.tolist() for mask in masks] == [reference_mask(offsets, spans) for _, offsets, spans in rows]


# =========================================================================== bounded memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, tracemalloc
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from conftest import write_jsonl
    from test_data_scale import varied_rows
    from sftlab.config import DataConfig, ModelConfig
    from sftlab.data import prepare_data
    from sftlab.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=sys.argv[1]))
    count = int(sys.argv[3])
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (count // 10, count, 4 * count):  # the first, untraced, pays for lazy imports and caches
            path = write_jsonl(Path(tmp) / f"{rows}.jsonl", varied_rows(rows))
            tracemalloc.start()
            prepared = prepare_data(DataConfig(train=str(path)), tokenizer, cache_dir=Path(tmp) / f"cache-{rows}")
            peaks[rows] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert prepared.audit["splits"]["train"]["rows"] + prepared.audit["splits"]["eval"]["rows"] == rows
    print(json.dumps(peaks))
""")


def test_peak_memory_of_4n_rows_grows_far_less_than_4x(tmp_path, tiny_model):
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT, encoding="utf-8")
    env = {**os.environ, "SFTLAB_DATA_PROCESSES": "1"}  # everything in the measured process
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model), str(Path(__file__).parent), "1000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = {int(rows): peak for rows, peak in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    small, large = peaks[1000], peaks[4000]
    assert large < 1.6 * small, f"Python heap peak {small:,} bytes for 1,000 rows, {large:,} for 4,000"


@pytest.mark.parametrize("name", ["chapter_deepseek_smoltalk.yaml", "chapter_deepseek_smoltalk_lora.yaml"])
def test_the_chapter_examples_read_the_whole_dataset(name):
    from sftlab.config import load_config
    from sftlab.data import source_list

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / name)
    for source in source_list(cfg.data.train) + source_list(cfg.data.eval):
        assert source.path == "HuggingFaceTB/smoltalk" and source.weight is None  # fraction becomes weight
