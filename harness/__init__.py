"""The aTLAS harness: learn and benchmark anisotropic compositions of task vectors.

The Python API (``docs/api.md``): :func:`run` one search, :func:`sweep` many, rank them with
:func:`leaderboard`, reload one with :func:`load_run`, and :func:`compose` task vectors with
your own coefficients. Heavy libraries (torch, Ray, nevergrad) load when first needed.
"""
from harness.api import HarnessError, option
from harness.python_api import Run, compose, leaderboard, load_run, run, sweep, task_vector

__version__ = "0.1.0"
__all__ = ["HarnessError", "Run", "compose", "leaderboard", "load_run", "option", "run", "sweep", "task_vector"]
