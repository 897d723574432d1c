"""Report: the model card and report.html, from complete, stopped, killed and damaged run directories."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import chat_rows, sftlab_in_process, tiny_config_file, write_jsonl
from sftlab.config import load_config
from sftlab.errors import UserError
from sftlab.report import model_card, read_run, render_html, run_status, write_report, write_run_info
from sftlab.rundir import RUN_INFO_FILE

SECTIONS = (
    "## Summary",
    "## Dataset characteristics",
    "## Training parameters",
    "## Results before and after",
    "## Warning signs during training",
    "## Known limitations",
    "## How to use",
    "## Framework versions",
)
SCRIPT = "<script>alert(1)</script>"


# --------------------------------------------------------------------------- fake run directories


def eval_result(label: str, loss: float, format_share: float | None, retention: float, verbatim: float = 0.0) -> dict:
    return {
        "model": "m",
        "label": label,
        "step": None,
        "num_prompts": 20,
        "max_new_tokens": 32,
        "seconds": 4.0,
        "loss": {"loss": loss, "perplexity": math.exp(loss), "tokens": 400},
        "adherence": {
            "chat": 0.95,
            "format": format_share,
            "format_spec": {"type": "json"} if format_share is not None else None,
        },
        "reference": {"exact_match": 0.1, "rougeL": 0.42},
        "diversity": {"distinct_1": 0.5, "distinct_2": 0.7, "duplicate_share": 0.0},
        "memorization": {"verbatim_share": verbatim, "mean_longest_common_ngram": 3.0},
        "retention": {"loss": retention, "perplexity": math.exp(retention), "tokens": 900, "source": "builtin"},
    }


def audit(rows: int = 2000, source: str = "data/train.jsonl", example_text: str = "What is 2 plus 2?") -> dict:
    return {
        "ok": True,
        "splits": {"train": {"rows": rows, "tokens": rows * 40}, "eval": {"rows": 100, "tokens": 4000}},
        "sources": {source: {"rows": rows + 5, "usable": rows + 3}},
        "formats": {source: "messages"},
        "dropped": {"count": 2, "reasons": {"empty response": 2}},
        "problems": [{"file": source, "line": 7, "message": f"empty response {example_text}"}],
        "duplicates": {
            "exact": 3,
            "near": 1,
            "examples": [{"kind": "exact", "first": f"{source}:1", "again": f"{source}:9"}],
            "leakage": 0,
        },
        "lengths": {
            part: {"min": 5, "median": 20.0, "p95": 40, "max": 90, "mean": 21.5}
            for part in ("prompt", "response", "total")
        },
        "truncation": {
            "max_length": 64,
            "examples_over": 12,
            "tokens_cut": 300,
            "trained_tokens_cut": 120,
            "examples_emptied": 0,
        },
        "trained_token_share": 0.3125,
        "trained_tokens": rows * 12,
        "end_of_turn_untrained": 0,
        "examples": [
            {
                "source": source,
                "line": 1,
                "segments": [
                    {"text": f"<|im_start|>user\n{example_text}<|im_end|>\n", "trained": False},
                    {"text": "4.<|im_end|>", "trained": True},
                ],
            }
        ],
        "warnings": [f"12 examples exceed max_length 64 in {source}"],
        "errors": [],
    }


def metrics(steps: int, finished: bool = True, epochs_per_step: float = 0.02) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append(
            {
                "step": step,
                "epoch": step * epochs_per_step,
                "loss": 2.0 * 0.99**step,
                "grad_norm": 1.0,
                "learning_rate": 1e-4,
                "num_tokens": 500.0 * step,
                "trained_tokens": 150 * step,
                "tokens_per_second": 1000.0 + step,
            }
        )
        if step % 10 == 0:
            records.append({"step": step, "epoch": step * epochs_per_step, "eval_loss": 2.1 * 0.99**step})
    if finished:
        records.append({"step": steps, "epoch": steps * epochs_per_step, "train_runtime": 125.5, "train_loss": 1.5})
    return records


def make_run(
    root: Path,
    *,
    steps: int = 100,
    finished: bool = True,
    final: bool = True,
    lora: bool = False,
    base: str = "org/base-model",
    train_source="data/train.jsonl",
    audit_data: dict | None = None,
    before: dict | None = None,
    after: dict | None = None,
    samples: list[dict] | None = None,
    stopped: dict | None = None,
    epochs_per_step: float = 0.02,
) -> Path:
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    config = {
        "model": {"name_or_path": base, "gguf_file": None},
        "data": {"train": train_source, "eval": None},
        "training": {
            "output_dir": str(run),
            "max_steps": steps,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-4,
            "warmup_ratio": 0.1,
            "max_length": 64,
            "seed": 42,
            "num_train_epochs": 3,
        },
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"} if lora else None,
        "eval": {"baseline": True, "num_prompts": 20, "max_new_tokens": 32, "format": None},
        "monitor": {"plots": True, "stop_on": [], "memorization_loss": 0.05},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (run / RUN_INFO_FILE).write_text(
        json.dumps(
            {
                "started_at": "2026-01-01T10:00:00+00:00",
                "hardware": {"device": "cpu", "cpu_count": 2, "processes": 1},
                "precision": "fp32",
                "versions": {"python": "3.11.7", "torch": "9.9.9-recorded"},
                "training_args": {"learning_rate": 1e-4, "lr_scheduler_type": "linear", "max_steps": steps},
                "plan": {"steps": steps},
            }
        )
    )
    (run / "eval" / "audit.json").write_text(json.dumps(audit_data or audit()), encoding="utf-8")
    write_jsonl(run / "metrics.jsonl", metrics(steps, finished, epochs_per_step))
    for name, value in (("before.json", before), ("after.json", after)):
        if value is not None:
            (run / "eval" / name).write_text(json.dumps(value), encoding="utf-8")
    if samples is not None:
        write_jsonl(run / "eval" / "samples.jsonl", samples)
    if stopped is not None:
        (run / "stopped.json").write_text(json.dumps(stopped), encoding="utf-8")
    if final:
        (run / "final").mkdir()
        (run / "final" / ("adapter_config.json" if lora else "config.json")).write_text("{}")
    return run


def good_run(tmp_path, **kwargs) -> Path:
    kwargs.setdefault("before", eval_result("before", 2.5, 0.2, 3.0))
    kwargs.setdefault("after", eval_result("after", 1.2, 0.95, 3.05))
    kwargs.setdefault(
        "samples",
        [
            {
                "prompt": "p",
                "reference": "r",
                "base_output": "b",
                "tuned_output": "t",
                "base_follows_format": False,
                "tuned_follows_format": True,
            }
        ],
    )
    return make_run(tmp_path, **kwargs)


def front_matter(card: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?\n)---\n", card, flags=re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1)), card[match.end() :]


def external_resources(html: str) -> list[str]:
    """Anything that would load over the network (in tags and styles, not in escaped text), or any script."""
    found = []
    for tag in re.findall(r"<[^>]*>", html):
        found += re.findall(
            r"""(?:src|href|action|srcset)\s*=\s*["']?\s*((?:[a-z]+:)?//[^"'\s>]*)""", tag, flags=re.IGNORECASE
        )
        found += re.findall(r"^<(?:script|link|iframe|object|embed|base)\b", tag, flags=re.IGNORECASE)
    for style in re.findall(r"<style[^>]*>(.*?)</style>", html, flags=re.DOTALL | re.IGNORECASE):
        found += re.findall(r"url\(|@import", style, flags=re.IGNORECASE)
    return found


