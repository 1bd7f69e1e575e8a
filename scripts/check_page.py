"""Render a leaderboard page in a headless browser and check that its plots are drawn.

    python scripts/check_page.py results/leaderboard.html [--browser chromium-headless-shell]

Takes a screenshot with Chromium's headless shell (Debian: apt install chromium-headless-shell),
then checks the screenshot: the table's text is there (dark pixels) and the inlined PNG curves are
drawn (saturated matplotlib line colours). Prints what it found; exit 1 if the page looks empty.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def render(page: Path, browser: str, width: int = 1280, height: int = 3000, keep: Path | None = None) -> np.ndarray:
    exe = shutil.which(browser)
    if exe is None:
        sys.exit(f"error: {browser} not found; install it (Debian: apt install chromium-headless-shell)")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "page.png"
        subprocess.run([exe, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
                        f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        if keep is not None:
            shutil.copy(shot, keep)
        return np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--browser", default="chromium-headless-shell")
    ap.add_argument("--screenshot", type=Path, help="also keep the screenshot here")
    args = ap.parse_args()
    if not args.page.is_file():
        sys.exit(f"error: page not found: {args.page}")
    img = render(args.page, args.browser, keep=args.screenshot)
    dark = int((img.max(axis=2) < 80).sum())                    # text, axes
    spread = img.max(axis=2) - img.min(axis=2)
    colour = int((spread > 100).sum())                           # coloured curves and bands
    rows = np.nonzero((spread > 100).any(axis=1))[0]
    print(f"rendered {args.page}: {img.shape[1]}x{img.shape[0]} px; {dark} dark (text/axes) pixels, "
          f"{colour} coloured (plot) pixels in rows {rows.min() if len(rows) else '-'}–{rows.max() if len(rows) else '-'}")
    if dark < 2000 or colour < 2000:
        print("error: the page rendered without a table or without plots", file=sys.stderr)
        return 1
    print("ok: the table and the plots render")
    return 0


if __name__ == "__main__":
    sys.exit(main())
