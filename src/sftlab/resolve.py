"""Resolve: every effective training setting, decided here once, and TRL's SFTConfig built from them.

    config.yaml (the user's keys)
      -> resolve_defaults     sftlab's defaults (config.TRAINING_DEFAULTS) for every key left out
      -> fit_batch_to_memory  on a CPU, the default batch in micro-batches that fit in memory
      -> packing_for          pack or not, through which attention (the facts are in speed.py)
      -> build_sft_config     precision, activation checkpointing, the rest: TRL's SFTConfig
      -> training_plan        what the trainer will do with it: rows, steps, epochs, saves

The defaults are stated once, in config.py (TRAINING_DEFAULTS and the sections' fields);
this module applies them and never restates them. The run directory records both ends:
config.yaml is the config as resolved (defaults filled in, the batch as split), and
run_info.json holds the SFTConfig as TRL received it, with the plan.

Precision: the weights load in float32 on a CPU, in bfloat16 on GPUs that support it
(model.pick_dtype). Training runs under bf16 autocast (TRL's default) on those GPUs and on
CPUs with native bf16 matrix instructions (AVX512-BF16, AMX: 1.5x the tokens/s of fp32 on
SmolLM2-135M); on other CPUs, where bf16 is emulated and slower, it runs in plain fp32.

Trade-offs:
- On a CPU, activation checkpointing is off by default (TRL turns it on): the default batch
  goes through in micro-batches fitted to memory instead, with gradient accumulation, which
  keeps activations small without paying ~30% for recomputation. A batch the user set is
  used as given.
- config.yaml keeps the hardware-dependent choices (packing: auto, precision, activation
  checkpointing) as the user left them, so the file stays portable to another machine;
  what they resolved to here is in run_info.json.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.config import (
    BATCH_DEFAULTS,
    LORA_LEARNING_RATE,
    TRAINING_DEFAULTS,
    SftlabConfig,
    sft_config_fields,
)
from sftlab.errors import ConfigError
from sftlab.model import activation_bytes_per_token, training_state_bytes
from sftlab.rundir import RUN_INFO_FILE, read_json_object, write_json, writing
from sftlab.speed import PackingChoice, accelerator_type, packing_for

# =========================================================================== the config's defaults


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
        raise ConfigError(
            f"training.output_dir must name a directory (got {output_dir!r})",
            hint="for example output_dir: runs/my-run",
        )
    if cfg.data.eval is None and cfg.data.eval_split == 0:
        wanted = settings_needing_eval_data(cfg, training)
        if cfg.training.get("eval_strategy", "no") != "no":  # asked for by the user, not a default
            wanted.append(f"training.eval_strategy: {cfg.training['eval_strategy']}")
        if wanted:
            raise ConfigError(
                f"{', '.join(wanted)} needs eval data, but data.eval is not set and data.eval_split is 0",
                hint="set data.eval, or data.eval_split (e.g. 0.05), or remove " + ", ".join(wanted),
            )
    eval_strategy, save_strategy = training.get("eval_strategy"), training.get("save_strategy")
    if training.get("load_best_model_at_end") and save_strategy != "best":
        if eval_strategy != save_strategy:
            raise ConfigError(
                f"training.load_best_model_at_end needs eval_strategy and save_strategy to match "
                f"(eval_strategy is {eval_strategy!r}, save_strategy is {save_strategy!r})",
                hint="set both to steps (or both to epoch), or save_strategy: best",
            )
        save_steps = training.get("save_steps")
        eval_steps = training.get("eval_steps") or training.get("logging_steps")
        if (
            eval_strategy == "steps"
            and isinstance(save_steps, (int, float))
            and isinstance(eval_steps, (int, float))
            and save_steps >= 1
            and eval_steps >= 1
            and save_steps % eval_steps
        ):
            raise ConfigError(
                f"training.load_best_model_at_end needs save_steps ({save_steps:g}) to be a multiple of eval_steps "
                f"({eval_steps:g}): the best model can only be one that was both evaluated and saved",
                hint=f"for example save_steps: {eval_steps * max(1, round(save_steps / eval_steps)):g}",
            )


# =========================================================================== the machine


def has_accelerator() -> bool:
    """A GPU (CUDA/ROCm), Apple MPS or Intel XPU that transformers would train on."""
    return accelerator_type() is not None


def cpu_has_native_bf16() -> bool:
    """bf16 autocast (TRL's default) pays on CPUs with bf16 matrix instructions (AVX512-BF16, AMX):
    1.5x the tokens/s of fp32 on SmolLM2-135M here. Elsewhere it is emulated and slower than fp32."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def uses_bf16(training: dict[str, Any]) -> dict[str, bool]:
    """The precision keys SFTConfig gets: the config's own bf16/fp16 if it set either, else bf16
    autocast on CUDA GPUs that support it and on CPUs with native bf16 (see the module docstring)."""
    import torch

    if "bf16" in training or "fp16" in training:
        return {}
    on_gpu = torch.cuda.is_available()
    return {"bf16": torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()}


def uses_activation_checkpointing(training: dict[str, Any]) -> bool:
    """The config's choice under either name (transformers 5 renamed gradient_checkpointing), else
    on with a CUDA GPU (TRL's default) and off elsewhere, where fit_batch_to_memory keeps activations small."""
    import torch

    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if key in training:
            return training[key]
    return torch.cuda.is_available()


# Below this, activation memory is not worth saving: small models are dispatch-bound on a CPU
# and train fastest in wide micro-batches.
ACTIVATION_MEMORY_FLOOR = 2**30


def fit_batch_to_memory(cfg: SftlabConfig, model) -> SftlabConfig:
    """On a CPU without activation checkpointing, feed sftlab's default batch (4 conversations
    per optimizer step) in the widest micro-batches whose activations stay within the memory
    that weights, gradients and optimizer state take anyway (at least 1 GiB), accumulating
    gradients to the same 4 conversations per step.

    The gradient is the same (transformers normalizes the loss by the tokens of the whole
    accumulated batch); a CPU loses little speed, as one long conversation already keeps its
    matrix kernels busy, and saves the padding. On SmolLM2-135M: 1 conversation x 4
    accumulation steps (bench/results/train_throughput_smollm2.txt). Where the user set a
    batch key, or on an accelerator (activation checkpointing on), the batch is left as set.
    """
    training = cfg.training
    if not cfg.batch_is_default or has_accelerator() or uses_activation_checkpointing(training):
        return cfg
    rows_per_step = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    per_token = activation_bytes_per_token(model, bytes_per_value=2 if cpu_has_native_bf16() else 4)
    budget = max(training_state_bytes(model), ACTIVATION_MEMORY_FLOOR)
    tokens_per_row = training.get("max_length") or TRAINING_DEFAULTS["max_length"]  # max_length: null cuts nothing
    rows = next(
        r
        for r in range(rows_per_step, 0, -1)
        if rows_per_step % r == 0 and (r * tokens_per_row * per_token <= budget or r == 1)
    )
    fitted = {**training, "per_device_train_batch_size": rows, "gradient_accumulation_steps": rows_per_step // rows}
    return cfg.model_copy(update={"training": fitted})


# =========================================================================== TRL's SFTConfig


def build_sft_config(cfg: SftlabConfig, has_eval: bool, packing: PackingChoice | None = None):
    """Turn the `training` section into TRL's SFTConfig, translating what sftlab owns.

    The speed options (use_liger_kernel, torch_compile, loss_type...) pass through unchanged
    under TRL's names; `packing` is the decision for the loaded model (speed.packing_for), or
    for this machine alone when no model is given.
    """
    import torch
    from trl import SFTConfig

    values = dict(cfg.training)
    # transformers 5 reads a fractional warmup_steps as a ratio of the total steps.
    if "warmup_ratio" in values:
        values["warmup_steps"] = values.pop("warmup_ratio")
    # sftlab derives the loss masks itself (data.py); TRL would need {% generation %} markers.
    values["assistant_only_loss"] = False
    values["packing"] = (packing or packing_for(cfg)).packing
    batch = values.get("per_device_train_batch_size", sft_config_fields()["per_device_train_batch_size"].default)
    if not values["packing"] and batch > 1:
        # Without packing, batches of similar lengths waste little compute on padding.
        values.setdefault("train_sampling_strategy", "group_by_length")
    on_gpu = torch.cuda.is_available()
    values.setdefault("use_cpu", not has_accelerator())
    values.update(uses_bf16(cfg.training))
    values.pop("gradient_checkpointing", None)
    values["activation_checkpointing"] = uses_activation_checkpointing(cfg.training)
    values.setdefault("dataloader_pin_memory", on_gpu)
    # Every parameter gets a gradient in SFT (LoRA freezes some, but they never take part in DDP's
    # reduction): searching for unused ones costs a graph traversal each step.
    values.setdefault("ddp_find_unused_parameters", False)
    if not has_eval:
        values["eval_strategy"] = "no"
    values.setdefault("disable_tqdm", True)  # sftlab's ProgressBar replaces transformers' bars
    try:
        return SFTConfig(**values)
    except (ValueError, TypeError, OSError, ImportError) as exc:  # OSError: a missing accelerator/deepspeed file
        raise ConfigError(
            f"training: {str(exc).strip().splitlines()[0]}",
            hint="these training settings do not work together; see TRL's SFTConfig docs",
        ) from None


@dataclass(frozen=True)
class ResolvedTraining:
    """What a run trains with, once the model is loaded."""

    cfg: SftlabConfig  # the config as resolved for this model and machine: what config.yaml holds
    packing: PackingChoice  # whether it packs, through which attention implementation, and why
    args: Any  # TRL's SFTConfig, as SFTTrainer receives it


def resolve_training(cfg: SftlabConfig, model, has_eval: bool) -> ResolvedTraining:
    """The batch fitted to memory, the packing decision for this model and machine, and the SFTConfig."""
    cfg = fit_batch_to_memory(cfg, model)
    packing = packing_for(cfg, model)
    return ResolvedTraining(cfg, packing, build_sft_config(cfg, has_eval=has_eval, packing=packing))


# =========================================================================== the plan


def training_plan(trainer, audit: dict) -> dict:
    """What the run will do, from the trainer's own numbers: rows, tokens per step, steps, epochs, saves."""
    args = trainer.args
    rows = len(trainer.train_dataset)
    examples = audit["splits"]["train"]["rows"]
    per_step_rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps_per_epoch = max(1, math.ceil(rows / per_step_rows))
    steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    tokens_per_row = audit["splits"]["train"]["tokens"] / rows if rows else 0
    save_every = args.save_steps if args.save_strategy == "steps" else None
    return {
        "examples": examples,
        "rows": rows,  # packed rows when packing, else examples
        "packing": bool(args.packing),
        "tokens_per_step": round(per_step_rows * tokens_per_row),
        "trained_tokens_per_step": round(per_step_rows * audit["trained_tokens"] / rows) if rows else 0,
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "checkpoints": (steps // int(save_every)) if save_every else 0,
        "save_total_limit": args.save_total_limit,
        "evaluations": (steps // int(args.eval_steps or args.logging_steps)) if args.eval_strategy == "steps" else 0,
    }


def print_plan(plan: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True, highlight=False)
    packed = f" packed into {plan['rows']:,} rows" if plan["packing"] else " in length-grouped batches"
    if plan.get("packing_reason"):
        console.print(
            f"packing {'on' if plan['packing'] else 'off'} (attention {plan.get('attention')}): "
            f"{plan['packing_reason']}",
            soft_wrap=True,
            markup=False,
        )
    console.print(
        f"plan: {plan['examples']:,} examples{packed}; {plan['steps']:,} steps of "
        f"~{plan['tokens_per_step']:,} tokens (~{plan['trained_tokens_per_step']:,} trained) = "
        f"{plan['epochs']:.2f} epochs; {plan['checkpoints']} checkpoints (keeping "
        f"{plan['save_total_limit'] or 'all'}), {plan['evaluations']} evaluations",
        soft_wrap=True,
    )
    if plan["epochs"] > 3:
        console.print(
            f"[yellow]warning[/]: {plan['epochs']:.1f} epochs: more than the 1-3 the chapter advises; "
            "watch for overfitting or lower max_steps",
            soft_wrap=True,
        )


# =========================================================================== the record: run_info.json

PACKAGES = ("sftlab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")
# The arguments the report shows, under "training_args" (the whole SFTConfig is under "sft_config").
RECORDED_ARGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "max_length",
    "packing",
    "activation_checkpointing",
    "seed",
    "logging_steps",
    "eval_steps",
    "save_steps",
)


def write_run_info(run_dir: str | Path, args, plan: dict | None = None) -> Path:
    """run_info.json: what the run directory cannot tell afterwards. Written by training, main process only.

    The hardware, the framework versions, the resolved training arguments (the report's
    selection, and every SFTConfig field that differs from TRL's default, as TRL received
    them), the plan and the start time; a resumed run keeps the first start time and lists
    each resumption.
    """
    from sftlab.contracts import RunInfo

    path = Path(run_dir) / RUN_INFO_FILE
    previous = RunInfo.parse(read_json_object(path))  # None: the first start (or a file a kill left unreadable)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {
        "started_at": (previous.started_at or now) if previous else now,
        "resumed_at": [*previous.resumed_at, now] if previous else [],
        "hardware": _hardware_now(args),
        "precision": "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32",
        "versions": current_versions(),
        "training_args": {name: _plain(getattr(args, name)) for name in RECORDED_ARGS if hasattr(args, name)},
        "sft_config": sft_config_record(args),
        "plan": plan,
    }
    with writing(path):
        write_json(path, info)
    return path


def sft_config_record(args) -> dict[str, Any]:
    """Every SFTConfig field whose value differs from TRL's default, JSON-safe (SFTConfig.to_dict
    already hides tokens); {} for anything that is not an SFTConfig."""
    import dataclasses

    if not dataclasses.is_dataclass(args) or not hasattr(args, "to_dict"):
        return {}
    changed = {
        field.name
        for field in dataclasses.fields(args)
        if field.init and _json_safe(getattr(args, field.name)) != _json_safe(_default_of(field))
    }
    return {name: _json_safe(value) for name, value in args.to_dict().items() if name in changed}


def _default_of(field) -> Any:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return getattr(field.default, "value", field.default)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _json_safe(value):
    value = getattr(value, "value", value)  # enums as their names
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf or NaN
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def current_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value):
    value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim) as their names
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _hardware_now(args) -> dict:
    import platform

    import torch

    info = {
        "device": str(getattr(args, "device", "cpu")),
        "cpu_count": os.cpu_count(),
        "processes": getattr(args, "world_size", 1),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
