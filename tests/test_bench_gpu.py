"""bench/gpu.py, the GPU benchmark: its dry run on a CPU goes through the same code path, and its numbers add up.

No timings are asserted: the benchmark measures, the tests check that it can, and that what it
reports is computed as its docstring says.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402


def test_the_hard_coded_shape_is_deepseek_r1_distill_qwen_1_5b_with_its_1_78b_weights():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):  # no memory: only the shapes
        model = AutoModelForCausalLM.from_config(Qwen2Config(**gpu.DEEPSEEK_R1_DISTILL_QWEN_1_5B))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 1.777e9) < 2e6  # the hub's "1.78B params", untied head
    assert model.config.rope_parameters["rope_theta"] == 10000.0 and model.config.sliding_window is None


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_the_peak_comes_from_the_device_name(name, peak):
    assert gpu.peak_tflops_for(name) == peak
    assert gpu.device_slug("NVIDIA H200") == "nvidia-h200"


def test_model_flops_per_token_are_6n_plus_attention_over_each_conversation():
    # Two conversations of 100 and 300 tokens: 12 L d (100^2 + 300^2) over 400 tokens, plus 6 N.
    result = {
        "linear_weights": 1_000_000,
        "layers": 2,
        "attention_width": 64,
        "dataset": {"tokens": 400, "sum_sq_lengths": 100**2 + 300**2},
    }
    assert gpu.model_flops_per_token(result) == 6 * 1_000_000 + 12 * 2 * 64 * (100**2 + 300**2) / 400


def test_conversations_are_multi_turn_and_within_their_length_bounds(tmp_path):
    shape = gpu.Shape(dry_run=True)
    tokenizer = gpu.build_tokenizer(tmp_path)
    rows = gpu.smoltalk_shaped_conversations(tokenizer, 40, seed=3, shape=shape)
    lengths = [len(gpu.rendered_ids(tokenizer, row["messages"])) for row in rows]
    assert min(lengths) >= shape.min_tokens - 2 and max(lengths) <= shape.max_length
    roles = [[message["role"] for message in row["messages"]] for row in rows]
    assert all(turns == ["user", "assistant"] * (len(turns) // 2) for turns in roles)
    assert any(len(row["messages"]) > 2 for row in rows)  # multi-turn
    assert rows == gpu.smoltalk_shaped_conversations(tokenizer, 40, seed=3, shape=shape)  # seeded


def test_the_dry_run_trains_both_variants_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu.txt"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.with_suffix(".json").read_text())
    trl, sftlab = summary["trl"], summary["sftlab"]
    assert summary["dry_run"] and summary["checks"]["tokens_agree"] and summary["checks"]["every_token_fed"]
    assert trl["settings"]["packing"] is False and trl["settings"]["per_device_train_batch_size"] == 4
    assert trl["settings"]["activation_checkpointing"] and not trl["settings"]["assistant_only_loss"]
    assert sftlab["settings"]["assistant_only_loss"]
    for variant in (trl, sftlab):
        assert variant["steady"]["tokens"] > 0 and variant["tokens_per_s"] > 0 and variant["model_flops_per_token"] > 0
    text = out.read_text()
    assert "dry run on a CPU" in text and "tokens/s, steady" in text
    assert "targets:    tokens/s >= x1.5:" in text and "MFU >= 40%: FAIL (no peak known" in text


def test_a_machine_missing_a_package_is_told_which_and_how_to_carry_it(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "NEEDED_MODULES", (*gpu.NEEDED_MODULES, "sftlab_no_such_package"))
    assert gpu.main(["--dry-run"]) == 2
    assert "missing: sftlab_no_such_package" in capsys.readouterr().err
    monkeypatch.setattr(gpu, "IMPORTED_MODULES", (*gpu.IMPORTED_MODULES, "sftlab_no_such_module"))
    assert gpu.main([]) == 2  # on a GPU machine the packages are imported, and an import error is named
    err = capsys.readouterr().err
    assert "sftlab_no_such_module (ModuleNotFoundError" in err and "bash bench/gpu_wheels.sh" in err
