"""The Ray evaluator: same results as the local one in both parallel modes, full runs on workers,
recovery from a worker killed mid-batch, and no process left behind.

One Ray is started for the whole module (start-up takes seconds); evaluators created while it runs
join it instead of starting their own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # make test-fast leaves these out

ray = pytest.importorskip("ray")

from harness.api import Candidate  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.evaluators import PENALTY, LocalEvaluator  # noqa: E402
from harness.ray_evaluator import RayEvaluator  # noqa: E402
from harness.ray_worker import start_local_ray  # noqa: E402
from harness.problem import make_task, plan  # noqa: E402
from harness.runner import run  # noqa: E402
from atlas_harness_tasks.quadratic import QuadraticTask  # noqa: E402

import psutil  # noqa: E402  (importable once ray is: ray ships it)

ROOT = Path(__file__).resolve().parents[1]
ZOO = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"}


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _harness_workers() -> list[int]:
    """Pids of the worker actors under this process's Ray."""
    out = []
    for q in _descendants():
        try:
            if q.cmdline()[:1] and q.cmdline()[0].startswith("ray::HarnessWorker"):  # .evaluate while busy
                out.append(q.pid)
        except psutil.Error:
            pass
    return out


def _alive(procs) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module, shut down at its end with nothing left running. Four logical
    CPUs: the shared two-worker evaluator below stays up (idle) while other tests start theirs."""
    assert not ray.is_initialized()
    start_local_ray(num_cpus=4, quiet=True)
    yield
    procs = _descendants()
    ray.shutdown()
    deadline = time.time() + 10
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(procs), [p.cmdline()[:1] for p in _alive(procs)]


def _plan(task="quadratic", options=None, cache_dir=None, **kw):
    return plan(RunConfig(task=task, task_options=options or {}, cache_dir=cache_dir, workers=2, quiet=True, **kw))


def _setup(p):
    task = make_task(p)
    task.setup("cpu")
    return task


def _candidates(dim, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [Candidate(x=rng.uniform(-1, 1, dim), grad=bool(i % 2), batch=(7 if i == 3 else None))
            for i in range(n)]


def _same(ray_evs, local_evs, exact):
    assert len(ray_evs) == len(local_evs)
    for r, lo in zip(ray_evs, local_evs):
        assert r.ok == lo.ok and r.error == lo.error
        assert r.weight == pytest.approx(lo.weight, rel=1e-6)
        if exact:
            assert r.loss == lo.loss
        else:
            assert r.loss == pytest.approx(lo.loss, rel=1e-6, abs=1e-9)
        assert (r.grad is None) == (lo.grad is None)
        if r.grad is not None:
            assert r.grad.flags.writeable  # as a local evaluation's (Ray returns read-only arrays)
            if exact:
                assert np.array_equal(r.grad, lo.grad)
            else:
                np.testing.assert_allclose(r.grad, lo.grad, rtol=1e-5, atol=1e-7)
        assert r.metrics.keys() == lo.metrics.keys()
        for k in r.metrics:
            assert r.metrics[k] == pytest.approx(lo.metrics[k], rel=1e-6, abs=1e-9)


class SqrtQuadratic(QuadraticTask):
    """A ``complete`` that is not a sum over samples: applying it per shard would give another loss."""

    def complete(self, candidate, ev):
        ev.loss = float(np.sqrt(abs(ev.loss))) + 1.0
        ev.metrics = {**ev.metrics, "completed": ev.metrics.get("completed", 0.0) + 1.0}
        return ev


def test_a_run_that_starts_its_own_ray_leaves_no_process(tmp_path):
    """A CLI run on workers starts a local Ray; every process it started is gone when it exits."""
    mark = uuid.uuid4().hex
    env = {**os.environ, "ATLAS_HARNESS_TEST_MARK": mark}  # inherited by every process Ray starts

    def marked():
        out = []
        for q in psutil.process_iter():
            try:
                if q.environ().get("ATLAS_HARNESS_TEST_MARK") == mark and q.status() != psutil.STATUS_ZOMBIE:
                    out.append(" ".join(q.cmdline()))
            except (psutil.Error, OSError):
                pass
        return out

    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "random",
                             "--budget", "6", "--batch-size", "3", "--workers", "2", "--results-dir", str(tmp_path),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    seen = set()
    while proc.poll() is None:
        seen.update(c.split()[0].rsplit("/", 1)[-1].split(".")[0] for c in marked() if c)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert {"raylet", "gcs_server", "ray::HarnessWorker"} <= seen, seen  # the check below can see Ray
    assert "WARNING" not in err and "Token" not in err, err  # Ray's log noise stays out of the terminal
    rec = json.loads(next((tmp_path / "runs").glob("*/record.json")).read_text())
    assert rec["evaluator"]["evaluator"] == "ray" and rec["evaluations"] == 6
    deadline = time.time() + 10
    while marked() and time.time() < deadline:
        time.sleep(0.2)
    assert marked() == []


@pytest.fixture(scope="module")
def quad(ray_session):
    """Two workers on a quadratic whose ``complete`` is not a sum over samples, and the local
    evaluator to compare with; shared by the tests below (actor start-up costs seconds)."""
    p = _plan(task=f"{__name__}:SqrtQuadratic", options={"dim": 7, "noise": 0.1, "nan_above": 0.8, "delay": 0.05})
    local = LocalEvaluator(_setup(p))
    with RayEvaluator(p, workers=2, mode="candidates", quiet=True) as ev:  # no driver task: built lazily
        yield ev, local


@pytest.mark.parametrize("mode", ["candidates", "data", "auto"])
def test_ray_equals_local_on_quadratic(quad, mode):
    ev, local = quad
    ev.mode = mode
    cands = _candidates(7, n=6, seed=1) + [Candidate(x=np.r_[0.9, np.zeros(6)])]  # the last one is NaN
    got, want = ev.evaluate(cands), local.evaluate(cands)
    assert ev.describe()["mode"] == mode and ev.describe()["workers"] == 2
    _same(got, want, exact=(mode != "data"))
    assert not got[-1].ok and got[-1].loss == PENALTY
    assert all(e.metrics["completed"] == 1.0 for e in got[:-1])  # complete() ran once per candidate
    one = ev.evaluate(cands[1:2])  # in auto mode one candidate on two workers is split by data
    _same(one, want[1:2], exact=(mode == "candidates"))
    assert one[0].metrics["completed"] == 1.0
    # Low fidelity: scored whole on the fixed part of the data, mixed with full candidates.
    mixed = [Candidate(x=c.x, fidelity=f) for c, f in zip(cands[:4], (0.5, 1.0, 0.25, 0.5))]
    got, want = ev.evaluate(mixed), local.evaluate(mixed)
    _same(got, want, exact=False)
    assert got[0].loss != pytest.approx(ev.evaluate([Candidate(x=cands[0].x)])[0].loss, rel=1e-6)
    assert all(e.metrics["completed"] == 1.0 for e in got)


def test_submitted_candidates_come_back_as_workers_finish_them(quad):
    """Pipelined use: submit, then collect until every candidate is back; each score equals the
    local one (whole candidates), and candidates submitted while others run join the queue."""
    ev, local = quad
    cands = _candidates(7, n=6, seed=5) + [Candidate(x=np.r_[0.9, np.zeros(6)])]
    for i, c in enumerate(cands):
        c.id = i
    want = {c.id: e for c, e in zip(cands, local.evaluate(cands))}
    ev.submit(cands[:4])
    got = dict((c.id, e) for c, e in ev.collect())
    assert 1 <= len(got) <= 4
    ev.submit(cands[4:])
    while len(got) < len(cands):
        back = ev.collect()
        assert back
        got.update((c.id, e) for c, e in back)
    assert ev.collect() == []                        # nothing outstanding: returns at once
    for k in want:
        _same([got[k]], [want[k]], exact=True)
    assert not got[6].ok and got[6].loss == PENALTY


def test_an_async_run_on_two_workers_scores_every_candidate_once(ray_session, tmp_path):
    cfg = RunConfig(task="quadratic", searcher="nevergrad", budget=24, batch_size=3, seed=1,
                    task_options={"dim": 6, "delay": 0.02}, parallel="async", workers=2,
                    results_dir=str(tmp_path), quiet=True)
    rec = run(cfg, log=lambda m: None)
    assert rec["status"] == "complete" and rec["evaluations"] == 24
    assert rec["evaluator"]["mode"] == "async" and rec["evaluator"]["workers"] == 2
    rows = [json.loads(x) for x in (tmp_path / "runs" / rec["run_id"] / "trace.jsonl").read_text().splitlines()]
    assert sorted(r["cand"] for r in rows) == list(range(24))
    assert rec["best_search_loss"] == min(r["loss"] for r in rows)


def test_a_worker_killed_mid_batch_is_replaced(quad):
    ev, local = quad
    cands = _candidates(7, n=8, seed=4)
    want = local.evaluate(cands)
    for k, mode in enumerate(["candidates", "data"]):
        ev.mode = mode
        victim = ev.worker_pids()[k]
        timer = threading.Timer(0.1, os.kill, (victim, signal.SIGKILL))
        timer.start()
        got = ev.evaluate(cands)
        timer.join()
        assert ev.restarts == k + 1 and victim not in ev.worker_pids()
        _same(got, want, exact=(mode == "candidates"))
    ev.mode = "candidates"
    _same(ev.evaluate(cands), want, exact=True)  # both replacements work


def test_a_run_joins_an_existing_cluster_by_address(ray_session, tmp_path):
    """--address joins the cluster (which stays up afterwards); the run's workers are gone."""
    address = ray.get_runtime_context().gcs_address
    before = set(_harness_workers())  # the shared evaluator's
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "random",
                        "--budget", "4", "--batch-size", "2", "--workers", "2", "--address", address,
                        "--results-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rec = json.loads(next((tmp_path / "runs").glob("*/record.json")).read_text())
    assert rec["evaluator"]["address"] == address and rec["evaluations"] == 4
    assert ray.cluster_resources()["CPU"] == 4  # the cluster is still up
    deadline = time.time() + 10
    while set(_harness_workers()) - before and time.time() < deadline:
        time.sleep(0.2)
    assert set(_harness_workers()) - before == set()


