"""Evaluate: the base model, the base model prompted, and the tuned one, on the same held-out prompts.

The chapter opens by asking whether a prompted model would do, and closes by asking for
held-out evaluation, template adherence, domain knowledge retention and a qualitative
review of outputs, warning that a good loss can hide bad behaviour. Each question gets
a number, for three models, and the verdict (verdict.py) answers the first one:

    RUN_DIR/eval/before.json    the base model (when eval.baseline, the default)
    RUN_DIR/eval/prompted.json  the base model with `shots` training examples before each prompt
                                (eval.prompted_baseline, on by default)
    RUN_DIR/eval/after.json     the tuned model (final/)
    RUN_DIR/eval/samples.jsonl  per held-out prompt: {"prompt", "reference", and for each of base, prompted,
                                tuned: "<side>_output", "<side>_follows_format", "<side>_scores"} (null when
                                that model was not evaluated); the scores are the per-answer metrics the
                                verdict resamples
    RUN_DIR/eval/verdict.json   did it work? (verdict.py)

before.json, prompted.json and after.json share one schema, contracts.EvalSummary (report.py
reads them; a metric that cannot be computed is null, never missing; shares are in [0, 1];
perplexity = exp(loss)):

    {"model": name or path, "label": "before" | "prompted" | "after", "step": int | null,
     "num_prompts": int, "max_new_tokens": int, "seconds": float,
     "prompting":    {"shots", "system_prompt"} | null   how the prompted base model was prompted
     "loss":         {"loss", "perplexity", "tokens"}     held-out loss on the trained tokens
     "adherence":    {"chat", "format", "format_spec"}     answers that end their turn cleanly; that follow eval.format
     "reference":    {"exact_match", "rougeL"}             agreement with the reference responses
     "metrics":      {NAME: mean}                          the user's own metrics (eval.metrics)
     "diversity":    {"distinct_1", "distinct_2", "duplicate_share"}
     "memorization": {"verbatim_share", "mean_longest_common_ngram"}   against the training responses
     "retention":    {"loss", "perplexity", "tokens", "source"}}       loss on general text (eval.retention)

The prompted base model has the same weights as the base model, with `shots` training
examples (a seeded sample, never eval rows) as earlier turns of each conversation, and
eval.prompted_baseline.system_prompt as its system message. Its held-out loss is the loss
of each example's last response with the shots in context (for single-turn data, the
tokens before.json counts); its retention is the base model's (same weights).

The stage, one job a module, in the order a run goes through them:

    held_out.py   the held-out prompts and references, the prompted set, training responses, retention data
    loss.py       the held-out loss on the trained tokens
    one_model.py  one model's answers scored and measured: an EvalSummary
    results.py    eval/'s files (summaries, samples.jsonl, verdict.json), written through rundir
    compare.py    the verdict, the table of the three models and samples, in the terminal
    finished.py   a finished run's tuned model, for `sftlab eval`, chat and export
    runs.py       before and after training, `sftlab eval RUN_DIR`, `sftlab eval --model`

Generation (batching, stop tokens, the prompts) is generation.py's; what a chat template
does is templates.py's.
"""

from sftlab.evaluate.compare import COLUMNS, print_comparison
from sftlab.evaluate.finished import has_model, load_final_model, open_finished_run
from sftlab.evaluate.held_out import (
    MEMORIZATION_MAX_RESPONSES,
    RETENTION_BUILTIN,
    RETENTION_DATA,
    HeldOut,
    PromptedSet,
    choose_shots,
    held_out_set,
    prompted_set,
    retention_data,
    trained_responses,
)
from sftlab.evaluate.loss import LOSS_BATCH_TOKENS, trained_token_loss
from sftlab.evaluate.one_model import (
    ROLE_LINE,
    TURN_OPENING,
    Evaluation,
    answer_scores,
    ends_turn_cleanly,
    evaluate_model,
    leaks_template,
)
from sftlab.evaluate.results import (
    SIDE_FILES,
    SIDES,
    EvalResult,
    decide_in_memory,
    samples_rows,
    write_evaluation,
    write_verdict,
)
from sftlab.evaluate.runs import (
    evaluate_after_training,
    evaluate_before_training,
    evaluate_model_path,
    evaluate_run,
    weights_partitioned,
)
from sftlab.generation import generate_answers
from sftlab.rundir import AFTER_FILE, BEFORE_FILE, EVAL_DIR, PROMPTED_FILE, VERDICT_FILE
from sftlab.rundir import EVAL_SAMPLES_FILE as SAMPLES_FILE
from sftlab.templates import ROLE_NAMES, template_markers

__all__ = [
    "AFTER_FILE",
    "BEFORE_FILE",
    "COLUMNS",
    "EVAL_DIR",
    "LOSS_BATCH_TOKENS",
    "MEMORIZATION_MAX_RESPONSES",
    "PROMPTED_FILE",
    "RETENTION_BUILTIN",
    "RETENTION_DATA",
    "ROLE_LINE",
    "ROLE_NAMES",
    "SAMPLES_FILE",
    "SIDES",
    "SIDE_FILES",
    "TURN_OPENING",
    "VERDICT_FILE",
    "EvalResult",
    "Evaluation",
    "HeldOut",
    "PromptedSet",
    "answer_scores",
    "choose_shots",
    "decide_in_memory",
    "ends_turn_cleanly",
    "evaluate_after_training",
    "evaluate_before_training",
    "evaluate_model",
    "evaluate_model_path",
    "evaluate_run",
    "generate_answers",
    "has_model",
    "held_out_set",
    "leaks_template",
    "load_final_model",
    "open_finished_run",
    "print_comparison",
    "prompted_set",
    "retention_data",
    "samples_rows",
    "template_markers",
    "trained_responses",
    "trained_token_loss",
    "weights_partitioned",
    "write_evaluation",
    "write_verdict",
]
