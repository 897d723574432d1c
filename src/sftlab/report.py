"""Report: the run documents itself, from what it measured.

The chapter ends with "document your training process: dataset characteristics,
training parameters, performance metrics, known limitations". `write_report` writes
that documentation from the run directory alone:

- `final/README.md`: a Hugging Face model card (YAML front matter, then summary,
  dataset characteristics, training parameters, results before and after, warning signs,
  known limitations, how to use it, framework versions);
- `report.html`: one self-contained page with the data audit, the training curves with
  the diagnosis marked on them, the evaluation before/after with side-by-side answers,
  and the model card.

It reads only files the run wrote (config.yaml, run_info.json, eval/audit.json,
metrics.jsonl, diagnosis.json, stopped.json, eval/before.json, eval/after.json,
eval/samples.jsonl, the plots, the newest checkpoint's trainer_state.json, final/), so
`sftlab report RUN_DIR` rebuilds both at any time, including for a run that stopped
early or was killed: it reports what exists and names what is missing or unreadable.

Trade-offs:
- Every number is one the run recorded; the report computes nothing new except the
  diagnosis (pure and fast, recomputed from metrics.jsonl so that it covers every logged
  step, also after a kill) and the plots, redrawn from the metrics for the same reason
  (the PNGs in the run directory are used when there are no metrics).
- Known limitations are derived from the measurements by explicit thresholds (named
  constants below, each with its reason): prompts to look closer, not verdicts.
- The HTML is one file with inline CSS and the plots as base64 data URIs, no script and
  no external URL, behind a Content-Security-Policy that forbids both: it opens offline
  and can be mailed, at the cost of ~100 KB of embedded images.
- Text from the data or from generations is never trusted: Jinja escapes everything in
  the HTML, and in the card such text is escaped or put in code spans, and the card is
  rendered into the HTML by markdown-it with raw HTML, links and images off. A dataset
  holding `<script>` shows it as text.
- Hardware, framework versions and the resolved training arguments cannot be read back
  from the run directory, so training writes them to `run_info.json` at its start
  (`write_run_info`); for runs without it, the report says the versions are those of
  the environment that wrote the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sftlab.config import CONFIG_FILE, EMBEDDED_MODEL
from sftlab.diagnose import (
    METRICS_FILE, TRAINER_STATE_FILE, UNDERFIT_MIN_STEPS, Diagnosis, Finding, diagnose, read_history,
)
from sftlab.errors import UserError
from sftlab.evaluate import AFTER_FILE, BEFORE_FILE, EVAL_DIR, PROMPTED_FILE, SAMPLES_FILE, VERDICT_FILE
from sftlab.metrics import format_value, metric_rows, primary_location
from sftlab.model import FINAL_DIR
from sftlab.monitor import DIAGNOSIS_FILE, PLOTS, STOPPED_FILE, read_jsonl, write_atomically
from sftlab.verdict import RETENTION_RISE_REL, VERDICTS

__all__ = ["write_report", "write_run_info", "write_audit", "read_run", "model_card", "render_html", "Run", "Status",
           "ReportResult"]

REPORT_FILE = "report.html"
CARD_FILE = "README.md"  # in final/: the Hugging Face model card
RUN_INFO_FILE = "run_info.json"
AUDIT_FILE = "audit.json"  # in eval/, next to evaluate.py's files: the data audit, written when training starts
EXPORTS_FILE = "exports.json"  # written by `sftlab export` (export.py): the files exported from final/
# Paths inside the run directory, as the report names them.
_AUDIT = f"{EVAL_DIR}/{AUDIT_FILE}"
_BEFORE = f"{EVAL_DIR}/{BEFORE_FILE}"
_AFTER = f"{EVAL_DIR}/{AFTER_FILE}"
_PROMPTED = f"{EVAL_DIR}/{PROMPTED_FILE}"
_VERDICT = f"{EVAL_DIR}/{VERDICT_FILE}"
LIVE_REFRESH_SECONDS = 30  # a report written during training reloads itself this often in the browser
_EVAL_SAMPLES = f"{EVAL_DIR}/{SAMPLES_FILE}"

# The embedded default model is SmolLM2-135M-Instruct: its hub id and license go into the card.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
PACKAGES = ("sftlab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")

# --------------------------------------------------------------------------- limitation thresholds
ADHERENCE_MIN = 0.9  # under 90% of held-out answers in format (or ending their turn), a caller must expect and handle
#   failures on every tenth request: worth saying, whatever the cause.
SHORT_EPOCHS = 1.0  # under one epoch, part of the training data was never seen (the chapter advises 1-3 epochs) ...
SHORT_STEPS = UNDERFIT_MIN_STEPS  # ... and under this many steps the diagnosis cannot yet judge the curves at all.
MANY_EPOCHS = 3.0  # over 3 epochs: past the chapter's 1-3, where memorization becomes likely.
SMALL_DATASET_ROWS = 1000  # under a thousand examples cover few kinds of prompts: the chapter's SFT datasets (smoltalk)
#   hold hundreds of thousands; behaviour on prompts unlike them is untested.
SAMPLES_SHOWN = 8  # side-by-side answers in the HTML, enough to read; the rest stay in eval/samples.jsonl
PROBLEMS_SHOWN = 20  # data problems listed in the HTML; the rest are in eval/audit.json


# =========================================================================== reading the run


@dataclass
class Run:
    """What the run directory holds, each piece None (or empty) when missing or unreadable."""

    path: Path
    config: dict | None = None
    run_info: dict | None = None
    audit: dict | None = None
    records: list[dict] = field(default_factory=list)  # metrics.jsonl
    training_samples: list[dict] = field(default_factory=list)  # samples_during_training.jsonl
    diagnosis: Diagnosis | None = None
    diagnosis_source: str = ""
    stopped: dict | None = None
    before: dict | None = None
    prompted: dict | None = None
    after: dict | None = None
    verdict: dict | None = None  # eval/verdict.json, checked for shape (see _read_verdict)
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
    if not path.exists():
        raise UserError(f"{path}: no such directory", hint="pass a run directory (training.output_dir)")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", hint="pass a run directory (training.output_dir), not a file in it")
    if not (path / CONFIG_FILE).exists() and not (path / METRICS_FILE).exists():
        raise UserError(f"{path} is not a run directory: it has no {CONFIG_FILE} and no {METRICS_FILE}",
                        hint="pass the training.output_dir of an `sftlab train` run")
    run = Run(path=path)
    run.config = _read_yaml(run, CONFIG_FILE, "the resolved config: training parameters are unknown")
    run.run_info = _read_json(run, RUN_INFO_FILE, "hardware, versions and resolved arguments of the training process")
    run.audit = _read_json(run, _AUDIT, "the data audit: dataset characteristics are unknown")
    _read_metrics(run)
    run.stopped = _read_json(run, STOPPED_FILE, None)  # only written when the run stopped early
    baseline = _get(run.config, "eval", "baseline")
    run.before = _read_json(run, _BEFORE, "the base model's evaluation: no before/after comparison"
                            if baseline is not False else None)
    run.prompted = _read_json(run, _PROMPTED, "the prompted base model's evaluation: prompting is not compared"
                              if _get(run.config, "eval", "prompted_baseline") not in (False, None) else None)
    run.after = _read_json(run, _AFTER, "the evaluation of the fine-tuned model: results are unmeasured")
    run.verdict = _read_verdict(run)
    run.eval_samples = _read_samples(run, _EVAL_SAMPLES, "side-by-side answers of the base and fine-tuned models")
    run.trainer_state = _newest_trainer_state(path)
    run.has_final = (run.final_dir / "config.json").is_file() or (run.final_dir / "adapter_config.json").is_file()
    run.is_adapter = (run.final_dir / "adapter_config.json").is_file() or bool(_get(run.config, "lora"))
    if not run.has_final:
        run.missing.append(f"{FINAL_DIR}/: no final model was saved")
    _read_diagnosis(run)
    if plots:
        run.plots = _plots(run)
    return run


def _read_verdict(run: Run) -> dict | None:
    """eval/verdict.json when its verdict and headline are usable; the report shows nothing it cannot trust."""
    verdict = _read_json(run, _VERDICT, "the verdict: whether the fine-tune worked is not decided"
                         if run.after is not None else None)
    if verdict is None:
        return None
    if _get(verdict, "verdict") not in VERDICTS or not isinstance(_get(verdict, "headline"), str):
        run.unreadable.append(f"{_VERDICT}: not a verdict")
        return None
    return {"verdict": verdict["verdict"], "headline": verdict["headline"], "primary": str(_get(verdict, "primary")),
            "reasons": [str(r) for r in _list(verdict, "reasons")], "caveats": [str(c) for c in _list(verdict, "caveats")]}


def _read_text(run: Run, relative: str, missing: str | None) -> str | None:
    path = run.path / relative
    if not path.exists():
        if missing:
            run.missing.append(f"{relative}: {missing}")
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        run.unreadable.append(f"{relative}: {getattr(error, 'strerror', None) or error}")
        return None


def _read_json(run: Run, relative: str, missing: str | None) -> dict | None:
    text = _read_text(run, relative, missing)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        run.unreadable.append(f"{relative}: invalid JSON (line {error.lineno})")
        return None
    if not isinstance(value, dict):
        run.unreadable.append(f"{relative}: expected a JSON object, found {type(value).__name__}")
        return None
    return value


def _read_yaml(run: Run, relative: str, missing: str) -> dict | None:
    text = _read_text(run, relative, missing)
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        run.unreadable.append(f"{relative}: invalid YAML" + (f" (line {mark.line + 1})" if mark else ""))
        return None
    if not isinstance(value, dict):
        run.unreadable.append(f"{relative}: expected a mapping of sections")
        return None
    return value


def _read_samples(run: Run, relative: str, missing: str) -> list[dict]:
    if not (run.path / relative).exists():
        run.missing.append(f"{relative}: {missing}")
        return []
    try:
        return [record for record in read_jsonl(run.path / relative) if isinstance(record, dict)]
    except (OSError, UnicodeDecodeError) as error:
        run.unreadable.append(f"{relative}: {getattr(error, 'strerror', None) or error}")
        return []


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


def _newest_trainer_state(path: Path) -> dict | None:
    states = sorted((int(m.group(1)), p / TRAINER_STATE_FILE) for p in path.glob("checkpoint-*")
                    if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / TRAINER_STATE_FILE).is_file())
    for _, state in reversed(states):
        try:
            value = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # a checkpoint killed mid-save: try the one before
        if isinstance(value, dict):
            return value
    return None


def _read_diagnosis(run: Run) -> None:
    if run.records:
        memorization_loss = _num(run.config, "monitor", "memorization_loss") or 0.05
        run.diagnosis = diagnose(run.records, run.training_samples, memorization_loss=memorization_loss)
        run.diagnosis_source = f"recomputed from {METRICS_FILE} (every logged step)"
        return
    saved = _read_json(run, DIAGNOSIS_FILE, None)
    if saved is None:
        return
    findings = []
    for item in saved.get("findings") if isinstance(saved.get("findings"), list) else []:
        steps, advice = _get(item, "steps"), _get(item, "advice")
        if isinstance(item, dict) and isinstance(steps, list) and len(steps) == 2:
            findings.append(Finding(str(item.get("code")), str(item.get("severity")), (steps[0], steps[1]),
                                    str(item.get("evidence", "")), [str(a) for a in advice] if isinstance(advice, list) else []))
    run.diagnosis = Diagnosis(phase=str(saved.get("phase", "unknown")), findings=findings)
    run.diagnosis_source = DIAGNOSIS_FILE


def _plots(run: Run) -> dict[str, bytes]:
    """The curves as PNG bytes: redrawn from the metrics with the report's diagnosis, else the run's PNGs."""
    if run.records:
        from sftlab.monitor import plot_curves

        with tempfile.TemporaryDirectory(prefix="sftlab-report-") as directory:
            written = plot_curves(Path(directory), run.records, run.diagnosis)
            return {path.stem: path.read_bytes() for path in written}
    found = {}
    for name, filename in PLOTS.items():
        path = run.path / filename
        if path.is_file() and path.read_bytes()[:4] == b"\x89PNG":
            found[name] = path.read_bytes()
    return found


# --------------------------------------------------------------------------- safe access


def _get(mapping, *keys):
    """mapping[k1][k2]..., or None where a level is missing or not a mapping: files may hold anything."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _list(mapping, *keys) -> list:
    """mapping[k1][k2]... when it is a list, else []: files may hold anything."""
    value = _get(mapping, *keys)
    return value if isinstance(value, list) else []


