"""Run directory: every file an sftlab run writes, its name, how it is written and how it is read.

    RUN_DIR/
      .sftlab-run            marks a directory sftlab created: the only kind --overwrite deletes
      config.yaml            the resolved config                       (train)
      run_info.json          hardware, versions, SFTConfig, plan       (train)
      metrics.jsonl          every logged metric                       (monitor)
      samples_during_training.jsonl   held-out answers at each eval    (monitor)
      diagnosis.json  stopped.json    the diagnosis; why it stopped    (monitor)
      loss.png learning_rate.png grad_norm.png                         (monitor)
      checkpoint-N/          the Trainer's; sftlab-complete.json once whole   (train)
      best_checkpoint.json   the lowest eval loss                      (train)
      eval/audit.json        the data audit                            (train)
      eval/before.json prompted.json after.json samples.jsonl verdict.json   (evaluate)
      final/                 the model or adapter; final/README.md, the card  (train, report)
      report.html            the run on one page                       (report)
      exports.json           what `sftlab export` wrote                (export)
      runs/                  TensorBoard logs

Every name is spelled here and only here. Every file sftlab writes goes through
`write_atomically` (a temporary name, then a rename: a kill leaves the old file or the
new one, never half of one). Readers are tolerant: a missing, cut, corrupt or
wrong-typed file reads as None (or the records that parse), with the reason kept for
those who report it, never an exception: runs are killed, disks fill up, people edit
files.

Trade-off: the readers return plain JSON values; the typed models that stages hand each
other are parsed from them once, leniently (contracts.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

RUN_MARKER = ".sftlab-run"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
TRAINING_SAMPLES_FILE = "samples_during_training.jsonl"
DIAGNOSIS_FILE = "diagnosis.json"
STOPPED_FILE = "stopped.json"
PLOT_FILES = {"loss": "loss.png", "learning_rate": "learning_rate.png", "grad_norm": "grad_norm.png"}
BEST_CHECKPOINT_FILE = "best_checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "sftlab-complete.json"  # written into a checkpoint once everything in it is saved
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's, in each checkpoint: the last file it writes
EVAL_DIR = "eval"
AUDIT_FILE = "audit.json"
BEFORE_FILE = "before.json"
PROMPTED_FILE = "prompted.json"
AFTER_FILE = "after.json"
EVAL_SAMPLES_FILE = "samples.jsonl"
VERDICT_FILE = "verdict.json"
FINAL_DIR = "final"
CARD_FILE = "README.md"  # in final/: the Hugging Face model card
REPORT_FILE = "report.html"
EXPORTS_FILE = "exports.json"
EXPORT_DIR = "export"  # where `sftlab export` writes unless --output says otherwise
TENSORBOARD_DIR = "runs"

CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


def eval_file(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / EVAL_DIR / name


def relative(name: str) -> str:
    """How a file of eval/ is named to people: eval/before.json."""
    return f"{EVAL_DIR}/{name}"


# =========================================================================== writing


def write_atomically(path: str | Path, text: str) -> None:
    """Write to a temporary name, then rename: a kill leaves the old file or the new one, never half of one."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: str | Path, data: bytes) -> None:
    """`write_atomically` for binary files (the plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes never share a temporary file
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    write_atomically(path, json.dumps(value, indent=indent, ensure_ascii=False, default=str))


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def append_jsonl(path: str | Path, record: dict) -> None:
    """One line at the end (metrics.jsonl): a kill can cut only this line, which readers skip."""
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def writing(path: str | Path):
    """Around a write into the run directory: a full disk or a read-only directory is the user's to fix, not a crash."""
    from sftlab.errors import UserError

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


# =========================================================================== reading


def read_json_checked(path: str | Path) -> tuple[Any | None, str | None]:
    """(the JSON value, None), or (None, why it cannot be read); (None, None) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg}, line {error.lineno})"
    except (OSError, RecursionError, ValueError) as error:
        return None, f"cannot be read ({getattr(error, 'strerror', None) or error})"


def read_json(path: str | Path) -> Any | None:
    return read_json_checked(path)[0]


def read_json_object(path: str | Path) -> dict | None:
    """A JSON file holding an object; None when missing, unreadable or anything else."""
    value = read_json(path)
    return value if isinstance(value, dict) else None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a JSONL file; a line cut by a kill, or anything not an object, is skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return _json_objects(text.splitlines())


def _json_objects(lines: list[str]) -> list[dict]:
    """The lines that parse as JSON objects; a line cut by a kill, or anything else, is skipped."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_yaml_checked(path: str | Path) -> tuple[dict | None, str | None]:
    """A YAML mapping (config.yaml), like read_json_checked."""
    import yaml

    path = Path(path)
    if not path.exists():
        return None, None
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError, TypeError) as error:
        return None, f"invalid YAML ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if not isinstance(value, dict):
        return None, f"not a mapping (a {type(value).__name__})"
    return value, None


