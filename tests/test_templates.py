"""Loss masks for real chat templates, checked token by token.

sftlab finds the trained part of a conversation by rendering it with the model's own chat
template (no `{% generation %}` markers). These tests render conversations with the
templates TRL ships (Llama 3, Qwen2.5, Gemma, DeepSeek-R1-Distill) and SmolLM2's ChatML,
each with a small byte-level BPE tokenizer built on the fly that knows the template's
special tokens, and compare every token and its mask bit with an expectation written out
by hand:

- each expected sequence is a list of parts, the parts to train wrapped in `Trained`;
- a token is expected trained when it lies inside a `Trained` part; no token may straddle
  the border of a trained part;
- the runs of trained tokens must decode to exactly the `Trained` parts (the assistant
  content followed by the template's end-of-turn token), and the other tokens to the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trl

from conftest import corpus_lines
from sftlab.data import BadRow, Example, checked_messages, end_of_turn_token_id, render_example, tokenize_rendered

TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# SmolLM2-Instruct's own template: ChatML, with a default system prompt when none is given.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The pre-tokenizer split of Llama 3 and Qwen2 (the second with \p{N} for single digits).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# DeepSeek's special tokens use fullwidth bars and U+2581 (▁).
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# The conversations.
SYSTEM = "You are a terse math tutor."
Q1, A1 = "What is 2 plus 2?", "2 plus 2 is 4."
Q2, A2 = "And 3 plus 3? Show the sum.", "3 plus 3 is 6:\n3 + 3 = 6"
THINK1, THINK2 = "The user adds 2 and 2.\nThat makes 4.", "Now 3 and 3: that is 6."

SINGLE = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
MULTI = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_QUESTION, TOOL_OUTPUT, TOOL_ANSWER = (
    "What is the weather in Paris?",
    '{"temperature": 18}',
    "It is 18 °C in Paris.",
)
TOOL_CONVERSATION = [
    {"role": "user", "content": TOOL_QUESTION},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": TOOL_OUTPUT},
    {"role": "assistant", "content": TOOL_ANSWER},
]


class Trained(str):
    """A part of an expected sequence whose tokens must be trained."""


# =========================================================================== tokenizers


def make_tokenizer(chat_template: str, special_tokens: list[str], bos: str | None, eos: str, split: str | None = None):
    """A byte-level BPE tokenizer trained on the demo data, knowing the template's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
        if split
        else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    # The conversations and the templates' words are in the corpus, so merges make multi-character
    # tokens right where prompt and response meet.
    corpus = corpus_lines() + 3 * [
        SYSTEM,
        Q1,
        A1,
        Q2,
        A2,
        THINK1,
        THINK2,
        TOOL_QUESTION,
        TOOL_OUTPUT,
        TOOL_ANSWER,
        "system\nuser\nassistant\nmodel\n",
        "\n\nuser\n\nassistant\n\n",
        "<think>\n",
        "\n</think>\n\n",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=[t for t in special_tokens if t not in (bos, eos)],
    )
    tokenizer.chat_template = chat_template
    for token in special_tokens:  # each special token is one token, never split
        assert tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False)["input_ids"]) == [token]
    return tokenizer


def shipped_template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2():
    return make_tokenizer(
        SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|im_start|>", eos="<|im_end|>"
    )


@pytest.fixture(scope="session")
def llama3():
    # The base model's EOS, not <|eot_id|>: the end-of-turn token must come from the template.
    return make_tokenizer(
        shipped_template("llama3"),
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        split=LLAMA3_SPLIT,
    )


@pytest.fixture(scope="session")
def qwen2_5():
    return make_tokenizer(
        shipped_template("qwen2_5"),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|endoftext|>",
        split=QWEN2_SPLIT,
    )


@pytest.fixture(scope="session")
def gemma():
    return make_tokenizer(
        shipped_template("gemma"), ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>"
    )


@pytest.fixture(scope="session")
def deepseek():
    # <think> and </think> stay ordinary text.
    return make_tokenizer(
        shipped_template("deepseek_r1_distill"),
        [DS_BOS, DS_EOS, "<｜User｜>", "<｜Assistant｜>", *DS_TOOL_TOKENS],
        bos=DS_BOS,
        eos=DS_EOS,
        split=QWEN2_SPLIT,
    )


DS_TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]


