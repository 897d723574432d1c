"""Reading a run: every file the report uses, read once, tolerantly, into typed records.

`read_run` opens the run directory through rundir.py's tolerant readers and parses each
JSON file once into its contract (contracts.py: Audit, RunInfo, StopRecord, EvalSummary;
verdict.py: Verdict), so the facts, the card and the HTML read typed fields and never
index into raw JSON. A missing file is listed in `Run.missing` with what it leaves out, a
corrupt or wrong-typed one in `Run.unreadable` with why; neither is ever raised on. The
only error is a directory that is not a run at all.

Trade-offs:
- config.yaml is read as a lenient view of the sections the report shows (`RunConfig`),
  not validated as a config: a run's config may be from an older sftlab, or damaged,
  and the report should still say what it can.
- The diagnosis is recomputed from metrics.jsonl (pure and fast, and it covers every
  logged step, also after a kill); diagnosis.json is read only when there are no metrics.
  The plots are redrawn from the metrics for the same reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from sftlab.contracts import Audit, Bool, EvalSummary, Float, Int, Record, RunInfo, Soft, SoftItems, StopRecord, Str
from sftlab.diagnose import Diagnosis, Finding, diagnose, read_history
from sftlab.errors import UserError
from sftlab.rundir import (
    AFTER_FILE,
    AUDIT_FILE,
    BEFORE_FILE,
    CONFIG_FILE,
    DIAGNOSIS_FILE,
    EVAL_SAMPLES_FILE,
    FINAL_DIR,
    METRICS_FILE,
    PLOT_FILES,
    PROMPTED_FILE,
    RUN_INFO_FILE,
    STOPPED_FILE,
    TRAINER_STATE_FILE,
    VERDICT_FILE,
    has_model,
    is_adapter,
    newest_trainer_state,
    read_json_checked,
    read_jsonl,
    read_yaml_checked,
    relative,
)
from sftlab.verdict import VERDICTS, Verdict

DEFAULT_MEMORIZATION_LOSS = 0.05  # monitor.memorization_loss for configs that do not say


# =========================================================================== the config, as the report reads it


class ModelSettings(Record):
    name_or_path: Str = None
    gguf_file: Str = None


class EvalSettings(Record):
    baseline: Bool = None
    prompted_baseline: Bool = None
    max_new_tokens: Float = None


class MonitorSettings(Record):
    memorization_loss: Float = None
    stop_on: Annotated[list[str], SoftItems] = Field(default_factory=list)


class RunConfig(Record):
    """config.yaml's sections the report shows; `training` and `lora` stay mappings, shown as they are."""

    model: Annotated[ModelSettings, Soft, Field(default_factory=ModelSettings)]
    data: Annotated[dict[str, Any], Soft] = Field(default_factory=dict)
    training: Annotated[dict[str, Any], Soft] = Field(default_factory=dict)
    lora: Annotated[dict[str, Any] | None, Soft] = None
    eval: Annotated[EvalSettings, Soft, Field(default_factory=EvalSettings)]
    monitor: Annotated[MonitorSettings, Soft, Field(default_factory=MonitorSettings)]


class Hardware(Record):
    """run_info.json "hardware" (train.py writes it; contracts.RunInfo keeps it a mapping)."""

    device: Str = None
    gpus: Annotated[list[str], SoftItems] = Field(default_factory=list)
    cpu_count: Int = None
    processes: Int = None
    platform: Str = None


# =========================================================================== the run


@dataclass
class Run:
    """What the run directory holds, each piece None (or empty) when missing or unreadable."""

    path: Path
    config: RunConfig = field(default_factory=RunConfig)
    run_info: RunInfo = field(default_factory=RunInfo)
    hardware: Hardware | None = None
    audit: Audit | None = None
    records: list[dict] = field(default_factory=list)  # metrics.jsonl
    training_samples: list[dict] = field(default_factory=list)  # samples_during_training.jsonl
    diagnosis: Diagnosis | None = None
    diagnosis_source: str = ""
    stopped: StopRecord | None = None
    before: EvalSummary | None = None
    prompted: EvalSummary | None = None
    after: EvalSummary | None = None
    verdict: Verdict | None = None  # eval/verdict.json, when its verdict and headline are usable
    eval_samples: list[dict] = field(default_factory=list)
    trainer_state: dict | None = None  # the newest checkpoint's, for the planned steps of a killed run
    plots: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    has_final: bool = False
    is_adapter: bool = False
    missing: list[str] = field(default_factory=list)  # "file: what that leaves out"
    unreadable: list[str] = field(default_factory=list)  # "file: why"

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def final_dir(self) -> Path:
        return self.path / FINAL_DIR


