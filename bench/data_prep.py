"""Benchmark: sftlab's data preparation against TRL's, on smoltalk-shaped conversations, back to back.

What it measures (issue 14): preparing N conversations for training, in time and in peak
memory of the whole process tree (the preparing process and its worker processes),
sftlab's `prepare_data` (what `sftlab check` and `sftlab train` run) against TRL 1.16's
own preparation in `SFTTrainer` (`load_dataset("json")`, `dataset_num_proc` = the cores),
on the same JSONL file, with the same tokenizer and `max_length`.

The data: N distinct seeded conversations shaped like HuggingFaceTB/smoltalk: mostly one
exchange, some up to eight, a system prompt in a fifth of them; message lengths drawn from
log-normal distributions (users median 40 words, assistants median 180), so a long tail
of conversations passes `max_length` (2048 tokens). Words come from a list of common
English words, about one token each for SmolLM2's tokenizer.

Each preparation runs in a fresh subprocess (`python bench/data_prep.py --child ...`):

- sftlab: `prepare_data(DataConfig(train=FILE), tokenizer, max_length=2048)` with an empty
  cache directory: reading, normalizing, de-duplication and leakage, the 5% eval split,
  rendering with the chat template and masks, tokenizing, the audit, the cache entry.
  Then a second subprocess runs it again on the same cache: the cached run.
- TRL: `load_dataset("json", data_files=FILE)` (into an empty datasets cache) and
  `SFTTrainer(model, args=SFTConfig(max_length=2048, dataset_num_proc=CORES), train_dataset=...)`,
  whose `__init__` prepares the dataset (chat template, tokenize, labels, truncate,
  drop empty rows). The model is a 1-layer Llama of hidden size 16 with SmolLM2's
  vocabulary, built before the clock starts: only data preparation is measured.

Time: `time.perf_counter` around exactly those calls, in the child (imports and loading
the tokenizer, the same for both, are not counted). Memory: the parent samples the child
and all its descendants every 0.1 s from /proc/PID/smaps_rollup and keeps the peak of the
sum; PSS (proportional set size: a page shared by k processes counts 1/k in each, so
forked workers sharing their parent's pages are not counted twice) is the headline, RSS
summed over the tree (shared pages counted in every process that maps them) is shown too.
Both include the Python interpreter, torch/transformers/datasets and the tokenizer, as a
user's `sftlab check` or training script would. Peak memory is the whole child's life.

tokens/s: the tokens of the rendered conversations before truncation (sftlab's audit
count, the same text for both), over the preparation time.

The load of the machine (os.getloadavg) is recorded before and after each run: other
processes on the machine slow both sides. Results go to bench/results/data_prep.txt and
.json.

    python bench/data_prep.py                          # 100,000 and 400,000 conversations (~40 min on 2 cores)
    python bench/data_prep.py --rows 20000 --out /tmp/data_prep.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SEED = 1234
MAX_LENGTH = 2048
WORDS = Path(__file__).resolve().parent / "words.txt"
RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_SECONDS = 0.1


# =========================================================================== data


def smoltalk_like(count: int, seed: int = SEED):
    """`count` conversations, the same for the same seed (see the module docstring)."""
    import numpy as np

    words = np.array(WORDS.read_text(encoding="utf-8").split())
    rng = np.random.default_rng(seed)

    def text(median: float, sigma: float, cap: int) -> str:
        size = int(min(cap, max(1, rng.lognormal(math.log(median), sigma))))
        chosen = words[rng.integers(0, len(words), size)]
        return " ".join(chosen.tolist()).capitalize() + "."

    systems = [
        "You are a helpful assistant.",
        "You are a concise tutor.",
        "Answer briefly and kindly.",
        "You are an expert editor: improve the user's text.",
    ]
    for _ in range(count):
        turns = int(rng.choice([1, 2, 3, 4, 5, 6, 8], p=[0.55, 0.15, 0.13, 0.09, 0.04, 0.02, 0.02]))
        messages = [{"role": "system", "content": str(rng.choice(systems))}] if rng.random() < 0.2 else []
        for _ in range(turns):
            messages.append({"role": "user", "content": text(40, 1.0, 2000)})
            messages.append({"role": "assistant", "content": text(180, 0.8, 3000)})
        yield {"messages": messages}


def write_jsonl(path: Path, count: int) -> dict:
    conversations = turns = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in smoltalk_like(count):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            conversations += 1
            turns += sum(1 for message in row["messages"] if message["role"] == "assistant")
    return {"conversations": conversations, "assistant_turns": turns, "megabytes": path.stat().st_size / 1e6}


# =========================================================================== children (the measured processes)


def child_sftlab(data: Path, tokenizer_dir: Path, cache: Path) -> dict:
    from transformers import AutoTokenizer

    from sftlab.config import DataConfig
    from sftlab.data import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    prepared = prepare_data(DataConfig(train=str(data)), tokenizer, max_length=MAX_LENGTH, cache_dir=cache)
    seconds = time.perf_counter() - start
    audit = prepared.audit
    return {
        "seconds": seconds,
        "cached": bool(audit.get("cached")),
        "train_rows": len(prepared.train),
        "eval_rows": len(prepared.eval) if prepared.eval is not None else 0,
        "tokens": audit["splits"]["train"]["tokens"] + audit["splits"]["eval"]["tokens"],
        "examples_over_max_length": audit["truncation"]["examples_over"],
    }


def child_trl(data: Path, tokenizer_dir: Path, cache: Path, processes: int) -> dict:
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_LENGTH,
    )
    model = LlamaForCausalLM(config)  # data preparation only: the smallest model that takes the vocabulary
    args = SFTConfig(
        output_dir=str(cache / "out"), max_length=MAX_LENGTH, dataset_num_proc=processes, report_to=[], use_cpu=True
    )
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache / "hf"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "train_rows": len(trainer.train_dataset), "eval_rows": 0}


def run_child() -> None:
    kind, data, tokenizer_dir, cache, processes = sys.argv[2:7]
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if kind.startswith("sftlab"):
        result = child_sftlab(Path(data), Path(tokenizer_dir), Path(cache))
    else:
        result = child_trl(Path(data), Path(tokenizer_dir), Path(cache), int(processes))
    print("RESULT " + json.dumps(result), flush=True)


# =========================================================================== the parent: run, sample memory


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of a process and all its descendants, from /proc/PID/smaps_rollup."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    pss = rss = 0
    for process in processes:
        try:
            for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines():
                field, _, value = line.partition(":")
                if field in ("Pss", "Rss"):
                    amount = int(value.split()[0]) * 1024
                    pss, rss = (pss + amount, rss) if field == "Pss" else (pss, rss + amount)
        except (OSError, ValueError):
            continue  # the process ended between listing and reading
    return pss, rss


def measured(kind: str, data: Path, tokenizer_dir: Path, cache: Path, processes: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(data), str(tokenizer_dir), str(cache), str(processes)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"pss": 0, "rss": 0}

    def sample() -> None:
        while child.poll() is None:
            pss, rss = tree_memory(child.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{kind} child failed ({child.returncode}):\n{stderr[-4000:]}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    result.update(
        kind=kind,
        process_seconds=time.perf_counter() - started,
        peak_pss=peak["pss"],
        peak_rss=peak["rss"],
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    print(
        f"  {kind:<14} {result['seconds']:8.1f} s   peak PSS {peak['pss'] / 2**30:5.2f} GiB   "
        f"RSS {peak['rss'] / 2**30:5.2f} GiB   load {load_before[0]:.1f} -> {result['load_after'][0]:.1f}",
        flush=True,
    )
    return result


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def compare(rows: int, work: Path, tokenizer_dir: Path, processes: int) -> dict:
    data = work / f"smoltalk-like-{rows}.jsonl"
    start = time.perf_counter()
    shape = write_jsonl(data, rows)
    print(
        f"{rows:,} conversations: {shape['megabytes']:.0f} MB, {shape['assistant_turns'] / rows:.2f} assistant turns "
        f"each (generated in {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    sftlab_cache = work / f"sftlab-cache-{rows}"
    sftlab = measured("sftlab", data, tokenizer_dir, sftlab_cache, processes)
    cached = measured("sftlab cached", data, tokenizer_dir, sftlab_cache, processes)
    trl = measured("trl", data, tokenizer_dir, work / f"trl-cache-{rows}", processes)
    for result in (sftlab, cached, trl):
        result["tokens_per_s"] = sftlab["tokens"] / result["seconds"]
    data.unlink()
    return {
        "rows": rows,
        "data": shape,
        "sftlab": sftlab,
        "sftlab_cached": cached,
        "trl": trl,
        "time_ratio": sftlab["seconds"] / trl["seconds"],
        "pss_ratio": sftlab["peak_pss"] / trl["peak_pss"],
        "rss_ratio": sftlab["peak_rss"] / trl["peak_rss"],
    }


def report(results: list[dict], processes: int, uptime_before: str, uptime_after: str) -> str:
    gib = 2**30
    lines = [
        "sftlab data preparation against TRL's (bench/data_prep.py)",
        f"date:        {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine:     {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; {platform.platform()}",
        f"versions:    python {platform.python_version()}, trl {package_version('trl')}, transformers "
        f"{package_version('transformers')}, datasets {package_version('datasets')}, tokenizers "
        f"{package_version('tokenizers')}, pyarrow {package_version('pyarrow')}",
        "tokenizer:   SmolLM2-135M-Instruct (the embedded GGUF's), max_length 2048",
        f"processes:   sftlab: up to one per core ({processes}); TRL: dataset_num_proc={processes}",
        f"load before: {uptime_before}",
        f"load after:  {uptime_after}",
        "memory:      peak over the run of the summed PSS (RSS) of the preparing process and its workers",
        "",
        f"{'rows':>8} {'run':<14}{'seconds':>9}{'tokens/s':>11}{'peak PSS GiB':>14}{'peak RSS GiB':>14}  load 1-min before/after",
    ]
    for result in results:
        for key in ("sftlab", "sftlab_cached", "trl"):
            run = result[key]
            lines.append(
                f"{result['rows']:>8,} {run['kind']:<14}{run['seconds']:>9.1f}{run['tokens_per_s']:>11,.0f}"
                f"{run['peak_pss'] / gib:>14.2f}{run['peak_rss'] / gib:>14.2f}  "
                f"{run['load_before'][0]:.1f} / {run['load_after'][0]:.1f}"
            )
    lines.append("")
    for result in results:
        shape, sftlab = result["data"], result["sftlab"]
        lines.append(
            f"{result['rows']:,} conversations ({shape['megabytes']:.0f} MB JSONL, {sftlab['tokens']:,} tokens, "
            f"{sftlab['examples_over_max_length']:,} train rows over max_length): sftlab / TRL time "
            f"x{result['time_ratio']:.2f} (target <= 1.2), peak PSS x{result['pss_ratio']:.2f} "
            f"(target <= 1.5), peak RSS x{result['rss_ratio']:.2f}; cached sftlab "
            f"{result['sftlab_cached']['seconds']:.1f} s"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[100_000, 400_000], help="conversations (default 100000 400000)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "data_prep.txt", help="result file (a .json is written beside it)"
    )
    args = parser.parse_args(argv)
    processes = len(os.sched_getaffinity(0))

    from sftlab.config import ModelConfig
    from sftlab.model import load_tokenizer

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="sftlab-data-bench-") as tmp:
        work = Path(tmp)
        load_tokenizer(ModelConfig()).save_pretrained(work / "tokenizer")  # both sides load this copy, untimed
        for rows in args.rows:
            results.append(compare(rows, work, work / "tokenizer", processes))
            # Written after each size, so a long run's first results are kept even if it is stopped.
            uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            text = report(results, processes, uptime_before, uptime_after)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print(text, end="")
    print(f"written to {args.out} and {args.out.with_suffix('.json')}")
    passed = all(r["time_ratio"] <= 1.2 and r["pss_ratio"] <= 1.5 for r in results)
    return 0 if passed else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child()
    else:
        sys.exit(main())
