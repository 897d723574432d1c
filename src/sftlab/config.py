"""Config: one YAML file, validated up front before anything heavy is loaded.

The file has six sections: `model`, `data`, `training`, `lora` (optional), `eval` and
`monitor` (the typed sections are in config_sections.py). `training` takes TRL's
`SFTConfig` field names unchanged and passes them through, so TRL users need nothing new;
the defaults sftlab fills in follow the course chapter (1-3 epochs, small batches, a
conservative learning rate, warmup) and are stated here, in TRAINING_DEFAULTS and the
sections' fields. What they resolve to on this machine (the batch split, packing,
precision, activation checkpointing) is decided in one place, resolve.py.

Trade-offs:
- An unknown key anywhere is an error naming the key, its line in the file and the
  closest valid key: a misspelt `learning_rat` silently ignored would cost a whole run.
- `training` values are type-checked against `SFTConfig`'s own annotations and lists of
  choices (`loss_type`, `packing_strategy`...), and cross-field rules are left to
  `SFTConfig` itself (see `resolve.build_sft_config`), so sftlab never disagrees with TRL
  about what is valid.
- transformers 5 folded `warmup_ratio` into a fractional `warmup_steps`; the chapter and
  most recipes still say `warmup_ratio`, so sftlab accepts it and translates it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, TypeAdapter, ValidationError, field_validator

from sftlab.config_sections import (  # re-exported: every section is imported from sftlab.config
    BUILTIN_PRIMARY_METRICS,
    EMBEDDED_MODEL,
    FINDING_CODES,
    METRIC_NAME,
    DataConfig,
    DataSources,
    EvalConfig,
    FormatSpec,
    LoraConfig,
    MetricSpec,
    ModelConfig,
    MonitorConfig,
    PromptedBaselineConfig,
    SourceConfig,
    WarnThresholds,
    _Section,
)
from sftlab.errors import ConfigError
from sftlab.rundir import CONFIG_FILE  # re-exported: the resolved config, written into each run directory

__all__ = [
    "BATCH_DEFAULTS",
    "BUILTIN_PRIMARY_METRICS",
    "CONFIG_FILE",
    "EMBEDDED_MODEL",
    "FINDING_CODES",
    "LORA_LEARNING_RATE",
    "METRIC_NAME",
    "TRAINING_DEFAULTS",
    "DataConfig",
    "DataSources",
    "EvalConfig",
    "FormatSpec",
    "LoraConfig",
    "MetricSpec",
    "ModelConfig",
    "MonitorConfig",
    "PromptedBaselineConfig",
    "SftlabConfig",
    "SourceConfig",
    "WarnThresholds",
    "apply_override",
    "cache_root",
    "load_config",
    "set_by_dotted_key",
    "sft_config_fields",
    "starter_config_text",
    "validate_config",
    "write_starter_config",
]


def cache_root() -> Path | None:
    """Where sftlab keeps what it can rebuild (prepared data, the converted embedded model):
    `SFTLAB_CACHE_DIR`, else ~/.cache/sftlab; None when `SFTLAB_NO_CACHE` is set."""
    import os

    if os.environ.get("SFTLAB_NO_CACHE"):
        return None
    cache_home = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    return Path(os.environ.get("SFTLAB_CACHE_DIR") or os.path.join(cache_home, "sftlab"))


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
# resolve.fit_batch_to_memory); set either key and both are used as given.
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
                raise _TrainingKeyError(
                    key, f"training.{key} = {value!r} is not one of: {', '.join(map(str, choices))}"
                )
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
    from sftlab.resolve import resolve_defaults  # the resolver reads this module's defaults: imported late

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
        raise ConfigError(
            f"{source}: the config must be a mapping of sections, got {type(raw).__name__}",
            hint="run `sftlab init` to write a starter config",
        )
    try:
        return SftlabConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error_from(exc, source, lines or {}) from None


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
        raise ConfigError(
            f"--set {override!r}: expected KEY=VALUE", hint="for example --set training.learning_rate=1e-4"
        )
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
        raise ConfigError(
            f"{where}: invalid YAML: {exc.problem or exc}", hint="check indentation and quoting on that line"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except _YAML_CONSTRUCTION_ERRORS as exc:  # 2001-02-30 read as a date, `!!int abc`, a bare `!!float`...
        raise ConfigError(
            f"{path}: invalid value: {exc or type(exc).__name__}",
            hint="quote values that look like dates, and check explicit tags such as !!int",
        ) from None
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
                raise ConfigError(
                    f"{path}:{key_node.start_mark.line + 1}: key {'.'.join((*prefix, key))} is given twice"
                )
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
        return ConfigError(
            f"{source}:{line}: {cause}" if line else f"{source}: {cause}",
            hint="`training` takes TRL SFTConfig field names and types",
        )
    # pydantic adds union-member tags (e.g. 'str', 'SourceConfig') to the location; keep only keys.
    known = _all_section_keys() | {key[-1] for key in lines}
    loc = tuple(part for part in error["loc"] if isinstance(part, int) or part in known)
    line = _nearest_line(lines, loc)
    where = f"{source}:{line}" if line else source
    dotted = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return ConfigError(
            f"{where}: unknown key {dotted}{_suggest_key(loc)}",
            hint="`sftlab init` writes a config listing every valid key with its default",
        )
    if error["type"] == "missing":
        return ConfigError(
            f"{where}: missing required key {dotted}",
            hint="data.train names the training data, e.g. `train: data/train.jsonl`",
        )
    message = error["msg"].removeprefix("Value error, ")
    return ConfigError(f"{where}: {dotted}: {message} (got {error.get('input')!r})")


def _all_section_keys() -> set[str]:
    keys = set(SftlabConfig.model_fields)
    for section in (
        ModelConfig,
        DataConfig,
        SourceConfig,
        WarnThresholds,
        LoraConfig,
        EvalConfig,
        FormatSpec,
        MonitorConfig,
    ):
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
    models = {
        "model": ModelConfig,
        "data": DataConfig,
        "lora": LoraConfig,
        "eval": EvalConfig,
        "monitor": MonitorConfig,
    }
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
