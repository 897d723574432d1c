"""Metrics: what one model's answers score, per answer and over the held-out prompts.

Pure functions of the answers and the references (no model, no torch), so the
evaluation, the verdict and the report all count the same way:

- per answer (the verdict's bootstrap resamples these): format and chat adherence,
  exact match, ROUGE-L, and the user's own metrics (`eval.metrics`);
- over all answers: diversity (distinct-n, duplicates) and memorization (copies of
  training responses);
- METRIC_ROWS: the one table of metrics, labels and formats that the terminal, the
  model card and the HTML report show.

A user metric is `score(answer, reference, prompt)` in a Python file of the user's,
returning a number in [0, 1] (a bool counts as 0/1). It is loaded once, before anything
slow, and every failure of it (a missing file, a wrong signature, an exception, a value
out of range) is one MetricError naming the metric and its file, with the traceback of
the user's own code only.

Trade-offs:
- Exact match compares whitespace-stripped text: strict, as format-bound tasks need.
- ROUGE-L is Google's rouge-score, whose tokenizer keeps ASCII letters and digits only:
  text in other scripts scores 0.
- Diversity and memorization count whitespace-separated words, so every model is
  measured the same way whatever its tokenizer.
- User code runs in sftlab's process, unsandboxed: it is the user's own file.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftlab.config import MetricSpec
from sftlab.errors import UserError

MIN_COPIED_WORDS = 5  # a shorter training response ("Yes.") found inside an answer is coincidence, not copying


class MetricError(UserError):
    """A metric of the user's (eval.metrics) cannot be loaded or returned an unusable value."""


# =========================================================================== the table


@dataclass(frozen=True)
class MetricRow:
    label: str
    group: str  # the section of before/after/prompted.json
    key: str
    kind: str  # "share" (shown as %), "loss" or "number"
    better: str  # "higher" or "lower"


METRIC_ROWS = (
    MetricRow("held-out loss (trained tokens)", "loss", "loss", "loss", "lower"),
    MetricRow("held-out perplexity", "loss", "perplexity", "number", "lower"),
    MetricRow("chat adherence (ends turn, no leaks)", "adherence", "chat", "share", "higher"),
    MetricRow("format adherence (eval.format)", "adherence", "format", "share", "higher"),
    MetricRow("exact match with the reference", "reference", "exact_match", "share", "higher"),
    MetricRow("ROUGE-L against the reference", "reference", "rougeL", "number", "higher"),
    MetricRow("distinct-1 (word diversity)", "diversity", "distinct_1", "number", "higher"),
    MetricRow("distinct-2 (bigram diversity)", "diversity", "distinct_2", "number", "higher"),
    MetricRow("duplicate answers", "diversity", "duplicate_share", "share", "lower"),
    MetricRow("copies a training response", "memorization", "verbatim_share", "share", "lower"),
    MetricRow("longest n-gram shared with training", "memorization", "mean_longest_common_ngram", "number", "lower"),
    MetricRow("retention loss (general text)", "retention", "loss", "loss", "lower"),
    MetricRow("retention perplexity", "retention", "perplexity", "number", "lower"),
)
# Where each metric a verdict can rest on lives in the eval files; user metrics live under "metrics".
PRIMARY_LOCATION = {
    "format": ("adherence", "format"),
    "chat": ("adherence", "chat"),
    "exact_match": ("reference", "exact_match"),
    "rougeL": ("reference", "rougeL"),
}


def metric_rows(user_metrics: list[str]) -> list[MetricRow]:
    """The table's rows: the user's metrics first (they say what the task is), then the built-in ones."""
    return [MetricRow(f"{name} (eval.metrics)", "metrics", name, "number", "higher") for name in user_metrics] + list(
        METRIC_ROWS
    )


def primary_location(primary: str) -> tuple[str, str]:
    return PRIMARY_LOCATION.get(primary, ("metrics", primary))


def primary_label(primary: str) -> str:
    return {"format": "eval.format", "chat": "chat adherence", "exact_match": "exact match", "rougeL": "ROUGE-L"}.get(
        primary, primary
    )


def format_value(value, kind: str, signed: bool = False) -> str:
    """One way to print a metric everywhere: shares as percentages (differences in points)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "share":
        return f"{value * 100:+.1f} pts" if signed else f"{value:.1%}"
    if kind == "loss":
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


# =========================================================================== per answer


def share(values: list) -> float | None:
    return sum(bool(value) for value in values) / len(values) if values else None


def mean(values: list) -> float | None:
    present = [float(value) for value in values if value is not None]
    return sum(present) / len(present) if present else None


def exact_matches(outputs: list[str], references: list[str]) -> list[bool]:
    return [output.strip() == reference.strip() for output, reference in zip(outputs, references)]


def exact_match(outputs: list[str], references: list[str]) -> float | None:
    return share(exact_matches(outputs, references))


def rouge_l(outputs: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F-measure over the answers."""
    return mean(rouge_l_scores(outputs, references)) if outputs else None


