"""Monitor: what the run says while it trains.

Two TrainerCallbacks, added to SFTTrainer like any other:
- `MetricsLogger` appends every logged metric to `metrics.jsonl`, one JSON object per
  line with its step, flushed at once so a killed run keeps everything it logged.
- `ProgressBar` shows step, loss, learning rate and time left; where stderr is not a
  terminal (CI, log files) it prints one line per log instead of redrawing a bar.

Only the main process writes, so several processes (accelerate launch) log once.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LINE_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss", "epoch")


class MetricsLogger(TrainerCallback):
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": _finite(state.epoch)}
        record.update({key: _finite(value) for key, value in logs.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a last line cut by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step`, so a resumed run logs each step once.

    The end-of-run summary of the interrupted invocation goes too: the run continues.
    """
    kept = [record for record in read_metrics(path)
            if record.get("step", 0) <= last_step and "train_runtime" not in record]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def _finite(value):
    # JSON has no NaN/inf; keep them readable instead of producing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class ProgressBar(TrainerCallback):
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None
        self.last = {"loss": float("nan"), "learning_rate": float("nan")}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss=float("nan"), lr=float("nan"))
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.last.update({key: logs[key] for key in ("loss", "learning_rate") if key in logs})
        if self.progress is not None:
            self.progress.update(self.task, loss=self.last["loss"], lr=self.last["learning_rate"])
            if "eval_loss" in logs:
                self.progress.console.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        else:
            shown = [f"{key}={logs[key]:.4g}" for key in LINE_METRICS if isinstance(logs.get(key), (int, float))]
            if shown:
                print(f"step {state.global_step}/{state.max_steps} " + " ".join(shown), file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
