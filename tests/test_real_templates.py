"""What sftlab trains for real chat templates of current model families (issue 16).

The templates under tests/fixtures/chat_templates/ were taken unchanged from public
repositories (SOURCES.md lists each with its repository, path, commit and licence). Each
is set on the tiny model's tokenizer (its special tokens added, its BOS and EOS set), a
multi-turn conversation with a system prompt goes through the current data stage
(`render_example`, `tokenize_rendered`, `prepare_data`), and the trained tokens are
compared with what the model has to produce at inference:

- trained: each assistant message's own text and the one token sequence that ends its
  turn (`Case.stops`); never system, user or tool text, never the next turn's header,
  never boilerplate the generation prompt already holds (`Case.leads`: what the model
  itself writes between its generation prompt and the message, usually nothing);
- templates without an end-of-turn marker (GLM) train the stop their generation config
  ends on: the next role marker or EOS;
- text the template appends after the whole conversation (Phi's EOS) does not force one
  example per turn (`Case.pieces`: how many examples the conversation must become);
- templates that need tools give one clear message; templates that print today's date
  render the same text on another day.

Cases sftlab got wrong before issue 16 part 2 say in `rule` what it got wrong and the
general rule (not keyed on the template) that makes it right now.
One tokenizer is shared by all cases: each case sets its template, BOS and EOS, then
restores them.
"""

from __future__ import annotations

import datetime as dt
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftlab.config import DataConfig
from sftlab.data import Example, cache_key, prepare_data, render_example, tokenize_rendered
from sftlab.errors import DataError

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

SYSTEM = "You are a terse math tutor."
TURNS = [("What is 2 plus 2?", "2 plus 2 is 4."), ("And 3 plus 3? Show the sum.", "3 plus 3 is 6:\n3 + 3 = 6")]
CONVERSATION = [{"role": "system", "content": SYSTEM}] + [
    message
    for question, answer in TURNS
    for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
]
ANSWERS = [answer for _, answer in TURNS]


@dataclass(frozen=True)
class Case:
    file: str
    bos: str | None
    eos: str
    special: tuple[str, ...]
    stops: tuple[str, ...]  # the one token sequence that ends an assistant turn (any of these)
    leads: tuple[str, ...] = ("",)  # what the model writes itself before the message, after its generation prompt
    pieces: int = 1  # examples the conversation becomes (more than 1 only where the template rewrites the history)
    rule: str | None = None  # what sftlab got wrong before issue 16 part 2, and the rule that fixed it


MISTRAL = (
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
CHATML = ("<|im_start|>", "<|im_end|>")
THINK = ("<think>", "</think>")
GLM = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    *THINK,
    "<tool_call>",
    "</tool_call>",
    "<|endoftext|>",
)
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
DEEPSEEK = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    *THINK,
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
COHERE = (
    "<BOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|START_RESPONSE|>",
    "<|END_RESPONSE|>",
    "<|START_THINKING|>",
    "<|END_THINKING|>",
    "<|START_ACTION|>",
    "<|END_ACTION|>",
    "<|START_TOOL_RESULT|>",
    "<|END_TOOL_RESULT|>",
)
# GLM-4.5/4.6 generation_config.json: eos_token_id = <|endoftext|>, <|user|>, <|observation|>.
GLM_STOPS = ("<|user|>", "<|endoftext|>", "<|observation|>")
GLM_RULE = (
    "no end-of-turn marker: nothing after the answer was trained; now the next role marker <|user|> "
    "(EOS after the last turn) is. The empty '<think></think>' the template writes before every answer was "
    "trained, though the no-think generation prompt ('<|assistant|>\\n<think></think>') already holds it"
)

