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

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from sftlab.config import SftlabConfig
from sftlab.data import prepare_data
from sftlab.errors import ConfigError, DataError, UserError
from sftlab.model import (
    add_default_chat_template, load_model, load_tokenizer, packing_contamination, packing_tolerance, peft_config,
)
from sftlab.monitor import (
    METRICS_FILE, STOPPED_FILE, LiveDiagnosis, MetricsLogger, NonFiniteGuard, OutputSampler, ProgressBar, read_stop,
    trim_metrics,
)

RUN_MARKER = ".sftlab-run"
COMPLETE_MARKER = "sftlab-complete.json"  # written into a checkpoint once everything in it is saved
BEST_CHECKPOINT_FILE = "best_checkpoint.json"  # marks a directory sftlab created, the only kind --overwrite may delete
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    global_step: int
    metrics: dict
    is_main_process: bool = True  # under accelerate launch, each process gets a result; one reports it
    stopped: dict | None = None  # why training stopped early (stopped.json), if it did


def train(cfg: SftlabConfig, resume: bool = False, overwrite: bool = False, console=None) -> TrainResult:
    # 1. The run directory: created fresh, or reused only to resume. Under `accelerate launch`
    #    every process runs this function; only the main one writes files.
    from accelerate import PartialState

    processes = PartialState(cpu=no_accelerator())  # on CPUs, several processes talk over gloo
    run_dir = prepare_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite, processes=processes)
    checkpoint = latest_checkpoint(run_dir) if resume else None

    # 2-3. Tokenizer, then data tokenized with it: exactly what `sftlab check` audits. The
    #      main process prepares (and caches) first; the others then load its cache.
    with processes.main_process_first():
        tokenizer, data = tokenizer_and_data(cfg)
    refuse_if_not_trainable(data.audit)

    # 4. SFTConfig from the `training` section, validated by TRL itself.
    args = build_sft_config(cfg, has_eval=data.eval is not None)
    if processes.is_main_process:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")

    # 5. Model, grown to the tokenizer if a default chat template added tokens. Packing is
    #    refused unless this model and attention implementation keep packed examples apart.
    model = load_model(cfg.model, tokenizer)
    if args.packing:
        refuse_contaminating_packing(model, cfg)

    # 6. The trainer: TRL's, with sftlab's metrics file and progress bar.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    progress = ProgressBar(console)
    trained_tokens_per_epoch = data.audit["trained_tokens"] - data.audit["truncation"]["trained_tokens_cut"]
    callbacks = [
        MetricsLogger(run_dir, trained_tokens_per_epoch),
        progress,
        NonFiniteGuard(run_dir),
        # At each evaluation the sampler answers held-out prompts before the diagnosis reads them.
        OutputSampler(run_dir, tokenizer, data.eval_examples, cfg.monitor, cfg.eval.format),
        LiveDiagnosis(run_dir, cfg.monitor, progress),
        CheckpointBookkeeping(run_dir),
    ]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if trainer.is_world_process_zero():
        print_plan(training_plan(trainer, data.audit), console)

    # 7. Train, or resume from the latest complete checkpoint with each step logged once.
    if checkpoint is not None and processes.is_main_process:
        trim_metrics(run_dir / METRICS_FILE, checkpoint_step(checkpoint))
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # the run goes on: an earlier stop no longer holds
    processes.wait_for_everyone()
    with _out_of_memory_as_user_error():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # 8. The final model (or LoRA adapter) with its tokenizer, loadable with from_pretrained:
    #    the trained weights, or after an early stop the checkpoint worth keeping.
    final_dir = run_dir / FINAL_DIR
    stopped = read_stop(run_dir)
    source = checkpoint_for_final(run_dir, stopped)
    if source is not None:
        if processes.is_main_process:
            copy_model_files(source, final_dir)
    elif stopped is None or stopped["reason"] != "instability":
        model.config.use_cache = True  # training turned the KV cache off; generation wants it back
        trainer.save_model(str(final_dir))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(final_dir))
    return TrainResult(run_dir=run_dir, final_dir=final_dir, global_step=trainer.state.global_step,
                       metrics=output.metrics, is_main_process=processes.is_main_process, stopped=stopped)


def no_accelerator() -> bool:
    import torch

    return not (torch.cuda.is_available() or torch.backends.mps.is_available()
                or (hasattr(torch, "xpu") and torch.xpu.is_available()))


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
    values["packing"] = resolve_packing(values.get("packing", "auto"), cfg.model.attn_implementation)
    if not values["packing"]:
        # Without packing, batches of similar lengths waste little compute on padding.
        values.setdefault("train_sampling_strategy", "group_by_length")
    on_gpu = torch.cuda.is_available()
    values.setdefault("use_cpu", no_accelerator())
    if "bf16" not in values and "fp16" not in values:
        values["bf16"] = on_gpu and torch.cuda.is_bf16_supported()
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; accept both.
    if "gradient_checkpointing" in values:
        values.setdefault("activation_checkpointing", values.pop("gradient_checkpointing"))
    values.setdefault("activation_checkpointing", on_gpu)
    values.setdefault("dataloader_pin_memory", on_gpu)
    # Every parameter gets a gradient in SFT (LoRA freezes some, but they never take part in DDP's
    # reduction): searching for unused ones costs a graph traversal each step.
    values.setdefault("ddp_find_unused_parameters", False)
    if not has_eval:
        values["eval_strategy"] = "no"
    values.setdefault("disable_tqdm", True)  # sftlab's ProgressBar replaces transformers' bars
    try:
        return SFTConfig(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training: {str(exc).strip().splitlines()[0]}",
                          hint="these training settings do not work together; see TRL's SFTConfig docs") from None


