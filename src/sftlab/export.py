"""Export: the tuned model out of the run directory, in the forms people run models in.

    sftlab export RUN_DIR --format merged  ->  RUN_DIR/export/merged/             safetensors, tokenizer, chat template
    sftlab export RUN_DIR --format gguf    ->  RUN_DIR/export/gguf-f16/NAME-f16.gguf  and an Ollama Modelfile

The embedded model arrives as GGUF; this closes the loop, GGUF in, fine-tune, GGUF out. `merged`
is a LoRA run's adapter folded into its base model (peft's `merge_and_unload`), or a full
fine-tune's final/ in the dtype asked for: one directory `from_pretrained` loads without peft.
`gguf` is one file for llama.cpp, Ollama and LM Studio (see export_gguf.py for what it holds),
f16 or q8_0, with a Modelfile beside it so that `ollama create NAME -f Modelfile` works unedited.

Each export is recorded in RUN_DIR/exports.json (the files, their sizes, the command), and the
model card and report.html are rebuilt so that they list it.

Trade-offs:
- The model is loaded in float32 and a LoRA adapter merged there, whatever dtype is written: the
  merged weights then reproduce the adapter's logits (to 1e-4, tests/test_export.py) at the cost
  of 4 bytes per parameter in memory while exporting.
- Nothing is overwritten without `--force`, and `--force` replaces a merged directory only when an
  earlier `sftlab export` wrote it (its sftlab_export.json): a directory of the user's is never deleted.
  Files are written under temporary names and renamed when complete, so a kill leaves no half file.
- The Modelfile's TEMPLATE (Ollama's Go-template syntax) is written only for ChatML, the template
  of SmolLM2, Qwen2 and sftlab's default, recognised by rendering probe conversations with the
  model's own template (a default system prompt included). For any other template it is left out
  and Ollama uses the one embedded in the GGUF when it recognises it; the Modelfile says so.
- Sampling defaults in the Modelfile are the evaluation's (greedy unless eval.do_sample), so Ollama
  answers as the measured model did.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftlab.errors import UserError
from sftlab.export_gguf import QUANTS, write_gguf
from sftlab.rundir import EXPORT_DIR, FINAL_DIR
from sftlab.templates import ollama_template

FORMATS = ("merged", "gguf")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODELFILE = "Modelfile"
MERGED_MARKER = "sftlab_export.json"  # in a merged directory: sftlab wrote it, so --force may replace it


@dataclass
class ExportedFile:
    path: str  # relative to the run directory when inside it
    bytes: int


@dataclass
class ExportResult:
    format: str
    output: Path  # the .gguf file, or the merged directory
    command: str  # the `sftlab export` command line that makes this export
    files: list[ExportedFile] = field(default_factory=list)
    modelfile: Path | None = None
    source: str = ""  # what was exported: final/, or final/'s adapter merged into its base
    notes: list[str] = field(default_factory=list)


def export_run(
    run_dir: str | Path,
    format: str = "gguf",
    output: str | Path | None = None,
    quant: str | None = None,
    dtype: str = "auto",
    force: bool = False,
) -> ExportResult:
    """`sftlab export`: write a finished run's model as a merged directory or a GGUF file (+ Modelfile)."""
    from sftlab.evaluate import open_finished_run

    run_dir = Path(run_dir)
    _refuse_bad_options(format, quant, dtype)
    quant = quant or "f16"
    cfg, final_dir, tokenizer = open_finished_run(run_dir)
    command = export_command(run_dir, format, output, quant, dtype)
    if format == "gguf":
        target = _gguf_target(run_dir, output, quant)
        taken = [path for path in (target, target.with_name(MODELFILE)) if path.exists()]
        _refuse_inside_final(target, final_dir)
    else:
        default = run_dir / EXPORT_DIR / ("merged" if dtype == "auto" else f"merged-{dtype}")
        target = Path(output) if output is not None else default
        taken = [target] if target.is_file() or (target.is_dir() and any(target.iterdir())) else []
        _refuse_inside_final(target, final_dir)
    if taken and not force:
        raise UserError(
            f"{taken[0]} already exists; nothing was overwritten",
            hint="pass --force to replace it, or --output to write somewhere else",
        )
    if format == "merged" and taken:
        _refuse_replacing_foreign_directory(target)

    model, source = load_for_export(cfg, final_dir, tokenizer)
    result = ExportResult(format=format, output=target, command=command, source=source)
    if format == "gguf":
        target.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(model, tokenizer, final_dir, target, quant=quant, name=run_dir.resolve().name)
        modelfile, note = modelfile_text(target.name, tokenizer, cfg.eval, command)
        result.modelfile = target.with_name(MODELFILE)
        _write_text_atomically(result.modelfile, modelfile)
        result.notes += [note] if note else []
        written = [target, result.modelfile]
    else:
        save_merged(model, tokenizer, target, _merged_dtype(dtype, final_dir), command)
        written = sorted(path for path in target.rglob("*") if path.is_file())
    result.files = [ExportedFile(_shown(path, run_dir), path.stat().st_size) for path in written]
    record_export(
        run_dir, result, quant=quant if format == "gguf" else None, dtype=dtype if format == "merged" else None
    )
    _rebuild_report(run_dir)
    return result


def _refuse_bad_options(format: str, quant: str | None, dtype: str) -> None:
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}", hint=f"--format takes one of: {', '.join(FORMATS)}")
    if quant is not None and quant not in QUANTS:
        raise UserError(f"unknown GGUF quantization {quant!r}", hint=f"--quant takes one of: {', '.join(QUANTS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", hint=f"--dtype takes one of: {', '.join(DTYPES)}")
    if format == "merged" and quant is not None:
        raise UserError("--quant is for --format gguf", hint="a merged export takes --dtype float32|float16|bfloat16")
    if format == "gguf" and dtype != "auto":
        raise UserError("--dtype is for --format merged", hint="a GGUF export takes --quant f16|q8_0")