CASES = {
    # Mistral Nemo puts the system prompt into the last user message, so only generation prompts show it: the
    # rendering through a turn does not begin with that turn's generation prompt, and the history is rewritten.
    "mistral-nemo": Case(
        "mistral-nemo-instruct-2407.jinja",
        "<s>",
        "</s>",
        ("<s>", "</s>", *MISTRAL),
        ("</s>",),
        pieces=2,
        rule="the span started at the common prefix of prompt and rendering, inside the "
        "user's message ('What is 2 plus 2?[/INST]' was trained) and the system prompt was dropped: "
        "when the rendering through a turn does not begin with its generation prompt, render turn "
        "by turn (prompt + answer + end marker)",
    ),
    "mistral-small-3.1": Case(
        "mistral-small-3.1-24b-instruct-2503.jinja",
        "<s>",
        "</s>",
        ("<s>", "</s>", *MISTRAL, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"),
        ("</s>",),
    ),
    # Qwen3 writes an empty think block into the last assistant turn only: the history is rewritten (turn by turn).
    # The block belongs to the prompt (the no-think generation prompt holds it), so it is not trained.
    "qwen3": Case("qwen3-0.6b.jinja", None, "<|im_end|>", (*CHATML, *THINK), ("<|im_end|>",), pieces=2),
    "qwq": Case("qwq-32b.jinja", None, "<|im_end|>", (*CHATML, *THINK), ("<|im_end|>",)),
    # GLM: the model writes the newline after its no-think generation prompt '<|assistant|>\n<think></think>'.
    "glm-4.5": Case("glm-4.5.jinja", None, "<|endoftext|>", GLM, GLM_STOPS, leads=("\n",), rule=GLM_RULE),
    "glm-4.6": Case("glm-4.6.jinja", None, "<|endoftext|>", GLM, GLM_STOPS, leads=("\n",), rule=GLM_RULE),
    # Command-R7B: the generation prompt is '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'; the model writes
    # <|START_RESPONSE|> itself (it may as well start a plan or an action).
    "command-r7b": Case(
        "command-r7b-12-2024-tool_use.jinja",
        "<BOS_TOKEN>",
        "<|END_OF_TURN_TOKEN|>",
        COHERE,
        ("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",),
        leads=("<|START_RESPONSE|>",),
        rule="the template appends an open assistant header after every conversation, whatever "
        "add_generation_prompt says: that next header was trained, and the renderings were not "
        "prefix-preserving (one example per turn, without <|START_RESPONSE|>): text written only "
        "after the last message belongs to no turn, and a turn ends at EOS",
    ),
    "granite-3.3": Case(
        "granite-3.3-2b-instruct.jinja",
        None,
        "<|end_of_text|>",
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
        ("<|end_of_text|>",),
    ),
    "phi-3.5": Case(
        "phi-3.5-mini-instruct.jinja",
        "<s>",
        "<|endoftext|>",
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        ("<|end|>",),
        rule="the EOS the template appends after the whole conversation broke prefix preservation "
        "(one example per turn) and '\\n<|endoftext|>' was trained after <|end|>: text written only "
        "after the last turn belongs to no turn; renderings are compared without it",
    ),
    "smollm3": Case("smollm3-3b-unsloth.jinja", None, "<|im_end|>", (*CHATML, *THINK), ("<|im_end|>",)),
    "kimi-k2": Case(
        "kimi-k2.jinja",
        None,
        "<|im_end|>",
        ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>"),
        ("<|im_end|>",),
    ),
    # DeepSeek-V3.1: the (non-thinking) generation prompt '<｜Assistant｜></think>' holds the closing think tag.
    "deepseek-v3.1": Case("deepseek-v3.1.jinja", DEEPSEEK[0], DEEPSEEK[1], DEEPSEEK, (DEEPSEEK[1],)),
    "seed-oss": Case(
        "seed-oss.jinja",
        "<seed:bos>",
        "<seed:eos>",
        (
            "<seed:bos>",
            "<seed:eos>",
            "<seed:pad>",
            "<seed:think>",
            "</seed:think>",
            "<seed:tool_call>",
            "</seed:tool_call>",
            "<seed:cot_budget_reflect>",
            "</seed:cot_budget_reflect>",
        ),
        ("<seed:eos>",),
    ),
    # Nemotron Nano v2 writes '<think>\n\n' into the last assistant turn only (turn by turn); its generation prompt
    # holds it. The turn ends with '\n<SPECIAL_12>'.
    "nemotron-nano-v2": Case(
        "nvidia-nemotron-nano-v2.jinja",
        None,
        "<SPECIAL_12>",
        ("<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", *THINK),
        ("\n<SPECIAL_12>",),
        pieces=2,
    ),
    "llama-3.2": Case("llama-3.2-3b-instruct.jinja", LLAMA3[0], "<|eot_id|>", LLAMA3, ("<|eot_id|>",)),
    "llama-3.3": Case("llama-3.3-70b-instruct.jinja", LLAMA3[0], "<|eot_id|>", LLAMA3, ("<|eot_id|>",)),
    # Gemma 2 refuses a system role: sftlab folds the system prompt into the first user turn.
    "gemma-2": Case(
        "gemma-2-2b-it.jinja",
        "<bos>",
        "<eos>",
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        ("<end_of_turn>",),
    ),
    "lfm2": Case(
        "lfm2-llama-cpp.jinja",
        "<|startoftext|>",
        "<|im_end|>",
        (
            "<|startoftext|>",
            *CHATML,
            "<|tool_list_start|>",
            "<|tool_list_end|>",
            "<|tool_call_start|>",
            "<|tool_call_end|>",
            "<|tool_response_start|>",
            "<|tool_response_end|>",
        ),
        ("<|im_end|>",),
    ),
    # MiniMax-M2's generation prompt ']~b]ai\n<think>\n' opens a think block the rendered history never shows.
    "minimax-m2": Case(
        "minimax-m2-unsloth.jinja",
        None,
        "[e~[",
        ("]~!b[", "]~b]", "[e~[", *THINK, "<minimax:tool_call>", "</minimax:tool_call>"),
        ("[e~[",),
    ),
}
# Templates that cannot render a conversation without tools: they iterate `tools` even when none are given.
NEEDS_TOOLS = {
    "phi-4-mini": Case(
        "phi-4-mini-instruct-llama-cpp.jinja",
        None,
        "<|endoftext|>",
        (
            "<|endoftext|>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|end|>",
            "<|tool|>",
            "<|/tool|>",
            "<|tool_call|>",
            "<|/tool_call|>",
            "<|tool_response|>",
        ),
        ("<|end|>",),
    ),
    "hermes-3-tool-use": Case(
        "hermes-3-llama-3.1-8b-tool_use.jinja",
        LLAMA3[0],
        "<|im_end|>",
        (LLAMA3[0], *CHATML, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
        ("<|im_end|>",),
    ),
}
# Templates that print today's date (strftime_now) in what they render for this conversation's data.
DATED = {"llama-3.2": CONVERSATION, "granite-3.3": CONVERSATION[1:], "mistral-small-3.1": CONVERSATION[1:]}
ALL = {**CASES, **NEEDS_TOOLS}


# =========================================================================== one tokenizer for all


@pytest.fixture(scope="module")
def shared_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    special = sorted({token for case in ALL.values() for token in (*case.special, case.eos, case.bos) if token})
    tokenizer.add_tokens(special, special_tokens=True)  # each stays one token, never split
    return tokenizer


@contextmanager
def using(tokenizer, case: Case):
    saved = tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token
    tokenizer.chat_template = (TEMPLATES / case.file).read_text(encoding="utf-8")
    tokenizer.bos_token, tokenizer.eos_token = case.bos or saved[1], case.eos
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token = saved


def trained_runs(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[int, list[str]]:
    """(examples the conversation became, the decoded runs of trained tokens in order)."""
    rendered = render_example(tokenizer, Example(messages=messages, tools=tools))
    ids_list, masks = tokenize_rendered(tokenizer, rendered)
    runs = []
    for ids, mask in zip(ids_list, masks):
        run: list[int] = []
        for token, bit in [*zip(ids, mask), (None, 0)]:
            if bit:
                run.append(token)
            elif run:
                runs.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
                run = []
    return len(rendered), runs


def write_rows(path: Path, conversation: list[dict], count: int) -> Path:
    rows = [
        [{**m, "content": f"{m['content']} ({i})"} if m["role"] != "system" else m for m in conversation]
        for i in range(count)
    ]
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows), encoding="utf-8")
    return path


# =========================================================================== the tests


def test_the_fixtures_are_the_collected_templates():
    sources = (TEMPLATES / "SOURCES.md").read_text(encoding="utf-8")
    files = sorted(path.name for path in TEMPLATES.glob("*.jinja"))
    assert len(files) >= 20 and sorted(case.file for case in ALL.values()) == files
    assert all(f"`{file}`" in sources for file in files)  # every template has its source and licence listed


@pytest.mark.parametrize("name", list(CASES))
def test_each_answer_and_the_stop_that_ends_its_turn_are_trained_and_nothing_else(shared_tokenizer, name):
    case = CASES[name]
    with using(shared_tokenizer, case) as tokenizer:
        pieces, runs = trained_runs(tokenizer, CONVERSATION)
    assert len(runs) == len(ANSWERS), runs  # one trained run per assistant turn: no system, user or header text
    for run, answer in zip(runs, ANSWERS):
        assert any(run == lead + answer + stop for lead in case.leads for stop in case.stops), (run, answer)
    assert pieces == case.pieces


@pytest.mark.parametrize("name", ["phi-3.5", "command-r7b"])
def test_text_after_the_whole_conversation_does_not_force_one_example_per_turn(shared_tokenizer, name):
    with using(shared_tokenizer, CASES[name]) as tokenizer:
        pieces, _ = trained_runs(tokenizer, CONVERSATION)
    assert pieces == 1


@pytest.mark.parametrize("name", ["glm-4.5"])
def test_check_trains_a_stop_for_a_template_without_an_end_of_turn_marker(
    shared_tokenizer, name, tmp_path, monkeypatch
):
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")
    data = write_rows(tmp_path / "rows.jsonl", CONVERSATION, 6)
    with using(shared_tokenizer, CASES[name]) as tokenizer:
        audit = prepare_data(DataConfig(train=str(data), eval_split=0), tokenizer).audit
    assert audit["end_of_turn_untrained"] == 0
    assert not [warning for warning in audit["warnings"] if "end-of-turn" in warning]
    # The next role marker ends the first turn, EOS the last: both are stops of GLM's generation config.
    assert audit["stop"] == [{"token": "<|endoftext|>", "examples": 6}, {"token": "<|user|>", "examples": 6}]


@pytest.mark.parametrize("name", list(NEEDS_TOOLS))
def test_a_template_that_needs_tools_gives_one_clear_message(shared_tokenizer, name, tmp_path, monkeypatch):
    # Before: "rows.jsonl:1: chat template rejects this conversation: 'NoneType' object is not iterable", with the
    # hint to fix the row. Now: one message, once, that the template renders no conversation without tools.
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")
    data = write_rows(tmp_path / "rows.jsonl", CONVERSATION, 4)
    with using(shared_tokenizer, NEEDS_TOOLS[name]) as tokenizer, pytest.raises(DataError) as raised:
        prepare_data(DataConfig(train=str(data), eval_split=0), tokenizer)
    assert "tools" in raised.value.message and "rows.jsonl:1" not in raised.value.message


@pytest.mark.parametrize("name", list(NEEDS_TOOLS))
def test_a_template_that_needs_tools_trains_rows_that_give_them(shared_tokenizer, name):
    # How its turns end is probed with a tool list too: each answer and its stop, one example.
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Adds two numbers.",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
            },
        }
    ]
    case = NEEDS_TOOLS[name]
    with using(shared_tokenizer, case) as tokenizer:
        pieces, runs = trained_runs(tokenizer, CONVERSATION, tools)
    assert pieces == 1 and runs == [answer + stop for answer, stop in zip(ANSWERS, case.stops * 2)]


