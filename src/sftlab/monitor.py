"""Monitor: what the run says while it trains, and what stops it.

TrainerCallbacks, added to SFTTrainer like any other:
- `MetricsLogger` appends every logged metric to `metrics.jsonl` (one JSON object per
  line, flushed at once so a killed run keeps what it logged), adding tokens per second
  and trained tokens. TensorBoard and any other `report_to` integration are transformers'.
- `ProgressBar` shows step, loss, learning rate and time left (one line per log where
  stderr is not a terminal).
- `OutputSampler` answers a few fixed held-out prompts at each evaluation (greedy,
  short) and records whether each answer ends with the end-of-turn token and follows
  `eval.format`: the chapter warns that a good loss can hide bad outputs.
- `LiveDiagnosis` runs the diagnosis (diagnose/) at each evaluation, prints new
  findings, refreshes the plots (plots.py), and stops the run on the findings in
  `monitor.stop_on`.
- `NonFiniteGuard` stops the run at the first step whose loss or weights are NaN or
  infinite, before anything non-finite is saved.

Only the main process writes, so several processes (accelerate launch) log once. Every
file goes through rundir.py: its names, appends for the JSONL logs, atomic writes for the rest.

Trade-offs: sampling costs a few seconds per evaluation on a CPU (4 prompts x 48 tokens
by default); `monitor.sample_prompts: 0` turns it off. The non-finite check looks at one
small trained tensor per step: a NaN update reaches every weight, so one is enough.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from sftlab.config import FormatSpec, MonitorConfig
from sftlab.diagnose import Diagnosis, diagnose, read_history, write_diagnosis
from sftlab.generation import follows_format, generate, generation_prompts, stop_token_ids
from sftlab.plots import plot_curves
from sftlab.rundir import METRICS_FILE, append_jsonl, record_stop
from sftlab.rundir import TRAINING_SAMPLES_FILE as SAMPLES_FILE

__all__ = [
    "MetricsLogger",
    "ProgressBar",
    "OutputSampler",
    "LiveDiagnosis",
    "LiveReport",
    "NonFiniteGuard",
    "is_non_finite",
]

LINE_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "train_loss", "epoch")


# =========================================================================== metrics


class MetricsLogger(TrainerCallback):
    """metrics.jsonl, plus throughput: tokens/s from TRL's token count, trained tokens from the epoch."""

    def __init__(self, run_dir: Path, trained_tokens_per_epoch: int):
        self.path = Path(run_dir) / METRICS_FILE
        self.trained_tokens_per_epoch = trained_tokens_per_epoch
        self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous train log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": _finite(state.epoch)}
        record.update({key: _finite(value) for key, value in logs.items()})
        if "loss" in logs:
            record["trained_tokens"] = round((state.epoch or 0) * self.trained_tokens_per_epoch)
            now, tokens = time.monotonic(), logs.get("num_tokens")
            if tokens is not None and self.last is not None and now > self.last[0]:
                record["tokens_per_second"] = round((tokens - self.last[1]) / (now - self.last[0]), 1)
            if tokens is not None:
                self.last = (now, tokens)
        append_jsonl(self.path, record)


def _finite(value):
    # JSON has no NaN/inf; keep them readable instead of producing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def is_non_finite(value) -> bool:
    if isinstance(value, str):
        return value.lower() in {"nan", "inf", "-inf", "infinity", "-infinity"}
    return isinstance(value, float) and not math.isfinite(value)


# =========================================================================== progress


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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss=float("nan"), lr=float("nan")
        )
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.last.update(
            {key: logs[key] for key in ("loss", "learning_rate") if isinstance(logs.get(key), (int, float))}
        )
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

    def say(self, *parts: str | tuple[str, str]) -> None:
        """A note above the bar: each part shown literally, or (text, style) for sftlab's own labels."""
        from sftlab.terminal import literal

        (self.progress.console if self.progress is not None else self.console).print(literal(*parts), soft_wrap=True)


