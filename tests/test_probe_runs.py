"""Caches, pipelined resume and interrupted runs (issue 32): checksummed reference-cache entries
and zoo sidecars, the cache root under $XDG_CACHE_HOME, one build per zoo entry across processes,
pipelined runs resumed from out-of-order traces, records that count their trace after Ctrl-C,
an unreachable Ray address, and --batch-size bounds."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import refcache
from harness import runner as runner_mod
from harness.api import HarnessError
from harness.config import RunConfig
from harness.evaluators import LocalEvaluator
from harness.runner import MAX_BATCH, run
from harness.sources.cache import build_zoo, cache_root, zoo_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, whatever this process started with: a test
    suite launched in the background (``cmd &``, as CI scripts do) inherits SIGINT ignored, and
    then no KeyboardInterrupt is ever raised."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _default_sigint():
    """For a child process: SIGINT back to its default, so the child's Python installs its
    KeyboardInterrupt handler (an ignored SIGINT is inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SMALL = dict(datasets=("skdigits", "lfw"), max_n=200, pretrain_steps=5, ft_steps=3, threads=1)
SMALL_TEXT = "datasets=skdigits,lfw;max_n=200;pretrain_steps=5;ft_steps=3;threads=1"


def _quiet(_msg):
    pass


def _trace(rec, results_dir) -> list[dict]:
    path = Path(results_dir) / "runs" / rec["run_id"] / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _record(results_dir) -> dict:
    (path,) = list((Path(results_dir) / "runs").glob("*/record.json"))
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- reference cache


def test_a_reference_entry_that_does_not_verify_is_recomputed_not_used(tmp_path, capsys):
    calls = []

    def compute():
        calls.append(1)
        return {"fine-tuned": {"normalized_acc": 1.0, "abs_acc": 0.75}}

    material = {"task": "addition", "seed": 0}
    value, hit = refcache.cached(tmp_path, "task", material, compute)
    assert (value["fine-tuned"]["normalized_acc"], hit, len(calls)) == (1.0, False, 1)
    (path,) = list((tmp_path / "references").glob("task-*.json"))
    good = json.loads(path.read_text())
    assert refcache.cached(tmp_path, "task", material, compute) == (value, True) and len(calls) == 1
    assert capsys.readouterr().err == ""

    def damaged(edit, reason):
        entry = json.loads(json.dumps(good))
        edit(entry)
        path.write_text(json.dumps(entry) if not isinstance(entry, str) else entry)
        n = len(calls)
        got, hit = refcache.cached(tmp_path, "task", material, compute)
        assert got["fine-tuned"]["normalized_acc"] == 1.0 and not hit and len(calls) == n + 1
        err = capsys.readouterr().err.splitlines()
        assert err == [f"warning: reference cache entry {path} {reason}; recomputing it"]
        assert json.loads(path.read_text()) == good  # rewritten: the next call is a hit again
        assert refcache.cached(tmp_path, "task", material, compute)[1] is True

    # Valid JSON with another figure: the headline would go from 1.0 to 0.5.
    damaged(lambda e: e["value"]["fine-tuned"].update(normalized_acc=0.5), "does not match its checksum (damaged)")
    # An entry of other material, checksummed consistently, under this entry's name.
    def other_material(e):
        e["material"]["seed"], e["key"] = 1, refcache.key_of(e["material"] | {"seed": 1})
        e["value"]["fine-tuned"]["normalized_acc"] = 0.5
        e["checksum"] = refcache.checksum(e)
    damaged(other_material, "was computed from other material (its key does not match)")
    # A consistent entry whose key field names another entry.
    def other_key(e):
        e["key"] = "0" * 24
        e["checksum"] = refcache.checksum(e)
    damaged(other_key, "was computed from other material (its key does not match)")
    damaged(lambda e: e.pop("checksum"), "has no checksum")  # entries written before checksums
    damaged(lambda e: e.pop("value"), "is not a cache entry")
    path.write_text('{"material": ')
    assert refcache.cached(tmp_path, "task", material, compute)[1] is False
    assert "is not valid JSON; recomputing it" in capsys.readouterr().err


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """A cache holding one small tiny-clip zoo (built here once)."""
    folder = tmp_path_factory.mktemp("probe-zoo")
    build_zoo("tiny-clip", cache_dir=str(folder), progress=False, **SMALL)
    return folder


def test_a_damaged_task_reference_entry_never_changes_a_recorded_headline(zoo_cache, tmp_path, capsys):
    cfg = dict(task="addition", searcher="zero-shot", cache_dir=str(zoo_cache), quiet=True,
               task_options={"source": "tiny-clip", "source_options": SMALL_TEXT})
    first = run(RunConfig(results_dir=str(tmp_path / "a"), **cfg), log=_quiet)
    ft = "fine-tuned (each its own)"
    assert first["status"] == "complete" and first["references"][ft]["normalized_acc"] == 1.0
    entries = [p for p in (zoo_cache / "references").glob("task-*.json")
               if json.loads(p.read_text())["material"]["options"]["source_options"] == SMALL_TEXT]
    (entry,) = entries
    data = json.loads(entry.read_text())
    data["value"][ft]["normalized_acc"] = 0.5  # still valid JSON
    entry.write_text(json.dumps(data))
    capsys.readouterr()
    second = run(RunConfig(results_dir=str(tmp_path / "b"), **cfg), log=_quiet)
    assert second["status"] == "complete" and second["references_cached"] is False
    assert second["references"] == first["references"]
    assert second["references"][ft]["normalized_acc"] == 1.0
    assert f"warning: reference cache entry {entry} does not match its checksum (damaged); recomputing it" \
        in capsys.readouterr().err
    third = run(RunConfig(results_dir=str(tmp_path / "c"), **cfg), log=_quiet)
    assert third["references_cached"] is True and third["references"] == first["references"]


# --------------------------------------------------------------------------- zoo cache


def _copy_entry(src_cache: Path, dst_cache: Path) -> tuple[Path, Path]:
    tensors = zoo_path("tiny-clip", str(src_cache), **SMALL)
    dst_cache.mkdir(parents=True, exist_ok=True)
    for p in (tensors, tensors.with_suffix(".json")):
        shutil.copy2(p, dst_cache / p.name)
    mine = dst_cache / tensors.name
    return mine, mine.with_suffix(".json")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _alter_tensors(path: Path) -> None:
    with open(path, "r+b") as f:  # 4 KB of zeros in the middle of the tensors
        f.seek(path.stat().st_size // 2)
        f.write(b"\0" * 4096)


def test_a_zoo_sidecar_without_its_checksum_is_rebuilt_not_adopted(zoo_cache, tmp_path, capsys):
    tensors, sidecar = _copy_entry(zoo_cache, tmp_path / "cache")
    good = _sha(tensors)
    meta = json.loads(sidecar.read_text())
    del meta["sha256"]
    sidecar.write_text(json.dumps(meta, indent=1))
    _alter_tensors(tensors)
    source = build_zoo("tiny-clip", cache_dir=str(tmp_path / "cache"), progress=False, **SMALL)
    assert "load_seconds" not in source.meta  # rebuilt, not loaded
    assert f"notice: zoo cache {tensors} has no checksum in its sidecar; rebuilding it" in capsys.readouterr().err
    assert _sha(tensors) == good and json.loads(sidecar.read_text())["sha256"] == good
    again = build_zoo("tiny-clip", cache_dir=str(tmp_path / "cache"), progress=False, **SMALL)
    assert "load_seconds" in again.meta and capsys.readouterr().err == ""


def test_a_zoo_sidecar_whose_figures_were_edited_is_rebuilt(zoo_cache, tmp_path, capsys):
    """The sidecar's fine-tuned accuracies feed normalized_acc: they are checksummed too."""
    tensors, sidecar = _copy_entry(zoo_cache, tmp_path / "cache")
    meta = json.loads(sidecar.read_text())
    truth = dict(meta["finetuned_acc"])
    meta["finetuned_acc"] = {ds: 0.5 * v for ds, v in truth.items()}
    sidecar.write_text(json.dumps(meta, indent=1))
    source = build_zoo("tiny-clip", cache_dir=str(tmp_path / "cache"), progress=False, **SMALL)
    assert "load_seconds" not in source.meta and source.meta["finetuned_acc"] == truth
    assert "has a sidecar that does not match its checksum (damaged); rebuilding it" in capsys.readouterr().err
    assert json.loads(sidecar.read_text())["finetuned_acc"] == truth


def test_zoo_entries_that_do_not_verify_say_why(zoo_cache, tmp_path):
    """Each way an entry can fail to verify, as the notice line names it (no rebuild here)."""
    from harness.sources.cache import _config, _key, _load, zoo_class
    cls = zoo_class("tiny-clip")
    cfg = _config(cls, SMALL)
    key = _key(cls, cfg, list(SMALL["datasets"]))
    tensors, sidecar = _copy_entry(zoo_cache, tmp_path / "cache")
    root = tmp_path / "cache"
    original = sidecar.read_text()
    assert not isinstance(_load(cls, cfg, root, key, tensors, sidecar), str)  # the copy verifies

    def reason(edit):
        meta = json.loads(original)
        edit(meta)
        sidecar.write_text(json.dumps(meta))
        return _load(cls, cfg, root, key, tensors, sidecar)

    assert reason(lambda m: m.pop("meta_sha256")) == "has no checksum in its sidecar"
    assert reason(lambda m: m.update(key="0" * 10)) == "has a sidecar that does not match its checksum (damaged)"

    def other_key(m):
        m["key"] = "0" * 10
        from harness.sources.cache import _meta_checksum
        m["meta_sha256"] = _meta_checksum(m)
    assert reason(other_key) == "has a sidecar of another entry (its key does not match)"
    sidecar.write_text(original)
    _alter_tensors(tensors)
    assert _load(cls, cfg, root, key, tensors, sidecar) == "does not match its checksum (damaged)"
    sidecar.write_text("{not json")
    assert _load(cls, cfg, root, key, tensors, sidecar) == "has an unreadable sidecar (damaged)"


def test_the_cache_root_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ATLAS_HARNESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "atlas-harness"
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"        # --cache-dir first
    monkeypatch.setenv("ATLAS_HARNESS_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"                                  # then the harness's variable
    monkeypatch.delenv("ATLAS_HARNESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")                     # ignored, as the spec says
    assert cache_root() == Path("~/.cache/atlas-harness").expanduser()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path("~/.cache/atlas-harness").expanduser()


_BUILD_AFTER = """
import json, os, sys, time
from harness.sources.cache import build_zoo
go, cache, small = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
while not os.path.exists(go):
    time.sleep(0.01)
source = build_zoo("tiny-clip", cache_dir=cache, progress=False, **small)
print(json.dumps(["loaded" if "load_seconds" in source.meta else "built", source.meta["sha256"]]))
"""


def test_two_processes_asking_for_one_zoo_build_it_once(tmp_path):
    # Two separate interpreters (not multiprocessing, whose resource tracker would outlive the
    # test), released together by a file.
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AFTER, str(go), str(tmp_path / "cache"), json.dumps(SMALL)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r[0] for r in results) == ["built", "loaded"], results
    assert results[0][1] == results[1][1]  # the one that waited loaded what the other built
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- pipelined resume


class OutOfOrder(LocalEvaluator):
    """Scores pipelined candidates newest first (as Ray workers finish in any order): each
    ``collect`` returns only the last submitted candidate still waiting. ``stop_after`` raises
    KeyboardInterrupt (Ctrl-C) at that many collects; ``ctrl_c_on_close`` sends this process a
    real SIGINT while it is being closed (a second Ctrl-C during the workers' shutdown)."""

    def __init__(self, task, stop_after=None, ctrl_c_on_close=False):
        super().__init__(task)
        self.pending, self.collects, self.closed = [], 0, False
        self.stop_after, self.ctrl_c_on_close = stop_after, ctrl_c_on_close

    def submit(self, candidates):
        self.pending.extend(candidates)

    def collect(self):
        if self.stop_after is not None and self.collects >= self.stop_after:
            raise KeyboardInterrupt
        self.collects += 1
        cand = self.pending.pop()
        return [(cand, self.evaluate([cand])[0])]

    def close(self):
        if self.ctrl_c_on_close:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal arrives while closing
        self.closed = True


def _async_cfg(results_dir, searcher="nevergrad", budget=24, batch=4, **options):
    return RunConfig(task="quadratic", searcher=searcher, budget=budget, batch_size=batch, seed=3,
                     task_options={"dim": 5}, parallel="async", results_dir=str(results_dir), quiet=True,
                     searcher_options=options)


def _with_evaluator(monkeypatch, **kw):
    made = []

    def make(p, task):
        made.append(OutOfOrder(task, **kw))
        return made[-1]
    monkeypatch.setattr(runner_mod, "make_evaluator", make)
    return made


@pytest.mark.parametrize("searcher", ["nevergrad", "random"])
def test_an_interrupted_pipelined_run_with_out_of_order_scores_resumes_to_the_same_result(
        tmp_path, monkeypatch, searcher):
    _with_evaluator(monkeypatch)
    full = run(_async_cfg(tmp_path / "full", searcher), log=_quiet)
    order = [r["cand"] for r in _trace(full, tmp_path / "full")]
    assert full["status"] == "complete" and order != sorted(order)  # finish order is not ask order

    _with_evaluator(monkeypatch, stop_after=9)
    with pytest.raises(KeyboardInterrupt):
        run(_async_cfg(tmp_path / "cut", searcher), log=_quiet)
    cut = _record(tmp_path / "cut")
    assert cut["status"] == "interrupted" and cut["evaluations"] == len(_trace(cut, tmp_path / "cut")) == 9

    made = _with_evaluator(monkeypatch)
    again = run(_async_cfg(tmp_path / "cut", searcher), log=_quiet)
    assert again["status"] == "complete" and again["resumed_from"] == 9 and again["evaluations"] == 24
    assert again["final"] == full["final"] and again["best_search_loss"] == full["best_search_loss"]
    assert [r["cand"] for r in _trace(again, tmp_path / "cut")] == order
    assert [r["x"] for r in _trace(again, tmp_path / "cut")] == [r["x"] for r in _trace(full, tmp_path / "full")]
    assert made[0].closed


def test_a_trace_reordered_by_hand_replays_to_the_same_result(tmp_path):
    """Rows swapped pairwise (1, 0, 3, 2, ...), as two workers finishing out of step leave them:
    every row's candidate was in flight, so the run resumes through all of them. Uniform random
    search: its proposals do not depend on the scores, so the swapped trace is one it could make."""
    cfg = _async_cfg(tmp_path, searcher="random", budget=16, batch=2, mode="uniform")
    first = run(cfg, log=_quiet)
    rows = _trace(first, tmp_path)
    assert [r["cand"] for r in rows] == list(range(16))  # in-process: finish order is ask order
    swapped = [rows[i ^ 1] for i in range(16)]
    for i, r in enumerate(swapped, 1):
        r["i"] = i
    trace = tmp_path / "runs" / first["run_id"] / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in swapped[:11]))  # and killed after 11
    (trace.parent / "record.json").unlink()
    again = run(cfg, log=_quiet)
    assert again["status"] == "complete" and again["resumed_from"] == 11 and again["evaluations"] == 16
    assert again["final"] == first["final"] and again["best_search_loss"] == first["best_search_loss"]
    got = _trace(again, tmp_path)
    assert [r["cand"] for r in got[:11]] == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11]
    assert sorted(r["cand"] for r in got) == list(range(16))  # every candidate once


