"""Train: one supervised fine-tune with TRL's SFTTrainer, read top to bottom.

    config -> run directory -> tokenizer -> data -> model -> SFTConfig -> SFTTrainer
           -> evaluate the base model, plain and prompted -> train (or resume) -> final/
           (model or LoRA adapter + tokenizer) -> evaluate the tuned model -> verdict -> report

TRL does the training and the distribution across processes; this file only decides
what goes in and where it is written. The data arrives already tokenized with its
trained-token masks (see data.py), so SFTTrainer trains exactly what `sftlab check`
audited.

Trade-offs:
- A run directory that exists is never reused without `--resume` or replaced without
  `--overwrite`, and `--overwrite` only ever deletes a directory sftlab made.
- On CPU, activation (gradient) checkpointing is off by default (TRL turns it on): the
  default batch goes through in micro-batches fitted to memory, with gradient
  accumulation (fit_batch_to_memory), which keeps activations small without paying ~30%
  for recomputation. bf16 autocast where the CPU computes in bf16 natively, as TRL does.
- Before the first step, what would fail late is checked (preflight): a writable run
  directory with room for the checkpoints, and cadences that fire.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from sftlab.config import CONFIG_FILE, SftlabConfig, settings_needing_eval_data
from sftlab.data import preparation_settings, prepare_data
from sftlab.errors import ConfigError, DataError, UserError
from sftlab.evaluate import evaluate_after_training, evaluate_before_training, held_out_set
from sftlab.metrics import load_user_metrics
from sftlab.model import (
    FINAL_DIR, activation_bytes_per_token, add_default_chat_template, load_model, load_tokenizer, peft_config,
    training_state_bytes,
)
from sftlab.monitor import (
    METRICS_FILE, STOPPED_FILE, LiveDiagnosis, LiveReport, MetricsLogger, NonFiniteGuard, OutputSampler, ProgressBar, read_stop,
    trim_metrics, write_atomically,
)
from sftlab.report import write_audit, write_report, write_run_info
from sftlab.speed import (
    PackingChoice, accelerator_type, check_speed_options, packing_for, refuse_contaminating_packing, use_attention,
)

RUN_MARKER = ".sftlab-run"
COMPLETE_MARKER = "sftlab-complete.json"  # written into a checkpoint once everything in it is saved
BEST_CHECKPOINT_FILE = "best_checkpoint.json"  # marks a directory sftlab created, the only kind --overwrite may delete


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

    processes = PartialState(cpu=not has_accelerator())  # on CPUs, several processes talk over gloo
    load_user_metrics(cfg.eval.metrics)  # the user's own metric code: a broken one fails now, not after training
    # Speed options that cannot work here (Liger on a CPU...) fail now, before any data is prepared.
    for warning in check_speed_options(cfg, accelerator_type()):
        if processes.is_main_process:
            print_note(warning, console, warning=True)
    run_dir = prepare_run_dir(cfg.output_dir, resume=resume, overwrite=overwrite, processes=processes)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None and processes.is_main_process:
        discarded = discard_incomplete_checkpoints(run_dir)  # a kill mid-save left them; training writes them again
        print_note(f"resuming from {checkpoint.name}"
                   + (f"; discarded the incomplete {', '.join(p.name for p in discarded)}" if discarded else ""), console)

    # 2-3. Tokenizer, then data tokenized with it: exactly what `sftlab check` audits. The
    #      main process prepares (and caches) first; the others then load its cache.
    with processes.main_process_first():
        tokenizer, data = tokenizer_and_data(cfg)
    refuse_if_not_trainable(data.audit)
    refuse_evaluation_without_eval_data(cfg, has_eval=data.eval is not None)

    # 4. Model, grown to the tokenizer if a default chat template added tokens.
    with _out_of_memory_as_user_error(during="model loading", hint="a smaller model, or model.dtype: bfloat16"):
        model = load_model(cfg.model, tokenizer)

    # 5. SFTConfig from the `training` section, validated by TRL itself, with the default batch
    #    fed in micro-batches that fit in memory on a CPU. Packing goes through the attention path
    #    that skips the work between examples on this hardware (speed.py), and is refused (step 6)
    #    unless this model and attention implementation keep packed examples apart.
    cfg = fit_batch_to_memory(cfg, model)
    packing = packing_for(cfg, model)
    use_attention(model, packing)
    args = build_sft_config(cfg, has_eval=data.eval is not None, packing=packing)
    if processes.is_main_process:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        write_audit(run_dir, data.audit)  # eval/audit.json: the dataset characteristics, for the report

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
        LiveReport(run_dir, write_report),  # report.html at each evaluation, reloading itself while the run goes on
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
    if args.packing:  # probed where the trainer placed the model: flash and flex kernels run on the GPU
        refuse_contaminating_packing(trainer.model, cfg)
    plan = training_plan(trainer, data.audit)
    plan.update(attention=model.config._attn_implementation, packing_reason=packing.reason)
    if trainer.is_world_process_zero():
        print_plan(plan, console)
        write_run_info(run_dir, trainer.args, plan)  # hardware, versions, resolved arguments: for the report
    # Pre-flight, before anything slow: the run directory takes writes and has room for the checkpoints.
    for warning in preflight(trainer, plan, run_dir, resume_step=checkpoint_step(checkpoint) if checkpoint else 0):
        if trainer.is_world_process_zero():
            print_note(warning, console, warning=True)

    # 6b. The base model on the held-out prompts, where the trainer placed it, before any step:
    #     eval/before.json, then prompted with training examples, eval/prompted.json (once each:
    #     a resumed run keeps them). The main process evaluates.
    held_out = held_out_set(cfg, tokenizer, data) if processes.is_main_process else None
    if processes.is_main_process:
        with _out_of_memory_as_user_error(during="evaluation", hint=evaluation_out_of_memory_hint(cfg)):
            evaluate_before_training(run_dir, trainer.model, tokenizer, cfg, held_out, console)

    # 7. Train, or resume from the latest complete checkpoint with each step logged once.
    if checkpoint is not None and processes.is_main_process:
        trim_metrics(run_dir / METRICS_FILE, checkpoint_step(checkpoint))
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # the run goes on: an earlier stop no longer holds
    processes.wait_for_everyone()
    with _out_of_memory_as_user_error(trainer.args):
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

    # 9. The tuned model on the same held-out prompts: eval/after.json, eval/samples.jsonl, the verdict
    #    (eval/verdict.json: did it work, better than prompting?) and the table of the three models;
    #    the weights in memory when they are final/, else final/ loaded.
    if processes.is_main_process:
        in_memory = trainer.model if source is None and processes.num_processes == 1 else None
        step = checkpoint_step(source) if source is not None else trainer.state.global_step
        with _out_of_memory_as_user_error(during="evaluation", hint=evaluation_out_of_memory_hint(cfg)):
            evaluate_after_training(run_dir, in_memory, tokenizer, cfg, held_out, step, console)

    # 10. The run documents itself: final/README.md (model card) and report.html, from the run directory.
    if processes.is_main_process:
        write_report(run_dir)
    return TrainResult(run_dir=run_dir, final_dir=final_dir, global_step=trainer.state.global_step,
                       metrics=output.metrics, is_main_process=processes.is_main_process, stopped=stopped)


def has_accelerator() -> bool:
    """A GPU (CUDA/ROCm), Apple MPS or Intel XPU that transformers would train on."""
    import torch

    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def check(cfg: SftlabConfig) -> dict:
    """`sftlab check`: prepare the data as training would and return its audit."""
    return tokenizer_and_data(cfg)[1].audit


def tokenizer_and_data(cfg: SftlabConfig):
    # The tokenizer comes first: data is tokenized with the model's own chat template.
    tokenizer = load_tokenizer(cfg.model)
    add_default_chat_template(tokenizer)
    return tokenizer, prepare_data(cfg.data, tokenizer, **preparation_settings(cfg.training))


def refuse_if_not_trainable(audit: dict) -> None:
    if not audit["ok"]:
        raise DataError(f"the data cannot be trained: {'; '.join(audit['errors'])}", hint="run `sftlab check` for the full audit")


def refuse_evaluation_without_eval_data(cfg: SftlabConfig, has_eval: bool) -> None:
    """Settings that only work with evaluation, when the data left no eval rows (a small
    dataset's eval_split can round to none); plain eval_strategy is simply turned off."""
    if has_eval:
        return
    wanted = settings_needing_eval_data(cfg, cfg.training)
    if wanted:
        raise ConfigError(f"{', '.join(wanted)} needs eval data, but the data has no eval rows",
                          hint="set data.eval, or a data.eval_split that leaves at least one row (see `sftlab check`)")


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
    if not values["packing"] and values.get("per_device_train_batch_size", 8) > 1:
        # Without packing, batches of similar lengths waste little compute on padding.
        values.setdefault("train_sampling_strategy", "group_by_length")
    on_gpu = torch.cuda.is_available()
    values.setdefault("use_cpu", not has_accelerator())
    if "bf16" not in values and "fp16" not in values:
        values["bf16"] = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
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
    except (ValueError, TypeError, OSError, ImportError) as exc:  # OSError: a missing accelerator/deepspeed file
        raise ConfigError(f"training: {str(exc).strip().splitlines()[0]}",
                          hint="these training settings do not work together; see TRL's SFTConfig docs") from None


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
    checkpointing = training.get("activation_checkpointing", training.get("gradient_checkpointing", False))
    if not cfg.batch_is_default or has_accelerator() or checkpointing:
        return cfg
    rows_per_step = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    per_token = activation_bytes_per_token(model, bytes_per_value=2 if cpu_has_native_bf16() else 4)
    budget = max(training_state_bytes(model), ACTIVATION_MEMORY_FLOOR)
    tokens_per_row = training.get("max_length") or 1024
    rows = next(r for r in range(rows_per_step, 0, -1)
                if rows_per_step % r == 0 and (r * tokens_per_row * per_token <= budget or r == 1))
    fitted = {**training, "per_device_train_batch_size": rows, "gradient_accumulation_steps": rows_per_step // rows}
    return cfg.model_copy(update={"training": fitted})


def cpu_has_native_bf16() -> bool:
    """bf16 autocast (TRL's default) pays on CPUs with bf16 matrix instructions (AVX512-BF16, AMX):
    1.5x the tokens/s of fp32 on SmolLM2-135M here. Elsewhere it is emulated and slower than fp32."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


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
    try:
        if has_contents:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / RUN_MARKER).write_text("created by sftlab; `sftlab train --overwrite` may replace this directory\n")
    except OSError as exc:
        raise UserError(f"cannot create the run directory {path}: {exc.strerror or exc}",
                        hint="set training.output_dir to a directory you can write to") from None
    if processes is not None:
        processes.wait_for_everyone()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that was written completely (a run killed mid-save leaves an incomplete one)."""
    return max((p for p in _checkpoint_dirs(run_dir) if checkpoint_is_complete(p)), key=checkpoint_step, default=None)


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    return [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def checkpoint_is_complete(checkpoint: Path) -> bool:
    """Marked complete by CheckpointBookkeeping, or holding a whole trainer_state.json for its step.

    Trainer._save_checkpoint (transformers 5) writes, in order: the weights, the optimizer and
    scheduler, the RNG state, trainer_state.json; then it deletes checkpoints beyond
    save_total_limit, and only then do callbacks' on_save (the marker) run. A kill in that
    last window can leave the only surviving checkpoint unmarked, so a trainer_state.json that
    parses and names this step (it is written last, and a kill mid-write leaves it cut) counts too.
    """
    if (checkpoint / COMPLETE_MARKER).exists():
        return True
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(checkpoint)


def discard_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoint-N directories a kill left half-written: sftlab's own files, never resumable,
    and in the way of the Trainer, which writes checkpoint-N again when it reaches step N."""
    discarded = [p for p in _checkpoint_dirs(run_dir) if not checkpoint_is_complete(p)]
    for checkpoint in discarded:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return discarded


def checkpoint_step(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


class CheckpointBookkeeping(TrainerCallback):
    """After each save: mark the checkpoint complete, and keep the best one by eval loss.

    `on_save` runs once the Trainer has written the whole checkpoint (weights, optimizer,
    RNG state, trainer_state.json: see checkpoint_is_complete), so the marker means it is
    safe to resume from. The best checkpoint becomes the Trainer's
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
        for path in _checkpoint_dirs(run_dir)
        if checkpoint_is_complete(path) and checkpoint_step(path) in eval_loss_at
    ]
    return min(candidates, key=lambda c: c["eval_loss"], default=None)


def _write_json_atomically(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value))


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
        console.print(f"packing {'on' if plan['packing'] else 'off'} (attention {plan.get('attention')}): "
                      f"{plan['packing_reason']}", soft_wrap=True, markup=False)
    console.print(f"plan: {plan['examples']:,} examples{packed}; {plan['steps']:,} steps of ~{plan['tokens_per_step']:,} tokens "
                  f"(~{plan['trained_tokens_per_step']:,} trained) = {plan['epochs']:.2f} epochs; "
                  f"{plan['checkpoints']} checkpoints (keeping {plan['save_total_limit'] or 'all'}), "
                  f"{plan['evaluations']} evaluations", soft_wrap=True)
    if plan["epochs"] > 3:
        console.print(f"[yellow]warning[/]: {plan['epochs']:.1f} epochs: more than the 1-3 the chapter advises; "
                      "watch for overfitting or lower max_steps", soft_wrap=True)


# What out-of-memory looks like: torch's own error on GPUs, a RuntimeError from the CPU allocator,
# Python's MemoryError for host memory, and older/other backends' RuntimeError messages.
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _OUT_OF_MEMORY_MESSAGES)


