"""The chapter's instability sign (a learning rate too high): non-finite values, spikes, divergence, grad explosions.

Each rule returns its evidence as (severity, first step, last step, text); `instability`
joins them into one finding, so a run that spikes and then diverges reads as one problem
with all its numbers. Non-finite values come first: they stop the run (monitor.py).

A spike is a jump far above the local level that does not come back within a few logs (or
that keeps happening); divergence is a sustained rise of the smoothed loss above its
minimum, or a run that ends far above where it started; a gradient explosion is a grad
norm many times its recent median, lasting or repeated.

Trade-off: one recovered spike is not a warning, and a grad-norm blip while the loss sits
near 0 is not either: real runs have both, and a warning on every run is read by no one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sftlab.diagnose.curves import Curves
from sftlab.diagnose.findings import ADVICE, Finding
from sftlab.diagnose.signs import ZERO_LOSS_EARLY_LOGS
from sftlab.diagnose.stats import (
    fmt,
    log_to_log_noise,
    mad_rows,
    median_rows,
    pct,
    rolling_median,
    start_level,
    trailing,
)

Evidence = tuple[str, int, int, str]  # (severity, first step, last step, the numbers)

# Instability: spikes.
SPIKE_WINDOW = 8  # the local level is the median of the 8 previous logs ...
SPIKE_MIN_HISTORY = 4  # ... and there must be at least 4 of them.
SPIKE_Z = (
    6.0  # a spike is 6 robust standard deviations above the local level, in log space: noise almost never does that ...
)
SPIKE_NOISE_HISTORY = (
    50  # ... the noise being the larger of the 8 logs' spread and the log-to-log noise of the last 50 logs ...
)
SPIKE_MIN_SCALE_REL = 0.02  # ... floored at 2% (a very smooth curve has a spread near 0) ...
SPIKE_MIN_REL = 0.30  # ... and 30% above the local level ...
SPIKE_MIN_ABS = 0.05  # ... and 0.05 nats above it (near-zero losses jump by large ratios harmlessly).
SPIKE_RECOVERED_REL = (
    0.15  # a spike has recovered once the loss is back within 15% (or 3 noise scales) of the pre-spike level ...
)
SPIKE_RECOVERY_POINTS = 3  # ... within the next 3 logs; a loss that stays up for 3 logs did not recover ...
SPIKE_MIN_AFTER = (
    2  # ... and it takes at least 2 logs after the spike to say so (a spike at the last log is pending, not flagged).
)
SPIKE_FREQUENT_COUNT = 4  # recovered spikes are benign unless frequent: at least 4 of them ...
SPIKE_FREQUENT_SHARE = 0.05  # ... in at least 5% of the logs.
# Instability: divergence (a sustained rise rather than a jump), on the log of the loss (noise is multiplicative).
DIVERGE_MIN_POINTS = 15  # at least 15 train logs: a minimum, a rise, and two windows to confirm it.
DIVERGE_WINDOW = 5  # the loss is smoothed with a trailing median of 5 logs (or a twentieth of them ...
DIVERGE_MAX_WINDOW = (
    25  # ... up to 25: long runs logged every step need more smoothing, but a rise must still show within ~25 logs).
)
DIVERGE_REL = 0.30  # diverging: the smoothed loss ends 30% above its smoothed minimum ...
DIVERGE_Z = (
    3.0  # ... and 3 standard errors of a smoothed level above it, plus sqrt(2 ln K) more for the minimum of K noisy
)
#   windows (which sits that far below the true level by chance), at both of the last two non-overlapping windows
#   (a chance cluster of high logs does not last that long).
# Instability: gradient norm explosions (transformers logs the pre-clipping norm of one step, so it is noisy: x2-x5
# is common).
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


@dataclass(frozen=True)
class Instability:
    finding: Finding | None  # one finding with every sign's evidence, or None
    diverging: bool  # the loss climbs instead of settling: the phase is "diverging"
    train_rising: bool  # the train loss jumped or climbed and stays up: a rising eval loss is then no overfitting


def instability(curves: Curves) -> Instability:
    """Non-finite values first (they stop the run), then the curve's own signs."""
    train_steps, train = curves.train.finite()
    grad_steps, grad = curves.grad_norm.finite()
    found: list[Evidence] = []
    bad = [
        (int(s), name, v)
        for name, (steps, values) in (
            ("loss", curves.train),
            ("eval_loss", curves.eval),
            ("grad_norm", curves.grad_norm),
        )
        for s, v in zip(steps, values)
        if not math.isfinite(v)
    ]
    only_eval = bool(bad) and all(name == "eval_loss" for _, name, _ in bad)
    if bad:
        bad.sort()
        first_step, name, value = bad[0]
        names = sorted({b[1] for b in bad})
        context = (
            " while train loss and grad_norm stay finite: the eval numbers (and the best checkpoint) cannot be trusted"
            if only_eval
            else ""
        )
        found.append(
            (
                "error",
                first_step,
                bad[-1][0],
                f"{name} is {value} at step {first_step} ({len(bad)} non-finite value(s) in "
                f"{', '.join(names)}){context}",
            )
        )
    jumps, frequent, still_up = spikes(train_steps, train)
    diverged = divergence(train_steps, train) or ended_above_start(train_steps, train)
    found += jumps + frequent + diverged + grad_explosions(grad_steps, grad, train_steps, train)
    finding = None
    if found:
        severity = "error" if any(item[0] == "error" for item in found) else "warning"
        advice = (
            ([ADVICE["non_finite"][0]] + ADVICE["instability"] + ADVICE["non_finite"][1:])
            if bad
            else ADVICE["instability"]
        )
        if only_eval:
            advice = ADVICE["eval_non_finite"] + advice
        finding = Finding(
            "instability",
            severity,
            (min(i[1] for i in found), max(i[2] for i in found)),
            "; ".join(item[3] for item in found),
            advice,
        )
    return Instability(finding, diverging=bool(diverged), train_rising=still_up or bool(diverged))


