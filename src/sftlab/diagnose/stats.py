"""Robust statistics of noisy loss curves, and how the diagnosis writes numbers.

Real curves are noisy and spiky, so levels and noise are always estimated with medians
(robust to the spikes the diagnosis looks for), trends with Theil-Sen slopes (a few spikes
cannot bend them), and noise in log space (SFT loss noise is roughly multiplicative).

Trade-off: medians and pairwise slopes cost more than means and least squares; the slope
subsamples long curves to 120 logs, and windowed statistics are vectorized, so a diagnosis
of thousands of logs still takes milliseconds.
"""

from __future__ import annotations

import math

import numpy as np

START_Z = (
    3.0  # the first log counts as the start when it is 3 noise scales above the next ones (a sharp drop within it).
)


def fmt(value: float) -> str:
    return f"{value:.4g}"


def pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.0f}%" if old else "n/a"


def mad_scale(values: np.ndarray) -> float:
    """Robust standard deviation: 1.4826 x median absolute deviation."""
    if len(values) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def rolling_median(values: np.ndarray, window: int, centered: bool = True) -> np.ndarray:
    """Median of each log's window: centered (truncated at the ends), or trailing (the log and those before it)."""
    n = len(values)
    if centered:
        half = window // 2
        padded = np.concatenate([np.full(half, np.nan), values, np.full(half, np.nan)])
        if n == 0:
            return np.empty(0)
        return np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)
    return np.array(
        [np.median(values[max(0, i - window + 1) : i + 1]) for i in range(min(n, window - 1))]
        + list(np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=1) if n >= window else [])
    )


def trailing(values: np.ndarray, window: int, statistic) -> np.ndarray:
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


def median_rows(rows: np.ndarray, axis: int) -> np.ndarray:
    return np.median(rows, axis=axis)


def mad_rows(rows: np.ndarray, axis: int) -> np.ndarray:
    return 1.4826 * np.median(np.abs(rows - np.median(rows, axis=axis, keepdims=True)), axis=axis)


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
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


def start_level(values: np.ndarray) -> float:
    """The loss the run started from: the median of its first logs (a tenth of them, 3 to 10), or the first log
    itself when it stands far above the next ones (it averaged the steps of a sharp initial drop)."""
    k = min(len(values), max(3, min(10, len(values) // 10)))
    head = float(np.median(values[:k]))
    if len(values) > 2:
        rest = float(np.median(values[1 : k + 1]))
        if values[0] - rest > START_Z * relative_noise(values) * abs(rest) and values[0] > head:
            return float(values[0])
    return head


def end_level(values: np.ndarray) -> float:
    """The loss now: the median of the last logs (a fifth of them, 2 to 10)."""
    k = min(len(values), max(2, min(10, len(values) // 5)))
    return float(np.median(values[-k:]))


def level_at(steps: np.ndarray, values: np.ndarray, step: int) -> float | None:
    """Train loss at `step`: the median of the last logs at or before it (a tenth of them, 3 to 50). Single logs are
    far too noisy; the median lags a falling curve a little, which only makes the train/eval gap look smaller."""
    if len(values) == 0:
        return None
    upto = int(np.searchsorted(steps, step, side="right"))
    if upto == 0:
        return float(np.median(values[:3]))
    k = max(3, min(50, upto // 10))
    return float(np.median(values[max(0, upto - k) : upto]))


def log_to_log_noise(values: np.ndarray) -> float:
    """Log-to-log noise, whatever the trend: the robust spread of successive differences, over sqrt(2)."""
    return mad_scale(np.diff(values)) / math.sqrt(2) if len(values) > 2 else 0.0


def relative_noise(values: np.ndarray) -> float:
    """Log-to-log noise as a share of the level (SFT loss noise is roughly multiplicative), over up to 200 logs."""
    return log_to_log_noise(np.log(np.maximum(values[-200:], 1e-8)))
