"""Chat: talk to a run's tuned model in the terminal, to judge it by hand.

The chapter asks for a qualitative review of the outputs next to the numbers: `sftlab
chat RUN_DIR` loads final/ (a full model, or a LoRA adapter on its base), keeps the
conversation, renders every turn with the model's own chat template exactly as
training did, and streams the answer token by token. Greedy by default, so the same
question gets the answer the evaluation saw; `--temperature` samples instead.

Commands inside the chat: `/reset` starts a new conversation, `/exit` (or Ctrl-D) ends.

What the model writes is shown literally (terminal.py): control characters and escape
sequences are printed as escapes; the conversation keeps the text as generated.

Trade-off: the whole conversation is re-encoded at each turn (no KV cache kept across
turns): simple and exact, and cheap next to generation at chat lengths.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from sftlab.evaluate.finished import load_final_model, open_finished_run
from sftlab.generation import stop_token_ids
from sftlab.rundir import FINAL_DIR
from sftlab.templates import render
from sftlab.terminal import visible

COMMANDS = "/reset starts over, /exit (or Ctrl-D) ends"


def load_tuned(run_dir: Path):
    """The run's final model and the tokenizer it trained with (its chat template included)."""
    cfg, final_dir, tokenizer = open_finished_run(run_dir)
    model = load_final_model(final_dir, cfg.model, tokenizer)
    model.eval()
    return model, tokenizer


def reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float = 0.0, out: TextIO | None = None
) -> str:
    """The model's next turn, streamed to `out` as it is generated."""
    import torch

    prompt = render(tokenizer, messages, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = _Streamer(tokenizer, out) if out is not None else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def chat(
    run_dir: Path,
    lines: Iterable[str] | None = None,
    out: TextIO = sys.stdout,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
) -> list[dict]:
    """Talk to the run's model; `lines` defaults to the terminal. Returns the last conversation."""
    model, tokenizer = load_tuned(run_dir)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    out.write(f"chatting with {visible(Path(run_dir) / FINAL_DIR)} ({COMMANDS})\n")
    for line in lines if lines is not None else _terminal_lines():
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        out.flush()
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature, out)
        messages.append({"role": "assistant", "content": answer})
        out.write("\n")
    return messages


def _terminal_lines() -> Iterable[str]:
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


class _Streamer:
    """transformers' TextStreamer, writing to any text stream instead of print()."""

    def __init__(self, tokenizer, out: TextIO):
        from transformers import TextStreamer

        self.out = out
        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.inner.on_finalized_text = self.write

    def write(self, text: str, stream_end: bool = False) -> None:
        # The model's text, shown and never obeyed: an escape sequence it generates must not drive the terminal.
        # Escaping is per character, so a sequence split across two chunks is caught as well.
        self.out.write(visible(text, multiline=True))
        self.out.flush()

    def put(self, value) -> None:
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()
