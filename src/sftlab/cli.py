"""Command line: `sftlab init | check | train | eval | diagnose | report | chat | export | demo`.

Each command is a thin shell over the library function of the same stage, so the CLI
and `from sftlab import ...` run the same steps. Errors the user can cause are
`UserError`s: printed as one message with a hint, exit code 2, no traceback unless
`--debug` is given.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Supervised fine-tuning with TRL that tells you whether the fine-tune worked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (write one with `sftlab init`).")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)."),
]


@app.callback()
def _global_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False):
    """Supervised fine-tuning with TRL that tells you whether the fine-tune worked."""
    _quiet_libraries()


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter config.")] = Path("sftlab.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
):
    """Write a commented starter config whose defaults follow the SFT chapter's advice."""
    from sftlab.config import write_starter_config

    write_starter_config(path, force=force)
    print(f"wrote {path}: edit data.train, then run `sftlab check {path}`")


@app.command()
def check(
    config: ConfigArg,
    set_: SetOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full audit as JSON here.")] = None,
):
    """Load, normalize and tokenize the data exactly as training will, and audit it."""
    from sftlab.config import load_config
    from sftlab.train import check as run_check

    audit = run_check(load_config(config, set_ or []))
    _print_audit(audit)
    if json_out:
        from sftlab.rundir import write_atomically

        write_atomically(json_out, json.dumps(audit, indent=2))
    raise typer.Exit(0 if audit["ok"] else 2)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
):
    """Fine-tune with TRL's SFTTrainer and write a run directory."""
    from sftlab.config import load_config
    from sftlab.train import train as run_train

    result = run_train(load_config(config, set_ or []), resume=resume, overwrite=overwrite)
    if result.is_main_process:
        _print_result(result)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", help="Run directory for the demo.")] = Path("sftlab-demo"),
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo run.")] = False,
):
    """The whole pipeline on the embedded SmolLM2-135M-Instruct and a shipped task, offline:
    check, baseline evaluation, training, evaluation, report."""
    from sftlab.demo import DEMO_CONFIG, run_demo
    from sftlab.rundir import REPORT_FILE

    print(f"sftlab demo: teach the embedded SmolLM2-135M-Instruct the house person record, strict JSON ({DEMO_CONFIG})")
    result = run_demo(output, overrides=set_ or [], overwrite=overwrite, show_audit=_print_audit)
    _print_result(result)
    verdict = _read_verdict(result.run_dir)
    if verdict:
        print(f"verdict: {verdict}")
    report = result.run_dir / REPORT_FILE
    if report.exists():
        print(f"report: {report}\ntalk to the tuned model: sftlab chat {result.run_dir}")
    if result.final_dir.exists():
        print(f"run it in llama.cpp or Ollama: sftlab export {result.run_dir} --format gguf")