# --------------------------------------------------------------------------- the card


def test_the_card_has_front_matter_every_section_and_the_runs_numbers(tmp_path):
    run = good_run(tmp_path)
    result = write_report(run)
    card = (run / "final" / "README.md").read_text(encoding="utf-8")
    assert result.card == run / "final" / "README.md" and result.status.state == "complete"
    meta, body = front_matter(card)
    assert meta == {
        "base_model": "org/base-model",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sftlab", "trl", "sft"],
    }
    positions = [body.index(section + "\n") for section in SECTIONS]
    assert positions == sorted(positions), "sections in the model card's order"
    for number in (
        "2,000 training examples",
        "31.2% of all tokens",
        "3 exact, 1 near-exact",
        "12 examples longer",
        "| prompt | 5 | 20 | 40 | 90 | 21.5 |",
        "2 min 06 s",
        "15,000 (the response tokens",
        "| held-out loss (trained tokens) | 2.5000 | 1.2000 | -1.3000 (better) |",
        "| format adherence (eval.format) | 20.0% | 95.0% | +75.0 pts (better) |",
        "| learning_rate | 0.0001 |",
        "| effective batch (rows per optimizer step) | 8 |",
        "- torch: 9.9.9-recorded",
        "recorded at training time",
    ):
        assert number in card, number
    assert "Status: complete: trained 100 of 100 steps" in card


