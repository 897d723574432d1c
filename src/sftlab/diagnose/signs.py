"""The phase of a training loss curve, and the chapter's warning signs other than instability.

The phase is one of the chapter's three: an initial sharp drop, a gradual stabilization,
convergence (or `not_started` before the first log). The signs:
- overfitting: eval loss rising above its minimum while train loss falls, or falling much
  more slowly than train loss, the gap widening;
- underfitting: no significant improvement, once warmup and the initial drop are over;
- memorization: an extremely low train loss (absolutely, or relative to its start after
  many epochs), a warning when eval loss stays high;
- zero loss: a loss of exactly 0 from the first logs, which trains nothing (a bug);
- inconsistent format: the share of sampled answers that stop and follow the format falls,
  or keeps swinging;
- healthy: none of these, and a small train/eval gap.

Trade-off: every rule smooths, compares relative changes, and asks for a minimum of
evidence before it says anything: a single recovered spike, one eval point a little higher
than the previous one, or a short run with two or three evaluations is not a warning. A real
sign can therefore show an evaluation or two later than it could have.
"""

from __future__ import annotations

import math

import numpy as np

from sftlab.diagnose.curves import format_shares
from sftlab.diagnose.findings import ADVICE, NOT_STARTED, Finding
from sftlab.diagnose.stats import (
    end_level,
    fmt,
    level_at,
    pct,
    relative_noise,
    rolling_median,
    start_level,
    theil_sen_slope,
)

# --------------------------------------------------------------------------- thresholds
# Levels and noise are always estimated with medians (robust to the spikes we look for);
# changes are relative to the current loss level, with small absolute floors so that
# curves near zero (a deterministic task) do not turn tiny wiggles into large percentages.

# Phase.
PHASE_MIN_POINTS = 4  # fewer logged train losses than this: too early to see a shape; the run is in its first phase.
PHASE_WINDOW_SHARE = (
    0.25  # the "recent" part of the curve is its last quarter (at least 3 logs): long enough to average out noise.
)
CONVERGED_REL = 0.03  # converged when the recent quarter lowers the loss by less than 3% of its level: within typical
#   log-to-log noise.
CONVERGED_FLOOR_SHARE = 0.05  # ... relative to at least 5% of the initial loss, so a loss near 0 does not make 0.002 ->
#   0.001 look like 50%.
PHASE_Z = 3.0  # ... or by less than 3 standard errors of the fitted change (a noisy flat curve has a random slope).
PHASE_NOISE_MIN_POINTS = 8  # ... the log-to-log noise being measured once there are 8 logs.
SHARP_RATE_RATIO = (
    0.5  # still in the sharp drop while the recent rate of descent is at least half the average rate since the start
)
#   (an exponential decay keeps ~60% or more of its average rate during its first time constant, ~30% by the second).

# Underfitting.
UNDERFIT_MIN_POINTS = (
    10  # at least 10 train logs, not in warmup: the first evaluations of a run must not be called underfitting.
)
UNDERFIT_REL = 0.10  # "no significant improvement": the loss fell by less than 10% of its initial level (fine-tunes
#   usually fall 30%+),
#   by both the start/end levels and a robust line through all logs, once the initial drop is over.
UNDERFIT_MIN_STEPS = 50  # ... at least 50 optimizer steps ...
UNDERFIT_AFTER_WARMUP = (
    2  # ... and twice the warmup (the step of the peak learning rate): as long at full rate as warming up ...
)
UNDERFIT_Z = 1.5  # ... with a margin of 1.5 standard errors of the fitted fall: a very noisy curve needs more logs ...
UNDERFIT_EVAL_REL = 0.05  # ... and eval loss (far less noisy than train loss) did not improve by 5% either.

