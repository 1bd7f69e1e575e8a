"""The device is honoured end to end: a task set up on a device keeps every tensor of the
evaluation path there, and a device this machine cannot compute on is a one-line error.

Without a GPU the plumbing is checked on PyTorch's ``meta`` device: tensors there have shapes but
no values, and any operation that mixes a meta tensor with a CPU tensor raises, so a tensor left
behind on the CPU anywhere between the coefficients and the loss fails these tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import registry
from harness.api import Candidate, HarnessError
from harness.config import RunConfig, resolve_options
from harness.engines import check_device
from harness.objective import WeightedSet
from harness.problem import plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"source": "tiny-clip", "source_options": "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"}
CASES = {
    "addition": {"search_n": 16},
    "negation": {"target": "skdigits", "control": "lfw", "search_n": 16},
    "few_shot": {"target": "skdigits", "shots": 2, "augment": 1, "l1": 0.1},
    "tta-im": {"target": "skdigits", "max_n": 32, "objective": "im"},
    "tta-entropy": {"target": "skdigits", "max_n": 32, "objective": "entropy"},
    "tta-ufm": {"target": "skdigits", "max_n": 32, "objective": "ufm", "threshold": 0.0, "trusted_fraction": 1.0},
    "tta-simclr": {"target": "skdigits", "max_n": 32, "objective": "simclr", "batch_size": 8},
}
# Devices this machine can compute on: every value-checking test runs on each of them.
DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def _task(case, cache_dir, device, space="per_block", **extra):
    """``case``'s task set up on ``device``; ``extra`` task options override the case's."""
    name = case.split("-")[0]
    cls = registry.load("task", name)
    opts = resolve_options(cls, {**SMALL, **CASES[case], **extra}, "task")
    cls.validate(opts)
    task = cls(opts, space=space, seed=0, cache_dir=cache_dir)
    task.setup(device)
    return task


def _tensors(obj, seen=None):
    """Every tensor reachable from a task's own attributes (lists, dicts, WeightedSets)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, WeightedSet):
        for part in (obj.inputs, obj.labels, obj.weights):
            yield from _tensors(part)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


@pytest.mark.parametrize("case", list(CASES))
def test_no_tensor_of_the_evaluation_path_stays_on_the_cpu(case, cache_dir):
    task = _task(case, cache_dir, "meta")
    src, comp = task.source, task.comp
    held = list(_tensors(src.base)) + list(_tensors(src.heads)) + list(_tensors(src.inputs)) + list(_tensors(src.labels))
    held += list(src.tail.parameters()) + list(src.tail.buffers()) + list(comp.base.values()) + list(comp.tau)
    held += [t for k, v in vars(task).items() if k not in ("source", "comp", "engine", "options") for t in _tensors(v)]
    assert held and all(t.device.type == "meta" for t in held)
    dim = task.space().dim
    x = np.linspace(-0.3, 0.3, dim)
    # Whole-set scores, a shard, a population batch, a gradient step on a mini-batch, the final
    # metrics: every one runs through the merge and the forward on meta without touching the CPU.
    evs = task.evaluate([Candidate(x=x), Candidate(x=-x), Candidate(x=0 * x)])
    evs += task.evaluate([Candidate(x=x)], shard=(1, 2))
    g = task.evaluate([Candidate(x=x, grad=True, batch=3)])[0]
    assert len(evs) == 4 and g.grad.shape == (dim,)
    final = task.final(x)
    assert task.headline in final


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["addition", "negation", "tta-ufm"])
def test_losses_on_each_device_equal_the_cpu_ones(case, device, cache_dir):
    ref = _task(case, cache_dir, "cpu")
    task = _task(case, cache_dir, device)
    x = np.linspace(-0.3, 0.3, task.space().dim)
    a = ref.evaluate([Candidate(x=x, grad=True)])[0]
    b = task.evaluate([Candidate(x=x, grad=True)])[0]
    assert b.loss == pytest.approx(a.loss, rel=1e-4)
    assert np.allclose(b.grad, a.grad, rtol=1e-3, atol=1e-5)
    assert task.final(x) == pytest.approx(ref.final(x), abs=1e-6)


def test_device_names_are_checked():
    assert check_device("cpu") == "cpu"
    for bad in ("bogus", "cpu:1", "cuda:x", "meta", ""):
        with pytest.raises(HarnessError, match="unknown device"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="CUDA is not available here.*valid devices here: cpu"):
            check_device("cuda")
        with pytest.raises(HarnessError, match="CUDA is not available"):
            plan(RunConfig(task="quadratic", device="cuda:0"))


def test_gpu_workers_are_required_for_a_cuda_run_on_ray():
    with pytest.raises(HarnessError, match="needs --gpus-per-worker"):
        plan(RunConfig(task="quadratic", device="cuda", workers=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "bogus"])
