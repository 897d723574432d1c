"""Verdict: did the fine-tune work, and would prompting have done as well?

The chapter's first question is whether "an existing instruction-tuned model with
well-crafted prompts would suffice"; its promise is a model better at the task. The
evaluation measures three models on the same held-out prompts: the base model as it is
(before), the base model prompted with training examples (prompted), and the tuned model
(after). The verdict compares them on one primary metric (eval.primary):

    regressed           the tuned model is significantly worse than the base or the prompted base model
    no_gain             it is not significantly better than the base model
    prompting_suffices  it beats the base model, but not significantly the prompted base model
    worked              it is significantly better than both
    unknown             nothing to compare with (no baseline was evaluated)

"Significantly" means the paired bootstrap 95% confidence interval of the mean
difference (tuned minus the other model, resampling the same held-out prompts) lies
entirely above (or below) zero. Guards that do not change the verdict but qualify it
become caveats: general-text loss up, answers that no longer end their turn, answers
copying training responses, warning signs during training.

Trade-offs:
- Percentile bootstrap over prompts (10,000 resamples, seeded): no distributional
  assumption, works for shares and graded scores alike; with few prompts the interval is
  wide and the verdict honest about it (a small gain on 20 prompts is not significant).
- One primary metric decides, so the verdict cannot be gamed by picking the best of
  thirteen numbers after the fact; the others stay in the table.
- A verdict with one comparison missing (eval.baseline or eval.prompted_baseline off)
  rests on the one that exists and says what it could not compare.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sftlab.metrics import primary_label

BOOTSTRAP_RESAMPLES = 10_000  # the 2.5th and 97.5th percentiles settle to ~0.5% of the spread by then
CONFIDENCE = 0.95
# Guards (caveats), each a threshold with its reason:
RETENTION_RISE_REL = 0.05  # general-text loss 5%+ above the base model's: measurable forgetting (same text, same model)
CHAT_ADHERENCE_DROP = (
    0.05  # 5+ points fewer answers ending their turn cleanly than the base model: a chat behaviour lost
)
COPYING_SHARE = 0.10  # a tenth of answers equal to (or containing) a training response: memorization, unless the task
#                       has few distinct answers
WARNING_FINDINGS = ("overfitting", "instability", "memorization", "inconsistent_format", "zero_loss")
VERDICTS = ("worked", "prompting_suffices", "no_gain", "regressed", "unknown")


class Difference(BaseModel):
    diff: float
    ci95: tuple[float, float]

    @property
    def significantly_better(self) -> bool:
        return self.ci95[0] > 0

    @property
    def significantly_worse(self) -> bool:
        return self.ci95[1] < 0


class Verdict(BaseModel):
    """eval/verdict.json."""

    verdict: str = Field(description="|".join(VERDICTS))
    primary: str
    kind: str = "share"  # "share" when every per-prompt value is 0 or 1, else "score"
    num_prompts: int = 0
    base: float | None = None
    prompted: float | None = None
    tuned: float | None = None
    tuned_minus_base: Difference | None = None
    tuned_minus_prompted: Difference | None = None
    headline: str = ""
    reasons: list[str] = Field(default_factory=list)
    caveats: list[str] = Field(default_factory=list)
    bootstrap: dict = Field(default_factory=dict)


def paired_bootstrap(
    tuned: list[float],
    other: list[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 42,
    confidence: float = CONFIDENCE,
) -> Difference:
    """Mean of tuned - other over paired prompts, with a percentile bootstrap interval."""
    import numpy as np

    differences = np.asarray(tuned, dtype=float) - np.asarray(other, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Difference(diff=float(differences.mean()), ci95=(float(low), float(high)))


def decide(
    primary: str,
    tuned: list[float],
    base: list[float] | None,
    prompted: list[float] | None,
    caveats: list[str],
    seed: int = 42,
    shots: str = "prompted",
) -> Verdict:
    """The verdict from the primary metric's per-prompt values of each model (same prompts, same order)."""
    kind = "share" if all(value in (0.0, 1.0) for value in [*tuned, *(base or []), *(prompted or [])]) else "score"
    verdict = Verdict(
        verdict="unknown",
        primary=primary,
        kind=kind,
        num_prompts=len(tuned),
        tuned=_mean(tuned),
        base=_mean(base),
        prompted=_mean(prompted),
        caveats=list(caveats),
        bootstrap={
            "resamples": BOOTSTRAP_RESAMPLES,
            "confidence": CONFIDENCE,
            "seed": seed,
            "method": "paired percentile bootstrap over held-out prompts",
        },
    )
    if base is not None and len(base) == len(tuned) and tuned:
        verdict.tuned_minus_base = paired_bootstrap(tuned, base, seed=seed)
    if prompted is not None and len(prompted) == len(tuned) and tuned:
        verdict.tuned_minus_prompted = paired_bootstrap(tuned, prompted, seed=seed + 1)
    vs_base, vs_prompted = verdict.tuned_minus_base, verdict.tuned_minus_prompted
    if vs_base is None and vs_prompted is None:
        verdict.reasons.append(
            "neither the base model nor the prompted base model was evaluated on these prompts: "
            "nothing to compare the tuned model with (eval.baseline, eval.prompted_baseline)"
        )
    elif (vs_base and vs_base.significantly_worse) or (vs_prompted and vs_prompted.significantly_worse):
        verdict.verdict = "regressed"
    elif vs_base is not None and not vs_base.significantly_better:
        verdict.verdict = "no_gain"
    elif vs_prompted is not None and not vs_prompted.significantly_better:
        verdict.verdict = "prompting_suffices"
    else:
        verdict.verdict = "worked"
    verdict.reasons += _reasons(verdict, shots)
    if vs_prompted is None and vs_base is not None:
        verdict.caveats.append(
            "prompting was not compared (eval.prompted_baseline is off): a prompted base model might do as well"
        )
    if vs_base is None and vs_prompted is not None:
        verdict.caveats.append("the base model without prompting was not evaluated (eval.baseline is off)")
    verdict.headline = headline(verdict)
    return verdict


