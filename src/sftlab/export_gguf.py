"""GGUF: a transformers causal LM written as one .gguf file, the format llama.cpp, Ollama and LM Studio run.

`write_gguf(model, tokenizer, tokenizer_dir, path, quant)` writes, with the `gguf` package
(llama.cpp's own Python library), what llama.cpp's convert_hf_to_gguf.py writes for the same model:

- the hyperparameters under llama.cpp's keys (`llama.block_count`, `qwen2.rope.freq_base`, ...);
- the weights under llama.cpp's tensor names (gguf's own name map), in its layout: for the
  `llama` architecture the q and k projections are permuted to the interleaved rotary layout
  llama.cpp computes in (transformers' GGUF loader undoes exactly this permutation on reading);
  Qwen2's are not (llama.cpp runs it with NeoX-style rotary, as transformers does);
- tied embeddings (SmolLM2) as `token_embd` alone, which llama.cpp reuses for the output;
- the tokenizer: every token with its type (normal, control, user-defined, unused padding), the
  merges, the pre-tokenizer name, the special token ids, whether BOS is added, the chat template,
  and the end-of-turn token next to EOS, so generation stops where the fine-tune learned to stop.

Trade-offs:
- Two architectures, llama and qwen2: both what the chapter and the demo use and what transformers'
  GGUF loader reads back, so every export can be checked by loading it again (tests/test_export.py).
  Anything else is refused with the list, not written half-right.
- Byte-level BPE tokenizers only (SmolLM2, Llama 3, Qwen2, DeepSeek-R1-Distill); the pre-tokenizer
  name is read off tokenizer.json's structure (llama.cpp hashes a test string instead), and an
  unknown one is refused: a wrong name tokenizes differently without any error.
- `f16` keeps 1-D tensors (norms, biases) in f32, as llama.cpp does; `q8_0` quantizes each 2-D
  weight with gguf.quants (one scale per 32 weights), keeping f16 where a row is not a multiple of 32.
- The header goes out first and the tensors one by one, so memory stays at the model plus one tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sftlab.errors import ModelError

QUANTS = ("f16", "q8_0")


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # llama.cpp's architecture name: the prefix of its hyperparameter keys
    permute_qk: bool  # interleaved rotary layout (llama) rather than NeoX halves (qwen2)
    examples: str


ARCHITECTURES = {  # transformers model_type -> how llama.cpp knows it
    "llama": Architecture("llama", permute_qk=True, examples="SmolLM2, Llama 3, TinyLlama"),
    "qwen2": Architecture("qwen2", permute_qk=False, examples="Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen"),
}
SUPPORTED = ", ".join(f"{name} ({arch.examples})" for name, arch in ARCHITECTURES.items())

# Byte-level pre-tokenizers by the regex they split with, under the names llama.cpp gives them.
GPT2_PRE = "gpt-2"  # ByteLevel's own GPT-2 regex (SmolLM2 as transformers loads it, the test tokenizer)
DIGITS_PRE = "smollm"  # individual digits, then the GPT-2 regex (SmolLM2's original tokenizer.json)


def gguf_architecture(config) -> Architecture:
    """The llama.cpp architecture of a transformers config; ModelError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"cannot export a {model_type!r} model to GGUF: sftlab exports {SUPPORTED}",
            hint="export --format merged instead, and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    unsupported = _unsupported_settings(config)
    if unsupported:
        raise ModelError(
            f"cannot export this {model_type} model to GGUF: {unsupported} is not written by sftlab's exporter",
            hint="export --format merged instead, and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    return ARCHITECTURES[model_type]


def _unsupported_settings(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        return f"rope scaling {rope.get('rope_type', rope.get('type'))!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    biases = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if config.model_type == "llama" and biases:
        return "a llama with attention or MLP biases"
    if config.model_type == "qwen2" and _head_dim(config) != config.hidden_size // config.num_attention_heads:
        return "a head_dim other than hidden_size / num_attention_heads"
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a Llama or Qwen2 causal LM, merged if it was LoRA) and its tokenizer to `path`.

    `tokenizer_dir` holds the tokenizer.json the merges are read from (the run's final/). The file is
    written under a temporary name and renamed when complete.
    """
    import gguf

    if quant not in QUANTS:
        raise ModelError(f"unknown GGUF quantization {quant!r}", hint=f"use one of: {', '.join(QUANTS)}")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    arch = gguf_architecture(config)
    tokenizer_json = _byte_level_tokenizer_json(Path(tokenizer_dir))
    tensors = list(_gguf_tensors(model, config, arch))
    file_type = gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0

    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch.gguf_name)
    try:
        _add_model_metadata(writer, config, arch, name or path.stem, file_type)
        _add_tokenizer_metadata(
            writer,
            tokenizer,
            tokenizer_json,
            Path(tokenizer_dir),
            vocab_size=model.get_input_embeddings().num_embeddings,
        )
        types = [_storage_type(tuple(tensor.shape), quant) for _, tensor, _ in tensors]
        for (gguf_name, tensor, _), qtype in zip(tensors, types):
            _add_tensor_info(writer, gguf_name, tuple(tensor.shape), qtype)
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, tensor, heads), qtype in zip(tensors, types):
            writer.write_tensor_data(gguf.quants.quantize(_in_gguf_layout(tensor, heads), qtype))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


# =========================================================================== tensors


def _gguf_tensors(model, config, arch: Architecture) -> list[tuple[str, object, tuple | None]]:
    """(llama.cpp tensor name, the model's tensor, (heads, kv heads) when its rows are to be permuted), in the
    model's order. Nothing is copied yet: each tensor is converted only when it is written."""
    import gguf

    names = gguf.get_tensor_name_map(_gguf_arch_enum(arch), config.num_hidden_layers)
    tied = _ties_embeddings(model, config)
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(
                f"cannot export tensor {hf_name!r}: llama.cpp's {arch.gguf_name} has no place for it",
                hint="export --format merged instead",
            )
        heads = None
        if arch.permute_qk and ".attn_q." in gguf_name:
            heads = (config.num_attention_heads, config.num_attention_heads)
        elif arch.permute_qk and ".attn_k." in gguf_name:
            heads = (config.num_attention_heads, config.num_key_value_heads)
        tensors.append((gguf_name, tensor, heads))
    return tensors


def _in_gguf_layout(tensor, heads: tuple | None):
    """A float32 numpy copy of one tensor, q/k rows permuted for llama.cpp's rotary layout when asked."""
    data = tensor.detach().float().cpu().numpy()
    return data if heads is None else _permute_for_rotary(data, *heads)


def _gguf_arch_enum(arch: Architecture):
    import gguf

    return next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch.gguf_name)


def _ties_embeddings(model, config) -> bool:
    output = model.get_output_embeddings()
    shared = output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return bool(getattr(config, "tie_word_embeddings", False)) or shared


def _permute_for_rotary(weights, n_head: int, n_head_kv: int):
    """llama.cpp's permutation of q/k rows (convert_hf_to_gguf.py, LlamaModel.permute): from the halves
    layout transformers rotates to pairs of adjacent rows. transformers' LlamaTensorProcessor undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _storage_type(shape: tuple, quant: str):
    """F32 for 1-D tensors (norms and biases: tiny, and precision-sensitive), else the asked type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if quant == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _add_tensor_info(writer, gguf_name: str, shape: tuple, qtype) -> None:
    """Declare a tensor before its data exists: the header is written before any tensor is converted."""
    import math

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

    block, size = GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(shape) // block * size
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes)
    else:  # quantized data is bytes; gguf recovers the element shape from the byte shape
        writer.add_tensor_info(
            gguf_name, quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8), nbytes, raw_dtype=qtype
        )


