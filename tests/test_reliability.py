"""Reliability: a killed run resumes losing at most save_steps steps, bad set-ups fail before
the first step with a message, and nothing secret or unsafe gets into or out of a run.

The kill-and-resume test runs real `sftlab train` processes and SIGKILLs them. To kill at a
chosen point (mid-step, halfway through writing a checkpoint, just after the Trainer rotated
old checkpoints away) deterministically, the test starts the CLI through a small wrapper that
pauses inside transformers' Trainer at that point and says so in a file; the test then kills
the paused process. sftlab itself has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config_file, write_config
from sftlab.config import load_config
from sftlab.errors import ConfigError, UserError
from sftlab.rundir import (
    COMPLETE_MARKER,
    METRICS_FILE,
    checkpoint_is_complete,
    checkpoint_step,
    discard_incomplete_checkpoints,
    latest_checkpoint,
    read_jsonl,
)
from sftlab.train import _out_of_memory_as_user_error, train

SECRETS = {
    "HF_TOKEN": "hf_sftlabTestSecretTokenDoNotLeak0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_sftlabOtherSecretToken4567",
    "WANDB_API_KEY": "wandb-sftlab-secret-key-89abcdef",
}

# Runs the CLI; pauses (then the test kills it) where SFTLAB_TEST_PAUSE says: "<point>:<step>".
WRAPPER = r"""
import os, sys, time
from pathlib import Path
import transformers.trainer as trainer_module

def pause_here(point, step):
    if os.environ.get("SFTLAB_TEST_PAUSE") == f"{point}:{step}":
        Path(os.environ["SFTLAB_TEST_PAUSED"]).write_text(f"{point}:{step}")
        time.sleep(600)

def pause_after_method(name):
    original = getattr(trainer_module.Trainer, name)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        pause_here(name, self.state.global_step)
        return result
    setattr(trainer_module.Trainer, name, wrapper)

# training_step: the forward and backward of step N+1 are done, its update is not (mid-step).
# _save_optimizer_and_scheduler: checkpoint-N has weights and optimizer, not yet RNG or trainer state.
for name in ("training_step", "_save_optimizer_and_scheduler"):
    pause_after_method(name)

# rotate_checkpoints: checkpoint-N is fully written and older ones deleted; callbacks' on_save has not run.
original_rotate = trainer_module.rotate_checkpoints
def rotate_then_pause(output_dir, *args, **kwargs):
    original_rotate(output_dir, *args, **kwargs)
    steps = [int(p.name.split("-")[-1]) for p in Path(output_dir).glob("checkpoint-*")]
    pause_here("rotate_checkpoints", max(steps))
trainer_module.rotate_checkpoints = rotate_then_pause

