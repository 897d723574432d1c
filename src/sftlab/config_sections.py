"""Config sections: the typed `model`, `data`, `lora`, `eval` and `monitor` sections of the YAML file.

Each is a pydantic model whose fields carry the default and a one-line description (what
`sftlab init` writes and `sftlab check` enforces). The `training` section is not here: it
takes TRL's SFTConfig names unchanged and is checked against SFTConfig itself (config.py).

Trade-off: unknown keys are errors in every section (a misspelt key silently ignored would
cost a whole run), so a key added to TRL or sftlab must be added here to be accepted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="Hub id, local directory, or 'smollm2-135m-instruct' (the embedded default, no network).",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path (or a path to one).")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float32 otherwise."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you turn it on.")
    attn_implementation: str | None = Field(
        None, description="eager, sdpa, flash_attention_2, ... (None: transformers' choice)"
    )


class SourceConfig(_Section):
    path: str = Field(description="File, directory written by save_to_disk, or hub dataset id.")
    name: str | None = Field(None, description="Hub dataset config name (e.g. 'all' for HuggingFaceTB/smoltalk).")
    split: str | None = Field(
        None, description="Split to read; by default 'train', with the dataset's test split as eval."
    )
    weight: float | None = Field(
        None, gt=0, description="Rows drawn per row of this source: 0.5 a seeded half, 2 every row twice."
    )
    fraction: float | None = Field(
        None, gt=0, le=1, description="Share of this source's rows to use (a seeded sample)."
    )

    @model_validator(mode="after")
    def _one_of_weight_and_fraction(self):
        if self.weight is not None and self.fraction is not None:
            raise ValueError(f"source {self.path}: give weight or fraction, not both")
        if self.fraction is not None:
            self.__dict__["weight"], self.__dict__["fraction"] = self.fraction, None
        return self


class WarnThresholds(_Section):
    """`sftlab check` warns (and training still goes ahead) past these."""

    duplicate_share: float = Field(0.01, ge=0, description="Duplicates removed, as a share of all rows.")
    dropped_share: float = Field(0.0, ge=0, description="Bad rows skipped (on_error: skip), as a share of all rows.")
    truncated_share: float = Field(0.01, ge=0, description="Examples longer than training.max_length.")
    trained_token_share_below: float = Field(0.02, ge=0, le=1, description="Share of tokens that are trained.")
    leakage_rows: int = Field(0, ge=0, description="Training rows also found in eval.")


DataSources = str | SourceConfig | list[str | SourceConfig]


class DataConfig(_Section):
    train: DataSources = Field(description="Training data: a path, a hub id, or a list of sources.")
    eval: DataSources | None = Field(None, description="Held-out data. Without it, eval_split carves one out.")
    eval_split: float = Field(0.05, ge=0, lt=1, description="Share of train held out for eval when `eval` is not set.")
    format: Literal["messages", "sharegpt", "alpaca", "prompt_completion", "template", "text"] | None = Field(
        None, description="Detected from the columns when not set."
    )
    template: str | None = Field(
        None, description='Formatting template, e.g. "### Question: {question}\\n### Answer: {answer}".'
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="fail: stop at the first bad row; skip: count and drop it."
    )
    dedup: bool = Field(
        True, description="Drop exact and near-exact duplicates (same text up to case, spacing, punctuation)."
    )
    max_example_chars: int = Field(1_000_000, gt=0, description="Rows with more text than this are bad rows.")
    warn_if: WarnThresholds = Field(default_factory=WarnThresholds)


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


class FormatSpec(_Section):
    """The output format responses must follow, checked on generations (`eval.format`)."""

    type: Literal["regex", "json", "json_schema", "prefix", "contains"]
    pattern: str | None = Field(None, description="regex: the whole response must match it (re.fullmatch, DOTALL).")
    schema_: dict | None = Field(
        None, alias="schema", description="json_schema: the JSON Schema the response must satisfy."
    )
    text: str | None = Field(None, description="prefix / contains: the text the response must start with / contain.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _has_what_its_type_needs(self):
        needs = {"regex": "pattern", "json_schema": "schema", "prefix": "text", "contains": "text"}.get(self.type)
        value = {"pattern": self.pattern, "schema": self.schema_, "text": self.text}.get(needs) if needs else True
        if value is None:
            raise ValueError(f"eval.format type {self.type!r} needs `{needs}`")
        if self.type == "regex":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"eval.format pattern is not a valid regex: {exc}") from None
        return self


class PromptedBaselineConfig(_Section):
    """The base model prompted as well as sftlab can without training: the chapter's first question
    ("would an instruction-tuned model with well-crafted prompts suffice?"), measured."""

    shots: int = Field(
        3, ge=0, le=32, description="Training examples put before each held-out prompt as earlier turns."
    )
    system_prompt: str | None = Field(
        None, description="A system message for the prompted base model (none by default)."
    )

    @model_validator(mode="after")
    def _prompts_something(self):
        if self.shots == 0 and not self.system_prompt:
            raise ValueError(
                "eval.prompted_baseline with shots: 0 and no system_prompt is the base model itself; "
                "set shots, a system_prompt, or prompted_baseline: false"
            )
        return self


# The built-in metrics a verdict can rest on (eval.primary), as named in before/after.json.
BUILTIN_PRIMARY_METRICS = ("format", "chat", "exact_match", "rougeL")
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class MetricSpec(_Section):
    """A metric of the user's own: `score(answer, reference, prompt)` -> a number in [0, 1] (a bool counts as 0/1)."""

    name: str = Field(description="How the metric is named in the eval files, the table and the verdict.")
    function: str = Field(
        description='"path/to/file.py:score": a Python file (relative to the working directory, '
        "else to the config file) and the function in it."
    )

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, name: str) -> str:
        if not METRIC_NAME.match(name):
            raise ValueError(f"eval.metrics name {name!r} must be letters, digits, _ or - (starting with a letter)")
        if name in BUILTIN_PRIMARY_METRICS:
            raise ValueError(f"eval.metrics name {name!r} is a built-in metric; choose another name")
        return name

    @field_validator("function")
    @classmethod
    def _file_and_function(cls, function: str) -> str:
        path, _, attribute = function.rpartition(":")
        if not path.endswith(".py") or not attribute.isidentifier():
            raise ValueError(f'eval.metrics function {function!r} must look like "path/to/file.py:score"')
        return function

    @property
    def path(self) -> Path:
        return Path(self.function.rpartition(":")[0]).expanduser()

    @property
    def attribute(self) -> str:
        return self.function.rpartition(":")[2]


