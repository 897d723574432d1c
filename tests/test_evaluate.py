"""Evaluation after SFT: before against after on held-out data, every metric, LoRA, the CLI."""

import json
import math
import random
import shutil
import subprocess
import sys

import pytest

from conftest import sftlab_in_process, tiny_config_file, write_config, write_jsonl
from sftlab.config import load_config
from sftlab.evaluate import (
    AFTER_FILE,
    BEFORE_FILE,
    EVAL_DIR,
    RETENTION_BUILTIN,
    SAMPLES_FILE,
    ends_turn_cleanly,
    evaluate_model_path,
    evaluate_run,
    leaks_template,
    print_comparison,
    template_markers,
    trained_responses,
    trained_token_loss,
)
from sftlab.metrics import distinct_n, duplicate_share, exact_match, memorization, rouge_l
from sftlab.rundir import METRICS_FILE, read_jsonl
from sftlab.train import train

FORMAT = r"ANSWER: \d+"


def sum_rows(count: int, seed: int) -> list[dict]:
    """Questions whose answers follow one strict format, `ANSWER: N`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"ANSWER: {a + b}"},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def formatted_run(tmp_path_factory, tiny_model):
    """The tiny model trained on strict-format answers, with eval.format set: a run with eval/ written."""
    tmp = tmp_path_factory.mktemp("formatted")
    train_file = write_jsonl(tmp / "train.jsonl", sum_rows(200, seed=0))
    eval_file = write_jsonl(tmp / "eval.jsonl", sum_rows(16, seed=1))
    config = tiny_config_file(
        tmp / "config.yaml",
        tiny_model,
        train_file,
        eval_file,
        training={
            "max_steps": 120,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 3.0e-3,
            "warmup_ratio": 0,
            "logging_steps": 20,
            "eval_steps": 120,
            "save_steps": 120,
            "max_length": 64,
            "bf16": False,  # fp32 evaluation by the trainer too: its eval_loss is comparable to the last digit
            "report_to": "none",
        },
        eval={"num_prompts": 16, "max_new_tokens": 12, "format": {"type": "regex", "pattern": FORMAT}},
        monitor={"plots": False, "sample_prompts": 0},
    )
    result = train(load_config(config))
    return result.run_dir, config


def read_eval(run_dir, name):
    return json.loads((run_dir / EVAL_DIR / name).read_text())


def test_the_tuned_model_follows_the_format_and_the_references_better_than_the_base(formatted_run):
    run_dir, _ = formatted_run
    before, after = read_eval(run_dir, BEFORE_FILE), read_eval(run_dir, AFTER_FILE)
    assert after["adherence"]["format"] > before["adherence"]["format"]
    assert after["adherence"]["format"] >= 0.5
    assert after["reference"]["rougeL"] > before["reference"]["rougeL"]
    assert after["reference"]["exact_match"] >= before["reference"]["exact_match"]
    assert after["adherence"]["chat"] > before["adherence"]["chat"]
    assert after["loss"]["loss"] < before["loss"]["loss"]


@pytest.mark.parametrize("name", [BEFORE_FILE, AFTER_FILE])
def test_every_metric_is_present_with_sane_values(formatted_run, name):
    run_dir, _ = formatted_run
    result = read_eval(run_dir, name)
    assert result["label"] == name.removesuffix(".json")
    assert result["step"] == (0 if name == BEFORE_FILE else 120)
    assert result["model"] == (str(run_dir / "final") if name == AFTER_FILE else result["model"])
    assert result["num_prompts"] == 16 and result["max_new_tokens"] == 12 and result["seconds"] > 0
    shares = {
        "adherence": ["chat", "format"],
        "reference": ["exact_match", "rougeL"],
        "diversity": ["distinct_1", "distinct_2", "duplicate_share"],
        "memorization": ["verbatim_share"],
    }
    for group, keys in shares.items():
        for key in keys:
            assert key in result[group], (group, key)
            value = result[group][key]
            assert value is None or 0 <= value <= 1, (group, key, value)
    assert result["adherence"]["format_spec"] == {"type": "regex", "pattern": FORMAT}
    for group in ("loss", "retention"):
        assert result[group]["tokens"] > 0
        assert math.isfinite(result[group]["loss"]) and result[group]["loss"] > 0
        assert math.isclose(result[group]["perplexity"], math.exp(result[group]["loss"]), rel_tol=1e-9)
    assert result["retention"]["source"] == RETENTION_BUILTIN
    assert result["memorization"]["mean_longest_common_ngram"] >= 0
    after = read_eval(run_dir, AFTER_FILE)
    assert after["diversity"]["distinct_1"] is not None and after["diversity"]["distinct_2"] is not None


def test_held_out_loss_is_the_trainers_eval_loss_for_the_same_weights(formatted_run):
    # 16 eval rows in one eval batch: the trainer's mean equals the token-weighted mean.
    run_dir, _ = formatted_run
    last_eval = [r for r in read_jsonl(run_dir / METRICS_FILE) if "eval_loss" in r][-1]
    assert last_eval["step"] == 120
    assert read_eval(run_dir, AFTER_FILE)["loss"]["loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-4)


def test_samples_put_prompt_reference_base_and_tuned_answers_side_by_side(formatted_run):
    run_dir, _ = formatted_run
    samples = read_jsonl(run_dir / EVAL_DIR / SAMPLES_FILE)
    assert len(samples) == 16
    assert set(samples[0]) == {"prompt", "reference"} | {
        f"{side}_{what}" for side in ("base", "prompted", "tuned") for what in ("output", "follows_format", "scores")
    }
    eval_rows = sum_rows(16, seed=1)
    assert [s["prompt"] for s in samples] == [row["messages"][0]["content"] for row in eval_rows]
    assert [s["reference"] for s in samples] == [row["messages"][1]["content"] for row in eval_rows]
    import re

    for sample in samples:
        assert isinstance(sample["base_output"], str) and isinstance(sample["tuned_output"], str)
        assert sample["tuned_follows_format"] is (re.fullmatch(FORMAT, sample["tuned_output"].strip()) is not None)
        assert sample["tuned_scores"]["format"] is sample["tuned_follows_format"]
        assert sample["tuned_scores"]["exact_match"] is (sample["tuned_output"].strip() == sample["reference"])
        assert isinstance(sample["prompted_output"], str)  # the prompted base model answered the same prompts
    after = read_eval(run_dir, AFTER_FILE)
    assert after["adherence"]["format"] == sum(s["tuned_follows_format"] for s in samples) / 16


def test_sftlab_eval_run_dir_evaluates_the_final_model_again(formatted_run, tmp_path):
    run_dir, _ = formatted_run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (copy / EVAL_DIR / BEFORE_FILE).unlink()  # missing: evaluated again, the baseline being on
    (copy / EVAL_DIR / AFTER_FILE).unlink()
    result = sftlab("eval", copy)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out evaluation" in result.stdout and "sample 1" in result.stdout
    original, again = read_eval(run_dir, AFTER_FILE), read_eval(copy, AFTER_FILE)
    assert again["model"] == str(copy / "final")
    # final/ loaded from disk gives what the trained weights in memory gave
    assert again["loss"]["loss"] == pytest.approx(original["loss"]["loss"], abs=1e-5)
    assert again["adherence"] == original["adherence"]
    assert read_eval(copy, BEFORE_FILE)["loss"]["loss"] == pytest.approx(
        read_eval(run_dir, BEFORE_FILE)["loss"]["loss"], abs=1e-5
    )


def test_sftlab_eval_model_with_config_writes_an_output_directory_once(formatted_run, tmp_path):
    run_dir, config = formatted_run
    out = tmp_path / "out"
    first = sftlab("eval", "--model", run_dir / "final", "--config", config, "--output", out, "--baseline")
    assert first.returncode == 0, first.stderr[-2000:]
    after, before = json.loads((out / AFTER_FILE).read_text()), json.loads((out / BEFORE_FILE).read_text())
    assert after["model"] == str(run_dir / "final")
    assert after["adherence"] == read_eval(run_dir, AFTER_FILE)["adherence"]
    assert before["adherence"] == read_eval(run_dir, BEFORE_FILE)["adherence"]
    assert len(read_jsonl(out / SAMPLES_FILE)) == 16
    before_text = (out / AFTER_FILE).read_text()
    code, _, err = sftlab_in_process("eval", "--model", run_dir / "final", "--config", config, "--output", out)
    assert code == 2 and "already exists" in err and (out / AFTER_FILE).read_text() == before_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere"], "run directory not found"),
        (["{tmp}"], "not an sftlab run directory"),
        (["--model", "{tmp}"], "--model needs --config"),
        ([], "nothing to evaluate"),
        (["{tmp}", "--config", "{tmp}/c.yaml"], "not both"),
    ],
)
def test_eval_errors_exit_2_with_one_message(tmp_path, args, message):
    code, _, err = sftlab_in_process("eval", *[arg.format(tmp=tmp_path) for arg in args])
    assert code == 2 and message in err and "Traceback" not in err


def test_a_run_without_a_final_model_cannot_be_evaluated(tmp_path, tiny_config):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_config.read_text())
    code, _, err = sftlab_in_process("eval", run)
    assert code == 2 and "no final model" in err


def test_a_config_without_eval_data_cannot_be_evaluated(tmp_path, tiny_model, chat_data):
    config = write_config(
        tmp_path / "c.yaml",
        f"""