def _num(mapping, *keys) -> float | None:
    value = _get(mapping, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _last(records: list[dict], key: str) -> tuple[int, float] | None:
    values = [(r["step"], r[key]) for r in records if _num(r, key) is not None]
    return values[-1] if values else None


# =========================================================================== what the run says


@dataclass
class Status:
    state: str  # "complete" | "stopped_early" | "incomplete" | "no_final_model"
    headline: str
    last_step: int
    planned_steps: int | None


def run_status(run: Run) -> Status:
    last_step = max((r["step"] for r in run.records), default=0)
    planned = _planned_steps(run)
    of = f" of {planned:,}" if planned else ""
    finished = any("train_runtime" in r for r in run.records)
    if not finished:
        if not run.records:
            return Status("incomplete", "incomplete: training did not finish (nothing was logged)", 0, planned)
        return Status("incomplete", f"incomplete: training did not finish (last logged step {last_step:,}{of})",
                      last_step, planned)
    if run.stopped:
        reason = run.stopped.get("reason", "unknown reason")
        keeps = ("the last good checkpoint" if reason == "instability"
                 else "the checkpoint with the lowest eval loss, where one was saved")
        kept = f"; {FINAL_DIR}/ holds {keeps}" if run.has_final else "; no final model was saved"
        return Status("stopped_early", f"stopped early at step {run.stopped.get('step', last_step)}{of}: {reason}{kept}",
                      last_step, planned)
    if not run.has_final:
        return Status("no_final_model", f"training ended at step {last_step:,}{of}, but no final model was saved",
                      last_step, planned)
    return Status("complete", f"complete: trained {last_step:,}{of} steps", last_step, planned)


def _planned_steps(run: Run) -> int | None:
    for value in (_num(run.run_info, "plan", "steps"), _num(run.trainer_state, "max_steps"),
                  _num(run.config, "training", "max_steps")):
        if value and value > 0:
            return int(value)
    return None


def base_model(run: Run) -> str | None:
    name = _get(run.config, "model", "name_or_path")
    return str(name) if name else None


def base_model_hub_id(run: Run) -> str | None:
    """The base model as a hub id (what the card's base_model field takes), None for a local path."""
    name = base_model(run)
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if name and _looks_like_hub_id(name) and not _is_local(name):
        return name
    return None


def _is_local(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a name too long for a path, a NUL byte, an unknown ~user
        return False


def _looks_like_hub_id(name: str) -> bool:
    from sftlab.data import FILE_SUFFIXES

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and Path(name).suffix.lower() not in FILE_SUFFIXES \
        and not name.endswith(".gguf")


def base_license(run: Run) -> str | None:
    """The base model's license when it is known: the embedded model's, or a local model's own card."""
    name = base_model(run)
    if name == EMBEDDED_MODEL:
        return EMBEDDED_LICENSE
    card = Path(name).expanduser() / CARD_FILE if name and _is_local(name) else None
    if card is not None and card.is_file():
        meta = _front_matter(card.read_text(encoding="utf-8", errors="replace"))
        if isinstance(meta.get("license"), str):
            return meta["license"]
    return None


def _front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    try:
        value = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}


def dataset_ids(run: Run) -> list[str]:
    """Hub dataset ids among the data sources (local files are no hub dataset)."""
    ids = []
    for key in ("train", "eval"):
        sources = _get(run.config, "data", key)
        for source in sources if isinstance(sources, list) else [sources]:
            path = source.get("path") if isinstance(source, dict) else source
            if isinstance(path, str) and _looks_like_hub_id(path) and "/" in path and not _is_local(path):
                ids.append(path)
    return list(dict.fromkeys(ids))


def training_facts(run: Run) -> dict:
    """Duration, tokens and throughput, as logged."""
    summary = next((r for r in reversed(run.records) if "train_runtime" in r), None)
    speeds = [r["tokens_per_second"] for r in run.records if _num(r, "tokens_per_second")]
    epoch = _last(run.records, "epoch")
    evals = [(r["step"], r["eval_loss"]) for r in run.records if _num(r, "eval_loss") is not None]
    return {
        "steps": max((r["step"] for r in run.records), default=0),
        "epochs": epoch[1] if epoch else None,
        "runtime": _num(summary, "train_runtime"),
        "runtime_estimate": None if summary else _runtime_estimate(run),
        "trained_tokens": _last(run.records, "trained_tokens"),
        "tokens_seen": _last(run.records, "num_tokens"),
        "tokens_per_second": statistics.median(speeds) if speeds else None,
        "speed_logs": len(speeds),
        "train_loss": _last(run.records, "loss"),
        "mean_train_loss": _num(summary, "train_loss"),
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals, key=lambda e: e[1]) if evals else None,
    }