def test_known_limitations_come_from_the_measurements(tmp_path):
    run = make_run(
        tmp_path,
        steps=20,
        epochs_per_step=0.02,
        audit_data=audit(rows=300),
        before=eval_result("before", 2.0, 0.5, 3.0),
        after=eval_result("after", 2.1, 0.6, 3.3, verbatim=0.25),
        samples=[{"prompt": "p", "tuned_output": "x", "tuned_follows_format": False}] * 3,
    )
    limitations = model_card(read_run(run, plots=False)).split("## Known limitations")[1].split("## How to use")[0]
    for expected in (
        "Short training: 20 steps, 0.40 epochs",
        "Trained on 300 examples only",
        "in 60.0% of held-out answers (50.0% before fine-tuning); the 3 answers out of format",
        "General-text loss rose from 3.0000 to 3.3000 (+10.0%)",
        "Held-out loss did not improve (2.0000 before, 2.1000 after)",
        "25.0% of held-out answers copy a training response verbatim",
        "12 training examples (4.0%) were longer than max_length 64",
    ):
        assert expected in limitations, expected

    healthy = good_run(
        tmp_path / "healthy",
        steps=200,
        audit_data={**audit(rows=5000), "truncation": {"max_length": 64, "examples_over": 0}},
    )
    limitations = model_card(read_run(healthy, plots=False)).split("## Known limitations")[1].split("## How to use")[0]
    assert not re.search(
        r"Short training|examples only|rose from|did not improve|verbatim|longer than|required format", limitations
    )
    assert "Measured on 20 held-out prompts" in limitations  # always said: the evaluation's reach is limited


