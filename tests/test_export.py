"""Export: every exported file is loaded back and compared with the model it came from.

GGUF files are read back by transformers' own GGUF loader (`gguf_file=`), which undoes llama.cpp's
layout independently of sftlab's writer: if a permutation, a tied embedding, a bias or a token
were written wrong, the logits or the token ids would differ.
"""

import json

import pytest

from conftest import build_tiny_model, chat_rows, sftlab_in_process, tiny_config_file, write_jsonl
from sftlab.config import load_config
from sftlab.errors import UserError
from sftlab.export import export_run
from sftlab.export_gguf import write_gguf
from sftlab.templates import OLLAMA_CHATML, ollama_template
from sftlab.train import train

# f16 keeps ~3 decimal digits per weight: on the tiny model (logits of magnitude ~1-10) the largest logit
# difference measured was ~1e-3; a layout mistake (an unpermuted q/k, a wrong bias) moves logits by ~0.1-1.
F16_MAX_LOGIT_DIFF = 1e-2
# q8_0 keeps one scale per 32 weights: the greedy next token may flip where two logits nearly tie.
Q8_0_MIN_GREEDY_AGREEMENT = 0.9
# bf16 keeps ~2-3 decimal digits per weight; the measured difference on the tiny model is given where it is used.
BF16_MAX_LOGIT_DIFF = 0.1
MERGED_MAX_LOGIT_DIFF = 1e-4  # merging a LoRA adapter in fp32 changes only rounding
TEXTS = [
    "What is 12 plus 3?",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    " naïve café, 東京  tabs\tand\n\nnewlines 2024",
    "The quick brown fox jumps over the lazy dog.",
]


def _train(root, model, name, **sections):
    config = tiny_config_file(
        root / f"{name}.yaml",
        model,
        write_jsonl(root / "train.jsonl", chat_rows(24)),
        data={"eval_split": 0},
        training={"output_dir": root / name, "max_steps": 4, "learning_rate": 1.0e-2, "save_steps": 4},
        **sections,
    )
    return train(load_config(config)).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("export")
    full = _train(root, tiny_model, "full")
    adapters = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    lora = _train(root, tiny_model, "lora", lora=adapters)
    return {"full": full, "lora": lora}


def _final(run_dir):
    from transformers import AutoTokenizer

    from sftlab.evaluate import load_final_model

    cfg = load_config(run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    return load_final_model(run_dir / "final", cfg.model, tokenizer).eval(), tokenizer


def _logits(model, tokenizer, texts=TEXTS):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in texts]


