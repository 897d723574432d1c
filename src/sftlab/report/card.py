"""The model card: final/README.md, a Hugging Face model card built from the run's facts.

As TRL does for its own cards, the card is `huggingface_hub.ModelCard.from_template`
with a `ModelCardData` for the YAML front matter (base_model, datasets, library_name,
pipeline_tag, tags, license) and a Markdown Jinja template shipped with the package
(templates/model_card.md) for the body: summary, dataset characteristics, training
parameters, results before and after, warning signs, known limitations, how to use it,
exported files, framework versions. This module only gathers what the template shows.

Trade-offs:
- Text from the data or from generations is never trusted: the template puts it through
  `md` (escaped) or `code` (a code span), so a dataset holding `<script>` or Markdown shows
  it as text; the HTML renders the card with raw HTML, links and images off as well.
- huggingface_hub writes the front matter in ModelCardData's key order, and drops keys
  whose value is unknown (a local base model has no hub id, so no base_model).
"""

from __future__ import annotations

from importlib import resources

from sftlab.report.facts import (
    Status,
    base_license,
    base_model,
    base_model_hub_id,
    dataset_ids,
    exported_files,
    framework_versions,
    hardware,
    run_status,
    training_facts,
    training_parameters,
)
from sftlab.report.limitations import known_limitations
from sftlab.report.results import evaluation_setup, measured, results
from sftlab.report.run import Run
from sftlab.report.text import code, duration, fence, fmt, md
from sftlab.rundir import AFTER_FILE, AUDIT_FILE, BEFORE_FILE, CONFIG_FILE, FINAL_DIR, PROMPTED_FILE, relative

CARD_TEMPLATE = "model_card.md"
CARD_SECTIONS = (
    "Summary",
    "Dataset characteristics",
    "Training parameters",
    "Results before and after",
    "Warning signs during training",
    "Known limitations",
    "How to use",
    "Framework versions",
)
DEFAULT_MAX_NEW_TOKENS = 64  # in the usage snippet, for runs whose evaluation did not record its own
# The summary's adherence: the task's own format when the run measured it, else ending the turn.
SUMMARY_ADHERENCE = (("format", "answers following eval.format"), ("chat", "answers that end their turn"))


def card_data(run: Run):
    """The card's front matter."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=base_model_hub_id(run),
        datasets=dataset_ids(run) or None,
        library_name="peft" if run.is_adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["sftlab", "trl", "sft"] + (["lora"] if run.is_adapter else []),
        license=base_license(run),
    )


def card_metadata(run: Run) -> dict:
    """The front matter as a mapping."""
    return card_data(run).to_dict()


def model_card(run: Run, status: Status | None = None) -> str:
    """The Hugging Face model card: YAML front matter, then the sections in CARD_SECTIONS."""
    from huggingface_hub import ModelCard

    status = status or run_status(run)
    template = resources.files("sftlab.report").joinpath("templates", CARD_TEMPLATE)
    card = ModelCard.from_template(
        card_data(run), template_str=template.read_text(encoding="utf-8"), **_card_values(run, status)
    )
    card.text = card.text.rstrip() + "\n"
    return card.content


def _card_values(run: Run, status: Status) -> dict:
    """What the template shows, and the helpers it formats with."""
    audit = run.audit
    lengths = [(part, getattr(audit.lengths, part)) for part in ("prompt", "response", "total")] if audit else []
    return {
        "name": run.name,
        "base": base_model(run),
        "is_adapter": run.is_adapter,
        "has_final": run.has_final,
        "status": status,
        "facts": training_facts(run),
        "verdict": run.verdict,
        "audit": audit,
        "lengths": lengths
        if any(value is not None for _, stats in lengths for value in stats.to_json().values())
        else [],
        "loss_before": measured(run.before, "loss", "loss"),
        "loss_after": measured(run.after, "loss", "loss"),
        "adherence": _summary_adherence(run),
        "not_in_card": run.missing + [f"{item} (unreadable)" for item in run.unreadable],
        "params": training_parameters(run),
        "hardware": hardware(run),
        "results": results(run),
        "evaluation_setup": evaluation_setup(run),
        "before": run.before,
        "prompted": run.prompted,
        "unmeasured": [
            relative(name) for name, result in ((BEFORE_FILE, run.before), (AFTER_FILE, run.after)) if result is None
        ],
        "diagnosis": run.diagnosis,
        "diagnosis_source": run.diagnosis_source,
        "stopped": run.stopped,
        "limitations": known_limitations(run, status),
        "usage": usage_snippet(run),
        "exports": exported_files(run.path),
        "versions": framework_versions(run)[0],
        "versions_source": framework_versions(run)[1],
        "audit_file": relative(AUDIT_FILE),
        "before_file": relative(BEFORE_FILE),
        "prompted_file": relative(PROMPTED_FILE),
        "config_file": CONFIG_FILE,
        "final_dir": FINAL_DIR,
        "md": md,
        "code": code,
        "fence": fence,
        "fmt": fmt,
        "duration": duration,
    }


def _summary_adherence(run: Run) -> dict | None:
    for key, label in SUMMARY_ADHERENCE:
        after = measured(run.after, "adherence", key)
        if after is not None:
            return {"label": label, "before": measured(run.before, "adherence", key), "after": after}
    return None


def usage_snippet(run: Run) -> str:
    """Python that loads final/ and answers one message with the model's own chat template."""
    path = repr(str(run.final_dir.resolve()))
    if run.is_adapter:
        load = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f"model_path = {path}  # or the hub id you push it to\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_path)\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(model_path)  # loads the base model, then the adapter\n"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model_path = {path}  # or the hub id you push it to\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_path)\n"
            "model = AutoModelForCausalLM.from_pretrained(model_path)\n"
        )
    max_new_tokens = int(
        (run.after.max_new_tokens if run.after else None) or run.config.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    )
    return load + (
        '\nmessages = [{"role": "user", "content": "Hello! What can you do?"}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)\n"
        f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )
