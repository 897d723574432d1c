"""Chat templates: everything sftlab knows about a model's chat template, in one place.

Used by the data stage (masks: the trained spans), the model (ChatML for a tokenizer that has
none), generation (the stop tokens), evaluation (the template's markers an answer must not
leak), chat and export. What a template does is read from renderings of tiny probe
conversations, never from the template's name:

- how an assistant turn ends (`TurnEnd`): the text the template writes after a response
  (`<|im_end|>`, `<|eot_id|>`, `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`), and the token
  the model stops on. Text written only after the last message (Phi-3.5's EOS,
  Command-R7B's open assistant header) is not part of it: it is what a rendering of the
  conversation followed by one more turn does not have. Where the template writes
  nothing after a response (GLM-4.x), the turn's stop is the next turn's role marker, or
  EOS after the last turn, the tokens its generation config stops on;
- whether it has a no-think generation prompt (`enable_thinking=False`) that differs
  from the default: an empty think block that prompt holds is not the model's to write;
- whether it renders nothing without tools (it iterates `tools` even when none are given);
- the text of its turn headers that is neither a special token nor a role name
  (`template_markers`): an answer showing it has leaked the template;
- whether it is ChatML, and then its Ollama (Go template) equivalent for export's
  Modelfile (`ollama_template`).

Templates that print today's date (`strftime_now`) render with one date per run: the first
rendering that prints a date pins it, and every later one, evaluation and chat included,
prints the same, even past midnight. The cache key never depends on the date.

Trade-offs:
- The probes cost a few renderings per template; their results are kept per template (and
  special tokens), so rows never pay for them.
- The date is pinned by giving transformers' template clock (the `datetime` its
  `strftime_now` reads) a fixed `now` for the duration of each rendering: templates read
  the date through no other hook. Data workers forked after the pin inherit it.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sftlab.errors import BadRow

SENTINEL = "\ue000sftlab-response\ue001"  # private-use characters: no template or text contains them
NEXT_SENTINEL = "\ue000sftlab-next\ue001"
PROBE = [{"role": "user", "content": "hi"}]
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {"name": "probe", "description": "A probe.", "parameters": {"type": "object", "properties": {}}},
    }
]
NEEDS_TOOLS = "the chat template renders no conversation without tools"
ROLE_NAMES = ("system", "user", "assistant", "human")
# A chat template for models that have none: ChatML, as SmolLM2 and Qwen use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


class TemplateRejected(BadRow):
    """The chat template raised an error for this conversation."""

    PREFIX = "chat template rejects this conversation: "


class TemplateNeedsTools(TemplateRejected):
    """The chat template fails on any conversation that gives no tools (a tool-use template)."""


# =========================================================================== a template for models without one


def add_default_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer ChatML, adding its special tokens. Returns True if it did."""
    if tokenizer.chat_template:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return True


# =========================================================================== rendering, with one date per run


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None, **template_kwargs) -> str:
    try:
        with _run_clock(tokenizer):
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
            )
    except Exception as exc:  # jinja's TemplateError, or a raise_exception() inside the template
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TemplateRejected(TemplateRejected.PREFIX + reason) from None


# The template being rendered, whether it prints the date, and the date it prints.
_pinned: dict[str, Any] = {"template": None, "dated": False, "moment": None}


@contextmanager
def _run_clock(tokenizer):
    """While rendering a template that prints the date, the template's clock shows the run's date.

    The date is read once, from the clock the template would have read, at the first rendering
    of a template that prints it; it holds while that template is rendered (a run renders with one
    template), and a rendering with another template starts over."""
    template = tokenizer.chat_template
    if template is not _pinned["template"] and template != _pinned["template"]:
        _pinned.update(template=template, dated="strftime_now" in str(template), moment=None)
    if not _pinned["dated"]:
        yield
        return
    import transformers.utils.chat_template_utils as jinja_side

    clock = jinja_side.datetime
    if _pinned["moment"] is None:
        _pinned["moment"] = clock.now()
    moment = _pinned["moment"]
    jinja_side.datetime = type("RunClock", (clock,), {"now": classmethod(lambda cls, tz=None: moment)})
    try:
        yield
    finally:
        jinja_side.datetime = clock


# =========================================================================== what a template does at the end of a turn


