"""Train: one supervised fine-tune with TRL's SFTTrainer, read top to bottom.

    config -> run directory -> tokenizer -> data -> model -> SFTConfig -> SFTTrainer
           -> evaluate the base model, plain and prompted -> train (or resume) -> final/
           (model or LoRA adapter + tokenizer) -> evaluate the tuned model -> verdict -> report

TRL does the training and the distribution across processes; this file only decides
what goes in and where it is written. The data arrives already tokenized with its
trained-token masks (see data.py), so SFTTrainer trains exactly what `sftlab check`
audited.

Every effective setting (defaults, the CPU batch split, packing, precision, activation
checkpointing) is decided in resolve.py, which builds the SFTConfig; every file of the run
directory is named and written by rundir.py.

Trade-offs:
- A run directory that exists is never reused without `--resume` or replaced without
  `--overwrite`, and `--overwrite` only ever deletes a directory sftlab made.
- Before the first step, what would fail late is checked (preflight): a writable run
  directory with room for the checkpoints, and cadences that fire.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from sftlab.config import SftlabConfig
from sftlab.data import preparation_settings, prepare_data
from sftlab.errors import ConfigError, DataError, UserError
from sftlab.evaluate import evaluate_after_training, evaluate_before_training, held_out_set
from sftlab.metrics import load_user_metrics
from sftlab.model import load_model, load_tokenizer, peft_config
from sftlab.monitor import (
    LiveDiagnosis,
    LiveReport,
    MetricsLogger,
    NonFiniteGuard,
    OutputSampler,
    ProgressBar,
)
from sftlab.report import write_report
from sftlab.resolve import (
    has_accelerator,
    print_plan,
    resolve_training,
    settings_needing_eval_data,
    training_plan,
    write_run_info,
)
from sftlab.rundir import (
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    STOPPED_FILE,
    checkpoint_dirs,
    checkpoint_for_final,
    checkpoint_step,
    copy_model_files,
    discard_incomplete_checkpoints,
    latest_checkpoint,
    mark_checkpoint_complete,
    prepare_run_dir,
    read_stop,
    record_best_checkpoint,
    trim_metrics,
    write_atomically,
    write_audit,
)
from sftlab.speed import accelerator_type, check_speed_options, refuse_contaminating_packing, use_attention
from sftlab.templates import add_default_chat_template


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
        print_note(
            f"resuming from {checkpoint.name}"
            + (f"; discarded the incomplete {', '.join(p.name for p in discarded)}" if discarded else ""),
            console,
        )

    # 2-3. Tokenizer, then data tokenized with it: exactly what `sftlab check` audits. The
    #      main process prepares (and caches) first; the others then load its cache.
    with processes.main_process_first():
        tokenizer, data = tokenizer_and_data(cfg)
    refuse_if_not_trainable(data.audit)
    refuse_evaluation_without_eval_data(cfg, has_eval=data.eval is not None)

    # 4. Model, grown to the tokenizer if a default chat template added tokens.
    with _out_of_memory_as_user_error(during="model loading", hint="a smaller model, or model.dtype: bfloat16"):
        model = load_model(cfg.model, tokenizer)

    # 5. Every effective setting, decided once (resolve.py): the default batch fed in micro-batches
    #    that fit in memory on a CPU, packing through the attention path that skips the work between
    #    examples on this hardware (refused in step 6 unless the model keeps packed examples apart),
    #    precision, activation checkpointing; then TRL's SFTConfig, validated by TRL itself.
    resolved = resolve_training(cfg, model, has_eval=data.eval is not None)
    cfg, packing, args = resolved.cfg, resolved.packing, resolved.args
    use_attention(model, packing)
    if processes.is_main_process:
        write_atomically(run_dir / CONFIG_FILE, cfg.to_yaml())  # the config as resolved
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
        write_run_info(run_dir, trainer.args, plan)  # hardware, versions, the SFTConfig as TRL got it, the plan
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
    return TrainResult(
        run_dir=run_dir,
        final_dir=final_dir,
        global_step=trainer.state.global_step,
        metrics=output.metrics,
        is_main_process=processes.is_main_process,
        stopped=stopped,
    )


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
        raise DataError(
            f"the data cannot be trained: {'; '.join(audit['errors'])}", hint="run `sftlab check` for the full audit"
        )


def refuse_evaluation_without_eval_data(cfg: SftlabConfig, has_eval: bool) -> None:
    """Settings that only work with evaluation, when the data left no eval rows (a small
    dataset's eval_split can round to none); plain eval_strategy is simply turned off."""
    if has_eval:
        return
    wanted = settings_needing_eval_data(cfg, cfg.training)
    if wanted:
        raise ConfigError(
            f"{', '.join(wanted)} needs eval data, but the data has no eval rows",
            hint="set data.eval, or a data.eval_split that leaves at least one row (see `sftlab check`)",
        )


class CheckpointBookkeeping(TrainerCallback):
    """After each save: mark the checkpoint complete, and keep the best one by eval loss.

    `on_save` runs once the Trainer has written the whole checkpoint (weights, optimizer,
    RNG state, trainer_state.json: see rundir.checkpoint_is_complete), so the marker means it
    is safe to resume from. The best checkpoint becomes the Trainer's
    `best_model_checkpoint`, which its rotation (save_total_limit) never deletes.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        mark_checkpoint_complete(self.run_dir, state.global_step)
        best = record_best_checkpoint(self.run_dir, state.log_history)
        if best is not None:
            state.best_model_checkpoint = str(best)


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
        smaller = (
            f"per_device_train_batch_size: {batch // 2} with gradient_accumulation_steps: {accumulation * 2} "
            "(the same rows per step)"
        )
    else:
        smaller = "a smaller training.per_device_train_batch_size with a larger gradient_accumulation_steps"
    shorter = (
        f"max_length: {max_length // 2}" if isinstance(max_length, int) and max_length > 1 else "a shorter max_length"
    )
    return (
        f"in the training section, try {smaller}; or {shorter}; or activation_checkpointing: true "
        "(recomputes activations instead of storing them); or add a `lora:` section (trains an adapter, "
        "with far smaller gradients and optimizer state)"
    )


def preflight(trainer, plan: dict, run_dir: Path, resume_step: int = 0) -> list[str]:
    """Before the first step, what would otherwise fail late: raise for a run directory that takes
    no writes or lacks room for the checkpoints; return warnings for cadences that never fire."""
    args = trainer.args
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".sftlab-write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write to the run directory {run_dir}: {exc.strerror or exc}",
            hint="set training.output_dir to a directory you can write to",
        ) from None

    per_checkpoint, final = checkpoint_size_estimate(trainer.model, save_optimizer=not args.save_only_model)
    new = checkpoints_to_write(args, plan, resume_step)
    if args.save_total_limit:  # the Trainer writes a new checkpoint before it deletes the oldest
        existing = len(checkpoint_dirs(run_dir))  # a resumed run has some already
        new = max(0, min(existing + new, args.save_total_limit + 1) - existing)
    needed = per_checkpoint * new + final
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {run_dir}: the run needs about {_gigabytes(needed)} ({new} more checkpoints "
            f"of ~{_gigabytes(per_checkpoint)} each, and final/), {_gigabytes(free)} is free",
            hint="lower training.save_total_limit, set training.output_dir on a larger disk, or add a `lora:` "
            "section (checkpoints then hold only the adapter and its optimizer state)",
        )
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
        warnings.append(
            f"training.save_steps {args.save_steps:g} is not below the run's {steps} steps: the only "
            f"checkpoint is written at the end, so a killed run restarts from scratch"
        )
    if args.eval_strategy == "steps" and interval(args.eval_steps or args.logging_steps) >= steps > 1:
        warnings.append(
            f"training.eval_steps {args.eval_steps or args.logging_steps:g} is not below the run's {steps} "
            f"steps: a single evaluation, at the end; overfitting cannot be seen during training"
        )
    if args.logging_strategy == "steps" and interval(args.logging_steps) > steps:
        warnings.append(
            f"training.logging_steps {args.logging_steps:g} is more than the run's {steps} steps: "
            "no training loss is logged, so the curves and the diagnosis stay empty"
        )
    return warnings


def print_note(text: str, console=None, warning: bool = False) -> None:
    from rich.console import Console

    from sftlab.terminal import literal

    console = console or Console(stderr=True, highlight=False)
    console.print(literal(*([("warning", "yellow"), ": "] if warning else []), text), soft_wrap=True)


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def evaluation_out_of_memory_hint(cfg: SftlabConfig) -> str:
    return (
        f"lower eval.generation_batch_size (now {cfg.eval.generation_batch_size}), eval.num_prompts "
        f"(now {cfg.eval.num_prompts}) or eval.max_new_tokens (now {cfg.eval.max_new_tokens}); "
        "eval.baseline: false skips the base model"
    )


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
            raise UserError(
                f"out of memory during {self.during} ({type(exc).__name__}: {detail})",
                hint=self.hint or out_of_memory_hint(self.args),
            ) from exc
        return False