def _runtime_estimate(run: Run) -> float | None:
    """For a run without its end-of-training record: from its start to its last log."""
    started = _get(run.run_info, "started_at")
    metrics = run.path / METRICS_FILE
    if not isinstance(started, str) or not metrics.exists():
        return None
    try:
        start = dt.datetime.fromisoformat(started).timestamp()
    except ValueError:
        return None
    seconds = metrics.stat().st_mtime - start
    return seconds if seconds > 0 else None


def training_parameters(run: Run) -> list[tuple[str, str]]:
    """The resolved settings that matter, as (name, value): the training process's own arguments where recorded."""
    training = _get(run.config, "training") if isinstance(_get(run.config, "training"), dict) else {}
    args = _get(run.run_info, "training_args") if isinstance(_get(run.run_info, "training_args"), dict) else {}

    def value(key):
        return args.get(key, training.get(key))

    rows = []
    name = base_model(run)
    if name:
        gguf = _get(run.config, "model", "gguf_file")
        rows.append(("base model", name + (f" ({gguf})" if gguf else "")
                     + (f" = {EMBEDDED_HUB_ID}" if name == EMBEDDED_MODEL else "")))
    lora = _get(run.config, "lora")
    if isinstance(lora, dict):
        rows.append(("method", f"LoRA: r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}, "
                               f"lora_dropout={lora.get('lora_dropout')}, target_modules={lora.get('target_modules')}"))
    else:
        rows.append(("method", "full fine-tune (every weight trained)"))
    max_steps = value("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        rows.append(("max_steps", f"{max_steps} (takes precedence over num_train_epochs)"))
    else:
        rows.append(("num_train_epochs", str(value("num_train_epochs"))))
    processes = _num(run.run_info, "hardware", "processes") or _num(args, "world_size")
    batch, accumulation = value("per_device_train_batch_size"), value("gradient_accumulation_steps") or 1
    rows.append(("per_device_train_batch_size", str(batch)))
    rows.append(("gradient_accumulation_steps", str(accumulation)))
    if isinstance(batch, int) and isinstance(accumulation, int):
        total = batch * accumulation * int(processes or 1)
        rows.append(("effective batch (rows per optimizer step)",
                     f"{total}" + (f" ({int(processes)} processes)" if processes and processes > 1 else "")))
    for key in ("learning_rate", "lr_scheduler_type"):
        if value(key) is not None:
            rows.append((key, str(value(key))))
    if training.get("warmup_ratio") is not None:
        rows.append(("warmup_ratio", str(training["warmup_ratio"])))
    elif value("warmup_steps") is not None:
        rows.append(("warmup_steps", str(value("warmup_steps"))))
    for key in ("weight_decay", "max_grad_norm", "optim", "max_length", "packing", "assistant_only_loss", "seed",
                "logging_steps", "eval_steps", "save_steps"):
        if value(key) is not None:
            rows.append((key, str(value(key))))
    precision = _get(run.run_info, "precision")
    if precision:
        rows.append(("precision", str(precision)))
    if value("activation_checkpointing") is not None:
        rows.append(("activation_checkpointing", str(value("activation_checkpointing"))))
    stop_on = _get(run.config, "monitor", "stop_on")
    if stop_on:
        rows.append(("monitor.stop_on", ", ".join(map(str, stop_on))))
    return rows


def hardware(run: Run) -> str:
    info = _get(run.run_info, "hardware")
    if not isinstance(info, dict):
        return "not recorded (run_info.json missing)"
    parts = [f"device {info.get('device', '?')}"]
    if info.get("gpus"):
        parts.append("GPUs: " + ", ".join(map(str, info["gpus"])))
    if info.get("cpu_count"):
        parts.append(f"{info['cpu_count']} CPU cores")
    if info.get("processes"):
        parts.append(f"{info['processes']} training process{'es' if info['processes'] != 1 else ''}")
    if info.get("platform"):
        parts.append(str(info["platform"]))
    return "; ".join(parts)


def framework_versions(run: Run) -> tuple[dict[str, str], str]:
    """(versions, where they come from): recorded at training time, or else this environment's."""
    recorded = _get(run.run_info, "versions")
    if isinstance(recorded, dict) and recorded:
        return {str(k): str(v) for k, v in recorded.items()}, f"recorded at training time ({RUN_INFO_FILE})"
    return current_versions(), f"of the environment that wrote this report ({RUN_INFO_FILE} is missing)"


def current_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --------------------------------------------------------------------------- results


def results(run: Run) -> list[dict]:
    """Each metric for the base, prompted base and tuned model, formatted, with the tuned model's changes
    and whether each is an improvement; the verdict's primary metric marked."""
    user_metrics = sorted({key for result in (run.before, run.prompted, run.after)
                           for key in (_get(result, "metrics") if isinstance(_get(result, "metrics"), dict) else {})})
    primary = primary_location(run.verdict["primary"]) if run.verdict else None
    rows = []
    for row in metric_rows(user_metrics):
        before, prompted, after = (_num(result, row.group, row.key) for result in (run.before, run.prompted, run.after))
        if before is None and prompted is None and after is None:
            continue
        entry = {"label": row.label, "before": fmt(before, row.kind), "prompted": fmt(prompted, row.kind),
                 "after": fmt(after, row.kind), "primary": (row.group, row.key) == primary}
        for name, other in (("change", before), ("change_prompted", prompted)):
            change, verdict = "", ""
            if other is not None and after is not None:
                delta = after - other
                change = "no change" if not delta else format_value(delta, row.kind, signed=True)
                if delta:
                    verdict = "better" if (delta < 0) == (row.better == "lower") else "worse"
            entry[name], entry[name.replace("change", "verdict")] = change, verdict
        rows.append(entry)
    return rows


def evaluation_setup(run: Run) -> str:
    result = run.after or run.before
    if not result:
        return ""
    parts = []
    if _num(result, "num_prompts"):
        parts.append(f"{int(result['num_prompts'])} held-out prompts")
    if _num(result, "max_new_tokens"):
        parts.append(f"greedy answers of at most {int(result['max_new_tokens'])} new tokens")
    source = _get(result, "retention", "source")
    if source:
        parts.append(f"retention measured on {source}")
    spec = _get(result, "adherence", "format_spec")
    if isinstance(spec, dict):
        parts.append("eval.format " + json.dumps(spec, ensure_ascii=False))
    return "; ".join(parts)


def side_by_side(run: Run) -> tuple[list[dict], str]:
    """Answers to show side by side, and where they come from."""
    if run.eval_samples:
        return run.eval_samples, f"{_EVAL_SAMPLES}: the base model and the fine-tuned model on the same held-out prompts"
    steps = sorted({s.get("step") for s in run.training_samples if isinstance(s.get("step"), int)})
    if len(steps) < 1:
        return [], ""
    first, last = steps[0], steps[-1]
    early = {s.get("prompt"): s for s in run.training_samples if s.get("step") == first}
    rows = [{"prompt": s.get("prompt"), "reference": None, "base_output": early.get(s.get("prompt"), {}).get("output"),
             "tuned_output": s.get("output"), "base_follows_format": early.get(s.get("prompt"), {}).get("follows_format"),
             "tuned_follows_format": s.get("follows_format")}
            for s in run.training_samples if s.get("step") == last]
    return rows, (f"{_EVAL_SAMPLES} is missing: held-out answers during training instead, "
                  f"at the first evaluation (step {first}) and the last (step {last})")


# --------------------------------------------------------------------------- limitations


def known_limitations(run: Run, status: Status) -> list[str]:
    """Plain-text limitations, each derived from a measurement of this run."""
    out: list[str] = []
    facts = training_facts(run)
    if status.state == "incomplete":
        out.append(f"Training did not finish (last logged step {status.last_step:,}"
                   + (f" of {status.planned_steps:,}" if status.planned_steps else "") + "): "
                   + ("no final model exists." if not run.has_final
                      else f"{FINAL_DIR}/ may not hold the weights of the last logged step."))
    elif status.state == "no_final_model":
        out.append("Training ended without saving a final model.")
    if run.stopped:
        out.append(f"Training stopped early at step {run.stopped.get('step')} on {run.stopped.get('reason')}: "
                   f"{run.stopped.get('evidence', '')}.")
    steps, epochs = facts["steps"], facts["epochs"]
    if steps and epochs is not None and epochs < SHORT_EPOCHS:
        out.append(f"Short training: {steps:,} steps, {epochs:.2f} epochs: part of the training data was never seen "
                   f"(the chapter advises 1-3 epochs).")
    elif steps and steps < SHORT_STEPS:
        out.append(f"Short training: {steps:,} optimizer steps, too few for the diagnosis to judge under- or overfitting.")
    if epochs is not None and epochs > MANY_EPOCHS:
        out.append(f"{epochs:.1f} epochs over the same data, more than the 1-3 the chapter advises: memorization is likely.")
    train_rows = _num(run.audit, "splits", "train", "rows")
    if train_rows is not None and train_rows < SMALL_DATASET_ROWS:
        out.append(f"Trained on {int(train_rows):,} examples only: behaviour on prompts unlike them is untested.")
    if _num(run.audit, "splits", "eval", "rows") == 0:
        out.append("No held-out data: overfitting could not be detected during training.")
    over, rows = _num(run.audit, "truncation", "examples_over"), _num(run.audit, "splits", "train", "rows")
    if over and rows:
        out.append(f"{int(over):,} training examples ({over / rows:.1%}) were longer than max_length "
                   f"{_get(run.audit, 'truncation', 'max_length')} and were cut "
                   f"({int(_num(run.audit, 'truncation', 'trained_tokens_cut') or 0):,} trained tokens lost): "
                   "long answers were never seen to their end.")
    untrained = _num(run.audit, "end_of_turn_untrained")
    if untrained:
        out.append(f"{int(untrained):,} training examples do not train the end-of-turn token: the model may not learn to stop.")
    out += _evaluation_limitations(run)
    for finding in (run.diagnosis.findings if run.diagnosis else []):
        if finding.severity in {"warning", "error"}:
            out.append(f"Warning sign during training: {finding.code} (steps {finding.steps[0]}-{finding.steps[1]}): "
                       f"{finding.evidence}.")
    return out


def _evaluation_limitations(run: Run) -> list[str]:
    out = []
    after, before = run.after, run.before
    if after is None:
        return [f"The fine-tuned model was not evaluated ({_AFTER} is missing): its quality is unmeasured."]
    prompts = _num(after, "num_prompts")
    fmt_after, fmt_before = _num(after, "adherence", "format"), _num(before, "adherence", "format")
    if fmt_after is not None and fmt_after < ADHERENCE_MIN:
        failing = sum(1 for s in run.eval_samples if s.get("tuned_follows_format") is False)
        out.append(f"Follows the required format (eval.format) in {fmt_after:.1%} of held-out answers"
                   + (f" ({fmt_before:.1%} before fine-tuning)" if fmt_before is not None else "")
                   + (f"; the {failing} answers out of format are in {_EVAL_SAMPLES}" if failing else "") + ".")
    chat_after = _num(after, "adherence", "chat")
    if chat_after is not None and chat_after < ADHERENCE_MIN:
        out.append(f"Ends its answer with the end-of-turn token in {chat_after:.1%} of held-out answers: "
                   "expect run-on answers; cap max_new_tokens.")
    retention_after, retention_before = _num(after, "retention", "loss"), _num(before, "retention", "loss")
    if retention_after is not None and retention_before:
        rise = retention_after / retention_before - 1
        if rise > RETENTION_RISE_REL:
            out.append(f"General-text loss rose from {retention_before:.4f} to {retention_after:.4f} ({rise:+.1%}) "
                       f"on {_get(after, 'retention', 'source') or 'the retention text'}: "
                       "some general ability was lost (catastrophic forgetting).")
    loss_after, loss_before = _num(after, "loss", "loss"), _num(before, "loss", "loss")
    if loss_after is not None and loss_before is not None and loss_after >= loss_before:
        out.append(f"Held-out loss did not improve ({loss_before:.4f} before, {loss_after:.4f} after).")
    verbatim = _num(after, "memorization", "verbatim_share")
    if verbatim:
        out.append(f"{verbatim:.1%} of held-out answers copy a training response verbatim: a memorization signal.")
    if prompts:
        out.append(f"Measured on {int(prompts)} held-out prompts from the same data as training: "
                   "quality on other kinds of prompts is not measured.")
    return out


# =========================================================================== the model card


def _md(text) -> str:
    """Text from files as Markdown that stays text: no emphasis, links, images, tables or HTML."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"([\\`*\[\]<>|&!~#])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)  # an underscore inside a word emphasizes nothing


def _code(text) -> str:
    """An inline code span that holds any text (backticks included) literally."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fence(text: str, language: str = "") -> str:
    ticks = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def fmt(value, kind: str = "float") -> str:
    if value is None:
        return "n/a"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "share":
        return f"{value:.1%}"
    if kind == "seconds":
        return duration(value)
    return f"{value:.4g}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


CARD_SECTIONS = ("Summary", "Dataset characteristics", "Training parameters", "Results before and after",
                 "Warning signs during training", "Known limitations", "How to use", "Framework versions")


def card_metadata(run: Run) -> dict:
    meta: dict = {}
    if base_model_hub_id(run):
        meta["base_model"] = base_model_hub_id(run)
    if dataset_ids(run):
        meta["datasets"] = dataset_ids(run)
    meta["library_name"] = "peft" if run.is_adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["sftlab", "trl", "sft"] + (["lora"] if run.is_adapter else [])
    if base_license(run):
        meta["license"] = base_license(run)
    return meta


def model_card(run: Run, status: Status | None = None) -> str:
    """The Hugging Face model card: YAML front matter, then the sections in CARD_SECTIONS."""
    status = status or run_status(run)
    front = yaml.safe_dump(card_metadata(run), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---", f"# {_md(run.name)}", _card_summary(run, status), _card_data(run),
             _card_training(run), _card_results(run), _card_warnings(run), _card_limitations(run, status),
             _card_usage(run), *_card_exports(run), _card_versions(run)]
    return "\n\n".join(parts).rstrip() + "\n"


def _card_summary(run: Run, status: Status) -> str:
    facts = training_facts(run)
    base = base_model(run)
    lines = ["## Summary", ""]
    sentence = (f"A fine-tune of {_code(base) if base else 'an unknown base model'} "
                f"({'LoRA adapter' if run.is_adapter else 'full fine-tune'}) by supervised fine-tuning with TRL's "
                f"`SFTTrainer`, run and documented by sftlab")
    rows = _num(run.audit, "splits", "train", "rows")
    if rows is not None:
        sentence += f", on {int(rows):,} training examples"
    if facts["steps"]:
        sentence += f": {facts['steps']:,} steps"
        if facts["epochs"] is not None:
            sentence += f" ({facts['epochs']:.2f} epochs"
            sentence += f", {int(facts['trained_tokens'][1]):,} trained tokens)" if facts["trained_tokens"] else ")"
    lines.append(sentence + ".")
    if run.verdict:
        lines += ["", f"**Verdict: {_md(run.verdict['headline'])}.**"]
        lines += [f"- caveat: {_md(caveat)}" for caveat in run.verdict["caveats"]]
    lines += ["", f"**Status: {_md(status.headline)}.**"]
    loss_before, loss_after = _num(run.before, "loss", "loss"), _num(run.after, "loss", "loss")
    if loss_after is not None:
        change = f"from {loss_before:.4f} to {loss_after:.4f}" if loss_before is not None else f"{loss_after:.4f}"
        lines += ["", f"Held-out loss {change}" + _summary_adherence(run) + "."]
    if run.missing or run.unreadable:
        lines += ["", "Missing from this card (it says only what the run directory holds):", ""]
        lines += [f"- {_md(item)}" for item in run.missing + [f"{u} (unreadable)" for u in run.unreadable]]
    return "\n".join(lines)


def _summary_adherence(run: Run) -> str:
    for key, label in (("format", "answers following eval.format"), ("chat", "answers that end their turn")):
        after, before = _num(run.after, "adherence", key), _num(run.before, "adherence", key)
        if after is not None:
            return f"; {label} " + (f"from {before:.1%} to {after:.1%}" if before is not None else f"{after:.1%}")
    return ""


def _card_data(run: Run) -> str:
    lines = ["## Dataset characteristics", ""]
    audit = run.audit
    if audit is None:
        return "\n".join(lines + [f"Unknown: {_AUDIT} is missing or unreadable."])
    train_rows, eval_rows = _num(audit, "splits", "train", "rows"), _num(audit, "splits", "eval", "rows")
    lines.append(f"- Train: {fmt(train_rows, 'int')} examples, {fmt(_num(audit, 'splits', 'train', 'tokens'), 'int')} tokens; "
                 f"held-out eval: {fmt(eval_rows, 'int')} examples, {fmt(_num(audit, 'splits', 'eval', 'tokens'), 'int')} tokens.")
    formats = _get(audit, "formats") or {}
    sources = _get(audit, "sources") or {}
    if isinstance(sources, dict) and sources:
        lines.append("- Sources:")
        for label, counts in sources.items():
            fmt_name = formats.get(label, "?") if isinstance(formats, dict) else "?"
            lines.append(f"  - source {_code(label)}: format {_code(fmt_name)}, {fmt(_num(counts, 'usable'), 'int')} usable "
                         f"of {fmt(_num(counts, 'rows'), 'int')} rows")
    dropped = _num(audit, "dropped", "count")
    if dropped is not None:
        reasons = _get(audit, "dropped", "reasons") or {}
        detail = ", ".join(f"{_md(k)}: {v}" for k, v in reasons.items()) if isinstance(reasons, dict) else ""
        lines.append(f"- Rows dropped as unusable: {int(dropped):,}" + (f" ({detail})" if detail else "") + ".")
    exact, near, leak = (_num(audit, "duplicates", key) for key in ("exact", "near", "leakage"))
    if exact is not None or near is not None:
        lines.append(f"- Duplicates removed: {fmt(exact, 'int')} exact, {fmt(near, 'int')} near-exact; "
                     f"training rows also in eval, removed: {fmt(leak, 'int')}.")
    share, trained = _num(audit, "trained_token_share"), _num(audit, "trained_tokens")
    if share is not None:
        lines.append(f"- Trained tokens: {fmt(trained, 'int')} ({share:.1%} of all tokens; the rest is prompt and template).")
    cut = _get(audit, "truncation")
    if isinstance(cut, dict) and cut.get("max_length"):
        lines.append(f"- max_length {cut.get('max_length')}: {fmt(_num(cut, 'examples_over'), 'int')} examples longer, "
                     f"{fmt(_num(cut, 'tokens_cut'), 'int')} tokens cut ({fmt(_num(cut, 'trained_tokens_cut'), 'int')} trained).")
    lengths = _get(audit, "lengths")
    if isinstance(lengths, dict):
        lines += ["", "Token lengths of the training examples:", "",
                  "| tokens | min | median | p95 | max | mean |", "|---|---|---|---|---|---|"]
        for part in ("prompt", "response", "total"):
            lines.append(f"| {part} | " + " | ".join(fmt(_num(lengths, part, key), "float")
                                                   for key in ("min", "median", "p95", "max", "mean")) + " |")
    warnings = _get(audit, "warnings")
    if isinstance(warnings, list) and warnings:
        lines += ["", "Data warnings:", ""] + [f"- {_md(w)}" for w in warnings]
    return "\n".join(lines)


def _card_training(run: Run) -> str:
    lines = ["## Training parameters", ""]
    params = training_parameters(run)
    if params:
        lines += ["| parameter | value |", "|---|---|"] + [f"| {_md(k)} | {_md(v)} |" for k, v in params]
    else:
        lines.append(f"Unknown: {CONFIG_FILE} is missing or unreadable.")
    facts = training_facts(run)
    lines += ["", f"- Hardware: {_md(hardware(run))}."]
    if facts["runtime"] is not None:
        seconds = f" ({facts['runtime']:,.0f} s)" if facts["runtime"] >= 60 else ""
        lines.append(f"- Duration: {duration(facts['runtime'])} of training{seconds}.")
    elif facts["runtime_estimate"] is not None:
        lines.append(f"- Duration: about {duration(facts['runtime_estimate'])} from the start to the last log "
                     "(the run did not record its end).")
    else:
        lines.append("- Duration: not recorded.")
    if facts["trained_tokens"]:
        step, tokens = facts["trained_tokens"]
        seen = facts["tokens_seen"]
        lines.append(f"- Tokens trained: {int(tokens):,} (the response tokens the loss was computed on, at step {step})"
                     + (f"; {int(seen[1]):,} tokens seen in all" if seen else "") + ".")
    if facts["tokens_per_second"] is not None:
        lines.append(f"- Throughput: {facts['tokens_per_second']:,.0f} tokens/s (median of {facts['speed_logs']} logged intervals).")
    if facts["train_loss"]:
        lines.append(f"- Train loss at the last log (step {facts['train_loss'][0]}): {facts['train_loss'][1]:.4f}"
                     + (f"; mean over the run {facts['mean_train_loss']:.4f}" if facts["mean_train_loss"] is not None else "")
                     + ".")
    if facts["eval_loss"]:
        best_step, best = facts["best_eval_loss"]
        lines.append(f"- Eval loss at the last evaluation (step {facts['eval_loss'][0]}): {facts['eval_loss'][1]:.4f}; "
                     f"best {best:.4f} at step {best_step}.")
    return "\n".join(lines)


def _card_results(run: Run) -> str:
    lines = ["## Results before and after", ""]
    rows = results(run)
    if not rows:
        return "\n".join(lines + ["Not measured: " + ", ".join(
            name for name, value in ((_BEFORE, run.before), (_AFTER, run.after)) if value is None)
            + " missing or unreadable."])
    setup = evaluation_setup(run)
    if setup:
        lines += [f"Evaluated on {_md(setup)}.", ""]
    # Runs evaluated without the prompted baseline (eval.prompted_baseline: false, or older runs) get the
    # two-model table rather than a column of n/a.
    prompted = run.prompted is not None
    header = (["metric", "base model (before)"] + (["prompted base model"] if prompted else [])
              + ["fine-tuned (after)", "change vs base"] + (["change vs prompted"] if prompted else []))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = f"**{row['label']}** (primary)" if row["primary"] else row["label"]
        changes = [row[key] + (f" ({row[key.replace('change', 'verdict')]})" if row[key.replace("change", "verdict")]
                               else "") for key in (("change", "change_prompted") if prompted else ("change",))]
        cells = [label, row["before"]] + ([row["prompted"]] if prompted else []) + [row["after"], *changes]
        lines.append("| " + " | ".join(cells) + " |")
    if run.verdict:
        lines += ["", f"Verdict on the primary metric: {_md(run.verdict['headline'])}."]
        lines += [f"- {_md(reason)}" for reason in run.verdict["reasons"]]
    if run.before is None:
        lines += ["", f"No baseline: {_BEFORE} is missing (eval.baseline)."]
    if run.prompted is None:
        lines += ["", f"No prompted baseline: {_PROMPTED} is missing (eval.prompted_baseline)."]
    elif isinstance(_get(run.prompted, "prompting"), dict):
        prompting = run.prompted["prompting"]
        lines += ["", f"The prompted base model answered each prompt with {fmt(_num(prompting, 'shots'), 'int')} "
                  "training examples before it as earlier turns"
                  + (f" and the system prompt {_code(prompting.get('system_prompt'))}"
                     if isinstance(prompting.get("system_prompt"), str) else "") + "."]
    return "\n".join(lines)


def _card_warnings(run: Run) -> str:
    lines = ["## Warning signs during training", ""]
    if run.diagnosis is None:
        return "\n".join(lines + ["Unknown: no metrics were logged."])
    diagnosis = run.diagnosis
    lines.append(f"Phase at the end: {_md(diagnosis.phase.replace('_', ' '))}"
                 + (f" ({_md(diagnosis.summary)})" if diagnosis.summary else "") + f"; diagnosis {_md(run.diagnosis_source)}.")
    lines.append("")
    for finding in diagnosis.findings:
        lines.append(f"- **{_md(finding.code)}** ({_md(finding.severity)}, steps {finding.steps[0]}-{finding.steps[1]}): "
                     f"{_md(finding.evidence)}")
        if finding.severity != "info":
            lines += [f"  - {_md(advice)}" for advice in finding.advice]
    if not diagnosis.findings:
        lines.append("- none")
    lines += [f"- note: {_md(note)}" for note in diagnosis.notes]
    if run.stopped:
        lines.append(f"- **stopped early** at step {_md(run.stopped.get('step'))}: {_md(run.stopped.get('reason'))} "
                     f"({_md(run.stopped.get('evidence', ''))})")
    return "\n".join(lines)


def _card_limitations(run: Run, status: Status) -> str:
    items = known_limitations(run, status)
    return "\n".join(["## Known limitations", "", *(f"- {_md(item)}" for item in items or ["None measured."])])


def _card_usage(run: Run) -> str:
    lines = ["## How to use", ""]
    if not run.has_final:
        lines += [f"There is no final model in this run directory ({FINAL_DIR}/ is missing); once one exists:", ""]
    lines += [_fence(usage_snippet(run), "python"),
              "", "The chat template is the tokenizer's own, saved with the model: `apply_chat_template` formats the "
                  "conversation exactly as in training."]
    return "\n".join(lines)


def usage_snippet(run: Run) -> str:
    path = repr(str(run.final_dir.resolve()))
    if run.is_adapter:
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model_path = {path}  # or the hub id you push it to\n"
                "tokenizer = AutoTokenizer.from_pretrained(model_path)\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(model_path)  # loads the base model, then the adapter\n")
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model_path = {path}  # or the hub id you push it to\n"
                "tokenizer = AutoTokenizer.from_pretrained(model_path)\n"
                "model = AutoModelForCausalLM.from_pretrained(model_path)\n")
    max_new_tokens = int(_num(run.after, "max_new_tokens") or _num(run.config, "eval", "max_new_tokens") or 64)
    return load + (
        "\nmessages = [{\"role\": \"user\", \"content\": \"Hello! What can you do?\"}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
        f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n")


def exported_files(run_dir: str | Path) -> list[dict]:
    """The exports `sftlab export` recorded in RUN_DIR/exports.json, each {command, format, output, source,
    files: [{path, bytes, size}]}; [] when none or unreadable (entries of the wrong shape are skipped)."""
    try:
        exports = json.loads((Path(run_dir) / EXPORTS_FILE).read_text(encoding="utf-8")).get("exports")
    except (OSError, ValueError, AttributeError):
        return []
    shown = []
    for entry in exports if isinstance(exports, list) else []:
        files = [item for item in (entry.get("files") if isinstance(entry, dict) else None) or []
                 if isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("bytes"), int)]
        if files and isinstance(entry.get("command"), str):
            shown.append({"command": entry["command"], "format": str(entry.get("format", "")),
                          "output": str(entry.get("output", "")), "source": str(entry.get("source", "")),
                          "files": [{**item, "size": _file_size(item["bytes"])} for item in files]})
    return shown


