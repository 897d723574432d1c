"""Evaluating runs: the base model before training, the tuned one after it, and `sftlab eval` later.

    train.py   evaluate_before_training: eval/before.json, then eval/prompted.json (each once: a
               resumed run keeps them); evaluate_after_training: eval/after.json, samples.jsonl,
               verdict.json, and the comparison printed
    sftlab eval RUN_DIR                       evaluate_run: final/ again, and whatever is missing
    sftlab eval --model PATH --config CONFIG  evaluate_model_path: any model on a config's eval data

Trade-offs:
- Both models are measured in the model's own dtype: the tuned model in memory loses the
  bf16 autocast wrapper training may have given it, so before and after compare.
- Under DeepSpeed ZeRO-3 no process holds whole weights: the run is evaluated afterwards,
  with `sftlab eval RUN_DIR`, instead of during training.
"""

from __future__ import annotations

from pathlib import Path

from sftlab.config import ModelConfig, SftlabConfig, load_config
from sftlab.contracts import EvalSummary
from sftlab.data import preparation_settings, prepare_data
from sftlab.diagnose import diagnose, read_history
from sftlab.errors import DataError, UserError
from sftlab.evaluate.compare import new_console, print_comparison, say
from sftlab.evaluate.finished import load_final_model, open_finished_run
from sftlab.evaluate.held_out import HeldOut, held_out_set
from sftlab.evaluate.one_model import Evaluation, evaluate_model
from sftlab.evaluate.results import (
    SIDE_FILES,
    EvalResult,
    decide_in_memory,
    samples_rows,
    write_evaluation,
    write_verdict,
)
from sftlab.model import load_model, load_tokenizer
from sftlab.rundir import (
    BEFORE_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    EVAL_SAMPLES_FILE,
    FINAL_DIR,
    PROMPTED_FILE,
    VERDICT_FILE,
    has_model,
    is_adapter,
    read_json_object,
)
from sftlab.templates import add_default_chat_template


def evaluate_before_training(
    run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None, console=None
) -> dict | None:
    """The base model, before the first step: eval/before.json, then the prompted base model
    (eval/prompted.json), and their halves of eval/samples.jsonl.

    Skipped without eval data, each with its setting off, and on resume when its file exists.
    """
    console = console or new_console()
    if held_out is None:
        say(console, "no eval data: the models will not be evaluated (set data.eval or data.eval_split)")
        return None
    eval_dir = Path(run_dir) / EVAL_DIR
    wanted = [
        side
        for side, on in (("base", cfg.eval.baseline), ("prompted", held_out.prompted is not None))
        if on and not (eval_dir / SIDE_FILES[side]).exists()
    ]
    if not wanted:
        return None
    if weights_partitioned():
        say(
            console,
            "DeepSpeed ZeRO-3 spreads each weight over the processes: evaluate the run once it has "
            "finished, with `sftlab eval RUN_DIR`",
        )
        return None
    summary = None
    for side in wanted:
        summary = _evaluate_base(run_dir, model, tokenizer, cfg, held_out, console, prompted=side == "prompted")
    return summary


def _evaluate_base(
    run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut, console, prompted: bool = False
) -> dict:
    eval_dir = Path(run_dir) / EVAL_DIR
    what = f"the base model prompted with {held_out.prompted.shots} examples" if prompted else "the base model"
    say(console, f"evaluating {what} on {len(held_out.prompts)} held-out prompts...")
    before = read_json_object(eval_dir / BEFORE_FILE) if prompted else None
    retention = before.get("retention") if before else None  # the same weights: their retention, measured once
    evaluation = evaluate_model(
        model,
        tokenizer,
        cfg.eval,
        held_out,
        "prompted" if prompted else "before",
        cfg.model.name_or_path,
        step=0,
        seed=cfg.training.get("seed", 42),
        prompted=prompted,
        retention=retention if isinstance(retention, dict) else None,
    )
    write_evaluation(eval_dir, held_out, {"prompted" if prompted else "base": evaluation})
    say(
        console,
        f"{what} evaluated in {evaluation.summary['seconds']:.1f} s: "
        f"{eval_dir / (PROMPTED_FILE if prompted else BEFORE_FILE)}",
    )
    return evaluation.summary


