"""Text from data and generations reaches the terminal literally: never parsed as markup, never obeyed.

The hostile inputs are the ones met in the wild: Mistral's `[INST]`/`[/INST]` (a closing tag
to rich's markup parser, which crashed `sftlab check`), `[bold red]` (restyled the output),
`:smile:` (an emoji code), `\\x1b[2J` (clears the screen), OSC `\\x1b]0;...\\x07` (retitles
the terminal), C1 controls (`\\x9b` is a one-byte CSI), `\\r` and backspace (overwrite what
was printed), bidi overrides (reorder it).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sftlab.terminal import BIDI_CONTROLS, literal, visible

HOSTILE = [
    "[/INST]",
    "[INST] hi [/INST]",
    "[bold red]x[/]",
    "[/url]",
    "[link=file:///etc]y[/link]",
    ":smile:",
    "\x1b[2J",
    "\x1b]0;pwned\x07",
    "\x1b]8;;http://evil\x1b\\",
    "\x9b31m",
    "\r",
    "\x08\x08",
    "\u202e",
    "\x00",
    "\x7f",
    "\\[",
    "\\",
    "[",
    "]",
]
# rich's own styling: Select Graphic Rendition sequences. Anything else that starts with ESC came from the data.
RICH_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def unsafe(character: str, multiline: bool) -> bool:
    if multiline and character == "\n":
        return False
    return (unicodedata.category(character) in {"Cc", "Cs"} and character != "\t") or character in BIDI_CONTROLS


hostile_text = st.lists(
    st.one_of(
        st.sampled_from(HOSTILE),
        st.text(max_size=8),
        st.characters(min_codepoint=0, max_codepoint=0x9F),
        st.sampled_from(list(BIDI_CONTROLS)),
    ),
    max_size=12,
).map("".join)


def printed(renderable, width: int = 10_000) -> str:
    """What a colour terminal receives, rich's own style sequences removed."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=width, highlight=False)
    console.print(renderable, soft_wrap=True)
    return RICH_STYLE.sub("", out.getvalue())


# =========================================================================== the function


@given(hostile_text, st.booleans())
def test_visible_leaves_no_character_a_terminal_would_obey(text, multiline):
    shown = visible(text, multiline=multiline)
    assert not any(unsafe(character, multiline) for character in shown)
    shown.encode("utf-8")  # lone surrogates are escaped too: the text can always be written out


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=BIDI_CONTROLS)))
def test_visible_text_is_unchanged(text):
    assert visible(text) == text


def test_visible_writes_python_escapes():
    hostile = "a\x1b[2Jb\x1b]0;t\x07\r\x08\x9b\u202e\ud800"
    assert visible(hostile) == "a\\x1b[2Jb\\x1b]0;t\\x07\\r\\x08\\x9b\\u202e\\ud800"
    assert visible("one\ntwo\tthree") == "one\\ntwo\tthree"
    assert visible("one\ntwo\tthree", multiline=True) == "one\ntwo\tthree"


@given(hostile_text, st.booleans())
def test_printed_output_is_the_text_shown_literally(text, multiline):
    # Everything the terminal gets, besides rich's own styles, is the text with its controls escaped: no ESC, BEL or C1
    # byte from the data, brackets and emoji codes as written.
    output = printed(literal(("label", "bold red"), ": ", text, multiline=multiline))
    expected = "label: " + visible(text, multiline=multiline)
    assert output == "\n".join(line.expandtabs(8) for line in expected.split("\n")) + "\n"
    assert not any(unsafe(character, multiline=True) for character in output)


# =========================================================================== the call sites


def hostile_audit(text: str) -> dict:
    """An audit as `check` builds it, with the hostile text wherever data can reach."""
    lengths = {"min": 1, "median": 2, "p95": 3, "max": 4}
    return {
        "ok": True,
        "cached": False,
        "splits": {"train": {"rows": 1, "tokens": 10}, "eval": {"rows": 0, "tokens": 0}},
        "formats": {f"data/{text}.jsonl": "messages"},
        "sources": {f"data/{text}.jsonl": {"usable": 1, "rows": 2}},
        "dropped": {"count": 1, "reasons": {f"bad {text}": 1}},
        "problems": [{"file": f"data/{text}.jsonl", "line": 2, "message": f"missing field '{text}'"}],
        "duplicates": {"examples": [{"kind": "exact", "again": f"{text}:3", "first": f"{text}:1"}]},
        "lengths": {"prompt": lengths, "response": lengths, "total": lengths},
        "truncation": {"max_length": 0},
        "trained_tokens": 5,
        "trained_token_share": 0.5,
        "stop": [{"token": f"<|{text}|>", "examples": 1}],
        "examples": [
            {
                "source": f"{text}.jsonl",
                "line": 1,
                "segments": [
                    {"text": f"[INST] {text} [/INST]", "trained": False},
                    {"text": f"{text}\nline two", "trained": True},
                ],
            }
        ],
        "warnings": [f"rows like {text}"],
        "errors": [],
    }