# =========================================================================== metadata


def _add_model_metadata(writer, config, arch: Architecture, name: str, file_type) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    if arch.gguf_name == "llama":
        head_dim = _head_dim(config)
        writer.add_rope_dimension_count(head_dim)  # transformers reads it back as head_dim
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _byte_level_tokenizer_json(tokenizer_dir: Path) -> dict:
    path = tokenizer_dir / "tokenizer.json"
    try:
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(
            f"cannot export to GGUF: {path} is missing or unreadable",
            hint="GGUF export needs the fast tokenizer (tokenizer.json) saved with the model",
        ) from None
    model, decoder = tokenizer_json.get("model") or {}, tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ModelError(
            f"cannot export this tokenizer to GGUF ({model.get('type')} with a {decoder.get('type')} "
            "decoder): sftlab writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2)",
            hint="export --format merged instead, and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    return tokenizer_json


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level tokenizer's pre-tokenizer."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PRE
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        return DIGITS_PRE
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        # The names transformers reads back with the same split; the first listed is llama.cpp's canonical one.
        for name in ("llama-bpe", "qwen2"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise ModelError(
        f"cannot export this tokenizer to GGUF: its pre-tokenizer ({json.dumps(pre)[:200]}) is not one "
        "sftlab knows llama.cpp's name for (gpt-2, smollm, llama-bpe, qwen2)",
        hint="export --format merged instead, and convert it with llama.cpp's convert_hf_to_gguf.py",
    )


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id up to the model's embedding size, with llama.cpp's token type (as convert_hf_to_gguf.py):
    added special tokens are CONTROL, other added tokens USER_DEFINED, ids without a token UNUSED padding."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_tokenizer_metadata(writer, tokenizer, tokenizer_json: dict, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf

    from sftlab.data import end_of_turn_token_id

    if len(tokenizer) > vocab_size:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings",
            hint="the tokenizer saved in final/ does not belong to this model",
        )
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf's own reader of tokenizer.json merges (it re-encodes spaces inside merges as llama.cpp expects)
    writer.add_token_merges(gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    end_of_turn = end_of_turn_token_id(tokenizer)
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)  # llama.cpp stops at EOS and EOT alike
    # Whether BOS/EOS are added, as the tokenizer itself behaves (its post-processor decides).
    plain, special = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    added = len(special) > len(plain)
    writer.add_add_bos_token(added and tokenizer.bos_token_id is not None and special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(added and tokenizer.eos_token_id is not None and special[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
