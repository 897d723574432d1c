"""Benchmark: does llama.cpp run sftlab's GGUF export of the tuned demo model as transformers runs final/?

Not part of the test suite (it compiles llama.cpp). Protocol:

1. llama.cpp, through llama-cpp-python built from PyPI's source distribution for this CPU (the
   script runs this pip command into the running interpreter when `llama_cpp` is not importable;
   use a virtual environment made with --system-site-packages to keep it out of the project's):
       CMAKE_ARGS="-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAVA_BUILD=OFF ..." \
       pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
2. A tuned SmolLM2-135M run, the demo's (`sftlab demo --output DIR`), exported with
   `sftlab export RUN --format gguf --quant f16` and `--quant q8_0` (into a temporary directory).
3. For each held-out prompt of the run's eval data (rendered with the run's chat template, as the
   evaluation does): the greedy answer of final/ in transformers (fp32, stopping at the run's stop
   tokens) and the greedy answer of llama.cpp on the GGUF (top_k 1, no repeat penalty, the same
   prompt tokens, stopping at llama.cpp's end-of-generation tokens, which the GGUF declares), both at
   most eval.max_new_tokens tokens. Compared: identical answers (token for token), and llama.cpp's
   own tokenization of each prompt against transformers'.
4. When `go` is on PATH (apt-get install golang-go), the Modelfile's TEMPLATE is executed with Go's
   text/template (the engine Ollama runs templates with) on each held-out conversation, as Ollama
   passes it (.Messages with .Role and .Content), and compared with the chat template's rendering.

    python bench/export_llamacpp.py RUN_DIR     # writes bench/results/export_llamacpp.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "export_llamacpp.txt"
LLAMA_CPP_PYTHON = "0.3.36"
CPU_CMAKE_ARGS = (
    "-DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
)
MOST = 0.9  # "llama.cpp's greedy output matches transformers' on most prompts"


def ensure_llama_cpp() -> str:
    try:
        import llama_cpp
    except ImportError:
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} from source (compiles llama.cpp: ~25 min on 2 cores)")
        env = {**os.environ, "CMAKE_ARGS": CPU_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-binary",
            "llama-cpp-python",
            "-c",
            str(REPO / "constraints.txt"),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        ]
        subprocess.run(command, check=True, env=env)
        import llama_cpp
    return llama_cpp.__version__


def trained_steps(run: Path) -> str:
    """The steps the run trained (its last checkpoint's trainer_state.json), to say which demo run this is."""
    states = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda path: int(path.parent.name.split("-")[1]))
    return str(json.loads(states[-1].read_text(encoding="utf-8"))["global_step"]) if states else "?"


def held_out_conversations(cfg) -> list[list[dict]]:
    """The run's eval data, first eval.num_prompts rows, without their reference answers."""
    rows = [json.loads(line) for line in Path(cfg.data.eval).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["messages"][:-1] for row in rows[: cfg.eval.num_prompts]]


def transformers_answers(run: Path, prompts: list[list[int]], max_new_tokens: int):
    import torch

    from sftlab.chat import load_tuned
    from sftlab.generation import stop_token_ids

    model, tokenizer = load_tuned(run)
    stops = stop_token_ids(tokenizer)
    answers, started = [], time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            answer = output[0, len(ids) :].tolist()
            answers.append(answer[:-1] if answer and answer[-1] in stops else answer)
    return answers, time.perf_counter() - started