@dataclass(frozen=True)
class TurnEnd:
    """How an assistant turn ends in this template."""

    marker: str  # what the template writes after a response, as trained ('<|im_end|>\n'); '' when nothing
    stop: str | None  # the token text the model stops on ('<|im_end|>', or GLM's next role marker '<|user|>')
    # What the no-think generation prompt (enable_thinking=False) writes after the assistant header: Qwen3's
    # '<think>\n\n</think>\n\n', GLM's '\n<think></think>'; '' where it writes nothing more.
    no_think: str
    needs_tools: bool = False  # it renders the probes only with tools (a tool-use template)

    @property
    def has_marker(self) -> bool:
        return bool(self.marker.strip())


_TURN_ENDS: dict[tuple, TurnEnd] = {}  # by template, special tokens and vocabulary size
_LAST: list = [None, None, None]  # the tokenizer, template and EOS last asked about, and their TurnEnd


def turn_end(tokenizer) -> TurnEnd:
    """The template's `TurnEnd`, probed once per template and special tokens."""
    template, eos = tokenizer.chat_template, tokenizer.eos_token
    if _LAST[0] is tokenizer and _LAST[1] == (template, eos, tokenizer.bos_token):  # every turn of every row asks
        return _LAST[2]
    key = (str(template), str(sorted(tokenizer.special_tokens_map.items(), key=str)), len(tokenizer))
    if key not in _TURN_ENDS:
        if len(_TURN_ENDS) > 64:
            _TURN_ENDS.clear()
        _TURN_ENDS[key] = _turn_end_of(tokenizer)
    _LAST[:] = [tokenizer, (template, eos, tokenizer.bos_token), _TURN_ENDS[key]]
    return _TURN_ENDS[key]


def _turn_end_of(tokenizer) -> TurnEnd:
    eos = tokenizer.eos_token
    for tools in (None, PROBE_TOOLS):  # a tool-use template renders the probes only with tools
        try:
            marker = end_of_turn_marker(tokenizer, PROBE, tools)
            break
        except BadRow:
            continue
    else:  # the probes tell nothing: a turn ends where its rendering does, or at EOS if the template writes it
        return TurnEnd(marker=eos or "", stop=eos, no_think="")
    stop = (eos if eos and eos in marker else marker.strip()) if marker.strip() else _next_role_marker(tokenizer, tools)
    return TurnEnd(marker, stop or eos, _no_think_tail(tokenizer, tools), needs_tools=tools is not None)


def _no_think_tail(tokenizer, tools=None) -> str:
    """What the no-think generation prompt adds after the generation prompt's header (its empty think block)."""
    try:
        history = render(tokenizer, PROBE, tools=tools)
        prompt = render(tokenizer, PROBE, add_generation_prompt=True, tools=tools)
        no_think = render(tokenizer, PROBE, add_generation_prompt=True, tools=tools, enable_thinking=False)
    except BadRow:
        return ""
    header = prompt[len(history) :] if prompt.startswith(history) else ""
    if no_think == prompt or not header.strip() or header not in no_think:
        return ""
    return no_think[no_think.rindex(header) + len(header) :]


def end_of_turn_marker(tokenizer, history: list[dict], tools=None) -> str:
    """What the template writes after an assistant response (e.g. '<|im_end|>\\n'), up to and including EOS;
    '' when it writes nothing (GLM-4.x).

    Text written only after the last message (an EOS after the conversation, an open assistant header)
    is not part of it: only what a rendering with one more turn after the response also has."""
    answered = [*history, {"role": "assistant", "content": SENTINEL}]
    rendered = render(tokenizer, answered, tools=tools)
    if SENTINEL not in rendered:
        return tokenizer.eos_token or ""
    after = rendered[rendered.index(SENTINEL) + len(SENTINEL) :]
    try:
        followed = render(tokenizer, [*answered, {"role": "user", "content": NEXT_SENTINEL}], tools=tools)
    except BadRow:
        followed = ""
    if SENTINEL in followed:
        before_next = followed[followed.index(SENTINEL) + len(SENTINEL) :]
        after = after[: outside_special_tokens(after, common_prefix_length(after, before_next), tokenizer)]
    eos = tokenizer.eos_token
    # At inference the model stops at EOS: nothing the template writes after it is the model's.
    return after[: after.index(eos) + len(eos)] if eos and eos in after else after


def _next_role_marker(tokenizer, tools=None) -> str | None:
    """The special token that opens the turn after an assistant response (GLM's '<|user|>')."""
    answered = [*PROBE, {"role": "assistant", "content": SENTINEL}, {"role": "user", "content": NEXT_SENTINEL}]
    try:
        followed = render(tokenizer, answered, tools=tools)
    except BadRow:
        return None
    if SENTINEL not in followed:
        return None
    after = followed[followed.index(SENTINEL) + len(SENTINEL) :]
    return special_token_at(after, len(after) - len(after.lstrip()), tokenizer)