def caveats(base: dict | None, tuned: dict | None, findings: list) -> list[str]:
    """The guards, from before.json / after.json and the training diagnosis's findings."""
    out = []
    retention_before, retention_after = _get(base, "retention", "loss"), _get(tuned, "retention", "loss")
    if retention_before and retention_after is not None and retention_after / retention_before - 1 > RETENTION_RISE_REL:
        out.append(
            f"general-text loss rose {retention_after / retention_before - 1:+.1%} ({retention_before:.4f} to "
            f"{retention_after:.4f}): the fine-tune cost some general ability"
        )
    chat_before, chat_after = _get(base, "adherence", "chat"), _get(tuned, "adherence", "chat")
    if chat_before is not None and chat_after is not None and chat_before - chat_after > CHAT_ADHERENCE_DROP:
        out.append(
            f"fewer answers end their turn cleanly: {chat_after:.0%} against {chat_before:.0%} for the base model"
        )
    copied = _get(tuned, "memorization", "verbatim_share")
    if copied is not None and copied >= COPYING_SHARE and copied > (_get(base, "memorization", "verbatim_share") or 0):
        out.append(
            f"{copied:.0%} of answers repeat a training response verbatim: memorization, unless the task has few "
            "distinct answers"
        )
    for finding in findings:
        if (
            getattr(finding, "severity", None) in ("warning", "error")
            and getattr(finding, "code", None) in WARNING_FINDINGS
        ):
            out.append(f"warning sign during training: {finding.code} ({finding.evidence})")
    return out


def headline(verdict: Verdict) -> str:
    """The verdict in plain words, e.g. "worked: 46% of answers pass `initials` against 5% for the prompted
    base model (+41 points, 95% CI +35 to +47)"."""
    what = _what(verdict)
    tuned = _value(verdict.tuned, verdict.kind)
    if verdict.verdict == "unknown":
        return f"unknown: {_subject(verdict, tuned, what)}; no baseline to compare with"
    versus = []
    for other, label, difference in (
        ("prompted", "the prompted base model", verdict.tuned_minus_prompted),
        ("base", "the base model", verdict.tuned_minus_base),
    ):
        if difference is not None:
            versus.append(
                f"{_value(getattr(verdict, other), verdict.kind)} for {label} ({_difference(difference, verdict.kind)})"
            )
    if verdict.verdict == "worked" or verdict.verdict == "regressed" or len(versus) == 1:
        order = versus
    elif verdict.verdict == "prompting_suffices":
        order = versus[:1]  # the comparison that decided it
    else:  # no_gain: against the base model
        order = versus[-1:]
    return f"{verdict.verdict}: {_subject(verdict, tuned, what)} against " + ", and ".join(order)


def _subject(verdict: Verdict, tuned: str, what: str) -> str:
    return f"{tuned} of answers {what}" if verdict.kind == "share" else f"{what} {tuned}"


def _what(verdict: Verdict) -> str:
    label = primary_label(verdict.primary)
    if verdict.kind != "share":
        return f"mean {label} score" if verdict.primary not in ("rougeL",) else "ROUGE-L"
    return {
        "format": "follow eval.format",
        "chat": "end their turn cleanly",
        "exact_match": "match the reference exactly",
    }.get(verdict.primary, f"pass `{label}`")


def _reasons(verdict: Verdict, shots: str) -> list[str]:
    out = []
    for label, difference in (
        (f"the {shots} base model", verdict.tuned_minus_prompted),
        ("the base model", verdict.tuned_minus_base),
    ):
        if difference is None:
            continue
        if difference.significantly_better:
            judged = "significantly better than"
        elif difference.significantly_worse:
            judged = "significantly worse than"
        else:
            judged = "not significantly different from"
        out.append(
            f"the tuned model is {judged} {label} on {primary_label(verdict.primary)} "
            f"({_difference(difference, verdict.kind)}, over {verdict.num_prompts} held-out prompts)"
        )
    return out


def _difference(difference: Difference, kind: str) -> str:
    low, high = difference.ci95
    if kind == "share":
        return f"{difference.diff * 100:+.0f} points, 95% CI {low * 100:+.0f} to {high * 100:+.0f}"
    return f"{difference.diff:+.3f}, 95% CI {low:+.3f} to {high:+.3f}"


def _value(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if kind == "share" else f"{value:.3f}"


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _get(mapping, *keys):
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping if isinstance(mapping, (int, float)) and not isinstance(mapping, bool) else None
