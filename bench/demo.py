"""Benchmark: the main job, `sftlab demo`, end to end, timed, and judged against its bar.

What it checks (the project's requirement for the demo): "check -> baseline evaluation ->
train -> evaluation -> report, on the embedded default [...] under 10 minutes end to end on 2
CPU cores. [...] on the held-out split, format adherence after >= 90% and at least 40 points
above before; held-out loss lower after; `diagnose` finds no overfitting or instability", and
since the verdict (issue 13): the demo shows the base, prompted base and tuned model and the
verdict, which must be `worked`: better than the prompted base model, not only than the base.

It runs `sftlab demo --output DIR` as a user would (a subprocess, the installed console
script), times it with the wall clock, then reads the run directory: eval/before.json and
eval/prompted.json, eval/after.json (adherence, loss, the demo's `record` metric),
eval/verdict.json, diagnosis.json (findings), metrics.jsonl (train_runtime)
and the report files. The demo's own output (its before/after table) is kept in the result.

    python bench/demo.py            # writes bench/results/demo.txt (and .json)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
WALL_LIMIT_S = 600
ADHERENCE_AFTER = 0.90
ADHERENCE_GAIN = 0.40
BAD_FINDINGS = {"overfitting", "instability"}


TABLE = (
    ("record (the demo's metric)", ("metrics", "record"), "share"),
    ("format adherence", ("adherence", "format"), "share"),
    ("chat adherence", ("adherence", "chat"), "share"),
    ("exact match", ("reference", "exact_match"), "share"),
    ("ROUGE-L", ("reference", "rougeL"), "number"),
    ("held-out loss", ("loss", "loss"), "number"),
    ("retention loss", ("retention", "loss"), "number"),
)


def row(result: dict, keys: tuple[str, str], kind: str) -> str:
    value = (result.get(keys[0]) or {}).get(keys[1])
    if value is None:
        return f"{'-':>9}"
    return f"{value:9.1%}" if kind == "share" else f"{value:9.3f}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def train_runtime(run: Path) -> float | None:
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "train_runtime" in record:
            return record["train_runtime"]
    return None


def main() -> int:
    out_dir = Path(tempfile.mkdtemp(prefix="sftlab-demo-bench-"))
    run = out_dir / "demo"
    # A user's first run: an empty cache, so the data is prepared and the embedded model converted in the run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTLAB_CACHE_DIR": str(out_dir / "cache")}
    env.pop("SFTLAB_NO_CACHE", None)
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(["sftlab", "demo", "--output", str(run)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout, done.stderr, sep="\n")
        return done.returncode

    before, after = read_json(run / "eval" / "before.json"), read_json(run / "eval" / "after.json")
    prompted, verdict = read_json(run / "eval" / "prompted.json"), read_json(run / "eval" / "verdict.json")
    findings = [f["code"] for f in read_json(run / "diagnosis.json").get("findings", [])]
    adherence_before, adherence_after = before["adherence"]["format"], after["adherence"]["format"]
    checks = {
        f"end to end under {WALL_LIMIT_S // 60} minutes": wall < WALL_LIMIT_S,
        f"format adherence after >= {ADHERENCE_AFTER:.0%}": adherence_after >= ADHERENCE_AFTER,
        f"format adherence gain >= {ADHERENCE_GAIN * 100:.0f} points": adherence_after - adherence_before
        >= ADHERENCE_GAIN,
        "held-out loss lower after": after["loss"]["loss"] < before["loss"]["loss"],
        "verdict: worked (better than the base and the prompted base model)": verdict.get("verdict") == "worked",
        "no overfitting or instability found": not BAD_FINDINGS & set(findings),
        "report.html and final/README.md written": (run / "report.html").exists()
        and (run / "final" / "README.md").exists(),
    }
    import torch

    lines = [
        "sftlab demo benchmark (bench/demo.py): `sftlab demo` end to end, first run (an empty cache: data prepared and the embedded model converted in the run)",
        f"date:       {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"machine:    {os.cpu_count()} CPUs; {platform.platform()}; torch {torch.__version__}; "
        f"{'GPU' if torch.cuda.is_available() else 'no GPU'}",
        f"load:       1/5/15-minute load average before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        f"wall time end to end:        {wall:7.1f} s",
        f"  baseline evaluation:       {before.get('seconds', float('nan')):7.1f} s",
        f"  prompted baseline:         {prompted.get('seconds', float('nan')):7.1f} s",
        f"  training (train_runtime):  {train_runtime(run) or float('nan'):7.1f} s",
        f"  evaluation after:          {after.get('seconds', float('nan')):7.1f} s",
        "",
        f"held-out prompts: {after['num_prompts']}; format: {after['adherence'].get('format_spec', {}).get('type')}",
        f"{'':<27}{'before':>9}{'prompted':>9}{'after':>9}",
        *[
            f"{label:<27}{row(before, keys, kind)}{row(prompted, keys, kind)}{row(after, keys, kind)}"
            for label, keys, kind in TABLE
        ],
        f"diagnosis findings: {', '.join(findings) or 'none'}",
        f"verdict: {verdict.get('headline', 'none')}",
        *[f"  caveat: {caveat}" for caveat in verdict.get("caveats", [])],
        "",
        *[f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()],
        f"overall: {'PASS' if all(checks.values()) else 'FAIL'}",
        "",
        "the demo's own output:",
        done.stdout.rstrip(),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.txt").write_text(report, encoding="utf-8")
    summary = {
        "wall_s": wall,
        "before": before,
        "prompted": prompted,
        "after": after,
        "verdict": verdict,
        "findings": findings,
        "checks": checks,
    }
    (RESULTS / "demo.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
