"""Config: one YAML file, validated up front, resolved once, written into the run directory.

The file has six sections: `model`, `data`, `training`, `lora` (optional), `eval` and
`monitor`. `training` takes TRL's `SFTConfig` field names unchanged and passes them
through, so TRL users need nothing new; sftlab only fills in defaults that follow the
course chapter (1-3 epochs, small batches, a conservative learning rate, warmup) and the
hardware (fp32 on CPU, bf16 on GPUs that support it).

Trade-offs:
- Validation happens before anything heavy is loaded. An unknown key anywhere is an
  error naming the key, its line in the file and the closest valid key: a misspelt
  `learning_rat` silently ignored would cost a whole run.
- `training` values are type-checked against `SFTConfig`'s own annotations and lists of
  choices (`loss_type`, `packing_strategy`...), and cross-field rules are left to
  `SFTConfig` itself (see `train.build_sft_config`), so sftlab never disagrees with TRL
  about what is valid.
- transformers 5 folded `warmup_ratio` into a fractional `warmup_steps`; the chapter and
  most recipes still say `warmup_ratio`, so sftlab accepts it and translates it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, model_validator,
)

from sftlab.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"
CONFIG_FILE = "config.yaml"  # the resolved config, written into each run directory


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
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2, ... (None: transformers' choice)")


class SourceConfig(_Section):
    path: str = Field(description="File, directory written by save_to_disk, or hub dataset id.")
    name: str | None = Field(None, description="Hub dataset config name (e.g. 'all' for HuggingFaceTB/smoltalk).")
    split: str | None = Field(None, description="Split to read; by default 'train', with the dataset's test split as eval.")
    weight: float | None = Field(None, gt=0, description="Rows drawn per row of this source: 0.5 a seeded half, 2 every row twice.")
    fraction: float | None = Field(None, gt=0, le=1, description="Share of this source's rows to use (a seeded sample).")

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
    template: str | None = Field(None, description='Formatting template, e.g. "### Question: {question}\\n### Answer: {answer}".')
    on_error: Literal["fail", "skip"] = Field("fail", description="fail: stop at the first bad row; skip: count and drop it.")
    dedup: bool = Field(True, description="Drop exact and near-exact duplicates (same text up to case, spacing, punctuation).")
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
    schema_: dict | None = Field(None, alias="schema", description="json_schema: the JSON Schema the response must satisfy.")
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

    shots: int = Field(3, ge=0, le=32, description="Training examples put before each held-out prompt as earlier turns.")
    system_prompt: str | None = Field(None, description="A system message for the prompted base model (none by default).")

    @model_validator(mode="after")
    def _prompts_something(self):
        if self.shots == 0 and not self.system_prompt:
            raise ValueError("eval.prompted_baseline with shots: 0 and no system_prompt is the base model itself; "
                             "set shots, a system_prompt, or prompted_baseline: false")
        return self


# The built-in metrics a verdict can rest on (eval.primary), as named in before/after.json.
BUILTIN_PRIMARY_METRICS = ("format", "chat", "exact_match", "rougeL")
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class MetricSpec(_Section):
    """A metric of the user's own: `score(answer, reference, prompt)` -> a number in [0, 1] (a bool counts as 0/1)."""

    name: str = Field(description="How the metric is named in the eval files, the table and the verdict.")
    function: str = Field(description='"path/to/file.py:score": a Python file (relative to the working directory, '
                          "else to the config file) and the function in it.")

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
    num_prompts: int = Field(100, gt=0, description="Held-out prompts answered by each model (the first N of the eval data).")
    max_new_tokens: int = Field(64, gt=0, description="Longest answer generated; an answer not ended by then does not count as ended.")
    format: FormatSpec | None = Field(None, description="The format responses must follow: regex, json, json_schema, prefix, contains.")
    do_sample: bool = Field(False, description="Sample answers (seeded with training.seed) instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (with do_sample).")
    generation_batch_size: int = Field(32, gt=0, description="Prompts generated together (left-padded, sorted by length; 32 measured fastest on 2 CPU cores, bench/results/eval_generation.txt).")
    retention: str | bool | None = Field(
        None, description="General data whose loss before and after shows what the fine-tune cost elsewhere: a data path "
        "in any format data.train takes; null (or true): the small general set shipped with sftlab; false: off.",
    )
    show_samples: int = Field(3, ge=0, description="Held-out answers printed side by side (prompt, reference, base, tuned).")
    prompted_baseline: PromptedBaselineConfig | Literal[False] = Field(
        default_factory=PromptedBaselineConfig,
        description="The base model with `shots` training examples (and system_prompt) before each prompt, evaluated "
        "like the others: does prompting already do what the fine-tune does? false: off.",
    )
    metrics: list[MetricSpec] = Field(default_factory=list, description="Metrics of your own, computed for every model.")
    primary: str | None = Field(
        None, description="The metric the verdict rests on: a name from eval.metrics, or format, chat, exact_match, "
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
            raise ValueError(f"eval.primary {self.primary!r} is not a metric: choose one of "
                             f"{', '.join([*names, *BUILTIN_PRIMARY_METRICS])}")
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
        default_factory=list, description="Findings that stop training early (the best checkpoint is kept). NaN always stops."
    )
    sample_prompts: int = Field(4, ge=0, description="Held-out prompts answered at each evaluation, to watch the outputs.")
    sample_max_new_tokens: int = Field(48, gt=0)
    memorization_loss: float = Field(0.05, gt=0, description="Train loss below this counts as extremely low.")


