"""Several processes: `accelerate launch` runs sftlab training with DDP over gloo on CPUs."""

import os
import socket
import subprocess
import sys

from sftlab.rundir import METRICS_FILE, read_jsonl


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_one_run(tiny_config, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "sftlab.cli",
        "train",
        str(tiny_config),
        "--set",
        "training.packing=false",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").exists() and (run / "config.yaml").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert result.stdout.count("trained 6 steps") == 1  # reported once, by the main process

    # 48 examples, 4 per process per step: with 2 processes an epoch is 6 steps, not 12.
    # The epoch counter can only reach 1.0 at step 6 if both processes consumed their share.
    records = read_jsonl(run / METRICS_FILE)
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]  # logged once, by the main process
    assert losses[-1]["epoch"] == 1.0
    # TRL gathers token counts across processes: every row of the epoch was trained.
    tokens_per_epoch = sum(len(ids) for ids in _train_ids(tiny_config))
    assert losses[-1]["num_tokens"] == tokens_per_epoch


def _train_ids(config_path):
    from sftlab.config import load_config
    from sftlab.train import tokenizer_and_data

    return tokenizer_and_data(load_config(config_path))[1].train["input_ids"]
