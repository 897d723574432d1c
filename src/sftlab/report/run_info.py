"""What training records for the report: run_info.json and eval/audit.json.

Hardware, framework versions and the resolved training arguments cannot be read back
from the run directory afterwards, so training writes them to run_info.json when it
starts (`write_run_info`), with the data audit next to the evaluations (`write_audit`).
Both are written by the main process only.

Trade-off: run_info.json records a fixed list of SFTConfig fields (RECORDED_ARGS), the
ones the card shows, rather than the whole SFTConfig: the card stays readable, and the
file holds no paths or tokens that were never meant to be shared.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path

from sftlab.contracts import RunInfo
from sftlab.errors import UserError
from sftlab.report.run import parse_leniently
from sftlab.rundir import AUDIT_FILE, RUN_INFO_FILE, eval_file, read_json_object, write_json

PACKAGES = ("sftlab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")
RECORDED_ARGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "max_length",
    "packing",
    "activation_checkpointing",
    "seed",
    "logging_steps",
    "eval_steps",
    "save_steps",
)


@contextlib.contextmanager
def writing(path: Path):
    """Around rundir's atomic writes: a full disk or a read-only run directory is the user's to fix, not a crash."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"cannot write {path}: {error.strerror or error}",
            hint="check the permissions and free space of the run directory",
        ) from None


def write_audit(run_dir: str | Path, audit: dict) -> Path:
    """eval/audit.json: the data audit (`sftlab check --json`), written by training, main process only."""
    path = eval_file(run_dir, AUDIT_FILE)
    with writing(path):
        write_json(path, audit)
    return path


def write_run_info(run_dir: str | Path, args, plan: dict | None = None) -> Path:
    """run_info.json: what the run directory cannot tell afterwards. Written by training, main process only.

    The hardware, the framework versions, the resolved training arguments (TRL's SFTConfig,
    after sftlab's defaults), the plan and the start time; a resumed run keeps the first
    start time and lists each resumption.
    """
    path = Path(run_dir) / RUN_INFO_FILE
    raw = read_json_object(path)
    previous = (
        parse_leniently(RunInfo, raw) if raw else None
    )  # None: the first start (or a file a kill left unreadable)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {
        "started_at": previous.started_at or now if previous else now,
        "resumed_at": [*previous.resumed_at, now] if previous else [],
        "hardware": _hardware_now(args),
        "precision": "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32",
        "versions": current_versions(),
        "training_args": {name: _plain(getattr(args, name)) for name in RECORDED_ARGS if hasattr(args, name)},
        "plan": plan,
    }
    with writing(path):
        write_json(path, info)
    return path


def current_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value):
    value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim) as their names
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _hardware_now(args) -> dict:
    import platform

    import torch

    info = {
        "device": str(getattr(args, "device", "cpu")),
        "cpu_count": os.cpu_count(),
        "processes": getattr(args, "world_size", 1),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
