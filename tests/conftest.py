"""Shared fixtures: a tiny model built on the fly, and small datasets.

The tiny model (byte-level BPE tokenizer trained with `tokenizers`, 2-layer Llama with
hidden size 64, ChatML chat template) trains in seconds on a CPU, so tests exercise the
real TRL/transformers code paths without the embedded 135M model. `build_tiny_model` also
builds the same size in Qwen2 and OPT shapes (`model_type="qwen2"` / `"opt"`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared-data cache in a private folder: tests never read a cache another run left behind.
# (shared by the pytest-xdist workers of one run: the embedded model is converted once; entries are written
# under a temporary name and renamed into place, so two workers never read half of one)
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN_ID:
    os.environ["SFTLAB_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"sftlab-test-cache-{_RUN_ID}")
    Path(os.environ["SFTLAB_CACHE_DIR"]).mkdir(exist_ok=True)
else:
    os.environ["SFTLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="sftlab-test-cache-")
# Under pytest-xdist (`-n 2`, one worker per core) each worker, and the processes it starts,
# computes on one thread: two workers with two threads each would fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Property tests explore at random while iterating, but in CI (CI=true) every run draws the
# same examples: a random example cannot fail a submission that did not cause it.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines() -> list[str]:
    demo = Path(__file__).resolve().parent.parent / "src" / "sftlab" / "demo_data" / "train.jsonl"
    lines = []
    for row in demo.read_text(encoding="utf-8").splitlines()[:300]:
        for message in json.loads(row)["messages"]:
            lines.append(message["content"])
    lines += ["user assistant system tool", "The quick brown fox jumps over the lazy dog."] * 5
    return lines


def build_tiny_model(directory: Path, chat_template: str | None = CHATML, model_type: str = "llama") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if model_type == "qwen2":  # Qwen2's own split (digits one by one, ...), then bytes, as its tokenizer.json has it
        from tokenizers import Regex
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    shapes = {
        "llama": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        ),
        # Qwen2 (DeepSeek-R1-Distill-Qwen's architecture): biased q/k/v projections, an untied LM head
        "qwen2": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
        # OPT: learned absolute positions; lets packed examples attend to each other (the chapter's packing example)
        "opt": dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=1024,
        ),
    }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shapes[model_type],
    )
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def chat_rows(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for index in range(offset, offset + count):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {index} plus {index}?"},
                    {"role": "assistant", "content": f"{index} plus {index} is {2 * index}."},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_data(tmp_path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", chat_rows(48)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", chat_rows(8, offset=1000)),
    }


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# The tiny run every training test starts from: a few steps, an evaluation and a checkpoint every 3.
TINY_TRAINING = {
    "max_steps": 6,
    "per_device_train_batch_size": 4,
    "learning_rate": 1.0e-3,
    "logging_steps": 2,
    "eval_steps": 3,
    "save_steps": 3,
    "max_length": 128,
}


def tiny_config_file(
    path: Path,
    model: Path,
    train_file: Path | None = None,
    eval_file: Path | None = None,
    *,
    data: dict | None = None,
    training: dict | None = None,
    **sections: dict,
) -> Path:
    """The one test config factory: `model` trained on `train_file` (and `eval_file`) as TINY_TRAINING
    says, updated by `training` (a key set to None is left out), its run in path.parent / "run" unless
    training.output_dir says; `data` adds to the data section, and any other section (eval, monitor,
    lora...) is written as given."""
    import yaml

    data_section = {key: str(value) for key, value in (("train", train_file), ("eval", eval_file)) if value is not None}
    settings = {"output_dir": path.parent / "run", **TINY_TRAINING, **(training or {})}
    config = {
        "model": {"name_or_path": str(model)},
        "data": {**data_section, **(data or {})},
        "training": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in settings.items()
            if value is not None
        },
        **sections,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model, chat_data) -> Path:
    """A complete config training the tiny model for a few steps."""
    return tiny_config_file(tmp_path / "config.yaml", tiny_model, chat_data["train"], chat_data["eval"])


def sftlab_subprocess(*args, cwd=None, timeout: int = 600):
    """The `sftlab` command in a fresh interpreter, offline, as a user runs it: the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "sftlab.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
    )


def sftlab_in_process(*args) -> tuple[int, str, str]:
    """The CLI's main() in this process (no interpreter start-up): exit code, stdout, stderr."""
    import contextlib
    import io

    from sftlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["sftlab", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit:
            main()
    finally:
        sys.argv = saved
    return exit.value.code or 0, out.getvalue(), err.getvalue()
