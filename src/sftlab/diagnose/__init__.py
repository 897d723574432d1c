"""Diagnose a run from its loss curves: the phase it is in and the chapter's warning signs.

The chapter describes three phases of a training loss curve (an initial sharp drop, a
gradual stabilization, convergence) and five warning signs: overfitting (eval loss rising,
or falling much more slowly than train loss), underfitting (no significant improvement),
memorization (extremely low loss), instability (a learning rate too high: spikes,
divergence, NaN) and inconsistent output formatting. One more sign is not the chapter's:
a loss of exactly 0 from the first logs (`zero_loss`) means no token is trained at all,
a masking or label bug, not a model that learned everything. `diagnose` turns the logged metrics
(and the samples generated at each evaluation) into a `Diagnosis`: the phase, and findings
with a code, a severity, the steps concerned, the numbers that triggered them and the
chapter's remedies.

    curves.py       read_history (run directory, metrics.jsonl, trainer_state.json) -> Curves
    stats.py        robust statistics of noisy curves (medians, Theil-Sen slopes, log-space noise)
    signs.py        the phase; overfitting, underfitting, memorization, zero loss, format, healthy
    instability.py  non-finite values, spikes, divergence, gradient explosions
    assess.py       diagnose(): the rules in order
    findings.py     Finding, Diagnosis (diagnosis.json), the codes and the chapter's remedies
    printing.py     the terminal form

Real curves are noisy, and the diagnosis runs live at every evaluation (where a finding can
stop the run), so every rule smooths, compares relative changes, and asks for a minimum of
evidence before it says anything: a single recovered spike, one eval point a little higher
than the previous one, or a short run with two or three evaluations is not a warning.

Pure Python and numpy (and pydantic for the models): no torch or transformers, so
`sftlab diagnose` starts at once.
"""

from sftlab.diagnose.assess import diagnose
from sftlab.diagnose.curves import Curves, Series, read_history
from sftlab.diagnose.findings import (
    ADVICE,
    CODES,
    DIVERGING,
    NOT_STARTED,
    PHASES,
    SEVERITIES,
    Diagnosis,
    Finding,
    read_diagnosis,
    write_diagnosis,
)
from sftlab.diagnose.printing import RENDER_ADVICE
from sftlab.diagnose.signs import UNDERFIT_MIN_STEPS
from sftlab.rundir import METRICS_FILE, TRAINER_STATE_FILE
from sftlab.rundir import TRAINING_SAMPLES_FILE as SAMPLES_FILE

# From ADVICE on: names other stages import from here (report.py); the file names are rundir's.
__all__ = [
    "PHASES",
    "SEVERITIES",
    "CODES",
    "Finding",
    "Diagnosis",
    "diagnose",
    "read_history",
    "Curves",
    "Series",
    "read_diagnosis",
    "write_diagnosis",
    "ADVICE",
    "DIVERGING",
    "NOT_STARTED",
    "RENDER_ADVICE",
    "UNDERFIT_MIN_STEPS",
    "METRICS_FILE",
    "TRAINER_STATE_FILE",
    "SAMPLES_FILE",
]