def out_of_memory_hint(args=None) -> str:
    """The chapter's remedies, with the numbers of this run where they are known."""
    batch = getattr(args, "per_device_train_batch_size", None)
    accumulation = getattr(args, "gradient_accumulation_steps", None) or 1
    max_length = getattr(args, "max_length", None)
    if isinstance(batch, int) and batch > 1:
        smaller = f"per_device_train_batch_size: {batch // 2} with gradient_accumulation_steps: {accumulation * 2} (the same rows per step)"
    else:
        smaller = "a smaller training.per_device_train_batch_size with a larger gradient_accumulation_steps"
    shorter = f"max_length: {max_length // 2}" if isinstance(max_length, int) and max_length > 1 else "a shorter max_length"
    return (f"in the training section, try {smaller}; or {shorter}; or activation_checkpointing: true "
            "(recomputes activations instead of storing them); or add a `lora:` section (trains an adapter, "
            "with far smaller gradients and optimizer state)")


def preflight(trainer, plan: dict, run_dir: Path, resume_step: int = 0) -> list[str]:
    """Before the first step, what would otherwise fail late: raise for a run directory that takes
    no writes or lacks room for the checkpoints; return warnings for cadences that never fire."""
    args = trainer.args
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".sftlab-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to the run directory {run_dir}: {exc.strerror or exc}",
                        hint="set training.output_dir to a directory you can write to") from None

    per_checkpoint, final = checkpoint_size_estimate(trainer.model, save_optimizer=not args.save_only_model)
    new = checkpoints_to_write(args, plan, resume_step)
    if args.save_total_limit:  # the Trainer writes a new checkpoint before it deletes the oldest
        existing = len(_checkpoint_dirs(run_dir))  # a resumed run has some already
        new = max(0, min(existing + new, args.save_total_limit + 1) - existing)
    needed = per_checkpoint * new + final
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {run_dir}: the run needs about {_gigabytes(needed)} ({new} more checkpoints "
            f"of ~{_gigabytes(per_checkpoint)} each, and final/), {_gigabytes(free)} is free",
            hint="lower training.save_total_limit, set training.output_dir on a larger disk, or add a `lora:` "
            "section (checkpoints then hold only the adapter and its optimizer state)")
    return cadence_warnings(args, plan["steps"])