def llama_cpp_answers(gguf: Path, texts: list[str], prompts: list[list[int]], max_new_tokens: int):
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count() or 2, verbose=False, seed=0)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def is_end_of_generation(token: int) -> bool:  # llama.cpp's own test: EOS, EOT and the like, from the GGUF
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    same_tokens = sum(
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids for text, ids in zip(texts, prompts)
    )
    answers, started = [], time.perf_counter()
    for ids in prompts:
        answer = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if is_end_of_generation(token):
                break
            answer.append(token)
            if len(answer) >= max_new_tokens:
                break
        answers.append(answer)
    return answers, same_tokens, time.perf_counter() - started


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var input struct {
		Template      string
		Conversations [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(input.Template))
	out := []string{}
	for _, messages := range input.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_renders(template: str, conversations: list[list[dict]]) -> list[str] | None:
    """The Modelfile TEMPLATE executed by Go's text/template, as Ollama executes it; None without Go."""
    import shutil

    if shutil.which("go") is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "render.go"
        source.write_text(GO_RENDER, encoding="utf-8")
        payload = json.dumps(
            {
                "Template": template,
                "Conversations": [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in conversations],
            }
        )
        done = subprocess.run(
            ["go", "run", str(source)],
            input=payload,
            capture_output=True,
            text=True,
            env={**os.environ, "GOCACHE": str(Path(directory) / "cache"), "GOFLAGS": "-mod=mod"},
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        return json.loads(done.stdout)


def tiny_logits_in_llama_cpp(directory: Path) -> list[str]:
    """The tests' tiny Llama (tied) and tiny Qwen2 (biases, untied), weights scaled up so that attention
    matters, written by sftlab and run by llama.cpp: logits against transformers' on one prompt, and
    the same Llama written without llama.cpp's q/k permutation as a control (the check can fail)."""
    import dataclasses

    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model
    from sftlab import export_gguf

    text = "<|im_start|>user\nWhat is 12 plus 3? The quick brown fox.<|im_end|>\n<|im_start|>assistant\n"
    lines = []
    for model_type, permute in (("llama", True), ("qwen2", False), ("llama", False)):
        folder = build_tiny_model(directory / f"{model_type}-{permute}", model_type=model_type)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias") or name == "lm_head.weight":
                    parameter.normal_(0, 0.5)
                elif parameter.ndim == 2:
                    parameter.mul_(20)
        saved = export_gguf.ARCHITECTURES["llama"]
        if model_type == "llama" and not permute:  # the control: q/k left in transformers' layout
            export_gguf.ARCHITECTURES["llama"] = dataclasses.replace(saved, permute_qk=False)
        try:
            path = export_gguf.write_gguf(model, tokenizer, folder, folder / "model.gguf")
        finally:
            export_gguf.ARCHITECTURES["llama"] = saved
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        label = f"tiny {model_type}" + ("" if permute or model_type == "qwen2" else " WITHOUT the q/k permutation")
        lines.append(
            f"  {label:<42} max |logit diff| {np.abs(theirs - ours).max():7.3f} (logits up to "
            f"{np.abs(ours).max():.1f}); same argmax at {(theirs.argmax(-1) == ours.argmax(-1)).mean():.0%} "
            f"of {len(ids)} positions"
        )
    return lines


def modelfile_template(modelfile: Path) -> str | None:
    text = modelfile.read_text(encoding="utf-8")
    start = text.find('TEMPLATE """')
    return text[start + len('TEMPLATE """') : text.index('"""', start + len('TEMPLATE """'))] if start >= 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished SmolLM2 run, e.g. the demo's (sftlab demo --output DIR)")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument(
        "--prompts", type=int, default=None, help="the first N held-out prompts (default: eval.num_prompts)"
    )
    args = parser.parse_args()
    version = ensure_llama_cpp()

    from sftlab.chat import load_tuned
    from sftlab.config import load_config
    from sftlab.data import render
    from sftlab.export import export_run

    cfg = load_config(args.run / "config.yaml")
    _, tokenizer = load_tuned(args.run)
    conversations = held_out_conversations(cfg)[: args.prompts]
    texts = [render(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    reference, reference_s = transformers_answers(args.run, prompts, cfg.eval.max_new_tokens)
    reference_tokens = sum(len(answer) for answer in reference)

    lines = [
        "GGUF export checked in llama.cpp (bench/export_llamacpp.py)",
        f"date:       {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine:    {os.cpu_count()} CPUs; {platform.platform()}",
        f"llama.cpp:  llama-cpp-python {version}, built from its PyPI source distribution",
        f"run:        {args.run} ({cfg.model.name_or_path}, {trained_steps(args.run)} training steps, "
        f"training.max_steps {cfg.training.get('max_steps', '-')}); {len(prompts)} held-out prompts, greedy, "
        f"at most {cfg.eval.max_new_tokens} new tokens",
        f"transformers (final/, fp32): {reference_tokens} answer tokens in {reference_s:.1f} s",
        "",
        f"{'export':<8} {'file MB':>8} {'export s':>9} {'same prompt tokens':>19} {'same answers':>13} "
        f"{'same 1st token':>15} {'llama.cpp s':>12}",
    ]
    verdicts, modelfile = [], None
    with tempfile.TemporaryDirectory(prefix="sftlab-export-bench-") as directory:
        for quant in ("f16", "q8_0"):
            started = time.perf_counter()
            result = export_run(args.run, format="gguf", quant=quant, output=Path(directory) / quant)
            export_s = time.perf_counter() - started
            modelfile = modelfile or result.modelfile.read_text(encoding="utf-8")
            answers, same_tokens, llama_s = llama_cpp_answers(result.output, texts, prompts, cfg.eval.max_new_tokens)
            same = sum(a == b for a, b in zip(answers, reference))
            first = sum(a[:1] == b[:1] for a, b in zip(answers, reference))
            lines.append(
                f"{quant:<8} {result.output.stat().st_size / 1e6:>8.1f} {export_s:>9.1f} "
                f"{same_tokens:>12}/{len(prompts):<6} {same:>6}/{len(prompts):<6} "
                f"{first:>8}/{len(prompts):<6} {llama_s:>12.1f}"
            )
            verdicts.append((quant, same / len(prompts), same_tokens == len(prompts)))
            for index, (a, b) in enumerate(zip(answers, reference)):
                if a != b and sum(1 for line in lines if line.startswith("  differs")) < 3:
                    lines.append(
                        f"  differs ({quant}, prompt {index}): llama.cpp {tokenizer.decode(a)!r} "
                        f"vs transformers {tokenizer.decode(b)!r}"
                    )
        template = modelfile_template(Path(directory) / "f16" / "Modelfile")
        rendered = go_renders(template, [c for c in conversations]) if template else None
    lines.append("")
    if template is None:
        lines.append("Modelfile: no TEMPLATE (not a ChatML chat template); Ollama uses the GGUF's embedded template")
    elif rendered is None:
        lines.append("Modelfile TEMPLATE: not executed (no `go` on PATH)")
    else:
        expected = texts
        same_render = sum(a == b for a, b in zip(rendered, expected))
        go = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()
        lines.append(
            f"Modelfile TEMPLATE executed by Go text/template ({go}): {same_render}/{len(expected)} "
            "held-out conversations rendered exactly as the chat template renders them"
        )
        verdicts.append(("template", same_render / len(expected), True))
    with tempfile.TemporaryDirectory(prefix="sftlab-export-bench-tiny-") as directory:
        lines += [
            "",
            "Tiny models written by sftlab, run by llama.cpp (f16 file, llama.cpp's own CPU kernels):",
            *tiny_logits_in_llama_cpp(Path(directory)),
        ]
    lines += ["", "Modelfile (f16):", *("  " + line for line in modelfile.splitlines())]
    passed = all(share >= MOST and tokens for _, share, tokens in verdicts)
    lines += [
        "",
        f"verdict: {'PASS' if passed else 'FAIL'}: llama.cpp's greedy answers equal transformers' on at "
        f"least {MOST:.0%} of the prompts for every export, and llama.cpp tokenizes every prompt as "
        "transformers does",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