@pytest.mark.parametrize("colour", [True, False])
def test_check_output_shows_data_literally(colour):
    from rich.console import Console

    from sftlab.cli import _print_audit

    # An explicit console: rich's own terminal detection depends on the environment the suite runs in.
    out = io.StringIO()
    console = Console(file=out, force_terminal=colour, width=10_000, highlight=False, soft_wrap=True)
    text = "".join(HOSTILE)
    _print_audit(hostile_audit(text), console)
    output = RICH_STYLE.sub("", out.getvalue())
    assert not any(unsafe(character, multiline=True) for character in output)
    one_line = visible(text)
    assert f"data/{one_line}.jsonl: messages" in output and f"missing field '{one_line}'" in output
    assert f"[INST] {one_line} [/INST]" in output and "line two" in output
    assert f"stop trained: <|{one_line}|> in 1 of 1 examples" in output
    assert ("⟦" in output) is not colour  # without colour the trained part is bracketed


def test_eval_samples_and_notes_show_data_literally():
    from rich.console import Console

    from sftlab.evaluate import print_comparison
    from sftlab.monitor import ProgressBar
    from sftlab.train import print_note

    # (short: answers are clipped; no \r: an answer's lines are joined with " | " to show it on one line)
    text = "[/INST] [bold red]x[/] :smile: \x1b[2J \x1b]0;pwned\x07 \x9b31m\x08 \u202eend"
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=10_000)
    after = {"num_prompts": 1, "max_new_tokens": 8, "retention": {"source": f"{text}.txt"}}
    print_comparison(
        {"base": None, "tuned": after},
        [{"prompt": text, "reference": text, "tuned_output": f"{text}\n{text}"}],
        console=console,
    )
    print_note(f"resuming from {text}", console, warning=True)
    ProgressBar(console).say(("overfitting", "yellow"), f": {text}")
    output = RICH_STYLE.sub("", out.getvalue())
    assert not any(unsafe(character, multiline=True) for character in output)
    assert output.count(visible(text)) == 7 and "warning: resuming from " in output and "overfitting: " in output


def test_chat_streams_generated_escape_sequences_as_text(tiny_model):
    import torch
    from transformers import AutoTokenizer

    from sftlab.chat import reply

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generated = "[/INST] \x1b[2J\x1b]0;pwned\x07 ok\nnext line"

    class Speaker:  # generates a fixed, hostile answer through the real streamer
        device = "cpu"

        def generate(self, input_ids, streamer=None, **_):
            answer = torch.tensor([tokenizer(generated, add_special_tokens=False)["input_ids"]])
            streamer.put(input_ids)
            streamer.put(answer[0])
            streamer.end()
            return torch.cat([input_ids, answer], dim=1)

    out = io.StringIO()
    answer = reply(Speaker(), tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=8, out=out)
    assert answer == generated  # the conversation keeps what the model said ...
    assert out.getvalue() == visible(generated, multiline=True)  # ... the terminal sees it escaped, lines kept


MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def mistral_style_model(tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("mistral-style"), chat_template=MISTRAL)


def test_sftlab_check_of_hostile_data_on_a_mistral_template_exits_0_showing_it_literally(tmp_path, mistral_style_model):
    # Piped, as in `sftlab check c.yaml | less`: the case that crashed with rich.errors.MarkupError on '[/INST]'
    # (the colour path is checked in process above).
    hostile = "[bold red]x[/] \x1b[2J \x1b]0;pwned\x07 [/url]"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} {hostile}"},
                {"role": "assistant", "content": f"Answer {i} [/INST] \x9b31m"},
            ]
        }
        for i in range(12)
    ]
    data = tmp_path / "[bold]rows\x1b[2J.jsonl"  # the file name is data too
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(mistral_style_model)},
                "data": {"train": str(data)},
                "training": {"max_length": 128},
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTLAB_NO_CACHE": "1", "COLUMNS": "10000"}
    env.pop("FORCE_COLOR", None)
    result = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "check", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    output = RICH_STYLE.sub("", result.stdout)
    assert not any(unsafe(character, multiline=True) for character in output)
    # (which rows are shown depends on the seeded eval split: any training row will do)
    assert any(
        visible(f"[INST] Question {i} {hostile} [/INST]") in output and f"⟦Answer {i} [/INST] \\x9b31m" in output
        for i in range(12)
    )
    assert visible(f"{data}: messages, 12 of 12 rows usable") in output