def checkpoint_size_estimate(model, save_optimizer: bool = True) -> tuple[int, int]:
    """(bytes per checkpoint, bytes of final/), from the model as it will train.

    A checkpoint holds the saved weights (every weight, or only a LoRA adapter) and, unless
    save_only_model, the optimizer state: AdamW keeps two moments per trained weight, so a
    full fine-tune in fp32 takes ~12 bytes per parameter.
    """
    parameters = list(model.parameters())  # tied weights appear once
    trained = sum(p.numel() * p.element_size() for p in parameters if p.requires_grad)
    is_adapter = hasattr(model, "peft_config")
    weights = trained if is_adapter else sum(p.numel() * p.element_size() for p in parameters)
    return weights + (2 * trained if save_optimizer else 0), weights


def checkpoints_to_write(args, plan: dict, resume_step: int = 0) -> int:
    steps = plan["steps"]
    if args.save_strategy == "steps" and args.save_steps:
        every = args.save_steps if args.save_steps >= 1 else max(1, math.ceil(args.save_steps * steps))
        return max(0, math.ceil(steps / every) - resume_step // every)  # the last step always saves
    if args.save_strategy == "epoch":
        return max(1, math.ceil(plan["epochs"]))
    if args.save_strategy == "best":
        return plan["evaluations"] or 1
    return 0


def cadence_warnings(args, steps: int) -> list[str]:
    """Save, eval and logging intervals that never fire before the end of the run."""
    warnings = []
    def interval(value):
        return value if value >= 1 else math.ceil(value * steps)
    if args.save_strategy == "no":
        warnings.append("training.save_strategy is no: nothing to resume from if the run is killed")
    elif args.save_strategy == "steps" and interval(args.save_steps) >= steps > 1:
        warnings.append(f"training.save_steps {args.save_steps:g} is not below the run's {steps} steps: the only "
                        f"checkpoint is written at the end, so a killed run restarts from scratch")
    if args.eval_strategy == "steps" and interval(args.eval_steps or args.logging_steps) >= steps > 1:
        warnings.append(f"training.eval_steps {args.eval_steps or args.logging_steps:g} is not below the run's {steps} "
                        f"steps: a single evaluation, at the end; overfitting cannot be seen during training")
    if args.logging_strategy == "steps" and interval(args.logging_steps) > steps:
        warnings.append(f"training.logging_steps {args.logging_steps:g} is more than the run's {steps} steps: "
                        "no training loss is logged, so the curves and the diagnosis stay empty")
    return warnings


def print_note(text: str, console=None, warning: bool = False) -> None:
    from rich.console import Console

    from sftlab.terminal import literal

    console = console or Console(stderr=True, highlight=False)
    console.print(literal(*([("warning", "yellow"), ": "] if warning else []), text), soft_wrap=True)


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def evaluation_out_of_memory_hint(cfg: SftlabConfig) -> str:
    return (f"lower eval.generation_batch_size (now {cfg.eval.generation_batch_size}), eval.num_prompts "
            f"(now {cfg.eval.num_prompts}) or eval.max_new_tokens (now {cfg.eval.max_new_tokens}); "
            "eval.baseline: false skips the base model")


class _out_of_memory_as_user_error:
    """Out of memory (GPU or host) becomes a UserError with concrete next steps: during training,
    the training remedies (out_of_memory_hint); elsewhere, the hint given."""

    def __init__(self, args=None, during: str = "training", hint: str | None = None):
        self.args, self.during, self.hint = args, during, hint

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if is_out_of_memory(exc):
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no details"
            raise UserError(f"out of memory during {self.during} ({type(exc).__name__}: {detail})",
                            hint=self.hint or out_of_memory_hint(self.args)) from exc
        return False