model:
  name_or_path: {tiny_model}
data:
  train: {chat_data["train"]}
  eval_split: 0
training:
  output_dir: {tmp_path / "run"}
""",
    )
    code, _, err = sftlab_in_process("eval", "--config", config)
    assert code == 2 and "no eval data" in err


def test_a_lora_run_is_evaluated_with_its_adapter_on_the_base(tiny_config):
    cfg = load_config(
        tiny_config,
        ["lora.r=4", "lora.target_modules=[q_proj,v_proj]", "training.max_steps=4", "eval.max_new_tokens=8"],
    )
    result = train(cfg)
    assert (result.final_dir / "adapter_config.json").exists()
    before, after = read_eval(result.run_dir, BEFORE_FILE), read_eval(result.run_dir, AFTER_FILE)
    assert after["model"] == str(result.final_dir) and after["step"] == 4
    assert after["loss"]["loss"] != before["loss"]["loss"]  # the adapter changed the model
    again = evaluate_run(result.run_dir).summary  # loads the adapter from final/ on the base model
    assert again["loss"]["loss"] == pytest.approx(after["loss"]["loss"], abs=1e-5)


def test_retention_can_be_pointed_at_other_data_or_turned_off(tmp_path, tiny_config, tiny_model):
    general = write_jsonl(
        tmp_path / "general.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue is a colour."},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "An apple is a fruit."},
                ]
            },
        ],
    )
    common = ["eval.num_prompts=2", "eval.max_new_tokens=4", "eval.show_samples=0"]
    custom = evaluate_model_path(None, tiny_config, overrides=[*common, f"eval.retention={general}"]).summary
    assert custom["retention"]["source"] == str(general)
    assert 0 < custom["retention"]["tokens"] < 40  # two short answers and their end-of-turn tokens
    off = evaluate_model_path(None, tiny_config, overrides=[*common, "eval.retention=false"]).summary
    assert off["retention"] == {"loss": None, "perplexity": None, "tokens": None, "source": None}
    assert off["loss"]["loss"] == pytest.approx(custom["loss"]["loss"])
    assert off["model"] == str(tiny_model)


def test_sampling_is_configurable_and_seeded(tiny_config):
    common = ["eval.num_prompts=4", "eval.max_new_tokens=6", "eval.show_samples=0", "eval.retention=false"]
    greedy = evaluate_model_path(None, tiny_config, overrides=common).summary
    sampled = [
        evaluate_model_path(
            None, tiny_config, overrides=[*common, "eval.do_sample=true", "eval.temperature=1.5"]
        ).summary
        for _ in range(2)
    ]
    assert sampled[0]["diversity"] == sampled[1]["diversity"]  # seeded: the same answers again
    assert sampled[0]["diversity"] != greedy["diversity"]


# =========================================================================== metrics on hand-made inputs


def test_distinct_n_counts_unique_word_ngrams_over_all_answers():
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["one two three"], 1) == 1.0
    assert distinct_n(["", "  "], 1) is None and distinct_n(["single"], 2) is None


def test_duplicate_share_counts_every_answer_identical_to_another():
    assert duplicate_share(["x", " x", "y", "z"]) == 0.5
    assert duplicate_share(["x", "y"]) == 0.0
    assert duplicate_share(["", "", "a"]) == pytest.approx(2 / 3)


def test_memorization_finds_verbatim_copies_and_the_longest_shared_ngram():
    train = ["the answer is 42 and", "hello world", "no overlap with anything said here"]
    result = memorization(["so the answer is 42 and more", "hello world", "", "answer is"], train)
    # answer 1 contains a 5-word training response, answer 2 equals one; "answer is" is only a fragment
    assert result["verbatim_share"] == pytest.approx(2 / 4)
    assert result["mean_longest_common_ngram"] == pytest.approx((5 + 2 + 0 + 2) / 4)
    short = memorization(["we said hello world today"], ["hello world"])  # a 2-word response inside is coincidence
    assert short == {"verbatim_share": 0.0, "mean_longest_common_ngram": 2.0}
    assert memorization([], train)["verbatim_share"] is None


def test_exact_match_and_rouge_l():
    assert exact_match(["Paris ", "Rome"], ["Paris", "Madrid"]) == 0.5
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l(["dog"], ["cat"]) == 0.0


def test_the_comparison_shows_a_wrongly_typed_summary_value_as_a_dash():
    import io

    from rich.console import Console

    tuned = {"num_prompts": 2, "max_new_tokens": 4, "loss": {"loss": 1.5, "perplexity": math.exp(1.5), "tokens": 9}}
    hand_edited = {"loss": {"loss": "low"}, "adherence": [1], "metrics": "none"}  # a before.json someone edited
    out = io.StringIO()
    print_comparison({"base": hand_edited, "tuned": tuned}, [], console=Console(file=out, width=200))
    loss_row = next(line for line in out.getvalue().splitlines() if "held-out loss" in line)
    assert [cell.strip() for cell in loss_row.split("│")[2:5]] == ["-", "1.5000", ""]


@pytest.mark.parametrize(
    "raw, leaks",
    [
        ("Paris is the capital of France.", False),
        ("The user asked about assistants in general.", False),
        ("Paris<|im_end|>", True),
        ("Paris<|im_start|>user\nAnd Rome?", True),
        ("assistant\nParis is the capital.", True),
        ("Paris.\nUser: and Rome?", True),
        ("<|endoftext|>", True),
    ],
)
def test_chat_adherence_catches_leaked_template_tokens_and_role_markers(tiny_model, raw, leaks):
    from transformers import AutoTokenizer

    markers = template_markers(AutoTokenizer.from_pretrained(tiny_model))
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(markers)
    assert leaks_template(raw, markers) is leaks
    assert ends_turn_cleanly(raw, True, raw, markers) is not leaks
    assert ends_turn_cleanly(raw, False, raw, markers) is False  # never ended its turn
    assert ends_turn_cleanly("  ", True, "  ", markers) is False  # empty


def test_template_markers_include_plain_text_turn_headers(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Question: {{ m['content'] }}\n"
        "{% else %}### Answer: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    markers = template_markers(tokenizer)
    assert "### Question:" in markers and "### Answer:" in markers
    assert leaks_template("42\n### Question: what else?", markers)


def test_training_responses_are_the_trained_spans_of_the_prepared_rows(tiny_model, chat_data):
    from transformers import AutoTokenizer

    from sftlab.config import DataConfig
    from sftlab.data import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare_data(DataConfig(train=str(chat_data["train"]), eval_split=0), tokenizer)
    assert set(trained_responses(tokenizer, data.train)) == {f"{i} plus {i} is {2 * i}." for i in range(48)}


def test_held_out_loss_counts_only_trained_tokens(tiny_model):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = [[5, 17, 33, 60, 71, 90, 12], [8, 9, 10, 11]]
    masks = [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1]]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})
    result = trained_token_loss(model, rows)
    expected_sum, count = 0.0, 0
    for row, mask in zip(ids, masks):
        labels = torch.tensor([token if bit else -100 for token, bit in zip(row, mask)])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row]), labels=labels[None]).loss.item()
        trained = sum(mask[1:])
        expected_sum, count = expected_sum + loss * trained, count + trained
    assert result["tokens"] == count == 5
    assert result["loss"] == pytest.approx(expected_sum / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    untrained = datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": [[0] * 7, [0] * 4]})
    assert trained_token_loss(model, untrained) == {"loss": None, "perplexity": None, "tokens": 0}


def sftlab(*args):
    command = [sys.executable, "-m", "sftlab.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)
