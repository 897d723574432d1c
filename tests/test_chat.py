import io

import pytest

from sftlab.chat import chat, load_tuned, reply
from sftlab.config import load_config
from sftlab.errors import UserError
from sftlab.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    from conftest import chat_rows, tiny_config_file, write_jsonl

    root = tmp_path_factory.mktemp("chat")
    data = write_jsonl(root / "train.jsonl", chat_rows(24))
    config = tiny_config_file(
        root / "c.yaml",
        tiny_model,
        data,
        data={"eval_split": 0},
        training={"max_steps": 4, "save_steps": 4},
    )
    return train(load_config(config)).run_dir


def test_chat_streams_each_answer_keeps_the_conversation_and_starts_over_on_reset(trained_run):
    out = io.StringIO()
    messages = chat(
        trained_run,
        lines=["What is 3 plus 3?", "And 4 plus 4?", "/reset", "What is 5 plus 5?", "/exit", "never read"],
        out=out,
        max_new_tokens=8,
    )
    text = out.getvalue()
    assert text.count("model> ") == 3 and "(new conversation)" in text
    # After /reset only the last exchange remains, and what was streamed is what the model said.
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "What is 5 plus 5?"
    assert messages[1]["content"] in text.split("model> ")[-1]


def test_a_turn_is_rendered_with_the_chat_template_and_greedy_answers_repeat(trained_run):
    model, tokenizer = load_tuned(trained_run)
    conversation = [{"role": "user", "content": "What is 7 plus 7?"}]
    first = reply(model, tokenizer, conversation, max_new_tokens=8)
    assert first == reply(model, tokenizer, conversation, max_new_tokens=8)
    assert "<|im_start|>" not in first and "<|im_end|>" not in first


def test_chat_needs_a_finished_run(tmp_path, trained_run):
    with pytest.raises(UserError, match="not an sftlab run directory"):
        load_tuned(tmp_path)
    (tmp_path / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no final model"):
        load_tuned(tmp_path)


def test_sftlab_chat_reads_the_terminal_until_end_of_input(trained_run):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "chat", str(trained_run), "--max-new-tokens", "4"],
        input="What is 2 plus 2?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "model> " in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "chat", str(trained_run / "nope")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
