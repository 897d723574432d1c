"""Diagnose a run from its loss curves: the phase it is in and the chapter's warning signs.

The chapter describes three phases of a training loss curve (an initial sharp drop, a
gradual stabilization, convergence) and five warning signs: overfitting (eval loss rising,
or falling much more slowly than train loss), underfitting (no significant improvement),
memorization (extremely low loss), instability (a learning rate too high: spikes,
divergence, NaN) and inconsistent output formatting. One more sign is not the chapter's:
a loss of exactly 0 from the first logs (`zero_loss`) means no token is trained at all,
a masking or label bug, not a model that learned everything. `diagnose` turns the logged metrics
(and the samples generated at each evaluation) into a `Diagnosis`: the phase, and findings
with a code, a severity, the steps concerned, the numbers that triggered them and the
chapter's remedies.

Real curves are noisy, and the diagnosis runs live at every evaluation (where a finding can
stop the run), so every rule smooths, compares relative changes, and asks for a minimum of
evidence before it says anything: a single recovered spike, one eval point a little higher
than the previous one, or a short run with two or three evaluations is not a warning.

`read_history` reads an sftlab run directory (metrics.jsonl, samples_during_training.jsonl),
a metrics.jsonl, or the trainer_state.json of any transformers/TRL run (its log_history).

Pure Python and numpy: no torch or transformers, so `sftlab diagnose` starts at once.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftlab.errors import UserError

__all__ = ["PHASES", "SEVERITIES", "CODES", "Finding", "Diagnosis", "diagnose", "read_history"]

PHASES = ("initial_sharp_drop", "gradual_stabilization", "converged")
NOT_STARTED = "not_started"
DIVERGING = "diverging"  # not one of the chapter's phases: the loss climbs instead of settling
SEVERITIES = ("info", "warning", "error")
CODES = ("overfitting", "underfitting", "memorization", "instability", "inconsistent_format", "zero_loss", "healthy",
         "no_eval_data")

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples_during_training.jsonl"
TRAINER_STATE_FILE = "trainer_state.json"

# --------------------------------------------------------------------------- thresholds
# Levels and noise are always estimated with medians (robust to the spikes we look for);
# changes are relative to the current loss level, with small absolute floors so that
# curves near zero (a deterministic task) do not turn tiny wiggles into large percentages.

# Phase.
PHASE_MIN_POINTS = 4  # fewer logged train losses than this: too early to see a shape; the run is in its first phase.
START_Z = 3.0  # the first log counts as the start when it is 3 noise scales above the next ones (a sharp drop within it).
PHASE_WINDOW_SHARE = 0.25  # the "recent" part of the curve is its last quarter (at least 3 logs): long enough to average out noise.
CONVERGED_REL = 0.03  # converged when the recent quarter lowers the loss by less than 3% of its level: within typical log-to-log noise.
CONVERGED_FLOOR_SHARE = 0.05  # ... relative to at least 5% of the initial loss, so a loss near 0 does not make 0.002 -> 0.001 look like 50%.
PHASE_Z = 3.0  # ... or by less than 3 standard errors of the fitted change (a noisy flat curve has a random slope).
PHASE_NOISE_MIN_POINTS = 8  # ... the log-to-log noise being measured once there are 8 logs.
SHARP_RATE_RATIO = 0.5  # still in the sharp drop while the recent rate of descent is at least half the average rate since the start
#   (an exponential decay keeps ~60% or more of its average rate during its first time constant, ~30% by the second).

# Underfitting.
UNDERFIT_MIN_POINTS = 10  # at least 10 train logs, not in warmup: the first evaluations of a run must not be called underfitting.
UNDERFIT_REL = 0.10  # "no significant improvement": the loss fell by less than 10% of its initial level (fine-tunes usually fall 30%+),
#   by both the start/end levels and a robust line through all logs, once the initial drop is over.
UNDERFIT_MIN_STEPS = 50  # ... at least 50 optimizer steps ...
UNDERFIT_AFTER_WARMUP = 2  # ... and twice the warmup (the step of the peak learning rate): as long at full rate as warming up ...
UNDERFIT_Z = 1.5  # ... with a margin of 1.5 standard errors of the fitted fall: a very noisy curve needs more logs ...
UNDERFIT_EVAL_REL = 0.05  # ... and eval loss (far less noisy than train loss) did not improve by 5% either.

# Memorization.
MEMO_MIN_POINTS = 3  # the extremely low loss must hold for the last 3 logs (median), not one lucky batch.
MEMO_EVAL_HIGH_FACTOR = 4.0  # eval loss at 4x the memorization threshold or more (0.2 for 0.05) is "much higher": train is memorized.
#   Below that, train and eval are both very low: a deterministic task (strict JSON extraction), reported as info only.
# Memorization relative to the run: an absolute threshold misses a chat set whose loss starts at 5.7 and ends at 0.057.
MEMO_REL = 0.02  # the train loss ended at 2% of where it started or less (a healthy fine-tune keeps 10%+ of its start:
#   measured on real runs of 5-15 epochs that keep 11-46%) ...
MEMO_MIN_EPOCHS = 5.0  # ... over 5 epochs or more: well past the chapter's 1-3, each example seen again and again
#   (a steep fall within one pass is an easy target, not a memorized one) ...
MEMO_REL_MIN_POINTS = 10  # ... seen in at least 10 train logs.

# Zero loss: nothing is trained (every label masked, or a loss that ignores the labels).
ZERO_LOSS_MAX = 5e-5  # a logged loss that rounds to 0.0000 (transformers logs 4 decimals) ...
ZERO_LOSS_EARLY_LOGS = 3  # ... from the first 3 logs on (a loss that falls to 0 has first trained something) ...
ZERO_LOSS_SHARE = 0.8  # ... and at 80% of all logs or more.

# Overfitting.
OVERFIT_MIN_EVALS = 3  # at least 3 eval points before any overfitting call: two points are a slope, not a trend.
EVAL_RISE_REL = 0.03  # eval loss must exceed its minimum by 3% (eval noise at convergence is typically under 1%) ...
EVAL_RISE_ABS = 0.005  # ... and by at least 0.005 nats, for losses near zero ...
EVAL_RISE_POINTS = 2  # ... at the last 2 consecutive evaluations (one higher point is noise, two in a row is a rise).
OVERFIT_TRAIN_FLAT_REL = 0.02  # "while train loss falls": train may be flat (+2%), but if it rises too, that is instability, not overfitting
TRAIN_RISE_Z = 2.0  # ... "rises" meaning a fitted rise above 2% and above 2 standard errors of the fit (noise is not a rise).
OVERFIT_ERROR_REL = 0.15  # eval loss 15%+ above its minimum is an error: the last checkpoints are clearly worse than the best one.
SLOW_TRAIN_DROP_REL = 0.10  # widening gap: over the recent half of the evaluations train loss fell by at least 10% of its level ...
SLOW_TRAIN_DROP_ABS = 0.02  # ... (and by at least 0.02 nats) ...
SLOW_EVAL_RATIO = 0.5  # ... while eval loss fell by less than half as much ("a significantly slower rate") ...
GAP_WIDEN_REL = 0.10  # ... so that the eval - train gap grew by at least 10% of the eval loss ...
GAP_WIDEN_ABS = 0.02  # ... and by at least 0.02 nats, to end larger than a healthy gap (below).
SLOW_MIN_EVALS = 4  # a gap needs 4 evaluations to be seen widening (the recent half spans at least 3 of them) ...
SLOW_MIN_TRAIN_LOGS = 6  # ... the train trend over that span at least 6 logs ...
SLOW_Z = 4.0  # ... and the widening must be 4 standard errors of that fit: noise alone must not widen the gap.

# Healthy.
HEALTHY_GAP_REL = 0.25  # "a small gap between training and validation loss": eval within 25% above train ...
HEALTHY_GAP_ABS = 0.05  # ... or within 0.05 nats (relative gaps mean nothing near zero).

# Instability: spikes.
SPIKE_WINDOW = 8  # the local level is the median of the 8 previous logs ...
SPIKE_MIN_HISTORY = 4  # ... and there must be at least 4 of them.
SPIKE_Z = 6.0  # a spike is 6 robust standard deviations above the local level, in log space: noise almost never does that ...
SPIKE_NOISE_HISTORY = 50  # ... the noise being the larger of the 8 logs' spread and the log-to-log noise of the last 50 logs ...
SPIKE_MIN_SCALE_REL = 0.02  # ... floored at 2% (a very smooth curve has a spread near 0) ...
SPIKE_MIN_REL = 0.30  # ... and 30% above the local level ...
SPIKE_MIN_ABS = 0.05  # ... and 0.05 nats above it (near-zero losses jump by large ratios harmlessly).
SPIKE_RECOVERED_REL = 0.15  # a spike has recovered once the loss is back within 15% (or 3 noise scales) of the pre-spike level ...
SPIKE_RECOVERY_POINTS = 3  # ... within the next 3 logs; a loss that stays up for 3 logs did not recover ...
SPIKE_MIN_AFTER = 2  # ... and it takes at least 2 logs after the spike to say so (a spike at the last log is pending, not flagged).
SPIKE_FREQUENT_COUNT = 4  # recovered spikes are benign unless frequent: at least 4 of them ...
SPIKE_FREQUENT_SHARE = 0.05  # ... in at least 5% of the logs.
# Instability: divergence (a sustained rise rather than a jump), on the log of the loss (noise is multiplicative).
DIVERGE_MIN_POINTS = 15  # at least 15 train logs: a minimum, a rise, and two windows to confirm it.
DIVERGE_WINDOW = 5  # the loss is smoothed with a trailing median of 5 logs (or a twentieth of them ...
DIVERGE_MAX_WINDOW = 25  # ... up to 25: long runs logged every step need more smoothing, but a rise must still show within ~25 logs).
DIVERGE_REL = 0.30  # diverging: the smoothed loss ends 30% above its smoothed minimum ...
DIVERGE_Z = 3.0  # ... and 3 standard errors of a smoothed level above it, plus sqrt(2 ln K) more for the minimum of K noisy
#   windows (which sits that far below the true level by chance), at both of the last two non-overlapping windows
#   (a chance cluster of high logs does not last that long).
# Instability: gradient norm explosions (transformers logs the pre-clipping norm of one step, so it is noisy: x2-x5 is common).
GRAD_EXPLOSION_FACTOR = 10.0  # an explosion is a grad norm 10x the median of the previous 8 logs ...
GRAD_MIN_HISTORY = 4  # ... (with at least 4 of them) ...
GRAD_EXPLOSION_RUN = 2  # ... and it counts when it lasts 2 consecutive logs ...
GRAD_EXPLOSION_COUNT = 3  # ... or happens 3 times (clipping absorbs an isolated one) ...
GRAD_EXTREME_FACTOR = 100.0  # ... or once at 100x: the update direction is garbage even when clipped.
GRAD_QUIET_LOSS = 0.05  # none of it counts while the train loss sits below 0.05: a model that fits its batches almost
#   exactly has gradients near 0, so one batch with a few mispredicted tokens multiplies the norm 100x (0.003 -> 2.7)
#   at no risk ...
GRAD_QUIET_MAX = 10.0  # ... as long as the blip stays under 10 (ten times the default max_grad_norm, which clips it).
# Instability: a run that ends far above where it started, however short (1.6 -> 10.4 in 8 logs).
DIVERGE_END_REL = 0.5  # the last logs all sit 50% or more above the start level (a healthy run never ends above it) ...
DIVERGE_END_POINTS = 3  # ... the last 3 of them, past the start logs (one high log is a spike, three are a new level).

# Inconsistent format (shares of sampled generations that end with the end-of-turn token and follow the format).
FORMAT_MIN_EVALS = 3  # at least 3 evaluations with samples.
FORMAT_DROP = 0.30  # falling: the last shares are 30 points below the best earlier share (with 4 prompts, 2 answers
#   went wrong; one prompt flipping, 25 points, is noise) ...
FORMAT_DROP_POINTS = 2  # ... at the last 2 evaluations (one bad evaluation is not a trend).
FORMAT_WINDOW = 6  # unstable: within the last 6 evaluations ...
FORMAT_SWING = 0.30  # ... the share dropped by 30 points or more ...
FORMAT_SWINGS = 2  # ... at least twice (a share that rises unevenly while the model learns to stop is not unstable).

ADVICE = {
    "overfitting": [
        "Reduce the training steps (or epochs); keep the checkpoint with the lowest eval loss (best_checkpoint.json).",
        "Increase the dataset size.",
        "Validate dataset quality and diversity.",
    ],
    "underfitting": [
        "If it is learning too slowly, try increasing the learning rate.",
        "If it is struggling with the task, check the data quality and the task complexity.",
        "If it hits the model's architecture limitations, consider a different model.",
    ],
    "memorization": [
        "Compare outputs on held-out prompts with the training examples: near copies mean memorization.",
        "Check the diversity of the outputs: responses too similar to each other or to the training examples are a sign.",
        "Use more, and more varied, training data.",
        "Train for fewer epochs.",
    ],
    "memorization_low_both": [
        "A deterministic task (such as strict JSON extraction) can reach a very low loss on train and eval alike; "
        "still check the outputs on new, similar prompts.",
    ],
    "instability": [
        "Lower the learning rate: too high a learning rate causes instability.",
        "Add or lengthen the warmup (warmup_ratio).",
        "Check gradient clipping (max_grad_norm; 1.0 by default).",
        "Check the data for extreme examples (very long, empty or garbled rows): `sftlab check` lists lengths and problems.",
    ],
    "non_finite": [
        "A NaN or infinite value stops the run: go back to the last good checkpoint and change what follows.",
        "In fp16, prefer bf16 or fp32.",
    ],
    "inconsistent_format": [
        "Check the chat template and that the end-of-turn token is trained (`sftlab check` shows it).",
        "Make the training examples more consistent in format.",
        "Train longer.",
        "Read the outputs in samples_during_training.jsonl.",
    ],
    "zero_loss": [
        "A loss of exactly 0 trains nothing: check that some labels are not -100 (`sftlab check` shows the trained "
        "part of each example and the trained-token share).",
        "With a response template or assistant-only loss, check that its markers occur in the rendered data.",
        "Check that the collator keeps the labels (a custom collator or `labels` column can zero them).",
    ],
    "eval_non_finite": [
        "An eval loss of NaN while training stays finite usually means eval batches without a trained token (0/0): "
        "check what max_length cuts from the eval examples (`sftlab check`), and the eval data's format.",
    ],
    "healthy": ["Evaluate the best checkpoint on held-out prompts before using it."],
    "no_eval_data": ["Hold out an eval set (data.eval_split or data.eval) and evaluate regularly (eval_steps)."],
}

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
RENDER_ADVICE = 2  # the terminal form shows the first two remedies of each warning; --json has them all


# --------------------------------------------------------------------------- results


@dataclass
class Finding:
    code: str
    severity: str  # "info" | "warning" | "error"
    steps: tuple[int, int]  # first and last step concerned
    evidence: str  # the numbers that triggered it
    advice: list[str]

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "steps": [int(self.steps[0]), int(self.steps[1])],
                "evidence": self.evidence, "advice": list(self.advice)}


@dataclass
class Diagnosis:
    phase: str
    findings: list[Finding]
    summary: str = ""  # one line on the curve behind the phase, for `render`
    notes: list[str] = field(default_factory=list)  # context without a finding (e.g. a gap that is not small)

    def to_json(self) -> dict:
        return {"phase": self.phase, "findings": [finding.to_json() for finding in self.findings]}

    def codes(self) -> set[str]:
        return {finding.code for finding in self.findings}

    def render(self) -> str:
        phase = self.phase.replace("_", " ")
        lines = [f"phase: {phase}" + (f" ({self.summary})" if self.summary else "")]
        for finding in self.findings:
            first, last = finding.steps
            where = f"step {first}" if first == last else f"steps {first}-{last}"
            lines.append(f"{finding.severity.upper()} {finding.code} ({where}): {finding.evidence}")
            if finding.severity != "info":
                lines += [f"  - {advice}" for advice in finding.advice[:RENDER_ADVICE]]
        lines += [f"note: {note}" for note in self.notes]
        if not self.findings and not self.notes:
            lines.append("no findings")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading values


_NON_FINITE = {"nan": math.nan, "+nan": math.nan, "-nan": math.nan, "inf": math.inf, "+inf": math.inf,
               "infinity": math.inf, "+infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}


def _value(value) -> float | None:
    """A metric as a float (NaN/inf included, from floats or sftlab's strings); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value.strip().lower())
    return None


def _step(record: dict) -> int | None:
    step = _value(record.get("step"))
    return int(step) if step is not None and math.isfinite(step) else None


def _series(records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, in step order; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for record in records:
        if not isinstance(record, dict) or "train_runtime" in record:  # end-of-run summary
            continue
        step, value = _step(record), _value(record.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=float)


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.0f}%" if old else "n/a"


# --------------------------------------------------------------------------- robust statistics


def _mad_scale(values: np.ndarray) -> float:
    """Robust standard deviation: 1.4826 x median absolute deviation."""
    if len(values) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _rolling_median(values: np.ndarray, window: int, centered: bool = True) -> np.ndarray:
    """Median of each log's window: centered (truncated at the ends), or trailing (the log and those before it)."""
    n = len(values)
    if centered:
        half = window // 2
        padded = np.concatenate([np.full(half, np.nan), values, np.full(half, np.nan)])
        if n == 0:
            return np.empty(0)
        return np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)
    return np.array([np.median(values[max(0, i - window + 1):i + 1]) for i in range(min(n, window - 1))]
                    + list(np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=1) if n >= window else []))