def refuse_contaminating_packing(model, cfg: SftlabConfig) -> None:
    leak = packing_contamination(model)
    if leak > packing_tolerance(model):
        attention = model.config._attn_implementation
        raise ConfigError(
            f"training.packing: {cfg.model.name_or_path} with attention {attention!r} lets packed examples attend to "
            f"each other (logits differ by {leak:.3g} between packed and separate examples)",
            hint="set training.packing: false, or model.attn_implementation to one that honours position ids "
            "(sdpa, eager or flash_attention_2 on models transformers supports natively)",
        )


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash")  # kernels that take packed rows natively


def resolve_packing(packing, attn_implementation: str | None) -> bool:
    """`auto` packs only where attention has variable-length kernels (flash attention).

    Elsewhere (sdpa, eager, every CPU) a packed row is one long sequence with a block-
    diagonal mask: attention over the whole row and a dense mask per layer, measured
    at half the tokens/s and several times the memory of length-grouped batches
    (bench/results/train_throughput_*.txt).
    """
    if packing != "auto":
        return bool(packing)
    return any(name in (attn_implementation or "") for name in VARLEN_ATTENTION)


def prepare_run_dir(path: Path, resume: bool, overwrite: bool, processes=None) -> Path:
    """Check the run directory on every process, then let the main process create or replace it."""
    path = Path(path)
    has_contents = path.exists() and any(path.iterdir())
    if resume and (not has_contents or latest_checkpoint(path) is None):
        raise UserError(f"nothing to resume in {path}: no complete checkpoint-* directory",
                        hint="start the run without --resume")
    if not resume and has_contents and not overwrite:
        raise UserError(f"run directory {path} already exists",
                        hint="use --resume to continue it, --overwrite to replace it, or set training.output_dir")
    if not resume and has_contents and not (path / RUN_MARKER).exists():
        raise UserError(f"{path} exists and was not made by sftlab; refusing to delete it",
                        hint="choose another training.output_dir")
    if processes is not None:
        processes.wait_for_everyone()  # every process has checked before the main one changes anything
    if resume or (processes is not None and not processes.is_main_process):
        if processes is not None:
            processes.wait_for_everyone()
        return path
    if has_contents:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text("created by sftlab; `sftlab train --overwrite` may replace this directory\n")
    if processes is not None:
        processes.wait_for_everyone()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (a run killed mid-save leaves an unmarked one)."""
    checkpoints = [p for p in Path(run_dir).glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / COMPLETE_MARKER).exists()]
    return max(checkpoints, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


class CheckpointBookkeeping(TrainerCallback):
    """After each save: mark the checkpoint complete, and keep the best one by eval loss.

    `on_save` runs once the Trainer has written the whole checkpoint, so the marker means
    it is safe to resume from. The best checkpoint becomes the Trainer's
    `best_model_checkpoint`, which its rotation (save_total_limit) never deletes.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            _write_json_atomically(checkpoint / COMPLETE_MARKER, {"step": state.global_step})
        best = best_checkpoint(self.run_dir, state.log_history)
        if best is not None:
            state.best_model_checkpoint = str(best["path"])
            _write_json_atomically(self.run_dir / BEST_CHECKPOINT_FILE,
                                   {"checkpoint": best["path"].name, "step": best["step"], "eval_loss": best["eval_loss"]})


def checkpoint_for_final(run_dir: Path, stopped: dict | None) -> Path | None:
    """After a NaN, the last complete checkpoint; after a stop on a finding (overfitting...),
    the best one by eval loss; after a normal end, None (the trained weights are final)."""
    if stopped is None:
        return None
    if stopped["reason"] == "instability":
        return latest_checkpoint(run_dir)
    best = run_dir / BEST_CHECKPOINT_FILE
    return run_dir / json.loads(best.read_text())["checkpoint"] if best.exists() else None


# Trainer state that does not belong in a model directory.
_CHECKPOINT_ONLY = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", COMPLETE_MARKER)


def copy_model_files(checkpoint: Path, final_dir: Path) -> None:
    final_dir.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name not in _CHECKPOINT_ONLY and not path.name.startswith("rng_state"):
            shutil.copy2(path, final_dir / path.name)
    config = final_dir / "config.json"
    if config.exists():  # checkpoints are saved with the KV cache off, for training
        values = json.loads(config.read_text())
        values["use_cache"] = True
        config.write_text(json.dumps(values, indent=2))


def best_checkpoint(run_dir: Path, log_history: list[dict]) -> dict | None:
    """The complete checkpoint with the lowest eval loss measured at its own step."""
    eval_loss_at = {entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}
    candidates = [
        {"path": path, "step": checkpoint_step(path), "eval_loss": eval_loss_at[checkpoint_step(path)]}
        for path in Path(run_dir).glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / COMPLETE_MARKER).exists() and checkpoint_step(path) in eval_loss_at
    ]
    return min(candidates, key=lambda c: c["eval_loss"], default=None)


def _write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


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
    console.print(f"plan: {plan['examples']:,} examples{packed}; {plan['steps']:,} steps of ~{plan['tokens_per_step']:,} tokens "
                  f"(~{plan['trained_tokens_per_step']:,} trained) = {plan['epochs']:.2f} epochs; "
                  f"{plan['checkpoints']} checkpoints (keeping {plan['save_total_limit'] or 'all'}), "
                  f"{plan['evaluations']} evaluations", soft_wrap=True)
    if plan["epochs"] > 3:
        console.print(f"[yellow]warning[/]: {plan['epochs']:.1f} epochs: more than the 1-3 the chapter advises; "
                      "watch for overfitting or lower max_steps", soft_wrap=True)


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
