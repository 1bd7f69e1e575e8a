"""Reliability from the command line, as a user types it: concurrent runs, run-id safety,
non-finite weights, damaged caches, torn and corrupt traces, bad values (issue 16)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def harness(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("resuming run ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def quad(res, *extra, budget="40", seed="1"):
    return ["run", "--task", "quadratic", "--searcher", "random", "--budget", budget, "--seed", seed,
            "-t", "dim=4", "--results-dir", str(res), "--quiet", *extra]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(res):
    (trace,) = list((Path(res) / "runs").glob("*/trace.jsonl"))
    return [json.loads(line) for line in trace.read_text().splitlines()]


def test_two_identical_runs_at_once_never_share_a_run(tmp_path):
    procs = [start(quad(tmp_path, "-t", "delay=0.02", budget="60")) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    # "by process PID on HOST", or "by another process" when the winner has the lock but has
    # not yet written who it is.
    assert ("is being run by process" in loser or "is being run by another process" in loser) \
        and loser.count("\n") == 1
    r = rows(tmp_path)
    assert [x["i"] for x in r] == list(range(1, 61))  # no row lost or doubled
    # The lock dies with its holder: the same command now reports the completed run.
    again = harness(*quad(tmp_path, "-t", "delay=0.02", budget="60"))
    assert again.returncode == 0 and "already complete" in again.stderr


def test_different_runs_into_one_results_dir_at_once(tmp_path):
    procs = [start(quad(tmp_path, "-t", "delay=0.01", seed=str(s))) for s in range(3)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    for trace in (tmp_path / "runs").glob("*/trace.jsonl"):
        assert [json.loads(line)["i"] for line in trace.read_text().splitlines()] == list(range(1, 41))


def test_resume_ids_are_checked_and_change_nothing(tmp_path):
    assert harness(*quad(tmp_path)).returncode == 0
    (run_id,) = [p.name for p in (tmp_path / "runs").iterdir()]
    before = snapshot(tmp_path)
    one_line_error(harness(*quad(tmp_path, "--resume", "../../x")), "invalid run id")
    one_line_error(harness(*quad(tmp_path, "--resume", "nothere")), "no run 'nothere'")
    # A different config (searcher, budget) aimed at this run, even with --rerun, is refused.
    other = ["run", "--task", "quadratic", "--searcher", "nevergrad", "--budget", "10", "-t", "dim=4",
             "--results-dir", str(tmp_path), "--quiet", "--resume", run_id, "--rerun"]
    one_line_error(harness(*other), "different config", "searcher")
    one_line_error(harness("plot", "../x", "--results-dir", str(tmp_path)), "invalid run id")
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent / "x").exists()


def test_resume_with_only_the_run_id_continues_the_recorded_run(tmp_path):
    """`run --resume RUN_ID` alone takes the run's recorded settings: a killed run ends with the
    trace of an uninterrupted one."""
    import signal
    import time
    ref_dir, res = tmp_path / "ref", tmp_path / "res"
    assert harness(*quad(ref_dir, "-t", "delay=0.02", budget="60")).returncode == 0
    p = start(quad(res, "-t", "delay=0.02", budget="60"))
    deadline = time.time() + 240
    while time.time() < deadline:
        traces = list((res / "runs").glob("*/trace.jsonl")) if (res / "runs").exists() else []
        if traces and len(traces[0].read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    (run_id,) = [d.name for d in (res / "runs").iterdir()]
    assert 10 <= len(rows(res)) < 60
    again = harness("run", "--resume", run_id, "--results-dir", str(res), "--quiet")
    assert again.returncode == 0, again.stderr
    assert [(r["i"], r["loss"]) for r in rows(res)] == [(r["i"], r["loss"]) for r in rows(ref_dir)]
    # a flag that changes the run is still refused
    one_line_error(harness("run", "--resume", run_id, "--results-dir", str(res), "--budget", "70", "--quiet"),
                   "different config", "budget")


def test_resume_without_readable_settings_is_refused_and_touches_nothing(tmp_path):
    """A run whose record.json and config.json are both unreadable resumes only under a command
    whose settings hash to its id; `--resume RUN_ID` alone (or "") is refused in one line."""
    res = tmp_path / "res"
    one_line_error(harness("run", "--resume", "", "--results-dir", str(res), "--quiet"), "--resume is empty")
    assert harness(*quad(res, budget="20")).returncode == 0
    (run_dir,) = list((res / "runs").iterdir())
    (run_dir / "record.json").write_text("[]")
    (run_dir / "config.json").write_text("\n")
    before = snapshot(res)
    r = harness("run", "--resume", run_dir.name, "--results-dir", str(res), "--quiet")
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("warning: unreadable run record")]
    one_line_error(subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "\n".join(lines)),
                   "no readable record.json or config.json")
    assert snapshot(res) == before
    # its own command proves the settings (the id is their hash): it rebuilds the record from the trace
    again = harness(*quad(res, budget="20"), "--resume", run_dir.name)
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "record.json").read_text())["status"] == "complete"
    assert len(rows(res)) == 20


def test_bad_values_are_one_line_errors_and_create_nothing(tmp_path):
    res = tmp_path / "res"
    cases = [(("--seed", "-1"), "--seed"), (("--seed", "99999999999999999999999"), "--seed"),
             (("-t", "dim=inf"), "dim"), (("-t", "dim=0"), "dim"), (("--space", ""), "--space"),
             (("-s", "sigma=0.1", "-s", "sigma=0.2"), "given twice"), (("-t", "noise=nan"), "finite")]
    for extra, needle in cases:
        one_line_error(harness(*quad(res, *extra)), needle)
    one_line_error(harness("run", "--task", "quadratic", "--results-dir", "", "--quiet"), "--results-dir")
    conf = tmp_path / "run.toml"
    conf.write_text('task = "quadratic"\nbudget = inf\n')
    one_line_error(harness("run", "--config", str(conf), "--results-dir", str(res)), "budget")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('tasks = ["quadratic"]\nseeds = [0]\n[[searchers]]\nname = "random"\nbudget = "x"\n')
    one_line_error(harness("sweep", "--file", str(sweep), "--results-dir", str(res)), "budget")
    assert not res.exists()


def test_a_run_whose_evaluations_all_fail_is_failed_and_never_ranked(tmp_path):
    r = harness(*quad(tmp_path, "-t", "nan_above=-10", budget="5"))
    assert r.returncode == 2 and "all 5 evaluations failed" in r.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/record.json")]
    assert rec["status"] == "failed"
    board = harness("leaderboard", "--results-dir", str(tmp_path), "--no-plots")
    assert board.returncode == 2 and "no completed runs" in board.stderr


def _kill_after(args, res, n_rows):
    proc = start(args)
    deadline = time.time() + 120
    while time.time() < deadline:
        traces = list((Path(res) / "runs").glob("*/trace.jsonl")) if (Path(res) / "runs").exists() else []
        if traces and len(traces[0].read_text().splitlines()) >= n_rows:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return traces[0]


def test_a_corrupt_line_mid_trace_resumes_from_the_good_prefix(tmp_path):
    ref = harness(*quad(tmp_path / "ref", budget="40"))
    assert ref.returncode == 0
    args = quad(tmp_path / "cut", "-t", "delay=0.05", budget="40")
    trace = _kill_after(args, tmp_path / "cut", 15)
    lines = trace.read_text().splitlines(keepends=True)
    lines[6] = '{"i": 7, "x": [0.1, garbage\n'
    trace.write_text("".join(lines) + '{"i": 99, "x": [0.')  # and a torn last line
    r = harness(*args)
    assert r.returncode == 0, r.stderr
    assert "line 7 is corrupt; resuming from the 6 rows before it" in r.stderr
    got, want = rows(tmp_path / "cut"), rows(tmp_path / "ref")
    assert [x["i"] for x in got] == list(range(1, 41))
    assert [x["x"] for x in got] == [x["x"] for x in want] and [x["loss"] for x in got] == [x["loss"] for x in want]
    assert (trace.parent / "trace.jsonl.corrupt").exists()


def test_a_torn_last_line_is_truncated_on_resume(tmp_path):
    args = quad(tmp_path, "-t", "delay=0.05", budget="30")
    trace = _kill_after(args, tmp_path, 8)
    with open(trace, "a") as f:
        f.write('{"i": 9, "x": [0.1')
    r = harness(*args)
    assert r.returncode == 0, r.stderr
    assert "corrupt" not in r.stderr
    assert [x["i"] for x in rows(tmp_path)] == list(range(1, 31))


def test_resume_checks_losses_where_proposals_ignore_them(tmp_path):
    args = ["run", "--task", "quadratic", "--searcher", "random", "-s", "mode=uniform", "--budget", "30",
            "-t", "dim=4", "-t", "delay=0.05", "--results-dir", str(tmp_path), "--quiet"]
    trace = _kill_after(args, tmp_path, 8)
    lines = trace.read_text().splitlines()
    first = json.loads(lines[0])
    first["loss"] = first["loss"] + 1.0  # as if the task had changed since the run started
    trace.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    one_line_error(harness(*args), "losses changed")


def test_a_clock_seeded_optimiser_is_flagged_and_its_resume_refused_without_loss(tmp_path):
    """NGOpt on a small bounded sequential problem delegates to CmaFmin2, which cma seeds from the
    clock: the run says it is not reproducible and records so, and resuming it is refused in one
    line naming why, with the trace left as it was."""
    args = ["run", "--task", "quadratic", "--searcher", "nevergrad", "--budget", "300", "-t", "dim=5",
            "--results-dir", str(tmp_path)]
    r = harness(*args)
    assert r.returncode == 0 and "not reproducible from its seed (CmaFmin2 runs the cma package's fmin" in r.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "record.json").read_text())
    assert record["searcher_info"]["reproducible"] is False and "CmaFmin2" in record["searcher_info"]["chosen"]
    trace = run_dir / "trace.jsonl"
    trace.write_text("".join(trace.read_text().splitlines(keepends=True)[:5]))
    (run_dir / "record.json").unlink()
    before = trace.read_bytes()
    one_line_error(harness(*args, "--quiet"), "cannot resume: CmaFmin2", "5 recorded evaluations", "--rerun")
    assert trace.read_bytes() == before and len(before.splitlines()) == 5
    seeded = harness(*args[:-2], "-s", "optimizer=CMA", "--results-dir", str(tmp_path / "cma"), "--quiet")
    assert seeded.returncode == 0 and "not reproducible" not in seeded.stderr


@pytest.fixture(scope="module")
def tiny_user_model(tmp_path_factory, tiny_open_clip):
    """The tiny open_clip model's folder and fine-tuned checkpoints for two built-in data sets, one
    of them holding a NaN."""
    from harness.checkpoints import save_state_dict
    model, folder = tiny_open_clip
    tmp = tmp_path_factory.mktemp("user")
    visual = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    good = {f"visual.{k}": v + 0.01 for k, v in visual.items()}
    save_state_dict(good, tmp / "skdigits.safetensors")
    bad = dict(good)
    bad["visual.conv1.weight"] = bad["visual.conv1.weight"].clone()
    bad["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_state_dict(bad, tmp / "lfw.safetensors")
    return tmp, folder


def test_a_nan_in_a_checkpoint_names_the_file_and_block(tmp_path, tiny_user_model):
    m, folder = tiny_user_model
    r = harness("run", "--searcher", "task-arithmetic", "-t", f"pretrained=local-dir:{folder}",
                "-t", f"checkpoints={m / 'skdigits.safetensors'},{m / 'lfw.safetensors'}",
                "-t", "source_options=max_n=100", "--results-dir", str(tmp_path), "--quiet")
    one_line_error(r, "lfw.safetensors", "conv1.weight", "non-finite")
    for rec in (tmp_path / "runs").glob("*/record.json"):
        assert json.loads(rec.read_text())["status"] == "failed"


def test_a_damaged_zoo_cache_is_rebuilt_not_trusted(tmp_path):
    small = "datasets=skdigits,lfw;max_n=200;pretrain_steps=5;ft_steps=3"
    args = ["run", "--searcher", "zero-shot", "-t", "source=tiny-clip", "-t", f"source_options={small}",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    first = harness(*args, "--results-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    (tensors,) = list((tmp_path / "cache").glob("tiny-clip-*.safetensors"))
    good = hashlib.sha256(tensors.read_bytes()).hexdigest()
    with open(tensors, "r+b") as f:  # 4 KB of zeros in the middle of the tensors
        f.seek(tensors.stat().st_size // 2)
        f.write(b"\0" * 4096)
    second = harness(*args, "--results-dir", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "does not match its checksum (damaged); rebuilding it" in second.stderr
    assert hashlib.sha256(tensors.read_bytes()).hexdigest() == good  # rebuilt to the same bytes
    ra, rb = (json.loads(next((tmp_path / d / "runs").glob("*/record.json")).read_text()) for d in "ab")
    assert ra["final"] == rb["final"]


def test_a_full_disk_is_one_clear_line_and_leaves_no_stray_files(tmp_path):
    """RLIMIT_FSIZE makes any write past 6 KB fail with EFBIG, as a full disk fails it with ENOSPC."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    args = [sys.executable, "-m", "harness", *quad(tmp_path, budget="200")]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "cannot write the trace of run" in r.stderr and "disk full?" in r.stderr and "Traceback" not in r.stderr
    (folder,) = list((tmp_path / "runs").iterdir())
    rec = json.loads((folder / "record.json").read_text())
    assert rec["status"] == "failed" and "cannot write the trace" in rec["error"]
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    # With space again, the same command resumes from the rows that were written.
    again = harness(*quad(tmp_path, budget="200"))
    assert again.returncode == 0 and "resuming run" in again.stderr
    assert [x["i"] for x in rows(tmp_path)] == list(range(1, 201))


def test_a_killed_zoo_builds_temporary_file_is_cleaned_up(tmp_path):
    from harness.sources.cache import _clean_stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".effnet-abc.safetensors.{dead.stdout.strip()}.tmp"
    live = tmp_path / f".effnet-abc.safetensors.{os.getpid()}.tmp"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    _clean_stale(tmp_path)
    assert not stale.exists() and live.exists()


def test_a_nevergrad_optimiser_out_of_memory_is_one_line():
    """Cobyla builds dense (dim × dim) matrices: on a million coefficients the allocation fails, and
    the searcher says so in one line with what to do instead of a numpy traceback."""
    from harness.api import Evaluation, HarnessError, Space
    from searchers.nevergrad_search import NevergradSearcher
    s = NevergradSearcher(Space(dim=1_000_000), 10, 1, 0, NevergradSearcher.Options(optimizer="Cobyla"))
    try:
        first = s.ask(1)  # the start, before scipy is called
        s.tell(first, [Evaluation(loss=1.0)])
        with pytest.raises(HarnessError, match=r"Cobyla ran out of memory on 1,000,000 coefficients .*DiagonalCMA"):
            s.ask(1)
    finally:
        s.close()