def test_a_lora_adapter_card_loads_with_peft_and_the_embedded_model_names_its_hub_id(tmp_path):
    run = good_run(
        tmp_path, lora=True, base="smollm2-135m-instruct", train_source=["HuggingFaceTB/smoltalk", "local.jsonl"]
    )
    card = model_card(read_run(run, plots=False))
    meta, body = front_matter(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["HuggingFaceTB/smoltalk"]
    assert "AutoPeftModelForCausalLM.from_pretrained(model_path)" in body and "LoRA: r=8" in body


def test_a_local_base_model_is_no_hub_base_model_and_its_license_comes_from_its_card(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    meta, body = front_matter(model_card(read_run(good_run(tmp_path, base=str(base)), plots=False)))
    assert "base_model" not in meta and meta["license"] == "mit"
    assert str(base) in body


# --------------------------------------------------------------------------- escaping


def test_data_and_generations_cannot_inject_html_markdown_or_yaml(tmp_path):
    nasty = (
        f"{SCRIPT} ![x](http://evil.example/x.png) <img src=https://evil.example/y.png> | `tick` *em* [l](https://x)"
    )
    source = f"data/{SCRIPT}.jsonl"
    run = good_run(
        tmp_path,
        audit_data=audit(source=source, example_text=nasty),
        base=f"org/{SCRIPT}",
        samples=[
            {
                "prompt": nasty,
                "reference": nasty,
                "base_output": nasty,
                "tuned_output": "</td></table>" + nasty,
                "base_follows_format": False,
                "tuned_follows_format": True,
            }
        ],
        stopped={"reason": "overfitting", "step": 50, "evidence": nasty},
    )
    result = write_report(run)
    html = result.html.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower() and "<img src=https" not in html and "<img src=http" not in html
    assert external_resources(html) == []
    assert (
        "default-src 'none'" in html
    )  # the browser refuses scripts and network loads even if something slipped through
    card = result.card.read_text(encoding="utf-8")
    meta, body = front_matter(card)  # the front matter still parses
    assert meta["tags"] == ["sftlab", "trl", "sft"]
    assert SCRIPT not in body.replace(f"`data/{SCRIPT}.jsonl`", "").replace(f"`org/{SCRIPT}`", ""), (
        "outside code spans, data text is escaped"
    )
    assert "](http" not in body.replace("\\](http", "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "config.yaml",
                "run_info.json",
                "eval/audit.json",
                "eval/before.json",
                "eval/after.json",
                "stopped.json",
                "diagnosis.json",
            ]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "loss",
                            "adherence",
                            "format",
                            "splits",
                            "train",
                            "rows",
                            "sources",
                            "hardware",
                            "versions",
                            "examples",
                            "segments",
                            "truncation",
                            "step",
                            "reason",
                            "model",
                            "name_or_path",
                            "training",
                            "data",
                            "lora",
                            "monitor",
                            "eval",
                            "phase",
                            "code",
                            "advice",
                            "steps",
                        ]
                    )
                    | st.text(max_size=5),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=12,
        ),
    ),
    st.booleans(),
)
@example({"eval/audit.json": {"examples": True}}, True)  # found on a fresh clone: report.py iterated a bool
def test_any_content_in_any_file_gives_a_report_not_a_crash(tmp_path_factory, contents, with_metrics):
    run = make_run(tmp_path_factory.mktemp("fuzz"), steps=12)
    if not with_metrics:  # then diagnosis.json is read instead of recomputed
        (run / "metrics.jsonl").unlink()
    for name, value in contents.items():
        (run / name).write_text(json.dumps(value), encoding="utf-8")
    parsed = read_run(run, plots=False)
    card = model_card(parsed)
    front_matter(card)
    assert "<script" not in render_html(parsed, card).lower()


# The run's files as `sftlab report` finds them, each corrupted (or not) in one of the ways disks, kills and people do.
CORRUPTIBLE = (
    "eval/audit.json",
    "eval/before.json",
    "eval/prompted.json",
    "eval/after.json",
    "eval/verdict.json",
    RUN_INFO_FILE,
    "stopped.json",
    "diagnosis.json",
    "metrics.jsonl",
    "best_checkpoint.json",
    "config.yaml",
)
# Text as files can spell it: any character, one beyond the BMP (JSON writes it as a surrogate pair, which YAML
# reads as two lone surrogates), and a lone surrogate (valid JSON, not encodable as UTF-8).
TEXT = st.text(max_size=8) | st.sampled_from(["\U0001f600", "a\ud800", "\udfff"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
CORRUPTIONS = st.one_of(
    st.tuples(st.just("invalid"), st.text(max_size=30)),  # not JSON (nor YAML) at all, or any text
    st.tuples(st.just("truncated"), st.floats(0, 1)),  # cut by a kill or a full disk
    st.tuples(st.just("wrong_type"), JSON_VALUES),  # the whole file another JSON value
    st.tuples(st.just("wrong_value"), st.integers(0, 10**4), JSON_VALUES),  # one value deep inside replaced
    st.just(("deleted",)),
)


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory) -> Path:
    """A run directory holding every file the report reads, built once from the fixtures above."""
    run = good_run(
        tmp_path_factory.mktemp("complete"), steps=20, stopped={"reason": "overfitting", "step": 18, "evidence": "e"}
    )
    (run / "eval" / "prompted.json").write_text(
        json.dumps({**eval_result("prompted", 2.0, 0.5, 3.0), "prompting": {"shots": 3, "system_prompt": "s"}})
    )
    verdict = {"verdict": "worked", "headline": "worked: h", "primary": "format", "reasons": ["r"], "caveats": ["c"]}
    (run / "eval" / "verdict.json").write_text(json.dumps(verdict))
    (run / "diagnosis.json").write_text(
        json.dumps(
            {
                "phase": "converged",
                "findings": [
                    {"code": "overfitting", "severity": "warning", "steps": [10, 18], "evidence": "e", "advice": ["a"]}
                ],
            }
        )
    )
    (run / "best_checkpoint.json").write_text(json.dumps({"step": 20, "eval_loss": 1.1, "path": "checkpoint-20"}))
    return run


def corrupt(path: Path, corruption: tuple) -> None:
    kind, *how = corruption
    text = path.read_text(encoding="utf-8")
    if kind == "deleted":
        path.unlink()
    elif kind == "invalid":
        path.write_text(how[0], encoding="utf-8")
    elif kind == "truncated":
        path.write_text(text[: int(len(text) * how[0])], encoding="utf-8")
    elif kind == "wrong_type":
        path.write_text(json.dumps(how[0]), encoding="utf-8")
    else:  # wrong_value: one dict value or list item, anywhere in the file, replaced
        jsonl = path.suffix == ".jsonl"
        value = [json.loads(line) for line in text.splitlines()] if jsonl else yaml.safe_load(text)
        places = list(_places(value))
        if places:
            container, key = places[how[0] % len(places)]
            container[key] = how[1]
        path.write_text(
            "".join(json.dumps(line) + "\n" for line in value) if jsonl else json.dumps(value), encoding="utf-8"
        )


def _places(value):
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield value, key
        yield from _places(inner)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(CORRUPTIBLE), CORRUPTIONS, min_size=1))
