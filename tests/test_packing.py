"""Packing never lets one example attend to another (issue: contamination-free packing)."""

import subprocess
import sys

import pytest
import torch

from conftest import build_tiny_model, chat_rows, write_jsonl
from sftlab.config import DataConfig, ModelConfig, load_config
from sftlab.data import prepare_data
from sftlab.errors import ConfigError
from sftlab.model import load_model, load_tokenizer, packing_contamination, packing_tolerance
from sftlab.train import train


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-opt"), model_type="opt")


def test_packed_batch_loss_equals_the_token_weighted_loss_of_its_examples_one_by_one(tiny_model, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    cfg = ModelConfig(name_or_path=str(tiny_model))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).float().eval()
    rows = chat_rows(5)
    rows[2]["messages"] += [{"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": "Eight."}]
    data = prepare_data(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), eval_split=0), tokenizer,
                        cache_dir=None)
    examples = [{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                for ids, mask in zip(data.train["input_ids"], data.train["assistant_masks"])]

    # Packed: one row, as TRL's BFD packing and padding-free collator build it.
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": sum((e["input_ids"] for e in examples), []),
                        "labels": sum((e["labels"] for e in examples), []),
                        "seq_lengths": [len(e["input_ids"]) for e in examples]}])
    assert packed["input_ids"].shape[0] == 1 and len(packed["cu_seq_lens_q"]) == len(examples) + 1
    with torch.no_grad():
        packed_loss = model(**{k: v for k, v in packed.items()}, use_cache=False).loss.item()

        # One by one, weighted by the number of tokens each contributes to the loss.
        total, count = 0.0, 0
        for example in examples:
            labels = torch.tensor([example["labels"]])
            loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels, use_cache=False).loss.item()
            tokens = int((labels[0, 1:] != -100).sum())
            total, count = total + loss * tokens, count + tokens
    assert packed_loss == pytest.approx(total / count, abs=1e-5)


def test_the_probe_sees_no_leak_in_llama_and_a_leak_in_opt(tiny_model, tiny_opt):
    for directory, leaks in ((tiny_model, False), (tiny_opt, True)):
        cfg = ModelConfig(name_or_path=str(directory))
        model = load_model(cfg, load_tokenizer(cfg))
        assert (packing_contamination(model) > packing_tolerance(model)) is leaks, directory


def opt_config(tmp_path, tiny_opt, chat_data, packing: bool):
    path = tmp_path / "opt.yaml"
    path.write_text(f"""model:
  name_or_path: {tiny_opt}
data:
  train: {chat_data['train']}
  eval: {chat_data['eval']}
training:
  output_dir: {tmp_path / 'opt-run'}
  max_steps: 2
  packing: {str(packing).lower()}
  max_length: 128
""")
    return path


def test_packing_a_model_that_would_mix_examples_is_refused_before_training(tmp_path, tiny_opt, chat_data):
    with pytest.raises(ConfigError, match="training.packing: .* lets packed examples attend to each other"):
        train(load_config(opt_config(tmp_path, tiny_opt, chat_data, packing=True)))
    assert not list((tmp_path / "opt-run").glob("checkpoint-*"))
    result = train(load_config(opt_config(tmp_path, tiny_opt, chat_data, packing=False)), overwrite=True)
    assert result.global_step == 2


def test_cli_refuses_contaminating_packing_with_exit_2(tmp_path, tiny_opt, chat_data):
    result = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(opt_config(tmp_path, tiny_opt, chat_data, True))],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: training.packing:" in result.stderr and "hint:" in result.stderr


def test_multi_field_records_train_packed_through_the_data_template(tmp_path, tiny_model):
    rows = [{"question": f"What is {i} times 3?", "answer": f"{3 * i}", "topic": "math"} for i in range(40)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "qa.yaml").write_text(f"""model:
  name_or_path: {tiny_model}
data:
  train: {data}
  template: "### Question: {{question}}\\n### Answer: {{answer}}"
training:
  output_dir: {tmp_path / 'qa-run'}
  max_steps: 3
  packing: true
  max_length: 64
""")
    cfg = load_config(tmp_path / "qa.yaml")
    assert cfg.training["packing"] is True and cfg.training["eval_packing"] is False
    result = train(cfg)
    assert result.global_step == 3


@pytest.mark.parametrize("packing, attention, expected", [
    ("auto", None, False), ("auto", "sdpa", False), ("auto", "eager", False),
    ("auto", "flash_attention_2", True), ("auto", "kernels-community/flash-attn2", True),
    (True, "sdpa", True), (False, "flash_attention_2", False),
])
def test_auto_packing_follows_the_attention_kernel(packing, attention, expected):
    from sftlab.train import resolve_packing

    assert resolve_packing(packing, attention) is expected


def test_auto_without_flash_attention_trains_length_grouped_batches(tiny_config):
    from sftlab.train import build_sft_config

    cfg = load_config(tiny_config)
    assert cfg.training["packing"] == "auto"
    args = build_sft_config(cfg, has_eval=True)
    assert args.packing is False and args.train_sampling_strategy == "group_by_length"
    args = build_sft_config(load_config(tiny_config, ["training.packing=true"]), has_eval=True)
    assert args.packing is True
