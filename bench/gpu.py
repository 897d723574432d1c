"""Benchmark: the chapter's setup on one GPU, sftlab's defaults against plain TRL (tokens/s, peak memory, MFU).

The issue's measurement: "one command that fits in 8 minutes on one H100/H200-class GPU: the
DeepSeek-R1-Distill-Qwen-1.5B shape (its real config, random weights, so no download),
smoltalk-shaped generated conversations, bf16, max_length 2048; sftlab's defaults against the
chapter's plain TRL setup, back to back: tokens/s, peak GPU memory, and MFU. Targets: at least
1.5x the TRL setup's tokens/s at no more peak memory, MFU at least 40%."

What runs, in order, each trainer in its own subprocess (bench/train_throughput.py's workers,
which this script reuses with its data helpers):

- the model: DeepSeek-R1-Distill-Qwen-1.5B's config.json values (DEEPSEEK_R1_DISTILL_QWEN_1_5B
  below: Qwen2ForCausalLM, hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960,
  vocabulary 151,936, rope_theta 10000, 131,072 positions, untied LM head; 1.78B weights), random
  weights in bf16, saved as safetensors;
- the tokenizer: a byte-level BPE trained here in a second on ordinary English words, with ChatML
  and its special tokens (sftlab's default template for models without one). Its ids all fall
  inside the model's vocabulary; the model still computes all 151,936 logits, so the work per
  token is the real model's;
- the data: smoltalk-shaped conversations, generated and seeded: 1 to 6 user/assistant turns
  (P(turns = k) ~ 0.5^(k-1)), a total rendered length that is log-normal with median 512 and p95
  1536 tokens, clipped to [48, 2048], user turns ~30% and assistant turns ~70% of the content.
  These are this benchmark's choices, shaped like smoltalk (multi-turn, a long tail), not
  statistics measured on it;
- TRL, as the chapter configures it: `SFTTrainer` on the `messages` column, `SFTConfig(
  per_device_train_batch_size=4, packing=False, max_length=2048, learning_rate=5e-5,
  num_train_epochs=1, save_strategy="no", report_to="none")`, everything else TRL's default (bf16,
  activation checkpointing, loss on every token, transformers' default attention: sdpa);
- sftlab, with its defaults at the measured commit (on a GPU: packing through flash-attn where
  installed, else flex_attention, see src/sftlab/speed.py; bf16; activation checkpointing;
  assistant-only loss), the same learning rate, one epoch, no checkpoints or evaluation.

The numbers:
- tokens: non-padding tokens fed, counted by a wrapper around each trainer's collator; the two
  variants must agree within 3% (they tokenize the same conversations);
- tokens/s (steady): tokens of the optimizer steps after the first 10 (kernel selection,
  flex_attention's compilation, the allocator's growth) over their wall time, the GPU synchronized
  at both ends; tokens/s over the whole `train_runtime` is shown too. The targets use the steady one;
- peak memory: the worker's `torch.cuda.max_memory_allocated()` (the caching allocator's reserved
  peak is shown too);
- MFU = model FLOPs per second / the GPU's dense bf16 peak (PEAK_BF16_TFLOPS, by device name;
  --peak-tflops overrides). Model FLOPs per token = 6 N + 12 L d s (PaLM's count, Chowdhery et al.
  2022, appendix B): N the weights of the linear layers (LM head included; the embedding lookup,
  norms and biases left out), L layers, d the attention width (heads x head dim, 1536 here), s the
  length of the token's own conversation (attention never crosses conversations in either variant,
  and padding is no model work). Recomputation by activation checkpointing is not counted; sftlab's
  assistant-only loss lets TRL's fused LM head skip the prompt positions, which the formula still
  counts in both. The rate of an 8192^3 bf16 matrix product measured on the same GPU is shown beside
  the datasheet peak.

Run it (from the repository root):

    python bench/gpu.py               # on the GPU machine: ~6 minutes on an H200, writes
                                      # bench/results/gpu_<device>.txt and .json
    python bench/gpu.py --dry-run     # the same code path on a CPU, tiny Qwen2, a few steps (~40 s on 2 cores)
    python bench/gpu.py --sftlab-set model.attn_implementation=sdpa --sftlab-set training.packing=true

On this project's GPU machines (nvidia-h200: Python 3.12, torch and transformers 5.17 installed,
no network), trl, datasets and pydantic are missing: carry them as wheels. Here, once:

    bash bench/gpu_wheels.sh          # downloads ~18 MB of wheels into .whl/ (ignored by git)

then run on the GPU machine with `.whl` carried (device tool: carry [".whl"]):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit; \
    SFTLAB_MEASURED_COMMIT=<commit> PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT/gpu.txt

(the copy of the working tree there has no .git: SFTLAB_MEASURED_COMMIT names the commit in the
report). The script first checks that every package it needs imports, and names what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (  # noqa: E402  (the CPU benchmark's data helpers and workers)
    DEEPSEEK_R1_DISTILL_QWEN_1_5B,
    LEARNING_RATE,
    RESULTS,
    WORDS,
    length_stats,
    machine_info,
    package_version,
    rendered_ids,
    run_worker,
    sentence_text,
    text_of_tokens,
    use_sftlab_source,
    write_jsonl,
)

# --dry-run: the same architecture at a size a CPU trains in seconds.
TINY_QWEN2 = dict(
    DEEPSEEK_R1_DISTILL_QWEN_1_5B,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=4096,
)


class Shape:
    """The run's sizes: the real one on a GPU, a tiny one for --dry-run."""

    def __init__(self, dry_run: bool):
        self.model = TINY_QWEN2 if dry_run else DEEPSEEK_R1_DISTILL_QWEN_1_5B
        self.max_length = 256 if dry_run else 2048
        self.median, self.p95 = (64, 192) if dry_run else (512, 1536)
        self.min_tokens = 24 if dry_run else 48
        self.train_examples = 12 if dry_run else 1200
        self.eval_examples = 2 if dry_run else 16