@example({"eval/audit.json": ("wrong_type", {"\ud800": 1, "splits": {}})})  # a key pydantic refuses (found by it)
@example({"config.yaml": ("wrong_type", {"training": {"seed": "\U0001f600"}})})  # YAML reads it as two lone surrogates
def test_sftlab_report_on_randomly_corrupted_files_exits_0_or_2_without_a_traceback(complete_run, corruptions):
    import shutil
    import tempfile
    from unittest import mock

    with tempfile.TemporaryDirectory() as directory:
        run = Path(shutil.copytree(complete_run, Path(directory) / "run"))
        for name, corruption in corruptions.items():
            corrupt(run / name, corruption)
        # Drawing the curves costs seconds and reads only the numbers among the metrics (monitor._series);
        # the property is about reading the files, so the plots are left out.
        with mock.patch("sftlab.plots.plot_curves", return_value=[]):
            code, out, err = sftlab_in_process("report", run)
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 0:
        assert "wrote " in out and out.rstrip().endswith("report.html")
    else:
        assert err.startswith("error: "), err


# --------------------------------------------------------------------------- incomplete and damaged runs


@pytest.mark.parametrize(
    "keep",
    [
        {"config.yaml"},
        {"config.yaml", "metrics.jsonl"},
        {"metrics.jsonl"},
        {"config.yaml", "eval/after.json", "final"},
        {"config.yaml", "metrics.jsonl", "eval/audit.json", RUN_INFO_FILE},
        {"config.yaml", "metrics.jsonl", "eval/before.json", "eval/after.json", "eval/samples.jsonl", "final"},
    ],
)
def test_any_subset_of_the_run_directory_gives_a_report_that_names_what_is_missing(tmp_path, keep):
    run = good_run(tmp_path, finished=False)
    everything = {
        "config.yaml",
        "metrics.jsonl",
        "eval/audit.json",
        RUN_INFO_FILE,
        "eval/before.json",
        "eval/after.json",
        "eval/samples.jsonl",
        "final",
    }
    for name in everything - keep:
        path = run / name
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
    result = write_report(run)
    html = result.html.read_text(encoding="utf-8")
    assert "incomplete: training did not finish" in html
    for name in everything - keep - {"final"}:
        assert any(item.startswith(name) for item in result.missing), name
        assert name in html
    assert (result.card is not None) == ("final" in keep)
    if "final" not in keep:
        assert "No final model" in html and not (run / "final" / "README.md").exists()


