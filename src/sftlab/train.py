"""Train: one supervised fine-tune with TRL's SFTTrainer, read top to bottom.

    config -> run directory -> tokenizer -> data -> SFTConfig -> model -> SFTTrainer
           -> train (or resume) -> final/ (model or LoRA adapter + tokenizer)

TRL does the training and the distribution across processes; this file only decides
what goes in and where it is written. The data arrives already tokenized with its
trained-token masks (see data.py), so SFTTrainer trains exactly what `sftlab check`
audited.

Trade-offs:
- A run directory that exists is never reused without `--resume` or replaced without
  `--overwrite`, and `--overwrite` only ever deletes a directory sftlab made.
- On CPU, gradient checkpointing is off by default (TRL turns it on): memory is rarely
  the limit for the small models that train on a CPU, and recomputation costs ~25%.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sftlab.config import SftlabConfig
from sftlab.data import prepare_data
from sftlab.errors import ConfigError, DataError, UserError
from sftlab.model import add_default_chat_template, load_model, load_tokenizer, peft_config
from sftlab.monitor import METRICS_FILE, MetricsLogger, ProgressBar, trim_metrics

RUN_MARKER = ".sftlab-run"  # marks a directory sftlab created, the only kind --overwrite may delete
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    global_step: int
    metrics: dict


def train(cfg: SftlabConfig, resume: bool = False, overwrite: bool = False, console=None) -> TrainResult:
    # 1. The run directory: created fresh, or reused only to resume.
    run_dir = prepare_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite)
    checkpoint = latest_checkpoint(run_dir) if resume else None

    # 2-3. Tokenizer, then data tokenized with it: exactly what `sftlab check` audits.
    tokenizer, data = tokenizer_and_data(cfg)
    refuse_if_not_trainable(data.audit)

    # 4. SFTConfig from the `training` section, validated by TRL itself.
    args = build_sft_config(cfg, has_eval=data.eval is not None)
    (run_dir / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")

    # 5. Model, grown to the tokenizer if a default chat template added tokens.
    model = load_model(cfg.model, tokenizer)

    # 6. The trainer: TRL's, with sftlab's metrics file and progress bar.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora),
        callbacks=[MetricsLogger(run_dir), ProgressBar(console)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    # 7. Train, or resume from the latest checkpoint with each step logged once.
    if checkpoint is not None:
        trim_metrics(run_dir / METRICS_FILE, checkpoint_step(checkpoint))
    with _out_of_memory_as_user_error():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 8. The final model (or LoRA adapter) with its tokenizer, loadable with from_pretrained.
    final_dir = run_dir / FINAL_DIR
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final_dir))
    return TrainResult(run_dir=run_dir, final_dir=final_dir, global_step=trainer.state.global_step, metrics=output.metrics)


def check(cfg: SftlabConfig) -> dict:
    """`sftlab check`: prepare the data as training would and return its audit."""
    return tokenizer_and_data(cfg)[1].audit


def tokenizer_and_data(cfg: SftlabConfig):
    # The tokenizer comes first: data is tokenized with the model's own chat template.
    tokenizer = load_tokenizer(cfg.model)
    add_default_chat_template(tokenizer)
    assistant_only_loss = bool(cfg.training.get("assistant_only_loss", True))
    data = prepare_data(cfg.data, tokenizer, assistant_only_loss=assistant_only_loss, seed=cfg.training["seed"],
                        max_length=cfg.training.get("max_length"))
    return tokenizer, data


def refuse_if_not_trainable(audit: dict) -> None:
    if not audit["ok"]:
        raise DataError(f"the data cannot be trained: {'; '.join(audit['errors'])}", hint="run `sftlab check` for the full audit")


def build_sft_config(cfg: SftlabConfig, has_eval: bool):
    """Turn the `training` section into TRL's SFTConfig, translating what sftlab owns."""
    import torch
    from trl import SFTConfig

    values = dict(cfg.training)
    # transformers 5 reads a fractional warmup_steps as a ratio of the total steps.
    if "warmup_ratio" in values:
        values["warmup_steps"] = values.pop("warmup_ratio")
    # sftlab derives the loss masks itself (data.py); TRL would need {% generation %} markers.
    values["assistant_only_loss"] = False
    on_gpu = torch.cuda.is_available()
    if "bf16" not in values and "fp16" not in values:
        values["bf16"] = on_gpu and torch.cuda.is_bf16_supported()
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; accept both.
    if "gradient_checkpointing" in values:
        values.setdefault("activation_checkpointing", values.pop("gradient_checkpointing"))
    values.setdefault("activation_checkpointing", on_gpu)
    values.setdefault("dataloader_pin_memory", on_gpu)
    if not has_eval:
        values["eval_strategy"] = "no"
    values.setdefault("disable_tqdm", True)  # sftlab's ProgressBar replaces transformers' bars
    try:
        return SFTConfig(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training: {str(exc).strip().splitlines()[0]}",
                          hint="these training settings do not work together; see TRL's SFTConfig docs") from None


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    path = Path(path)
    has_contents = path.exists() and any(path.iterdir())
    if resume:
        if not has_contents or latest_checkpoint(path) is None:
            raise UserError(f"nothing to resume in {path}: no checkpoint-* directory",
                            hint="start the run without --resume")
        return path
    if has_contents:
        if not overwrite:
            raise UserError(f"run directory {path} already exists",
                            hint="use --resume to continue it, --overwrite to replace it, or set training.output_dir")
        if not (path / RUN_MARKER).exists():
            raise UserError(f"{path} exists and was not made by sftlab; refusing to delete it",
                            hint="choose another training.output_dir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text("created by sftlab; `sftlab train --overwrite` may replace this directory\n")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


class _out_of_memory_as_user_error:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import torch

        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise UserError(
                f"out of memory during training ({type(exc).__name__})",
                hint="lower training.per_device_train_batch_size and raise gradient_accumulation_steps, "
                "shorten training.max_length, set training.gradient_checkpointing: true, or add a `lora:` section",
            ) from exc
        return False