def end_of_turn_token_id(tokenizer) -> int | None:
    """The token that ends an assistant turn (<|im_end|>, <|eot_id|>, GLM's next role marker <|user|>, ...)."""
    if not tokenizer.chat_template:
        return None
    stop = turn_end(tokenizer).stop
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    return ids[0] if ids else None


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a turn: training one of them in a row teaches the model to stop."""
    return sorted({tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)} - {None})


def needs_tools(tokenizer) -> bool:
    """Whether the template fails on a conversation without tools and renders it with them."""
    return turn_end(tokenizer).needs_tools


# =========================================================================== what an answer must not show


def template_markers(tokenizer) -> list[str]:
    """Text that must never appear in an answer: the tokenizer's special tokens, and the
    parts of the chat template's turn headers that are neither special tokens nor a bare role name."""
    specials = {token for token in tokenizer.all_special_tokens if token and token.strip()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {
        token.content for token in added.values() if getattr(token, "special", False) and token.content.strip()
    }
    sentinels = [f"\ue000sftlab-{index}\ue001" for index in range(4)]
    conversation = [
        {"role": role, "content": sentinel}
        for role, sentinel in zip(("user", "assistant", "user", "assistant"), sentinels)
    ]
    pieces = set()
    try:
        text = render(tokenizer, conversation) if tokenizer.chat_template else ""
    except BadRow:
        text = ""
    splitter = re.compile("|".join(re.escape(token) for token in sorted(specials, key=len, reverse=True)) or r"(?!)")
    for first, second in zip(sentinels, sentinels[1:]):
        if first in text and second in text:
            between = text[text.index(first) + len(first) : text.index(second)]
            for piece in splitter.split(between):
                piece = piece.strip()
                if len(piece) >= 2 and piece.lower().rstrip(":") not in ROLE_NAMES:
                    pieces.add(piece)
    return sorted(specials) + sorted(pieces)


# =========================================================================== special tokens in rendered text


def _special_tokens(tokenizer) -> list[str]:
    return tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {}))


def outside_special_tokens(text: str, position: int, tokenizer) -> int:
    """Move a position that falls inside a special token (two markers sharing their first
    characters, like '<think>' and '<｜tool▁calls▁begin｜>') back to that token's start."""
    for token in _special_tokens(tokenizer):
        found = text.find(token, max(0, position - len(token) + 1), position + len(token))
        if found != -1 and found < position < found + len(token):
            return found
    return position


def special_token_at(text: str, position: int, tokenizer) -> str | None:
    """The (longest) special token that starts at `position` of `text`, if any."""
    found = [token for token in _special_tokens(tokenizer) if token and text.startswith(token, position)]
    return max(found, key=len) if found else None


def common_prefix_length(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for position in range(length):
        if a[position] != b[position]:
            return position
    return length


# =========================================================================== Ollama's Go template


CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
CHATML_GENERATION = "<|im_start|>assistant\n"
# Ollama's ChatML (its qwen2 template, without tools): every message in turn, then the assistant's opening.
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_PROBE = [
    {"role": "system", "content": "S1"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]


def ollama_template(tokenizer) -> str | None:
    """The chat template in Ollama's Go-template syntax when it is ChatML (a default system prompt
    included), by what it renders; None for any other template."""

    def chatml(messages):
        return "".join(CHATML_TURN.format(**message) for message in messages) + CHATML_GENERATION

    try:
        if render(tokenizer, _PROBE, add_generation_prompt=True) != chatml(_PROBE):
            return None
        defaults = set()
        for question in ("U1", "Another question?"):
            user = [{"role": "user", "content": question}]
            rendered = render(tokenizer, user, add_generation_prompt=True)
            if rendered == chatml(user):
                defaults.add(None)
            elif rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_end|>\n" + chatml(user)):
                defaults.add(rendered[len("<|im_start|>system\n") : -len("<|im_end|>\n" + chatml(user))])
            else:
                return None
    except Exception:  # a template that refuses the probe (no system role, ...) is not ChatML
        return None
    if len(defaults) != 1:
        return None  # the "default system prompt" depends on the question: not a default
    default = defaults.pop()
    if default is None:
        return OLLAMA_CHATML
    # A JSON string is a valid Go string literal, so any text (even "{{") passes through unchanged.
    return (
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
        f"{{{{ {json.dumps(default)} }}}}<|im_end|>\n{{{{ end }}}}" + OLLAMA_CHATML
    )
