"""Text: how the report writes numbers, durations and text from files, in the card and the HTML alike.

One formatter for every number the report shows (`fmt`): metrics go through
metrics.format_value, the one formatter the terminal table uses too; counts get
thousands separators, seconds become durations. Text read from the run directory (data,
generations, file names) is put into Markdown with `md` (escaped: no emphasis, links,
images, tables or HTML) or `code` (a code span that holds anything literally).

Trade-off: escaping in Markdown keeps the card readable on the Hub, but a backslash shows
where the text held a Markdown character; code spans are used where exact text matters
(paths, commands).
"""

from __future__ import annotations

import re

from sftlab.metrics import format_value


def fmt(value, kind: str = "float") -> str:
    """A number as the report shows it; "n/a" when it was not measured.

    kind: "int" (1,234), "seconds" (2 min 06 s), or a metric kind of metrics.METRIC_ROWS
    ("share", "loss", "number"; "float" reads as "number").
    """
    if value is None:
        return "n/a"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "seconds":
        return duration(value)
    return format_value(value, kind)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def md(text) -> str:
    """Text from files as Markdown that stays text: no emphasis, links, images, tables or HTML."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"([\\`*\[\]<>|&!~#])", r"\\\1", text)
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)  # an underscore inside a word emphasizes nothing


def code(text) -> str:
    """An inline code span that holds any text (backticks included) literally."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def writable(text: str) -> str:
    """Text that UTF-8 can hold. Files may spell surrogates ("\\ud83d\\ude00" in JSON read as YAML, or a lone
    "\\ud800"), which Python keeps as they are and no UTF-8 file can: pairs become their character, lone ones U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def fence(text: str, language: str = "") -> str:
    """A fenced code block longer than any run of backticks inside it."""
    ticks = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"