def test_a_run_killed_mid_training_is_reported_incomplete_with_its_last_step(tmp_path):
    run = make_run(tmp_path, steps=200, finished=False, final=False)
    write_jsonl(run / "metrics.jsonl", metrics(200, finished=False)[:40])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 37, "lo')  # the kill cut the last line
    status = run_status(read_run(run, plots=False))
    assert (
        status.state == "incomplete"
        and status.headline == "incomplete: training did not finish (last logged step 37 of 200)"
    )


def test_corrupted_files_are_reported_unreadable(tmp_path):
    run = good_run(tmp_path)
    (run / "eval" / "after.json").write_text("{not json")
    (run / "eval" / "audit.json").write_text("[1, 2]")
    (run / "config.yaml").write_text("model: [unclosed\n")
    (run / "metrics.jsonl").write_text("garbage\nmore garbage\n")
    result = write_report(run)
    assert {item.split(":")[0] for item in result.unreadable} == {
        "eval/after.json",
        "eval/audit.json",
        "config.yaml",
        "metrics.jsonl",
    }
    html = result.html.read_text(encoding="utf-8")
    assert re.search(r"unreadable</b> eval/after\.json: invalid JSON \([^)]*line 1\)", html)
    assert "(unreadable)" in result.card.read_text(encoding="utf-8")


def test_a_directory_that_is_not_a_run_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a run directory"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        write_report(tmp_path / "missing")


def test_run_info_keeps_the_first_start_when_a_run_resumes(tmp_path):
    args = SimpleNamespace(device="cpu", world_size=1, bf16=False, fp16=False, learning_rate=1e-4, max_steps=10)
    first = json.loads(write_run_info(tmp_path, args, {"steps": 10}).read_text())
    second = json.loads(write_run_info(tmp_path, args, {"steps": 10}).read_text())
    assert second["started_at"] == first["started_at"] and len(second["resumed_at"]) == 1
    assert (
        second["training_args"] == {"learning_rate": 1e-4, "max_steps": 10, "world_size": 1}
        and second["versions"]["torch"]
    )


# --------------------------------------------------------------------------- real runs


def script_data(tmp_path: Path) -> tuple[Path, Path]:
    train_rows = chat_rows(48)
    train_rows[0]["messages"][0]["content"] = f"What is 0 plus 0? {SCRIPT}"
    eval_rows = chat_rows(8, offset=1000)
    eval_rows[0]["messages"][0]["content"] = f"What is 1000 plus 1000? {SCRIPT}"
    return write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "eval.jsonl", eval_rows)


def real_config(tmp_path: Path, tiny_model: Path, **training) -> Path:
    train_file, eval_file = script_data(tmp_path)
    return tiny_config_file(
        tmp_path / "config.yaml",
        tiny_model,
        train_file,
        eval_file,
        training=training,
        eval={"num_prompts": 4, "max_new_tokens": 8},
        monitor={"sample_max_new_tokens": 8},
    )


