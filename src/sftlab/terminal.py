"""Terminal-safe text: what came from data or generations is shown literally, never interpreted.

Training data and model outputs are text nobody here wrote. Printed as they are, they can
crash the output (`[/INST]` is a closing tag to rich's markup parser), restyle it
(`[bold red]`, `:smile:` emoji codes), or drive the terminal itself: `\\x1b[2J` clears the
screen, an OSC sequence (`\\x1b]0;...\\x07`) retitles the window, `\\r` and backspace
overwrite what was printed, bidi overrides reorder it. Every place sftlab prints such text
goes through `visible` (plain strings: chat streaming, stderr) or `literal` (rich output):

- control characters (C0, DEL, C1), bidi formatting characters and lone surrogates are
  written as Python escapes (`\\x1b`, `\\r`, `\\u202e`), so they are seen, not obeyed;
- newlines are kept only where the output is multi-line by design (`multiline=True`:
  examples, answers); elsewhere they are escaped so one record stays on one line; tabs
  are harmless and kept;
- `literal` builds a rich `Text`, which rich never parses for markup or emoji codes, so
  brackets and colons print as they are.

Trade-off: a literal backslash in the data is not escaped, so `\\x1b` typed as four
characters and a real ESC look alike; doubling every backslash would garble code and
LaTeX in ordinary data, which is far more common than an ESC.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.text import Text

__all__ = ["visible", "literal"]

# Bidirectional formatting characters (the "Trojan Source" set, plus the marks): they reorder what follows on screen.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
KEPT = {"\t"}  # a tab moves the cursor right, nothing else: harmless
KEPT_MULTILINE = {"\t", "\n"}


def _escape(character: str) -> str:
    code = ord(character)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return named.get(character) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _table(kept: set[str]) -> dict[int, str]:
    unsafe = [chr(code) for code in range(0x100) if unicodedata.category(chr(code)) == "Cc"]  # C0, DEL, C1
    unsafe += list(BIDI_CONTROLS)
    unsafe += [chr(code) for code in range(0xD800, 0xE000)]  # lone surrogates cannot even be encoded for the terminal
    return {ord(character): _escape(character) for character in unsafe if character not in kept}


_SINGLE_LINE = _table(KEPT)
_MULTILINE = _table(KEPT_MULTILINE)


def visible(text: object, multiline: bool = False) -> str:
    """`text` with every character that a terminal would obey instead of show written as an escape."""
    return str(text).translate(_MULTILINE if multiline else _SINGLE_LINE)


def literal(*parts: str | tuple[str, str], multiline: bool = False) -> Text:
    """A rich Text of the parts, each shown literally: a part is a string, or (string, style) for sftlab's own labels.

    Print it with `console.print(...)`: rich parses neither markup nor emoji codes in a Text.
    """
    from rich.text import Text

    text = Text()
    for part in parts:
        content, style = (part, "") if isinstance(part, str) else part
        text.append(visible(content, multiline=multiline), style=style or None)
    return text
