#!/usr/bin/env python3
"""Render a run's report.html in headless Chromium and check the screenshot.

What it does
    1. writes RUN_DIR/report.html with `tokencredit.report.make_report` (unless
       --html names an existing page);
    2. screenshots it with headless Chromium (window 1200 x 2000 by default);
    3. checks the PNG: it exists, has the window's size and is not blank
       (enough non-white pixels, several distinct colours).
    Look at the screenshot yourself too: this only catches a blank or broken page.

It installs nothing. Chromium is looked up as $CHROMIUM, /usr/bin/chromium,
then `chromium` / `chromium-browser` / `google-chrome` on PATH. On Debian:
    apt-get update && apt-get install -y chromium
Exit codes: 0 ok, 1 the page looks wrong, 3 no Chromium found (nothing checked).

Try it
    .venv/bin/python scripts/check_report_render.py runs/my-run            # -> runs/my-run/report.png
    .venv/bin/python scripts/check_report_render.py runs/my-run --png /tmp/shot.png
    .venv/bin/python scripts/check_report_render.py --smoke   # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium"):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, chromium: str, width: int = 1200, height: int = 2000, timeout: float = 120) -> None:
    """Headless Chromium screenshot of file://html into png (raises on failure)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="tc-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", html.resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (rc={r.returncode}):\n{r.stderr[-2000:]}")


def check_png(png: Path, width: int, height: int) -> list[str]:
    """Problems found in the screenshot ([] = looks like a rendered page)."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(png))[..., :3]  # (H, W, 3) floats in [0, 1]
    problems = []
    if img.shape[0] != height or img.shape[1] != width:
        problems.append(f"size {img.shape[1]}x{img.shape[0]}, expected {width}x{height}")
    nonwhite = float((img.min(axis=2) < 0.9).mean())
    if nonwhite < 0.01:
        problems.append(f"almost blank: {100 * nonwhite:.2f}% non-white pixels")
    colours = len(np.unique((img[::4, ::4] * 15).round().reshape(-1, 3), axis=0))
    if colours < 8:
        problems.append(f"only {colours} distinct colours: no figures rendered?")
    return problems


def smoke_run_dir() -> Path:
    """A fresh 1-step tiny-random training run (a small digits data file) in a temp dir; its run directory."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokencredit.cli import main as cli_main

    root = Path(tempfile.mkdtemp(prefix="check_report_render-smoke-"))
    data = root / "digits.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)))
    overrides = {
        "model.name": "tiny-random", "data.train": str(data), "train.steps": 1, "rollout.prompts_per_step": 4,
        "rollout.n": 8, "rollout.max_new_tokens": 6, "train.mini_batch_size": 2, "train.micro_batch_size": 8,
        "train.lr": 1e-3, "eval.num_problems": 0, "batching.planner": "random", "batching.reward_balance.tau": "null",
        "probes.flip.every": 0, "output.root": str(root / "runs"), "output.run_name": "smoke", "output.progress": False,
    }
    rc = cli_main(["train", *(f"{k}={v}" for k, v in overrides.items())])
    if rc != 0:
        raise SystemExit(f"check_report_render --smoke: the tiny training run failed (rc {rc})")
    return root / "runs" / "smoke"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?", help="the run directory (with --smoke: default a fresh tiny run)")
    ap.add_argument("--html", type=Path, help="an existing page to render instead of writing RUN_DIR/report.html")
    ap.add_argument("--png", type=Path, help="screenshot path (default RUN_DIR/report.png)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "without RUN_DIR, a 1-step tiny-random training run in a temp dir; exits 0 when Chromium is absent")
    a = ap.parse_args(argv)
    if a.run_dir is None and not a.smoke:
        ap.error("the following arguments are required: run_dir")

    chromium = find_chromium()
    if chromium is None and a.smoke:
        print("check_report_render --smoke: skipped, no Chromium found (apt-get install -y chromium, or set $CHROMIUM)")
        return 0
    if chromium is None:
        print("no Chromium found; install it with `apt-get install -y chromium` (Debian) or set $CHROMIUM", file=sys.stderr)
        return 3
    if a.run_dir is None:
        a.run_dir = smoke_run_dir()
    html = a.html
    if html is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tokencredit.report import make_report

        html = make_report(a.run_dir)
    png = a.png or a.run_dir / "report.png"
    screenshot(html, png, chromium, a.width, a.height)
    problems = check_png(png, a.width, a.height)
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(f"{'FAIL' if problems else 'OK'}: {html} -> {png}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