# Memorization.
MEMO_MIN_POINTS = 3  # the extremely low loss must hold for the last 3 logs (median), not one lucky batch.
MEMO_EVAL_HIGH_FACTOR = (
    4.0  # eval loss at 4x the memorization threshold or more (0.2 for 0.05) is "much higher": train is memorized.
)
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
OVERFIT_TRAIN_FLAT_REL = (
    0.02  # "while train loss falls": train may be flat (+2%), but if it rises too, that is instability, not overfitting
)
TRAIN_RISE_Z = (
    2.0  # ... "rises" meaning a fitted rise above 2% and above 2 standard errors of the fit (noise is not a rise).
)
OVERFIT_ERROR_REL = (
    0.15  # eval loss 15%+ above its minimum is an error: the last checkpoints are clearly worse than the best one.
)
SLOW_TRAIN_DROP_REL = (
    0.10  # widening gap: over the recent half of the evaluations train loss fell by at least 10% of its level ...
)
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
# Inconsistent format (shares of sampled generations that end with the end-of-turn token and follow the format).
FORMAT_MIN_EVALS = 3  # at least 3 evaluations with samples.
FORMAT_DROP = 0.30  # falling: the last shares are 30 points below the best earlier share (with 4 prompts, 2 answers
#   went wrong; one prompt flipping, 25 points, is noise) ...
FORMAT_DROP_POINTS = 2  # ... at the last 2 evaluations (one bad evaluation is not a trend).
FORMAT_WINDOW = 6  # unstable: within the last 6 evaluations ...
FORMAT_SWING = 0.30  # ... the share dropped by 30 points or more ...
FORMAT_SWINGS = 2  # ... at least twice (a share that rises unevenly while the model learns to stop is not unstable).


# --------------------------------------------------------------------------- phase


def phase_of(steps: np.ndarray, loss: np.ndarray) -> tuple[str, str]:
    n = len(loss)
    if n == 0:
        return NOT_STARTED, "no train loss logged yet"
    summary = f"train loss {fmt(loss[0])} at step {steps[0]}, {fmt(end_level(loss))} at step {steps[-1]}"
    if n < PHASE_MIN_POINTS:
        return "initial_sharp_drop", summary
    start, end = start_level(loss), end_level(loss)
    window = max(3, math.ceil(PHASE_WINDOW_SHARE * n))
    recent_steps, recent = steps[-window:], loss[-window:]
    slope = theil_sen_slope(recent_steps, recent)
    decline = -slope * float(recent_steps[-1] - recent_steps[0])
    # a change fitted through noise (noise is only measurable on enough logs: a few logs of a sharp drop are all trend)
    noise = relative_noise(loss) * end if n >= PHASE_NOISE_MIN_POINTS else 0.0
    uncertainty = PHASE_Z * noise * math.sqrt(12 / len(recent))
    if abs(decline) <= max(CONVERGED_REL * max(end, CONVERGED_FLOOR_SHARE * start), uncertainty):
        return "converged", summary
    average_rate = (start - end) / max(float(steps[-1] - steps[0]), 1.0)
    if average_rate > 0 and -slope >= SHARP_RATE_RATIO * average_rate:
        return "initial_sharp_drop", summary
    return "gradual_stabilization", summary


# --------------------------------------------------------------------------- warning signs


def overfitting(train_steps, train, eval_steps, evals, train_rising: bool) -> Finding | None:
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
            context = f"while train loss went from {fmt(train_then)} to {fmt(train_now)}"
        else:
            context = None  # train loss rises too: the curve is unstable, not overfitting
        if context is not None:
            severity = "error" if now >= minimum * (1 + OVERFIT_ERROR_REL) else "warning"
            return Finding(
                "overfitting",
                severity,
                (int(eval_steps[lowest]), int(eval_steps[-1])),
                f"eval loss rose from its minimum {fmt(minimum)} at step {eval_steps[lowest]} to {fmt(now)} "
                f"at step {eval_steps[-1]} ({pct(now, minimum)}) {context}",
                ADVICE["overfitting"],
            )
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
    slope = theil_sen_slope(xs, ys)
    intercept = float(np.median(ys - slope * xs))
    train_at = [intercept + slope * float(s) for s in eval_steps[first:]]
    gaps = [float(e) - t for e, t in zip(evals[first:], train_at)]
    train_drop = train_at[0] - train_at[-1]
    eval_drop = float(evals[first] - evals[-1])
    widened = gaps[-1] - gaps[0]
    # the standard error of a change fitted through m noisy logs is sigma * sqrt(12 / m)
    uncertainty = SLOW_Z * relative_noise(train) * float(np.median(ys)) * math.sqrt(12 / len(ys))
    if (
        train_drop >= max(SLOW_TRAIN_DROP_REL * abs(train_at[0]), SLOW_TRAIN_DROP_ABS)
        and eval_drop < SLOW_EVAL_RATIO * train_drop
        and widened >= max(GAP_WIDEN_REL * abs(evals[-1]), GAP_WIDEN_ABS, uncertainty)
        and gaps[-1] >= float(np.median(gaps))  # still wide at the end, not closing again
        and gaps[-1] > max(HEALTHY_GAP_REL * abs(evals[-1]), HEALTHY_GAP_ABS)
    ):  # and the gap is no longer small
        return Finding(
            "overfitting",
            "warning",
            (s0, s1),
            f"from step {s0} to {s1} train loss fell {fmt(train_at[0])} -> {fmt(train_at[-1])} "
            f"({pct(train_at[-1], train_at[0])}) but eval loss only {fmt(evals[first])} -> {fmt(evals[-1])} "
            f"({pct(evals[-1], evals[first])}); the gap widened from {gaps[0]:.3g} to {gaps[-1]:.3g}",
            ADVICE["overfitting"],
        )
    return None


