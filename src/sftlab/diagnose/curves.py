"""Training logs read into typed curves: what the diagnosis looks at.

`read_history` reads an sftlab run directory (metrics.jsonl and samples_during_training.jsonl),
a metrics.jsonl, the trainer_state.json of any transformers/TRL run (its log_history), or a
transformers output_dir (the newest checkpoint's trainer_state.json holds the whole history).
It goes through rundir's readers and checkpoint listing, and raises a `UserError` naming the
file when what it was given holds no history at all: the user pointed `sftlab diagnose` at it.

`Curves.from_records` turns the records into one `Series` per metric, in step order. Values
are read leniently: sftlab writes NaN and infinity as strings ("nan"), a resumed run logs a
step twice (the last value wins), and the end-of-run summary is not a point of any curve.

Trade-off: the curves keep their non-finite values (the instability rule reports them), so
every rule asks for `.finite()` first; a NaN never reaches a statistic by accident.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sftlab.errors import UserError
from sftlab.rundir import (
    METRICS_FILE,
    TRAINER_STATE_FILE,
    TRAINING_SAMPLES_FILE,
    checkpoint_dirs,
    read_json_checked,
    read_jsonl_checked,
)

_EXPECTED = (
    "an sftlab run directory (with metrics.jsonl), a metrics.jsonl, "
    "or a trainer_state.json from a transformers/TRL run (or a checkpoint directory holding one)"
)

# =========================================================================== reading logs


def read_history(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(records, samples) from a run directory, a metrics.jsonl, or a trainer_state.json."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory", hint=f"pass {_EXPECTED}")
    if path.is_dir():
        if (path / METRICS_FILE).is_file():
            return _read_jsonl(path / METRICS_FILE), _samples_next_to(path / METRICS_FILE)
        if (path / TRAINER_STATE_FILE).is_file():
            return _read_trainer_state(path / TRAINER_STATE_FILE), []
        _check_listable(path)
        checkpoints = [
            checkpoint for checkpoint in checkpoint_dirs(path) if (checkpoint / TRAINER_STATE_FILE).is_file()
        ]
        if checkpoints:  # a transformers output_dir: the latest checkpoint's state holds the whole history
            return _read_trainer_state(checkpoints[-1] / TRAINER_STATE_FILE), []
        raise UserError(
            f"{path}: no {METRICS_FILE} or {TRAINER_STATE_FILE} in this directory", hint=f"pass {_EXPECTED}"
        )
    if path.suffix == ".jsonl":
        return _read_jsonl(path), _samples_next_to(path) if path.name == METRICS_FILE else []
    if path.suffix == ".json":
        return _read_trainer_state(path), []
    raise UserError(f"{path}: unsupported file type {path.suffix or '(no extension)'}", hint=f"pass {_EXPECTED}")


def _check_listable(directory: Path) -> None:
    try:
        next(directory.iterdir(), None)
    except OSError as error:
        raise UserError(f"{directory}: cannot read the directory ({error.strerror or error})") from None


def _unreadable(path: Path, reason: str) -> UserError:
    if reason == "not UTF-8 text":
        return UserError(f"{path}: not a text file", hint=f"pass {_EXPECTED}")
    return UserError(f"{path}: {reason}")


def _read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSONL file; invalid lines (a last line cut by a kill) are skipped."""
    records, reason = read_jsonl_checked(path)
    if reason == "no JSON object on any line":
        raise UserError(
            f"{path}: no JSON object on any line; expected JSON Lines, one record per line", hint=f"pass {_EXPECTED}"
        )
    if reason:
        raise _unreadable(path, reason)
    return records


def _samples_next_to(metrics: Path) -> list[dict]:
    samples = metrics.with_name(TRAINING_SAMPLES_FILE)
    return _read_jsonl(samples) if samples.is_file() else []


def _read_trainer_state(path: Path) -> list[dict]:
    state, reason = read_json_checked(path)
    if reason and reason.startswith("invalid JSON"):
        raise UserError(f"{path}: {reason}: expected a trainer_state.json with a log_history", hint=f"pass {_EXPECTED}")
    if reason:
        raise _unreadable(path, reason)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise UserError(
            f"{path}: no log_history list: expected a trainer_state.json written by transformers",
            hint=f"pass {_EXPECTED}",
        )
    return [record for record in history if isinstance(record, dict)]


# =========================================================================== values and curves


_NON_FINITE = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
}


def metric_value(value) -> float | None:
    """A metric as a float (NaN/inf included, from floats or sftlab's strings); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value.strip().lower())
    return None


def record_step(record: dict) -> int | None:
    step = metric_value(record.get("step"))
    return int(step) if step is not None and math.isfinite(step) else None


class Series(NamedTuple):
    """One metric over the run: `steps` (int64) and `values` (float), in step order."""

    steps: np.ndarray
    values: np.ndarray

    def finite(self) -> Series:
        keep = np.isfinite(self.values)
        return Series(self.steps[keep], self.values[keep])


def series(records, key: str) -> Series:
    """One metric, in step order; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        if not isinstance(record, dict) or "train_runtime" in record:  # end-of-run summary
            continue
        step, value = record_step(record), metric_value(record.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return Series(np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=float))


@dataclass(frozen=True)
class Curves:
    """The curves of a run as logged (non-finite values included) and how many epochs the logs reach."""

    train: Series  # "loss"
    eval: Series  # "eval_loss"
    grad_norm: Series
    learning_rate: Series
    epochs: float  # 0 when the logs do not say

    @classmethod
    def from_records(cls, records) -> Curves:
        records = [record for record in (records or []) if isinstance(record, dict)]
        epochs = series(records, "epoch").finite().values
        return cls(
            train=series(records, "loss"),
            eval=series(records, "eval_loss"),
            grad_norm=series(records, "grad_norm"),
            learning_rate=series(records, "learning_rate"),
            epochs=float(epochs.max()) if len(epochs) else 0.0,
        )


def format_shares(samples) -> list[tuple[int, float, int]]:
    """(step, share of samples that end with the end-of-turn token and follow the format, samples) per evaluation."""
    by_step: dict[int, list[bool]] = {}
    for sample in samples or ():
        if not isinstance(sample, dict) or not isinstance(sample.get("ends_with_end_of_turn"), bool):
            continue
        step = record_step(sample)
        if step is None:
            continue
        good = sample["ends_with_end_of_turn"] and sample.get("follows_format") is not False
        by_step.setdefault(step, []).append(good)
    return [(step, sum(oks) / len(oks), len(oks)) for step, oks in sorted(by_step.items())]