# =========================================================================== checking


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same mask bit, decoded: [(text, trained), ...]."""
    out: list[tuple[list[int], bool]] = []
    for token, bit in zip(ids, mask):
        if out and out[-1][1] == bool(bit):
            out[-1][0].append(token)
        else:
            out.append(([token], bool(bit)))
    return [(decode(tokenizer, run), trained) for run, trained in out]


def expected_runs(parts: list[str]) -> list[tuple[str, bool]]:
    """The parts of an expected sequence, neighbours with the same trained state joined."""
    out: list[tuple[str, bool]] = []
    for part in parts:
        trained = isinstance(part, Trained)
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + part, trained)
        elif part:
            out.append((str(part), trained))
    return out


def expected_tokens(tokenizer, parts: list[str]) -> list[tuple[str, int]]:
    """(token, mask bit) for the expected sequence, derived independently of sftlab:
    a token is trained when its characters lie inside a Trained part."""
    text = "".join(parts)
    spans, position = [], 0
    for part in parts:
        if isinstance(part, Trained):
            spans.append((position, position + len(part)))
        position += len(part)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(a <= start and end <= b for a, b in spans)
        overlaps = any(start < b and a < end for a, b in spans)
        assert inside or not overlaps, f"token {tokenizer.convert_ids_to_tokens(token)!r} straddles a trained part"
        pairs.append((tokenizer.convert_ids_to_tokens(token), int(inside)))
    return pairs


def check(tokenizer, messages: list[dict], expected: list[list[str]], tools=None) -> None:
    """sftlab turns `messages` into exactly the `expected` sequences, trained exactly on their Trained parts."""
    rendered = render_example(tokenizer, Example(messages=messages, tools=tools))
    ids_list, masks = tokenize_rendered(tokenizer, rendered)
    assert [item.text for item in rendered] == ["".join(parts) for parts in expected]
    for ids, mask, parts in zip(ids_list, masks, expected):
        assert len(ids) == len(mask)
        got = [(token, bit) for token, bit in zip(tokenizer.convert_ids_to_tokens(ids), mask)]
        assert got == expected_tokens(tokenizer, parts)
        # The trained tokens decode to exactly the trained parts, in order; the others to everything else.
        assert runs(tokenizer, ids, mask) == expected_runs(parts)


def trained_strings(tokenizer, messages: list[dict], tools=None) -> list[list[str]]:
    """Per sequence, the decoded runs of trained tokens."""
    rendered = render_example(tokenizer, Example(messages=messages, tools=tools))
    ids_list, masks = tokenize_rendered(tokenizer, rendered)
    return [[text for text, trained in runs(tokenizer, ids, mask) if trained] for ids, mask in zip(ids_list, masks)]


# =========================================================================== the templates


SMOL_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def test_smollm2_single_turn_gets_the_default_system_prompt_untrained(smollm2):
    check(
        smollm2,
        SINGLE,
        [
            [
                SMOL_DEFAULT_SYSTEM + f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A1}<|im_end|>"),
                "\n",
            ]
        ],
    )


def test_smollm2_multi_turn_with_system_prompt(smollm2):
    check(
        smollm2,
        MULTI,
        [
            [
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A1}<|im_end|>"),
                f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A2}<|im_end|>"),
                "\n",
            ]
        ],
    )


def test_llama3_single_turn(llama3):
    check(
        llama3,
        SINGLE,
        [
            [
                f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                Trained(f"{A1}<|eot_id|>"),
            ]
        ],
    )


def test_llama3_multi_turn_with_system_prompt(llama3):
    check(
        llama3,
        MULTI,
        [
            [
                f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                Trained(f"{A1}<|eot_id|>"),
                f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                Trained(f"{A2}<|eot_id|>"),
            ]
        ],
    )


QWEN_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)


def test_qwen2_5_single_turn(qwen2_5):
    check(
        qwen2_5,
        SINGLE,
        [
            [
                QWEN_DEFAULT_SYSTEM + f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A1}<|im_end|>"),
                "\n",
            ]
        ],
    )


def test_qwen2_5_multi_turn_with_system_prompt(qwen2_5):
    check(
        qwen2_5,
        MULTI,
        [
            [
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A1}<|im_end|>"),
                f"\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{A2}<|im_end|>"),
                "\n",
            ]
        ],
    )


def test_qwen2_5_tool_call_is_trained_and_tool_output_is_not(qwen2_5):
    # The system prompt listing the tools is the template's own text; only its end is spelled out here.
    head = qwen2_5.apply_chat_template(TOOL_CONVERSATION[:1], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert head.startswith("<|im_start|>system\nYou are Qwen") and '"name": "get_weather"' in head
    assert head.endswith(
        f"</tool_call><|im_end|>\n<|im_start|>user\n{TOOL_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    check(
        qwen2_5,
        TOOL_CONVERSATION,
        [
            [
                head,
                Trained('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
                f"\n<|im_start|>user\n<tool_response>\n{TOOL_OUTPUT}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
                Trained(f"{TOOL_ANSWER}<|im_end|>"),
                "\n",
            ]
        ],
        tools=TOOLS,
    )
    trained = trained_strings(qwen2_5, TOOL_CONVERSATION, tools=TOOLS)
    assert not any(TOOL_OUTPUT in text or "tool_response" in text for text in trained[0])


def test_gemma_single_turn(gemma):
    check(
        gemma,
        SINGLE,
        [
            [
                f"<bos><start_of_turn>user\n{Q1}<end_of_turn>\n<start_of_turn>model\n",
                Trained(f"{A1}<end_of_turn>"),
                "\n",
            ]
        ],
    )


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(gemma):
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template(MULTI, tokenize=False)
    check(
        gemma,
        MULTI,
        [
            [
                f"<bos><start_of_turn>user\n{SYSTEM}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n",
                Trained(f"{A1}<end_of_turn>"),
                f"\n<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n",
                Trained(f"{A2}<end_of_turn>"),
                "\n",
            ]
        ],
    )
    assert not any(SYSTEM in text for text in trained_strings(gemma, MULTI)[0])


def test_deepseek_r1_single_turn_with_system_prompt_and_reasoning(deepseek):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": f"<think>\n{THINK1}\n</think>\n\n{A1}"},
    ]
    check(
        deepseek,
        messages,
        [
            [
                f"{DS_BOS}{SYSTEM}<｜User｜>{Q1}<｜Assistant｜><think>\n",
                Trained(f"{THINK1}\n</think>\n\n{A1}{DS_EOS}"),
            ]
        ],
    )


def test_deepseek_r1_multi_turn_is_one_sequence_per_turn_each_as_seen_at_inference(deepseek):
    messages = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": f"<think>\n{THINK1}\n</think>\n\n{A1}"},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": f"<think>\n{THINK2}\n</think>\n\n{A2}"},
    ]
    check(
        deepseek,
        messages,
        [
            # Turn 1: the generation prompt already holds "<think>\n"; the rest of the response is trained.
            [f"{DS_BOS}<｜User｜>{Q1}<｜Assistant｜><think>\n", Trained(f"{THINK1}\n</think>\n\n{A1}{DS_EOS}")],
            # Turn 2: the history as the template renders it, without turn 1's reasoning, and untrained.
            [
                f"{DS_BOS}<｜User｜>{Q1}<｜Assistant｜>\n\n{A1}{DS_EOS}<｜User｜>{Q2}<｜Assistant｜><think>\n",
                Trained(f"{THINK2}\n</think>\n\n{A2}{DS_EOS}"),
            ],
        ],
    )


def test_deepseek_r1_tool_calls_it_cannot_render_are_a_bad_row_not_silently_dropped(deepseek):
    # transformers drops content=None before rendering, and DeepSeek's template writes tool
    # calls only when content is none: the calls would vanish from the training text.
    messages = checked_messages(
        [
            {"role": "user", "content": Q1},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "content": "18C"},
            {"role": "assistant", "content": A1},
        ],
        "role",
        "content",
        None,
    )
    with pytest.raises(BadRow, match="drops the tool calls of turn 2"):
        render_example(deepseek, Example(messages=messages))


@pytest.mark.parametrize(
    "name, token",
    [
        ("smollm2", "<|im_end|>"),
        ("llama3", "<|eot_id|>"),
        ("qwen2_5", "<|im_end|>"),
        ("gemma", "<end_of_turn>"),
        ("deepseek", DS_EOS),
    ],
)
def test_end_of_turn_token(request, name, token):
    tokenizer = request.getfixturevalue(name)
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(token)
