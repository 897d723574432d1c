import json

import pytest

from conftest import chat_rows, write_jsonl
from sftlab.config import DataConfig, ModelConfig
from sftlab.data import prepare_data
from sftlab.errors import DataError
from sftlab.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))


def trained_text(tokenizer, ids, mask):
    return tokenizer.decode([token for token, bit in zip(ids, mask) if bit])


def test_only_assistant_content_and_end_of_turn_are_trained(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2 plus 2?"},
                    {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "And 3 plus 3?"},
                    {"role": "assistant", "content": "6."},
                ]
            }
        ],
    )
    data = prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer)
    row = data.train[0]
    assert trained_text(tokenizer, row["input_ids"], row["assistant_masks"]) == "4.<|im_end|>6.<|im_end|>"
    assert data.audit["splits"]["train"]["rows"] == 1


def test_train_on_everything_when_asked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(2))
    data = prepare_data(DataConfig(train=str(path), eval_split=0), tokenizer, assistant_only_loss=False)
    assert all(all(row) for row in data.train["assistant_masks"])
    assert data.audit["trained_token_share"] == 1.0


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", chat_rows(40))
    first = prepare_data(DataConfig(train=str(path), eval_split=0.1), tokenizer, seed=1)
    second = prepare_data(DataConfig(train=str(path), eval_split=0.1), tokenizer, seed=1)
    assert (first.audit["splits"]["train"]["rows"], first.audit["splits"]["eval"]["rows"]) == (36, 4)
    assert first.eval["input_ids"] == second.eval["input_ids"]
    assert not {tuple(ids) for ids in first.eval["input_ids"]} & {tuple(ids) for ids in first.train["input_ids"]}


def test_invalid_json_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(row) for row in chat_rows(3)]
    lines.insert(2, '{"messages": [')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        prepare_data(DataConfig(train=str(path)), tokenizer)
    data = prepare_data(DataConfig(train=str(path), on_error="skip", eval_split=0), tokenizer)
    assert data.audit["splits"]["train"]["rows"] == 3
    assert data.audit["problems"] == [
        {"file": str(path), "line": 3, "message": "invalid JSON: Expecting value at column 15"}
    ]


def test_missing_data_file_is_a_data_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        prepare_data(DataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer)
