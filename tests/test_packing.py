"""Packing never lets one example attend to another, and goes through the fastest path each device has
(issues: contamination-free packing; GPUs: pack without flash-attn)."""

import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from conftest import build_tiny_model, chat_rows, tiny_config_file, write_jsonl
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
    data = prepare_data(
        DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), eval_split=0), tokenizer, cache_dir=None
    )
    examples = [
        {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
        for ids, mask in zip(data.train["input_ids"], data.train["assistant_masks"])
    ]

    # Packed: one row, as TRL's BFD packing and padding-free collator build it.
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator(
        [
            {
                "input_ids": sum((e["input_ids"] for e in examples), []),
                "labels": sum((e["labels"] for e in examples), []),
                "seq_lengths": [len(e["input_ids"]) for e in examples],
            }
        ]
    )
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


def opt_config(tmp_path, tiny_opt, chat_data, packing: bool):
    return tiny_config_file(
        tmp_path / "opt.yaml",
        tiny_opt,
        chat_data["train"],
        chat_data["eval"],
        training={"output_dir": tmp_path / "opt-run", "max_steps": 2, "packing": packing},
    )


def test_packing_a_model_that_would_mix_examples_is_refused_before_training(tmp_path, tiny_opt, chat_data):
    with pytest.raises(ConfigError, match="training.packing: .* lets packed examples attend to each other"):
        train(load_config(opt_config(tmp_path, tiny_opt, chat_data, packing=True)))
    assert not list((tmp_path / "opt-run").glob("checkpoint-*"))
    result = train(load_config(opt_config(tmp_path, tiny_opt, chat_data, packing=False)), overwrite=True)
    assert result.global_step == 2


def test_cli_refuses_contaminating_packing_with_exit_2(tmp_path, tiny_opt, chat_data):
    result = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "train", str(opt_config(tmp_path, tiny_opt, chat_data, True))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: training.packing:" in result.stderr and "hint:" in result.stderr


def test_multi_field_records_train_packed_through_the_data_template(tmp_path, tiny_model):
    rows = [{"question": f"What is {i} times 3?", "answer": f"{3 * i}", "topic": "math"} for i in range(40)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    tiny_config_file(
        tmp_path / "qa.yaml",
        tiny_model,
        data,
        data={"template": "### Question: {question}\n### Answer: {answer}"},
        training={"output_dir": tmp_path / "qa-run", "max_steps": 3, "packing": True, "max_length": 64},
    )
    cfg = load_config(tmp_path / "qa.yaml")
    assert cfg.training["packing"] is True and cfg.training["eval_packing"] is False
    out = io.StringIO()
    result = train(cfg, console=Console(file=out, width=200))
    assert result.global_step == 3
    # The packing decision and its reason, printed with the plan and kept in run_info.json.
    assert "packing on (attention sdpa): training.packing: true" in out.getvalue()
    plan = json.loads((result.run_dir / "run_info.json").read_text())["plan"]
    assert plan["packing"] is True and plan["attention"] == "sdpa"
    assert "dense block-diagonal mask" in plan["packing_reason"]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), model_type="qwen2")


@pytest.fixture
def flex_attention_without_inductor(monkeypatch):
    """flex_attention on a CPU through torch.compile's eager backend.

    transformers compiles flex_attention (and PyTorch its block mask) with inductor, which builds
    C++ kernels for a CPU for over a minute on 2 cores. The eager backend runs PyTorch's reference
    flex_attention under the very block mask and mask function transformers builds from the packed
    position ids: the part that decides which tokens see which. The fused kernel itself is a
    GPU's (bench/gpu.py runs the same probe there, before training).
    """
    from transformers.integrations import flex_attention

    real_compile = torch.compile

    def eager_compile(model=None, **options):
        options.pop("mode", None)
        options["backend"] = "eager"
        return real_compile(model, **options) if model is not None else real_compile(**options)

    monkeypatch.setattr(torch, "compile", eager_compile)
    # transformers keeps the compiled function in a singleton: start from none, leave none behind.
    monkeypatch.setattr(flex_attention.WrappedFlexAttention, "_instance", None)
    monkeypatch.setattr(flex_attention.WrappedFlexAttention, "_is_flex_compiled", False)


def gpu_choice(packing="auto", attention=None, flash=None):
    from sftlab.speed import choose_packing

    return choose_packing(packing, attention, accelerator="cuda", flash=flash, flex=True)


def test_on_a_gpu_without_flash_attn_auto_packs_through_flex_attention():
    choice = gpu_choice()
    assert choice.packing and choice.attn_implementation == "flex_attention"
    assert "flash-attn is not installed" in choice.reason


