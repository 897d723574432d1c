"""The command line as a user meets it: subprocesses, exit codes, messages."""

import json
import sys
from pathlib import Path

import pytest

from conftest import sftlab_subprocess

REPO = Path(__file__).resolve().parent.parent


def assert_one_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def test_help_lists_the_commands():
    result = sftlab_subprocess("--help")
    assert result.returncode == 0
    for command in ("init", "check", "train", "demo"):
        assert command in result.stdout


def test_train_with_a_missing_config_exits_2_with_one_message(tmp_path):
    assert_one_clean_error(
        sftlab_subprocess("train", "missing.yaml", cwd=tmp_path), "config file not found: missing.yaml", "hint:"
    )


def test_a_misspelt_key_exits_2_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train: x.jsonl\ntraining:\n  learnin_rate: 1.0e-4\n")
    result = sftlab_subprocess("train", "c.yaml", cwd=tmp_path)
    assert_one_clean_error(result, "c.yaml:4: unknown key training.learnin_rate", "training.learning_rate")


def test_debug_shows_the_traceback(tmp_path):
    result = sftlab_subprocess("--debug", "train", "missing.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_a_model_missing_offline_exits_2(tmp_path, chat_data):
    (tmp_path / "c.yaml").write_text(
        f"model:\n  name_or_path: sftlab-tests/absent\ndata:\n  train: {chat_data['train']}\n"
    )
    assert_one_clean_error(sftlab_subprocess("check", "c.yaml", cwd=tmp_path), "not available offline")


def test_init_then_check_then_train_end_to_end(tmp_path, tiny_config):
    init = sftlab_subprocess("init", tmp_path / "starter.yaml")
    assert init.returncode == 0 and (tmp_path / "starter.yaml").exists()
    assert sftlab_subprocess("init", tmp_path / "starter.yaml").returncode == 2

    check = sftlab_subprocess("check", tiny_config, "--json", tmp_path / "audit.json")
    assert check.returncode == 0, check.stderr
    assert "train 48 rows" in check.stdout
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] is True and audit["splits"]["train"]["rows"] == 48 and audit["splits"]["eval"]["rows"] == 8

    result = sftlab_subprocess("train", tiny_config, "--set", "training.max_steps=4")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "final" / "tokenizer.json").exists()
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    assert "step 4/4" in result.stderr  # progress lines where stderr is not a terminal

    again = sftlab_subprocess("train", tiny_config)
    assert_one_clean_error(again, "already exists", "--resume")


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = readme.split("<!-- test-command -->")[1].split("```")[1].strip().removeprefix("bash").strip()
    assert command in ci


def test_diagnose_reads_a_plain_trl_run_and_an_sftlab_run(tmp_path, tiny_model, chat_data, tiny_config):
    # A run made with TRL alone, no sftlab involved: its trainer_state.json is enough.
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files={"train": str(chat_data["train"]), "test": str(chat_data["eval"])})
    args = SFTConfig(
        output_dir=str(tmp_path / "trl-run"),
        max_steps=8,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=8,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    ).train()
    state = tmp_path / "trl-run" / "checkpoint-8" / "trainer_state.json"

    text = sftlab_subprocess("diagnose", state)
    assert text.returncode == 0, text.stderr
    assert "phase" in text.stdout.lower()
    as_json = sftlab_subprocess("diagnose", state, "--json")
    report = json.loads(as_json.stdout)
    assert report["phase"] in {"initial_sharp_drop", "gradual_stabilization", "converged"}
    for finding in report["findings"]:
        assert set(finding) == {"code", "severity", "steps", "evidence", "advice"}
        assert finding["severity"] in {"info", "warning", "error"}
        assert len(finding["steps"]) == 2 and all(isinstance(step, int) for step in finding["steps"])
        assert isinstance(finding["advice"], list) and isinstance(finding["evidence"], str)

    assert sftlab_subprocess("train", tiny_config).returncode == 0
    run = json.loads(sftlab_subprocess("diagnose", tmp_path / "run", "--json").stdout)
    assert run["phase"] and isinstance(run["findings"], list)
    assert_one_clean_error(sftlab_subprocess("diagnose", tmp_path / "nothing-here"), "nothing-here")


def test_out_of_memory_in_any_command_is_one_message_and_exit_2(monkeypatch, capsys):
    import sftlab.cli

    def out_of_memory():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(sftlab.cli, "app", out_of_memory)
    monkeypatch.setattr(sys, "argv", ["sftlab", "eval", "runs/x"])
    with pytest.raises(SystemExit) as exited:
        sftlab.cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: out of memory" in err and "hint:" in err and "Traceback" not in err

    def other_error():
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(sftlab.cli, "app", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sftlab.cli.main()


def test_the_memorization_threshold_of_a_run_is_read_from_its_config_yaml_and_a_corrupt_one_is_not_fatal(tmp_path):
    from sftlab.cli import _configured_memorization_loss
    from sftlab.config import MonitorConfig

    (tmp_path / "config.yaml").write_text("monitor:\n  memorization_loss: 0.2\n")
    assert _configured_memorization_loss(tmp_path) == 0.2
    for corrupt in ("monitor: [unclosed", "- a list\n", "monitor: 3\n", "monitor:\n  memorization_loss: low\n"):
        (tmp_path / "config.yaml").write_text(corrupt)
        assert _configured_memorization_loss(tmp_path) == MonitorConfig().memorization_loss
