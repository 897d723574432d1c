"""Render a run's report.html in headless Chromium and save a screenshot, to look at it.

    python scripts/screenshot_report.py RUN_DIR [--output report.png] [--width 1280] [--height 4000]

docs/report-screenshot.png is the report of a `sftlab demo` run, shot with this script.

Rebuilds the report first (`sftlab report RUN_DIR`) unless --no-rebuild is given. Chromium
runs with networking off (an unreachable proxy): the page must render offline, so a plot
or style that needed the network would show as missing in the screenshot. Needs Debian's
`chromium` package (apt-get install chromium); this is a tool for people, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: install Debian's `chromium` package (apt-get install -y chromium)")


def screenshot(html: Path, output: Path, width: int, height: int) -> Path:
    if not html.is_file():
        sys.exit(f"{html} not found: run `sftlab report RUN_DIR` first, or leave out --no-rebuild")
    output = output.resolve()
    with tempfile.TemporaryDirectory(prefix="sftlab-chromium-") as profile:
        command = [
            find_chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--window-size={width},{height}",
            f"--screenshot={output}",
            html.resolve().as_uri(),
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return output


def shrink(png: Path) -> None:
    """256 colours without dithering: text and plot lines stay sharp, the file a third of the size."""
    from PIL import Image  # Pillow comes with matplotlib

    image = Image.open(png).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output", type=Path, default=Path("report.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--no-rebuild", action="store_true", help="use the run's report.html as it is")
    args = parser.parse_args()
    if not args.no_rebuild:
        from sftlab.report import write_report

        write_report(args.run_dir)
    path = screenshot(args.run_dir / "report.html", args.output, args.width, args.height)
    shrink(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
