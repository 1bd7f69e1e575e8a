"""Evaluate on Ray workers: candidates across workers, or one candidate's data across workers.

Each worker is a Ray actor that builds the task once (model, task vectors and cached inputs are
loaded from the zoo cache on disk) and then only ever receives :class:`Candidate` objects and
returns :class:`Evaluation` objects, so nothing large crosses a process boundary per call.

Two kinds of parallelism:

- ``candidates``: the batch's candidates are handed out one at a time to whichever worker is free
  (like ``ray.util.ActorPool``); results come back in candidate order. For population searchers.
- ``data``: every worker scores every candidate of the batch on its shard ``(i, n)`` of the search
  data; the shards are reduced with :func:`reduce_shards` (an exact weighted mean) and the task's
  ``complete`` is applied once on the whole-set result, in the driver. For sequential searchers
  and the gradient searcher, which ask for one candidate at a time.

``auto`` picks ``data`` when the batch has fewer candidates than there are workers.

``async`` pipelines (:meth:`RayEvaluator.submit` / :meth:`RayEvaluator.collect`): the runner keeps
``--batch-size`` candidates in flight, tells the searcher each score as soon as its worker is done
and hands the worker the searcher's next candidate, so no worker waits for the slowest candidate
of a batch or for the driver's bookkeeping (for searchers whose class sets ``asynchronous``). A candidate of
low fidelity (``Candidate.fidelity < 1``) is scored whole by one worker on its fixed part of the
search set (:func:`harness.evaluators.fidelity_shard`), exactly as the local evaluator does.

A worker that dies mid-batch (killed, out of memory, node lost) is replaced by a fresh actor and
its unfinished work is handed out again; every candidate gets exactly one evaluation. Work that
kills its worker ``MAX_ATTEMPTS`` times is returned as a failed evaluation instead of looping.

Joining a cluster (``--address host:port`` or ``ray://host:port``) first checks, within
``CONNECT_TIMEOUT_S``, that something at that address answers as a gRPC server (Ray's GCS and
its client server are), so a wrong or unreachable address is one line at once instead of Ray's
minutes of retries. A local Ray the evaluator starts is shut down by :meth:`RayEvaluator.close`,
which also runs at interpreter exit (``atexit``) if nothing called it.

Example:
    >>> p = plan(RunConfig(task="quadratic", workers=2))
    >>> with RayEvaluator(p, workers=2, mode="auto") as ev:
    ...     evaluations = ev.evaluate([Candidate(x=np.zeros(8))])
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from harness.api import Candidate, Evaluation, HarnessError, Task
from harness.evaluators import PARALLEL_MODES as MODES
from harness.evaluators import PENALTY, Evaluator, fidelity_shard, reduce_shards, sanitize
from harness.ray_pool import ActorPool
from harness.ray_worker import HarnessWorker, start_local_ray

if TYPE_CHECKING:
    from harness.problem import Plan

# Times one piece of work may take its worker down before it is reported as failed.
MAX_ATTEMPTS = 3
# Seconds a cluster address has to accept a connection and answer as a gRPC server.
CONNECT_TIMEOUT_S = 5.0
# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with a SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``[v6]:port`` or ``ray://host:port``; None for the
    forms Ray resolves itself (``auto``, ``local``) and for ``ray://`` without a port (its
    default, 10001)."""
    rest = address.strip()
    if rest in ("auto", "local"):
        return None
    scheme = ""
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port
        if scheme == "ray":
            return rest.strip("[]"), 10001
        raise HarnessError(f"--address {address!r} has no port; valid forms: host:port (the head's GCS, "
                           "6379 by default), ray://host:port (Ray Client, 10001 by default), auto")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise HarnessError(f"--address {address!r} has an invalid port {port!r}; valid forms: host:port, "
                           "ray://host:port, auto")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a one-line HarnessError unless ``address`` accepts a TCP connection and answers the
    HTTP/2 preface as a gRPC server does, each within ``timeout`` seconds. Skipped for ``auto``
    and when Ray talks TLS (``RAY_USE_TLS``), where the preface is not what the server expects."""
    hp = _host_port(address)
    if hp is None:
        return
    host, port = hp
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        why = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or type(e).__name__)
        raise HarnessError(f"cannot reach the Ray cluster at {address}: no connection to {host}:{port} within "
                           f"{timeout:g} s ({why}); start the cluster (`ray start --head`) or fix --address "
                           "(host:port of its GCS, ray://host:port for Ray Client, or auto)") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true", "yes"):
        conn.close()
        return
    try:
        conn.settimeout(timeout)
        conn.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except OSError:
        head = b""
    finally:
        conn.close()
    if len(head) < 9 or head[3] != 4:  # frame type 4: SETTINGS
        raise HarnessError(f"cannot join the Ray cluster at {address}: {host}:{port} does not answer as Ray "
                           f"within {timeout:g} s (is it the dashboard's or another service's port?); give the "
                           "head's GCS address (host:6379 by default), ray://host:10001 for Ray Client, or auto")


def _writable(ev: Evaluation) -> Evaluation:
    """Ray hands numpy arrays back read-only (zero-copy); a local evaluation's are writable."""
    if ev.grad is not None and not ev.grad.flags.writeable:
        ev.grad = ev.grad.copy()
    return ev