def test_ray_equals_local_on_addition(ray_session, cache_dir):
    """Workers load the zoo from the cache the driver built (they never rebuild it)."""
    from harness.compose_options import _pairs
    from harness.sources.cache import zoo_path

    p = _plan(task="addition", options={**ZOO, "search_n": 24}, cache_dir=cache_dir, space="per_block")
    driver = _setup(p)
    path = zoo_path("tiny-clip", cache_dir, **_pairs(ZOO["source_options"], "source option"))
    mtime = path.stat().st_mtime_ns
    dim = driver.space().dim
    rng = np.random.default_rng(2)
    cands = [Candidate(x=rng.uniform(-0.5, 0.5, dim), grad=g, batch=b) for g, b in ((False, None), (True, None), (True, 3))]
    want = LocalEvaluator(driver).evaluate(cands)
    with RayEvaluator(p, workers=2, mode="candidates", quiet=True, task=driver) as ev:
        got_c = ev.evaluate(cands)
        ev.mode = "data"
        got_d = ev.evaluate(cands)
    assert path.stat().st_mtime_ns == mtime
    # Candidate-parallel losses are bit-identical; gradients differ in the last bits because the
    # workers run one torch thread and this process two (the backward reduces in another order).
    assert [e.loss for e in got_c] == [e.loss for e in want]
    _same(got_c, want, exact=False)
    _same(got_d, want, exact=False)