def export_command(run_dir: Path, format: str, output, quant: str, dtype: str) -> str:
    """The command line that makes this export, for the record and the model card."""
    parts = ["sftlab", "export", str(run_dir), "--format", format]
    if format == "gguf":
        parts += ["--quant", quant]
    elif dtype != "auto":
        parts += ["--dtype", dtype]
    if output is not None:
        parts += ["--output", str(output)]
    return shlex.join(parts)


def _gguf_target(run_dir: Path, output, quant: str) -> Path:
    name = f"{run_dir.resolve().name}-{quant}.gguf"
    if output is None:
        return run_dir / EXPORT_DIR / f"gguf-{quant}" / name
    output = Path(output)
    return output if output.suffix == ".gguf" else output / name


def _refuse_inside_final(target: Path, final_dir: Path) -> None:
    if target.resolve().is_relative_to(final_dir.resolve()):
        raise UserError(
            f"{target} is inside {final_dir}: an export there would change the run's model directory",
            hint="choose an --output outside final/",
        )


def _refuse_replacing_foreign_directory(target: Path) -> None:
    if not (target / MERGED_MARKER).is_file():
        raise UserError(
            f"{target} exists and was not written by `sftlab export`; sftlab does not delete it",
            hint="choose another --output, or remove the directory yourself",
        )


# =========================================================================== the model


def load_for_export(cfg, final_dir: Path, tokenizer):
    """final/ in float32, a LoRA adapter merged into its base model. Returns (model, what it is)."""
    from sftlab.evaluate import load_final_model

    base = cfg.model.model_copy(update={"dtype": "float32"})
    model = load_final_model(final_dir, base, tokenizer)
    if hasattr(model, "merge_and_unload"):  # a peft model: fold the adapter into the base weights
        model = model.merge_and_unload()
        source = f"{FINAL_DIR}/ (LoRA adapter) merged into {cfg.model.name_or_path}"
    else:
        source = f"{FINAL_DIR}/ (full fine-tune)"
    model.eval()
    return model, source


def _merged_dtype(dtype: str, final_dir: Path) -> str:
    """`auto`: the dtype final/ was saved in (a full fine-tune), float32 for a merged adapter."""
    if dtype != "auto":
        return dtype
    try:
        saved = json.loads((final_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    value = saved.get("dtype") or saved.get("torch_dtype")
    return value if value in DTYPES[1:] else "float32"


def save_merged(model, tokenizer, target: Path, dtype: str, command: str) -> None:
    """save_pretrained (safetensors) with the tokenizer and chat template, into a temporary directory
    renamed into place, so a kill leaves the old directory or the new one."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.to(getattr(torch, dtype)).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        marker = json.dumps({"command": command, "dtype": dtype}, indent=2)
        (partial / MERGED_MARKER).write_text(marker, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # checked before: empty, or an earlier sftlab export asked to be replaced
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# =========================================================================== Ollama


def modelfile_text(gguf_name: str, tokenizer, eval_cfg, command: str) -> tuple[str, str | None]:
    """An Ollama Modelfile for the GGUF next to it, and a note when the template had to be left out."""
    from sftlab.generation import stop_token_ids

    stops = [tokenizer.convert_ids_to_tokens(token_id) for token_id in stop_token_ids(tokenizer)]
    template = ollama_template(tokenizer)
    lines = [
        f"# Ollama Modelfile written by `{command}`",
        f"# ollama create NAME -f {MODELFILE}",
        "",
        f"FROM ./{gguf_name}",
        "",
    ]
    note = None
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        note = (
            "the chat template is not ChatML, so the Modelfile has no TEMPLATE: Ollama uses the template embedded "
            "in the GGUF when it recognises it (check with `ollama show NAME --template`)"
        )
        lines += [f"# No TEMPLATE: {note}.", ""]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    # The evaluation's decoding, so Ollama answers as the measured model did.
    if eval_cfg.do_sample:
        lines += [f"PARAMETER temperature {eval_cfg.temperature:g}", f"PARAMETER top_p {eval_cfg.top_p:g}"]
    else:
        lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n", note


# =========================================================================== the record


def record_export(run_dir: Path, result: ExportResult, quant: str | None, dtype: str | None) -> Path:
    """Add (or replace, for the same output) this export in RUN_DIR/exports.json, atomically."""
    from sftlab.rundir import EXPORTS_FILE, write_atomically

    path = run_dir / EXPORTS_FILE
    try:
        existing = json.loads(path.read_text(encoding="utf-8")).get("exports", [])
    except (OSError, ValueError, AttributeError):
        existing = []
    output = _shown(result.output, run_dir)
    entry = {
        "format": result.format,
        "quant": quant,
        "dtype": dtype,
        "output": output,
        "command": result.command,
        "source": result.source,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "files": [asdict(file) for file in result.files],
    }
    kept = [item for item in existing if isinstance(item, dict) and item.get("output") != output]
    write_atomically(path, json.dumps({"exports": [*kept, entry]}, indent=2, ensure_ascii=False))
    return path


def _rebuild_report(run_dir: Path) -> None:
    from sftlab.report import write_report

    write_report(run_dir)


def _shown(path: Path, run_dir: Path) -> str:
    """A path as the record shows it: relative to the run directory when inside it."""
    resolved, root = Path(path).resolve(), Path(run_dir).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def _write_text_atomically(path: Path, text: str) -> None:
    from sftlab.rundir import write_atomically

    write_atomically(path, text)