@app.command()
def diagnose(
    path: Annotated[
        Path,
        typer.Argument(help="A run directory, a metrics.jsonl, or a trainer_state.json from any transformers/TRL run."),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON.")] = False,
):
    """The phase of a run and its warning signs (overfitting, underfitting, memorization, instability, format)."""
    from sftlab.diagnose import diagnose as run_diagnose
    from sftlab.diagnose import read_history

    records, samples = read_history(path)
    memorization_loss = _configured_memorization_loss(path)
    diagnosis = run_diagnose(records, samples, memorization_loss=memorization_loss)
    from sftlab.terminal import visible  # JSON escapes control characters itself; the text form must too

    print(json.dumps(diagnosis.to_json(), indent=2) if json_out else visible(diagnosis.render(), multiline=True))


@app.command("eval")
def eval_(
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory: evaluates its final/ model again.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Evaluate this model (hub id, directory, .gguf, or a LoRA "
            "adapter for the config's model) instead of a run's.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="With --model (or alone, for the config's own "
            "model): the config whose eval data and eval section are used.",
        ),
    ] = None,
    baseline: Annotated[
        bool | None,
        typer.Option(
            "--baseline/--no-baseline",
            help="Also evaluate the base model "
            "(a run: when eval/before.json is missing, default eval.baseline; --model: the config's model, "
            "default off).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="With --config: write before.json, after.json and "
            "samples.jsonl into this directory (default: print only).",
        ),
    ] = None,
    require: Annotated[
        str | None,
        typer.Option(
            "--require",
            help="Exit 1 unless the verdict is this one "
            "(worked, prompting_suffices, no_gain, regressed): a gate for pipelines.",
        ),
    ] = None,
    set_: SetOption = None,
):
    """Held-out evaluation: loss, chat and format adherence, agreement with references, diversity,
    memorization and retention, for the base, prompted base and tuned model, with samples side by side,
    and the verdict: did the fine-tune work, better than prompting?"""
    from sftlab.errors import UserError
    from sftlab.verdict import VERDICTS

    if require is not None and require not in VERDICTS:
        raise UserError(f"--require {require}: not a verdict", hint=f"one of {', '.join(VERDICTS)}")

    if run_dir is not None and (model is not None or config is not None or output is not None):
        raise UserError(
            "give a run directory, or --model/--config, not both",
            hint="`sftlab eval RUN_DIR` or `sftlab eval --model PATH_OR_ID --config CONFIG`",
        )
    if run_dir is None and config is None:
        raise UserError(
            "nothing to evaluate" if model is None else "--model needs --config: the eval data comes from a config",
            hint="`sftlab eval RUN_DIR` or `sftlab eval --model PATH_OR_ID --config CONFIG`",
        )
    from sftlab.evaluate import evaluate_model_path, evaluate_run
    from sftlab.rundir import AFTER_FILE, EVAL_DIR, EVAL_SAMPLES_FILE, VERDICT_FILE

    if run_dir is not None:
        result = evaluate_run(run_dir, baseline=baseline, overrides=set_ or [])
        from sftlab.report import write_report  # the report shows the evaluation: rebuild it

        report = write_report(run_dir)
        print(f"wrote {run_dir / EVAL_DIR}/ ({AFTER_FILE}, {EVAL_SAMPLES_FILE}, {VERDICT_FILE}) and {report.html}")
    else:
        result = evaluate_model_path(model, config, baseline=bool(baseline), output=output, overrides=set_ or [])
        if output is not None:
            print(f"wrote {output}/")
    if require is not None:
        verdict = result.verdict.verdict if result is not None and result.verdict is not None else "unknown"
        if verdict != require:
            print(f"required verdict {require}, got {verdict}", file=sys.stderr)
            raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (training.output_dir), finished or not.")],
):
    """Write the model card (final/README.md) and report.html from a run directory; also for unfinished runs."""
    from sftlab.report import write_report

    result = write_report(run_dir)
    print(result.status.headline)
    for item in result.missing:
        print(f"missing: {item}")
    for item in result.unreadable:
        print(f"unreadable: {item}")
    print(
        f"wrote {result.card}"
        if result.card
        else "no model card file: there is no final model (the card is in the report)"
    )
    print(f"wrote {result.html}")


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with a final/ model (full or LoRA).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", min=0.0, help="0 (the default) answers greedily, as the evaluation did; above 0 samples."
        ),
    ] = 0.0,
    system: Annotated[
        str | None, typer.Option("--system", help="A system message to start each conversation with.")
    ] = None,
):
    """Talk to the tuned model in the terminal (streamed, multi-turn, its own chat template)."""
    from sftlab.chat import chat as run_chat

    run_chat(run_dir, max_new_tokens=max_new_tokens, temperature=temperature, system=system)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (with final/).")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf: one .gguf file and an Ollama Modelfile, for "
            "llama.cpp, Ollama, LM Studio; merged: safetensors for from_pretrained "
            "(a LoRA adapter merged into its base).",
        ),
    ] = "gguf",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="A .gguf file or a directory (default: RUN_DIR/export/gguf-QUANT/ or RUN_DIR/export/merged/).",
        ),
    ] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF weights: f16 (default) or q8_0.")] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Merged weights: auto (as final/ was saved; float32 for a "
            "merged adapter), float32, float16 or bfloat16.",
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export at the same place.")] = False,
):
    """Export the tuned model: GGUF for llama.cpp and Ollama, or merged safetensors."""
    from sftlab.export import export_run

    result = export_run(run_dir, format=format_, output=output, quant=quant, dtype=dtype, force=force)
    print(f"exported {result.source} as {result.format}:")
    if result.format == "gguf":
        for item in result.files:
            print(f"  {item.path} ({item.bytes:,} bytes)")
        for note in result.notes:
            print(f"note: {note}")
        print(
            f"run it: llama-cli -m {result.output} -cnv\n"
            f"        ollama create {run_dir.resolve().name} -f {result.modelfile}"
        )
    else:
        size = sum(item.bytes for item in result.files) / 1e6
        print(
            f"  {result.output}/ ({len(result.files)} files, {size:,.1f} MB): "
            f"AutoModelForCausalLM.from_pretrained({str(result.output)!r}) loads it"
        )