def _trailing(values: np.ndarray, window: int, statistic) -> np.ndarray:
    """statistic(values[max(0, i - window):i]) for i in 0..len(values) (the window before each index), vectorized:
    `statistic(rows, axis)` gets a 2-D array of windows."""
    n = len(values)
    out = np.full(n + 1, np.nan)
    for i in range(1, min(n, window - 1) + 1):  # the first, shorter windows
        out[i] = statistic(values[:i][None, :], 1)[0]
    if n >= window:
        rows = np.lib.stride_tricks.sliding_window_view(values, window)  # rows[k] = values[k:k + window]
        out[window:] = statistic(rows, 1)
    return out


def _median_rows(rows: np.ndarray, axis: int) -> np.ndarray:
    return np.median(rows, axis=axis)


def _mad_rows(rows: np.ndarray, axis: int) -> np.ndarray:
    return 1.4826 * np.median(np.abs(rows - np.median(rows, axis=axis, keepdims=True)), axis=axis)


def _theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Median of pairwise slopes: a trend that a few spikes cannot bend."""
    if len(x) > 120:  # O(n^2) pairs; an even subsample keeps it fast
        pick = np.linspace(0, len(x) - 1, 120).round().astype(int)
        x, y = x[pick], y[pick]
    i, j = np.triu_indices(len(x), k=1)
    dx = (x[j] - x[i]).astype(float)
    ok = dx != 0
    if not ok.any():
        return 0.0
    return float(np.median((y[j] - y[i])[ok] / dx[ok]))


def _start_level(values: np.ndarray) -> float:
    """The loss the run started from: the median of its first logs (a tenth of them, 3 to 10), or the first log
    itself when it stands far above the next ones (it averaged the steps of a sharp initial drop)."""
    k = min(len(values), max(3, min(10, len(values) // 10)))
    head = float(np.median(values[:k]))
    if len(values) > 2:
        rest = float(np.median(values[1:k + 1]))
        if values[0] - rest > START_Z * _relative_noise(values) * abs(rest) and values[0] > head:
            return float(values[0])
    return head


def _end_level(values: np.ndarray) -> float:
    """The loss now: the median of the last logs (a fifth of them, 2 to 10)."""
    k = min(len(values), max(2, min(10, len(values) // 5)))
    return float(np.median(values[-k:]))


def _level_at(steps: np.ndarray, values: np.ndarray, step: int) -> float | None:
    """Train loss at `step`: the median of the last logs at or before it (a tenth of them, 3 to 50). Single logs are
    far too noisy; the median lags a falling curve a little, which only makes the train/eval gap look smaller."""
    if len(values) == 0:
        return None
    upto = int(np.searchsorted(steps, step, side="right"))
    if upto == 0:
        return float(np.median(values[:3]))
    k = max(3, min(50, upto // 10))
    return float(np.median(values[max(0, upto - k):upto]))


# --------------------------------------------------------------------------- diagnosis


def diagnose(records: list[dict], samples: list[dict] = (), memorization_loss: float = 0.05) -> Diagnosis:
    """The phase of a run and its findings, from its logged metrics and sampled generations."""
    records = [record for record in (records or []) if isinstance(record, dict)]
    train_steps_all, train_all = _series(records, "loss")
    eval_steps_all, eval_all = _series(records, "eval_loss")
    grad_steps_all, grad_all = _series(records, "grad_norm")
    lr_steps, lr = _finite(*_series(records, "learning_rate"))
    train_steps, train = _finite(train_steps_all, train_all)
    eval_steps, evals = _finite(eval_steps_all, eval_all)
    grad_steps, grad = _finite(grad_steps_all, grad_all)
    epochs = _epochs(records)

    phase, summary = _phase(train_steps, train)
    findings: list[Finding] = []
    notes: list[str] = []
    zero = _zero_loss(train_steps, train, grad)

    # instability: non-finite values first (they stop the run), then the curve's own signs
    instability: list[tuple[str, int, int, str]] = []  # (severity, first, last, evidence)
    bad = [(int(s), name, v) for name, steps, values in (("loss", train_steps_all, train_all),
                                                       ("eval_loss", eval_steps_all, eval_all),
                                                       ("grad_norm", grad_steps_all, grad_all))
           for s, v in zip(steps, values) if not math.isfinite(v)]
    only_eval = bool(bad) and all(name == "eval_loss" for _, name, _ in bad)
    if bad:
        bad.sort()
        first_step, name, value = bad[0]
        names = sorted({b[1] for b in bad})
        context = (" while train loss and grad_norm stay finite: the eval numbers (and the best checkpoint) cannot be "
                   "trusted" if only_eval else "")
        instability.append(("error", first_step, bad[-1][0],
                            f"{name} is {value} at step {first_step} ({len(bad)} non-finite value(s) in "
                            f"{', '.join(names)}){context}"))
    jumps, frequent, still_up = _spikes(train_steps, train)
    divergence = _divergence(train_steps, train) or _ended_above_start(train_steps, train)
    if divergence:
        phase = DIVERGING
    instability += jumps + frequent + divergence + _grad_explosions(grad_steps, grad, train_steps, train)
    if instability:
        severity = "error" if any(item[0] == "error" for item in instability) else "warning"
        advice = ([ADVICE["non_finite"][0]] + ADVICE["instability"] + ADVICE["non_finite"][1:]) if bad else ADVICE["instability"]
        if only_eval:
            advice = ADVICE["eval_non_finite"] + advice
        findings.append(Finding("instability", severity, (min(i[1] for i in instability), max(i[2] for i in instability)),
                                "; ".join(item[3] for item in instability), advice))
    # a train loss that jumped or climbed and stays up: a rising eval loss is then instability, not overfitting
    train_rising = still_up or bool(divergence)

    if len(evals):
        overfit = _overfitting(train_steps, train, eval_steps, evals, train_rising)
        if overfit:
            findings.append(overfit)
    elif len(train):
        findings.append(Finding("no_eval_data", "info", (int(train_steps[0]), int(train_steps[-1])),
                                "no eval loss was logged, so overfitting and the train/eval gap cannot be checked",
                                ADVICE["no_eval_data"]))

    # a loss of exactly 0 is a bug, not a model that learned (underfitting and memorization say nothing then)
    underfit = None if train_rising or zero else _underfitting(train_steps, train, eval_steps, evals, lr_steps, lr,
                                                               phase)
    for rule in (zero, underfit,
                 None if zero else _memorization(train_steps, train, eval_steps, evals, memorization_loss, epochs),
                 _inconsistent_format(samples)):
        if rule:
            findings.append(rule)

    serious = any(finding.severity in {"warning", "error"} for finding in findings)
    if not serious and len(train) and len(evals):
        eval_now, eval_step = float(evals[-1]), int(eval_steps[-1])
        train_now = _level_at(train_steps, train, eval_step)
        gap = eval_now - train_now
        share = f" ({gap / eval_now * 100:+.0f}% of eval loss)" if abs(eval_now) >= 2 * HEALTHY_GAP_ABS else ""
        numbers_ = f"train loss {_fmt(train_now)} and eval loss {_fmt(eval_now)} at step {eval_step}: gap {gap:+.3g}{share}"
        if gap <= max(HEALTHY_GAP_REL * abs(eval_now), HEALTHY_GAP_ABS):
            findings.append(Finding("healthy", "info", (int(train_steps[0]), int(max(train_steps[-1], eval_steps[-1]))),
                                    f"no warning signs; {numbers_}", ADVICE["healthy"]))
        else:
            notes.append(f"no warning signs, but the train/eval gap is not small: {numbers_}")

    findings.sort(key=lambda finding: _SEVERITY_ORDER.get(finding.severity, 3))
    return Diagnosis(phase=phase, findings=findings, summary=summary, notes=notes)


def _phase(steps: np.ndarray, loss: np.ndarray) -> tuple[str, str]:
    n = len(loss)
    if n == 0:
        return NOT_STARTED, "no train loss logged yet"
    summary = f"train loss {_fmt(loss[0])} at step {steps[0]}, {_fmt(_end_level(loss))} at step {steps[-1]}"
    if n < PHASE_MIN_POINTS:
        return "initial_sharp_drop", summary
    start, end = _start_level(loss), _end_level(loss)
    window = max(3, math.ceil(PHASE_WINDOW_SHARE * n))
    recent_steps, recent = steps[-window:], loss[-window:]
    slope = _theil_sen_slope(recent_steps, recent)
    decline = -slope * float(recent_steps[-1] - recent_steps[0])
    # a change fitted through noise (noise is only measurable on enough logs: a few logs of a sharp drop are all trend)
    noise = _relative_noise(loss) * end if n >= PHASE_NOISE_MIN_POINTS else 0.0
    uncertainty = PHASE_Z * noise * math.sqrt(12 / len(recent))
    if abs(decline) <= max(CONVERGED_REL * max(end, CONVERGED_FLOOR_SHARE * start), uncertainty):
        return "converged", summary
    average_rate = (start - end) / max(float(steps[-1] - steps[0]), 1.0)
    if average_rate > 0 and -slope >= SHARP_RATE_RATIO * average_rate:
        return "initial_sharp_drop", summary
    return "gradual_stabilization", summary


def _spikes(steps: np.ndarray, loss: np.ndarray) -> tuple[list, list, bool]:
    """Jumps far above the local level: benign when they recover (unless frequent), a warning when they do not.

    Returns (unrecovered jumps, frequent recovered spikes) as (severity, first step, last step, evidence), and
    whether the loss is still up at the last log after a jump.
    """
    n, i = len(loss), SPIKE_MIN_HISTORY
    logs = np.log(np.maximum(loss, 1e-8))  # SFT loss noise is roughly multiplicative: measure it in log space
    # for each log, from the logs before it: the local level, the local spread, and the longer log-to-log noise
    # (8 logs can look deceptively calm); windowed statistics are computed at once for long runs
    local_level = _trailing(logs, SPIKE_WINDOW, _median_rows)
    local_spread = _trailing(logs, SPIKE_WINDOW, _mad_rows)
    diff_noise = np.nan_to_num(np.concatenate([[np.nan], _trailing(np.diff(logs), SPIKE_NOISE_HISTORY - 1, _mad_rows)]))
    diff_noise /= math.sqrt(2)
    recovered, unrecovered = [], []
    while i < n:
        level = float(np.exp(local_level[i]))
        scale = max(float(local_spread[i]), float(diff_noise[i]), SPIKE_MIN_SCALE_REL)
        if not (logs[i] - local_level[i] > SPIKE_Z * scale
                and loss[i] > level * (1 + SPIKE_MIN_REL) and loss[i] - level > SPIKE_MIN_ABS):
            i += 1
            continue
        back = level * max(1 + SPIKE_RECOVERED_REL, math.exp(3 * scale))
        after = loss[i + 1:i + 1 + SPIKE_RECOVERY_POINTS]
        back_at = next((k for k, value in enumerate(after) if value <= back), None)
        if back_at is not None:
            recovered.append(i)
            i += back_at + 1
        elif len(after) >= SPIKE_MIN_AFTER:
            later = np.nonzero(loss[i + 1:] <= back)[0]
            end = i + int(later[0]) if len(later) else n - 1
            unrecovered.append((i, end, level))
            i = end + 1
        else:
            break  # a spike at the last log or two: pending, judged at the next evaluation
    found, frequent = [], []
    for start, end, level in unrecovered:
        peak = float(np.max(loss[start:end + 1]))
        still = "" if end < n - 1 else " and is still up"
        found.append(("warning", int(steps[start]), int(steps[end]),
                      f"train loss jumped from {_fmt(level)} to {_fmt(loss[start])} at step {steps[start]} "
                      f"(peak {_fmt(peak)}, {_pct(peak, level)}) and did not recover within {SPIKE_RECOVERY_POINTS} logs{still}"))
    if len(recovered) >= SPIKE_FREQUENT_COUNT and len(recovered) / n >= SPIKE_FREQUENT_SHARE:
        frequent.append(("warning", int(steps[recovered[0]]), int(steps[recovered[-1]]),
                      f"{len(recovered)} loss spikes in {n} logs (steps {', '.join(str(steps[k]) for k in recovered[:6])}"
                      f"{', ...' if len(recovered) > 6 else ''}): frequent even though each recovered"))
    return found, frequent, any(end == n - 1 for _, end, _ in unrecovered)


def _divergence(steps: np.ndarray, loss: np.ndarray) -> list[tuple[str, int, int, str]]:
    """A sustained rise of the smoothed train loss above its minimum."""
    n = len(loss)
    if n < DIVERGE_MIN_POINTS:
        return []
    window = max(DIVERGE_WINDOW, min(DIVERGE_MAX_WINDOW, n // 20))
    if n < 2 * window + DIVERGE_WINDOW:
        return []
    logs = np.log(np.maximum(loss, 1e-8))  # multiplicative noise: compare levels as ratios
    smooth = _rolling_median(logs, window, centered=False)[window - 1:]
    lowest = int(np.argmin(smooth))
    minimum, now, before = float(smooth[lowest]), float(smooth[-1]), float(smooth[-1 - window])
    # the standard error of a median of `window` logs is 1.25 sigma / sqrt(window); the lowest of K independent
    # medians lies about sqrt(2 ln K) standard errors below the level, so the margin grows with the run
    error = 1.25 * _noise(logs[-200:]) / math.sqrt(window)
    z = DIVERGE_Z + math.sqrt(2 * math.log(max(n / window, 1.0)))
    threshold = max(math.log(1 + DIVERGE_REL), z * error)
    low, high = math.exp(minimum), math.exp(now)
    if (now - minimum > threshold and before - minimum > threshold and high - low > SPIKE_MIN_ABS
            and len(smooth) - 1 - window > lowest):
        at = lowest + window - 1
        return [("warning", int(steps[at]), int(steps[-1]),
                 f"smoothed train loss rose from {_fmt(low)} at step {steps[at]} to {_fmt(high)} at step {steps[-1]} "
                 f"({_pct(high, low)})")]
    return []


def _noise(values: np.ndarray) -> float:
    """Log-to-log noise, whatever the trend: the robust spread of successive differences, over sqrt(2)."""
    return _mad_scale(np.diff(values)) / math.sqrt(2) if len(values) > 2 else 0.0


def _relative_noise(values: np.ndarray) -> float:
    """Log-to-log noise as a share of the level (SFT loss noise is roughly multiplicative), over up to 200 logs."""
    return _noise(np.log(np.maximum(values[-200:], 1e-8)))


def _grad_explosions(steps: np.ndarray, grad: np.ndarray, train_steps: np.ndarray,
                     train: np.ndarray) -> list[tuple[str, int, int, str]]:
    exploded, worst = [], (0.0, 0, 0.0)  # indices; (ratio, index, reference)
    references = _trailing(grad, SPIKE_WINDOW, _median_rows)
    for i in range(GRAD_MIN_HISTORY, len(grad)):
        reference = float(references[i])
        if reference <= 0 or _quiet(steps[i], grad[i], train_steps, train):
            continue
        ratio = grad[i] / reference
        if ratio >= GRAD_EXPLOSION_FACTOR:
            exploded.append(i)
            if ratio > worst[0]:
                worst = (ratio, i, reference)
    if not exploded:
        return []
    longest = run = 1
    for a, b in zip(exploded, exploded[1:]):
        run = run + 1 if b == a + 1 else 1
        longest = max(longest, run)
    if longest >= GRAD_EXPLOSION_RUN or len(exploded) >= GRAD_EXPLOSION_COUNT or worst[0] >= GRAD_EXTREME_FACTOR:
        ratio, at, reference = worst
        return [("warning", int(steps[exploded[0]]), int(steps[exploded[-1]]),
                 f"grad_norm reached {_fmt(grad[at])} at step {steps[at]}, {ratio:.0f}x its recent median {_fmt(reference)} "
                 f"({len(exploded)} log(s) at {GRAD_EXPLOSION_FACTOR:.0f}x or more)")]
    return []


def _quiet(step: int, value: float, train_steps: np.ndarray, train: np.ndarray) -> bool:
    """A grad-norm blip while the train loss sits near 0 (the median of the logs before it): harmless."""
    before = train[train_steps < step][-SPIKE_WINDOW:]
    return len(before) > 0 and float(np.median(before)) < GRAD_QUIET_LOSS and value < GRAD_QUIET_MAX


def _ended_above_start(steps: np.ndarray, loss: np.ndarray) -> list[tuple[str, int, int, str]]:
    """A loss that ends far above where it started and stays there, even in a short run (too few logs for
    `_divergence`'s smoothing)."""
    if len(loss) < ZERO_LOSS_EARLY_LOGS + DIVERGE_END_POINTS:
        return []
    start, tail = _start_level(loss), loss[-DIVERGE_END_POINTS:]
    if start <= 0 or not np.all(tail >= start * (1 + DIVERGE_END_REL)) or float(np.min(tail)) - start <= SPIKE_MIN_ABS:
        return []
    rose = int(np.argmax(loss >= start * (1 + DIVERGE_END_REL)))
    now = float(np.median(tail))
    return [("warning", int(steps[rose]), int(steps[-1]),
             f"train loss ended at {_fmt(now)}, {_pct(now, start)} above where it started ({_fmt(start)}), "
             f"above it since step {steps[rose]}: the run diverged")]


def _overfitting(train_steps, train, eval_steps, evals, train_rising: bool) -> Finding | None:
    n = len(evals)
    if n < OVERFIT_MIN_EVALS:
        return None
    # 1. eval loss rising above its minimum at the last evaluations, while train loss falls (or holds)
    lowest = int(np.argmin(evals))
    minimum, now = float(evals[lowest]), float(evals[-1])
    margin = max(EVAL_RISE_REL * abs(minimum), EVAL_RISE_ABS)
    tail = evals[-EVAL_RISE_POINTS:]
    if n - 1 - lowest >= EVAL_RISE_POINTS and np.all(tail > minimum + margin):
        trend = _train_trend(train_steps, train, int(eval_steps[lowest]), int(eval_steps[-1]))
        if trend is None:
            context = "(no train loss logged)"
        elif not trend[2] and not train_rising:
            train_then, train_now, _ = trend
            context = f"while train loss went from {_fmt(train_then)} to {_fmt(train_now)}"
        else:
            context = None  # train loss rises too: the curve is unstable, not overfitting
        if context is not None:
            severity = "error" if now >= minimum * (1 + OVERFIT_ERROR_REL) else "warning"
            return Finding("overfitting", severity, (int(eval_steps[lowest]), int(eval_steps[-1])),
                           f"eval loss rose from its minimum {_fmt(minimum)} at step {eval_steps[lowest]} to {_fmt(now)} "
                           f"at step {eval_steps[-1]} ({_pct(now, minimum)}) {context}", ADVICE["overfitting"])
    # 2. eval loss falling much more slowly than train loss, the gap widening. The train loss is a robust
    #    line through its logs over the recent half of the evaluations: single logs are far too noisy.
    if n < SLOW_MIN_EVALS:
        return None
    first = n - max(OVERFIT_MIN_EVALS, math.ceil(n / 2))
    s0, s1 = int(eval_steps[first]), int(eval_steps[-1])
    inside = (train_steps > s0 - 1e-9) & (train_steps <= s1)
    if inside.sum() < SLOW_MIN_TRAIN_LOGS:
        return None
    xs, ys = train_steps[inside].astype(float), train[inside]
    slope = _theil_sen_slope(xs, ys)
    intercept = float(np.median(ys - slope * xs))
    train_at = [intercept + slope * float(s) for s in eval_steps[first:]]
    gaps = [float(e) - t for e, t in zip(evals[first:], train_at)]
    train_drop = train_at[0] - train_at[-1]
    eval_drop = float(evals[first] - evals[-1])
    widened = gaps[-1] - gaps[0]
    # the standard error of a change fitted through m noisy logs is sigma * sqrt(12 / m)
    uncertainty = SLOW_Z * _relative_noise(train) * float(np.median(ys)) * math.sqrt(12 / len(ys))
    if (train_drop >= max(SLOW_TRAIN_DROP_REL * abs(train_at[0]), SLOW_TRAIN_DROP_ABS)
            and eval_drop < SLOW_EVAL_RATIO * train_drop
            and widened >= max(GAP_WIDEN_REL * abs(evals[-1]), GAP_WIDEN_ABS, uncertainty)
            and gaps[-1] >= float(np.median(gaps))  # still wide at the end, not closing again
            and gaps[-1] > max(HEALTHY_GAP_REL * abs(evals[-1]), HEALTHY_GAP_ABS)):  # and the gap is no longer small
        return Finding("overfitting", "warning", (s0, s1),
                       f"from step {s0} to {s1} train loss fell {_fmt(train_at[0])} -> {_fmt(train_at[-1])} "
                       f"({_pct(train_at[-1], train_at[0])}) but eval loss only {_fmt(evals[first])} -> {_fmt(evals[-1])} "
                       f"({_pct(evals[-1], evals[first])}); the gap widened from {gaps[0]:.3g} to {gaps[-1]:.3g}",
                       ADVICE["overfitting"])
    return None


def _train_trend(steps: np.ndarray, loss: np.ndarray, first: int, last: int) -> tuple[float, float, bool] | None:
    """Train loss at `first` and `last` (a robust line through the logs between them) and whether it rose."""
    inside = (steps >= first) & (steps <= last)
    if inside.sum() >= 3:
        xs, ys = steps[inside].astype(float), loss[inside]
        slope = _theil_sen_slope(xs, ys)
        intercept = float(np.median(ys - slope * xs))
        then, now = intercept + slope * first, intercept + slope * last
        uncertainty = TRAIN_RISE_Z * _relative_noise(loss) * float(np.median(ys)) * math.sqrt(12 / len(ys))
    else:
        then, now = _level_at(steps, loss, first), _level_at(steps, loss, last)
        if then is None:
            return None
        uncertainty = 0.0
    return then, now, now - then > max(OVERFIT_TRAIN_FLAT_REL * abs(then), uncertainty)


def _underfitting(train_steps, train, eval_steps, evals, lr_steps, lr, phase: str) -> Finding | None:
    n = len(train)
    if n < UNDERFIT_MIN_POINTS:
        return None
    if len(lr) >= 2 and lr[-1] > lr[-2] and lr_steps[-1] >= train_steps[-1] - 1:
        return None  # still warming up: the learning rate has not reached its peak yet
    if phase == "initial_sharp_drop":
        return None  # the loss still falls at its initial rate: too early to say it will not improve
    peak_step = int(lr_steps[int(np.argmax(lr))]) if len(lr) else 0
    if train_steps[-1] < max(UNDERFIT_MIN_STEPS, UNDERFIT_AFTER_WARMUP * peak_step):
        return None  # too few steps at full learning rate to expect an improvement
    start, end = _start_level(train), _end_level(train)
    if start <= 0:
        return None
    slope = _theil_sen_slope(train_steps.astype(float), train)
    fitted = -slope * float(train_steps[-1] - train_steps[0]) / start
    improvement = max((start - end) / start, fitted)  # either estimate seeing a real fall is enough
    # the fitted change through n logs has a standard error of sigma * sqrt(12 / n): noise must not hide a fall
    uncertainty = UNDERFIT_Z * _relative_noise(train) * math.sqrt(12 / n)
    if improvement >= UNDERFIT_REL - uncertainty or improvement < -UNDERFIT_REL:
        return None  # improved (or may have: too noisy to say), or rose (instability's business, not underfitting)
    if len(evals) >= 2 and evals[0] > 0 and (evals[0] - np.min(evals)) / evals[0] >= UNDERFIT_EVAL_REL:
        return None  # eval loss did improve
    eval_part = (f"; eval loss {_fmt(evals[0])} -> {_fmt(evals[-1])} ({_pct(evals[-1], evals[0])})"
                 if len(evals) >= 2 and evals[0] else "")
    return Finding("underfitting", "warning", (int(train_steps[0]), int(train_steps[-1])),
                   f"train loss went from {_fmt(start)} to {_fmt(end)} ({_pct(end, start)}) over steps "
                   f"{train_steps[0]}-{train_steps[-1]}: less than {UNDERFIT_REL:.0%} improvement{eval_part}",
                   ADVICE["underfitting"])


def _memorization(train_steps, train, eval_steps, evals, threshold: float, epochs: float) -> Finding | None:
    """An extremely low train loss: below the absolute threshold, or a tiny fraction of where it started after many
    epochs (a loss that starts high ends above any fixed threshold however well the data is memorized)."""
    if len(train) < MEMO_MIN_POINTS:
        return None
    now, start = float(np.median(train[-MEMO_MIN_POINTS:])), _start_level(train)
    relative = (epochs >= MEMO_MIN_EPOCHS and len(train) >= MEMO_REL_MIN_POINTS and start > 0
                and now <= MEMO_REL * start)
    if now >= threshold and not relative:
        return None
    limit = threshold if now < threshold else MEMO_REL * start
    reasons = ([f"below {_fmt(threshold)}"] if now < threshold else []) + (
        [f"{now / start:.1%} of its start {_fmt(start)} after {epochs:.0f} epochs"] if relative else [])
    smooth = _rolling_median(train, 3)
    above = np.nonzero(smooth >= limit)[0]
    since = min(int(above[-1]) + 1, len(train) - 1) if len(above) else 0
    steps = (int(train_steps[since]), int(train_steps[-1]))
    low = f"train loss {_fmt(now)} ({'; '.join(reasons)}) since step {steps[0]}"
    if not len(evals):
        return Finding("memorization", "warning", steps,
                       f"{low}, with no eval loss to tell memorization from an easy, deterministic task",
                       ADVICE["memorization"])
    eval_now = float(evals[-1])
    if eval_now >= MEMO_EVAL_HIGH_FACTOR * limit:
        return Finding("memorization", "warning", (steps[0], max(steps[1], int(eval_steps[-1]))),
                       f"{low} while eval loss is {_fmt(eval_now)} at step {eval_steps[-1]}: "
                       f"training examples are reproduced, held-out ones are not", ADVICE["memorization"])
    return Finding("memorization", "info", (steps[0], max(steps[1], int(eval_steps[-1]))),
                   f"{low}, and eval loss is very low too ({_fmt(eval_now)} at step {eval_steps[-1]}): "
                   f"consistent with a deterministic task rather than memorization",
                   ADVICE["memorization_low_both"])


def _zero_loss(steps: np.ndarray, loss: np.ndarray, grad: np.ndarray) -> Finding | None:
    """A train loss of exactly 0 from the first logs: no token is trained."""
    zero = np.abs(loss) <= ZERO_LOSS_MAX
    if len(loss) < ZERO_LOSS_EARLY_LOGS or not zero[:ZERO_LOSS_EARLY_LOGS].all() or zero.mean() < ZERO_LOSS_SHARE:
        return None
    flat_grad = f", grad_norm {_fmt(float(np.max(np.abs(grad))))} at most" if len(grad) else ""
    return Finding("zero_loss", "error", (int(steps[0]), int(steps[-1])),
                   f"train loss is 0 at {int(zero.sum())} of {len(loss)} logs, from step {steps[0]}{flat_grad}: "
                   f"nothing is being trained (a masking or label bug), which is not memorization", ADVICE["zero_loss"])


def _epochs(records) -> float:
    """The epochs the logs reach (0 when they do not say)."""
    _, epochs = _finite(*_series(records, "epoch"))
    return float(epochs.max()) if len(epochs) else 0.0


def _format_shares(samples) -> list[tuple[int, float, int]]:
    """(step, share of samples that end with the end-of-turn token and follow the format, samples) per evaluation."""
    by_step: dict[int, list[bool]] = {}
    for sample in samples or ():
        if not isinstance(sample, dict) or not isinstance(sample.get("ends_with_end_of_turn"), bool):
            continue
        step = _step(sample)
        if step is None:
            continue
        good = sample["ends_with_end_of_turn"] and sample.get("follows_format") is not False
        by_step.setdefault(step, []).append(good)
    return [(step, sum(oks) / len(oks), len(oks)) for step, oks in sorted(by_step.items())]


def _inconsistent_format(samples) -> Finding | None:
    shares = _format_shares(samples)
    if len(shares) < FORMAT_MIN_EVALS:
        return None
    values = [share for _, share, _ in shares]
    size = max(count for _, _, count in shares)
    what = f"share of sampled answers that end with the end-of-turn token and follow the format ({size} per evaluation)"
    # falling: the last evaluations are well below the best earlier one
    best = int(np.argmax(values[:-FORMAT_DROP_POINTS]))
    if all(v <= values[best] - FORMAT_DROP for v in values[-FORMAT_DROP_POINTS:]):
        return Finding("inconsistent_format", "warning", (shares[best][0], shares[-1][0]),
                       f"{what} fell from {values[best]:.0%} at step {shares[best][0]} to {values[-1]:.0%} at step {shares[-1][0]}",
                       ADVICE["inconsistent_format"])
    # unstable: it keeps falling back by large amounts
    window = shares[-FORMAT_WINDOW:]
    drops = [(a, b) for a, b in zip(window, window[1:]) if a[1] - b[1] >= FORMAT_SWING]
    if len(drops) >= FORMAT_SWINGS:
        listed = ", ".join(f"{v:.0%}" for _, v, _ in window)
        return Finding("inconsistent_format", "warning", (window[0][0], window[-1][0]),
                       f"{what} is unstable: {listed} over steps {window[0][0]}-{window[-1][0]} "
                       f"({len(drops)} drops of {FORMAT_SWING:.0%} or more)", ADVICE["inconsistent_format"])
    return None


# --------------------------------------------------------------------------- reading runs

_EXPECTED = ("an sftlab run directory (with metrics.jsonl), a metrics.jsonl, "
             "or a trainer_state.json from a transformers/TRL run (or a checkpoint directory holding one)")


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
        checkpoints = sorted((int(m.group(1)), child) for child in _list(path)
                             if (m := re.fullmatch(r"checkpoint-(\d+)", child.name)) and (child / TRAINER_STATE_FILE).is_file())
        if checkpoints:  # a transformers output_dir: the latest checkpoint's state holds the whole history
            return _read_trainer_state(checkpoints[-1][1] / TRAINER_STATE_FILE), []
        raise UserError(f"{path}: no {METRICS_FILE} or {TRAINER_STATE_FILE} in this directory", hint=f"pass {_EXPECTED}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path), _samples_next_to(path) if path.name == METRICS_FILE else []
    if path.suffix == ".json":
        return _read_trainer_state(path), []
    raise UserError(f"{path}: unsupported file type {path.suffix or '(no extension)'}", hint=f"pass {_EXPECTED}")


def _list(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as error:
        raise UserError(f"{directory}: cannot read the directory ({error.strerror or error})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file", hint=f"pass {_EXPECTED}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the file ({error.strerror or error})") from None


def _read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSONL file; invalid lines (a last line cut by a kill) are skipped."""
    records, lines = [], 0
    for line in _read_text(path).splitlines():
        if not line.strip():
            continue
        lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    if lines and not records:
        raise UserError(f"{path}: no JSON object on any line; expected JSON Lines, one record per line",
                        hint=f"pass {_EXPECTED}")
    return records


def _samples_next_to(metrics: Path) -> list[dict]:
    samples = metrics.with_name(SAMPLES_FILE)
    return _read_jsonl(samples) if samples.is_file() else []


def _read_trainer_state(path: Path) -> list[dict]:
    try:
        state = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON (line {error.lineno}): expected a trainer_state.json with a log_history",
                        hint=f"pass {_EXPECTED}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise UserError(f"{path}: no log_history list: expected a trainer_state.json written by transformers",
                        hint=f"pass {_EXPECTED}")
    return [record for record in history if isinstance(record, dict)]