# SFTConfig keys that sftlab owns in another section, with where they belong instead.
_KEYS_OWNED_ELSEWHERE = {
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "the `model` section (name_or_path, dtype, revision, attn_implementation)",
    "chat_template_path": "the model's own tokenizer (sftlab reads the template from the model)",
    "dataset_text_field": "data.format: text",
    "dataset_kwargs": "the `data` section",
    # A token in a config file would be copied into the run directory (config.yaml, training_args.bin).
    "hub_token": "the HF_TOKEN environment variable or `hf auth login`, never in a config file",
}
# Names TRL users know that transformers 5 renamed, and values sftlab adds; sftlab translates them.
_TRAINING_ALIASES = {"warmup_ratio": float, "packing": bool | Literal["auto"]}

# Defaults that follow the chapter: 1-3 epochs, small batches, conservative learning
# rate with warmup, evaluation and checkpoints at the chapter's cadence.
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "learning_rate": 5e-5,
    "warmup_ratio": 0.1,
    "logging_steps": 10,
    "eval_steps": 50,
    "save_steps": 100,
    "save_total_limit": 3,
    "max_length": 1024,
    # auto: pack where attention skips the work between examples (flash attention, flex_attention on
    # GPUs), else batch by length (see speed.choose_packing); explicit true/false are honoured, packing
    # behind a contamination check.
    "packing": "auto",
    "eval_packing": False,
    "assistant_only_loss": True,
    "seed": 42,
    "report_to": "tensorboard",
}
# The chapter's batch: 4 conversations per optimizer step. Left unset, it may go through the
# model in smaller micro-batches with gradient accumulation where memory asks for it (see
# train.fit_batch_to_memory); set either key and both are used as given.
BATCH_DEFAULTS: dict[str, int] = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
# LoRA trains far fewer parameters and wants a larger step (peft's and TRL's examples).
LORA_LEARNING_RATE = 2e-4