@pytest.mark.parametrize(
    "packing, attention, accelerator, flash, flex, expected",
    [
        # GPUs: flash-attn where installed, else flex_attention, when the config leaves the attention unset
        ("auto", None, "cuda", None, True, (True, "flex_attention")),
        ("auto", None, "cuda", "flash_attention_2", True, (True, "flash_attention_2")),
        ("auto", None, "cuda", "flash_attention_3", True, (True, "flash_attention_3")),
        ("auto", None, "cuda", None, False, (False, None)),  # a model without flex support: length-grouped
        (True, None, "cuda", None, True, (True, "flex_attention")),  # packing asked for: the fast path too
        # an attention implementation the config names is kept
        ("auto", "flex_attention", "cuda", None, True, (True, "flex_attention")),
        ("auto", "flash_attention_2", "cuda", None, True, (True, "flash_attention_2")),
        ("auto", "kernels-community/flash-attn2", "cuda", None, True, (True, "kernels-community/flash-attn2")),
        ("auto", "sdpa", "cuda", None, True, (False, "sdpa")),  # a dense mask over the whole row
        ("auto", "eager", "cuda", "flash_attention_2", True, (False, "eager")),
        (True, "sdpa", "cuda", None, True, (True, "sdpa")),
        # CPUs (and MPS/XPU) never pack on auto, as measured; explicit values are honoured
        ("auto", None, None, None, True, (False, None)),
        ("auto", "sdpa", None, None, True, (False, "sdpa")),
        ("auto", "flex_attention", None, None, True, (False, "flex_attention")),
        ("auto", "flash_attention_2", None, None, True, (True, "flash_attention_2")),
        ("auto", None, "mps", None, True, (False, None)),
        (True, None, None, None, True, (True, None)),
        (False, None, "cuda", "flash_attention_2", True, (False, None)),
        (False, "flash_attention_2", "cuda", None, True, (False, "flash_attention_2")),
    ],
)
def test_packing_follows_the_device_and_attention(packing, attention, accelerator, flash, flex, expected):
    from sftlab.speed import choose_packing

    choice = choose_packing(packing, attention, accelerator, flash=flash, flex=flex)
    assert (choice.packing, choice.attn_implementation) == expected
    assert choice.reason


@pytest.mark.parametrize("attention, packing, expected", [(None, "auto", "flex_attention"), ("sdpa", True, "sdpa")])
def test_the_gpu_paths_keep_packed_examples_apart_in_llama_and_qwen2_and_opt_is_refused(
    attention, packing, expected, tiny_model, tiny_qwen2, tiny_opt, flex_attention_without_inductor, monkeypatch
):
    import sftlab.speed as speed
    from sftlab.config import SftlabConfig

    monkeypatch.setattr(speed, "accelerator_type", lambda: "cuda")  # decide as on a GPU without flash-attn
    for directory, leaks in ((tiny_model, False), (tiny_qwen2, False), (tiny_opt, True)):
        cfg = SftlabConfig(
            model=ModelConfig(name_or_path=str(directory), attn_implementation=attention),
            data=DataConfig(train="unused.jsonl"),
            training={"packing": packing},
        )
        model = load_model(cfg.model, load_tokenizer(cfg.model))
        choice = speed.packing_for(cfg, model)
        speed.use_attention(model, choice)  # as train() does, before the probe
        assert choice.packing and model.config._attn_implementation == expected
        assert (packing_contamination(model) > packing_tolerance(model)) is leaks, (directory, expected)
        if leaks:
            with pytest.raises(ConfigError, match=f"with attention '{expected}' lets packed examples attend"):
                speed.refuse_contaminating_packing(model, cfg)


def test_the_tolerance_separates_bf16_rounding_from_contamination(tiny_opt):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=600,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=False,
    )
    deep = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert 1e-6 < packing_contamination(deep) < packing_tolerance(deep) / 3  # rounding shows, well inside
    assert packing_contamination(deep.float()) < 1e-5 < packing_tolerance(deep)
    cfg = ModelConfig(name_or_path=str(tiny_opt))
    leaky = load_model(cfg, load_tokenizer(cfg)).to(torch.bfloat16)
    assert packing_contamination(leaky) > 3 * packing_tolerance(leaky)


def test_auto_on_a_cpu_trains_length_grouped_batches(tiny_config):
    from sftlab.resolve import build_sft_config

    cfg = load_config(tiny_config)
    assert cfg.training["packing"] == "auto"
    args = build_sft_config(cfg, has_eval=True)
    assert args.packing is False and args.train_sampling_strategy == "group_by_length"
    args = build_sft_config(load_config(tiny_config, ["training.packing=true"]), has_eval=True)
    assert args.packing is True


def test_speed_options_that_cannot_work_here_are_refused_before_the_data_is_prepared(tiny_config, monkeypatch):
    import sftlab.speed as speed
    from sftlab.speed import check_speed_options

    cfg = load_config(tiny_config, ["training.use_liger_kernel=true"])
    with pytest.raises(ConfigError, match="training.use_liger_kernel: Liger's Triton kernels run on CUDA"):
        check_speed_options(cfg, accelerator=None)
    monkeypatch.setattr(speed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="liger-kernel package is not installed") as raised:
        check_speed_options(cfg, accelerator="cuda")
    assert "pip install" in raised.value.hint and "liger" in raised.value.hint
    fused = load_config(tiny_config, ["training.liger_kernel_config={fused_linear_cross_entropy: true}"])
    with pytest.raises(ConfigError, match="fused_linear_cross_entropy"):
        check_speed_options(fused, accelerator="cuda")
    warnings = check_speed_options(load_config(tiny_config, ["training.torch_compile=true"]), accelerator=None)
    assert len(warnings) == 1 and warnings[0].startswith("training.torch_compile on a CPU")
    assert check_speed_options(load_config(tiny_config, ["training.torch_compile=true"]), accelerator="cuda") == []
    # In a real run: refused with exit 2, before the run directory or the data is touched.
    with pytest.raises(ConfigError, match="use_liger_kernel"):
        train(cfg)
    assert not cfg.output_dir.exists()


def test_trl_loss_options_are_checked_against_trls_own_choices(tiny_config):
    from sftlab.resolve import build_sft_config

    with pytest.raises(ConfigError, match=r"training.loss_type = 'chunked' is not one of: nll, dft, chunked_nll"):
        load_config(tiny_config, ["training.loss_type=chunked"])
    assert build_sft_config(load_config(tiny_config, ["training.loss_type=dft"]), has_eval=True).loss_type == "dft"