sys.argv = ["sftlab", *sys.argv[1:]]
from sftlab.cli import main
main()
"""


def start_sftlab(args: list, pause: str | None, paused_file: Path, cwd: Path) -> subprocess.Popen:
    """The CLI in a subprocess; its output goes to files (a full pipe would block it before its kill point)."""
    env = {
        **os.environ,
        **SECRETS,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SFTLAB_TEST_PAUSED": str(paused_file),
    }
    env.pop("SFTLAB_TEST_PAUSE", None)
    if pause:
        env["SFTLAB_TEST_PAUSE"] = pause
    paused_file.unlink(missing_ok=True)
    with (cwd / "stdout.txt").open("w") as stdout, (cwd / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *map(str, args)], cwd=cwd, env=env, stdout=stdout, stderr=stderr
        )
    process.output = lambda: ((cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text())
    return process


def kill_when_paused(process: subprocess.Popen, paused_file: Path, timeout: float = 300) -> str:
    """Wait until the process pauses at its kill point, SIGKILL it, and return its stderr."""
    deadline = time.monotonic() + timeout
    while not paused_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before its kill point:\n{process.output()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"never reached its kill point:\n{process.output()[1]}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    return process.output()[1]


def logged_steps(run: Path, key: str = "loss") -> list[int]:
    return [record["step"] for record in read_jsonl(run / METRICS_FILE) if key in record]


@pytest.fixture
def kill_config(tmp_path, tiny_model, chat_data) -> Path:
    return tiny_config_file(
        tmp_path / "kill.yaml",
        tiny_model,
        chat_data["train"],
        chat_data["eval"],
        training={
            "max_steps": 10,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 2,
            "save_total_limit": 1,
            "packing": False,
        },
        eval={"baseline": False, "num_prompts": 2, "max_new_tokens": 4},
        monitor={"sample_prompts": 0, "plots": False},
    )


def test_a_run_killed_at_any_point_resumes_losing_at_most_save_steps_and_logs_each_step_once(kill_config, tmp_path):
    run, paused, save_steps = tmp_path / "run", tmp_path / "paused", 2

    # 1. Killed mid-step 4: steps 1-3 are done, checkpoint-2 is the last complete one.
    stderr = kill_when_paused(start_sftlab(["train", kill_config], "training_step:3", paused, tmp_path), paused)
    assert logged_steps(run) == [1, 2, 3], stderr
    assert latest_checkpoint(run).name == "checkpoint-2"
    last_done = 3

    # 2. Resumed, then killed halfway through writing checkpoint-6: it must never be picked.
    process = start_sftlab(["train", kill_config, "--resume"], "_save_optimizer_and_scheduler:6", paused, tmp_path)
    stderr = kill_when_paused(process, paused)
    assert "resuming from checkpoint-2" in stderr
    assert last_done - 2 <= save_steps
    half_written = run / "checkpoint-6"
    assert (half_written / "model.safetensors").exists() and not checkpoint_is_complete(half_written)
    assert latest_checkpoint(run).name == "checkpoint-4"
    last_done = max(logged_steps(run))
    assert last_done == 6

    # 3. Resumed (the half-written checkpoint is discarded), then killed after checkpoint-8 was written
    #    and the older ones rotated away (save_total_limit: 1) but before sftlab's marker went in.
    process = start_sftlab(["train", kill_config, "--resume"], "rotate_checkpoints:8", paused, tmp_path)
    stderr = kill_when_paused(process, paused)
    assert "resuming from checkpoint-4; discarded the incomplete checkpoint-6" in stderr
    assert last_done - 4 <= save_steps
    assert not (run / "checkpoint-8" / COMPLETE_MARKER).exists()
    assert latest_checkpoint(run).name == "checkpoint-8"  # written whole: trainer_state.json is its last file
    last_done = max(logged_steps(run))

    # 4. Resumed to the end.
    process = start_sftlab(["train", kill_config, "--resume"], None, paused, tmp_path)
    process.wait(timeout=600)
    stdout, stderr = process.output()
    assert process.returncode == 0, stderr
    assert "resuming from checkpoint-8" in stderr and last_done - 8 <= save_steps
    assert "trained 10 steps" in stdout

    state = json.loads((run / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert logged_steps(run) == list(range(1, 11))  # each step once: no gap, no duplicate
    assert logged_steps(run, "eval_loss") == [2, 4, 6, 8, 10]
    assert len(logged_steps(run, "train_runtime")) == 1
    assert all(checkpoint_is_complete(p) for p in run.glob("checkpoint-*"))
    assert (run / "final" / "model.safetensors").exists()

    # Secrets in the environment of every run appear in no file of the run directory.
    for path in run.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in content, f"{name} found in {path}"


def test_incomplete_checkpoints_are_discarded_and_complete_ones_kept(tmp_path):
    marked, whole, cut, empty = (tmp_path / f"checkpoint-{n}" for n in (2, 4, 6, 8))
    for checkpoint in (marked, whole, cut, empty):
        checkpoint.mkdir()
    (marked / COMPLETE_MARKER).write_text("{}")
    (whole / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (cut / "trainer_state.json").write_text(json.dumps({"global_step": 6})[:10])  # killed mid-write
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint: left alone
    assert latest_checkpoint(tmp_path) == whole
    assert sorted(p.name for p in discard_incomplete_checkpoints(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-notes"]
    assert checkpoint_step(whole) == 4


# =========================================================================== divergence


def test_a_nan_loss_after_good_steps_stops_at_once_and_final_is_the_last_good_checkpoint(tiny_config, monkeypatch):
    # The loss of step 5 becomes NaN, as in a diverging run; it flows through the real backward,
    # gradient clipping and optimizer step. (A huge learning rate diverges at step 2, before any
    # checkpoint: tests/test_monitor.py.)
    from safetensors.torch import load_file
    from trl import SFTTrainer

    compute_loss = SFTTrainer.compute_loss

    def diverging(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        if self.model.training and self.state.global_step == 4:  # training step 5, not an evaluation
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", diverging)
    result = train(
        load_config(
            tiny_config,
            ["training.max_steps=8", "training.save_steps=2", "training.eval_steps=2", "training.logging_steps=1"],
        )
    )
    assert result.stopped["reason"] == "instability" and result.stopped["step"] == 5, result.stopped
    run = result.run_dir
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # nothing after the NaN
    final, last_good = (
        load_file(result.final_dir / "model.safetensors"),
        load_file(run / "checkpoint-4" / "model.safetensors"),
    )
    assert all(t.isfinite().all() for t in final.values())
    assert all(torch.equal(final[name], last_good[name]) for name in last_good)
    findings = json.loads((run / "diagnosis.json").read_text())["findings"]
    assert any(f["code"] == "instability" and f["severity"] == "error" for f in findings)


# =========================================================================== out of memory


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("CUDA error: out of memory"),
        lambda: RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
        ),
        lambda: MemoryError(),
    ],
    ids=["cuda", "cuda-runtime-error", "cpu-allocator", "host"],
)
def test_out_of_memory_becomes_a_user_error_with_the_four_remedies(error):
    args = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_length=1024)
    with pytest.raises(UserError, match="out of memory during training") as caught:
        with _out_of_memory_as_user_error(args):
            raise error()
    hint = caught.value.hint
    assert "per_device_train_batch_size: 4 with gradient_accumulation_steps: 4" in hint
    assert "max_length: 512" in hint and "activation_checkpointing: true" in hint and "`lora:`" in hint


def test_out_of_memory_in_evaluation_names_the_evaluation_settings(tiny_config):
    from sftlab.config import load_config
    from sftlab.train import evaluation_out_of_memory_hint

    hint = evaluation_out_of_memory_hint(load_config(tiny_config))
    with pytest.raises(UserError, match="out of memory during evaluation") as caught:
        with _out_of_memory_as_user_error(during="evaluation", hint=hint):
            raise MemoryError()
    assert "eval.generation_batch_size (now 32)" in caught.value.hint and "eval.baseline: false" in caught.value.hint


def test_other_errors_pass_through_untouched():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with _out_of_memory_as_user_error():
            raise RuntimeError("shape mismatch")


# =========================================================================== before the first step


def test_a_disk_too_small_for_the_checkpoints_stops_the_run_before_the_first_step(tiny_config, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr("sftlab.train.shutil.disk_usage", lambda path: real(path)._replace(free=100_000))
    cfg = load_config(tiny_config)
    with pytest.raises(UserError, match=r"not enough disk space in .*run: the run needs about .* is free") as caught:
        train(cfg)
    assert "save_total_limit" in caught.value.hint and "lora" in caught.value.hint
    assert not list(cfg.output_dir.glob("checkpoint-*")) and not (cfg.output_dir / METRICS_FILE).exists()


def test_an_output_dir_that_cannot_be_created_is_a_user_error(tiny_config, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot create the run directory"):
        train(load_config(tiny_config, [f"training.output_dir={tmp_path / 'a-file' / 'run'}"]))


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            ["training.load_best_model_at_end=true", "training.eval_steps=3", "training.save_steps=4"],
            r"load_best_model_at_end needs save_steps \(4\) to be a multiple of eval_steps \(3\)",
        ),
        (
            ["training.load_best_model_at_end=true", "training.save_strategy=epoch"],
            r"load_best_model_at_end needs eval_strategy and save_strategy to match",
        ),
        (
            ["data.eval=null", "data.eval_split=0", "training.eval_strategy=steps"],
            r"training.eval_strategy: steps needs eval data, but data.eval is not set and data.eval_split is 0",
        ),
        (
            ["data.eval=null", "data.eval_split=0", "monitor.stop_on=[overfitting]"],
            r"monitor.stop_on: overfitting needs eval data",
        ),
        (["training.output_dir=null"], r"training.output_dir must name a directory"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_when_the_config_loads(tiny_config, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config, settings)


def test_load_best_model_at_end_with_no_eval_rows_left_is_refused_before_the_model_loads(tmp_path, tiny_model):
    from conftest import chat_rows, write_jsonl

    train_file = write_jsonl(tmp_path / "one.jsonl", chat_rows(1))  # eval_split of one row leaves none
    config = write_config(
        tmp_path / "c.yaml",
        f"""