class _TrainingKeyError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class SftlabConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    training: dict[str, Any] = Field(default_factory=dict)
    lora: LoraConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    _batch_is_default: bool = PrivateAttr(False)  # neither batch key came from the user (resolve_defaults)

    @field_validator("training")
    @classmethod
    def _training_keys_are_sft_config_fields(cls, training: dict[str, Any]) -> dict[str, Any]:
        fields = sft_config_fields()
        for key, value in training.items():
            if key in _KEYS_OWNED_ELSEWHERE:
                raise _TrainingKeyError(key, f"training.{key}: set this in {_KEYS_OWNED_ELSEWHERE[key]} instead")
            annotation = _TRAINING_ALIASES.get(key) or (fields[key].type if key in fields else None)
            if annotation is None:
                raise _TrainingKeyError(
                    key, f"unknown key training.{key}{_did_you_mean(key, [*fields, *_TRAINING_ALIASES], 'training.')}"
                )
            try:
                training[key] = TypeAdapter(annotation).validate_python(value)
            except ValidationError:
                raise _TrainingKeyError(
                    key, f"training.{key} = {value!r} is not a valid {_type_name(annotation)}"
                ) from None
            # TRL's own list of values (loss_type, packing_strategy...), as its command line enforces it.
            choices = fields[key].metadata.get("choices") if key in fields else None
            if choices and training[key] is not None and training[key] not in choices:
                raise _TrainingKeyError(key, f"training.{key} = {value!r} is not one of: {', '.join(map(str, choices))}")
        return training

    @property
    def batch_is_default(self) -> bool:
        return self._batch_is_default

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


@functools.cache
def sft_config_fields() -> dict[str, dataclasses.Field]:
    from trl import SFTConfig  # heavy import: only when a config is actually validated

    return {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}


def load_config(path: str | Path, overrides: list[str] = ()) -> SftlabConfig:
    """Read, override, validate and resolve a config file. Raises ConfigError."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    if overrides:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            validate_config(raw, source=str(path))  # raises: the config must be a mapping
        for override in overrides:
            apply_override(raw, override)
    _refuse_unrepresentable(raw, (), source=str(path), lines=lines)
    cfg = validate_config(raw, source=str(path), lines=lines)
    return resolve_defaults(_with_metric_files_found(cfg, path.parent), config_path=path)


def _with_metric_files_found(cfg: SftlabConfig, config_dir: Path) -> SftlabConfig:
    """eval.metrics files as absolute paths, so the run's config.yaml finds them from anywhere:
    relative to the working directory, else to the config file's directory."""
    metrics = []
    for metric in cfg.eval.metrics:
        path = metric.path
        if not path.is_absolute():
            path = next((candidate.resolve() for candidate in (path, config_dir / path) if candidate.is_file()), path)
        metrics.append(metric.model_copy(update={"function": f"{path}:{metric.attribute}"}))
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"metrics": metrics})}) if metrics else cfg


def validate_config(raw: Any, source: str = "<config>", lines: dict[tuple, int] | None = None) -> SftlabConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(raw).__name__}",
                          hint="run `sftlab init` to write a starter config")
    try:
        return SftlabConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error_from(exc, source, lines or {}) from None


def resolve_defaults(cfg: SftlabConfig, config_path: Path | None = None) -> SftlabConfig:
    """Fill in sftlab's defaults for every training key the user left out."""
    training = dict(TRAINING_DEFAULTS)
    if cfg.lora is not None:
        training["learning_rate"] = LORA_LEARNING_RATE
    training["output_dir"] = str(Path("runs") / (config_path.stem if config_path else "sft"))
    training.update(BATCH_DEFAULTS)
    training.update(cfg.training)
    if "warmup_steps" in cfg.training and "warmup_ratio" not in cfg.training:
        training.pop("warmup_ratio")
    if cfg.data.eval is None and cfg.data.eval_split == 0:
        training.setdefault("eval_strategy", "no")
    training.setdefault("eval_strategy", "steps")
    training.setdefault("save_strategy", "steps")
    refuse_inconsistent_training(cfg, training)
    resolved = cfg.model_copy(update={"training": training})
    resolved._batch_is_default = not (BATCH_DEFAULTS.keys() & cfg.training.keys())
    return resolved


def settings_needing_eval_data(cfg: SftlabConfig, training: dict[str, Any]) -> list[str]:
    """The settings that only work with evaluation, named as the config spells them."""
    wanted = [f"training.{key}" for key in ("load_best_model_at_end", "metric_for_best_model") if training.get(key)]
    if "overfitting" in cfg.monitor.stop_on:
        wanted.append("monitor.stop_on: overfitting")
    return wanted