# =========================================================================== checkpoints


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoint-N directories, in step order."""
    try:
        children = list(Path(run_dir).iterdir())
    except OSError:
        return []
    found = [child for child in children if CHECKPOINT_NAME.fullmatch(child.name) and child.is_dir()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def checkpoint_is_complete(checkpoint: Path) -> bool:
    """Marked complete by sftlab, or holding a whole trainer_state.json for its step.

    Trainer._save_checkpoint (transformers 5) writes, in order: the weights, the optimizer and
    scheduler, the RNG state, trainer_state.json; then it deletes checkpoints beyond
    save_total_limit, and only then do callbacks' on_save (the marker) run. A kill in that
    last window can leave the only surviving checkpoint unmarked, so a trainer_state.json that
    parses and names this step (it is written last, and a kill mid-write leaves it cut) counts too.
    """
    if (checkpoint / COMPLETE_MARKER).exists():
        return True
    state = read_json_object(checkpoint / TRAINER_STATE_FILE)
    return state is not None and state.get("global_step") == checkpoint_step(checkpoint)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that was written completely (a run killed mid-save leaves an incomplete one)."""
    complete = [path for path in checkpoint_dirs(run_dir) if checkpoint_is_complete(path)]
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint-N directories a kill left half-written: sftlab's own files, never resumable,
    and in the way of the Trainer, which writes checkpoint-N again when it reaches step N."""
    discarded = [path for path in checkpoint_dirs(run_dir) if not checkpoint_is_complete(path)]
    for checkpoint in discarded:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return discarded


def newest_trainer_state(run_dir: str | Path) -> dict | None:
    """The trainer_state.json of the newest checkpoint that has one (a transformers output_dir's history)."""
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        state = read_json_object(checkpoint / TRAINER_STATE_FILE)
        if state is not None:
            return state
    return None


def has_model(directory: str | Path) -> bool:
    """A saved model or LoRA adapter (what final/ holds once training has written it)."""
    directory = Path(directory)
    return (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file()


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / "adapter_config.json").is_file()


# =========================================================================== the run's own bookkeeping

# What the Trainer keeps in a checkpoint for resuming, and a model directory does not need.
TRAINER_ONLY_FILES = ("optimizer.pt", "scheduler.pt", TRAINER_STATE_FILE, "training_args.bin", COMPLETE_MARKER)
TRAINER_ONLY_PREFIX = "rng_state"  # rng_state.pth, rng_state_0.pth ... one per process


def prepare_run_dir(path: str | Path, resume: bool, overwrite: bool, processes=None) -> Path:
    """Check the run directory on every process, then let the main process create or replace it.

    A directory that exists is never reused without `resume` or replaced without `overwrite`,
    and `overwrite` only ever deletes a directory sftlab made (it holds RUN_MARKER).
    """
    from sftlab.errors import UserError

    path = Path(path)
    has_contents = path.exists() and any(path.iterdir())
    if resume and (not has_contents or latest_checkpoint(path) is None):
        raise UserError(
            f"nothing to resume in {path}: no complete checkpoint-* directory", hint="start the run without --resume"
        )
    if not resume and has_contents and not overwrite:
        raise UserError(
            f"run directory {path} already exists",
            hint="use --resume to continue it, --overwrite to replace it, or set training.output_dir",
        )
    if not resume and has_contents and not (path / RUN_MARKER).exists():
        raise UserError(
            f"{path} exists and was not made by sftlab; refusing to delete it",
            hint="choose another training.output_dir",
        )
    if processes is not None:
        processes.wait_for_everyone()  # every process has checked before the main one changes anything
    if resume or (processes is not None and not processes.is_main_process):
        if processes is not None:
            processes.wait_for_everyone()
        return path
    try:
        if has_contents:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        write_atomically(
            path / RUN_MARKER, "created by sftlab; `sftlab train --overwrite` may replace this directory\n"
        )
    except OSError as exc:
        raise UserError(
            f"cannot create the run directory {path}: {exc.strerror or exc}",
            hint="set training.output_dir to a directory you can write to",
        ) from None
    if processes is not None:
        processes.wait_for_everyone()
    return path


def mark_checkpoint_complete(run_dir: str | Path, step: int) -> None:
    """COMPLETE_MARKER in checkpoint-N, once the Trainer has written all of it: safe to resume from."""
    checkpoint = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if checkpoint.is_dir():
        write_json(checkpoint / COMPLETE_MARKER, {"step": step}, indent=None)


def best_checkpoint(run_dir: str | Path, log_history: list[dict]) -> dict | None:
    """The complete checkpoint with the lowest eval loss measured at its own step: {path, step, eval_loss}."""
    eval_loss_at = {entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}
    candidates = [
        {"path": path, "step": checkpoint_step(path), "eval_loss": eval_loss_at[checkpoint_step(path)]}
        for path in checkpoint_dirs(run_dir)
        if checkpoint_is_complete(path) and checkpoint_step(path) in eval_loss_at
    ]
    return min(candidates, key=lambda c: c["eval_loss"], default=None)


def record_best_checkpoint(run_dir: str | Path, log_history: list[dict]) -> Path | None:
    """BEST_CHECKPOINT_FILE names the best checkpoint so far; returns its path (None before any is evaluated)."""
    best = best_checkpoint(run_dir, log_history)
    if best is None:
        return None
    write_json(
        Path(run_dir) / BEST_CHECKPOINT_FILE,
        {"checkpoint": best["path"].name, "step": best["step"], "eval_loss": best["eval_loss"]},
        indent=None,
    )
    return best["path"]


def checkpoint_for_final(run_dir: str | Path, stopped: dict | None) -> Path | None:
    """After a NaN, the last complete checkpoint; after a stop on a finding (overfitting...),
    the best one by eval loss; after a normal end, None (the trained weights are final)."""
    if stopped is None:
        return None
    if stopped["reason"] == "instability":
        return latest_checkpoint(run_dir)
    name = (read_json_object(Path(run_dir) / BEST_CHECKPOINT_FILE) or {}).get("checkpoint")
    return Path(run_dir) / name if isinstance(name, str) and name else None


def copy_model_files(checkpoint: str | Path, final_dir: str | Path) -> None:
    """The model (or adapter) and tokenizer files of a checkpoint into final/, without the Trainer's state."""
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(checkpoint).iterdir():
        if path.is_file() and path.name not in TRAINER_ONLY_FILES and not path.name.startswith(TRAINER_ONLY_PREFIX):
            shutil.copy2(path, final_dir / path.name)
    config = final_dir / "config.json"
    values = read_json_object(config)
    if values is not None:  # checkpoints are saved with the KV cache off, for training
        values["use_cache"] = True
        write_atomically(config, json.dumps(values, indent=2))


# =========================================================================== additions (issue 15, monitor stage)


def read_jsonl_checked(path: str | Path) -> tuple[list[dict], str | None]:
    """(every JSON object of a JSONL file, None), or ([], why it holds none) when it has lines but no object, is
    not UTF-8 or cannot be read; ([], None) when it does not exist or is empty. A line cut by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return [], None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [], "not UTF-8 text"
    except OSError as error:
        return [], f"cannot be read ({error.strerror or error})"
    lines = [line for line in text.splitlines() if line.strip()]
    records = _json_objects(lines)
    if lines and not records:
        return [], "no JSON object on any line"
    return records, None


def trim_metrics(path: str | Path, last_step: int) -> None:
    """Drop records logged after `last_step` from metrics.jsonl (at `path`) and the samples next to it, so a
    resumed run logs each step once.

    The end-of-run summary of the interrupted invocation goes too: the run continues. A line
    cut by the kill goes too. Each file is replaced in one step, so a kill now loses nothing.
    """
    path = Path(path)
    for file in (path, path.with_name(TRAINING_SAMPLES_FILE)):
        if file.exists():
            kept = [
                record
                for record in read_jsonl(file)
                if record.get("step", 0) <= last_step and "train_runtime" not in record
            ]
            write_jsonl(file, kept)


def record_stop(run_dir: str | Path, reason: str, step: int, evidence: str) -> None:
    """stopped.json: why training stopped early. The first reason is the one that stopped the run: kept."""
    from sftlab.contracts import StopRecord

    path = Path(run_dir) / STOPPED_FILE
    if not path.exists():
        write_json(path, StopRecord(reason=reason, step=step, evidence=evidence).to_json(), indent=None)


def read_stop(run_dir: str | Path) -> dict | None:
    """stopped.json as written by `record_stop`; None when the run did not stop early or the file is unreadable."""
    return read_json_object(Path(run_dir) / STOPPED_FILE)
