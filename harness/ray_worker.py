"""What runs in Ray's own processes, and starting a private local Ray.

:class:`HarnessWorker` is the actor the Ray evaluator (:mod:`harness.ray_evaluator`) keeps one of
per worker: it builds the run's task once, in the driver's environment, and then only ever turns
:class:`~harness.api.Candidate` lists into :class:`~harness.api.Evaluation` lists.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from harness.api import Candidate, Evaluation, HarnessError


class HarnessWorker:
    """The actor: one task instance, set up once. Wrapped with ``ray.remote`` at start-up, so this
    module imports without starting anything. Its process title is ``ray::HarnessWorker``."""

    def __init__(self, payload: bytes, context: dict):
        # The plan arrives pickled and is unpickled only after sys.path, the working directory and
        # the harness's environment match the driver's, so ``module:Class`` plugins and relative
        # cache paths resolve here as they do there.
        self.error = None
        try:
            for path in reversed(context["sys_path"]):
                if path not in sys.path:
                    sys.path.insert(0, path)
            if os.path.isdir(context["cwd"]):
                os.chdir(context["cwd"])
            os.environ.update(context["env"])
            import torch
            from ray import cloudpickle

            from harness.problem import build_task

            torch.set_num_threads(context["threads"])
            plan = cloudpickle.loads(payload)
            t0 = time.perf_counter()
            self.task, _ = build_task(plan, context["device"])
            if context.get("precision"):  # decided once, on the driver, for every worker
                self.task.engine.adopt_precision(context["precision"])
            self.setup_s = time.perf_counter() - t0
        except Exception as e:  # reported by ready(): an actor whose __init__ raises is only "dead"
            user = isinstance(e, HarnessError)
            self.error = (user, str(e) if user else f"{type(e).__name__}: {e}")

    def ready(self) -> dict:
        if self.error:
            return {"error": self.error}
        import torch
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "setup_s": self.setup_s}

    def evaluate(self, candidates: list[Candidate], shard: tuple[int, int] | None,
                 whole: bool = False) -> tuple[list[Evaluation], float]:
        """The evaluations, and the seconds spent computing them (for :meth:`RayEvaluator.stats`).
        ``whole``: the shard is all the candidate is scored on (low fidelity), so ``complete`` it."""
        t0 = time.perf_counter()
        evs = self.task.evaluate(candidates, shard=shard)
        if shard is None or whole:
            evs = [self.task.complete(c, e) for c, e in zip(candidates, evs)]
        return evs, time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()

    def task_info(self) -> dict:
        """What this worker's engine chose (precision, evaluation chunk, population pass)."""
        return dict(getattr(self.task, "task_info", None) or {})


def start_local_ray(num_cpus: int, quiet: bool = True) -> None:
    """Start a private local Ray (no dashboard, warnings only; workers' output hidden if quiet)."""
    import ray

    # Ray turns on token authentication for a new local cluster and logs a warning saying so on
    # every start; the behaviour is right for us, the line is noise.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
                 logging_level=logging.WARNING)
    finally:
        auth_log.setLevel(level)
