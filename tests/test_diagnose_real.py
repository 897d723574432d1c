"""The diagnosis on training logs people committed from their own fine-tunes (issue 16).

Each file under tests/fixtures/trainer_states/ is a `trainer_state.json` from a public
repository, copied unchanged (SOURCES.md: repository, path, commit, licence, what its
numbers show and the label given by reading them). The label is the expected diagnosis:
the warning signs it must raise, and none other. Healthy runs must stay unflagged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sftlab.diagnose import diagnose, read_history

FIXTURES = Path(__file__).parent / "fixtures" / "trainer_states"

# file stem: (label, the warning or error codes the diagnosis must raise, exactly)
EXPECTED = {
    "5hiri-fine-tuning-llm-test": (
        "loss collapses to 0 within 30 steps; one NaN grad norm",
        {"instability", "memorization"},
    ),
    "aaghaazkhan-law-llm": ("healthy (train loss logged 16x too high, eval falls 15.4 -> 0.30)", set()),
    "arthuribias-coder-tech-challenge-finetune": ("healthy, with eval, small gains", set()),
    "brianlov-creative-generation": ("healthy short run (60 steps), noisy", set()),
    "cursearealsword-nlp-module-4-qa": ("eval plateau, gap widening (a note, not a warning)", set()),
    "heps-akint-reasoning-fine-tuning": ("memorization: 40 epochs, 0.48 -> 0.023", {"memorization"}),
    "huloujun-greenbuilding-qa-llm": ("healthy, 5 epochs, slow", set()),
    "jimmy9478bomdic-unsloth-finetune": (
        "memorization: 60 epochs of one batch; grad-norm blips near 0 loss",
        {"memorization"},
    ),
    "mithrajith-code2resume": ("healthy, fast drop", set()),
    "mubashir214-gpt2-pseudocode-to-cpp": ("healthy, gap not small (a note)", set()),
    "rishikarpe-lora-fine-tuning": ("loss exactly 0 from the first log: nothing trained", {"zero_loss"}),
    "rokkit-exe-unsloth-training": ("memorization: 30 epochs; a grad-norm blip at loss 0.005", {"memorization"}),
    "tanghulu6-llama3-8b-mob": ("healthy short run", set()),
    "teohyc-finetune-med-llm": ("healthy: a steep fall within one third of an epoch", set()),
    "zerobot-atri-llm-finetune": ("healthy: a periodic sawtooth (data order), constant learning rate", set()),
}


def diagnosis_of(stem: str, **kwargs):
    records, samples = read_history(FIXTURES / f"{stem}.json")
    return diagnose(records, samples, **kwargs)


def test_every_fixture_is_labelled_and_listed_with_its_source():
    stems = sorted(path.stem for path in FIXTURES.glob("*.json"))
    assert len(stems) >= 15 and stems == sorted(EXPECTED)
    sources = (FIXTURES / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{stem}.json`" in sources for stem in stems)


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_the_diagnosis_of_a_real_run_matches_its_label(stem):
    _, expected = EXPECTED[stem]
    diagnosis = diagnosis_of(stem)
    raised = {finding.code for finding in diagnosis.findings if finding.severity in {"warning", "error"}}
    assert raised == expected, diagnosis.render()
    if not expected:
        assert diagnosis.phase in {"initial_sharp_drop", "gradual_stabilization", "converged"}


def test_a_loss_of_exactly_zero_is_reported_as_nothing_trained_not_memorization():
    diagnosis = diagnosis_of("rishikarpe-lora-fine-tuning")
    zero = next(finding for finding in diagnosis.findings if finding.code == "zero_loss")
    assert zero.severity == "error" and "at 100 of 100 logs, from step 10" in zero.evidence
    assert "memorization" not in diagnosis.codes()


@pytest.mark.parametrize(
    "stem, blip", [("rokkit-exe-unsloth-training", "2.724"), ("5hiri-fine-tuning-llm-test", "2.443")]
)
def test_grad_norm_blips_while_the_loss_sits_near_zero_are_not_instability(stem, blip):
    # rokkit: 0.003 -> 2.72 (884x) at loss 0.005; 5hiri: 0.008 -> 2.44 at loss 0.0001 (only its NaN grad norm counts).
    evidence = " ".join(finding.evidence for finding in diagnosis_of(stem).findings)
    assert blip not in evidence and "grad_norm reached" not in evidence


def test_the_nan_grad_norm_of_a_real_run_is_an_error():
    instability = next(f for f in diagnosis_of("5hiri-fine-tuning-llm-test").findings if f.code == "instability")
    assert instability.severity == "error" and "grad_norm is nan at step 18" in instability.evidence


@pytest.mark.parametrize(
    "stem, epochs", [("jimmy9478bomdic-unsloth-finetune", 60), ("rokkit-exe-unsloth-training", 30)]
)
def test_memorization_is_found_relative_to_the_run_below_any_threshold(stem, epochs):
    # With the absolute threshold set below the final loss, the fall to a tiny share of the start still counts.
    memorization = next(f for f in diagnosis_of(stem, memorization_loss=0.0005).findings if f.code == "memorization")
    assert memorization.severity == "warning" and "of its start" in memorization.evidence
    assert f"after {epochs} epochs" in memorization.evidence


def test_a_long_run_that_keeps_most_of_its_start_is_not_memorization():
    # 40 epochs to 5% of the start: memorized by the absolute threshold, not by the relative rule alone (2%)
    assert "memorization" not in diagnosis_of("heps-akint-reasoning-fine-tuning", memorization_loss=0.01).codes()