def _configured_memorization_loss(path: Path) -> float:
    """A run directory's own threshold, when it has a resolved config; else the config's default."""
    from sftlab.config import MonitorConfig
    from sftlab.rundir import CONFIG_FILE, read_yaml_checked

    config = read_yaml_checked(path / CONFIG_FILE)[0] if path.is_dir() else None
    monitor = (config or {}).get("monitor")
    threshold = monitor.get("memorization_loss") if isinstance(monitor, dict) else None
    if isinstance(threshold, (int, float)):
        return float(threshold)
    return MonitorConfig().memorization_loss


def _read_verdict(run_dir: Path) -> str | None:
    from sftlab.rundir import VERDICT_FILE, eval_file, read_json_object

    headline = (read_json_object(eval_file(run_dir, VERDICT_FILE)) or {}).get("headline")
    return headline if isinstance(headline, str) else None


def _print_result(result) -> None:
    from sftlab.terminal import visible

    if result.stopped:
        print(
            visible(
                f"stopped early at step {result.stopped['step']}: {result.stopped['reason']} "
                f"({result.stopped['evidence']})"
            )
        )
    if result.final_dir.exists():
        print(f"trained {result.global_step} steps; final model in {visible(result.final_dir)}")
    else:
        print(f"trained {result.global_step} steps; no final model: no checkpoint was saved before the run stopped")


def _print_audit(audit: dict, console=None) -> None:
    """The audit, short enough to read: what was loaded, what was wrong, what will be trained.

    Everything that came from the data (paths, problems, examples, warnings quoting rows) is printed through
    `literal`: shown as written, never parsed as markup nor obeyed by the terminal.
    """
    from rich.console import Console
    from rich.table import Table

    from sftlab.terminal import literal

    # soft_wrap: a line quoting data (a path, a problem, an example) is never broken by rich; the terminal
    # wraps it, so what is copied from the screen is what is in the file.
    console = console or Console(highlight=False, soft_wrap=True)
    splits = audit["splits"]
    train, held_out = splits["train"], splits["eval"]
    cached = "   (cached)" if audit.get("cached") else ""
    console.print(
        literal(
            ("train", "bold"),
            f" {train['rows']} rows, {train['tokens']:,} tokens   ",
            ("eval", "bold"),
            f" {held_out['rows']} rows{cached}",
        )
    )
    for source, fmt in audit["formats"].items():
        counts = audit["sources"].get(source, {})
        usable, rows = counts.get("usable", "?"), counts.get("rows", "?")
        console.print(literal(f"  {source}: {fmt}, {usable} of {rows} rows usable"))
    if audit["dropped"]["count"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in audit["dropped"]["reasons"].items())
        console.print(literal((f"dropped {audit['dropped']['count']} rows", "yellow"), f": {reasons}"))
    for problem in audit["problems"][:10]:
        console.print(literal(f"  {problem['file']}:{problem['line']}: {problem['message']}"))
    if len(audit["problems"]) > 10:
        console.print(f"  ... and {len(audit['problems']) - 10} more (see --json)")
    for duplicate in audit["duplicates"]["examples"][:3]:
        console.print(literal(f"  {duplicate['kind']} duplicate: {duplicate['again']} repeats {duplicate['first']}"))

    lengths = Table("tokens", "min", "median", "p95", "max", box=None, padding=(0, 2))
    for part in ("prompt", "response", "total"):
        d = audit["lengths"][part]
        lengths.add_row(part, *(f"{d[k]:g}" for k in ("min", "median", "p95", "max")))
    console.print(lengths)
    cut = audit["truncation"]
    if cut["max_length"]:
        console.print(
            f"max_length {cut['max_length']}: {cut['examples_over']} examples longer, "
            f"{cut['tokens_cut']:,} tokens cut ({cut['trained_tokens_cut']:,} trained)"
        )
    console.print(f"trained tokens: {audit['trained_tokens']:,} ({audit['trained_token_share']:.1%})")
    if "stop" in audit:  # what ends a turn, as trained (audits written before issue 16 lack it)
        console.print(literal(f"stop trained: {_stops(audit['stop'], train['rows'])}"))
    for number, example in enumerate(audit["examples"], start=1):
        where = f"{example['source']}:{example['line']}"
        console.print(literal((f"example {number} ({where}), trained part in green:", "dim")))
        console.print(_marked_segments(example["segments"], coloured=console.is_terminal))
    for warning in audit["warnings"]:
        console.print(literal(("warning", "yellow"), f": {warning}"))
    for error in audit["errors"]:
        console.print(literal(("error", "red"), f": {error}"))
    console.print("[green]ok: training can go ahead[/]" if audit["ok"] else "[red]training cannot go ahead[/]")