def refuse_inconsistent_training(cfg: SftlabConfig, training: dict[str, Any]) -> None:
    """Settings that would fail only after the data is prepared, or silently do nothing.

    Checked up front, with the keys and the fix named: TRL refuses some of these too, but
    only once it is built, after the data preparation.
    """
    output_dir = training.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise ConfigError(f"training.output_dir must name a directory (got {output_dir!r})",
                          hint="for example output_dir: runs/my-run")
    if cfg.data.eval is None and cfg.data.eval_split == 0:
        wanted = settings_needing_eval_data(cfg, training)
        if cfg.training.get("eval_strategy", "no") != "no":  # asked for by the user, not a default
            wanted.append(f"training.eval_strategy: {cfg.training['eval_strategy']}")
        if wanted:
            raise ConfigError(f"{', '.join(wanted)} needs eval data, but data.eval is not set and data.eval_split is 0",
                              hint="set data.eval, or data.eval_split (e.g. 0.05), or remove " + ", ".join(wanted))
    eval_strategy, save_strategy = training.get("eval_strategy"), training.get("save_strategy")
    if training.get("load_best_model_at_end") and save_strategy != "best":
        if eval_strategy != save_strategy:
            raise ConfigError(
                f"training.load_best_model_at_end needs eval_strategy and save_strategy to match "
                f"(eval_strategy is {eval_strategy!r}, save_strategy is {save_strategy!r})",
                hint="set both to steps (or both to epoch), or save_strategy: best")
        save_steps = training.get("save_steps")
        eval_steps = training.get("eval_steps") or training.get("logging_steps")
        if eval_strategy == "steps" and isinstance(save_steps, (int, float)) and isinstance(eval_steps, (int, float)) \
                and save_steps >= 1 and eval_steps >= 1 and save_steps % eval_steps:
            raise ConfigError(
                f"training.load_best_model_at_end needs save_steps ({save_steps:g}) to be a multiple of eval_steps "
                f"({eval_steps:g}): the best model can only be one that was both evaluated and saved",
                hint=f"for example save_steps: {eval_steps * max(1, round(save_steps / eval_steps)):g}")


def set_by_dotted_key(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    if not all(part.strip() for part in (*parents, leaf)):
        raise ConfigError(f"--set {dotted}=...: empty key name", hint="for example --set training.learning_rate=1e-4")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE", hint="for example --set training.learning_rate=1e-4")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError, *_YAML_CONSTRUCTION_ERRORS):  # e.g. a date like 2001-02-30: keep the text
        value = text
    set_by_dotted_key(raw, dotted.strip(), value)


# What PyYAML's constructors raise, besides YAMLError, for scalars they cannot build.
_YAML_CONSTRUCTION_ERRORS = (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError)


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}", hint="run `sftlab init CONFIG` to write a starter config")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[tuple, int] = {}
        _record_key_lines(node, (), lines, path)
        return yaml.safe_load(text), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc}", hint="check indentation and quoting on that line") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except _YAML_CONSTRUCTION_ERRORS as exc:  # 2001-02-30 read as a date, `!!int abc`, a bare `!!float`...
        raise ConfigError(f"{path}: invalid value: {exc or type(exc).__name__}",
                          hint="quote values that look like dates, and check explicit tags such as !!int") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply or an alias refers to itself") from None