def evaluate_after_training(
    run_dir: Path, model, tokenizer, cfg: SftlabConfig, held_out: HeldOut | None, step: int | None, console=None
) -> EvalResult | None:
    """The tuned model: eval/after.json, eval/samples.jsonl, eval/verdict.json, and the verdict and the
    table printed.

    `model` is the trained model in memory; None loads final/ (after an early stop, or
    when the weights are spread over several processes).
    """
    console = console or new_console()
    final_dir = Path(run_dir) / FINAL_DIR
    if held_out is None:
        return None
    if not has_model(final_dir):
        say(console, f"no final model in {final_dir}: the tuned model is not evaluated")
        return None
    if weights_partitioned():
        return None
    if model is None:
        model = load_final_model(final_dir, cfg.model, tokenizer)
    else:
        from accelerate.utils import extract_model_from_parallel

        # Training may have wrapped forward in bf16 autocast: measure in the model's own dtype, as the base was.
        model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    say(console, f"evaluating the tuned model on {len(held_out.prompts)} held-out prompts...")
    after = evaluate_model(
        model, tokenizer, cfg.eval, held_out, "after", str(final_dir), step=step, seed=cfg.training.get("seed", 42)
    )
    eval_dir = Path(run_dir) / EVAL_DIR
    samples = write_evaluation(eval_dir, held_out, {"tuned": after})
    records, training_samples = read_history(Path(run_dir))
    findings = diagnose(records, training_samples, memorization_loss=cfg.monitor.memorization_loss).findings
    verdict = write_verdict(eval_dir, cfg, samples, findings)
    summaries = {side: read_json_object(eval_dir / SIDE_FILES[side]) for side in ("base", "prompted")}
    print_comparison({**summaries, "tuned": after.summary}, samples, verdict, console, cfg.eval.show_samples)
    return EvalResult(after.summary, verdict)


def evaluate_run(
    run_dir: Path, baseline: bool | None = None, overrides: list[str] = (), console=None
) -> EvalResult | None:
    """`sftlab eval RUN_DIR`: evaluate final/ again (after.json), the base model when before.json is missing,
    the prompted base model when prompted.json is, and the verdict."""
    run_dir = Path(run_dir)
    cfg, final_dir, tokenizer = open_finished_run(run_dir, overrides)
    console = console or new_console()
    held_out = _require_held_out(cfg, tokenizer, run_dir / CONFIG_FILE)
    eval_dir = run_dir / EVAL_DIR
    wanted = [
        side
        for side, on in (
            ("base", baseline if baseline is not None else cfg.eval.baseline),
            ("prompted", baseline is not False and held_out.prompted is not None),
        )
        if on and not (eval_dir / SIDE_FILES[side]).exists()
    ]
    if wanted:
        base_model = load_model(cfg.model, tokenizer)
        for side in wanted:
            _evaluate_base(run_dir, base_model, tokenizer, cfg, held_out, console, prompted=side == "prompted")
        del base_model
    previous = EvalSummary.parse(read_json_object(eval_dir / SIDE_FILES["tuned"]))
    step = previous.step if previous is not None and previous.model == str(final_dir) else None
    return evaluate_after_training(run_dir, None, tokenizer, cfg, held_out, step, console)


