"""Contracts: the typed records stages hand each other through the run directory.

    Audit          eval/audit.json        data -> train, check, report
    Plan           run_info.json "plan"   train -> report
    RunInfo        run_info.json          train -> report
    StopRecord     stopped.json           monitor -> train, report
    EvalSummary    eval/before.json, prompted.json, after.json   evaluate -> verdict, report
    Verdict        eval/verdict.json      (verdict.py) evaluate -> report, cli

Each is written from its model (`to_json`) with the keys the files have always had, so
run directories of earlier versions still load, and read once with `parse`, leniently: a
field holding the wrong type, NaN, or nothing reads as its default (None, empty), an item
of a list that is not what it should be is dropped, keys the model does not know are
kept. A corrupt file costs the fields it corrupted, never the report.

Trade-off: every field is optional, so readers check for None where a value may be
missing; in exchange, no reader ever indexes into raw JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator

T = TypeVar("T", bound="Record")


class _Default:
    """Marker: a field whose value failed validation; Record replaces it with the field's default."""


_DEFAULT = _Default()


def _or_default(value, handler):
    try:
        return handler(value)
    except ValidationError:
        return _DEFAULT


def _soft_items(value, handler):
    """A list whose items that fail validation are dropped, one by one."""
    if not isinstance(value, list):
        return _DEFAULT
    kept = []
    for item in value:
        try:
            kept.extend(handler([item]))
        except ValidationError:
            continue
    return kept


Soft = WrapValidator(_or_default)  # a wrong value becomes the default
SoftItems = WrapValidator(_soft_items)  # wrong items are dropped


class Record(BaseModel):
    """A lenient, typed view of a JSON object sftlab wrote."""

    model_config = ConfigDict(strict=True, extra="allow", ser_json_inf_nan="null", allow_inf_nan=False)

    @model_validator(mode="after")
    def _defaults_for_what_failed(self):
        for name, field in type(self).model_fields.items():
            if isinstance(getattr(self, name), _Default):
                object.__setattr__(self, name, field.get_default(call_default_factory=True))
        return self

    @classmethod
    def parse(cls: type[T], value: Any) -> T | None:
        """The record, or None when the value is not a JSON object at all."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            return None
        try:
            return cls.model_validate(value)
        except ValidationError:
            # Only keys the model does not know can still fail: JSON can spell a key no Python text is (a lone
            # surrogate, "\ud800"); the fields' own values are absorbed by their defaults.
            return cls.model_validate({key: item for key, item in value.items() if key in cls.model_fields})

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


Int = Annotated[int | None, Soft]
Float = Annotated[float | int | None, Soft]
Str = Annotated[str | None, Soft]
Bool = Annotated[bool | None, Soft]


def _sub(model: type[Record]):
    """A nested record field: lenient inside, its default when it is not an object."""
    return Annotated[model, Soft, Field(default_factory=model)]


# =========================================================================== the audit


class SplitCounts(Record):
    rows: Int = None
    tokens: Int = None


class Splits(Record):
    train: _sub(SplitCounts)
    eval: _sub(SplitCounts)


class SourceCounts(Record):
    rows: Int = None
    usable: Int = None


class Dropped(Record):
    count: Int = None
    reasons: Annotated[dict[str, int], Soft] = Field(default_factory=dict)


class Problem(Record):
    file: Str = None
    line: Int = None
    message: Str = None


class DuplicateExample(Record):
    kind: Str = None
    again: Str = None
    first: Str = None


class Duplicates(Record):
    exact: Int = None
    near: Int = None
    leakage: Int = None
    examples: Annotated[list[DuplicateExample], SoftItems] = Field(default_factory=list)


class LengthStats(Record):
    min: Float = None
    median: Float = None
    p95: Float = None
    max: Float = None
    mean: Float = None


class Lengths(Record):
    prompt: _sub(LengthStats)
    response: _sub(LengthStats)
    total: _sub(LengthStats)


class Truncation(Record):
    max_length: Int = None
    examples_over: Int = None
    tokens_cut: Int = None
    trained_tokens_cut: Int = None
    examples_emptied: Int = None


class Segment(Record):
    text: Str = None
    trained: Bool = None


class MarkedExample(Record):
    source: Str = None
    line: Int = None
    segments: Annotated[list[Segment], SoftItems] = Field(default_factory=list)


class Audit(Record):
    """What `sftlab check` found and what will be trained (data/audit.py builds it)."""

    ok: Bool = None
    splits: _sub(Splits)
    sources: Annotated[dict[str, SourceCounts], Soft] = Field(default_factory=dict)
    formats: Annotated[dict[str, str], Soft] = Field(default_factory=dict)
    dropped: _sub(Dropped)
    problems: Annotated[list[Problem], SoftItems] = Field(default_factory=list)
    duplicates: _sub(Duplicates)
    lengths: _sub(Lengths)
    truncation: _sub(Truncation)
    trained_token_share: Float = None
    trained_tokens: Int = None
    end_of_turn_untrained: Int = None
    examples: Annotated[list[MarkedExample], SoftItems] = Field(default_factory=list)
    warnings: Annotated[list[str], SoftItems] = Field(default_factory=list)
    errors: Annotated[list[str], SoftItems] = Field(default_factory=list)


# =========================================================================== training


class Plan(Record):
    """What a run will do, from the trainer's own numbers (resolve.training_plan)."""

    examples: Int = None
    rows: Int = None  # packed rows when packing, else examples
    packing: Bool = None
    tokens_per_step: Int = None
    trained_tokens_per_step: Int = None
    steps: Int = None
    epochs: Float = None
    checkpoints: Int = None
    save_total_limit: Int = None
    evaluations: Int = None