def _train_trend(steps: np.ndarray, loss: np.ndarray, first: int, last: int) -> tuple[float, float, bool] | None:
    """Train loss at `first` and `last` (a robust line through the logs between them) and whether it rose."""
    inside = (steps >= first) & (steps <= last)
    if inside.sum() >= 3:
        xs, ys = steps[inside].astype(float), loss[inside]
        slope = theil_sen_slope(xs, ys)
        intercept = float(np.median(ys - slope * xs))
        then, now = intercept + slope * first, intercept + slope * last
        uncertainty = TRAIN_RISE_Z * relative_noise(loss) * float(np.median(ys)) * math.sqrt(12 / len(ys))
    else:
        then, now = level_at(steps, loss, first), level_at(steps, loss, last)
        if then is None:
            return None
        uncertainty = 0.0
    return then, now, now - then > max(OVERFIT_TRAIN_FLAT_REL * abs(then), uncertainty)


def underfitting(train_steps, train, eval_steps, evals, lr_steps, lr, phase: str) -> Finding | None:
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
    start, end = start_level(train), end_level(train)
    if start <= 0:
        return None
    slope = theil_sen_slope(train_steps.astype(float), train)
    fitted = -slope * float(train_steps[-1] - train_steps[0]) / start
    improvement = max((start - end) / start, fitted)  # either estimate seeing a real fall is enough
    # the fitted change through n logs has a standard error of sigma * sqrt(12 / n): noise must not hide a fall
    uncertainty = UNDERFIT_Z * relative_noise(train) * math.sqrt(12 / n)
    if improvement >= UNDERFIT_REL - uncertainty or improvement < -UNDERFIT_REL:
        return None  # improved (or may have: too noisy to say), or rose (instability's business, not underfitting)
    if len(evals) >= 2 and evals[0] > 0 and (evals[0] - np.min(evals)) / evals[0] >= UNDERFIT_EVAL_REL:
        return None  # eval loss did improve
    eval_part = (
        f"; eval loss {fmt(evals[0])} -> {fmt(evals[-1])} ({pct(evals[-1], evals[0])})"
        if len(evals) >= 2 and evals[0]
        else ""
    )
    return Finding(
        "underfitting",
        "warning",
        (int(train_steps[0]), int(train_steps[-1])),
        f"train loss went from {fmt(start)} to {fmt(end)} ({pct(end, start)}) over steps "
        f"{train_steps[0]}-{train_steps[-1]}: less than {UNDERFIT_REL:.0%} improvement{eval_part}",
        ADVICE["underfitting"],
    )


def memorization(train_steps, train, eval_steps, evals, threshold: float, epochs: float) -> Finding | None:
    """An extremely low train loss: below the absolute threshold, or a tiny fraction of where it started after many
    epochs (a loss that starts high ends above any fixed threshold however well the data is memorized)."""
    if len(train) < MEMO_MIN_POINTS:
        return None
    now, start = float(np.median(train[-MEMO_MIN_POINTS:])), start_level(train)
    relative = epochs >= MEMO_MIN_EPOCHS and len(train) >= MEMO_REL_MIN_POINTS and start > 0 and now <= MEMO_REL * start
    if now >= threshold and not relative:
        return None
    limit = threshold if now < threshold else MEMO_REL * start
    reasons = ([f"below {fmt(threshold)}"] if now < threshold else []) + (
        [f"{now / start:.1%} of its start {fmt(start)} after {epochs:.0f} epochs"] if relative else []
    )
    smooth = rolling_median(train, 3)
    above = np.nonzero(smooth >= limit)[0]
    since = min(int(above[-1]) + 1, len(train) - 1) if len(above) else 0
    steps = (int(train_steps[since]), int(train_steps[-1]))
    low = f"train loss {fmt(now)} ({'; '.join(reasons)}) since step {steps[0]}"
    if not len(evals):
        return Finding(
            "memorization",
            "warning",
            steps,
            f"{low}, with no eval loss to tell memorization from an easy, deterministic task",
            ADVICE["memorization"],
        )
    eval_now = float(evals[-1])
    if eval_now >= MEMO_EVAL_HIGH_FACTOR * limit:
        return Finding(
            "memorization",
            "warning",
            (steps[0], max(steps[1], int(eval_steps[-1]))),
            f"{low} while eval loss is {fmt(eval_now)} at step {eval_steps[-1]}: "
            f"training examples are reproduced, held-out ones are not",
            ADVICE["memorization"],
        )
    return Finding(
        "memorization",
        "info",
        (steps[0], max(steps[1], int(eval_steps[-1]))),
        f"{low}, and eval loss is very low too ({fmt(eval_now)} at step {eval_steps[-1]}): "
        f"consistent with a deterministic task rather than memorization",
        ADVICE["memorization_low_both"],
    )