def read_run(run_dir: str | Path, plots: bool = True) -> Run:
    """Read everything the report uses; never fails on a missing or corrupted file, only on a non-run directory."""
    path = Path(run_dir)
    _check_is_run(path)
    run = Run(path=path)
    config = _read_yaml(run, CONFIG_FILE, "the resolved config: training parameters are unknown")
    run.config = RunConfig.parse(config) or RunConfig()
    info = _read_json(run, RUN_INFO_FILE, "hardware, versions and resolved arguments of the training process")
    run.run_info = RunInfo.parse(info) or RunInfo()
    run.hardware = Hardware.parse(run.run_info.hardware) if run.run_info.hardware else None
    run.audit = Audit.parse(
        _read_json(run, relative(AUDIT_FILE), "the data audit: dataset characteristics are unknown")
    )
    _read_metrics(run)
    stopped = _read_json(run, STOPPED_FILE, None)  # only written when the run stopped early
    run.stopped = StopRecord.parse(stopped) if stopped else None
    _read_evaluations(run)
    run.verdict = _read_verdict(run)
    run.eval_samples = _read_samples(
        run, relative(EVAL_SAMPLES_FILE), "side-by-side answers of the base and fine-tuned models"
    )
    run.trainer_state = newest_trainer_state(path)
    run.has_final = has_model(run.final_dir)
    run.is_adapter = is_adapter(run.final_dir) or bool(run.config.lora)
    if not run.has_final:
        run.missing.append(f"{FINAL_DIR}/: no final model was saved")
    _read_diagnosis(run)
    if plots:
        run.plots = _plots(run)
    return run