def evaluate_model_path(
    model_path: str | None,
    config_path: Path,
    baseline: bool = False,
    output: Path | None = None,
    overrides: list[str] = (),
    console=None,
) -> EvalResult:
    """`sftlab eval --model PATH_OR_ID --config CONFIG`: any model (or a LoRA adapter, on the config's model)
    on the config's eval data; without `model_path`, the config's own model. With `baseline`, the
    config's model is evaluated too, side by side, plain and prompted, and the verdict given."""
    cfg = load_config(config_path, list(overrides))
    console = console or new_console()
    if output is not None:
        names = (*SIDE_FILES.values(), EVAL_SAMPLES_FILE, VERDICT_FILE)
        taken = [Path(output) / name for name in names if (Path(output) / name).exists()]
        if taken:
            raise UserError(
                f"{taken[0]} already exists", hint="choose another --output directory; nothing is overwritten"
            )
    model_path = model_path or cfg.model.name_or_path
    path = Path(model_path).expanduser()
    adapter = is_adapter(path)
    if adapter:  # a LoRA adapter goes on the config's model; its tokenizer is saved next to it, when it is
        model_cfg = cfg.model
        tokenizer_cfg = ModelConfig(name_or_path=str(path)) if (path / "tokenizer_config.json").is_file() else cfg.model
    elif model_path == cfg.model.name_or_path:
        model_cfg = tokenizer_cfg = cfg.model
    else:
        other = {"name_or_path": model_path, "gguf_file": None, "revision": None}
        model_cfg = tokenizer_cfg = cfg.model.model_copy(update=other)
    tokenizer = load_tokenizer(tokenizer_cfg)
    add_default_chat_template(tokenizer)
    held_out = _require_held_out(cfg, tokenizer, config_path)
    seed = cfg.training.get("seed", 42)
    evaluations: dict[str, Evaluation] = {}
    if baseline:
        base_model = load_model(cfg.model, tokenizer)
        say(console, f"evaluating {cfg.model.name_or_path} on {len(held_out.prompts)} held-out prompts...")
        evaluations["base"] = evaluate_model(
            base_model, tokenizer, cfg.eval, held_out, "before", cfg.model.name_or_path, step=0, seed=seed
        )
        if held_out.prompted is not None:
            say(console, f"evaluating {cfg.model.name_or_path} prompted with {held_out.prompted.shots} examples...")
            evaluations["prompted"] = evaluate_model(
                base_model,
                tokenizer,
                cfg.eval,
                held_out,
                "prompted",
                cfg.model.name_or_path,
                step=0,
                seed=seed,
                prompted=True,
                retention=evaluations["base"].summary["retention"],
            )
        del base_model
    model = load_final_model(path, cfg.model, tokenizer) if adapter else load_model(model_cfg, tokenizer)
    say(console, f"evaluating {model_path} on {len(held_out.prompts)} held-out prompts...")
    evaluations["tuned"] = evaluate_model(
        model, tokenizer, cfg.eval, held_out, "after", model_path, step=None, seed=seed
    )
    samples = samples_rows(held_out, {side: evaluation.answers for side, evaluation in evaluations.items()})
    verdict = None
    if output is not None:
        write_evaluation(Path(output), held_out, evaluations)
        verdict = write_verdict(Path(output), cfg, samples) if baseline else None
    elif baseline:
        verdict = decide_in_memory(cfg, samples, {side: e.summary for side, e in evaluations.items()})
    summaries = {side: evaluation.summary for side, evaluation in evaluations.items()}
    print_comparison(summaries, samples, verdict, console, cfg.eval.show_samples)
    return EvalResult(evaluations["tuned"].summary, verdict)


def _require_held_out(cfg: SftlabConfig, tokenizer, config_path: Path) -> HeldOut:
    data = prepare_data(cfg.data, tokenizer, **preparation_settings(cfg.training))  # as training prepares it
    held_out = held_out_set(cfg, tokenizer, data)
    if held_out is None:
        raise DataError(f"{config_path}: no eval data to evaluate on", hint="set data.eval, or data.eval_split above 0")
    return held_out


def weights_partitioned() -> bool:
    """Under DeepSpeed ZeRO-3 each process holds a slice of every weight: one process alone cannot generate."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())