# =========================================================================== outputs


class OutputSampler(TrainerCallback):
    """Answers fixed held-out prompts at each evaluation; writes samples_during_training.jsonl."""

    def __init__(self, run_dir: Path, tokenizer, eval_examples, cfg: MonitorConfig, format_spec: FormatSpec | None):
        self.path = Path(run_dir) / SAMPLES_FILE
        self.tokenizer = tokenizer
        self.prompts = generation_prompts(tokenizer, eval_examples, cfg.sample_prompts) if cfg.sample_prompts else []
        self.chat = bool(eval_examples) and eval_examples[0].messages is not None
        self.max_new_tokens = cfg.sample_max_new_tokens
        self.format_spec = format_spec
        self.stop_ids = stop_token_ids(tokenizer)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or not state.is_world_process_zero or model is None:
            return
        answers = generate(model, self.tokenizer, self.prompts, self.max_new_tokens, self.stop_ids, chat=self.chat)
        for prompt, answer in zip(self.prompts, answers):
            append_jsonl(
                self.path,
                {
                    "step": state.global_step,
                    "prompt": prompt,
                    "output": answer["output"],
                    "ends_with_end_of_turn": answer["stopped"] and bool(answer["output"].strip()),
                    "follows_format": follows_format(answer["output"], self.format_spec),
                },
            )


# =========================================================================== diagnosis, plots, stopping


class LiveDiagnosis(TrainerCallback):
    """Diagnose at each evaluation: print new findings, refresh plots, stop on `monitor.stop_on`."""

    def __init__(self, run_dir: Path, cfg: MonitorConfig, progress: ProgressBar):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.progress = progress
        self.reported: set[str] = set()

    def on_evaluate(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        diagnosis = self.refresh()
        for finding in diagnosis.findings:
            if finding.severity in {"warning", "error"} and finding.code not in self.reported:
                self.reported.add(finding.code)
                first, last = finding.steps
                self.progress.say((finding.code, "yellow"), f" (steps {first}-{last}): {finding.evidence}")
            if finding.code in self.cfg.stop_on and finding.severity in {"warning", "error"}:
                record_stop(self.run_dir, finding.code, state.global_step, finding.evidence)
                self.progress.say(("stopping", "red"), f": {finding.code} is in monitor.stop_on")
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.refresh()

    def refresh(self) -> Diagnosis:
        records, samples = read_history(self.run_dir)
        diagnosis = diagnose(records, samples, memorization_loss=self.cfg.memorization_loss)
        write_diagnosis(self.run_dir, diagnosis)
        if self.cfg.plots:
            plot_curves(self.run_dir, records, diagnosis)
        return diagnosis


class LiveReport(TrainerCallback):
    """report.html at each evaluation (after the diagnosis and plots are refreshed), so a browser shows
    curves, findings and samples while the run goes on. `write(run_dir, live=True)` writes it: the
    report stage's own function, handed in by train.py."""

    def __init__(self, run_dir: Path, write):
        self.run_dir = Path(run_dir)
        self.write = write

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(self.run_dir, live=True)


class NonFiniteGuard(TrainerCallback):
    """Stop at the first non-finite loss or weight, before the step is saved or evaluated."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.watched = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trained = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self.watched = min(trained, key=lambda p: p.numel()) if trained else None

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.watched is not None and not torch.isfinite(self.watched).all():
            self._stop(state, control, "weights became NaN or infinite after this step's update")

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = [key for key in ("loss", "grad_norm", "eval_loss") if is_non_finite((logs or {}).get(key))]
        if bad:
            self._stop(state, control, f"{bad[0]} is {logs[bad[0]]}")

    def _stop(self, state, control, evidence: str) -> None:
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False
        if state.is_world_process_zero:
            record_stop(self.run_dir, "instability", state.global_step, evidence)