class RayEvaluator(Evaluator):
    """Scores candidates on ``workers`` Ray actors, each holding its own set-up task.

    Args:
        plan: the resolved run (``harness.runner.plan``); workers build the task from it.
        workers: number of actors; 0 with an ``address`` means one per ``cpus_per_worker`` CPUs
            of the cluster.
        address: a Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` starts a local Ray, which :meth:`close` shuts down. If Ray is already
            initialised in this process it is used as is and left running.
        cpus_per_worker: Ray CPUs per actor; also its torch thread count (at least 1).
        gpus_per_worker: Ray GPUs per actor; > 0 puts the task on ``cuda``.
        mode: ``auto``, ``candidates`` or ``data`` (see the module docstring).
        quiet: keep the workers' output and Ray's log lines out of the terminal.
        task: a set-up task in this process (the runner's), used for ``complete`` after a
            data-parallel reduction; built lazily from ``plan`` when needed and not given.
    """

    def __init__(self, plan: "Plan", workers: int = 2, address: str | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, mode: str = "auto", quiet: bool = False, task: Task | None = None):
        if mode not in MODES:
            raise HarnessError(f"parallel mode must be one of {', '.join(MODES)}; got {mode!r}")
        if workers < 0 or cpus_per_worker < 0 or gpus_per_worker < 0:
            raise HarnessError("--workers, --cpus-per-worker and --gpus-per-worker must not be negative")
        if workers == 0 and not address:
            raise HarnessError("RayEvaluator needs --workers of at least 1, or an --address to size from the cluster")
        self.plan, self.mode, self.address, self.quiet = plan, mode, address, quiet
        self.shardable = plan.task_cls.shardable(plan.task_options)
        if mode == "data" and not self.shardable:
            raise HarnessError(f"task '{plan.config.task}' with these options cannot split its data across "
                               "workers; use --parallel candidates or auto")
        self.cpus, self.gpus = float(cpus_per_worker), float(gpus_per_worker)
        self._task, self._owns_ray, self.pool = task, False, None
        self._submitted: dict[int, Candidate] = {}  # pipelined candidates by their pool key
        self._stats = {"calls": 0, "wall_s": 0.0}
        import ray
        from ray import cloudpickle
        self._ray = ray
        try:
            self._start_ray(workers)
            self.workers = workers or self._fit_workers()
            self._check_resources()
            # A worker with a GPU computes on the one Ray assigned it (Ray sets CUDA_VISIBLE_DEVICES,
            # so it is "cuda" there); without one, on its CPUs.
            self._context = {"sys_path": list(sys.path), "cwd": os.getcwd(), "threads": max(1, int(self.cpus)),
                             "device": "cuda" if self.gpus > 0 else "cpu",
                             "env": {k: v for k, v in os.environ.items() if k.startswith("ATLAS_HARNESS")}}
            self._context["precision"] = self._decide_precision()
            self._payload = cloudpickle.dumps(plan)  # by value for classes defined in __main__
            self._remote = ray.remote(HarnessWorker).options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_concurrency=1)
            self.pool = ActorPool(ray, self.workers, spawn=lambda: self._remote.remote(self._payload, self._context),
                                  ready=self._ready, call=lambda actor, item: actor.evaluate.remote(*item),
                                  failed=self._failed, max_attempts=MAX_ATTEMPTS, quiet=quiet)
            self.worker_info = self.pool.wait_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ start-up and shutdown

    def _start_ray(self, workers: int) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        common = {"log_to_driver": not self.quiet, "logging_level": logging.WARNING}
        if self.address:
            check_reachable(self.address)
            try:
                ray.init(address=self.address, **common)
            except Exception as e:
                raise HarnessError(f"cannot join the Ray cluster at {self.address}: {type(e).__name__}: {e}") from None
        else:
            start_local_ray(max(1, math.ceil(workers * self.cpus)), quiet=self.quiet)
        self._owns_ray = True
        atexit.register(self.close)  # also when the evaluator is never closed; close() unregisters it

    def _decide_precision(self) -> dict | None:
        """Reduced precision is checked once, here, on the whole search set of the driver's task;
        the workers adopt the decision, so no shard or worker computes in another precision."""
        opts = self.plan.task_options
        asked = opts.get("precision", "fp32") if isinstance(opts, dict) else getattr(opts, "precision", "fp32")
        if asked == "fp32":
            return None
        task = self._driver_task(always=True)
        engine = getattr(task, "engine", None)
        if engine is None or not hasattr(engine, "adopt_precision"):
            return None
        if "precision" not in engine.info:
            task.evaluate([Candidate(x=task.space().start)])
        return engine.info.get("precision")

    def _fit_workers(self) -> int:
        cpus = self._ray.cluster_resources().get("CPU", 0)
        return max(1, int(cpus // self.cpus) if self.cpus > 0 else int(cpus))

    def _check_resources(self) -> None:
        have = self._ray.cluster_resources()
        for kind, per, flag in (("CPU", self.cpus, "--cpus-per-worker"), ("GPU", self.gpus, "--gpus-per-worker")):
            need = self.workers * per
            if need > have.get(kind, 0) + 1e-9:
                raise HarnessError(f"{self.workers} workers × {flag} {per:g} need {need:g} {kind}s but the Ray cluster has "
                                   f"{have.get(kind, 0):g}; lower --workers or {flag}")

    @staticmethod
    def _ready(info: dict) -> dict:
        if "error" in info:
            is_user, msg = info["error"]
            if is_user:
                raise HarnessError(msg)
            raise RuntimeError(f"a Ray worker failed to set up the task: {msg}")
        return info

    @staticmethod
    def _failed(item, message: str) -> list[Evaluation]:
        """The result of work that took its worker down ``MAX_ATTEMPTS`` times: failed evaluations."""
        return [Evaluation(loss=PENALTY, weight=0.0, ok=False, error=message) for _ in item[0]]

    @property
    def actors(self) -> list:
        return self.pool.actors if self.pool is not None else []

    @property
    def restarts(self) -> int:
        return self.pool.restarts if self.pool is not None else 0

    def close(self) -> None:
        """Kill the workers, and shut down the Ray this evaluator started (idempotent)."""
        ray = getattr(self, "_ray", None)
        if ray is None:
            return
        if self.pool is not None:
            self.pool.close()
        self._submitted = {}
        if self._owns_ray:
            atexit.unregister(self.close)
            self._owns_ray = False
            if ray.is_initialized():
                ray.shutdown()

    def describe(self) -> dict:
        return {"evaluator": "ray", "mode": self.mode, "workers": self.workers, "address": self.address or "local",
                "cpus_per_worker": self.cpus, "gpus_per_worker": self.gpus}

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (tests kill them to check recovery)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, candidates: list[Candidate]) -> list[Evaluation]:
        if not candidates:
            return []
        t0 = time.perf_counter()
        n = len(self.actors)
        # Low-fidelity candidates are scored, one per work item, on their fixed part of the search
        # set (as the local evaluator does); full ones by candidate or split into data shards.
        # Candidates whose outputs are asked for are scored whole, one per work item, like low ones.
        low = [i for i, c in enumerate(candidates) if fidelity_shard(c.fidelity) is not None or c.outputs]
        full = sorted(set(range(len(candidates))) - set(low))
        data = self.shardable and (self.mode == "data" or (self.mode == "auto" and len(full) < n)) and n > 1
        shards = [fidelity_shard(candidates[i].fidelity) for i in low]
        work = [([candidates[i]], shard, shard is not None) for i, shard in zip(low, shards)]
        if data and full:
            work += [([candidates[i] for i in full], (k, n), False) for k in range(n)]
        else:
            work += [([candidates[i]], None, False) for i in full]
        outs = self.pool.run(work)
        result: list[Evaluation | None] = [None] * len(candidates)
        for i, o in zip(low, outs):
            result[i] = sanitize(_writable(o[0]))
        outs = outs[len(low):]
        if data and full:
            task = self._driver_task()
            for j, i in enumerate(full):
                ev = reduce_shards([outs[k][j] for k in range(n)])
                result[i] = sanitize(task.complete(candidates[i], ev) if task is not None else ev)
        else:
            for i, o in zip(full, outs):
                result[i] = sanitize(_writable(o[0]))
        self._stats["calls"] += 1
        self._stats["wall_s"] += time.perf_counter() - t0
        return result

    def stats(self) -> dict:
        """Where the time went: batches, wall seconds in :meth:`evaluate`, seconds the workers spent
        computing (summed over workers) and restarts. ``worker_s / (wall_s × workers)`` is the
        workers' utilisation; the rest is waiting, transport and the driver's reduction."""
        return {**self._stats, "worker_s": self.pool.busy_s if self.pool else 0.0, "workers": len(self.actors),
                "restarts": self.restarts}

    def _driver_task(self, always: bool = False) -> Task | None:
        """The task ``complete`` runs on after a reduction; None when the task keeps the default
        (unless ``always``)."""
        if self.plan.task_cls.complete is Task.complete and not always:
            return None
        if self._task is None:
            from harness.problem import build_task
            self._task, _ = build_task(self.plan)
        return self._task

    # ------------------------------------------------------------------ pipelined (asynchronous) use

    def submit(self, candidates: list[Candidate]) -> None:
        """Queue candidates, each scored whole by the next free worker (``--parallel async``)."""
        for c in candidates:
            shard = fidelity_shard(c.fidelity)
            self._submitted[self.pool.put(([c], shard, True))] = c
        self.pool.dispatch()

    def collect(self) -> list[tuple[Candidate, Evaluation]]:
        """Wait until at least one submitted candidate is scored; return those that are, in the
        order they finished. Workers that finish meanwhile take the next queued candidates."""
        if not self._submitted:
            return []
        t0 = time.perf_counter()
        out = []
        while not out:
            for k, res in self.pool.step():
                out.append((self._submitted.pop(k), sanitize(_writable(res[0]))))
        self._stats["calls"] += 1
        self._stats["wall_s"] += time.perf_counter() - t0
        return out
