"""Speed: how a run uses its hardware, decided after the model loads and before the trainer is built.

Packing puts several examples in one row (TRL's best-fit-decreasing packing, padding-free: the
rows of a batch are concatenated into one sequence whose position ids restart at each example).
What it costs depends on the attention path, which transformers 5 picks from
`model.attn_implementation`:

- flash-attention kernels (`flash_attention_2`/`_3`, or hub kernels such as
  `kernels-community/flash-attn2`) take the example boundaries (`cu_seq_lens`) natively: a packed
  row costs what its examples cost;
- `flex_attention` gets a block mask that transformers builds from the restarting position ids
  (`masking_utils.find_packed_sequence_indices`), and skips the blocks between examples;
- `sdpa` and `eager` get the same mask as a dense tensor over the whole concatenated batch, and
  attend over all of it (mem-efficient sdpa kernels on GPUs, no flash kernel, for such a mask).

`packing: auto` packs through the first two, on CUDA/ROCm GPUs: flash-attention where flash-attn is
installed, else flex_attention (PyTorch's own, so every GPU install has it), switching the model's
attention when the config leaves `model.attn_implementation` unset. On a CPU it never packs: a
packed row under sdpa's dense mask was measured at about half the tokens/s of length-grouped
batches (bench/results/train_throughput_*.txt), and flex_attention compiles its CPU kernels for
over a minute before the first step. The choice and its reason go into the plan printed before
training and into run_info.json.

The decision is taken with the run's other settings in resolve.py (resolve_training).

Whatever path packs, `refuse_contaminating_packing` first runs two examples packed and one by one
through the actual model and attention (model.packing_contamination): a model whose logits differ
(OPT, BLOOM, ... which do not restart positions) is refused instead of trained on mixed examples.

The speed options TRL and transformers already have are passed through unchanged and checked here
before any data is prepared, so a run does not fail only once TRL builds its trainer:
`use_liger_kernel` (Liger's Triton kernels: CUDA/ROCm only, an optional install), its
`liger_kernel_config`, and `torch_compile` (warned about on CPUs). `loss_type` is checked against
TRL's own choices with the rest of the config (config.py).

Trade-offs:
- Which GPU path is fastest is reasoned from how each kernel treats a packed row, not yet measured:
  bench/gpu.py measures sftlab's choice against the chapter's TRL setup on an H100/H200-class GPU.
- flex_attention compiles its kernels on the first steps (PyTorch's torch.compile), a fixed cost of
  tens of seconds that long runs amortize and very short ones pay.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from sftlab.config import TRAINING_DEFAULTS, SftlabConfig
from sftlab.errors import ConfigError

LIGER_PIP = "pip install -c constraints.txt -e '.[liger]' (or pip install liger-kernel==0.8.5)"


@dataclass(frozen=True)
class PackingChoice:
    """Whether the run packs, through which attention implementation, and why."""

    packing: bool
    attn_implementation: str | None  # what the model trains with; None: transformers' default for the model
    reason: str


def has_varlen_kernels(attn_implementation: str | None) -> bool:
    """flash-attention in any form (transformers' names, hub kernels) takes packed rows natively."""
    return "flash" in (attn_implementation or "").lower()


def choose_packing(
    packing, attn_implementation: str | None, accelerator: str | None, flash: str | None = None, flex: bool = True
) -> PackingChoice:
    """The packing decision from the config and the hardware (pure: tested on every combination).

    packing: True, False or "auto"; attn_implementation: the config's (None when unset);
    accelerator: "cuda" (also ROCm), "mps", "xpu" or None (CPU); flash: the flash-attention
    implementation that is installed and that the model supports, or None; flex: whether the model
    supports flex_attention.
    """
    named = attn_implementation or ""
    if packing is False:
        return PackingChoice(False, attn_implementation, "training.packing: false")
    if has_varlen_kernels(named):
        return PackingChoice(
            True, attn_implementation, f"{named} has variable-length kernels: a packed row costs what its examples cost"
        )
    if named == "flex_attention" and (accelerator == "cuda" or packing is True):
        return PackingChoice(
            True,
            named,
            "flex_attention skips the attention between packed examples "
            "(a block mask built from the restarting position ids)",
        )
    if attn_implementation is None and accelerator == "cuda":
        if flash:
            return PackingChoice(True, flash, f"{flash} (flash-attn is installed) takes packed rows natively")
        if flex:
            return PackingChoice(
                True,
                "flex_attention",
                "flash-attn is not installed: packed rows go through "
                "flex_attention, whose block mask skips the attention between examples",
            )
    if packing is True:
        return PackingChoice(
            True,
            attn_implementation,
            f"training.packing: true; {named or 'the default attention (sdpa)'} attends over the "
            "whole packed row under a dense block-diagonal mask",
        )
    if accelerator is None:
        reason = (
            "on a CPU a packed row is one long sequence under a dense mask, measured at about half the tokens/s "
            "of length-grouped batches (bench/results/train_throughput_*.txt): length-grouped batches"
        )
    elif named:
        reason = (
            f"model.attn_implementation: {named} attends over the whole packed row under a dense mask: "
            "length-grouped batches (leave it unset to pack through flash-attn or flex_attention)"
        )
    else:
        reason = (
            f"no attention path that skips the work between packed examples on {accelerator}: length-grouped batches"
        )
    return PackingChoice(False, attn_implementation, reason)


def accelerator_type() -> str | None:
    """What transformers trains on here: "cuda" (NVIDIA or ROCm), "mps", "xpu", or None for a CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return None


def installed_flash_attention(model=None) -> str | None:
    """flash_attention_3 or _2 where flash-attn is installed for this GPU and the model supports it."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if model is not None and not getattr(model, "_supports_flash_attn", False):
        return None
    if is_flash_attn_3_available():
        return "flash_attention_3"
    return "flash_attention_2" if is_flash_attn_2_available() else None


def flex_attention_supported(model=None) -> bool:
    from transformers.utils import is_torch_flex_attn_available

    return is_torch_flex_attn_available() and (model is None or getattr(model, "_supports_flex_attn", False))


def packing_for(cfg: SftlabConfig, model=None) -> PackingChoice:
    """The decision for this machine, and for the loaded model when given (which kernels it supports)."""
    accelerator = accelerator_type()
    packing = cfg.training.get("packing", TRAINING_DEFAULTS["packing"])
    return choose_packing(
        packing,
        cfg.model.attn_implementation,
        accelerator,
        flash=installed_flash_attention(model) if accelerator == "cuda" else None,
        flex=flex_attention_supported(model),
    )


def use_attention(model, choice: PackingChoice) -> None:
    """Switch the loaded model to the attention implementation the choice packs through."""
    wanted = choice.attn_implementation
    if wanted is None or wanted == model.config._attn_implementation:
        return
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, ImportError) as exc:
        raise ConfigError(
            f"training.packing: cannot switch the model to {wanted}: {str(exc).splitlines()[0]}",
            hint="set model.attn_implementation (sdpa, eager, flash_attention_2, ...) or training.packing: false",
        ) from None


