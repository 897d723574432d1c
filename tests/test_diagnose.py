"""The diagnosis on synthetic curves: each warning sign is found, healthy noisy curves are not flagged.

Curves are seeded numpy series shaped like real SFT runs: an exponential decay of the train
loss with multiplicative noise, logged every `logging_steps`, an eval loss a little above it
at each evaluation, grad norms with log-normal noise, and a warmup-then-linear-decay schedule.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sftlab.diagnose import ADVICE, PHASES, Diagnosis, Finding, diagnose, read_history
from sftlab.errors import UserError

# --------------------------------------------------------------------------- synthetic runs


def decay(steps, start=2.2, floor=0.6, tau=150.0):
    return floor + (start - floor) * np.exp(-np.asarray(steps, dtype=float) / tau)


def make_run(train, eval_=None, *, steps=None, eval_every=5, grad=None, lr=None, seed=0, summary=True):
    """Records in sftlab's metrics.jsonl shape: a train record per log, a separate eval record per evaluation."""
    rng = np.random.default_rng(seed)
    n = len(train)
    steps = [int(s) for s in (steps if steps is not None else range(10, 10 * n + 1, 10))]
    if grad is None:
        grad = 0.8 * np.exp(rng.normal(0, 0.3, n))
    if lr is None:
        peak, warm = 2e-4, max(1, n // 10)
        lr = [peak * (i + 1) / warm if i < warm else peak * (n - i) / (n - warm) for i in range(n)]
    records = []
    for i, step in enumerate(steps):
        records.append(
            {
                "step": step,
                "epoch": round(step / (10 * n), 4),
                "loss": float(train[i]),
                "grad_norm": float(grad[i]),
                "learning_rate": float(lr[i]),
                "num_tokens": 1000.0 * step,
            }
        )
        if eval_ is not None and (i + 1) % eval_every == 0:
            value = eval_[(i + 1) // eval_every - 1]
            records.append(
                {"step": step, "epoch": round(step / (10 * n), 4), "eval_loss": float(value), "eval_runtime": 1.2}
            )
    if summary:
        records.append({"step": steps[-1], "train_runtime": 100.0, "train_loss": float(np.mean(train)), "epoch": 1.0})
    return records


def noisy(values, rel, seed):
    rng = np.random.default_rng(seed)
    return np.asarray(values) * np.exp(rng.normal(0, rel, len(values)))


def healthy_run(n=200, seed=0, noise=0.05, eval_every=10, tau=150.0, gap=0.06):
    steps = np.arange(10, 10 * n + 1, 10)
    train = noisy(decay(steps, tau=tau), noise, seed)
    eval_steps = steps[eval_every - 1 :: eval_every]
    eval_ = noisy(decay(eval_steps, tau=tau) + gap, 0.005, seed + 1)
    return make_run(train, eval_, steps=steps, eval_every=eval_every, seed=seed)


def warnings_of(diagnosis: Diagnosis) -> set[str]:
    return {f.code for f in diagnosis.findings if f.severity in {"warning", "error"}}


def finding(diagnosis: Diagnosis, code: str) -> Finding:
    return next(f for f in diagnosis.findings if f.code == code)


# --------------------------------------------------------------------------- healthy runs are not flagged


@pytest.mark.parametrize("seed", range(5))
def test_a_healthy_noisy_run_is_healthy(seed):
    diagnosis = diagnose(healthy_run(seed=seed, noise=0.06))
    assert warnings_of(diagnosis) == set()
    assert "healthy" in diagnosis.codes()
    assert finding(diagnosis, "healthy").severity == "info"


@pytest.mark.parametrize("seed", range(5))
def test_benign_spikes_that_recover_are_not_instability(seed):
    records = healthy_run(seed=seed, noise=0.08)
    train = [r for r in records if "loss" in r]
    rng = np.random.default_rng(seed)
    for index in rng.choice(np.arange(20, 190), size=3, replace=False):  # three one-log spikes of +60% to +120%
        train[index]["loss"] *= 1.6 + 0.6 * rng.random()
        train[index]["grad_norm"] *= 4  # the grad norm blips with it, below an explosion
    diagnosis = diagnose(records)
    assert "instability" not in diagnosis.codes()
    assert warnings_of(diagnosis) == set()
    assert "healthy" in diagnosis.codes()


@pytest.mark.parametrize("evals", [2, 3])
def test_a_short_run_with_two_or_three_evaluations_is_healthy(evals):
    steps = np.arange(5, 5 * 12 + 1, 5)  # 12 logs, logging_steps=5
    train = noisy(decay(steps, start=1.9, floor=0.9, tau=25), 0.05, 3)
    eval_steps = steps[12 // evals - 1 :: 12 // evals]
    eval_ = decay(eval_steps, start=1.9, floor=0.95, tau=25)
    records = make_run(train, eval_, steps=steps, eval_every=12 // evals)
    diagnosis = diagnose(records)
    assert warnings_of(diagnosis) == set()
    assert "healthy" in diagnosis.codes()


def simulated_run(seed, total=1000, log_every=1, eval_every=20, warmup=50, sigma=0.3):
    """Per-step losses with multiplicative noise under warmup + linear decay; each log averages its steps."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, total + 1)
    lr = np.where(steps <= warmup, steps / max(warmup, 1), 1 - (steps - warmup) / (total - warmup + 1))
    progress = np.cumsum(lr)
    clean = 0.8 + 1.6 * np.exp(-progress / (0.15 * progress[-1]))
    per_step = clean * np.exp(rng.normal(0, sigma, total))
    grad = (0.5 + 3 * np.exp(-progress / 100)) * np.exp(rng.normal(0, 0.4, total))
    records = []
    for s in range(log_every, total + 1, log_every):
        records.append(
            {
                "step": s,
                "loss": float(per_step[s - log_every : s].mean()),
                "grad_norm": float(grad[s - 1]),
                "learning_rate": float(2e-4 * lr[s - 1]),
            }
        )
        if s % eval_every == 0:
            records.append({"step": s, "eval_loss": float((clean[s - 1] + 0.05) * np.exp(rng.normal(0, 0.004)))})
    return records


@pytest.mark.parametrize("seed, log_every, sigma", [(0, 1, 0.3), (1, 1, 0.5), (2, 5, 0.3), (3, 10, 0.15)])
def test_very_noisy_per_step_logging_is_healthy_at_every_evaluation(seed, log_every, sigma):
    records = simulated_run(seed, log_every=log_every, sigma=sigma)
    ends = [i for i, r in enumerate(records) if "eval_loss" in r]
    for end in ends[:8] + ends[8::6] + ends[-1:]:  # as the live diagnosis sees it, at evaluations
        diagnosis = diagnose(records[: end + 1])
        assert warnings_of(diagnosis) == set(), (records[end]["step"], diagnosis.render())
    assert "healthy" in diagnose(records).codes()


def test_a_long_run_logged_every_step_does_not_drift_into_divergence():
    # 2000 logs of +-50% noise: the lowest of hundreds of noisy medians sits far below the level by chance
    records = simulated_run(1, total=2000, log_every=1, sigma=0.5, eval_every=100)
    assert warnings_of(diagnose(records)) == set()


def test_a_slow_but_real_improvement_hidden_in_noise_is_not_underfitting():
    train = noisy(np.linspace(2.0, 1.77, 40), 0.15, 0)  # -11.5% under +-15% noise: too noisy to say "no improvement"
    assert "underfitting" not in diagnose(make_run(train, lr=np.full(40, 1e-4))).codes()


def test_a_sharp_drop_within_the_first_log_counts_as_improvement():
    steps = np.arange(10, 610, 10)
    train = noisy(np.r_[2.6, 1.25 - 0.05 * np.arange(59) / 59], 0.02, 21)  # the drop happened inside the first log
    diagnosis = diagnose(make_run(train, steps=steps))
    assert "underfitting" not in diagnosis.codes()


def test_a_run_at_its_first_evaluation_says_nothing_alarming():
    records = make_run([2.3, 2.1, 1.7, 1.5], [1.6], eval_every=4, summary=False)
    diagnosis = diagnose(records)
    assert diagnosis.phase == "initial_sharp_drop"
    assert warnings_of(diagnosis) == set()


def test_a_run_without_eval_says_overfitting_cannot_be_checked():
    steps = np.arange(10, 1010, 10)
    diagnosis = diagnose(make_run(noisy(decay(steps), 0.05, 1), steps=steps))
    assert diagnosis.codes() == {"no_eval_data"}
    assert finding(diagnosis, "no_eval_data").severity == "info"


def test_no_records_means_not_started():
    diagnosis = diagnose([])
    assert diagnosis.phase == "not_started"
    assert diagnosis.findings == []
    assert "not started" in diagnosis.render()


# --------------------------------------------------------------------------- overfitting


def test_overfitting_eval_u_shape_while_train_falls():
    steps = np.arange(10, 2010, 10)
    train = noisy(decay(steps, floor=0.2, tau=300), 0.05, 4)
    eval_steps = steps[9::10]
    eval_ = 0.9 + 0.5 * np.exp(-eval_steps / 250) + 0.00025 * np.maximum(eval_steps - 600, 0)  # min ~1.0 near step 700
    diagnosis = diagnose(make_run(train, noisy(eval_, 0.005, 5), steps=steps, eval_every=10))
    over = finding(diagnosis, "overfitting")
    assert over.severity in {"warning", "error"}
    assert "eval loss rose" in over.evidence
    assert over.steps[1] == 2000 and 400 <= over.steps[0] <= 1200
    assert "healthy" not in diagnosis.codes() and "instability" not in diagnosis.codes()


def test_eval_rising_while_a_noisy_train_loss_holds_is_overfitting():
    steps = np.arange(10, 1010, 10)
    train = noisy(np.full(100, 0.9), 0.12, 0)  # converged, noisy: not rising
    evals = 1.0 + 0.0003 * np.maximum(steps[9::10] - 400, 0)
    assert "overfitting" in diagnose(make_run(train, evals, steps=steps, eval_every=10)).codes()


def test_a_large_eval_rise_is_an_error_a_small_one_a_warning():
    train = np.linspace(1.5, 0.5, 40)
    small = [1.2, 1.0, 0.9, 0.85, 0.9, 0.92, 0.93, 0.94]  # +10.6% above the minimum
    large = [1.2, 1.0, 0.9, 0.85, 0.95, 1.05, 1.15, 1.25]  # +47%
    assert finding(diagnose(make_run(train, small)), "overfitting").severity == "warning"
    assert finding(diagnose(make_run(train, large)), "overfitting").severity == "error"


def test_one_higher_eval_point_is_not_overfitting():
    steps = np.arange(10, 410, 10)
    train = noisy(0.9 + 0.6 * np.exp(-steps / 100), 0.03, 20)
    evals = 0.93 + 0.6 * np.exp(-steps[4::5] / 100)
    evals[-1] = evals[-2] * 1.05  # only the last evaluation is up
    diagnosis = diagnose(make_run(train, evals, steps=steps))
    assert "overfitting" not in diagnosis.codes()


def test_eval_falling_somewhat_more_slowly_than_train_is_not_overfitting():
    steps = np.arange(10, 1010, 10)
    train = noisy(np.linspace(1.6, 0.7, 100), 0.02, 25)
    evals = np.linspace(1.6, 1.05, 100)[9::10]  # 60% of train's pace: slower, not "significantly slower"
    diagnosis = diagnose(make_run(train, evals, steps=steps, eval_every=10))
    assert "overfitting" not in diagnosis.codes()


def test_overfitting_by_a_widening_gap():
    steps = np.arange(10, 2010, 10)
    train = noisy(decay(steps, start=2.0, floor=0.1, tau=700), 0.04, 6)  # falls steeply all run long
    eval_steps = steps[9::10]
    eval_ = 1.45 + 0.45 * np.exp(-eval_steps / 200)  # quickly flat: falls much more slowly than train
    diagnosis = diagnose(make_run(train, noisy(eval_, 0.004, 7), steps=steps, eval_every=10))
    over = finding(diagnosis, "overfitting")
    assert over.severity == "warning"
    assert "gap widened" in over.evidence
    assert "healthy" not in diagnosis.codes()


# --------------------------------------------------------------------------- underfitting


def test_underfitting_flat_noisy_loss():
    steps = np.arange(10, 1010, 10)
    train = noisy(np.full(100, 2.1), 0.05, 8)
    evals = noisy(np.full(10, 2.15), 0.005, 9)
    diagnosis = diagnose(make_run(train, evals, steps=steps, eval_every=10))
    under = finding(diagnosis, "underfitting")
    assert under.severity == "warning"
    assert any("learning rate" in line for line in under.advice)
    assert "healthy" not in diagnosis.codes() and "overfitting" not in diagnosis.codes()


def test_eight_flat_logs_are_too_few_to_call_underfitting():
    records = make_run(noisy(np.full(8, 2.1), 0.03, 22), lr=np.full(8, 1e-4))
    assert "underfitting" not in diagnose(records).codes()


def test_a_flat_loss_right_after_a_long_warmup_is_not_underfitting_yet():
    lr = np.r_[np.linspace(1e-5, 2e-4, 20), np.full(10, 2e-4)]  # warmup to step 200, now at step 300
    records = make_run(noisy(np.full(30, 2.1), 0.03, 23), lr=lr)
    assert "underfitting" not in diagnose(records).codes()
    longer = make_run(noisy(np.full(60, 2.1), 0.03, 23), lr=np.r_[lr, np.full(30, 2e-4)])  # as long again at full rate
    assert "underfitting" in diagnose(longer).codes()


def test_a_flat_loss_during_warmup_is_not_underfitting():
    train = noisy(np.full(8, 2.1), 0.03, 10)
    lr = np.linspace(1e-5, 8e-5, 8)  # still rising
    diagnosis = diagnose(make_run(train, lr=lr))
    assert "underfitting" not in diagnosis.codes()


# --------------------------------------------------------------------------- memorization


def test_memorization_when_train_is_near_zero_and_eval_high():
    steps = np.arange(10, 2010, 10)
    train = noisy(0.001 + 1.8 * np.exp(-steps / 120), 0.05, 11)
    eval_ = noisy(1.2 + 0.6 * np.exp(-steps[9::10] / 150), 0.004, 12)
    diagnosis = diagnose(make_run(train, eval_, steps=steps, eval_every=10))
    memo = finding(diagnosis, "memorization")
    assert memo.severity == "warning"
    assert "eval loss" in memo.evidence
    assert "healthy" not in diagnosis.codes()


def test_low_loss_on_train_and_eval_is_at_most_info():
    steps = np.arange(10, 2010, 10)
    train = noisy(0.004 + 1.5 * np.exp(-steps / 100), 0.05, 13)
    eval_ = noisy(0.012 + 1.5 * np.exp(-steps[9::10] / 100), 0.01, 14)
    diagnosis = diagnose(make_run(train, eval_, steps=steps, eval_every=10))
    assert finding(diagnosis, "memorization").severity == "info"
    assert warnings_of(diagnosis) == set()
    assert "healthy" in diagnosis.codes()


def test_one_lucky_low_log_is_not_memorization():
    steps = np.arange(10, 1010, 10)
    train = noisy(0.3 + 1.5 * np.exp(-steps / 100), 0.03, 24)
    train[-1] = 0.03
    assert "memorization" not in diagnose(make_run(train, steps=steps)).codes()


def test_memorization_threshold_is_a_parameter():
    steps = np.arange(10, 1010, 10)
    train = noisy(0.08 + 1.5 * np.exp(-steps / 100), 0.03, 15)
    eval_ = 1.0 + 0.5 * np.exp(-steps[9::10] / 100)
    records = make_run(train, eval_, steps=steps, eval_every=10)
    assert "memorization" not in diagnose(records).codes()
    assert finding(diagnose(records, memorization_loss=0.1), "memorization").severity == "warning"


# --------------------------------------------------------------------------- instability


def test_a_non_finite_grad_norm_alone_is_an_error():
    records = healthy_run(n=60)
    [r for r in records if "loss" in r][30]["grad_norm"] = "inf"
    inst = finding(diagnose(records), "instability")
    assert inst.severity == "error" and "grad_norm is inf" in inst.evidence


@pytest.mark.parametrize("nan", [float("nan"), "nan", "inf", float("inf"), "-inf", "Infinity"])
def test_instability_by_nan_or_inf_loss_is_an_error(nan):
    records = healthy_run(n=60)
    train = [r for r in records if "loss" in r]
    for record in train[40:]:
        record["loss"] = nan
        record["grad_norm"] = "nan"
    diagnosis = diagnose(records)
    inst = finding(diagnosis, "instability")
    assert inst.severity == "error"
    assert inst.steps[0] == train[40]["step"]
    assert "non-finite" in inst.evidence
    assert diagnosis.findings[0] is inst  # errors first
    assert "healthy" not in diagnosis.codes()


def test_instability_by_a_spike_that_does_not_recover():
    steps = np.arange(10, 1510, 10)
    base = decay(steps, tau=200)
    base[100:] *= 3.0  # the loss jumps at step 1010 and stays up
    diagnosis = diagnose(
        make_run(
            noisy(base, 0.04, 16),
            steps=steps,
            eval_every=10,
            eval_=decay(steps[9::10], tau=200) * np.where(steps[9::10] >= 1010, 3.0, 1.0) + 0.05,
        )
    )
    inst = finding(diagnosis, "instability")
    assert inst.severity == "warning"
    assert 990 <= inst.steps[0] <= 1010
    assert "at step 1010" in inst.evidence and "did not recover" in inst.evidence
    assert "overfitting" not in diagnosis.codes()  # eval rises because the run broke, not because it overfits
    assert "underfitting" not in diagnosis.codes()  # no improvement because the run broke


def test_instability_by_gradual_divergence():
    steps = np.arange(10, 1510, 10)
    base = decay(steps, tau=150)
    base[60:] += np.linspace(0, 1.2, 90)  # climbs steadily after step 600
    diagnosis = diagnose(make_run(noisy(base, 0.04, 17), steps=steps))
    inst = finding(diagnosis, "instability")
    assert "rose" in inst.evidence and inst.severity == "warning"


def test_instability_by_grad_norm_explosion():
    records = healthy_run(n=100)
    train = [r for r in records if "loss" in r]
    for k, record in enumerate(train[70:75]):
        record["grad_norm"] = 40.0 * 3**k  # 40, 120, 360, ... against a median near 0.8
    diagnosis = diagnose(records)
    inst = finding(diagnosis, "instability")
    assert "grad_norm" in inst.evidence and inst.steps[0] == train[70]["step"]
    assert "healthy" not in diagnosis.codes()


def test_one_isolated_grad_norm_blip_is_not_instability():
    records = healthy_run(n=100)
    [r for r in records if "loss" in r][50]["grad_norm"] = 15.0  # ~19x once, clipped
    assert "instability" not in diagnose(records).codes()


def test_frequent_spikes_are_instability_even_when_each_recovers():
    steps = np.arange(10, 1010, 10)
    train = noisy(decay(steps, tau=200), 0.03, 18)
    train[10::12] *= 2.0  # a spike every 12 logs
    diagnosis = diagnose(make_run(train, steps=steps))
    assert "frequent" in finding(diagnosis, "instability").evidence


def test_a_spike_at_the_last_log_is_pending_not_flagged():
    records = healthy_run(n=100)
    [r for r in records if "loss" in r][-1]["loss"] *= 3
    assert "instability" not in diagnose(records).codes()


# --------------------------------------------------------------------------- inconsistent format


def samples_for(shares, per_eval=4, every=100, follows=None):
    samples = []
    for k, share in enumerate(shares):
        good = round(share * per_eval)
        for i in range(per_eval):
            samples.append(
                {
                    "step": every * (k + 1),
                    "prompt": f"p{i}",
                    "output": "x",
                    "ends_with_end_of_turn": i < good,
                    "follows_format": follows,
                }
            )
    return samples


def test_inconsistent_format_when_the_share_falls():
    records = healthy_run()
    diagnosis = diagnose(records, samples_for([0.5, 1, 1, 1, 0.75, 0.5, 0.25]))
    fmt = finding(diagnosis, "inconsistent_format")
    assert fmt.severity == "warning" and "fell from 100%" in fmt.evidence
    assert any("chat template" in line for line in fmt.advice)
    assert "healthy" not in diagnosis.codes()


def test_inconsistent_format_when_the_share_swings():
    diagnosis = diagnose(healthy_run(), samples_for([0.25, 1, 0.25, 1, 0.5, 1]))
    assert "unstable" in finding(diagnosis, "inconsistent_format").evidence


def test_format_counts_follows_format_false_as_a_failure():
    samples = samples_for([1, 1, 1, 1, 1])
    for sample in samples[-8:]:
        sample["follows_format"] = False
    assert "inconsistent_format" in diagnose(healthy_run(), samples).codes()


@pytest.mark.parametrize(
    "shares",
    [
        [1, 1, 1, 1, 1, 1],
        [0, 0.25, 0.5, 0.75, 1, 1],  # learning to stop: rising, not inconsistent
        [1, 0.75, 1, 0.75, 1, 0.75],  # one prompt of four flipping
        [1, 1, 1, 0.75, 0.75],  # one prompt of four lost: within noise
        [0.25, 0.75, 0.5, 1, 0.75, 1],  # uneven but rising
        [1, 1, 0.5],  # one low evaluation: not enough evidence yet
    ],
)
def test_a_consistent_or_improving_format_is_not_flagged(shares):
    diagnosis = diagnose(healthy_run(), samples_for(shares, follows=True))
    assert "inconsistent_format" not in diagnosis.codes()
    assert "healthy" in diagnosis.codes()


# --------------------------------------------------------------------------- phases


def phase_of(tau, n=200, seed=19, noise=0.03):
    steps = np.arange(10, 10 * n + 1, 10)
    return diagnose(make_run(noisy(decay(steps, tau=tau), noise, seed), steps=steps)).phase


def test_phases():
    assert phase_of(tau=2500) == "initial_sharp_drop"  # the run spans under one time constant
    assert phase_of(tau=800) == "gradual_stabilization"  # about 2.5 time constants
    assert phase_of(tau=250) == "converged"  # eight time constants
    assert set(PHASES) == {"initial_sharp_drop", "gradual_stabilization", "converged"}


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_converged_curve_is_converged(seed):
    assert phase_of(tau=250, seed=seed, noise=0.1) == "converged"  # noise alone is no "still falling"


def test_the_first_logs_of_a_falling_curve_are_not_converged():
    assert diagnose(make_run([1.28, 0.50, 0.12, 0.08], steps=[5, 10, 15, 20])).phase == "initial_sharp_drop"
    # 7 logs that are all trend: their log-to-log differences are no measure of noise
    assert diagnose(make_run([2.0, 1.3, 0.9, 0.5, 0.45, 0.3, 0.28])).phase == "gradual_stabilization"


# --------------------------------------------------------------------------- robustness of the input


def test_odd_values_do_not_crash():
    records = healthy_run(n=50)
    records += [
        {"step": 999, "loss": "oops"},
        {"loss": 1.0},
        {"step": None, "eval_loss": 1.0},
        "not a dict",
        {"step": 1000, "grad_norm": None, "learning_rate": True},
        {"step": "x", "loss": 1.0},
    ]
    diagnose(records, samples=[{"step": 1}, "bad", {"step": 2, "ends_with_end_of_turn": "yes"}])


def test_end_of_run_summary_is_ignored():
    records = healthy_run()
    records.append({"step": 2000, "train_runtime": 5.0, "train_loss": 50.0, "loss": 50.0})
    assert warnings_of(diagnose(records)) == set()


# --------------------------------------------------------------------------- the JSON contract and the terminal form


def test_json_contract():
    records = healthy_run()
    records[100]["loss"] = "nan"
    payload = diagnose(records, samples_for([1, 1, 0.25, 0.25])).to_json()
    json.dumps(payload)  # serializable as is
    assert set(payload) == {"phase", "findings"}
    assert payload["phase"] in PHASES + ("not_started",)
    assert payload["findings"]
    for item in payload["findings"]:
        assert set(item) == {"code", "severity", "steps", "evidence", "advice"}
        assert item["code"] in {
            "overfitting",
            "underfitting",
            "memorization",
            "instability",
            "inconsistent_format",
            "healthy",
            "no_eval_data",
        }
        assert item["severity"] in {"info", "warning", "error"}
        assert isinstance(item["steps"], list) and len(item["steps"]) == 2
        assert all(type(s) is int for s in item["steps"]) and item["steps"][0] <= item["steps"][1]
        assert isinstance(item["evidence"], str) and item["evidence"]
        assert isinstance(item["advice"], list) and all(isinstance(a, str) for a in item["advice"])
    assert {f["code"] for f in payload["findings"]} == {"instability", "inconsistent_format"}


def test_render_is_short_and_plain():
    diagnosis = diagnose(healthy_run(), samples_for([1, 1, 0.25, 0.25]))
    text = diagnosis.render()
    lines = text.splitlines()
    assert lines[0].startswith("phase: converged")
    assert lines[1].startswith("WARNING inconsistent_format (steps 100-400): ")
    assert lines[2].startswith("  - Check the chat template")  # the first remedies, the rest in --json
    assert len(lines) == 4
    assert "\x1b" not in text and "[/" not in text  # plain text, no ANSI or rich markup
    healthy = diagnose(healthy_run()).render().splitlines()
    assert len(healthy) == 2 and healthy[1].startswith("INFO healthy")


# --------------------------------------------------------------------------- read_history


def write_jsonl(path, rows, cut_last=False):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if cut_last:
        text += json.dumps({"step": 9999, "loss": 1.0})[:12]  # a line cut by a kill
    path.write_text(text)


def test_read_a_metrics_jsonl_with_a_truncated_last_line(tmp_path):
    records = healthy_run(n=40)
    write_jsonl(tmp_path / "metrics.jsonl", records, cut_last=True)
    got, samples = read_history(tmp_path / "metrics.jsonl")
    assert got == records and samples == []


def test_read_a_run_directory_with_samples(tmp_path):
    records, samples = healthy_run(n=40), samples_for([1, 1, 0.25, 0.25])
    write_jsonl(tmp_path / "metrics.jsonl", records)
    write_jsonl(tmp_path / "samples_during_training.jsonl", samples, cut_last=True)
    (tmp_path / "trainer_state.json").write_text("{}")  # metrics.jsonl wins over a stray state file
    got, got_samples = read_history(tmp_path)
    assert got == records and got_samples == samples
    assert "inconsistent_format" in diagnose(got, got_samples).codes()
    assert read_history(tmp_path / "metrics.jsonl") == (records, samples)  # the file itself finds its samples too


def test_read_an_empty_metrics_file_of_a_run_that_just_started(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    records, samples = read_history(tmp_path)
    assert records == [] and samples == []
    assert diagnose(records, samples).phase == "not_started"


def trainer_state(n=100, overfit=False):
    """log_history exactly as transformers writes it (train logs, eval logs, the final summary)."""
    history = []
    for i in range(1, n + 1):
        step = 10 * i
        history.append(
            {
                "epoch": round(step / 500, 4),
                "grad_norm": 0.7 + 0.1 * math.sin(i),
                "learning_rate": 2e-4 * (1 - i / n),
                "loss": round(0.6 + 1.6 * math.exp(-step / 150), 4),
                "step": step,
            }
        )
        if i % 10 == 0:
            eval_loss = 0.66 + 1.6 * math.exp(-step / 150) + (0.0004 * max(0, step - 400) if overfit else 0)
            history.append(
                {
                    "epoch": round(step / 500, 4),
                    "eval_loss": eval_loss,
                    "eval_runtime": 1.5,
                    "eval_samples_per_second": 60.0,
                    "eval_steps_per_second": 8.0,
                    "step": step,
                }
            )
    history.append(
        {
            "epoch": 2.0,
            "step": 10 * n,
            "total_flos": 1.0e15,
            "train_loss": 0.8,
            "train_runtime": 120.0,
            "train_samples_per_second": 30.0,
            "train_steps_per_second": 0.9,
        }
    )
    return {"best_metric": None, "epoch": 2.0, "global_step": 10 * n, "log_history": history, "max_steps": 10 * n}


def test_read_a_trainer_state_json(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps(trainer_state(overfit=True)))
    records, samples = read_history(tmp_path / "trainer_state.json")
    assert len(records) == 111 and samples == []
    assert "overfitting" in diagnose(records).codes()
    records, _ = read_history(tmp_path)  # a checkpoint directory
    assert len(records) == 111


def test_read_a_transformers_output_dir_uses_the_latest_checkpoint(tmp_path):
    for step, n in ((500, 50), (1000, 100)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(trainer_state(n=n)))
    records, _ = read_history(tmp_path)
    assert max(r["step"] for r in records) == 1000
    assert "healthy" in diagnose(records).codes()


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: d / "missing", "no such file"),
        (lambda d: d, "no metrics.jsonl or trainer_state.json"),
        (lambda d: (d / "state.json").write_text("{not json") and d / "state.json", "invalid JSON"),
        (lambda d: (d / "state.json").write_text('{"global_step": 3}') and d / "state.json", "no log_history"),
        (lambda d: (d / "m.jsonl").write_text("garbage\nmore garbage\n") and d / "m.jsonl", "no JSON object"),
        (lambda d: (d / "run.csv").write_text("a,b\n") and d / "run.csv", "unsupported file type"),
        (lambda d: (d / "metrics.jsonl").write_bytes(b"\xff\xfe\x00bad") and d / "metrics.jsonl", "not a text file"),
    ],
)
def test_read_history_errors_name_the_file(tmp_path, setup, fragment):
    path = setup(tmp_path)
    with pytest.raises(UserError) as caught:
        read_history(path)
    assert str(path) in caught.value.message and fragment in caught.value.message
    assert caught.value.exit_code == 2


# --------------------------------------------------------------------------- issue 16: what real logs showed


def test_a_short_run_that_ends_far_above_its_start_is_instability_not_converged():
    # 1.6 -> 10.4 and staying there, in 9 logs: too few for the smoothed divergence rule, and flat at the end.
    diagnosis = diagnose(make_run([1.6, 1.55, 1.7, 3.2, 6.4, 9.9, 10.4, 10.3, 10.5], steps=range(5, 50, 5)))
    inst = finding(diagnosis, "instability")
    assert inst.severity == "warning" and "diverged" in inst.evidence and inst.steps[0] == 20
    assert diagnosis.phase == "diverging"


def test_a_run_that_comes_back_below_its_start_is_not_called_diverged():
    diagnosis = diagnose(make_run([1.6, 1.55, 1.7, 3.2, 6.4, 2.0, 1.4, 1.3, 1.2], steps=range(5, 50, 5)))
    assert diagnosis.phase != "diverging" and "diverged" not in " ".join(f.evidence for f in diagnosis.findings)


def epochs_run(losses, epochs: float) -> list[dict]:
    records = make_run(losses)
    for record in records:
        record["epoch"] = round(epochs * record["step"] / records[-1]["step"], 4)
    return records


def test_memorization_is_relative_to_where_the_run_started():
    # 25 epochs take a chat set from 5.7 to 0.057 (1% of its start), above the absolute threshold of 0.05.
    losses = noisy(0.057 + 5.65 * np.exp(-np.arange(100) / 12), 0.03, 40)
    memo = finding(diagnose(epochs_run(losses, 25.0)), "memorization")
    assert memo.severity == "warning" and "of its start" in memo.evidence and "25 epochs" in memo.evidence
    # the same fall within one epoch is an easy target, not a memorized one
    assert "memorization" not in diagnose(epochs_run(losses, 1.0)).codes()
    # and a long run that keeps a tenth of its start is not memorization either
    kept_a_tenth = noisy(0.6 + 5.0 * np.exp(-np.arange(100) / 12), 0.03, 41)
    assert "memorization" not in diagnose(epochs_run(kept_a_tenth, 15.0)).codes()


def test_a_loss_of_exactly_zero_from_the_start_is_its_own_finding_not_memorization():
    records = make_run(np.zeros(50), grad=np.zeros(50))
    diagnosis = diagnose(records)
    zero = finding(diagnosis, "zero_loss")
    assert zero.severity == "error" and "nothing is being trained" in zero.evidence
    assert "masking" in zero.evidence and zero.advice == list(ADVICE["zero_loss"])
    assert "memorization" not in diagnosis.codes() and "healthy" not in diagnosis.codes()
    # a loss that falls to zero late has trained something first: memorization, not zero_loss
    late = diagnose(make_run(np.concatenate([np.linspace(2.0, 0.1, 30), np.zeros(20)])))
    assert "zero_loss" not in late.codes() and "memorization" in late.codes()


def test_grad_norm_blips_while_the_loss_sits_near_zero_are_not_instability():
    losses = noisy(np.full(100, 0.001), 0.2, 42)
    grad = noisy(np.full(100, 0.06), 0.2, 43)
    grad[[40, 41, 70]] = [1.1, 0.9, 1.1]  # 18x the median, twice in a row, three times
    assert "instability" not in diagnose(make_run(losses, grad=grad)).codes()
    # the same blips while the model still learns (loss ~1) are an explosion
    assert "instability" in diagnose(make_run(noisy(np.full(100, 1.0), 0.05, 44), grad=grad)).codes()


def test_eval_loss_nan_while_training_stays_finite_is_reported():
    records = healthy_run(n=60)
    evals = [r for r in records if "eval_loss" in r]
    evals[-1]["eval_loss"] = "nan"
    inst = finding(diagnose(records), "instability")
    assert inst.severity == "error" and f"eval_loss is nan at step {evals[-1]['step']}" in inst.evidence
    assert "train loss and grad_norm stay finite" in inst.evidence
    assert inst.advice[0] == ADVICE["eval_non_finite"][0]


# --------------------------------------------------------------------------- issue 15: the Diagnosis model


def test_diagnosis_json_keeps_its_keys_and_reads_back(tmp_path):
    from sftlab.diagnose import read_diagnosis, write_diagnosis

    diagnosis = diagnose(trainer_state(overfit=True)["log_history"])
    assert "overfitting" in diagnosis.codes()
    write_diagnosis(tmp_path, diagnosis)
    saved = json.loads((tmp_path / "diagnosis.json").read_text(encoding="utf-8"))
    assert list(saved) == ["phase", "findings"]
    assert all(list(item) == ["code", "severity", "steps", "evidence", "advice"] for item in saved["findings"])
    assert not list(tmp_path.glob("*.tmp"))  # written through rundir's atomic writer
    back = read_diagnosis(tmp_path)
    assert back.to_json() == diagnosis.to_json() and back.codes() == diagnosis.codes()


@pytest.mark.parametrize(
    "saved",
    [
        None,
        [],
        "x",
        {"findings": "x"},
        {"phase": 3, "findings": [1, {"steps": [1]}]},
        {"findings": [{"steps": ["a", None], "advice": "x"}]},
    ],
)
def test_a_damaged_diagnosis_json_reads_leniently(tmp_path, saved):
    from sftlab.diagnose import read_diagnosis

    (tmp_path / "diagnosis.json").write_text(json.dumps(saved), encoding="utf-8")
    diagnosis = read_diagnosis(tmp_path)
    if not isinstance(saved, dict):
        assert diagnosis is None
        return
    assert isinstance(diagnosis.phase, str)
    for finding in diagnosis.findings:  # steps that are not two integers read as (0, 0), never raise
        assert finding.steps == (0, 0) and finding.advice == []
    assert diagnosis.render().startswith("phase: ")


def test_a_finding_is_built_positionally_or_by_name():
    by_position = Finding("overfitting", "warning", (10, 50), "eval loss rose", ["a"])
    assert by_position == Finding(
        code="overfitting", severity="warning", steps=(10, 50), evidence="eval loss rose", advice=["a"]
    )
    assert Finding("x", "info", (np.int64(3), np.int64(4)), "", []).to_json()["steps"] == [3, 4]