def _file_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _card_exports(run: Run) -> list[str]:
    exports = exported_files(run.path)
    if not exports:
        return []
    lines = ["## Exported files", ""]
    for export in exports:
        source = f" from {_md(export['source'])}" if export["source"] else ""
        lines += [f"Made with {_code(export['command'])}{source}:", ""]
        lines += [f"- {_code(item['path'])}: {item['size']} ({item['bytes']:,} bytes)" for item in export["files"]]
        lines.append("")
    return ["\n".join(lines).rstrip()]


def _card_versions(run: Run) -> str:
    versions, source = framework_versions(run)
    return "\n".join(["## Framework versions", "", f"Versions {_md(source)}:", "",
                      *(f"- {_md(name)}: {_md(version)}" for name, version in versions.items())])


# =========================================================================== the HTML report


def render_html(run: Run, card: str, status: Status | None = None, live: bool = False) -> str:
    import jinja2
    from markupsafe import Markup

    status = status or run_status(run)
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    samples, samples_source = side_by_side(run)
    front, body = _split_card(card)
    return environment.get_template("report.html.j2").render(
        run=run, status=status, name=run.name, generated=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        audit=run.audit, audit_view=_audit_view(run.audit), params=training_parameters(run), hardware=hardware(run),
        facts=training_facts(run), plots={name: base64.b64encode(png).decode("ascii") for name, png in run.plots.items()},
        diagnosis=run.diagnosis, results=results(run), evaluation_setup=evaluation_setup(run),
        samples=samples[:SAMPLES_SHOWN], samples_total=len(samples), samples_source=samples_source,
        limitations=known_limitations(run, status), card_front=front, card_html=Markup(_markdown_to_html(body)),
        fmt=fmt, duration=duration, final_dir=FINAL_DIR, eval_samples_file=_EVAL_SAMPLES,
        verdict=run.verdict, live=live, refresh_seconds=LIVE_REFRESH_SECONDS,
        has_prompted=run.prompted is not None or any(s.get("prompted_output") is not None for s in samples),
        exports=exported_files(run.path),
    )


