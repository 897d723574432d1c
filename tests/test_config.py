from pathlib import Path

import pytest

from sftlab.config import (
    EMBEDDED_MODEL, LORA_LEARNING_RATE, TRAINING_DEFAULTS, load_config, starter_config_text, write_starter_config,
)
from sftlab.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_starter_config_loads_with_the_chapters_defaults(tmp_path):
    path = tmp_path / "sftlab.yaml"
    write_starter_config(path)
    cfg = load_config(path)
    assert cfg.model.name_or_path == EMBEDDED_MODEL
    assert 1 <= cfg.training["num_train_epochs"] <= 3
    assert cfg.training["learning_rate"] <= 1e-4
    assert cfg.training["warmup_ratio"] > 0
    assert cfg.training["per_device_train_batch_size"] <= 8
    assert cfg.model.trust_remote_code is False


def test_starter_config_names_every_default_sftlab_fills_in():
    text = starter_config_text()
    for key in TRAINING_DEFAULTS:
        assert f"  {key}:" in text, key


def test_init_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sftlab.yaml"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        write_starter_config(path)
    assert path.read_text() == "mine"


def test_a_minimal_config_gets_the_embedded_model_and_a_run_directory(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: x.jsonl\n"))
    assert cfg.model.name_or_path == EMBEDDED_MODEL
    assert cfg.training["output_dir"] == str(Path("runs") / "c")
    assert cfg.training["eval_strategy"] == "steps"


@pytest.mark.parametrize("text, expected", [
    ("data:\n  train: x.jsonl\ntraining:\n  learnin_rate: 1.0e-4\n", r"c.yaml:4: unknown key training.learnin_rate \(did you mean training.learning_rate\?\)"),
    ("data:\n  train: x.jsonl\n  formt: text\n", r"c.yaml:3: unknown key data.formt \(did you mean data.format\?\)"),
    ("data:\n  train: x.jsonl\nmodel:\n  learning_rate: 1\n", r"c.yaml:4: unknown key model.learning_rate \(did you mean training.learning_rate\?\)"),
    ("data:\n  train: x.jsonl\ntrainin:\n  max_steps: 3\n", r"c.yaml:3: unknown key trainin \(did you mean training\?\)"),
    ("data:\n  train:\n    - path: a.jsonl\n      wieght: 2\n", r"c.yaml:4: unknown key data.train.0.wieght \(did you mean data.train.0.weight\?\)"),
])
def test_unknown_keys_name_the_line_and_the_closest_valid_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, expected", [
    ("data:\n  train: x.jsonl\ntraining:\n  max_steps: abc\n", r"c.yaml:4: training.max_steps = 'abc' is not a valid int"),
    ("data:\n  train: x.jsonl\ntraining:\n  trust_remote_code: true\n", r"set this in model.trust_remote_code"),
    ("data:\n  train: x.jsonl\n  eval_split: 2\n", r"c.yaml:3: data.eval_split"),
    ("data:\n  train: x.jsonl\n  on_error: maybe\n", r"c.yaml:3: data.on_error"),
    ("model:\n  name_or_path: x\n", r"missing required key data"),
    ("data:\n  train: [x.jsonl\n", r"c.yaml:3: invalid YAML"),
    ("data:\n  train: a\ndata:\n  train: b\n", r"c.yaml:3: key data is given twice"),
    ("- just\n- a list\n", r"must be a mapping"),
])
def test_bad_values_are_config_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides_parse_values_and_validate_keys(tmp_path):
    path = write(tmp_path, "data:\n  train: x.jsonl\ntraining:\n  learning_rate: 5.0e-5\n")
    cfg = load_config(path, ["training.learning_rate=1e-4", "training.packing=true", "lora.r=8", "data.eval=e.jsonl"])
    assert cfg.training["learning_rate"] == pytest.approx(1e-4)
    assert cfg.training["packing"] is True
    assert cfg.lora.r == 8
    assert cfg.data.eval == "e.jsonl"
    with pytest.raises(ConfigError, match=r"unknown key training.learnig_rate \(did you mean training.learning_rate\?\)"):
        load_config(path, ["training.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["training.learning_rate"])


def test_lora_gets_a_larger_default_learning_rate_but_user_values_win(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: x.jsonl\nlora:\n  r: 4\n"))
    assert cfg.training["learning_rate"] == LORA_LEARNING_RATE
    cfg = load_config(write(tmp_path, "data:\n  train: x.jsonl\nlora: {}\ntraining:\n  learning_rate: 1.0e-5\n"))
    assert cfg.training["learning_rate"] == 1e-5


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: x.jsonl\ntraining:\n  max_steps: 7\n"))
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again.model_dump() == cfg.model_dump()