# --------------------------------------------------------------------------- interrupted runs


def test_ctrl_c_while_closing_still_leaves_an_interrupted_record_that_counts_the_trace(tmp_path, monkeypatch,
                                                                                      python_sigint):
    made = _with_evaluator(monkeypatch, stop_after=5, ctrl_c_on_close=True)
    with pytest.raises(KeyboardInterrupt):
        run(_async_cfg(tmp_path), log=_quiet)
    assert made[0].closed  # the second Ctrl-C waited until the evaluator was closed
    rec = _record(tmp_path)
    assert rec["status"] == "interrupted" and rec["evaluations"] == len(_trace(rec, tmp_path)) == 5
    assert rec["finished"] and "run the same command to resume" in rec["error"]


def test_a_ctrl_c_while_a_complete_run_closes_leaves_it_complete(tmp_path, monkeypatch, python_sigint):
    """A Ctrl-C held off during the close of a complete run leaves the record complete."""
    made = _with_evaluator(monkeypatch, ctrl_c_on_close=True)
    with pytest.raises(KeyboardInterrupt):
        run(_async_cfg(tmp_path, budget=8), log=_quiet)
    rec = _record(tmp_path)
    assert made[0].closed and rec["status"] == "complete" and rec["evaluations"] == 8


# --------------------------------------------------------------------------- bad input


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_at_once_and_records_nothing(tmp_path):
    port = _free_port()
    t0 = time.time()
    with pytest.raises(HarnessError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}: no connection"):
        run(RunConfig(task="quadratic", searcher="random", budget=4, workers=1, address=f"127.0.0.1:{port}",
                      results_dir=str(tmp_path), quiet=True), log=_quiet)
    assert time.time() - t0 < 15 and not (tmp_path / "runs").exists()
    # Something listens there, but it is not Ray (a web server, say): refused within the timeout too.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        t0 = time.time()
        with pytest.raises(HarnessError, match="does not answer as Ray within 5 s"):
            run(RunConfig(task="quadratic", searcher="random", budget=4, workers=1,
                          address=f"127.0.0.1:{srv.getsockname()[1]}", results_dir=str(tmp_path), quiet=True),
                log=_quiet)
        assert time.time() - t0 < 15
    finally:
        srv.close()
    with pytest.raises(HarnessError, match="has no port"):
        run(RunConfig(task="quadratic", searcher="random", workers=1, address="127.0.0.1",
                      results_dir=str(tmp_path), quiet=True), log=_quiet)