def _record_key_lines(node: yaml.Node | None, prefix: tuple, lines: dict[tuple, int], path: Path) -> None:
    """Map each key path to its 1-based line, and reject keys given twice."""
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: a key must be a name, not a list or mapping")
            key = key_node.value
            if key in seen:
                raise ConfigError(f"{path}:{key_node.start_mark.line + 1}: key {'.'.join((*prefix, key))} is given twice")
            seen.add(key)
            lines[(*prefix, key)] = key_node.start_mark.line + 1
            _record_key_lines(value_node, (*prefix, key), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            _record_key_lines(item, (*prefix, index), lines, path)


def _refuse_unrepresentable(value: Any, loc: tuple, source: str, lines: dict[tuple, int]) -> None:
    """Binary (!!binary) and NaN/infinite values mean nothing in a config, and the resolved
    config.yaml could not hold them (JSON-mode dumping turns inf into null)."""
    if isinstance(value, dict):
        for key, child in value.items():
            _refuse_unrepresentable(child, (*loc, key), source, lines)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _refuse_unrepresentable(child, (*loc, index), source, lines)
    elif isinstance(value, (bytes, float)) and not (isinstance(value, float) and math.isfinite(value)):
        line = _nearest_line(lines, loc)
        where = f"{source}:{line}" if line else source
        what = "binary data" if isinstance(value, bytes) else f"{value} (not a finite number)"
        raise ConfigError(f"{where}: {'.'.join(map(str, loc)) or 'the config'} is {what}")


def _config_error_from(exc: ValidationError, source: str, lines: dict[tuple, int]) -> ConfigError:
    # A union (e.g. data.train: str | source | list) reports one error per member; an unknown
    # key, a validator's own message, or else the deepest error names what the user got wrong.
    error = max(exc.errors(), key=lambda e: (e["type"] == "extra_forbidden", e["type"] == "value_error", len(e["loc"])))
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _TrainingKeyError):
        line = lines.get(("training", cause.key)) or lines.get(("training",))
        return ConfigError(f"{source}:{line}: {cause}" if line else f"{source}: {cause}",
                           hint="`training` takes TRL SFTConfig field names and types")
    # pydantic adds union-member tags (e.g. 'str', 'SourceConfig') to the location; keep only keys.
    known = _all_section_keys() | {key[-1] for key in lines}
    loc = tuple(part for part in error["loc"] if isinstance(part, int) or part in known)
    line = _nearest_line(lines, loc)
    where = f"{source}:{line}" if line else source
    dotted = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return ConfigError(f"{where}: unknown key {dotted}{_suggest_key(loc)}",
                           hint="`sftlab init` writes a config listing every valid key with its default")
    if error["type"] == "missing":
        return ConfigError(f"{where}: missing required key {dotted}",
                           hint="data.train names the training data, e.g. `train: data/train.jsonl`")
    message = error["msg"].removeprefix("Value error, ")
    return ConfigError(f"{where}: {dotted}: {message} (got {error.get('input')!r})")


def _all_section_keys() -> set[str]:
    keys = set(SftlabConfig.model_fields)
    for section in (ModelConfig, DataConfig, SourceConfig, WarnThresholds, LoraConfig, EvalConfig, FormatSpec, MonitorConfig):
        keys |= set(section.model_fields)
    return keys


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    # The training validator reports the section; find the offending key inside it.
    for length in range(len(loc), 0, -1):
        if loc[:length] in lines:
            return lines[loc[:length]]
    return None


def _suggest_key(loc: tuple) -> str:
    if not loc:
        return ""
    key = str(loc[-1])
    section = loc[0] if len(loc) > 1 else None
    models = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "eval": EvalConfig, "monitor": MonitorConfig}
    if section is None:
        return _did_you_mean(key, list(SftlabConfig.model_fields))
    if section in models:
        local = list(models[section].model_fields) + (list(SourceConfig.model_fields) if section == "data" else [])
        hint = _did_you_mean(key, local, ".".join(map(str, loc[:-1])) + ".")
        if hint:
            return hint
        if key in sft_config_fields() or key in _TRAINING_ALIASES:
            return f" (did you mean training.{key}?)"
        for other, model in models.items():
            if key in model.model_fields:
                return f" (did you mean {other}.{key}?)"
    return ""


def _did_you_mean(key: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def starter_config_text() -> str:
    return (Path(__file__).parent / "starter.yaml").read_text(encoding="utf-8")


def write_starter_config(path: Path, force: bool = False) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", hint="pass --force to replace it, or give another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_config_text(), encoding="utf-8")