def zero_loss(steps: np.ndarray, loss: np.ndarray, grad: np.ndarray) -> Finding | None:
    """A train loss of exactly 0 from the first logs: no token is trained."""
    zero = np.abs(loss) <= ZERO_LOSS_MAX
    if len(loss) < ZERO_LOSS_EARLY_LOGS or not zero[:ZERO_LOSS_EARLY_LOGS].all() or zero.mean() < ZERO_LOSS_SHARE:
        return None
    flat_grad = f", grad_norm {fmt(float(np.max(np.abs(grad))))} at most" if len(grad) else ""
    return Finding(
        "zero_loss",
        "error",
        (int(steps[0]), int(steps[-1])),
        f"train loss is 0 at {int(zero.sum())} of {len(loss)} logs, from step {steps[0]}{flat_grad}: "
        f"nothing is being trained (a masking or label bug), which is not memorization",
        ADVICE["zero_loss"],
    )


def inconsistent_format(samples) -> Finding | None:
    shares = format_shares(samples)
    if len(shares) < FORMAT_MIN_EVALS:
        return None
    values = [share for _, share, _ in shares]
    size = max(count for _, _, count in shares)
    what = f"share of sampled answers that end with the end-of-turn token and follow the format ({size} per evaluation)"
    # falling: the last evaluations are well below the best earlier one
    best = int(np.argmax(values[:-FORMAT_DROP_POINTS]))
    if all(v <= values[best] - FORMAT_DROP for v in values[-FORMAT_DROP_POINTS:]):
        return Finding(
            "inconsistent_format",
            "warning",
            (shares[best][0], shares[-1][0]),
            f"{what} fell from {values[best]:.0%} at step {shares[best][0]} "
            f"to {values[-1]:.0%} at step {shares[-1][0]}",
            ADVICE["inconsistent_format"],
        )
    # unstable: it keeps falling back by large amounts
    window = shares[-FORMAT_WINDOW:]
    drops = [(a, b) for a, b in zip(window, window[1:]) if a[1] - b[1] >= FORMAT_SWING]
    if len(drops) >= FORMAT_SWINGS:
        listed = ", ".join(f"{v:.0%}" for _, v, _ in window)
        return Finding(
            "inconsistent_format",
            "warning",
            (window[0][0], window[-1][0]),
            f"{what} is unstable: {listed} over steps {window[0][0]}-{window[-1][0]} "
            f"({len(drops)} drops of {FORMAT_SWING:.0%} or more)",
            ADVICE["inconsistent_format"],
        )
    return None


def healthy(train_steps, train, eval_steps, evals) -> tuple[Finding | None, str | None]:
    """With no warning sign: `healthy` when the train/eval gap is small, else a note that it is not."""
    eval_now, eval_step = float(evals[-1]), int(eval_steps[-1])
    train_now = level_at(train_steps, train, eval_step)
    gap = eval_now - train_now
    share = f" ({gap / eval_now * 100:+.0f}% of eval loss)" if abs(eval_now) >= 2 * HEALTHY_GAP_ABS else ""
    numbers_ = f"train loss {fmt(train_now)} and eval loss {fmt(eval_now)} at step {eval_step}: gap {gap:+.3g}{share}"
    if gap <= max(HEALTHY_GAP_REL * abs(eval_now), HEALTHY_GAP_ABS):
        return Finding(
            "healthy",
            "info",
            (int(train_steps[0]), int(max(train_steps[-1], eval_steps[-1]))),
            f"no warning signs; {numbers_}",
            ADVICE["healthy"],
        ), None
    return None, f"no warning signs, but the train/eval gap is not small: {numbers_}"