def spikes(steps: np.ndarray, loss: np.ndarray) -> tuple[list, list, bool]:
    """Jumps far above the local level: benign when they recover (unless frequent), a warning when they do not.

    Returns (unrecovered jumps, frequent recovered spikes) as (severity, first step, last step, evidence), and
    whether the loss is still up at the last log after a jump.
    """
    n, i = len(loss), SPIKE_MIN_HISTORY
    logs = np.log(np.maximum(loss, 1e-8))  # SFT loss noise is roughly multiplicative: measure it in log space
    # for each log, from the logs before it: the local level, the local spread, and the longer log-to-log noise
    # (8 logs can look deceptively calm); windowed statistics are computed at once for long runs
    local_level = trailing(logs, SPIKE_WINDOW, median_rows)
    local_spread = trailing(logs, SPIKE_WINDOW, mad_rows)
    diff_noise = np.nan_to_num(np.concatenate([[np.nan], trailing(np.diff(logs), SPIKE_NOISE_HISTORY - 1, mad_rows)]))
    diff_noise /= math.sqrt(2)
    recovered, unrecovered = [], []
    while i < n:
        level = float(np.exp(local_level[i]))
        scale = max(float(local_spread[i]), float(diff_noise[i]), SPIKE_MIN_SCALE_REL)
        if not (
            logs[i] - local_level[i] > SPIKE_Z * scale
            and loss[i] > level * (1 + SPIKE_MIN_REL)
            and loss[i] - level > SPIKE_MIN_ABS
        ):
            i += 1
            continue
        back = level * max(1 + SPIKE_RECOVERED_REL, math.exp(3 * scale))
        after = loss[i + 1 : i + 1 + SPIKE_RECOVERY_POINTS]
        back_at = next((k for k, value in enumerate(after) if value <= back), None)
        if back_at is not None:
            recovered.append(i)
            i += back_at + 1
        elif len(after) >= SPIKE_MIN_AFTER:
            later = np.nonzero(loss[i + 1 :] <= back)[0]
            end = i + int(later[0]) if len(later) else n - 1
            unrecovered.append((i, end, level))
            i = end + 1
        else:
            break  # a spike at the last log or two: pending, judged at the next evaluation
    found, frequent = [], []
    for start, end, level in unrecovered:
        peak = float(np.max(loss[start : end + 1]))
        still = "" if end < n - 1 else " and is still up"
        found.append(
            (
                "warning",
                int(steps[start]),
                int(steps[end]),
                f"train loss jumped from {fmt(level)} to {fmt(loss[start])} at step {steps[start]} "
                f"(peak {fmt(peak)}, {pct(peak, level)}) "
                f"and did not recover within {SPIKE_RECOVERY_POINTS} logs{still}",
            )
        )
    if len(recovered) >= SPIKE_FREQUENT_COUNT and len(recovered) / n >= SPIKE_FREQUENT_SHARE:
        frequent.append(
            (
                "warning",
                int(steps[recovered[0]]),
                int(steps[recovered[-1]]),
                f"{len(recovered)} loss spikes in {n} logs (steps {', '.join(str(steps[k]) for k in recovered[:6])}"
                f"{', ...' if len(recovered) > 6 else ''}): frequent even though each recovered",
            )
        )
    return found, frequent, any(end == n - 1 for _, end, _ in unrecovered)