class RunInfo(Record):
    started_at: Str = None
    resumed_at: Annotated[list[str], SoftItems] = Field(default_factory=list)
    hardware: Annotated[dict[str, Any], Soft] = Field(default_factory=dict)
    precision: Str = None
    versions: Annotated[dict[str, str], Soft] = Field(default_factory=dict)
    training_args: Annotated[dict[str, Any], Soft] = Field(default_factory=dict)
    plan: Annotated[Plan | None, Soft] = None


class StopRecord(Record):
    """Why training stopped early (stopped.json); the first reason is the one that stopped it."""

    reason: Str = None
    step: Int = None
    evidence: Str = ""


# =========================================================================== evaluation


class LossResult(Record):
    loss: Float = None
    perplexity: Float = None
    tokens: Int = None


class Adherence(Record):
    chat: Float = None
    format: Float = None
    format_spec: Annotated[dict[str, Any] | None, Soft] = None


class ReferenceScores(Record):
    exact_match: Float = None
    rougeL: Float = None


class Diversity(Record):
    distinct_1: Float = None
    distinct_2: Float = None
    duplicate_share: Float = None


class Memorization(Record):
    verbatim_share: Float = None
    mean_longest_common_ngram: Float = None


class Retention(LossResult):
    source: Str = None


class Prompting(Record):
    shots: Int = None
    system_prompt: Str = None


class EvalSummary(Record):
    """One model on the held-out prompts: eval/before.json, eval/prompted.json, eval/after.json."""

    model: Str = None
    label: Str = None
    step: Int = None
    num_prompts: Int = None
    max_new_tokens: Int = None
    seconds: Float = None
    prompting: Annotated[Prompting | None, Soft] = None
    loss: _sub(LossResult)
    adherence: _sub(Adherence)
    reference: _sub(ReferenceScores)
    metrics: Annotated[dict[str, float | None], Soft] = Field(default_factory=dict)
    diversity: _sub(Diversity)
    memorization: _sub(Memorization)
    retention: _sub(Retention)

    def value(self, group: str, key: str) -> float | None:
        """A metric by the table's (group, key), e.g. ("adherence", "format") or ("metrics", "initials")."""
        if group == "metrics":
            value = self.metrics.get(key)
        else:
            section = getattr(self, group, None)
            value = getattr(section, key, None) if isinstance(section, Record) else None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