def _check_is_run(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such directory", hint="pass a run directory (training.output_dir)")
    if not path.is_dir():
        raise UserError(
            f"{path} is not a directory", hint="pass a run directory (training.output_dir), not a file in it"
        )
    if not (path / CONFIG_FILE).exists() and not (path / METRICS_FILE).exists():
        raise UserError(
            f"{path} is not a run directory: it has no {CONFIG_FILE} and no {METRICS_FILE}",
            hint="pass the training.output_dir of an `sftlab train` run",
        )


def _read_evaluations(run: Run) -> None:
    """eval/before.json, prompted.json, after.json; a baseline switched off in the config is not missing."""
    before_missing = "the base model's evaluation: no before/after comparison"
    prompted_missing = "the prompted base model's evaluation: prompting is not compared"
    run.before = EvalSummary.parse(
        _read_json(run, relative(BEFORE_FILE), before_missing if run.config.eval.baseline is not False else None),
    )
    run.prompted = EvalSummary.parse(
        _read_json(run, relative(PROMPTED_FILE), prompted_missing if run.config.eval.prompted_baseline else None),
    )
    run.after = EvalSummary.parse(
        _read_json(run, relative(AFTER_FILE), "the evaluation of the fine-tuned model: results are unmeasured"),
    )


def _read_verdict(run: Run) -> Verdict | None:
    """eval/verdict.json when its verdict and headline are usable; the report shows nothing it cannot trust."""
    verdict = _read_json(
        run,
        relative(VERDICT_FILE),
        "the verdict: whether the fine-tune worked is not decided" if run.after is not None else None,
    )
    if verdict is None:
        return None
    if verdict.get("verdict") not in VERDICTS or not isinstance(verdict.get("headline"), str):
        run.unreadable.append(f"{relative(VERDICT_FILE)}: not a verdict")
        return None
    # Only what the report shows is taken, each checked: the bootstrap details may hold anything.
    return Verdict(
        verdict=verdict["verdict"],
        headline=verdict["headline"],
        primary=str(verdict.get("primary")),
        reasons=[str(reason) for reason in _as_list(verdict.get("reasons"))],
        caveats=[str(caveat) for caveat in _as_list(verdict.get("caveats"))],
    )


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


def _read_json(run: Run, name: str, missing: str | None) -> dict | None:
    """A JSON object of the run; a missing file is noted with what it leaves out (when `missing` says), a bad one
    as unreadable."""
    value, error = read_json_checked(run.path / name)
    if error is not None:
        run.unreadable.append(f"{name}: {error}")
        return None
    if value is None and not (run.path / name).exists():
        if missing:
            run.missing.append(f"{name}: {missing}")
        return None
    if not isinstance(value, dict):
        run.unreadable.append(f"{name}: expected a JSON object, found {type(value).__name__}")
        return None
    return value


def _read_yaml(run: Run, name: str, missing: str) -> dict | None:
    value, error = read_yaml_checked(run.path / name)
    if error is not None:
        run.unreadable.append(f"{name}: {error}")
    elif value is None:
        run.missing.append(f"{name}: {missing}")
    return value


def _read_samples(run: Run, name: str, missing: str) -> list[dict]:
    if not (run.path / name).exists():
        run.missing.append(f"{name}: {missing}")
        return []
    return read_jsonl(run.path / name)


def _read_metrics(run: Run) -> None:
    try:
        records, samples = read_history(run.path)
    except UserError as error:  # no metrics at all, or a file with no valid line
        if (run.path / METRICS_FILE).exists():
            run.unreadable.append(f"{METRICS_FILE}: {error.message.split(': ', 1)[-1]}")
        else:
            run.missing.append(f"{METRICS_FILE}: nothing was logged: no curves, duration or token counts")
        return
    if not (run.path / METRICS_FILE).exists():
        run.missing.append(f"{METRICS_FILE}: curves read from the newest checkpoint's {TRAINER_STATE_FILE} instead")
    run.records = [r for r in records if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]
    run.training_samples = samples


def _read_diagnosis(run: Run) -> None:
    if run.records:
        memorization_loss = run.config.monitor.memorization_loss or DEFAULT_MEMORIZATION_LOSS
        run.diagnosis = diagnose(run.records, run.training_samples, memorization_loss=memorization_loss)
        run.diagnosis_source = f"recomputed from {METRICS_FILE} (every logged step)"
        return
    saved = _read_json(run, DIAGNOSIS_FILE, None)
    if saved is None:
        return
    findings = [finding for item in _as_list(saved.get("findings")) if (finding := _saved_finding(item))]
    run.diagnosis = Diagnosis(phase=str(saved.get("phase", "unknown")), findings=findings)
    run.diagnosis_source = DIAGNOSIS_FILE


def _saved_finding(item) -> Finding | None:
    """A finding of diagnosis.json (Finding.to_json's keys), or None when it has no usable steps."""
    if not isinstance(item, dict):
        return None
    steps, advice = item.get("steps"), item.get("advice")
    if not isinstance(steps, list) or len(steps) != 2:
        return None
    return Finding(
        str(item.get("code")),
        str(item.get("severity")),
        (steps[0], steps[1]),
        str(item.get("evidence", "")),
        [str(a) for a in advice] if isinstance(advice, list) else [],
    )


def _plots(run: Run) -> dict[str, bytes]:
    """The curves as PNG bytes: redrawn from the metrics with the report's diagnosis, else the run's PNGs."""
    if run.records:
        from sftlab.plots import plot_curves

        with tempfile.TemporaryDirectory(prefix="sftlab-report-") as directory:
            written = plot_curves(Path(directory), run.records, run.diagnosis)
            return {path.stem: path.read_bytes() for path in written}
    found = {}
    for name, filename in PLOT_FILES.items():
        path = run.path / filename
        if path.is_file() and path.read_bytes()[:4] == b"\x89PNG":
            found[name] = path.read_bytes()
    return found