def _split_card(card: str) -> tuple[str, str]:
    match = re.match(r"---\n(.*?\n)---\n", card, flags=re.DOTALL)
    return (match.group(1), card[match.end():]) if match else ("", card)


def _markdown_to_html(markdown: str) -> str:
    """CommonMark with tables; raw HTML shows as text, and no link or image can point anywhere."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["image", "link", "autolink"])
    return renderer.render(markdown)


def _audit_view(audit: dict | None) -> dict | None:
    """The audit with every part the template shows checked for shape (files may hold anything)."""
    if audit is None:
        return None
    sources = _get(audit, "sources") if isinstance(_get(audit, "sources"), dict) else {}
    formats = _get(audit, "formats") if isinstance(_get(audit, "formats"), dict) else {}
    lengths = [(part, [fmt(_num(audit, "lengths", part, key)) for key in ("min", "median", "p95", "max", "mean")])
               for part in ("prompt", "response", "total")]
    problems = [p for p in _list(audit, "problems") if isinstance(p, dict)]
    duplicates = [d for d in _list(audit, "duplicates", "examples") if isinstance(d, dict)]
    examples = []
    for example in _list(audit, "examples"):
        segments = [s for s in _list(example, "segments") if isinstance(s, dict)]
        if segments:
            examples.append({"where": f"{_get(example, 'source')}:{_get(example, 'line')}",
                             "segments": [(str(s.get("text", "")), bool(s.get("trained"))) for s in segments]})
    reasons = _get(audit, "dropped", "reasons")
    return {
        "train_rows": fmt(_num(audit, "splits", "train", "rows"), "int"),
        "train_tokens": fmt(_num(audit, "splits", "train", "tokens"), "int"),
        "eval_rows": fmt(_num(audit, "splits", "eval", "rows"), "int"),
        "eval_tokens": fmt(_num(audit, "splits", "eval", "tokens"), "int"),
        "sources": [(str(label), str(formats.get(label, "?")), fmt(_num(counts, "rows"), "int"), fmt(_num(counts, "usable"), "int"))
                    for label, counts in sources.items()],
        "dropped": fmt(_num(audit, "dropped", "count"), "int"),
        "dropped_reasons": [(str(k), str(v)) for k, v in reasons.items()] if isinstance(reasons, dict) else [],
        "problems": [(str(p.get("file")), str(p.get("line")), str(p.get("message"))) for p in problems[:PROBLEMS_SHOWN]],
        "problems_total": len(problems),
        "exact": fmt(_num(audit, "duplicates", "exact"), "int"), "near": fmt(_num(audit, "duplicates", "near"), "int"),
        "leakage": fmt(_num(audit, "duplicates", "leakage"), "int"),
        "duplicate_examples": [(str(d.get("kind")), str(d.get("again")), str(d.get("first"))) for d in duplicates[:5]],
        "lengths": lengths,
        "max_length": _get(audit, "truncation", "max_length"),
        "examples_over": fmt(_num(audit, "truncation", "examples_over"), "int"),
        "tokens_cut": fmt(_num(audit, "truncation", "tokens_cut"), "int"),
        "trained_tokens_cut": fmt(_num(audit, "truncation", "trained_tokens_cut"), "int"),
        "trained_tokens": fmt(_num(audit, "trained_tokens"), "int"),
        "trained_share": fmt(_num(audit, "trained_token_share"), "share"),
        "warnings": [str(w) for w in _list(audit, "warnings")],
        "examples": examples,
    }


# =========================================================================== writing


@dataclass
class ReportResult:
    html: Path
    card: Path | None  # None when there is no final model to put it in
    status: Status
    missing: list[str]
    unreadable: list[str]


def write_report(run_dir: str | Path, live: bool = False) -> ReportResult:
    """Write final/README.md (when final/ exists) and report.html from the run directory alone.

    `live`: written during training, the page says so and reloads itself every
    LIVE_REFRESH_SECONDS; the card is left for the end of the run.
    """
    run = read_run(run_dir)
    status = run_status(run)
    card = model_card(run, status)
    card_path = None
    if run.has_final and not live:
        card_path = run.final_dir / CARD_FILE
        _write_atomically(card_path, card)
    html_path = run.path / REPORT_FILE
    _write_atomically(html_path, render_html(run, card, status, live=live))
    return ReportResult(html=html_path, card=card_path, status=status, missing=run.missing, unreadable=run.unreadable)


def _write_atomically(path: Path, text: str) -> None:
    try:
        write_atomically(path, text)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}",
                        hint="check the permissions and free space of the run directory") from None


def write_audit(run_dir: str | Path, audit: dict) -> Path:
    """eval/audit.json: the data audit (`sftlab check --json`), written by training, main process only."""
    path = Path(run_dir) / EVAL_DIR / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(audit, indent=2))
    return path


def write_run_info(run_dir: str | Path, args, plan: dict | None = None) -> Path:
    """run_info.json: what the run directory cannot tell afterwards. Written by training, main process only.

    The hardware, the framework versions, the resolved training arguments (TRL's SFTConfig,
    after sftlab's defaults), the plan and the start time; a resumed run keeps the first
    start time and lists each resumption.
    """
    path = Path(run_dir) / RUN_INFO_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = {
        "started_at": previous.get("started_at", now) if isinstance(previous, dict) else now,
        "resumed_at": [*previous.get("resumed_at", []), now] if isinstance(previous, dict) and previous else [],
        "hardware": _hardware_now(args),
        "precision": "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32",
        "versions": current_versions(),
        "training_args": {name: _plain(getattr(args, name)) for name in RECORDED_ARGS if hasattr(args, name)},
        "plan": plan,
    }
    _write_atomically(path, json.dumps(info, indent=2, default=str))
    return path


RECORDED_ARGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "weight_decay",
                 "max_grad_norm", "optim", "max_length", "packing", "activation_checkpointing", "seed",
                 "logging_steps", "eval_steps", "save_steps")


def _plain(value):
    value = getattr(value, "value", value)  # enums (lr_scheduler_type, optim) as their names
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _hardware_now(args) -> dict:
    import platform

    import torch

    info = {"device": str(getattr(args, "device", "cpu")), "cpu_count": os.cpu_count(),
            "processes": getattr(args, "world_size", 1), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
