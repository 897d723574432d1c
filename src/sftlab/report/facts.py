"""Facts: what the run says about itself, computed from the typed run (report/run.py) and nothing else.

The status (complete, stopped early, incomplete), the base model and its hub id and
license, the datasets, the training parameters as the training process received them,
the hardware, duration, tokens and throughput as logged, the framework versions and the
exported files. The card and the HTML show these (and report/results.py's table);
neither computes anything of its own.

Trade-offs:
- Every number is one the run recorded; a fact the run did not record is None and shown
  as such, never estimated, except a killed run's duration (from its start to its last
  log, and said to be so).
- metrics.jsonl records stay mappings (the Trainer's log keys vary by version and
  setting); `number` is the one check that a logged value is a usable number.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftlab.config import EMBEDDED_MODEL
from sftlab.report.run import Run
from sftlab.resolve import current_versions
from sftlab.rundir import CARD_FILE, EXPORTS_FILE, FINAL_DIR, METRICS_FILE, RUN_INFO_FILE, read_json_object

# The embedded default model is SmolLM2-135M-Instruct: its hub id and license go into the card.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"


def number(value) -> float | None:
    """A logged value when it is a finite number (not a bool); files may hold anything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _last(records: list[dict], key: str) -> tuple[int, float] | None:
    values = [(r["step"], r[key]) for r in records if number(r.get(key)) is not None]
    return values[-1] if values else None


# =========================================================================== status


@dataclass
class Status:
    state: str  # "complete" | "stopped_early" | "incomplete" | "no_final_model"
    headline: str
    last_step: int
    planned_steps: int | None


def run_status(run: Run) -> Status:
    last_step = max((r["step"] for r in run.records), default=0)
    planned = planned_steps(run)
    of = f" of {planned:,}" if planned else ""
    finished = any("train_runtime" in r for r in run.records)
    if not finished:
        if not run.records:
            return Status("incomplete", "incomplete: training did not finish (nothing was logged)", 0, planned)
        return Status(
            "incomplete",
            f"incomplete: training did not finish (last logged step {last_step:,}{of})",
            last_step,
            planned,
        )
    if run.stopped:
        reason = run.stopped.reason or "unknown reason"
        keeps = (
            "the last good checkpoint"
            if reason == "instability"
            else "the checkpoint with the lowest eval loss, where one was saved"
        )
        kept = f"; {FINAL_DIR}/ holds {keeps}" if run.has_final else "; no final model was saved"
        step = run.stopped.step if run.stopped.step is not None else last_step
        return Status("stopped_early", f"stopped early at step {step}{of}: {reason}{kept}", last_step, planned)
    if not run.has_final:
        return Status(
            "no_final_model",
            f"training ended at step {last_step:,}{of}, but no final model was saved",
            last_step,
            planned,
        )
    return Status("complete", f"complete: trained {last_step:,}{of} steps", last_step, planned)


def planned_steps(run: Run) -> int | None:
    """The run's own plan, else the Trainer's max_steps (a killed run's checkpoint), else the config's."""
    plan = run.run_info.plan.steps if run.run_info.plan else None
    state = number((run.trainer_state or {}).get("max_steps"))
    for value in (plan, state, number(run.config.training.get("max_steps"))):
        if value and value > 0:
            return int(value)
    return None


# =========================================================================== the base model and data


def base_model(run: Run) -> str | None:
    return run.config.model.name_or_path or None


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

    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name))
        and Path(name).suffix.lower() not in FILE_SUFFIXES
        and not name.endswith(".gguf")
    )


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
        sources = run.config.data.get(key)
        for source in sources if isinstance(sources, list) else [sources]:
            path = source.get("path") if isinstance(source, dict) else source
            if isinstance(path, str) and _looks_like_hub_id(path) and "/" in path and not _is_local(path):
                ids.append(path)
    return list(dict.fromkeys(ids))


# =========================================================================== training


@dataclass
class TrainingFacts:
    """Duration, tokens and throughput, as logged; (step, value) pairs where the step matters."""

    steps: int
    epochs: float | None
    runtime: float | None
    runtime_estimate: float | None
    trained_tokens: tuple[int, float] | None
    tokens_seen: tuple[int, float] | None
    tokens_per_second: float | None
    speed_logs: int
    train_loss: tuple[int, float] | None
    mean_train_loss: float | None
    eval_loss: tuple[int, float] | None
    best_eval_loss: tuple[int, float] | None


def training_facts(run: Run) -> TrainingFacts:
    summary = next((r for r in reversed(run.records) if "train_runtime" in r), None)
    speeds = [r["tokens_per_second"] for r in run.records if number(r.get("tokens_per_second"))]
    epoch = _last(run.records, "epoch")
    evals = [(r["step"], r["eval_loss"]) for r in run.records if number(r.get("eval_loss")) is not None]
    return TrainingFacts(
        steps=max((r["step"] for r in run.records), default=0),
        epochs=epoch[1] if epoch else None,
        runtime=number(summary.get("train_runtime")) if summary else None,
        runtime_estimate=None if summary else _runtime_estimate(run),
        trained_tokens=_last(run.records, "trained_tokens"),
        tokens_seen=_last(run.records, "num_tokens"),
        tokens_per_second=statistics.median(speeds) if speeds else None,
        speed_logs=len(speeds),
        train_loss=_last(run.records, "loss"),
        mean_train_loss=number(summary.get("train_loss")) if summary else None,
        eval_loss=evals[-1] if evals else None,
        best_eval_loss=min(evals, key=lambda e: e[1]) if evals else None,
    )


