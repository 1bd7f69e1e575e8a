"""Facts about the process a run ran in, for its record: the code's commit, package versions,
the time, and the peak resident memory."""
from __future__ import annotations

import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def git_sha(where: str | Path | None = None, digits: int | None = None) -> str:
    """The short commit of the checkout the code runs from, with ``+dirty`` when tracked files
    differ from it: a run recorded from edited code must not claim the commit's code as its own.
    ``unknown`` outside a git checkout (an installed package) or without git. ``digits``: the
    shortest length of the commit's abbreviation (None: git's own)."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        short = "--short" if digits is None else f"--short={digits}"
        out = subprocess.run(["git", "rev-parse", short, "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        sha = out.stdout.strip()
        if not sha or out.returncode:
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10, cwd=cwd)
        return sha + ("+dirty" if changed.returncode == 0 and changed.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("atlas-harness", "torch", "numpy", "nevergrad", "open_clip_torch", "ray", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def reset_peak_rss() -> None:
    """Start this process's peak-memory count afresh (Linux: ``5`` to /proc/self/clear_refs resets
    VmHWM), so runs that share a process (sweeps, benches) each record their own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. Linux's VmHWM starts afresh at exec, unlike
    ``ru_maxrss``, which a process started by a large parent inherits from it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