def test_a_trained_run_documents_itself(tmp_path, tiny_model):
    from sftlab.train import train

    result = train(load_config(real_config(tmp_path, tiny_model)))
    run = result.run_dir
    card = (run / "final" / "README.md").read_text(encoding="utf-8")
    meta, body = front_matter(card)
    assert (
        meta["library_name"] == "transformers"
        and meta["pipeline_tag"] == "text-generation"
        and "base_model" not in meta
    )
    for section in SECTIONS:
        assert section + "\n" in body, section

    # The numbers are the run's own, read back from the files it wrote.
    audit_file = json.loads((run / "eval" / "audit.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    run_info = json.loads((run / RUN_INFO_FILE).read_text())
    assert f"on {audit_file['splits']['train']['rows']} training examples" in body
    assert f"({audit_file['trained_token_share']:.1%} of all tokens" in body
    last_trained = [r for r in records if "trained_tokens" in r][-1]["trained_tokens"]
    assert f"Tokens trained: {last_trained:,}" in body
    last_eval = [r for r in records if "eval_loss" in r][-1]
    assert f"Eval loss at the last evaluation (step {last_eval['step']}): {last_eval['eval_loss']:.4f}" in body
    assert "Status: complete: trained 6 of 6 steps" in body and run_info["plan"]["steps"] == 6
    assert f"- torch: {run_info['versions']['torch']}" in body and "recorded at training time" in body
    assert "device cpu" in body
    before, prompted, after = (
        json.loads((run / "eval" / name).read_text()) for name in ("before.json", "prompted.json", "after.json")
    )
    assert (
        f"| held-out loss (trained tokens) | {before['loss']['loss']:.4f} | {prompted['loss']['loss']:.4f} "
        f"| {after['loss']['loss']:.4f} |" in body
    )
    assert (
        f"| chat adherence (ends turn, no leaks) | {before['adherence']['chat']:.1%} "
        f"| {prompted['adherence']['chat']:.1%} | {after['adherence']['chat']:.1%} |" in body
    )

    # The usage snippet runs as written.
    snippet = re.search(r"```python\n(.*?)```", body, flags=re.DOTALL).group(1)
    exec(compile(snippet, "usage-snippet", "exec"), {})  # loads final/, applies the chat template, generates, prints

    html = (run / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and SCRIPT not in html
    assert external_resources(html) == []
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html)) == 3  # loss, learning rate, grad norm


def test_sftlab_report_on_a_run_killed_mid_training_says_it_is_incomplete(tmp_path, tiny_model):
    config = real_config(tmp_path, tiny_model, max_steps=5000, logging_steps=1, eval_steps=10000, save_steps=10000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sftlab.cli", "train", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if metrics_file.exists() and metrics_file.read_text().count("\n") >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be killed"
        assert metrics_file.exists(), "training logged nothing within 5 minutes"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    report = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "report", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    last_step = max(json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.endswith("}"))
    headline = f"incomplete: training did not finish (last logged step {last_step} of 5,000)"
    assert report.stdout.startswith(headline)
    assert "missing: final/" in report.stdout and "no model card file" in report.stdout
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert headline in html and "No final model" in html


def test_sftlab_report_on_a_directory_that_is_not_a_run_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {tmp_path} is not a run directory")


# --------------------------------------------------------------------------- live during training


def test_during_training_the_report_says_so_and_reloads_itself_until_the_final_one(tmp_path):
    from types import SimpleNamespace

    from sftlab.monitor import LiveReport

    run = good_run(tmp_path, finished=False)
    LiveReport(run, write_report).on_evaluate(None, SimpleNamespace(is_world_process_zero=True), None)
    live = (run / "report.html").read_text(encoding="utf-8")
    assert '<meta http-equiv="refresh" content="30">' in live and "Training in progress" in live
    assert not (run / "final" / "README.md").exists()  # the card is written once, at the end
    write_report(run)
    final = (run / "report.html").read_text(encoding="utf-8")
    assert 'http-equiv="refresh"' not in final and "Training in progress" not in final


def test_the_verdict_heads_the_report_and_a_corrupt_verdict_is_named_unreadable(tmp_path):
    run = good_run(tmp_path)
    verdict = {
        "verdict": "prompting_suffices",
        "headline": "prompting_suffices: 90% of answers follow eval.format against 88% for the prompted base model",
        "primary": "format",
        "reasons": ["r1"],
        "caveats": ["c1"],
    }
    (run / "eval" / "verdict.json").write_text(json.dumps(verdict), encoding="utf-8")
    result = write_report(run)
    html = result.html.read_text(encoding="utf-8")
    assert html.index('class="verdict prompting_suffices"') < html.index('id="data"')
    assert "**Verdict: prompting_suffices: 90% of answers" in result.card.read_text(encoding="utf-8")
    (run / "eval" / "verdict.json").write_text(json.dumps({"verdict": "great", "headline": 3}), encoding="utf-8")
    result = write_report(run)
    assert any("verdict.json" in item for item in result.unreadable)
    assert 'class="verdict' not in result.html.read_text(encoding="utf-8")
