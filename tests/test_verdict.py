"""The verdict: paired bootstrap, the decision rules, the plain-words headline, and on the tiny model the
three outcomes a user meets (worked, prompting_suffices, regressed); user metrics end to end."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import sftlab_in_process, tiny_config_file, write_jsonl
from sftlab.config import load_config
from sftlab.diagnose import Finding
from sftlab.evaluate import AFTER_FILE, BEFORE_FILE, EVAL_DIR, PROMPTED_FILE, VERDICT_FILE
from sftlab.train import train
from sftlab.verdict import caveats, decide, paired_bootstrap

HOUSE_FORMAT = r"ANSWER: \d+"
HOUSE_METRIC = """
import re


def score(answer, reference, prompt):
    return re.fullmatch(r"ANSWER: \\d+", answer.strip()) is not None
"""


# =========================================================================== the statistics


def test_the_bootstrap_interval_matches_scipys_on_a_fixed_paired_sample():
    from scipy import stats

    rng = np.random.default_rng(7)
    tuned = (rng.random(80) < 0.6).astype(float)
    other = np.where(rng.random(80) < 0.7, tuned, 1 - tuned)  # paired: mostly the same prompts right and wrong
    ours = paired_bootstrap(list(tuned), list(other), seed=3)
    reference = stats.bootstrap(
        (tuned, other),
        lambda a, b, axis=-1: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(11),
    )
    assert ours.diff == pytest.approx(float(np.mean(tuned - other)), abs=1e-12)
    # Two Monte Carlo estimates of the same percentiles: within ~1/4 of the standard error of the mean.
    spread = float(np.std(tuned - other) / np.sqrt(80))
    assert ours.ci95[0] == pytest.approx(reference.confidence_interval.low, abs=0.25 * spread)
    assert ours.ci95[1] == pytest.approx(reference.confidence_interval.high, abs=0.25 * spread)


def test_the_bootstrap_is_seeded_and_a_constant_difference_has_no_spread():
    tuned, other = [1.0, 0.0, 1.0, 1.0, 0.0] * 6, [0.0, 0.0, 1.0, 0.0, 1.0] * 6
    assert paired_bootstrap(tuned, other, seed=5) == paired_bootstrap(tuned, other, seed=5)
    same = paired_bootstrap([0.5] * 10, [0.25] * 10)
    assert same.diff == pytest.approx(0.25) and same.ci95 == pytest.approx((0.25, 0.25))


def shares(count: int, right: int) -> list[float]:
    return [1.0] * right + [0.0] * (count - right)


@pytest.mark.parametrize(
    "base, prompted, tuned, expected",
    [
        (5, 6, 46, "worked"),  # better than both, far beyond the noise
        (5, 45, 46, "prompting_suffices"),  # prompting does as well
        (40, 41, 43, "no_gain"),  # within the noise of the base model
        (45, 10, 20, "regressed"),  # the tuned model lost what the base model could do
        (5, 45, 30, "regressed"),  # worse than simply prompting the base model
    ],
)
def test_the_decision_rules(base, prompted, tuned, expected):
    n = 50
    verdict = decide("initials", shares(n, tuned), shares(n, base), shares(n, prompted), [])
    assert verdict.verdict == expected
    assert verdict.tuned == pytest.approx(tuned / n) and verdict.base == pytest.approx(base / n)
    assert verdict.prompted == pytest.approx(prompted / n)
    assert verdict.reasons and verdict.headline.startswith(expected + ":")


def test_a_missing_comparison_is_said_and_nothing_to_compare_is_unknown():
    n = 40
    no_prompting = decide("format", shares(n, 30), shares(n, 2), None, [])
    assert no_prompting.verdict == "worked" and no_prompting.tuned_minus_prompted is None
    assert any("prompting was not compared" in caveat for caveat in no_prompting.caveats)
    only_prompted = decide("format", shares(n, 30), None, shares(n, 29), [])
    assert only_prompted.verdict == "prompting_suffices"
    assert decide("format", shares(n, 30), None, None, []).verdict == "unknown"


def test_the_headline_says_it_in_plain_words():
    n = 100
    tuned = shares(n, 46)
    prompted = [1.0] * 5 + [0.0] * 95
    verdict = decide("initials", tuned, shares(n, 1), prompted, [])
    low, high = verdict.tuned_minus_prompted.ci95
    assert verdict.headline.startswith(
        f"worked: 46% of answers pass `initials` against 5% for the prompted base model (+41 points, 95% CI "
        f"{low * 100:+.0f} to {high * 100:+.0f}), and 1% for the base model (+45 points"
    )
    graded = decide("rougeL", [0.6, 0.7, 0.65, 0.8] * 10, [0.1, 0.2, 0.15, 0.1] * 10, None, [])
    assert graded.kind == "score" and graded.headline.startswith("worked: ROUGE-L 0.688 against 0.138 for the base")


def test_caveats_name_forgetting_lost_chat_behaviour_copying_and_warning_signs():
    base = {"retention": {"loss": 2.0}, "adherence": {"chat": 0.9}, "memorization": {"verbatim_share": 0.0}}
    tuned = {"retention": {"loss": 2.3}, "adherence": {"chat": 0.6}, "memorization": {"verbatim_share": 0.4}}
    findings = [
        Finding("overfitting", "warning", (10, 50), "eval loss rose 20%", []),
        Finding("healthy", "info", (0, 50), "fine", []),
    ]
    found = caveats(base, tuned, findings)
    assert len(found) == 4
    assert "+15.0%" in found[0] and "60%" in found[1] and "40%" in found[2] and "overfitting" in found[3]
    assert caveats(base, base, []) == []


# =========================================================================== on the tiny model


def sums(count: int, seed: int, answer: str = "house") -> list[dict]:
    """Single-turn sums; the answer in the house format (`ANSWER: N`), in prose, or corrupted."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        text = {
            "house": f"ANSWER: {a + b}",
            "prose": f"the sum is {a + b}",
            "corrupted": " ".join(rng.choice(["lorem", "ipsum", "dolor", "sit"]) for _ in range(3)),
        }[answer]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": text},
                ]
            }
        )
    return rows