def _runtime_estimate(run: Run) -> float | None:
    """For a run without its end-of-training record: from its start to its last log."""
    started = run.run_info.started_at
    metrics = run.path / METRICS_FILE
    if started is None or not metrics.exists():
        return None
    try:
        start = dt.datetime.fromisoformat(started).timestamp()
    except ValueError:
        return None
    seconds = metrics.stat().st_mtime - start
    return seconds if seconds > 0 else None


TRAINING_KEYS = (
    "weight_decay",
    "max_grad_norm",
    "optim",
    "max_length",
    "packing",
    "assistant_only_loss",
    "seed",
    "logging_steps",
    "eval_steps",
    "save_steps",
)


def training_parameters(run: Run) -> list[tuple[str, str]]:
    """The resolved settings that matter, as (name, value): the training process's own arguments where recorded."""
    training, args = run.config.training, run.run_info.training_args

    def value(key):
        return args.get(key, training.get(key))

    rows = []
    name = base_model(run)
    if name:
        gguf = run.config.model.gguf_file
        rows.append(
            (
                "base model",
                name + (f" ({gguf})" if gguf else "") + (f" = {EMBEDDED_HUB_ID}" if name == EMBEDDED_MODEL else ""),
            )
        )
    rows.append(("method", _method(run.config.lora)))
    max_steps = value("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        rows.append(("max_steps", f"{max_steps} (takes precedence over num_train_epochs)"))
    else:
        rows.append(("num_train_epochs", str(value("num_train_epochs"))))
    processes = (run.hardware.processes if run.hardware else None) or number(args.get("world_size"))
    batch, accumulation = value("per_device_train_batch_size"), value("gradient_accumulation_steps") or 1
    rows.append(("per_device_train_batch_size", str(batch)))
    rows.append(("gradient_accumulation_steps", str(accumulation)))
    if isinstance(batch, int) and isinstance(accumulation, int):
        total = batch * accumulation * int(processes or 1)
        rows.append(
            (
                "effective batch (rows per optimizer step)",
                f"{total}" + (f" ({int(processes)} processes)" if processes and processes > 1 else ""),
            )
        )
    rows += [(key, str(value(key))) for key in ("learning_rate", "lr_scheduler_type") if value(key) is not None]
    if training.get("warmup_ratio") is not None:
        rows.append(("warmup_ratio", str(training["warmup_ratio"])))
    elif value("warmup_steps") is not None:
        rows.append(("warmup_steps", str(value("warmup_steps"))))
    rows += [(key, str(value(key))) for key in TRAINING_KEYS if value(key) is not None]
    if run.run_info.precision:
        rows.append(("precision", run.run_info.precision))
    if value("activation_checkpointing") is not None:
        rows.append(("activation_checkpointing", str(value("activation_checkpointing"))))
    if run.config.monitor.stop_on:
        rows.append(("monitor.stop_on", ", ".join(run.config.monitor.stop_on)))
    return rows


def _method(lora: dict | None) -> str:
    if lora is None:
        return "full fine-tune (every weight trained)"
    return (
        f"LoRA: r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}, "
        f"lora_dropout={lora.get('lora_dropout')}, target_modules={lora.get('target_modules')}"
    )


def hardware(run: Run) -> str:
    info = run.hardware
    if info is None:
        return f"not recorded ({RUN_INFO_FILE} missing)"
    parts = [f"device {info.device or '?'}"]
    if info.gpus:
        parts.append("GPUs: " + ", ".join(info.gpus))
    if info.cpu_count:
        parts.append(f"{info.cpu_count} CPU cores")
    if info.processes:
        parts.append(f"{info.processes} training process{'es' if info.processes != 1 else ''}")
    if info.platform:
        parts.append(info.platform)
    return "; ".join(parts)


def framework_versions(run: Run) -> tuple[dict[str, str], str]:
    """(versions, where they come from): recorded at training time, or else this environment's."""
    if run.run_info.versions:
        return dict(run.run_info.versions), f"recorded at training time ({RUN_INFO_FILE})"
    return current_versions(), f"of the environment that wrote this report ({RUN_INFO_FILE} is missing)"


# =========================================================================== exports


def exported_files(run_dir: str | Path) -> list[dict]:
    """The exports `sftlab export` recorded in RUN_DIR/exports.json, each {command, format, output, source,
    files: [{path, bytes, size}]}; [] when none or unreadable (entries of the wrong shape are skipped)."""
    exports = (read_json_object(Path(run_dir) / EXPORTS_FILE) or {}).get("exports")
    shown = []
    for entry in exports if isinstance(exports, list) else []:
        files = [
            item
            for item in (entry.get("files") if isinstance(entry, dict) else None) or []
            if isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("bytes"), int)
        ]
        if files and isinstance(entry.get("command"), str):
            shown.append(
                {
                    "command": entry["command"],
                    "format": str(entry.get("format", "")),
                    "output": str(entry.get("output", "")),
                    "source": str(entry.get("source", "")),
                    "files": [{**item, "size": _file_size(item["bytes"])} for item in files],
                }
            )
    return shown


def _file_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