def rouge_l_scores(outputs: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each answer (rouge-score, without stemming)."""
    if not outputs:
        return []
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, output)["rougeL"].fmeasure for output, reference in zip(outputs, references)]


# =========================================================================== over all answers


def distinct_n(outputs: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all answers (words); None when the answers hold no n-gram."""
    grams = [
        tuple(words[i : i + n]) for words in (output.split() for output in outputs) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


def duplicate_share(outputs: list[str]) -> float | None:
    """Share of answers identical (up to surrounding whitespace) to another answer."""
    counts: dict[str, int] = {}
    for output in outputs:
        counts[output.strip()] = counts.get(output.strip(), 0) + 1
    return share([counts[output.strip()] > 1 for output in outputs])


def memorization(outputs: list[str], train_responses: list[str]) -> dict:
    """Share of answers that copy a training response verbatim, and the mean longest word
    n-gram each answer shares with the training responses.

    The answers' word suffixes go into a trie; each training response is walked through
    it from each of its words, marking the n-grams it shares with some answer. One pass
    over the training words, however many answers.
    """
    if not outputs:
        return {"verbatim_share": None, "mean_longest_common_ngram": None}
    answers = [output.split() for output in outputs]
    children: dict[tuple[int, str], int] = {}  # (node, word) -> node; node 0 is the root
    for words in answers:
        for start in range(len(words)):
            node = 0
            for word in words[start:]:
                node = children.setdefault((node, word), len(children) + 1)
    shared: set[int] = set()
    exact = {response.strip() for response in train_responses}
    copied = [bool(output.strip()) and output.strip() in exact for output in outputs]
    padded = [f" {' '.join(words)} " for words in answers]
    for response in train_responses:
        words = response.split()
        for start in range(len(words)):
            node, depth = 0, 0
            for word in words[start:]:
                node = children.get((node, word))
                if node is None:
                    break
                shared.add(node)
                depth += 1
            if start == 0 and depth == len(words) >= MIN_COPIED_WORDS:  # the whole response appears in an answer
                needle = f" {' '.join(words)} "
                copied = [was or needle in text for was, text in zip(copied, padded)]
    longest = []
    for words in answers:
        best = 0
        for start in range(len(words)):
            node, depth = 0, 0
            for word in words[start:]:
                node = children[(node, word)]
                if node not in shared:
                    break
                depth += 1
            best = max(best, depth)
        longest.append(best)
    return {"verbatim_share": share(copied), "mean_longest_common_ngram": sum(longest) / len(longest)}


# =========================================================================== the user's metrics


@dataclass
class UserMetric:
    name: str
    path: Path
    score: Callable


def load_user_metrics(specs: list[MetricSpec]) -> list[UserMetric]:
    """Import each eval.metrics function and check that it takes (answer, reference, prompt)."""
    return [_load_user_metric(spec) for spec in specs]


def _load_user_metric(spec: MetricSpec) -> UserMetric:
    path = spec.path
    where = f"eval.metrics {spec.name} ({path})"
    if not path.is_file():
        raise MetricError(
            f"{where}: no such file",
            hint="give the file relative to the working directory or to the config file, or absolute",
        )
    module_spec = importlib.util.spec_from_file_location(f"sftlab_user_metric_{spec.name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code: any exception it raises is theirs to see, concisely
        raise MetricError(
            f"{where}: importing the file failed: {_describe(error)}{_user_traceback(error, path)}",
            hint="fix the error in your metric file",
        ) from None
    score = getattr(module, spec.attribute, None)
    if not callable(score):
        found = sorted(
            name for name, value in vars(module).items() if inspect.isfunction(value) and not name.startswith("_")
        )
        raise MetricError(
            f"{where}: the file has no function {spec.attribute}",
            hint=f"functions in it: {', '.join(found) or 'none'}; the config names it as FILE.py:FUNCTION",
        )
    try:
        inspect.signature(score).bind("answer", "reference", "prompt")
    except TypeError:
        raise MetricError(
            f"{where}: {spec.attribute}{inspect.signature(score)} cannot be called as "
            f"{spec.attribute}(answer, reference, prompt)",
            hint="a metric takes the answer, the reference response and the prompt, and returns 0-1",
        ) from None
    except ValueError:  # no signature to inspect (a builtin): it will be checked when called
        pass
    return UserMetric(name=spec.name, path=path, score=score)


def user_metric_scores(
    metric: UserMetric, outputs: list[str], references: list[str], prompts: list[str]
) -> list[float]:
    """The metric on every answer: floats in [0, 1]; any failure is one MetricError."""
    scores = []
    for index, (answer, reference, prompt) in enumerate(zip(outputs, references, prompts)):
        where = f"eval.metrics {metric.name} ({metric.path})"
        try:
            value = metric.score(answer, reference, prompt)
        except Exception as error:  # the user's code
            raise MetricError(
                f"{where} raised {_describe(error)} on held-out prompt {index + 1}"
                f"{_user_traceback(error, metric.path)}",
                hint=f"the answer was {_clip(answer)}; fix the metric so it scores any answer",
            ) from None
        scores.append(_checked_value(value, where, index, answer))
    return scores


def _checked_value(value, where: str, index: int, answer: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0:
        return float(value)
    shown = repr(value) if isinstance(value, numbers.Real) else f"a {type(value).__name__} ({_clip(repr(value))})"
    raise MetricError(
        f"{where} returned {shown} on held-out prompt {index + 1}: a metric must return a number in [0, 1] or a bool",
        hint=f"the answer was {_clip(answer)}",
    )


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _user_traceback(error: BaseException, path: Path) -> str:
    """The frames of the user's own file, as Python prints them; sftlab's frames are noise to them."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    if isinstance(error, SyntaxError) and error.lineno:
        return f'\n  File "{path}", line {error.lineno}\n    {(error.text or "").strip()}'
    return "".join(
        f'\n  File "{f.filename}", line {f.lineno}, in {f.name}' + (f"\n    {f.line}" if f.line else "") for f in frames
    )


def _clip(text: str, limit: int = 80) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
