"""Monitoring: metrics, TensorBoard, plots, samples during training, early stops."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config_file, write_jsonl
from sftlab.config import FormatSpec, load_config
from sftlab.generation import follows_format
from sftlab.rundir import METRICS_FILE, read_jsonl
from sftlab.rundir import TRAINING_SAMPLES_FILE as SAMPLES_FILE
from sftlab.train import train


def test_a_run_logs_throughput_tensorboard_plots_samples_and_diagnosis(tiny_config, tmp_path):
    result = train(load_config(tiny_config, ["training.max_steps=6", "eval.format={type: regex, pattern: '.*plus.*'}"]))
    run = result.run_dir
    records = read_jsonl(run / METRICS_FILE)
    train_logs = [r for r in records if "loss" in r]
    assert all(r["trained_tokens"] > 0 and "num_tokens" in r for r in train_logs)
    assert all(r["tokens_per_second"] > 0 for r in train_logs[1:])
    assert train_logs[-1]["trained_tokens"] > train_logs[0]["trained_tokens"]
    assert list(run.glob("runs/*/events.out.tfevents.*")), "TensorBoard is the default report_to"
    for name in ("loss.png", "learning_rate.png", "grad_norm.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
    samples = read_jsonl(run / SAMPLES_FILE)
    assert {s["step"] for s in samples} == {3, 6} and len(samples) == 8  # 4 prompts at each evaluation
    assert all(isinstance(s["ends_with_end_of_turn"], bool) and isinstance(s["follows_format"], bool) for s in samples)
    assert all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["phase"] and isinstance(diagnosis["findings"], list)


@pytest.mark.parametrize(
    "spec, text, expected",
    [
        ({"type": "json"}, '{"a": 1}', True),
        ({"type": "json"}, 'Here: {"a": 1}', False),
        ({"type": "json_schema", "schema": {"type": "object", "required": ["name"]}}, '{"name": "x"}', True),
        ({"type": "json_schema", "schema": {"type": "object", "required": ["name"]}}, '{"age": 3}', False),
        ({"type": "regex", "pattern": r"\d+ apples"}, "12 apples", True),
        ({"type": "regex", "pattern": r"\d+ apples"}, "12 apples and pears", False),
        ({"type": "prefix", "text": "Answer:"}, "Answer: yes", True),
        ({"type": "contains", "text": "yes"}, "no", False),
    ],
)
def test_format_specs(spec, text, expected):
    assert follows_format(text, FormatSpec(**spec)) is expected
    assert follows_format(text, None) is None


def test_a_nan_stops_the_run_at_once_and_keeps_the_last_good_checkpoint(tiny_config):
    cfg = load_config(
        tiny_config,
        [
            "training.max_steps=12",
            "training.save_steps=2",
            "training.eval_steps=2",
            "training.learning_rate=1.0e+12",
            "training.warmup_ratio=0",
            "training.lr_scheduler_type=constant",
            "training.max_grad_norm=1.0e+12",
        ],
    )
    result = train(cfg)
    assert result.stopped["reason"] == "instability"
    assert result.global_step < 12
    run = result.run_dir
    from safetensors.torch import load_file

    for checkpoint in run.glob("checkpoint-*"):  # nothing non-finite was ever saved
        weights = load_file(checkpoint / "model.safetensors")
        assert all(t.isfinite().all() for t in weights.values()), checkpoint
    if result.final_dir.exists():
        weights = load_file(result.final_dir / "model.safetensors")
        assert all(t.isfinite().all() for t in weights.values())
    diagnosis = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "diagnose", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    codes = {f["code"]: f["severity"] for f in json.loads(diagnosis.stdout)["findings"]}
    assert codes.get("instability") == "error"


def overfitting_config(tmp_path, tiny_model, stop_on: list[str]) -> Path:
    rng = random.Random(0)

    def nonsense():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(60))

    def rows(count):
        return [
            {"messages": [{"role": "user", "content": f"Say code {i}."}, {"role": "assistant", "content": nonsense()}]}
            for i in range(count)
        ]

    train_file, eval_file = write_jsonl(tmp_path / "t.jsonl", rows(8)), write_jsonl(tmp_path / "e.jsonl", rows(8))
    return tiny_config_file(
        tmp_path / "overfit.yaml",
        tiny_model,
        train_file,
        eval_file,
        training={
            "output_dir": tmp_path / "overfit-run",
            "max_steps": 120,
            "learning_rate": 3.0e-3,
            "warmup_ratio": 0,
            "lr_scheduler_type": "constant",
            "eval_steps": 4,
            "save_steps": 4,
            "max_length": None,
            "packing": False,
        },
        monitor={"stop_on": stop_on, "sample_prompts": 0},
    )


def test_stop_on_overfitting_stops_early_keeps_the_best_checkpoint_and_says_why(tmp_path, tiny_model):
    result = train(load_config(overfitting_config(tmp_path, tiny_model, ["overfitting"])))
    assert result.stopped is not None and result.stopped["reason"] == "overfitting", result.stopped
    assert result.global_step < 120
    assert "eval loss" in result.stopped["evidence"]
    best = json.loads((result.run_dir / "best_checkpoint.json").read_text())
    eval_losses = [r["eval_loss"] for r in read_jsonl(result.run_dir / METRICS_FILE) if "eval_loss" in r]
    assert best["eval_loss"] == min(eval_losses)
    # final/ holds the best checkpoint's weights, not the overfit ones
    from safetensors.torch import load_file

    final = load_file(result.final_dir / "model.safetensors")
    kept = load_file(result.run_dir / best["checkpoint"] / "model.safetensors")
    assert all((final[name] == kept[name]).all() for name in kept)


# ------------------------------------------------------------------- issue 15: the monitor's files, through rundir


def test_stop_records_keep_the_first_reason_and_a_damaged_one_reads_as_none(tmp_path):
    from sftlab.rundir import STOPPED_FILE, read_stop, record_stop

    assert read_stop(tmp_path) is None
    record_stop(tmp_path, "overfitting", 8, "eval loss rose")
    record_stop(tmp_path, "instability", 9, "loss is nan")
    assert read_stop(tmp_path) == {"reason": "overfitting", "step": 8, "evidence": "eval loss rose"}
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / STOPPED_FILE).write_text('{"reason": "overf', encoding="utf-8")  # cut by a kill
    assert read_stop(tmp_path) is None


def test_trim_metrics_drops_what_a_resumed_run_logs_again(tmp_path):
    from sftlab.rundir import trim_metrics

    metrics, samples = tmp_path / METRICS_FILE, tmp_path / SAMPLES_FILE
    metrics.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6))
        + json.dumps({"step": 4, "train_runtime": 1.0})
        + "\n"
        + '{"step": 8, "lo',
        encoding="utf-8",
    )
    samples.write_text(json.dumps({"step": 4, "output": "é"}) + "\n" + json.dumps({"step": 6}) + "\n", encoding="utf-8")
    trim_metrics(metrics, 4)
    assert read_jsonl(metrics) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 1.0}]
    assert read_jsonl(samples) == [{"step": 4, "output": "é"}]


@pytest.mark.parametrize(
    "text, records, reason",
    [
        ('{"a": 1}\n\n{"a": 2', [{"a": 1}], None),  # a last line cut by a kill
        ("", [], None),
        ("[1]\nnot json\n", [], "no JSON object on any line"),
    ],
)
def test_read_jsonl_checked_says_why_a_file_holds_no_record(tmp_path, text, records, reason):
    from sftlab.rundir import read_jsonl_checked

    (tmp_path / "m.jsonl").write_text(text, encoding="utf-8")
    assert read_jsonl_checked(tmp_path / "m.jsonl") == (records, reason)
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe")
    assert read_jsonl_checked(tmp_path / "b.jsonl") == ([], "not UTF-8 text")
    assert read_jsonl_checked(tmp_path / "missing.jsonl") == ([], None)


def test_plots_are_written_whole_with_the_findings_shaded(tmp_path):
    from sftlab.diagnose import diagnose
    from sftlab.plots import plot_curves

    records = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0} for s in range(1, 30)]
    records += [{"step": s, "eval_loss": 1.0 + s / 10} for s in (5, 10, 15, 20, 25)]
    written = plot_curves(tmp_path, records, diagnose(records))
    assert sorted(path.name for path in written) == ["grad_norm.png", "learning_rate.png", "loss.png"]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in written)
    assert not list(tmp_path.glob("*.tmp"))