def test_bad_batch_sizes_and_addresses_are_one_line_from_the_command_line(tmp_path):
    base = [sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "nevergrad",
            "-s", "optimizer=CMA", "--results-dir", str(tmp_path), "--quiet"]
    t0 = time.time()
    r = subprocess.run(base + ["--batch-size", str(10**20)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    _one_line_error(r, f"--batch-size must be between 1 and {MAX_BATCH}", str(10**20))
    port = _free_port()
    r = subprocess.run(base + ["--workers", "1", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    _one_line_error(r, f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert time.time() - t0 < 60 and not (tmp_path / "runs").exists()


def test_the_largest_batch_size_still_runs(tmp_path):
    rec = run(RunConfig(task="quadratic", searcher="nevergrad", budget=12, batch_size=MAX_BATCH, seed=0,
                        task_options={"dim": 3}, searcher_options={"optimizer": "CMA"}, results_dir=str(tmp_path),
                        quiet=True), log=_quiet)
    assert rec["status"] == "complete" and rec["evaluations"] == 12
    with pytest.raises(HarnessError, match=f"between 1 and {MAX_BATCH} .*got {MAX_BATCH + 1}"):
        run(RunConfig(task="quadratic", searcher="random", budget=4, batch_size=MAX_BATCH + 1,
                      results_dir=str(tmp_path / "x"), quiet=True), log=_quiet)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- on Ray


def test_a_double_ctrl_c_on_ray_exits_130_with_an_interrupted_record_and_no_process_left(tmp_path):
    """Ctrl-C in a terminal signals the whole process group (the driver and the Ray it started)."""
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    mark = f"probe-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "ATLAS_HARNESS_TEST_MARK": mark}

    def marked():
        out = []
        for q in psutil.process_iter():
            try:
                if q.environ().get("ATLAS_HARNESS_TEST_MARK") == mark and q.status() != psutil.STATUS_ZOMBIE:
                    out.append(q.pid)
            except (psutil.Error, OSError):
                pass
        return out

    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--searcher", "random",
                             "--budget", "400", "--batch-size", "2", "--workers", "2", "-t", "delay=0.1",
                             "--results-dir", str(tmp_path), "--quiet"], cwd=ROOT, env=env, start_new_session=True,
                            preexec_fn=_default_sigint,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            traces = list((tmp_path / "runs").glob("*/trace.jsonl")) if (tmp_path / "runs").exists() else []
            if traces and len(traces[0].read_text().splitlines()) >= 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, -signal.SIGINT), err  # a shell shows both as 130
    rec = _record(tmp_path)
    assert rec["status"] == "interrupted" and rec["evaluations"] == len(_trace(rec, tmp_path)) >= 4
    deadline = time.time() + 15
    while marked() and time.time() < deadline:
        time.sleep(0.2)
    assert marked() == []