MAX_TURNS = 6
TURN_DECAY = 0.5  # P(turns = k) ~ TURN_DECAY^(k-1)
USER_SHARE = 0.3
BPE_VOCAB = 4000

SPEEDUP_TARGET = 1.5
MEMORY_TARGET = 1.0
MFU_TARGET = 0.40
TOKEN_AGREEMENT = 0.03

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets; the first name the device's contains.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
)
# What the workers import; the first ones are imported here too, as a version mismatch among them
# (trl against datasets, pyarrow or transformers) shows only when they import.
IMPORTED_MODULES = ("torch", "transformers", "trl", "datasets", "pydantic")
NEEDED_MODULES = (
    "accelerate",
    "peft",
    "yaml",
    "tokenizers",
    "safetensors",
    "jinja2",
    "markdown_it",
    "matplotlib",
    "rich",
    "psutil",
    "tensorboard",
)


# =========================================================================== set-up


def missing_modules(import_them: bool = True) -> list[str]:
    """What this benchmark needs and cannot import here, each with the reason (a dry run only looks)."""
    import importlib
    import importlib.util

    missing = []
    for name in IMPORTED_MODULES if import_them else ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # an installed package can fail to import (a too-old dependency): name it
            missing.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    looked_up = NEEDED_MODULES if import_them else IMPORTED_MODULES + NEEDED_MODULES
    return missing + [name for name in looked_up if importlib.util.find_spec(name) is None]


def peak_tflops_for(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in device_name.lower()), None)


def device_slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def build_tokenizer(directory: Path):
    """A byte-level BPE (ChatML special tokens) trained on the benchmark's own words: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sftlab.templates import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE

    rng = random.Random(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<|endoftext|>", *CHATML_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([sentence_text(rng, 40) for _ in range(3000)] + [" ".join(WORDS)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=CHATML_SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_model(directory: Path, shape: Shape, tokenizer) -> Path:
    """Random weights in the model's shape, saved in bf16 (float32 on a CPU) with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape.model,
    )
    torch.manual_seed(0)
    on_gpu = torch.cuda.is_available()
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.save_pretrained(directory)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    return directory


