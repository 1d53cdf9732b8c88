"""Look at a matrix report the way a reader would: screenshot report.html in headless Chromium.

    .venv/bin/python benchmarks/render_report.py runs/<profile>-matrix-<hash>/ [--width 1600] [--height 4000]

Writes report-screenshot.png beside report.html (written first if missing). Needs a
Chromium or Chrome binary on PATH (Debian: apt-get install chromium); the page is
self-contained, so the browser runs with the network off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    sys.exit(f"no headless browser found (looked for {', '.join(BROWSERS)}); on Debian: apt-get install chromium")


def screenshot(html: Path, out: Path, width: int, height: int) -> Path:
    command = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--proxy-server=127.0.0.1:9",  # no network
               f"--window-size={width},{height}", f"--screenshot={out}", html.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"the browser failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a matrix run folder holding results.json")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=4000, help="the page is cut at this height")
    args = parser.parse_args()
    if not (args.run_dir / "report.html").is_file():
        from s2l_guard.report import write_report

        write_report(args.run_dir)
    print(screenshot(args.run_dir / "report.html", args.run_dir / "report-screenshot.png", args.width, args.height))


if __name__ == "__main__":
    main()