class EvalConfig(_Section):
    """Evaluation of the base and the tuned model on the held-out data (evaluate.py, `sftlab eval`)."""

    baseline: bool = Field(True, description="Evaluate the base model before training, for a before/after comparison.")
    num_prompts: int = Field(
        100, gt=0, description="Held-out prompts answered by each model (the first N of the eval data)."
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Longest answer generated; an answer not ended by then does not count as ended."
    )
    format: FormatSpec | None = Field(
        None, description="The format responses must follow: regex, json, json_schema, prefix, contains."
    )
    do_sample: bool = Field(False, description="Sample answers (seeded with training.seed) instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (with do_sample).")
    generation_batch_size: int = Field(
        32,
        gt=0,
        description="Prompts generated together (left-padded, sorted by length; 32 measured fastest on 2 CPU cores, "
        "bench/results/eval_generation.txt).",
    )
    retention: str | bool | None = Field(
        None,
        description="General data whose loss before and after shows what the fine-tune cost elsewhere: a data path "
        "in any format data.train takes; null (or true): the small general set shipped with sftlab; false: off.",
    )
    show_samples: int = Field(
        3, ge=0, description="Held-out answers printed side by side (prompt, reference, base, tuned)."
    )
    prompted_baseline: PromptedBaselineConfig | Literal[False] = Field(
        default_factory=PromptedBaselineConfig,
        description="The base model with `shots` training examples (and system_prompt) before each prompt, evaluated "
        "like the others: does prompting already do what the fine-tune does? false: off.",
    )
    metrics: list[MetricSpec] = Field(
        default_factory=list, description="Metrics of your own, computed for every model."
    )
    primary: str | None = Field(
        None,
        description="The metric the verdict rests on: a name from eval.metrics, or format, chat, exact_match, "
        "rougeL. Default: the first of eval.metrics, else format when eval.format is set, else rougeL.",
    )

    @field_validator("retention")
    @classmethod
    def _true_means_the_shipped_set(cls, value):
        return None if value is True else value

    @field_validator("prompted_baseline", mode="before")
    @classmethod
    def _true_means_the_defaults(cls, value):
        return {} if value is True or value is None else value

    @model_validator(mode="after")
    def _primary_is_measured(self):
        names = [metric.name for metric in self.metrics]
        if len(set(names)) < len(names):
            raise ValueError(f"eval.metrics names a metric twice: {sorted({n for n in names if names.count(n) > 1})}")
        if self.primary is not None and self.primary not in (*BUILTIN_PRIMARY_METRICS, *names):
            raise ValueError(
                f"eval.primary {self.primary!r} is not a metric: choose one of "
                f"{', '.join([*names, *BUILTIN_PRIMARY_METRICS])}"
            )
        if self.primary == "format" and self.format is None:
            raise ValueError("eval.primary: format needs eval.format (the format answers must follow)")
        return self

    @property
    def primary_metric(self) -> str:
        """eval.primary, or its default: the user's first metric, else format adherence, else ROUGE-L."""
        if self.primary:
            return self.primary
        if self.metrics:
            return self.metrics[0].name
        return "format" if self.format is not None else "rougeL"


FINDING_CODES = ("overfitting", "underfitting", "memorization", "instability", "inconsistent_format", "zero_loss")


class MonitorConfig(_Section):
    plots: bool = Field(True, description="PNG plots of the curves in the run directory, refreshed at each evaluation.")
    stop_on: list[Literal[FINDING_CODES]] = Field(
        default_factory=list,
        description="Findings that stop training early (the best checkpoint is kept). NaN always stops.",
    )
    sample_prompts: int = Field(
        4, ge=0, description="Held-out prompts answered at each evaluation, to watch the outputs."
    )
    sample_max_new_tokens: int = Field(48, gt=0)
    memorization_loss: float = Field(0.05, gt=0, description="Train loss below this counts as extremely low.")
