"""Tests with the real embedded SmolLM2-135M-Instruct (GGUF, dequantized). Marked slow."""

import json

import pytest

from conftest import write_jsonl
from sftlab.config import load_config

pytestmark = pytest.mark.slow


def test_a_config_without_model_section_checks_its_data_with_the_embedded_default(tmp_path):
    from sftlab.config import EMBEDDED_MODEL
    from sftlab.demo import DEMO_DIR
    from sftlab.train import check

    # (the demo test below trains the embedded model; here: that it is the default, with its tokenizer)
    rows = [json.loads(line) for line in (DEMO_DIR / "train.jsonl").read_text().splitlines()[:40]]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    (tmp_path / "c.yaml").write_text(f"data:\n  train: {data}\ntraining:\n  max_length: 128\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.name_or_path == EMBEDDED_MODEL
    audit = check(cfg)
    assert audit["ok"] and audit["splits"]["train"]["rows"] + audit["splits"]["eval"]["rows"] == 40
    assert [stop["token"] for stop in audit["stop"]] == ["<|im_end|>"]  # SmolLM2's end of turn is trained


def test_the_demo_pipeline_checks_evaluates_trains_evaluates_again_and_reports(tmp_path):
    from sftlab.demo import run_demo

    audits = []
    cut_down = [
        "training.max_steps=2",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.logging_steps=1",
        "eval.num_prompts=3",
        "eval.max_new_tokens=8",
        "monitor.sample_prompts=1",
    ]
    result = run_demo(tmp_path / "demo", overrides=cut_down, show_audit=audits.append)
    assert audits and audits[0]["ok"] and audits[0]["splits"]["eval"]["rows"] == 100
    run = result.run_dir
    before = json.loads((run / "eval" / "before.json").read_text())
    after = json.loads((run / "eval" / "after.json").read_text())
    assert before["num_prompts"] == after["num_prompts"] == 3
    assert before["adherence"]["format_spec"]["type"] == "json_schema"
    assert len((run / "eval" / "samples.jsonl").read_text().splitlines()) == 3
    assert (run / "report.html").exists() and (run / "final" / "README.md").exists()

    # The tuned model loads from final/ without sftlab and answers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    messages = [{"role": "user", "content": "Who is in this text? Ana Lopez, 31, lives in Lima."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
