"""A finished run's tuned model: its resolved config, final/, and the tokenizer it trained with.

What `sftlab eval RUN_DIR`, `sftlab chat` and `sftlab export` open: final/ holds a full
model or a LoRA adapter, and the tokenizer (chat template included) saved with it.

Trade-off: an adapter is loaded on the base model the run's config names, so the base must
still be where the config says; a missing one is a ModelError naming model.name_or_path.
"""

from __future__ import annotations

from pathlib import Path

from sftlab.config import ModelConfig, load_config
from sftlab.errors import ModelError, UserError
from sftlab.model import load_model, load_tokenizer
from sftlab.rundir import CONFIG_FILE, FINAL_DIR, has_model, is_adapter
from sftlab.templates import add_default_chat_template

__all__ = ["has_model", "load_final_model", "open_finished_run"]


def open_finished_run(run_dir: Path, overrides: list[str] = ()):
    """A finished run's resolved config, its final/ directory, and the tokenizer it trained with
    (chat template included, saved with the final model). UserError when the run has no final/."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}", hint="pass the training.output_dir of a run")
    if not (run_dir / CONFIG_FILE).exists():
        raise UserError(
            f"{run_dir} is not an sftlab run directory: it has no {CONFIG_FILE}",
            hint="pass a directory written by `sftlab train` or `sftlab demo`",
        )
    final_dir = run_dir / FINAL_DIR
    if not has_model(final_dir):
        raise UserError(
            f"no final model in {final_dir}: the run has not finished",
            hint="continue it with `sftlab train CONFIG --resume`, or evaluate a checkpoint with "
            f"`sftlab eval --model {run_dir}/checkpoint-N --config {run_dir / CONFIG_FILE}`",
        )
    cfg = load_config(run_dir / CONFIG_FILE, list(overrides))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(final_dir), trust_remote_code=cfg.model.trust_remote_code))
    add_default_chat_template(tokenizer)
    return cfg, final_dir, tokenizer


def load_final_model(directory: Path, base: ModelConfig, tokenizer):
    """A saved model, or a LoRA adapter loaded on its base model (the config's)."""
    directory = Path(directory)
    if is_adapter(directory):
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(load_model(base, tokenizer), str(directory))
        except (OSError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(
                f"cannot load the LoRA adapter in {directory} on {base.name_or_path}: {reason}",
                hint="the adapter loads on the model it was trained from: check model.name_or_path",
            ) from None
    saved = base.model_copy(update={"name_or_path": str(directory), "gguf_file": None, "revision": None})
    return load_model(saved, tokenizer)