def test_a_role_the_template_refuses_is_one_message_naming_the_row(shared_tokenizer, tmp_path, monkeypatch):
    # Gemma 2 accepts only alternating user/model turns: a tool turn is refused by the template itself.
    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")
    tool_turn = [*CONVERSATION[1:3], {"role": "tool", "content": "4"}, *CONVERSATION[3:]]
    data = write_rows(tmp_path / "rows.jsonl", tool_turn, 4)
    with using(shared_tokenizer, CASES["gemma-2"]) as tokenizer, pytest.raises(DataError) as raised:
        prepare_data(DataConfig(train=str(data), eval_split=0), tokenizer)
    assert raised.value.message.startswith(f"{data}:1: chat template rejects this conversation: ")
    assert "alternate" in raised.value.message and "\n" not in raised.value.message


class FrozenClock(dt.datetime):
    day = dt.datetime(2025, 1, 31, 23, 59)

    @classmethod
    def now(cls, tz=None):
        return cls.day


@pytest.mark.parametrize("name", list(DATED))
def test_a_template_that_prints_the_date_renders_the_same_text_on_another_day(
    shared_tokenizer, name, tmp_path, monkeypatch
):
    # Before, the rendered system prompt carried the day it was rendered: data prepared (and cached) on one day and
    # prompts rendered for evaluation or chat on the next differed. Now: one date for the whole run.
    import transformers.utils.chat_template_utils as chat_template_utils

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenClock)
    messages = DATED[name]
    data = write_rows(tmp_path / "rows.jsonl", messages, 2)
    texts, keys = [], []
    with using(shared_tokenizer, CASES[name]) as tokenizer:
        for day in (dt.datetime(2025, 1, 31, 23, 59), dt.datetime(2025, 2, 1, 0, 1)):
            monkeypatch.setattr(FrozenClock, "day", day)
            texts.append([item.text for item in render_example(tokenizer, Example(messages=messages))])
            keys.append(cache_key(DataConfig(train=str(data)), tokenizer, True, 42, None))
    assert "2025" in texts[0][0] or "Jan" in texts[0][0]  # the template did print the (frozen) date
    assert texts[0] == texts[1] and keys[0] == keys[1]