def _stops(stops: list[dict], rows: int) -> str:
    """'<|im_end|> in 6 of 6 examples': the tokens that end a turn, and how many examples train each."""
    return ", ".join(f"{stop['token']} in {stop['examples']} of {rows} examples" for stop in stops) or "none"


def _marked_segments(segments: list[dict], coloured: bool):
    """An example as trained: trained text in green on a terminal; without colour, between brackets that are
    rare in real data. Multi-line, as the model sees it."""
    from sftlab.terminal import literal

    if coloured:
        return literal(*((s["text"], "bold green" if s["trained"] else "dim") for s in segments), multiline=True)
    return literal("".join(f"⟦{s['text']}⟧" if s["trained"] else s["text"] for s in segments), multiline=True)


# Library messages that say nothing actionable about an sftlab run.
KNOWN_HARMLESS = (
    "mtime may not be reliable",  # checkpoint rotation on filesystems with coarse timestamps
    "'pin_memory' argument is set as true but no accelerator",
    "`is_gradient_checkpointing` is deprecated",  # peft calling transformers' old name
)


class _DropKnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in KNOWN_HARMLESS)


def _quiet_libraries() -> None:
    """Silence known-harmless library noise; real warnings still show, once each."""
    import os
    import warnings

    # Bare tqdm bars (GGUF dequantization) read this at import; sftlab draws its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("once")
    for text in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=".*" + re.escape(text))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_warning()
    # Filters on a handler see the records of every child logger (transformers.trainer, ...).
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_DropKnownHarmless())


def main() -> None:
    from sftlab.errors import UserError
    from sftlab.terminal import visible

    debug = "--debug" in sys.argv
    try:
        app()
    except UserError as error:
        if debug:
            raise
        # messages quote file names and rows: shown, never obeyed by the terminal
        print(f"error: {visible(error.message, multiline=True)}", file=sys.stderr)
        if error.hint:
            print(f"hint: {visible(error.hint, multiline=True)}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as error:  # out of memory outside the steps train() translates itself
        from sftlab.train import is_out_of_memory

        if debug or not is_out_of_memory(error):
            raise
        print(f"error: out of memory ({type(error).__name__})", file=sys.stderr)
        print(
            "hint: free memory (close other programs), use a smaller model, or lower the batch sizes "
            "(training.per_device_train_batch_size, eval.generation_batch_size)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