def in_context_rows(count: int, seed: int) -> list[dict]:
    """A base model that takes the format from context, as instruct models do: a question alone is
    mostly answered in prose; after earlier answers, in the format those answers used."""
    rng = random.Random(seed)
    rows = sums(count // 2, seed, "prose")
    for _ in range(count - len(rows)):
        style = rng.choice(["house", "prose"])
        messages = []
        for row in sums(rng.randint(2, 4), rng.randint(0, 10**6), style):
            messages += row["messages"]
        rows.append({"messages": messages})
    return rows


def task_config(tmp, model, train_rows, eval_rows, steps: int, **eval_settings) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return tiny_config_file(
        tmp / "config.yaml",
        model,
        write_jsonl(tmp / "train.jsonl", train_rows),
        write_jsonl(tmp / "eval.jsonl", eval_rows),
        training={
            "max_steps": steps,
            "per_device_train_batch_size": 8,
            "learning_rate": 3.0e-3,
            "warmup_ratio": 0,
            "logging_steps": 20,
            "eval_steps": steps,
            "save_steps": steps,
            "report_to": "none",
        },
        eval={
            "num_prompts": 24,
            "max_new_tokens": 10,
            "retention": False,
            "show_samples": 0,
            "format": {"type": "regex", "pattern": HOUSE_FORMAT},
            **eval_settings,
        },
        monitor={"plots": False, "sample_prompts": 0},
    )


def read(run_dir, name):
    return json.loads((run_dir / EVAL_DIR / name).read_text())


@pytest.fixture(scope="module")
def house_run(tmp_path_factory, tiny_model):
    """The tiny model (which knows no format) taught the house format, scored by a metric of the user's."""
    tmp = tmp_path_factory.mktemp("house")
    (tmp / "house_metric.py").write_text(HOUSE_METRIC, encoding="utf-8")
    config = task_config(
        tmp,
        tiny_model,
        sums(200, 0),
        sums(24, 1),
        steps=100,
        metrics=[{"name": "house", "function": f"{tmp / 'house_metric.py'}:score"}],
    )
    return train(load_config(config)).run_dir


def test_a_strict_format_the_base_model_cannot_follow_worked(house_run):
    verdict = read(house_run, VERDICT_FILE)
    assert verdict["verdict"] == "worked", verdict["headline"]
    assert verdict["primary"] == "house"  # the user's first metric is the primary one by default
    assert verdict["tuned"] > 0.8 and verdict["base"] == 0 and verdict["prompted"] == 0
    assert verdict["tuned_minus_prompted"]["ci95"][0] > 0
    assert verdict["headline"].startswith("worked:") and "of answers pass `house`" in verdict["headline"]


def test_the_user_metric_is_in_all_three_eval_files_and_the_report(house_run):
    from sftlab.report import write_report

    for name in (BEFORE_FILE, PROMPTED_FILE, AFTER_FILE):
        result = read(house_run, name)
        assert result["metrics"]["house"] == pytest.approx(result["adherence"]["format"])  # same rule, two ways
    assert read(house_run, PROMPTED_FILE)["prompting"] == {"shots": 3, "system_prompt": None}
    report = write_report(house_run)
    card = report.card.read_text(encoding="utf-8")
    assert "**Verdict: worked:" in card and "house (eval.metrics)" in card
    html = report.html.read_text(encoding="utf-8")
    assert 'class="verdict worked"' in html and "house (eval.metrics)" in html and "prompted base model" in html


def test_the_pipeline_gate_exits_1_unless_the_verdict_is_the_required_one(house_run):
    code, _, err = sftlab_in_process("eval", house_run, "--require", "prompting_suffices")
    assert code == 1 and "required verdict prompting_suffices, got worked" in err
    code, out, _ = sftlab_in_process("eval", house_run, "--require", "worked")
    assert code == 0 and "verdict: worked" in out
    code, _, err = sftlab_in_process("eval", house_run, "--require", "great")
    assert code == 2 and "not a verdict" in err


def test_training_on_corrupted_answers_regressed(tmp_path, house_run):
    """The house model (which follows the format) trained on corrupted answers loses it."""
    config = task_config(tmp_path, house_run / "final", sums(200, 2, "corrupted"), sums(24, 1), steps=60)
    verdict = read(train(load_config(config)).run_dir, VERDICT_FILE)
    assert verdict["verdict"] == "regressed", verdict["headline"]
    assert verdict["primary"] == "format" and verdict["base"] > 0.8 and verdict["tuned"] < 0.2


def test_a_task_the_few_shot_prompt_already_solves_is_prompting_suffices(tmp_path, tiny_model):
    base = train(
        load_config(
            task_config(
                tmp_path / "base",
                tiny_model,
                in_context_rows(400, 3),
                sums(24, 4, "prose"),
                steps=150,
                baseline=False,
                prompted_baseline=False,
            )
        )
    )
    config = task_config(tmp_path / "task", base.final_dir, sums(200, 5), sums(24, 1), steps=40)
    verdict = read(train(load_config(config)).run_dir, VERDICT_FILE)
    assert verdict["verdict"] == "prompting_suffices", verdict["headline"]
    assert verdict["base"] < 0.2 and verdict["prompted"] > 0.8 and verdict["tuned"] > 0.8


# =========================================================================== broken metrics


@pytest.mark.parametrize(
    "code, message",
    [
        (None, "no such file"),
        ("def other(a, b, c):\n    return 1\n", "the file has no function score"),
        ("def score(answer):\n    return 1\n", "cannot be called as score(answer, reference, prompt)"),
        ("def score(answer, reference, prompt):\n    return 1 / 0\n", "raised ZeroDivisionError"),
        ("def score(answer, reference, prompt):\n    return 3\n", "returned 3 on held-out prompt 1"),
        ("def score(answer, reference, prompt):\n    return 'yes'\n", "returned a str"),
        ("def score(answer, reference, prompt):\n    return float('nan')\n", "returned nan"),
        ("def score(answer, reference, prompt)\n    return 1\n", "importing the file failed: SyntaxError"),
        ("raise RuntimeError('metric setup')\n", "importing the file failed: RuntimeError: metric setup"),
    ],
)
def test_a_broken_metric_is_one_message_naming_it_and_its_file(tmp_path, tiny_config, code, message):
    metric = tmp_path / "broken_metric.py"
    if code is not None:
        metric.write_text(code, encoding="utf-8")
    exit_code, out, err = sftlab_in_process(
        "eval",
        "--config",
        tiny_config,
        "--set",
        "eval.num_prompts=2",
        "--set",
        "eval.max_new_tokens=2",
        "--set",
        "eval.retention=false",
        "--set",
        f"eval.metrics=[{{name: mine, function: {metric}:score}}]",
    )
    assert exit_code == 2, out + err
    assert err.startswith("error: eval.metrics mine (") and str(metric) in err and message in err
    assert "Traceback" not in err and "sftlab/" not in err.replace(str(metric), "")  # only the user's own frames
    if "ZeroDivisionError" in message:
        assert "return 1 / 0" in err  # the line of the user's code that failed


def test_metric_files_are_found_next_to_the_config_and_recorded_absolute(tmp_path, tiny_config, monkeypatch):
    (tmp_path / "house_metric.py").write_text(HOUSE_METRIC, encoding="utf-8")
    monkeypatch.chdir(tmp_path.parent)  # not where the metric file is: it is found next to the config
    cfg = load_config(tiny_config, ["eval.metrics=[{name: house, function: house_metric.py:score}]"])
    assert cfg.eval.metrics[0].function == f"{tmp_path / 'house_metric.py'}:score"