def test_cli_refuses_a_device_it_cannot_use_before_recording_anything(device, tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "quadratic", "--device", device,
                        "--results-dir", str(tmp_path), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "device" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_what_the_engine_chooses_is_recorded_with_the_run(tmp_path, cache_dir):
    """A batch of several whole-set candidates makes the engine time vmap against sequential once;
    the choice reaches the run record through the task's task_info."""
    cfg = RunConfig(task="addition", searcher="task-arithmetic", budget=4, batch_size=4, seed=0,
                    task_options={**SMALL, "search_n": 16}, results_dir=str(tmp_path), cache_dir=cache_dir, quiet=True)
    from harness.runner import run
    rec = run(cfg, log=lambda m: None)
    note = rec["task_info"]["population"]
    assert note["candidates"] == 3 and note["chosen"] in ("vmap", "sequential")


def _precision_task(cache_dir, precision):
    return _task("addition", cache_dir, "cpu", precision=precision)


def test_bf16_autocast_is_measured_against_fp32_and_kept_only_within_tolerance(cache_dir, monkeypatch):
    from harness.engines import local
    ref, task = _precision_task(cache_dir, "fp32"), _precision_task(cache_dir, "bf16")
    x = np.linspace(-0.3, 0.3, task.space().dim)
    a, b = ref.evaluate([Candidate(x=x)])[0], task.evaluate([Candidate(x=x)])[0]
    note = task.task_info["precision"]
    assert note["asked"] == "bf16" and note["loss_fp32"] == pytest.approx(a.loss, rel=1e-6)
    assert note["loss_rel_err"] == pytest.approx(abs(note["loss_bf16"] - a.loss) / a.loss)
    kept = note["loss_rel_err"] <= local.LOSS_RTOL and note["acc_abs_err"] <= local.ACC_ATOL
    assert note["used"] == ("bf16" if kept else "fp32")
    assert b.loss == pytest.approx(note["loss_bf16"] if kept else a.loss, rel=1e-6)
    assert 0 < abs(note["loss_bf16"] - a.loss) / a.loss < 0.05  # bf16 really ran, and is close
    g = task.evaluate([Candidate(x=x, grad=True)])[0]                  # gradients run under autocast too
    assert np.isfinite(g.grad).all() and g.grad.shape == (len(x),)
    assert task.final(x) == ref.final(x)                               # accuracies are always fp32
    assert "precision" not in ref.task_info
    # A tolerance the measurement misses: the engine stays in fp32 and says so.
    monkeypatch.setattr(local, "LOSS_RTOL", 0.0)
    strict = _precision_task(cache_dir, "bf16")
    c = strict.evaluate([Candidate(x=x)])[0]
    assert strict.task_info["precision"]["used"] == "fp32" and c.loss == a.loss


def test_an_unknown_precision_is_one_line():
    with pytest.raises(HarnessError, match="precision='fp8' is not one of fp32, bf16, fp16"):
        plan(RunConfig(task="addition", task_options={"precision": "fp8"}))


def test_the_evaluation_chunk_is_sized_from_free_memory_and_settable():
    from harness.engines.local import choose_chunk, parse_chunk
    mb = 2**20
    assert choose_chunk(8000 * mb, 10 * mb) == 400            # half of 8000 MB at 10 MB an image
    assert choose_chunk(8000 * mb, 10 * mb, fraction=0.25) == 200
    assert choose_chunk(1000 * mb, 30 * mb) == 16             # 16.7 → a multiple of 8
    assert choose_chunk(10 * mb, 30 * mb) == 1                # never below one image
    assert choose_chunk(10**15, 1.0) == 4096                  # nor above the cap
    assert parse_chunk("auto") is None and parse_chunk("64") == 64 and parse_chunk(0) == 0
    with pytest.raises(HarnessError, match="eval_chunk must be auto or an integer >= 0"):
        parse_chunk("-3")
    with pytest.raises(HarnessError, match="eval_chunk must be auto or an integer"):
        plan(RunConfig(task="addition", task_options={"eval_chunk": "lots"}))


def test_a_set_evaluation_chunk_gives_the_same_scores_and_is_recorded(cache_dir):
    def task(chunk):
        return _task("addition", cache_dir, "cpu", eval_chunk=chunk)

    auto, small = task("auto"), task("5")
    x = np.linspace(-0.3, 0.3, auto.space().dim)
    a, b = auto.evaluate([Candidate(x=x)])[0], small.evaluate([Candidate(x=x)])[0]
    assert small.source.chunk_size == 5 and small.task_info["eval_chunk"] == {"asked": 5, "chunk": 5}
    assert "eval_chunk" not in auto.task_info               # auto on the CPU: the source's own chunking
    assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.metrics["acc"] == a.metrics["acc"]
    assert small.final(x) == pytest.approx(auto.final(x), abs=1e-9)
    fresh = task("7")                       # a set chunk holds from the first pass, even an accuracy
    fresh.final(x)
    assert fresh.source.chunk_size == 7 and fresh.task_info["eval_chunk"]["chunk"] == 7
    # The population pass shares a chunk sized by the engine between its candidates.
    pop = small.engine.population_ce([Candidate(x=x), Candidate(x=-x)], small.search)
    assert pop[0].loss == pytest.approx(a.loss, rel=1e-5)


def test_the_precision_check_scores_the_first_candidate_once_and_workers_adopt_it(cache_dir, monkeypatch):
    from harness.engines import local
    calls = []
    real = local.LocalEngine.weighted_ce
    monkeypatch.setattr(local.LocalEngine, "weighted_ce", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    task = _precision_task(cache_dir, "bf16")
    x = np.linspace(-0.3, 0.3, task.space().dim)
    ev = task.evaluate([Candidate(x=x)])[0]
    assert len(calls) == 2                                   # fp32 and bf16 once each; the kept one is returned
    note = task.task_info["precision"]
    assert ev.loss == note["loss_bf16" if note["used"] == "bf16" else "loss_fp32"]
    # Another engine of the run (a Ray worker) adopts the decision instead of checking on its shard.
    other = _precision_task(cache_dir, "bf16")
    other.engine.adopt_precision(note)
    calls.clear()
    ev2 = other.evaluate([Candidate(x=x)])[0]
    assert len(calls) == 1 and ev2.loss == ev.loss
    assert other.task_info["precision"]["adopted"] is True and other.task_info["precision"]["used"] == note["used"]