model:
  name_or_path: {tiny_model}
data:
  train: {train_file}
training:
  output_dir: {tmp_path / "run"}
  load_best_model_at_end: true
  max_steps: 2
""",
    )
    with pytest.raises(ConfigError, match="load_best_model_at_end needs eval data, but the data has no eval rows"):
        train(load_config(config))


def test_cadences_that_never_fire_are_warned_about(tiny_config):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=300)
    train(load_config(tiny_config, ["training.max_steps=2", "training.logging_steps=5"]), console=console)
    text = console.file.getvalue()
    assert "save_steps 3 is not below the run's 2 steps" in text
    assert "eval_steps 3 is not below the run's 2 steps" in text
    assert "logging_steps 5 is more than the run's 2 steps" in text


# =========================================================================== safe by default


def test_a_model_with_only_pickle_weights_is_refused_with_exit_2(tmp_path, tiny_model, chat_data):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    config = write_config(
        tmp_path / "c.yaml",
        f"""
model:
  name_or_path: {pickled}
data:
  train: {chat_data["train"]}
training:
  output_dir: {tmp_path / "run"}
  max_steps: 2
""",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "has weights only as pickle files (pytorch_model.bin)" in result.stderr and "safetensors only" in result.stderr
    )


def test_trust_remote_code_is_off_unless_the_model_section_turns_it_on(tiny_config):
    cfg = load_config(tiny_config)
    assert cfg.model.trust_remote_code is False
    assert load_config(tiny_config, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    with pytest.raises(ConfigError, match="set this in model.trust_remote_code"):
        load_config(tiny_config, ["training.trust_remote_code=true"])


def test_a_token_in_the_config_file_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="training.hub_token: set this in the HF_TOKEN environment variable"):
        load_config(tiny_config, ["training.hub_token=hf_abc"])


def test_save_safetensors_false_is_refused(tiny_config):
    # transformers 5 always writes safetensors; the old switch is not a key sftlab accepts.
    with pytest.raises(ConfigError, match="unknown key training.save_safetensors"):
        load_config(tiny_config, ["training.save_safetensors=false"])