@pytest.mark.parametrize("name", list(ALL))
def test_check_on_each_template_is_an_audit_or_one_message_never_a_traceback(
    shared_tokenizer, name, tmp_path, monkeypatch, capsys
):
    # What `sftlab check` runs: prepare the data, then print the audit (examples with '[INST]' included).
    from sftlab.cli import _print_audit

    monkeypatch.setenv("SFTLAB_NO_CACHE", "1")
    data = write_rows(tmp_path / "rows.jsonl", CONVERSATION, 6)
    with using(shared_tokenizer, ALL[name]) as tokenizer:
        try:
            audit = prepare_data(DataConfig(train=str(data), eval_split=0), tokenizer).audit
        except DataError as error:
            # One message: for the template where it needs tools, else for the first row it rejects.
            expected = "renders no conversation without tools" if name in NEEDS_TOOLS else f"{data}:1: chat template"
            assert expected in error.message and "\n" not in error.message
            return
    _print_audit(audit)
    assert audit["splits"]["train"]["rows"] >= 6  # one example per row, or per turn where the history is rewritten
    output = capsys.readouterr().out
    assert output.endswith("ok: training can go ahead\n")
    # Every example trains a stop, each one the token that ends the case's turn, and check says which.
    trained = [stop["token"] for stop in audit["stop"]]
    assert audit["end_of_turn_untrained"] == 0 and trained
    assert all(any(stop.endswith(token) for stop in ALL[name].stops) for token in trained), trained
    assert f"stop trained: {trained[0]} in " in output