def test_reduced_precision_is_decided_once_on_the_driver(ray_session, cache_dir):
    """With bf16 asked, the driver checks it on the whole search set; every worker adopts that
    decision instead of checking its own shard, so one loss never mixes precisions."""
    p = _plan(task="addition", options={**ZOO, "search_n": 24, "precision": "bf16"}, cache_dir=cache_dir, space="per_task")
    driver = _setup(p)
    with RayEvaluator(p, workers=2, mode="data", quiet=True, task=driver) as ev:
        decided = driver.task_info["precision"]
        infos = ray.get([a.task_info.remote() for a in ev.actors])
        got = ev.evaluate([Candidate(x=np.full(driver.space().dim, 0.2))])
    assert decided["asked"] == "bf16" and "adopted" not in decided
    for info in infos:
        assert info["precision"]["adopted"] is True and info["precision"]["used"] == decided["used"]
    want = LocalEvaluator(driver).evaluate([Candidate(x=np.full(driver.space().dim, 0.2))])
    assert got[0].loss == pytest.approx(want[0].loss, rel=1e-5)


@pytest.mark.parametrize("searcher, batch, options", [
    ("nevergrad", 1, {}),                                # sequential → data-parallel
    ("nevergrad", 4, {"optimizer": "TwoPointsDE"}),      # population → candidate-parallel
    ("gradient", 1, {"lr": 0.05, "validate_every": 10}),  # gradient steps → data-parallel
    ("nevergrad", 1, {"screen": 0.5, "finalists": 4, "warm": 5}),  # low-fidelity screens on workers
    ("dfo-gn", 4, {}),                                   # probes with their outputs, whole, on workers
])
def test_run_on_two_workers_gives_the_local_result(ray_session, tmp_path, searcher, batch, options):
    def go(workers):
        cfg = RunConfig(task="quadratic", searcher=searcher, budget=30, batch_size=batch, seed=3,
                        task_options={"dim": 6}, searcher_options=options, workers=workers,
                        results_dir=str(tmp_path / f"w{workers}"), quiet=True)
        return run(cfg, log=lambda m: None)

    local, remote = go(0), go(2)
    assert remote["status"] == "complete" and remote["evaluator"]["evaluator"] == "ray"
    assert remote["evaluations"] == local["evaluations"] == 30
    assert remote["best_search_loss"] == pytest.approx(local["best_search_loss"], rel=1e-6)
    for k, v in local["final"].items():
        assert remote["final"][k] == pytest.approx(v, rel=1e-6, abs=1e-12)


