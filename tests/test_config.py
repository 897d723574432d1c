from pathlib import Path

import pytest

from sftlab.config import (
    EMBEDDED_MODEL,
    LORA_LEARNING_RATE,
    TRAINING_DEFAULTS,
    load_config,
    starter_config_text,
    write_starter_config,
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


def test_the_default_batch_is_four_conversations_per_step_and_marked_as_default(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: t.jsonl}\n"))
    assert (cfg.training["per_device_train_batch_size"], cfg.training["gradient_accumulation_steps"]) == (4, 1)
    assert cfg.batch_is_default


@pytest.mark.parametrize(
    "text, shape", [("per_device_train_batch_size: 2", (2, 1)), ("gradient_accumulation_steps: 8", (4, 8))]
)
def test_a_batch_key_the_user_sets_is_kept_as_trl_means_it(tmp_path, text, shape):
    cfg = load_config(write(tmp_path, f"data: {{train: t.jsonl}}\ntraining:\n  {text}\n"))
    assert (cfg.training["per_device_train_batch_size"], cfg.training["gradient_accumulation_steps"]) == shape
    assert not cfg.batch_is_default


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


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "data:\n  train: x.jsonl\ntraining:\n  learnin_rate: 1.0e-4\n",
            r"c.yaml:4: unknown key training.learnin_rate \(did you mean training.learning_rate\?\)",
        ),
        (
            "data:\n  train: x.jsonl\n  formt: text\n",
            r"c.yaml:3: unknown key data.formt \(did you mean data.format\?\)",
        ),
        (
            "data:\n  train: x.jsonl\nmodel:\n  learning_rate: 1\n",
            r"c.yaml:4: unknown key model.learning_rate \(did you mean training.learning_rate\?\)",
        ),
        (
            "data:\n  train: x.jsonl\ntrainin:\n  max_steps: 3\n",
            r"c.yaml:3: unknown key trainin \(did you mean training\?\)",
        ),
        (
            "data:\n  train:\n    - path: a.jsonl\n      wieght: 2\n",
            r"c.yaml:4: unknown key data.train.0.wieght \(did you mean data.train.0.weight\?\)",
        ),
    ],
)
def test_unknown_keys_name_the_line_and_the_closest_valid_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "data:\n  train: x.jsonl\ntraining:\n  max_steps: abc\n",
            r"c.yaml:4: training.max_steps = 'abc' is not a valid int",
        ),
        ("data:\n  train: x.jsonl\ntraining:\n  trust_remote_code: true\n", r"set this in model.trust_remote_code"),
        ("data:\n  train: x.jsonl\n  eval_split: 2\n", r"c.yaml:3: data.eval_split"),
        ("data:\n  train: x.jsonl\n  on_error: maybe\n", r"c.yaml:3: data.on_error"),
        ("model:\n  name_or_path: x\n", r"missing required key data"),
        ("data:\n  train: [x.jsonl\n", r"c.yaml:3: invalid YAML"),
        ("data:\n  train: a\ndata:\n  train: b\n", r"c.yaml:3: key data is given twice"),
        ("- just\n- a list\n", r"must be a mapping"),
    ],
)
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
    with pytest.raises(
        ConfigError, match=r"unknown key training.learnig_rate \(did you mean training.learning_rate\?\)"
    ):
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


# =========================================================================== property-based: only ConfigError

import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sftlab.config import (  # noqa: E402
    DataConfig,
    EvalConfig,
    FormatSpec,
    LoraConfig,
    ModelConfig,
    MonitorConfig,
    SourceConfig,
    sft_config_fields,
)

