"""Render a leaderboard page in a headless browser and check that its plots are drawn.

    python scripts/check_page.py results/leaderboard.html [--browser chromium-headless-shell]

Takes a screenshot with Chromium's headless shell (Debian: apt install chromium-headless-shell) or
with a full Chromium or Chrome (``--browser chromium``, run with ``--headless``), then checks the
screenshot: the table's text is there (dark pixels) and the inlined PNG curves are drawn
(saturated matplotlib line colours). Prints what it found; exit 1 if the page looks empty, exit 2
with one line on stderr if the page or the browser is missing or the browser fails.
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


class RenderError(Exception):
    """The page could not be rendered; the message is one line for the user."""


def render(page: Path, browser: str, width: int = 1280, height: int = 3000, keep: Path | None = None) -> np.ndarray:
    """Screenshot ``page`` with ``browser`` (a headless shell, or a full Chromium/Chrome run with
    ``--headless``) as an RGB array; raises RenderError with a one-line reason."""
    exe = shutil.which(browser)
    if exe is None:
        raise RenderError(f"browser '{browser}' not found on PATH; install it (Debian: apt install "
                          "chromium-headless-shell) or name an installed one with --browser")
    flags = [] if "headless-shell" in Path(exe).name else ["--headless"]  # a full browser needs it: no display here
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "page.png"
        cmd = [exe, *flags, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
               f"--screenshot={shot}", page.resolve().as_uri()]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise RenderError(f"{browser} did not render {page} within 120 s") from None
        except OSError as e:
            raise RenderError(f"cannot start {browser} ({exe}): {e.strerror or e}") from None
        if not shot.is_file():
            lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
            why = f": {lines[-1].strip()[:200]}" if lines else ""
            raise RenderError(f"{browser} wrote no screenshot of {page} (exit code {r.returncode}){why}")
        if keep is not None:
            shutil.copy(shot, keep)
        try:
            return np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
        except OSError as e:
            raise RenderError(f"{browser} wrote an unreadable screenshot of {page}: {e}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--browser", default="chromium-headless-shell")
    ap.add_argument("--screenshot", type=Path, help="also keep the screenshot here")
    args = ap.parse_args()
    if not args.page.is_file():
        print(f"error: page not found: {args.page}", file=sys.stderr)
        return 2
    try:
        img = render(args.page, args.browser, keep=args.screenshot)
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