def refuse_contaminating_packing(model, cfg: SftlabConfig) -> None:
    from sftlab.model import packing_contamination, packing_tolerance

    leak = packing_contamination(model)
    if leak > packing_tolerance(model):
        attention = model.config._attn_implementation
        raise ConfigError(
            f"training.packing: {cfg.model.name_or_path} with attention {attention!r} lets packed examples attend to "
            f"each other (logits differ by {leak:.1%} of the largest logit between packed and separate examples)",
            hint="set training.packing: false, or model.attn_implementation to one that honours position ids "
            "(sdpa, eager, flex_attention or flash_attention_2 on models transformers supports natively)",
        )


def check_speed_options(cfg: SftlabConfig, accelerator: str | None) -> list[str]:
    """Refuse speed options that cannot work on this machine; return warnings for those that may not pay.

    Run before the data is prepared: TRL and transformers would refuse these only when the trainer
    is built or training starts.
    """
    training = cfg.training
    warnings = []
    if training.get("use_liger_kernel"):
        if accelerator != "cuda":
            raise ConfigError(
                f"training.use_liger_kernel: Liger's Triton kernels run on CUDA or ROCm GPUs, and this "
                f"machine has {accelerator or 'none (CPU only)'}",
                hint="remove training.use_liger_kernel for this machine",
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("training.use_liger_kernel: the liger-kernel package is not installed", hint=LIGER_PIP)
    liger_config = training.get("liger_kernel_config") or {}
    if liger_config.get("fused_linear_cross_entropy"):
        raise ConfigError(
            "training.liger_kernel_config.fused_linear_cross_entropy: TRL's SFTTrainer refuses it (it "
            "replaces the model's forward); TRL's own fused LM head already computes the loss without "
            "the full logits",
            hint="remove fused_linear_cross_entropy from training.liger_kernel_config",
        )
    compiles = any(training.get(key) for key in ("torch_compile", "torch_compile_backend", "torch_compile_mode"))
    if compiles and accelerator is None:
        warnings.append(
            "training.torch_compile on a CPU: compilation runs before the first step and again for new "
            "batch shapes (every length-grouped or packed batch has its own length), and sftlab has not "
            "measured it paying off on a CPU"
        )
    return warnings