def divergence(steps: np.ndarray, loss: np.ndarray) -> list[tuple[str, int, int, str]]:
    """A sustained rise of the smoothed train loss above its minimum."""
    n = len(loss)
    if n < DIVERGE_MIN_POINTS:
        return []
    window = max(DIVERGE_WINDOW, min(DIVERGE_MAX_WINDOW, n // 20))
    if n < 2 * window + DIVERGE_WINDOW:
        return []
    logs = np.log(np.maximum(loss, 1e-8))  # multiplicative noise: compare levels as ratios
    smooth = rolling_median(logs, window, centered=False)[window - 1 :]
    lowest = int(np.argmin(smooth))
    minimum, now, before = float(smooth[lowest]), float(smooth[-1]), float(smooth[-1 - window])
    # the standard error of a median of `window` logs is 1.25 sigma / sqrt(window); the lowest of K independent
    # medians lies about sqrt(2 ln K) standard errors below the level, so the margin grows with the run
    error = 1.25 * log_to_log_noise(logs[-200:]) / math.sqrt(window)
    z = DIVERGE_Z + math.sqrt(2 * math.log(max(n / window, 1.0)))
    threshold = max(math.log(1 + DIVERGE_REL), z * error)
    low, high = math.exp(minimum), math.exp(now)
    if (
        now - minimum > threshold
        and before - minimum > threshold
        and high - low > SPIKE_MIN_ABS
        and len(smooth) - 1 - window > lowest
    ):
        at = lowest + window - 1
        return [
            (
                "warning",
                int(steps[at]),
                int(steps[-1]),
                f"smoothed train loss rose from {fmt(low)} at step {steps[at]} to {fmt(high)} at step {steps[-1]} "
                f"({pct(high, low)})",
            )
        ]
    return []


def grad_explosions(
    steps: np.ndarray, grad: np.ndarray, train_steps: np.ndarray, train: np.ndarray
) -> list[tuple[str, int, int, str]]:
    exploded, worst = [], (0.0, 0, 0.0)  # indices; (ratio, index, reference)
    references = trailing(grad, SPIKE_WINDOW, median_rows)
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
        return [
            (
                "warning",
                int(steps[exploded[0]]),
                int(steps[exploded[-1]]),
                f"grad_norm reached {fmt(grad[at])} at step {steps[at]}, "
                f"{ratio:.0f}x its recent median {fmt(reference)} "
                f"({len(exploded)} log(s) at {GRAD_EXPLOSION_FACTOR:.0f}x or more)",
            )
        ]
    return []


def _quiet(step: int, value: float, train_steps: np.ndarray, train: np.ndarray) -> bool:
    """A grad-norm blip while the train loss sits near 0 (the median of the logs before it): harmless."""
    before = train[train_steps < step][-SPIKE_WINDOW:]
    return len(before) > 0 and float(np.median(before)) < GRAD_QUIET_LOSS and value < GRAD_QUIET_MAX


def ended_above_start(steps: np.ndarray, loss: np.ndarray) -> list[tuple[str, int, int, str]]:
    """A loss that ends far above where it started and stays there, even in a short run (too few logs for
    `divergence`'s smoothing)."""
    if len(loss) < ZERO_LOSS_EARLY_LOGS + DIVERGE_END_POINTS:
        return []
    start, tail = start_level(loss), loss[-DIVERGE_END_POINTS:]
    if start <= 0 or not np.all(tail >= start * (1 + DIVERGE_END_REL)) or float(np.min(tail)) - start <= SPIKE_MIN_ABS:
        return []
    rose = int(np.argmax(loss >= start * (1 + DIVERGE_END_REL)))
    now = float(np.median(tail))
    return [
        (
            "warning",
            int(steps[rose]),
            int(steps[-1]),
            f"train loss ended at {fmt(now)}, {pct(now, start)} above where it started ({fmt(start)}), "
            f"above it since step {steps[rose]}: the run diverged",
        )
    ]