def smoltalk_shaped_conversations(tokenizer, count: int, seed: int, shape: Shape) -> list[dict]:
    """Seeded multi-turn conversations whose rendered length ~ log-normal(median, p95), clipped."""
    rng = random.Random(seed)
    sigma = math.log(shape.p95 / shape.median) / 1.6448536
    pair = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]
    overhead = len(rendered_ids(tokenizer, pair)) - 2  # template tokens per user/assistant pair
    rows = []
    for _ in range(count):
        target = min(max(round(rng.lognormvariate(math.log(shape.median), sigma)), shape.min_tokens), shape.max_length)
        turns = next(k for k in range(1, MAX_TURNS + 1) if k == MAX_TURNS or rng.random() > TURN_DECAY)
        turns = max(1, min(turns, (target - 8) // (overhead + 8)))  # every message keeps a few tokens
        content = target - turns * overhead
        weights = [rng.uniform(0.5, 1.5) for _ in range(turns)]
        messages = []
        for weight in weights:
            tokens = max(6, round(content * weight / sum(weights)))
            user = max(3, round(tokens * USER_SHARE))
            messages += [
                {"role": "user", "content": text_of_tokens(tokenizer, rng, user)},
                {"role": "assistant", "content": text_of_tokens(tokenizer, rng, max(3, tokens - user))},
            ]
        fit_last_answer(tokenizer, rng, messages, target, shape.max_length)
        rows.append({"messages": messages})
    return rows


def fit_last_answer(tokenizer, rng: random.Random, messages: list[dict], target: int, limit: int) -> None:
    """Resize the last answer until the conversation is within 2 tokens of its target, never over the limit."""
    empty = len(rendered_ids(tokenizer, [{"role": "assistant", "content": ""}]))
    last = len(rendered_ids(tokenizer, [messages[-1]])) - empty
    for _ in range(4):
        gap = target - len(rendered_ids(tokenizer, messages))
        if 0 <= gap <= 2:
            break
        last = max(3, last + gap - (1 if gap < 0 else 0))
        messages[-1]["content"] = text_of_tokens(tokenizer, rng, last)
    while len(rendered_ids(tokenizer, messages)) > limit and last > 3:
        last = max(3, last - 8)
        messages[-1]["content"] = text_of_tokens(tokenizer, rng, last)


def matmul_tflops() -> float | None:
    """This GPU's bf16 rate on an 8192^3 matrix product (mean of 10 after 3 warm-ups): the practical ceiling."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


# =========================================================================== numbers


def model_flops_per_token(result: dict) -> float:
    """6 N + 12 L d s, averaged over the tokens: s is each token's own conversation length."""
    data = result["dataset"]
    attention = 12 * result["layers"] * result["attention_width"] * data["sum_sq_lengths"]
    return 6 * result["linear_weights"] + attention / data["tokens"]


def add_rates(result: dict, peak: float | None) -> None:
    result["tokens"] = result["dataset"]["tokens"]
    result["tokens_per_s_whole_run"] = result["tokens"] / result["train_runtime"]
    steady = result.get("steady")
    result["tokens_per_s"] = steady["tokens_per_s"] if steady else result["tokens_per_s_whole_run"]
    result["model_flops_per_token"] = model_flops_per_token(result)
    result["peak_memory_mb"] = result.get("gpu_peak_allocated_mb", result["peak_rss_mb"])
    if peak:
        result["mfu"] = result["model_flops_per_token"] * result["tokens_per_s"] / (peak * 1e12)
        result["mfu_whole_run"] = result["model_flops_per_token"] * result["tokens_per_s_whole_run"] / (peak * 1e12)


def summarize(args, info: dict, data: dict, trl_r: dict, sft_r: dict, seconds: float) -> tuple[str, dict]:
    gpu = "gpu" in info
    peak = args.peak_tflops or (peak_tflops_for(info["gpu"]) if gpu else None)
    for result in (trl_r, sft_r):
        add_rates(result, peak)
    speedup = sft_r["tokens_per_s"] / trl_r["tokens_per_s"]
    memory_ratio = sft_r["peak_memory_mb"] / trl_r["peak_memory_mb"]
    token_gap = abs(sft_r["tokens"] - trl_r["tokens"]) / trl_r["tokens"]
    checks = {
        "throughput": speedup >= SPEEDUP_TARGET,
        "memory": memory_ratio <= MEMORY_TARGET,
        "mfu": bool(peak) and sft_r["mfu"] >= MFU_TARGET,
        "tokens_agree": token_gap <= TOKEN_AGREEMENT,
        "every_token_fed": all(r["fed"]["tokens"] == r["dataset"]["tokens"] for r in (trl_r, sft_r)),
    }
    verdict = all(checks[k] for k in ("throughput", "memory", "mfu", "tokens_agree"))
    kind = "dry run on a CPU (a tiny Qwen2; not a measurement)" if args.dry_run else "measurement"
    memory_kind = "GPU allocator peak (torch.cuda.max_memory_allocated)" if gpu else "peak RSS of the worker process"
    summary = {
        "benchmark": "bench/gpu.py",
        "kind": kind,
        "dry_run": args.dry_run,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "data": data,
        "peak_bf16_tflops": peak,
        "measured_matmul_tflops": info.get("matmul_tflops"),
        "settings": {
            "learning_rate": LEARNING_RATE,
            "per_device_train_batch_size": 4,
            "max_length": data["max_length"],
            "epochs": 1,
            "memory": memory_kind,
            "sftlab_set": args.sftlab_set,
            "seed": args.seed,
        },
        "trl": trl_r,
        "sftlab": sft_r,
        "ratios": {"tokens_per_s": speedup, "peak_memory": memory_ratio, "token_count_gap": token_gap},
        "targets": {
            "tokens_per_s_at_least": SPEEDUP_TARGET,
            "peak_memory_at_most": MEMORY_TARGET,
            "mfu_at_least": MFU_TARGET,
        },
        "checks": checks,
        "pass": verdict,
        "wall_seconds": seconds,
    }
    return report_text(args, summary, trl_r, sft_r), summary


def report_text(args, summary: dict, trl_r: dict, sft_r: dict) -> str:
    info, data, checks = summary["machine"], summary["data"], summary["checks"]
    peak, matmul = summary["peak_bf16_tflops"], summary["measured_matmul_tflops"]

    def row(label, fn):
        return f"  {label:<36}{fn(trl_r):>24}{fn(sft_r):>24}"

    def onoff(flag):
        return "on" if flag else "off"

    def mfu(key):
        return lambda r: f"{r[key]:.1%}" if key in r else "n/a"

    def verdict(flag):
        return "PASS" if flag else "FAIL"

    v = info["versions"]
    device = (
        f"GPU {info['gpu']} ({info['gpu_memory_gb']} GiB), CUDA {info.get('cuda')}"
        if "gpu" in info
        else f"no GPU; {info['cpus']} CPUs, {info['cpu_model']}"
    )
    stats = {split: data[split] for split in ("train", "eval")}
    lines = [
        f"sftlab on a GPU: the chapter's setup, sftlab's defaults against plain TRL (bench/gpu.py) - {summary['kind']}",
        f"date:       {summary['date']}",
        f"machine:    {device}; {info['platform']}",
        f"versions:   python {info['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"accelerate {v['accelerate']}, datasets {v['datasets']}; flash-attn {info['flash_attn']}, "
        f"liger-kernel {info['liger_kernel']}",
        f"sftlab:     {info['sftlab_source']}",
        f"model:      {data['model']} with random weights ({trl_r['linear_weights'] / 1e6:,.1f}M weights in linear "
        "layers, "
        f"{trl_r['layers']} layers, attention width {trl_r['attention_width']}); tokenizer: byte-level BPE, "
        f"{data['tokenizer_size']:,} tokens",
        f"data:       seed {args.seed}; 1-{MAX_TURNS} turns, log-normal total length (median {data['median']}, p95 "
        f"{data['p95']}), clipped to [{data['min_tokens']}, {data['max_length']}]",
        *(
            f"  {name:<6}{s['examples']:>6,} conversations, {s['tokens']:>10,} tokens rendered; length min {s['min']}, "
            f"median {s['median']:.0f}, p95 {s['p95']:.0f}, max {s['max']}; {s['turns_mean']:.2f} turns on average"
            for name, s in stats.items()
        ),
        f"settings:   one epoch, learning rate {LEARNING_RATE:g}, per_device_train_batch_size 4, max_length "
        f"{data['max_length']}; memory = {summary['settings']['memory']}",
        *([f"sftlab --set: {', '.join(args.sftlab_set)} (not sftlab's defaults)"] if args.sftlab_set else []),
        "",
        f"  {'':<36}{'TRL (chapter)':>24}{'sftlab default' if not args.sftlab_set else 'sftlab --set':>24}",
        row(
            "packing / padding-free",
            lambda r: f"{onoff(r['settings']['packing'])} / {onoff(r['settings']['padding_free'])}",
        ),
        row("attention", lambda r: r["settings"]["attn_implementation"]),
        row(
            "precision / param dtype",
            lambda r: (
                f"{'bf16' if r['settings']['bf16'] else 'fp32'} / {r['settings']['param_dtype'].replace('torch.', '')}"
            ),
        ),
        row("activation checkpointing", lambda r: onoff(r["settings"]["activation_checkpointing"])),
        row(
            "micro-batch x accumulation",
            lambda r: (
                f"{r['settings']['per_device_train_batch_size']} x {r['settings']['gradient_accumulation_steps']}"
            ),
        ),
        row("loss on", lambda r: "assistant" if r["settings"]["assistant_only_loss"] else "all tokens"),
        row("rows (conversations)", lambda r: f"{r['dataset']['rows']:,} ({r['dataset']['conversations']:,})"),
        row("optimizer steps", lambda r: f"{r['steps']:,}"),
        row("tokens (non-padding)", lambda r: f"{r['tokens']:,}"),
        row("token slots fed (incl. padding)", lambda r: f"{r['fed']['slots']:,}"),
        row("train_runtime", lambda r: f"{r['train_runtime']:,.1f} s"),
        row("tokens/s, whole run", lambda r: f"{r['tokens_per_s_whole_run']:,.0f}"),
        row(
            "steady window",
            lambda r: (
                (f"steps {r['steady']['from_step'] + 1}-{r['steps']}, {r['steady']['seconds']:.1f} s")
                if r.get("steady")
                else "run too short"
            ),
        ),
        row("tokens/s, steady", lambda r: f"{r['tokens_per_s']:,.0f}"),
        row("model GFLOPs per token", lambda r: f"{r['model_flops_per_token'] / 1e9:.2f}"),
        row(f"MFU, steady (peak {peak:g} TFLOP/s)" if peak else "MFU, steady", mfu("mfu")),
        row("MFU, whole run", mfu("mfu_whole_run")),
    ]
    if "gpu" in info:
        lines += [
            row("GPU allocated at train start", lambda r: f"{r['gpu_allocated_at_train_start_mb']:,.0f} MB"),
            row("GPU peak allocated", lambda r: f"{r['gpu_peak_allocated_mb']:,.0f} MB"),
            row("GPU peak reserved", lambda r: f"{r['gpu_peak_reserved_mb']:,.0f} MB"),
        ]
    else:
        lines.append(row("peak RSS (end of training)", lambda r: f"{r['peak_rss_mb']:,.0f} MB"))
    lines += [
        row("train loss (own objective)", lambda r: f"{r['train_loss']:.4f}"),
        row("eval loss (assistant tokens)", lambda r: f"{r['eval_loss']:.4f}"),
        "",
        f"MFU = (6 N + 12 L d s) x tokens/s / peak: N linear weights incl. the LM head, L layers, d attention width, "
        f"s the token's conversation length; peak = {peak or 'unknown'} TFLOP/s dense bf16 (datasheet)"
        + (
            f"; this GPU's 8192^3 bf16 matrix product ran at {matmul:.0f} TFLOP/s here (sftlab's steady MFU "
            f"against it: {sft_r['model_flops_per_token'] * sft_r['tokens_per_s'] / (matmul * 1e12):.1%})"
            if matmul
            else ""
        ),
        f"ratios (sftlab / TRL): tokens/s (steady) x{summary['ratios']['tokens_per_s']:.2f}; peak memory "
        f"x{summary['ratios']['peak_memory']:.2f}; token counts differ by {summary['ratios']['token_count_gap']:.2%}",
        f"targets:    tokens/s >= x{SPEEDUP_TARGET:g}: {verdict(checks['throughput'])}; peak memory <= "
        f"x{MEMORY_TARGET:g}: {verdict(checks['memory'])}; MFU >= {MFU_TARGET:.0%}: "
        f"{verdict(checks['mfu']) if peak else 'FAIL (no peak known for this device)'}",
        f"sanity:     token counts agree within {TOKEN_AGREEMENT:.0%}: {'yes' if checks['tokens_agree'] else 'NO'}; "
        f"one epoch fed every dataset token: {'yes' if checks['every_token_fed'] else 'NO'}",
        f"overall:    {verdict(summary['pass'])}{' (dry run)' if args.dry_run else ''}  "
        f"(wall time {summary['wall_seconds'] / 60:.1f} min)",
    ]
    return "\n".join(lines) + "\n"


# =========================================================================== main


def gpu_info(info: dict) -> dict:
    import torch

    info["flash_attn"] = package_version("flash-attn")
    info["liger_kernel"] = package_version("liger-kernel")
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda or torch.version.hip
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    commit = os.environ.get("SFTLAB_MEASURED_COMMIT")
    if commit:
        info["sftlab_source"] += f"; measured commit {commit}"
    return info


def conversation_stats(tokenizer, rows: list[dict]) -> dict:
    stats = length_stats([len(rendered_ids(tokenizer, row["messages"])) for row in rows])
    stats["turns_mean"] = sum(len(row["messages"]) for row in rows) / 2 / len(rows)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="the same code path on a CPU: tiny Qwen2, a few steps")
    parser.add_argument("--train-examples", type=int, default=None, help="default 1200 (dry run 12)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak (default: from the table by device name)",
    )
    parser.add_argument(
        "--sftlab-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of sftlab's config (repeatable), to measure another choice",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default bench/results/gpu_<device>.txt; "
        "a dry run writes to a temporary folder); the JSON goes next to it",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated model, data and runs here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    missing = missing_modules(import_them=not args.dry_run)
    if missing:
        print(
            "bench/gpu.py cannot run here; missing: " + "; ".join(missing) + ".\nCarry them as wheels: run "
            "`bash bench/gpu_wheels.sh` on a machine with pip, then install them as this script's docstring says.",
            file=sys.stderr,
        )
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU here: run with --dry-run, or on a GPU machine")
    shape = Shape(args.dry_run)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        provenance = use_sftlab_source(None, workdir)
        model_dir = workdir / "model"
        tokenizer = build_tokenizer(model_dir)
        build_model(model_dir, shape, tokenizer)
        train_count = args.train_examples or shape.train_examples
        train_rows = smoltalk_shaped_conversations(tokenizer, train_count, args.seed, shape)
        eval_rows = smoltalk_shaped_conversations(tokenizer, shape.eval_examples, args.seed + 1_000_003, shape)
        write_jsonl(workdir / "train.jsonl", train_rows)
        write_jsonl(workdir / "eval.jsonl", eval_rows)
        data = {
            "model": "DeepSeek-R1-Distill-Qwen-1.5B's shape" if not args.dry_run else "a tiny Qwen2 (dry run)",
            "tokenizer_size": len(tokenizer),
            "max_length": shape.max_length,
            "median": shape.median,
            "p95": shape.p95,
            "min_tokens": shape.min_tokens,
            "train": conversation_stats(tokenizer, train_rows),
            "eval": conversation_stats(tokenizer, eval_rows),
        }
        print(f"model and data ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        spec = {
            "model": str(model_dir),
            "train": str(workdir / "train.jsonl"),
            "eval": str(workdir / "eval.jsonl"),
            "max_length": shape.max_length,
            "learning_rate": LEARNING_RATE,
            "seed": args.seed,
        }
        trl_r = run_worker("trl", {**spec, "output_dir": str(workdir / "run-trl")}, workdir)
        sft_r = run_worker(
            "sftlab", {**spec, "output_dir": str(workdir / "run-sftlab"), "sftlab_set": args.sftlab_set}, workdir
        )
        info = gpu_info({**machine_info(), "sftlab_source": provenance["description"]})
        info["matmul_tflops"] = matmul_tflops()
        report, summary = summarize(args, info, data, trl_r, sft_r, time.perf_counter() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + report)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "gpu_dry-run.txt"
        if args.dry_run
        else RESULTS / f"gpu_{device_slug(info['gpu'])}.txt"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