def _read_back(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    return model, AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _max_diff(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def test_gguf_f16_reads_back_in_transformers_with_the_logits_and_tokenizer_of_final(runs):
    from gguf import GGUFReader, TokenType

    run = runs["full"]
    result = export_run(run, format="gguf")
    assert result.output == run / "export" / "gguf-f16" / "full-f16.gguf"
    assert result.modelfile == result.output.with_name("Modelfile")
    model, tokenizer = _final(run)
    back, back_tokenizer = _read_back(result.output)
    assert _max_diff(_logits(model, tokenizer), _logits(back, tokenizer)) < F16_MAX_LOGIT_DIFF
    for text in TEXTS:  # the tokenizer rebuilt from the GGUF metadata splits text exactly as training did
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back_tokenizer.chat_template == tokenizer.chat_template and back_tokenizer.eos_token == "<|im_end|>"

    reader = GGUFReader(result.output)
    names = {tensor.name for tensor in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses token_embd
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == TokenType.CONTROL
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    modelfile = result.modelfile.read_text()
    assert "FROM ./full-f16.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f'TEMPLATE """{OLLAMA_CHATML}"""' in modelfile and "PARAMETER temperature 0" in modelfile


def test_q8_0_is_quantized_by_gguf_and_keeps_the_greedy_tokens(runs, tmp_path):
    import torch
    from gguf import GGMLQuantizationType, GGUFReader

    run = runs["full"]
    result = export_run(run, format="gguf", quant="q8_0", output=tmp_path)
    assert result.output == tmp_path / "full-q8_0.gguf"
    types = {tensor.name: tensor.tensor_type for tensor in GGUFReader(result.output).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    model, tokenizer = _final(run)
    back, _ = _read_back(result.output)
    pairs = zip(_logits(model, tokenizer), _logits(back, tokenizer))
    agree = [(a.argmax(-1) == b.argmax(-1)).float() for a, b in pairs]
    assert torch.cat(agree).mean().item() >= Q8_0_MIN_GREEDY_AGREEMENT


def test_a_merged_lora_run_gives_the_adapters_logits_and_loads_without_peft(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["lora"]
    result = export_run(run, format="merged", output=tmp_path / "merged")
    files = {path.name for path in result.output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "sftlab_export.json"} <= files
    assert "adapter_config.json" not in files
    adapter, tokenizer = _final(run)
    merged = AutoModelForCausalLM.from_pretrained(result.output, dtype="float32").eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(result.output)
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert _max_diff(_logits(adapter, tokenizer), _logits(merged, tokenizer)) < MERGED_MAX_LOGIT_DIFF
    with adapter.disable_adapter():  # the adapter moved the model: the comparison above is not trivially true
        assert _max_diff(_logits(adapter, tokenizer), _logits(merged, tokenizer)) > 100 * MERGED_MAX_LOGIT_DIFF


def test_a_full_fine_tune_is_copied_in_the_dtype_asked_for(runs, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["full"]
    result = export_run(run, format="merged", dtype="bfloat16", output=tmp_path / "bf16")
    assert result.source == "final/ (full fine-tune)"
    with safe_open(result.output / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "bfloat16"
    model, tokenizer = _final(run)
    copy = AutoModelForCausalLM.from_pretrained(result.output, dtype="float32").eval()
    assert AutoTokenizer.from_pretrained(result.output).chat_template == tokenizer.chat_template
    assert _max_diff(_logits(model, tokenizer), _logits(copy, tokenizer)) < BF16_MAX_LOGIT_DIFF
    auto = export_run(run, format="merged", output=tmp_path / "auto")  # auto: the dtype final/ was saved in
    with safe_open(auto.output / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}


def test_a_lora_run_is_merged_before_it_is_written_as_gguf(runs, tmp_path):
    run = runs["lora"]
    result = export_run(run, format="gguf", output=tmp_path / "lora.gguf")
    assert "merged into" in result.source
    adapter, tokenizer = _final(run)
    back, _ = _read_back(result.output)
    assert _max_diff(_logits(adapter, tokenizer), _logits(back, tokenizer)) < F16_MAX_LOGIT_DIFF


def test_qwen2_with_biases_and_an_untied_output_reads_back_with_the_same_logits(tmp_path):
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = build_tiny_model(tmp_path / "qwen2", model_type="qwen2")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(1)
    with torch.no_grad():  # initialized to zero: give the biases and the output head values a mistake would show
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or name == "lm_head.weight":
                parameter.normal_(0, 0.5)
    path = write_gguf(model, tokenizer, directory, tmp_path / "qwen2.gguf")
    names = {tensor.name for tensor in GGUFReader(path).tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_k.bias"} <= names
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    back, back_tokenizer = _read_back(path)
    assert back.config.model_type == "qwen2" and not back.config.tie_word_embeddings
    assert _max_diff(_logits(model, tokenizer), _logits(back, tokenizer)) < F16_MAX_LOGIT_DIFF
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_nothing_is_overwritten_without_force_and_force_never_deletes_a_foreign_directory(runs, tmp_path):
    run = runs["full"]
    first = export_run(run, format="gguf", output=tmp_path / "a.gguf")
    with pytest.raises(UserError, match="already exists") as caught:
        export_run(run, format="gguf", output=tmp_path / "a.gguf")
    assert "--force" in caught.value.hint
    first.output.write_bytes(b"stale")
    assert export_run(run, format="gguf", output=tmp_path / "a.gguf", force=True).output.stat().st_size > 1000
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        export_run(run, format="merged", output=mine)
    with pytest.raises(UserError, match="not written by `sftlab export`"):
        export_run(run, format="merged", output=mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="inside"):
        export_run(run, format="merged", output=run / "final" / "merged")
    with pytest.raises(UserError, match="--quant is for --format gguf"):
        export_run(run, format="merged", quant="q8_0")


def test_the_card_and_the_report_list_the_exported_files_with_sizes_and_command(runs, tmp_path):
    run = runs["full"]
    result = export_run(run, format="gguf", output=tmp_path / "listed.gguf")
    record = json.loads((run / "exports.json").read_text())["exports"]
    entry = next(item for item in record if item["output"] == str(result.output))
    assert entry["command"] == f"sftlab export {run} --format gguf --quant f16 --output {tmp_path / 'listed.gguf'}"
    assert [item["bytes"] for item in entry["files"]] == [result.output.stat().st_size, result.modelfile.stat().st_size]
    card = (run / "final" / "README.md").read_text()
    assert "## Exported files" in card and entry["command"] in card and str(result.output) in card
    size = f"{result.output.stat().st_size:,} bytes"
    assert size in card
    html = (run / "report.html").read_text()
    assert 'id="exports"' in html and str(result.output) in html and size in html


def test_the_cli_exports_and_refuses_what_it_cannot_export_with_exit_2(runs, tmp_path):
    import shutil

    code, out, _ = sftlab_in_process("export", runs["full"], "--output", tmp_path / "cli")
    assert code == 0 and "ollama create full -f" in out and "llama-cli -m" in out
    code, _, err = sftlab_in_process("export", tmp_path / "nowhere")
    assert code == 2 and "run directory not found" in err and "hint:" in err
    opt_run = tmp_path / "opt-run"  # a finished run of an architecture llama.cpp's GGUF loader here cannot read
    opt_run.mkdir()
    shutil.copy(runs["full"] / "config.yaml", opt_run / "config.yaml")
    build_tiny_model(opt_run / "final", model_type="opt")
    code, _, err = sftlab_in_process("export", opt_run, "--format", "gguf")
    assert code == 2 and "cannot export a 'opt' model to GGUF" in err and "llama (" in err and "qwen2 (" in err
    assert "Traceback" not in err
    code, _, err = sftlab_in_process("export", runs["full"], "--quant", "q4_k")
    assert code == 2 and "f16, q8_0" in err


def test_the_demo_ends_by_printing_the_export_command(runs, monkeypatch):
    import sftlab.demo
    from sftlab.train import TrainResult

    run = runs["full"]  # the demo itself takes minutes: its training is replaced by a finished tiny run
    finished = TrainResult(run_dir=run, final_dir=run / "final", global_step=4, metrics={})
    monkeypatch.setattr(sftlab.demo, "run_demo", lambda output, **options: finished)
    code, out, _ = sftlab_in_process("demo", "--output", run)
    assert code == 0
    assert out.rstrip().splitlines()[-1] == f"run it in llama.cpp or Ollama: sftlab export {run} --format gguf"


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_ollama_template_is_chatml_with_its_default_system_prompt_or_left_out(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert ollama_template(tokenizer) == OLLAMA_CHATML
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    template = ollama_template(tokenizer)
    assert template.endswith(OLLAMA_CHATML)
    assert '{{ "You are a helpful AI assistant named SmolLM, trained by Hugging Face" }}' in template
    tokenizer.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert ollama_template(tokenizer) is None


@pytest.mark.slow
def test_the_embedded_smollm2_exports_to_gguf_and_reads_back(tmp_path):
    from sftlab.config import ModelConfig
    from sftlab.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), tokenizer).eval()
    tokenizer.save_pretrained(tmp_path)
    path = write_gguf(model, tokenizer, tmp_path, tmp_path / "smollm2-f16.gguf")
    back, back_tokenizer = _read_back(path)
    texts = TEXTS[:2]
    assert _max_diff(_logits(model, tokenizer, texts), _logits(back, tokenizer, texts)) < 0.1  # logits of magnitude ~20
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