def test_a_run_survives_a_killed_worker(ray_session, tmp_path):
    """Kill a worker while a run is going: exactly one trace row per evaluation, same result."""
    budget = 48

    def cfg(workers, results):
        return RunConfig(task="quadratic", searcher="nevergrad", budget=budget, batch_size=4, seed=1,
                         task_options={"dim": 6, "delay": 0.05}, searcher_options={"optimizer": "TwoPointsDE"},
                         workers=workers, results_dir=str(results), quiet=True)

    local = run(cfg(0, tmp_path / "local"), log=lambda m: None)
    killed = {}
    before = set(_harness_workers())  # the shared evaluator's, and earlier tests' still exiting

    def killer():
        try:
            trace = tmp_path / "ray" / "runs" / local["run_id"] / "trace.jsonl"
            deadline = time.time() + 60
            workers = []
            while not workers and time.time() < deadline:  # the run's workers appear while it sets up
                workers = [pid for pid in _harness_workers() if pid not in before]
                time.sleep(0.05)
            while time.time() < deadline:
                rows = len(trace.read_text().splitlines()) if trace.exists() else 0
                if rows >= 8:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.update(pid=workers[0], rows=rows)
                    return
                time.sleep(0.01)
        except Exception as e:  # reported by the assertion below instead of vanishing with the thread
            killed["error"] = repr(e)

    thread = threading.Thread(target=killer)
    thread.start()
    remote = run(cfg(2, tmp_path / "ray"), log=lambda m: None)
    thread.join()
    assert "rows" in killed and killed["rows"] < budget, killed  # the kill happened during the search
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    rows = [json.loads(line) for line in (tmp_path / "ray" / "runs" / remote["run_id"] / "trace.jsonl").read_text().splitlines()]
    assert remote["status"] == "complete" and remote["evaluations"] == budget
    assert [r["i"] for r in rows] == list(range(1, budget + 1))
    assert remote["final"] == local["final"] and remote["best_search_loss"] == local["best_search_loss"]


def test_too_many_workers_for_the_cluster_is_a_clear_error(ray_session):
    from harness.api import HarnessError

    with pytest.raises(HarnessError, match="5 workers × --cpus-per-worker 1 need 5 CPUs but the Ray cluster has 4"):
        RayEvaluator(_plan(options={"dim": 3}), workers=5, quiet=True)


def test_same_seed_same_coefficients_and_metrics_locally_and_on_ray(ray_session, tmp_path, cache_dir):
    """Determinism on a real composition task: twice locally and twice on two workers, the same
    seed gives bit-identical coefficients and metrics (candidate-parallel losses are exact)."""
    from safetensors.numpy import load_file

    def go(workers, folder):
        cfg = RunConfig(task="addition", searcher="nevergrad", budget=8, batch_size=2, seed=4, space="per_task",
                        task_options={**ZOO, "search_n": 16}, searcher_options={"optimizer": "TwoPointsDE"},
                        workers=workers, parallel="candidates", results_dir=str(tmp_path / folder),
                        cache_dir=cache_dir, quiet=True)
        rec = run(cfg, log=lambda m: None)
        assert rec["status"] == "complete"
        return rec, load_file(rec["coefficients"])

    results = [go(0, "local-a"), go(0, "local-b"), go(2, "ray-a"), go(2, "ray-b")]
    (ref, ref_coef), rest = results[0], results[1:]
    assert ref["evaluator"]["evaluator"] == "local" and rest[-1][0]["evaluator"]["evaluator"] == "ray"
    for rec, coef in rest:
        assert rec["final"] == ref["final"]
        assert coef.keys() == ref_coef.keys()
        assert all(np.array_equal(coef[k], ref_coef[k]) for k in coef)


def test_a_task_that_cannot_shard_gets_whole_candidates(ray_session, cache_dir):
    """TTA's im objective has a whole-batch term: auto mode sends whole candidates (equal to local)
    even for one candidate on two workers, and forcing data-parallel is a clear error."""
    p = _plan(task="tta", options={**ZOO, "target": "skdigits", "objective": "im", "max_n": 32},
              cache_dir=cache_dir, space="per_block")
    driver = _setup(p)
    cands = [Candidate(x=np.full(driver.space().dim, 0.3), grad=True)]
    want = LocalEvaluator(driver).evaluate(cands)
    with RayEvaluator(p, workers=2, mode="auto", quiet=True, task=driver) as ev:
        got = ev.evaluate(cands)
    assert got[0].loss == want[0].loss and got[0].weight == want[0].weight
    from harness.api import HarnessError
    with pytest.raises(HarnessError, match="cannot split its data across workers"):
        RayEvaluator(p, workers=2, mode="data", quiet=True, task=driver)
