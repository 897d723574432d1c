"""Generation: batched answers, and the shared prefix that makes few-shot prompts cost their shots once."""

import pytest

import sftlab.generation as generation
from conftest import build_tiny_model
from sftlab.config import EvalConfig, ModelConfig
from sftlab.evaluate import trained_token_loss
from sftlab.generation import generate, generate_answers, shared_prefix, stop_token_ids
from sftlab.model import load_model, load_tokenizer

SHOTS = "".join(
    f"<|im_start|>user\nexample question {i} about the weather<|im_end|>\n<|im_start|>assistant\nexample answer {i}"
    "<|im_end|>\n"
    for i in range(3)
)
SYSTEM = "<|im_start|>system\nYou answer in one short line.<|im_end|>\n"


def few_shot_prompts(count: int) -> list[str]:
    """Prompts of different lengths that share the system prompt and three shots."""
    return [
        f"{SYSTEM}{SHOTS}<|im_start|>user\nquestion {'and more ' * (i % 4)}number {i}<|im_end|>\n"
        "<|im_start|>assistant\n"
        for i in range(count)
    ]


@pytest.fixture(scope="module", params=["llama", "qwen2", "opt"])
def model_and_tokenizer(request, tmp_path_factory, tiny_model):
    """A tiny model (Llama; Qwen2; OPT, whose positions are learnt and read from the attention mask) with its
    weights jolted, so that greedy answers differ from prompt to prompt."""
    import torch

    path = tiny_model
    if request.param != "llama":
        path = build_tiny_model(tmp_path_factory.mktemp(request.param), model_type=request.param)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    model = load_model(ModelConfig(name_or_path=str(path)), tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model, tokenizer


def without_prefix(monkeypatch):
    monkeypatch.setattr(generation, "PREFIX_MIN_TOKENS", 10**9)


def test_answers_with_the_shared_prefix_are_the_answers_without(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = few_shot_prompts(7)
    cfg = EvalConfig(max_new_tokens=12, generation_batch_size=3)
    cached = generate_answers(model, tokenizer, prompts, [True] * len(prompts), cfg)
    without_prefix(monkeypatch)
    plain = generate_answers(model, tokenizer, prompts, [True] * len(prompts), cfg)
    assert [answer["token_ids"] for answer in cached] == [answer["token_ids"] for answer in plain]
    assert len({tuple(answer["token_ids"]) for answer in plain}) > 1  # the answers differ: the check means something
    # One batch of prompts of different lengths: [prefix][padding][rest], never falling back.
    prefix = shared_prefix(model, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])
    direct = generate(model, tokenizer, prompts, 12, stop_token_ids(tokenizer), prefix=prefix)
    padded = generate(model, tokenizer, prompts, 12, stop_token_ids(tokenizer))
    assert [answer["token_ids"] for answer in direct] == [answer["token_ids"] for answer in padded]


def test_the_prefix_is_what_every_prompt_starts_with_and_leaves_a_token_of_each(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in few_shot_prompts(4)]
    prefix = shared_prefix(model, ids)
    assert prefix is not None
    assert all(row[: len(prefix.ids)] == prefix.ids for row in ids)
    assert any(row[len(prefix.ids)] != ids[0][len(prefix.ids)] for row in ids)  # the longest common one
    assert shared_prefix(model, ids, limit=len(prefix.ids) - 5).ids == prefix.ids[:-5]
    assert shared_prefix(model, [ids[0], ids[0]]).ids == ids[0][:-1]  # one token left to start the answer
    assert shared_prefix(model, ids[:1]) is None  # one prompt: nothing to share
    assert shared_prefix(model, ids, limit=generation.PREFIX_MIN_TOKENS - 1) is None  # too short to pay off


def test_the_held_out_loss_with_the_shared_prefix_is_the_loss_without(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    rows = {"input_ids": [], "assistant_masks": []}
    for i, prompt in enumerate(few_shot_prompts(6)):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(f"answer {'long ' * i}{i}<|im_end|>", add_special_tokens=False)["input_ids"]
        rows["input_ids"].append(prompt_ids + answer_ids)
        rows["assistant_masks"].append([0] * len(prompt_ids) + [1] * len(answer_ids))
    assert shared_prefix(model, rows["input_ids"]) is not None
    cached = trained_token_loss(model, rows)
    without_prefix(monkeypatch)
    plain = trained_token_loss(model, rows)
    assert cached["tokens"] == plain["tokens"] == sum(map(sum, rows["assistant_masks"]))
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_a_trained_token_inside_the_common_prefix_stays_outside_the_cache(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(few_shot_prompts(1)[0], add_special_tokens=False)["input_ids"]
    # Both rows train the same early token: the prefix must stop before it, or its loss would go uncounted.
    masks = [[0] * 20 + [1] + [0] * (len(ids) - 22) + [1], [0] * 20 + [1] + [0] * (len(ids) - 22)]
    rows = {"input_ids": [ids, ids[:-1]], "assistant_masks": masks}
    cached = trained_token_loss(model, rows)
    without_prefix(monkeypatch)
    plain = trained_token_loss(model, rows)
    assert cached["tokens"] == plain["tokens"] == 3
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_a_model_that_refuses_the_prefix_cache_is_answered_without_it(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = few_shot_prompts(4)
    calls = []
    generate_from_ids = generation.generate_from_ids

    def refusing(*args, prefix=None, **kwargs):
        calls.append(prefix is not None)
        if prefix is not None:
            raise ValueError("this cache cannot be passed in")
        return generate_from_ids(*args, **kwargs)

    cfg = EvalConfig(max_new_tokens=6, generation_batch_size=2)
    expected = generate(model, tokenizer, prompts[:2], 6, stop_token_ids(tokenizer))
    monkeypatch.setattr(generation, "generate_from_ids", refusing)
    answers = generate_answers(model, tokenizer, prompts, [True] * len(prompts), cfg)
    assert calls == [True, False, False]  # tried once, then every batch without
    assert [answer["token_ids"] for answer in answers[:2]] == [answer["token_ids"] for answer in expected]
