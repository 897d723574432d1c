"""Benchmark: training throughput, peak memory and final eval loss, sftlab's defaults vs plain TRL.

What it measures (the project's requirement): "sftlab's default against plain TRL configured as
the chapter does (SFTTrainer with packing off, per_device_train_batch_size 4, TRL's other
defaults), same model, same data, same number of trained (non-padding) tokens, run back to back
in one invocation. [...] It reports trained tokens per second, peak memory (RSS on CPU,
allocator peak on GPU) and final eval loss for both, and their ratios. Targets: >= 2x trained
tokens/s at <= 1.25x peak memory, eval loss no worse (within noise)."

The two variants, one epoch each over the same training conversations, each in its own
subprocess (this script re-invokes itself with --worker), TRL first, then sftlab:

- trl:    `trl.SFTTrainer` on a `datasets.Dataset` with a `messages` column (TRL applies the chat
          template and tokenizes), `SFTConfig(per_device_train_batch_size=4, packing=False,
          max_length=..., learning_rate=5e-5, num_train_epochs=1, report_to="none",
          save_strategy="no")` (and on a CPU `use_cpu=True`, without which transformers refuses
          TRL's bf16 default), everything else TRL's default: activation (gradient) checkpointing
          on, bf16 autocast on (on CPUs too), loss on every token, no warmup.
- sftlab: `sftlab.train.train(cfg)` with sftlab's defaults, whatever they are at the measured
          commit (the report shows what they came to: packing, precision, checkpointing, sampling,
          loss). At 7108c37: `packing: auto` (TRL's best-fit-decreasing packing, padding-free, only
          where attention has variable-length kernels, else length-grouped batches), assistant-only
          loss, warmup 10%, TensorBoard logging; on a CPU no activation checkpointing, bf16
          autocast where the CPU has native bf16, and the batch of 4 conversations per step fed
          in micro-batches fitted to memory (SmolLM2 at max_length 1024: 1 x 4 accumulation
          steps; the tiny model: 4 x 1, length-grouped); on GPUs bf16 and activation
          checkpointing. Given the same learning rate, one epoch, the same max_length and seed,
          no checkpoints (save_strategy "no", like the TRL run) and no evaluation during
          training.

Both load the model with sftlab's own loader (`sftlab.model.load_tokenizer` / `load_model`), so
they start from identical weights.

Data (generated here, seeded): chat conversations (user, then assistant) of ordinary English
words whose total rendered length (chat template included, measured with the model's own
tokenizer) follows a log-normal spread with median ~250 tokens and p95 ~1000 tokens, clipped to
[32, 1024]; the user turn takes ~40% of the content tokens, the assistant ~60%. A held-out eval
set comes from the same distribution (another seed stream).

The numbers:
- tokens: non-padding input tokens in each trainer's own prepared train dataset (TRL: its
  tokenized rows; sftlab: its packed rows). The two must agree within 3% (they differ only in how
  each tokenizes a conversation). A counting wrapper around each trainer's data collator checks
  that one epoch really fed exactly these tokens, and counts the padding TRL adds.
- train_runtime: the Trainer's own `train_runtime` (the training loop only: model loading, data
  preparation, sftlab's packing probe and saving the model are excluded).
- tokens/s = tokens / train_runtime.
- peak memory: on CPU the worker process's peak RSS (`resource.getrusage(...).ru_maxrss`) at the
  end of training, so model loading, data preparation and training all count, evaluation does
  not; on a GPU the allocator peak (`torch.cuda.max_memory_allocated`). The RSS when training
  began is shown too, so the training part of the peak can be read off.
- eval loss: one shared function for both, after training: mean cross-entropy over the
  assistant-response tokens (end-of-turn included) of the held-out conversations, with the
  masks from sftlab's own data preparation (`sftlab.data.prepare_data`), model in eval mode, one
  conversation at a time, unpacked. The loss of the untrained model is shown for scale.
- MFU (GPUs, or with --peak-tflops): model FLOPs / train_runtime / peak. Model FLOPs =
  6 x (weights of every linear layer, lm_head included) per trained token + 6 x layers x
  (heads x head_dim) x sum over conversations of length^2 (causal attention within each
  conversation only: no FLOPs for padding or masked cross-example attention, no recomputation).

Targets: sftlab/TRL tokens/s >= 2.0; sftlab/TRL peak memory <= 1.25; sftlab's eval loss <= TRL's
eval loss + the allowance (--loss-allowance, default 0.02 nats: about 10x the seed-to-seed
spread of the TRL run's eval loss measured on the tiny model and ~0.5% of the losses seen here).

Models (--model):
- tiny:           the test suite's tiny Llama (tests/conftest.py `build_tiny_model`: byte-level BPE
                  with 600 tokens, 2 layers, hidden 64), built on the fly; 2,000 conversations.
- smollm2:        the embedded SmolLM2-135M-Instruct (`model.name_or_path: smollm2-135m-instruct`),
                  full fine-tune; 48 conversations (both variants take ~10 minutes on 2 CPU cores).
- deepseek-shape: GPUs only. DeepSeek-R1-Distill-Qwen-1.5B's shape with random weights (Qwen2,
                  hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151936,
                  untied lm_head), saved in bf16 with the embedded SmolLM2 tokenizer and chat template
                  (no download), full fine-tune in bf16, max_length 2048 (sftlab packs rows of 2048
                  tokens); MFU against --peak-tflops (default 989, the H100 SXM dense bf16 peak).

Run it (from the repository root, in the project's virtualenv, offline):

    python bench/train_throughput.py --model tiny          # ~2 minutes on 2 cores
    python bench/train_throughput.py --model smollm2       # ~10 minutes on 2 cores
    python bench/train_throughput.py --model deepseek-shape --peak-tflops 989   # on a GPU machine
    python bench/train_throughput.py --model tiny --train-examples 500 --out /tmp/tp.txt

It prints the report and writes it to bench/results/train_throughput_<model>.txt, with the same
numbers as JSON next to it (.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

MEDIAN_TOKENS = 250
P95_TOKENS = 1000
MIN_TOKENS, MAX_TOKENS = 32, 1024
USER_SHARE = 0.4
LEARNING_RATE = 5e-5  # the chapter's
BATCH_SIZE = 4
SPEEDUP_TARGET = 2.0
MEMORY_TARGET = 1.25
TOKEN_AGREEMENT = 0.03

MODELS = {
    "tiny": {"train_examples": 2000, "eval_examples": 32, "max_length": 1024},
    "smollm2": {"train_examples": 48, "eval_examples": 32, "max_length": 1024},
    "deepseek-shape": {"train_examples": 2000, "eval_examples": 32, "max_length": 2048},
}
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B's config.json values (the hub is out of reach from here: the sizes as
# the issue lists them; rope_theta, sliding_window, 131,072 positions and the untied LM head as in the family's
# published 7B config.json; tests/test_bench_gpu.py checks the total against the hub's "1.78B params").
DEEPSEEK_R1_DISTILL_QWEN_1_5B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    max_position_embeddings=131072,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=21,
    attention_dropout=0.0,
    initializer_range=0.02,
)
H100_SXM_BF16_TFLOPS = 989.0

WORDS = """
able about above across act add after again air all allow almost alone along already also always amount animal answer
appear apple area arm around arrive art ask baby back bad ball bank base basic bear beat beauty bed before begin behind
bell best better between big bird bit black block blood blue board boat body bone book born both bottom box boy branch
bread break bright bring broad brother brown build burn busy buy call camp can capital captain car card care carry case
cat catch cause cell center century chair chance change character charge chart check chief child choose circle city
claim class clean clear climb clock close cloth cloud coast coat cold collect color column come common company compare
complete condition connect consider contain continue control cook cool copy corn corner correct cost cotton count
country course cover cow create crop cross crowd cry current cut dance danger dark day dead deal dear decide deep degree
depend describe desert design determine develop differ difficult direct discuss distant divide doctor dog dollar door
double down draw dream dress drink drive drop dry during each ear early earth east eat edge effect egg eight either
electric element else end enemy energy engine enough enter equal even evening event ever every exact example except
exercise expect experience experiment eye face fact fair fall family famous far farm fast father fear feed feel few field
fight figure fill final find fine finger finish fire first fish fit five flat floor flow flower fly follow food foot force
forest form forward found free fresh friend front fruit full fun game garden gas gather general gentle get girl give glad
glass gold good govern grand grass gray great green ground group grow guess guide hair half hand happen happy hard hat
have head hear heart heat heavy help here high hill history hold hole home hope horse hot hour house huge human hunt
hurry ice idea inch include industry insect instant interest invent iron island job join joy jump keep key kind king
know lady lake land language large last late laugh law lay lead learn least leave left leg length less letter level lie
life lift light like line liquid list listen little live long look lost loud love low machine main major make man many
map mark market mass master match material matter measure meat meet melody metal method middle might mile milk mind
minute miss mix modern moment money month moon morning mother motion mountain mouth move music name nation natural
nature near necessary neck need neighbor never new next night nine noise noon north nose note notice number object
observe ocean offer office often oil old once open operate opposite order organ original other page paint pair paper
parent part party pass past path pattern pay people perhaps period person picture piece place plain plan plane planet
plant play please poem point poor port position possible post pound power practice prepare present press pretty print
problem process produce product proper protect prove provide pull push question quick quiet quite race radio rain raise
range rather reach read ready real reason receive record region remember repeat reply require rest result rich ride
right ring rise river road rock roll room root rope round row rule run safe sail salt sand save say school science score
sea search season seat second section see seed seem select sell send sense sentence separate serve settle seven several
shape share sharp sheet shell shine ship shoe shop shore short shoulder show side sight sign silent silver similar simple
since sing single sister sit six size skill skin sky sleep slow small smell smile snow soft soil solution solve some song
soon sound south space speak special speech speed spend spot spread spring square stand star start state station stay
steam steel step stick still stone stop store story straight strange stream street string strong student study subject
success sugar suggest summer sun supply support sure surface surprise swim system table tail take talk tall teach team
tell test thank thick thin thing think third thought thousand three through throw time tiny together tone tool top total
touch toward town track trade train travel tree trip trouble truck try turn twenty type under unit until valley value
very view village visit voice wait walk wall want warm wash watch water wave wear weather week weight west wheel white
whole wide wild win wind window wing winter wire wish woman wonder wood word work world write yard year yellow young
""".split()


# =========================================================================== data


def rendered_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation as the model sees it: chat template applied, tokenized (as TRL does it)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def sentence_text(rng: random.Random, words: int) -> str:
    pieces, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        sentence = [rng.choice(WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        pieces.append(" ".join(sentence) + rng.choice([".", ".", ".", "?", "!", ","]))
        left -= n
    return " ".join(pieces)


def text_of_tokens(tokenizer, rng: random.Random, tokens: int) -> str:
    """Ordinary words, cut at a word boundary to at most `tokens` tokens (alone) of this tokenizer."""
    tokens = max(1, tokens)
    words = max(4, int(tokens * 0.9) + 4)
    while True:
        text = sentence_text(rng, words)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) > tokens:
            break
        words *= 2
    cut = encoding["offset_mapping"][tokens][0]
    head = text[:cut]
    space = head.rstrip().rfind(" ")
    return (head[:space] if space > 0 else head).rstrip(" ,")


def make_conversations(tokenizer, count: int, seed: int, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """Seeded conversations whose rendered length ~ log-normal(median 250, p95 1000), clipped to [32, max_tokens]."""
    rng = random.Random(seed)
    sigma = math.log(P95_TOKENS / MEDIAN_TOKENS) / 1.6448536
    overhead = (
        len(rendered_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])) - 2
    )
    rows = []
    for _ in range(count):
        target = min(max(round(rng.lognormvariate(math.log(MEDIAN_TOKENS), sigma)), MIN_TOKENS), max_tokens)
        content = max(target - overhead, 8)
        user_tokens = max(3, round(content * USER_SHARE))
        assistant_tokens = max(3, content - user_tokens)
        user = text_of_tokens(tokenizer, rng, user_tokens)
        assistant = text_of_tokens(tokenizer, rng, assistant_tokens)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        # Cutting at word boundaries and merges at the template's boundaries move the length a few
        # tokens: resize the response until the whole conversation is within 2 tokens of the target.
        for _ in range(4):
            gap = target - len(rendered_ids(tokenizer, messages))
            if 0 <= gap <= 2:
                break
            assistant_tokens = max(3, assistant_tokens + gap - (1 if gap < 0 else 0))
            messages[1]["content"] = text_of_tokens(tokenizer, rng, assistant_tokens)
        while len(rendered_ids(tokenizer, messages)) > max_tokens:  # never longer than max_tokens
            assistant_tokens -= 4
            messages[1]["content"] = text_of_tokens(tokenizer, rng, assistant_tokens)
        rows.append({"messages": messages})
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def length_stats(lengths: list[int]) -> dict:
    return {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "min": min(lengths),
        "median": percentile(lengths, 0.5),
        "p95": percentile(lengths, 0.95),
        "max": max(lengths),
        "mean": sum(lengths) / len(lengths),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# =========================================================================== models


def build_model(name: str, workdir: Path, tests_dir: Path) -> str:
    """Return what `model.name_or_path` should say for this benchmark model."""
    if name == "smollm2":
        from sftlab.config import EMBEDDED_MODEL

        return EMBEDDED_MODEL
    if name == "tiny":
        sys.path.insert(0, str(tests_dir))
        keep = os.environ.get("SFTLAB_CACHE_DIR")
        from conftest import build_tiny_model  # the test suite's tiny Llama, built exactly as the tests build it

        if keep is None:  # conftest points the data cache at a temporary folder on import; undo that
            os.environ.pop("SFTLAB_CACHE_DIR", None)
        else:
            os.environ["SFTLAB_CACHE_DIR"] = keep
        return str(build_tiny_model(workdir / "tiny-model"))
    if name == "deepseek-shape":
        return str(build_deepseek_shape(workdir / "deepseek-shape"))
    raise ValueError(name)


def build_deepseek_shape(directory: Path) -> Path:
    """DeepSeek-R1-Distill-Qwen-1.5B's shape with random weights, in bf16, with the embedded SmolLM2
    tokenizer (its ids all fall inside Qwen2's 151,936-token vocabulary); nothing is downloaded."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sftlab.config import ModelConfig
    from sftlab.model import load_tokenizer
    from sftlab.templates import add_default_chat_template

    tokenizer = load_tokenizer(ModelConfig())
    add_default_chat_template(tokenizer)
    config = Qwen2Config(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEEPSEEK_R1_DISTILL_QWEN_1_5B,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


# =========================================================================== shared measurements


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def eval_masks(eval_path: str, tokenizer, max_length: int):
    """input_ids + assistant_masks of the held-out conversations, from sftlab's own data preparation."""
    from sftlab.config import DataConfig
    from sftlab.data import prepare_data

    prepared = prepare_data(
        DataConfig(train=eval_path, eval_split=0.0),
        tokenizer,
        assistant_only_loss=True,
        seed=0,
        max_length=max_length,
        cache_dir=Path(tempfile.mkdtemp(prefix="tp-evalcache-")),
    )
    return prepared.train["input_ids"], prepared.train["assistant_masks"]


def eval_loss(model, ids_list, masks_list) -> dict:
    """Mean cross-entropy over the assistant tokens, one conversation at a time, no packing."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for ids, mask in zip(ids_list, masks_list):
                input_ids = torch.tensor([ids], device=device)
                logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
                targets = input_ids[0, 1:]
                trained = torch.tensor(mask[1:], device=device).bool()
                losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
                total += losses[trained].sum().item()
                count += int(trained.sum())
    finally:
        model.train(was_training)
    return {"eval_loss": total / count, "eval_tokens": count}


def linear_weights(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# =========================================================================== workers


class CountingCollator:
    """Wraps a trainer's data collator: counts what one epoch actually fed the model."""

    def __init__(self, inner):
        self.inner = inner
        self.batches = self.slots = self.tokens = self.loss_tokens = self.max_row = 0
        self.batch_tokens: list[int] = []  # per micro-batch, in the order training consumes them

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        self.batches += 1
        self.slots += ids.numel()
        self.max_row = max(self.max_row, ids.shape[-1])
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.tokens += tokens
        self.batch_tokens.append(tokens)
        self.loss_tokens += int((batch["labels"][..., 1:] != -100).sum())
        return batch


RECORDED: list = []
# Steady-state throughput leaves out the first optimizer steps (kernel selection, compilation, allocator
# growth): at most this many, and at most a quarter of the run.
STEADY_AFTER_STEPS = 10


def recording_trainer_class():
    """trl.SFTTrainer, plus: remember the instance, count the collated batches, note memory when training starts."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class TrainStart(TrainerCallback):
        def __init__(self):
            self.rss_mb = self.peak_rss_mb = None
            self.started = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_mb, self.peak_rss_mb, self.started = current_rss_mb(), peak_rss_mb(), time.perf_counter()
            self.cpu_started = cpu_seconds()
            self.steady_from = min(STEADY_AFTER_STEPS, max(1, state.max_steps // 4))
            self.step_seconds: dict[int, float] = {}
            if on_gpu():
                import torch

                torch.cuda.synchronize()
                self.gpu_allocated_mb = torch.cuda.memory_allocated() / 2**20

        def on_step_end(self, args, state, control, **kwargs):
            # Only the window's two ends wait for the GPU: a wait at every step would idle it.
            if state.global_step in (self.steady_from, state.max_steps):
                if on_gpu():
                    import torch

                    torch.cuda.synchronize()
                self.step_seconds[state.global_step] = time.perf_counter() - self.started

        def on_train_end(self, args, state, control, **kwargs):
            self.wall = time.perf_counter() - self.started
            self.cpu = cpu_seconds() - self.cpu_started

    class RecordingSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = CountingCollator(self.data_collator)
            self.train_start = TrainStart()
            self.add_callback(self.train_start)
            RECORDED.append(self)

    return RecordingSFTTrainer


def steady_window(train_start, collator: CountingCollator, accumulation: int) -> dict | None:
    """Tokens and seconds of the optimizer steps after the first `steady_from` (None for too short a run)."""
    times = train_start.step_seconds
    start, end = train_start.steady_from, max(times, default=0)
    if start not in times or end <= start:
        return None
    tokens = sum(collator.batch_tokens[start * accumulation :])  # every micro-batch after the first steps
    return {
        "from_step": start,
        "steps": end - start,
        "tokens": tokens,
        "seconds": times[end] - times[start],
        "tokens_per_s": tokens / (times[end] - times[start]),
    }


def dataset_tokens(dataset) -> dict:
    lengths = [len(ids) for ids in dataset["input_ids"]]
    out = {"rows": len(lengths), "tokens": sum(lengths), "longest_row": max(lengths)}
    if "seq_lengths" in dataset.column_names:
        seqs = [s for row in dataset["seq_lengths"] for s in row]
        out["conversations"] = len(seqs)
        out["sum_sq_lengths"] = sum(s * s for s in seqs)
    else:
        out["conversations"] = len(lengths)
        out["sum_sq_lengths"] = sum(n * n for n in lengths)
    if "labels" in dataset.column_names:
        out["label_tokens"] = sum(sum(1 for t in row if t != -100) for row in dataset["labels"])
    return out


def worker(kind: str, spec: dict) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if on_gpu():
        torch.cuda.reset_peak_memory_stats()
    from sftlab.config import ModelConfig
    from sftlab.model import load_model, load_tokenizer
    from sftlab.templates import add_default_chat_template

    result: dict = {"variant": kind}
    if kind == "trl":
        tokenizer = load_tokenizer(ModelConfig(name_or_path=spec["model"]))
        add_default_chat_template(tokenizer)  # a no-op for templated models; sftlab does the same
        model = load_model(ModelConfig(name_or_path=spec["model"]), tokenizer)
        ids, masks = eval_masks(spec["eval"], tokenizer, spec["max_length"])
        if spec.get("base_eval"):  # the untrained model's loss, for scale (no gradients: far below the training peak)
            if on_gpu():
                model.to("cuda")
            result["base"] = eval_loss(model, ids, masks)
        import datasets
        from trl import SFTConfig

        args = SFTConfig(
            output_dir=spec["output_dir"],
            per_device_train_batch_size=BATCH_SIZE,
            packing=False,
            max_length=spec["max_length"],
            learning_rate=spec["learning_rate"],
            num_train_epochs=1,
            report_to="none",
            save_strategy="no",
            seed=spec["seed"],
            disable_tqdm=True,
            # transformers refuses bf16 without a GPU unless told to train on the CPU: the one change a
            # TRL user on a CPU must make (its error message says so); bf16 itself stays TRL's default.
            use_cpu=not on_gpu(),
        )
        trainer = recording_trainer_class()(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(read_jsonl(spec["train"])),
            processing_class=tokenizer,
        )
        output = trainer.train()
    else:
        import trl

        from sftlab.config import validate_config
        from sftlab.resolve import resolve_defaults
        from sftlab.train import train

        raw = {
            "model": {"name_or_path": spec["model"]},
            "data": {"train": spec["train"], "eval_split": 0},
            "training": {
                "output_dir": spec["output_dir"],
                "num_train_epochs": 1,
                "learning_rate": spec["learning_rate"],
                "max_length": spec["max_length"],
                "seed": spec["seed"],
                "save_strategy": "no",
            },
        }
        from sftlab.config import apply_override

        for override in spec.get("sftlab_set", []):  # --sftlab-set: try a change to sftlab's defaults
            apply_override(raw, override)
        cfg = resolve_defaults(validate_config(raw, source="train_throughput"))
        trl.SFTTrainer = recording_trainer_class()  # sftlab.train imports it from trl when it builds the trainer
        run = train(cfg, overwrite=True)
        output = None
        trainer = RECORDED[-1]
        result["train_metrics"] = run.metrics
        tokenizer = trainer.processing_class
        model = trainer.model
        ids, masks = eval_masks(spec["eval"], tokenizer, spec["max_length"])
    metrics = output.metrics if output is not None else result.pop("train_metrics")

    # Memory first, before evaluation can add anything.
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_at_train_start_mb"] = trainer.train_start.rss_mb
    result["peak_rss_before_train_mb"] = trainer.train_start.peak_rss_mb
    if on_gpu():
        result["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        result["gpu_allocated_at_train_start_mb"] = trainer.train_start.gpu_allocated_mb
    args = trainer.args
    collator = trainer.data_collator
    result.update(
        {
            "train_runtime": metrics["train_runtime"],
            # CPU seconds the process used while training, per wall second: ~ the thread count on an idle
            # machine; clearly less means other work on the machine took CPU time from this run.
            "cpu_seconds": trainer.train_start.cpu,
            "cores_busy": trainer.train_start.cpu / trainer.train_start.wall,
            "train_loss": metrics.get("train_loss"),
            "steps": trainer.state.global_step,
            "dataset": dataset_tokens(trainer.train_dataset),
            "fed": {
                "batches": collator.batches,
                "tokens": collator.tokens,
                "slots": collator.slots,
                "loss_tokens": collator.loss_tokens,
                "longest_batch_row": collator.max_row,
            },
            "steady": steady_window(trainer.train_start, collator, args.gradient_accumulation_steps),
            "settings": {
                "packing": bool(args.packing),
                "padding_free": bool(getattr(trainer, "padding_free", False)),
                "bf16": bool(args.bf16),
                "activation_checkpointing": bool(args.gradient_checkpointing),
                "assistant_only_loss": kind == "sftlab",
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "sampling": str(
                    getattr(args, "train_sampling_strategy", None)
                    or ("group_by_length" if getattr(args, "group_by_length", False) else "random")
                ),
                "learning_rate": args.learning_rate,
                "warmup_steps": args.warmup_steps,
                "lr_scheduler_type": str(args.lr_scheduler_type),
                "max_length": args.max_length,
                "device": str(args.device),
                "attn_implementation": model.config._attn_implementation,
                "param_dtype": str(next(model.parameters()).dtype),
                "torch_threads": torch.get_num_threads(),
            },
            "linear_weights": linear_weights(model),
            "layers": model.config.num_hidden_layers,
            "attention_width": model.config.num_attention_heads
            * (getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads),
        }
    )
    result.update(eval_loss(model, ids, masks))
    return result


# =========================================================================== parent


def git(*arguments: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *arguments], capture_output=True, text=True, check=True
    ).stdout.strip()


def use_sftlab_source(commit: str | None, workdir: Path) -> dict:
    """Point this process and the workers at the sftlab to measure; say which one it is."""
    if commit is None:
        import sftlab

        where = Path(sftlab.__file__).resolve().parent.parent
        try:
            head = git("rev-parse", "--short", "HEAD")
            dirty = bool(git("status", "--porcelain", "--", "src"))
            description = f"working tree {where} (HEAD {head}{', src/ has uncommitted changes' if dirty else ''})"
        except (OSError, subprocess.CalledProcessError):
            description = f"{where} (not a git checkout)"
        return {"tests": REPO / "tests", "description": description}
    full = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    export = workdir / f"sftlab-{full[:12]}"
    export.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", full, "src", "tests"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    source = str(export / "src")
    sys.path.insert(0, source)
    os.environ["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
    for name in [n for n in sys.modules if n == "sftlab" or n.startswith("sftlab.")]:
        del sys.modules[name]
    return {
        "tests": export / "tests",
        "description": f"commit {full[:12]} ({git('log', '-1', '--format=%s', full)[:70]}), exported with git archive",
    }


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": {
            name: package_version(name)
            for name in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "sftlab")
        },
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    info["load_average"] = os.getloadavg()  # other work on the machine skews every number here
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run_worker(kind: str, spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"spec-{kind}.json"
    result_path = workdir / f"result-{kind}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}), encoding="utf-8")
    print(f"\n=== {kind}: training in a subprocess ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)],
        check=True,
        env={**os.environ, "SFTLAB_CACHE_DIR": str(workdir / f"cache-{kind}")},
    )
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["process_seconds"] = time.perf_counter() - started
    return result


def model_flops(result: dict) -> float:
    data = result["dataset"]
    return (
        6 * result["linear_weights"] * data["tokens"]
        + 6 * result["layers"] * result["attention_width"] * data["sum_sq_lengths"]
    )


def memory_of(result: dict) -> float:
    return result["gpu_peak_allocated_mb"] if "gpu_peak_allocated_mb" in result else result["peak_rss_mb"]


def summarize(args, info: dict, data: dict, trl_r: dict, sft_r: dict, seconds: float) -> tuple[str, dict]:
    gpu = "gpu_peak_allocated_mb" in trl_r
    for r in (trl_r, sft_r):
        r["tokens"] = r["dataset"]["tokens"]
        r["tokens_per_s"] = r["tokens"] / r["train_runtime"]
        r["peak_memory_mb"] = memory_of(r)
        if args.peak_tflops:
            r["model_tflop"] = model_flops(r) / 1e12
            r["mfu"] = model_flops(r) / r["train_runtime"] / (args.peak_tflops * 1e12)
    token_gap = abs(sft_r["tokens"] - trl_r["tokens"]) / trl_r["tokens"]
    speedup = sft_r["tokens_per_s"] / trl_r["tokens_per_s"]
    memory_ratio = sft_r["peak_memory_mb"] / trl_r["peak_memory_mb"]
    loss_diff = sft_r["eval_loss"] - trl_r["eval_loss"]
    checks = {
        "tokens_agree": token_gap <= TOKEN_AGREEMENT,
        "every_token_fed": all(r["fed"]["tokens"] == r["dataset"]["tokens"] for r in (trl_r, sft_r)),
        "throughput": speedup >= SPEEDUP_TARGET,
        "memory": memory_ratio <= MEMORY_TARGET,
        "eval_loss": loss_diff <= args.loss_allowance,
    }
    verdict = all(checks[k] for k in ("throughput", "memory", "eval_loss")) and checks["tokens_agree"]
    memory_kind = (
        "GPU allocator peak (torch.cuda.max_memory_allocated)" if gpu else "peak RSS (ru_maxrss) of the worker process"
    )
    summary = {
        "benchmark": "bench/train_throughput.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": info,
        "data": data,
        "settings": {
            "seed": args.seed,
            "learning_rate": LEARNING_RATE,
            "per_device_train_batch_size": BATCH_SIZE,
            "max_length": data["max_length"],
            "epochs": 1,
            "loss_allowance_nats": args.loss_allowance,
            "peak_tflops": args.peak_tflops,
            "memory": memory_kind,
            "sftlab_set": args.sftlab_set,
        },
        "trl": trl_r,
        "sftlab": sft_r,
        "ratios": {
            "tokens_per_s": speedup,
            "peak_memory": memory_ratio,
            "eval_loss_difference": loss_diff,
            "token_count_gap": token_gap,
        },
        "targets": {
            "tokens_per_s_at_least": SPEEDUP_TARGET,
            "peak_memory_at_most": MEMORY_TARGET,
            "eval_loss_difference_at_most": args.loss_allowance,
        },
        "checks": checks,
        "pass": verdict,
        "wall_seconds": seconds,
    }

    def mb(x):
        return f"{x:,.0f} MB"

    def row(label, fn):
        return f"  {label:<34}{fn(trl_r):>22}{fn(sft_r):>22}"

    def onoff(flag):
        return "on" if flag else "off"

    v = info["versions"]
    lines = [
        f"sftlab training throughput benchmark (bench/train_throughput.py), model: {args.model}",
        f"date:       {summary['date']}",
        f"machine:    {info['cpus']} CPUs ({info['usable_cpus']} usable), {info['cpu_model']}; {info['platform']}"
        + (f"; GPU {info['gpu']} ({info['gpu_memory_gb']} GiB)" if "gpu" in info else "; no GPU"),
        f"load:       1/5/15-minute load average before the runs {'/'.join(f'{x:.2f}' for x in info['load_before'])}, "
        f"after {'/'.join(f'{x:.2f}' for x in info['load_average'])} (a training worker alone keeps it near "
        f"{info['usable_cpus']}; more means other work competed for the CPUs)",
        f"versions:   python {info['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"accelerate {v['accelerate']}, datasets {v['datasets']}, sftlab {v['sftlab']}",
        f"sftlab:     {info['sftlab_source']}",
        f"model:      {data['model_source']} ({trl_r['linear_weights'] / 1e6:,.1f}M weights in linear layers, "
        f"{trl_r['layers']} layers)",
        f"data:       seed {args.seed}; log-normal total length (median {MEDIAN_TOKENS}, p95 {P95_TOKENS}), clipped to "
        f"[{MIN_TOKENS}, {data['max_tokens']}]; user ~{USER_SHARE:.0%} / assistant ~{1 - USER_SHARE:.0%} of the content",
    ]
    for split in ("train", "eval"):
        s = data[split]
        lines.append(
            f"  {split:<6}{s['examples']:>6,} conversations, {s['tokens']:>9,} tokens rendered; length min {s['min']}, "
            f"median {s['median']:.0f}, p95 {s['p95']:.0f}, max {s['max']}, mean {s['mean']:.0f}"
        )
    lines += [
        f"settings:   one epoch, learning rate {LEARNING_RATE:g}, per_device_train_batch_size {BATCH_SIZE}, "
        f"max_length {data['max_length']}; memory = {memory_kind}",
        *([f"sftlab --set: {', '.join(args.sftlab_set)} (not sftlab's defaults)"] if args.sftlab_set else []),
        "",
        f"  {'':<34}{'TRL (chapter)':>22}{'sftlab default' if not args.sftlab_set else 'sftlab --set':>22}",
        row(
            "packing / padding-free",
            lambda r: f"{onoff(r['settings']['packing'])} / {onoff(r['settings']['padding_free'])}",
        ),
        row(
            "precision / param dtype",
            lambda r: (
                f"{'bf16 autocast' if r['settings']['bf16'] else 'fp32'} / "
                f"{r['settings']['param_dtype'].replace('torch.', '').replace('float32', 'fp32')}"
            ),
        ),
        row("activation checkpointing", lambda r: onoff(r["settings"]["activation_checkpointing"])),
        row(
            "micro-batch x accumulation",
            lambda r: (
                f"{r['settings']['per_device_train_batch_size']} x "
                f"{r['settings'].get('gradient_accumulation_steps', 1)}"
            ),
        ),
        row("batches", lambda r: r["settings"].get("sampling", "?")),
        row("loss on", lambda r: "assistant" if r["settings"]["assistant_only_loss"] else "all tokens"),
        row(
            "warmup steps / attention",
            lambda r: f"{r['settings']['warmup_steps']:g} / {r['settings']['attn_implementation']}",
        ),
        row("rows (conversations)", lambda r: f"{r['dataset']['rows']:,} ({r['dataset']['conversations']:,})"),
        row("optimizer steps", lambda r: f"{r['steps']:,}"),
        row("tokens (non-padding)", lambda r: f"{r['tokens']:,}"),
        row("token slots fed (incl. padding)", lambda r: f"{r['fed']['slots']:,}"),
        row("loss tokens fed", lambda r: f"{r['fed']['loss_tokens']:,}"),
        row("train_runtime", lambda r: f"{r['train_runtime']:,.1f} s"),
        row("tokens/s", lambda r: f"{r['tokens_per_s']:,.1f}"),
        row("cores busy while training", lambda r: f"{r['cores_busy']:.2f} of {r['settings']['torch_threads']}"),
    ]
    if args.peak_tflops:
        lines.append(row(f"MFU (peak {args.peak_tflops:g} TFLOPS)", lambda r: f"{r['mfu']:.1%}"))
    if gpu:
        lines.append(row("GPU allocated at train start", lambda r: mb(r["gpu_allocated_at_train_start_mb"])))
        lines.append(row("GPU peak allocated", lambda r: mb(r["gpu_peak_allocated_mb"])))
    lines += [
        row("RSS at train start", lambda r: mb(r["rss_at_train_start_mb"])),
        row("peak RSS before training", lambda r: mb(r["peak_rss_before_train_mb"])),
        row("peak RSS (end of training)", lambda r: mb(r["peak_rss_mb"])),
        row("train loss (own objective)", lambda r: f"{r['train_loss']:.4f}"),
        row("eval loss (assistant tokens)", lambda r: f"{r['eval_loss']:.4f}"),
    ]
    if "base" in trl_r:
        lines.append(f"  {'eval loss before training':<34}{trl_r['base']['eval_loss']:>22.4f}{'(same model)':>22}")
    lines += [
        f"  eval tokens: {trl_r['eval_tokens']:,} assistant tokens in {data['eval']['examples']} held-out conversations",
        "",
        f"ratios (sftlab / TRL): tokens/s x{speedup:.2f}; peak memory x{memory_ratio:.2f}; "
        f"eval loss {loss_diff:+.4f} nats; token counts differ by {token_gap:.2%}",
        f"targets:    tokens/s >= x{SPEEDUP_TARGET:g}: {'PASS' if checks['throughput'] else 'FAIL'}; "
        f"peak memory <= x{MEMORY_TARGET:g}: {'PASS' if checks['memory'] else 'FAIL'}; "
        f"eval loss <= TRL + {args.loss_allowance:g}: {'PASS' if checks['eval_loss'] else 'FAIL'}",
        f"sanity:     token counts agree within {TOKEN_AGREEMENT:.0%}: {'yes' if checks['tokens_agree'] else 'NO'}; "
        f"one epoch fed every dataset token: {'yes' if checks['every_token_fed'] else 'NO'}",
        f"overall:    {'PASS' if verdict else 'FAIL'}  (wall time {seconds / 60:.1f} min)",
    ]
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument(
        "--train-examples", type=int, default=None, help="default: tiny 2000, smollm2 48, deepseek-shape 2000"
    )
    parser.add_argument("--eval-examples", type=int, default=None, help="default 32")
    parser.add_argument("--seed", type=int, default=1234, help="data seed; both trainers also use it as their seed")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default bench/results/train_throughput_<model>.txt); the JSON goes next to it",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"accelerator's dense bf16 peak for MFU (default {H100_SXM_BF16_TFLOPS:g} on a GPU, none on CPU)",
    )
    parser.add_argument(
        "--loss-allowance", type=float, default=0.02, help="eval loss noise allowance in nats (default 0.02)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated model, data and runs here")
    parser.add_argument(
        "--sftlab-commit",
        default=None,
        help="measure sftlab (src/ and tests/) as committed at this git commit, exported with "
        "`git archive`, instead of the working tree (which another change may be editing)",
    )
    parser.add_argument(
        "--sftlab-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of sftlab's config, as `sftlab train --set` does (repeatable), to measure "
        "a proposed change to a default; the report names the overrides",
    )
    parser.add_argument("--worker", choices=["trl", "sftlab"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        result = worker(args.worker, spec)
        Path(spec["result"]).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        return 0

    started = time.perf_counter()
    load_before = os.getloadavg()
    import torch

    if args.model == "deepseek-shape" and not torch.cuda.is_available():
        parser.error("--model deepseek-shape needs a GPU (bf16 full fine-tune of a 1.8B-parameter model)")
    if args.peak_tflops is None and torch.cuda.is_available():
        args.peak_tflops = H100_SXM_BF16_TFLOPS
    defaults = MODELS[args.model]
    train_n = args.train_examples or defaults["train_examples"]
    eval_n = args.eval_examples or defaults["eval_examples"]
    max_length = defaults["max_length"]
    out = args.out or RESULTS / f"train_throughput_{args.model}.txt"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        provenance = use_sftlab_source(args.sftlab_commit, workdir)
        model_source = build_model(args.model, workdir, provenance["tests"])
        from sftlab.config import ModelConfig
        from sftlab.model import load_tokenizer
        from sftlab.templates import add_default_chat_template

        tokenizer = load_tokenizer(ModelConfig(name_or_path=model_source))
        add_default_chat_template(tokenizer)
        train_rows = make_conversations(tokenizer, train_n, seed=args.seed)
        eval_rows = make_conversations(tokenizer, eval_n, seed=args.seed + 1_000_003)
        write_jsonl(workdir / "train.jsonl", train_rows)
        write_jsonl(workdir / "eval.jsonl", eval_rows)
        data = {
            "model_source": model_source,
            "max_length": max_length,
            "max_tokens": MAX_TOKENS,
            "train": length_stats([len(rendered_ids(tokenizer, r["messages"])) for r in train_rows]),
            "eval": length_stats([len(rendered_ids(tokenizer, r["messages"])) for r in eval_rows]),
        }
        spec = {
            "model": model_source,
            "train": str(workdir / "train.jsonl"),
            "eval": str(workdir / "eval.jsonl"),
            "max_length": max_length,
            "learning_rate": LEARNING_RATE,
            "seed": args.seed,
        }
        trl_r = run_worker("trl", {**spec, "output_dir": str(workdir / "run-trl"), "base_eval": True}, workdir)
        sft_r = run_worker(
            "sftlab", {**spec, "output_dir": str(workdir / "run-sftlab"), "sftlab_set": args.sftlab_set}, workdir
        )
        info = machine_info()
        info["load_before"] = load_before
        info["sftlab_source"] = provenance["description"]
        report, summary = summarize(args, info, data, trl_r, sft_r, time.perf_counter() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