SECTIONS = ["model", "data", "training", "lora", "eval", "monitor"]
SECTION_KEYS = sorted(
    {
        key
        for section in (ModelConfig, DataConfig, SourceConfig, LoraConfig, EvalConfig, FormatSpec, MonitorConfig)
        for key in section.model_fields
    }
    | {"schema"}
)
TRAINING_KEYS = sorted(sft_config_fields()) + ["warmup_ratio", "packing"]
# Pieces of YAML syntax and of sftlab configs, including what PyYAML turns into dates, binary,
# aliases, complex keys, non-finite floats and tags it refuses.
FRAGMENTS = [
    "\n",
    "\n  ",
    "\n    ",
    ": ",
    ":",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "'",
    '"',
    "# c",
    "&a ",
    "*a",
    "? ",
    "|\n",
    ">\n",
    "!!binary aGk=",
    "!!python/object:os.system",
    "!!str",
    "!!float",
    "!!int",
    "!!bool",
    "!!timestamp",
    "!!set",
    "!!omap",
    "2001-02-30",
    "2001-01-01",
    "1e400",
    ".nan",
    "-.inf",
    "~",
    "null",
    "true",
    "\t",
    "---",
    "...",
    "<<: ",
    "0x1F",
    "1_000",
    "%",
    "@",
    "x.jsonl",
    "steps",
    "no",
    "auto",
    *SECTIONS,
    *SECTION_KEYS,
]
yamlish = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=40).map("".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["x.jsonl", "steps", "epoch", "no", "best", "auto", "json", "regex", "overfitting", "all-linear"])
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(SECTION_KEYS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=10,
)
sections = st.dictionaries(st.sampled_from(SECTION_KEYS) | st.text(max_size=4), values, max_size=5)
configs = st.fixed_dictionaries(
    {
        "data": st.fixed_dictionaries(
            {"train": st.just("x.jsonl") | values},
            optional={key: values for key in DataConfig.model_fields if key != "train"},
        )
    },
    optional={
        "model": sections,
        "training": st.dictionaries(st.sampled_from(TRAINING_KEYS), values, max_size=5),
        "lora": sections | st.none(),
        "eval": sections,
        "monitor": sections,
    },
) | st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=4), values, max_size=6)
key_parts = st.sampled_from(SECTIONS + SECTION_KEYS + TRAINING_KEYS[:40]) | st.text(max_size=4)
overrides = st.lists(
    st.builds(
        lambda key, sep, value: f"{key}{sep}{value}",
        st.lists(key_parts, max_size=4).map(".".join),
        st.sampled_from(["=", "==", "", " = "]),
        st.sampled_from(FRAGMENTS) | st.text(max_size=8),
    ),
    max_size=4,
)
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def loads_or_config_error(path: Path, overrides: list[str] = ()) -> None:
    """load_config succeeds with a config whose resolved YAML loads back the same, or raises
    ConfigError with a message; any other exception would be a traceback for the user."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as error:
        assert str(error).strip()
        return
    again = path.with_name("resolved.yaml")
    again.write_text(cfg.to_yaml(), encoding="utf-8")  # what every run directory gets as config.yaml
    assert load_config(again).model_dump() == cfg.model_dump()


@PROPERTY
@given(text=yamlish)
def test_random_yaml_text_only_ever_raises_config_error(tmp_path, text):
    loads_or_config_error(write(tmp_path, text))


@PROPERTY
@given(content=st.binary(max_size=80))
def test_random_bytes_only_ever_raise_config_error(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    loads_or_config_error(path)


@PROPERTY
@given(raw=configs)
def test_random_sections_keys_and_values_only_ever_raise_config_error(tmp_path, raw):
    loads_or_config_error(write(tmp_path, yaml.safe_dump(raw)))


@PROPERTY
@given(training=st.dictionaries(st.sampled_from(TRAINING_KEYS), scalars | st.lists(scalars, max_size=2), max_size=6))
def test_random_training_values_only_ever_raise_config_error(tmp_path, training):
    loads_or_config_error(write(tmp_path, yaml.safe_dump({"data": {"train": "x.jsonl"}, "training": training})))


@PROPERTY
@given(
    base=st.sampled_from(
        ["", "data:\n  train: x.jsonl\n", "- a list\n", "data: 3\n", "data:\n  train: x.jsonl\ntraining: [1]\n"]
    ),
    sets=overrides,
)
def test_random_set_overrides_only_ever_raise_config_error(tmp_path, base, sets):
    loads_or_config_error(write(tmp_path, base), sets)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  train: x\n  eval: 2001-02-30\n", r"c.yaml: invalid value: day is out of range"),
        ("? [a, b]\n: c\n", r"c.yaml:1: a key must be a name"),
        ("data: &a [*a]\n", r"nested too deeply or an alias refers to itself"),
        ("data:\n  train: !!binary aGk=\n", r"c.yaml:2: data.train is binary data"),
        ("data:\n  train: x\ntraining:\n  learning_rate: .nan\n", r"c.yaml:4: training.learning_rate is nan"),
    ],
)
def test_yaml_that_python_reads_oddly_is_a_config_error_naming_the_line(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_empty_override_keys_are_config_errors(tmp_path):
    path = write(tmp_path, "")
    for override in ("=1", "training..max_steps=3", ".x=1"):
        with pytest.raises(ConfigError, match="empty key name"):
            load_config(path, [override])


@pytest.mark.parametrize("name", ["chapter_deepseek_smoltalk.yaml", "chapter_deepseek_smoltalk_lora.yaml"])
def test_the_chapters_own_setup_ships_as_example_configs(name):
    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / name)
    assert cfg.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.data.train.path == "HuggingFaceTB/smoltalk" and cfg.data.train.name == "all"
    chapter = {
        "max_steps": 1000,
        "per_device_train_batch_size": 4,
        "logging_steps": 10,
        "save_steps": 100,
        "eval_steps": 50,
        "eval_strategy": "steps",
    }
    assert {key: cfg.training[key] for key in chapter} == chapter
    assert cfg.training["learning_rate"] == (2e-4 if cfg.lora else 5e-5) and not cfg.batch_is_default
