"""Task-vector transforms (harness/transforms/: ties, dare, iso) against hand-computed examples, and the baseline
searchers bound to them end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from harness import transforms
from harness.api import HarnessError

# Three task vectors over two blocks, "a" (3 entries) and "b" (2 entries). With k = 0.4 over the
# whole vector (d = 5) an entry is kept when its magnitude is at least the 3rd smallest magnitude:
#   τ1 = [4, -1, 0.5 | -3, 2]    magnitudes .5 1 2 3 4      threshold 2   → [4, 0, 0 | -3, 2]
#   τ2 = [-2, 3, -0.2 | 1, -2]   magnitudes .2 1 2 2 3      threshold 2   → [-2, 3, 0 | 0, -2]  (tie kept)
#   τ3 = [1.5, -2.5, 0.1 | 5, .5] magnitudes .1 .5 1.5 2.5 5 threshold 1.5 → [1.5, -2.5, 0 | 5, 0]
# Summed trimmed values [3.5, 0.5, 0 | 2, 0]: signs + + 0 + 0. Two entries sum to exactly 0; the
# majority sign (sign of 1+1+0+1+0) is +, so they are elected +. Agreeing entries:
#   entry 0: τ1 4, τ3 1.5 (2 agree)   entry 1: τ2 3 (1)   entry 2: none   entry 3: τ3 5 (1)   entry 4: τ1 2 (1)
TAUS = [[4, -1, 0.5, -3, 2], [-2, 3, -0.2, 1, -2], [1.5, -2.5, 0.1, 5, 0.5]]


def _tvs(rows=TAUS):
    return [{"a": torch.tensor(r[:3], dtype=torch.float32), "b": torch.tensor(r[3:], dtype=torch.float32)} for r in rows]


def _flat(tv):
    return torch.cat([tv["a"], tv["b"]]).tolist()


def _apply(spec, tvs=None, seed=0):
    return transforms.load(spec).apply(tvs or _tvs(), ["x", "y", "z"], seed)


def test_ties_mean_hand_computed():
    out, names, info = _apply("ties:k=0.4")
    assert names == ["x", "y", "z"]
    assert _flat(out[0]) == pytest.approx([2, 0, 0, 0, 2])      # entry 0 shared by two: 4 / 2
    assert _flat(out[1]) == pytest.approx([0, 3, 0, 0, 0])
    assert _flat(out[2]) == pytest.approx([0.75, 0, 0, 5, 0])
    merged = [sum(v) for v in zip(*map(_flat, out))]
    assert merged == pytest.approx([2.75, 3, 0, 5, 2])         # the disjoint mean
    assert info["zero_sign_entries"] == 1                     # entry 4 (2 - 2); entry 2 is all trimmed


def test_ties_sum_and_max_hand_computed():
    out, _, _ = _apply("ties:k=0.4,merge=sum")
    assert [sum(v) for v in zip(*map(_flat, out))] == pytest.approx([5.5, 3, 0, 5, 2])
    out, _, _ = _apply("ties:k=0.4,merge=max")
    assert _flat(out[0]) == pytest.approx([4, 0, 0, 0, 2]) and _flat(out[2]) == pytest.approx([0, 0, 0, 5, 0])
    assert [sum(v) for v in zip(*map(_flat, out))] == pytest.approx([4, 3, 0, 5, 2])


def test_ties_tensor_scope_hand_computed():
    # Per block with k = 0.4: block a (d = 3) keeps magnitudes >= the 2nd smallest, block b (d = 2)
    # only the largest. a: τ1 [4,-1,0] τ2 [-2,3,0] τ3 [1.5,-2.5,0] → signs + - 0; block a's majority
    # (1 - 1 + 0) is 0, so entry 2 stays unelected. b: τ1 [-3,0] τ2 [0,-2] τ3 [5,0] → signs + -.
    out, _, info = _apply("ties:k=0.4,scope=tensor")
    assert [sum(v) for v in zip(*map(_flat, out))] == pytest.approx([2.75, -1.75, 0, 5, -2])
    assert _flat(out[0]) == pytest.approx([2, -0.5, 0, 0, 0])
    assert info["zero_sign_entries"] == 0


def test_ties_k1_keeps_everything_and_inputs_are_untouched():
    tvs = _tvs()
    out, _, _ = transforms.load("ties:k=1,merge=sum").apply(tvs, ["x", "y", "z"], 0)
    assert _flat(tvs[0]) == pytest.approx(TAUS[0])
    # Entry 0 (4, -2, 1.5: sum +) keeps 4 and 1.5; entry 3 (-3, 1, 5: +) keeps 1 and 5.
    assert [sum(v) for v in zip(*map(_flat, out))][0] == pytest.approx(5.5)
    assert [sum(v) for v in zip(*map(_flat, out))][3] == pytest.approx(6.0)


def test_dare_masks_are_seeded_and_rescaled():
    gen = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(100, 100, generator=gen) + 5, "b": torch.randn(100, generator=gen) + 5} for _ in range(2)]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _, info = transforms.load("dare:p=0.3").apply(tvs, ["x", "y"], 7)
    assert torch.equal(torch.rand(3), before)  # torch's global generator was not drawn from
    b, _, _ = transforms.load("dare:p=0.3").apply(tvs, ["x", "y"], 7)
    c, _, _ = transforms.load("dare:p=0.3").apply(tvs, ["x", "y"], 8)
    assert all(torch.equal(a[i][k], b[i][k]) for i in range(2) for k in ("w", "b"))
    assert not torch.equal(a[0]["w"] != 0, c[0]["w"] != 0)   # another seed, another mask
    # Each task vector draws its own mask, even for equal content.
    same = [{k: v.clone() for k, v in tvs[0].items()}] * 2
    d, _, _ = transforms.load("dare:p=0.3").apply(same, ["x", "y"], 7)
    assert not torch.equal(d[0]["w"] != 0, d[1]["w"] != 0)
    kept = a[0]["w"] != 0
    assert torch.allclose(a[0]["w"][kept], tvs[0]["w"][kept] / 0.7)
    assert abs(info["kept_fraction"] - 0.7) < 0.02
    e, _, _ = transforms.load("dare:p=0.3,rescale=false,matrices_only=true").apply(tvs, ["x", "y"], 7)
    assert torch.equal(e[0]["b"], tvs[0]["b"])                # 1-D blocks untouched
    kept = e[0]["w"] != 0
    assert torch.equal(e[0]["w"][kept], tvs[0]["w"][kept])


def test_iso_hand_computed_and_flat_spectrum():
    tvs = [{"w": torch.tensor([[1.0, 0], [0, 1]]), "b": torch.tensor([1.0, 2])},
           {"w": torch.tensor([[2.0, 0], [0, 0]]), "b": torch.tensor([3.0, -1])}]
    out, names, info = transforms.load("iso").apply(tvs, ["x", "y"], 0)
    assert names == ["iso"] and len(out) == 1
    # Σ τ = diag(3, 1): singular values 3, 1 → both become their mean 2.
    assert torch.allclose(out[0]["w"], torch.tensor([[2.0, 0], [0, 2]]), atol=1e-6)
    assert out[0]["b"].tolist() == [4.0, 1.0]                 # 1-D: summed as in task arithmetic
    out, _, _ = transforms.load("iso:other=mean").apply(tvs, ["x", "y"], 0)
    assert out[0]["b"].tolist() == [2.0, 0.5]
    gen = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(12, 5, generator=gen), "conv": torch.randn(4, 3, 2, 2, generator=gen)} for _ in range(3)]
    out, _, info = transforms.load("iso").apply(tvs, ["x", "y", "z"], 0)
    total = sum(tv["w"] for tv in tvs)
    s = torch.linalg.svdvals(out[0]["w"])
    assert torch.allclose(s, torch.full_like(s, float(torch.linalg.svdvals(total).mean())), rtol=1e-5)
    s = torch.linalg.svdvals(out[0]["conv"].reshape(4, -1))
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-5) and info["matrices"] == 2
    out, _, _ = transforms.load("iso:conv=other").apply(tvs, ["x", "y", "z"], 0)
    assert torch.allclose(out[0]["conv"], sum(tv["conv"] for tv in tvs))


@pytest.mark.parametrize("spec,message", [
    ("bogus", "unknown transform 'bogus'; valid transforms: cart, consensus, dare, iso, iso-cts, matrices, ties, tsvm, wudi"),
    ("ties:k=0", "transform option k must be > 0, <= 1, got 0.0"),
    ("ties:scope=row", "transform option scope='row' is not one of global, tensor"),
    ("ties:q=1", "unknown transform 'ties' option 'q'"),
    ("dare:p=1", "transform option p must be >= 0, < 1, got 1.0"),
    ("iso:other=max", "transform option other='max' is not one of sum, mean"),
    ("ties:k", "bad transform option 'k'"),
])
def test_bad_transform_specs(spec, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        transforms.canonical(spec)


def test_canonical_form():
    assert transforms.canonical("ties") == "ties"
    assert transforms.canonical("ties:merge=sum,k=0.2") == "ties:merge=sum"
    assert transforms.canonical("ties: k = 0.1 , scope=tensor") == "ties:k=0.1,scope=tensor"
    assert transforms.canonical("dare:rescale=False") == "dare:rescale=false"


# ----------------------------------------------------------------------------- end to end

SMALL_ZOO = "datasets=skdigits,lfw;max_n=400;pretrain_steps=40;ft_steps=15"


def _run(tmp_path, cache_dir, searcher, **kw):
    from harness.config import RunConfig
    from harness.runner import run
    opts = {"source": "tiny-clip", "source_options": SMALL_ZOO, "search_n": 32, **kw.pop("task_options", {})}
    cfg = RunConfig(task="addition", searcher=searcher, seed=0, task_options=opts, results_dir=str(tmp_path),
                    cache_dir=cache_dir, quiet=True, **kw)
    return run(cfg, log=lambda m: None)


def test_baseline_searchers_compose_their_transform(tmp_path, cache_dir):
    from harness.leaderboards import leaderboard
    ta = _run(tmp_path, cache_dir, "task-arithmetic")
    ties = _run(tmp_path, cache_dir, "ties")
    iso = _run(tmp_path, cache_dir, "iso")
    dare = _run(tmp_path, cache_dir, "dare", task_options={"transform": "dare:p=0.2"})
    assert ties["config"]["task_options"]["transform"] == "ties"
    assert dare["config"]["task_options"]["transform"] == "dare:p=0.2"
    assert ties["task_info"]["transform"]["kept_fraction"] < 0.2 + 1e-3   # top 20 %, minus disagreeing entries
    assert iso["task_vectors"] == ["iso"] and ta["task_vectors"] == ["skdigits", "lfw"]
    assert any(k.startswith("task arithmetic over ties (α=") for k in ties["references"])
    # The transform is part of the run's identity: the same searcher on raw vectors is another run.
    assert ties["run_id"] != ta["run_id"]
    board = leaderboard(tmp_path)
    assert dict(zip(board["searcher"], board["transform"])) == {
        "task-arithmetic": "—", "ties": "ties", "iso": "iso", "dare": "dare:p=0.2"}
    assert all(board["task"] == "addition")   # the transform is its own column, not in the task label


def test_gradient_over_ties_vectors(tmp_path, cache_dir):
    """aTLAS over TIES-transformed task vectors: a different composition, recorded and resumable."""
    raw = _run(tmp_path, cache_dir, "gradient", space="per_block", budget=6)
    ties = _run(tmp_path, cache_dir, "gradient", space="per_block", budget=6, task_options={"transform": "ties:k=0.5"})
    assert ties["run_id"] != raw["run_id"] and ties["config"]["task_options"]["transform"] == "ties:k=0.5"
    assert ties["final"]["normalized_acc"] > 0 and ties["status"] == "complete"
    from harness.api import HarnessError
    with pytest.raises(HarnessError, match="searcher 'iso' merges 'iso' task vectors, but -t transform=ties"):
        _run(tmp_path, cache_dir, "iso", task_options={"transform": "ties"})


def test_ties_when_even_the_majority_sign_is_zero():
    """One block, k = 1: entries 0 and 1 cancel exactly (2 − 2, −1 + 1), entry 2 is +3 and entry 3
    is −3, so the elected signs are 0 0 + − and their sum, the majority sign, is 0 too. As in
    FusionBench's disjoint merge, such entries keep their negative values under sum and mean and
    nothing under max."""
    tvs = [{"w": torch.tensor([2.0, -1, 3, 0])}, {"w": torch.tensor([-2.0, 1, 0, -3])}]
    merged = {m: sum(o["w"] for o in transforms.load(f"ties:k=1,merge={m}").apply(tvs, ["x", "y"], 0)[0]).tolist()
              for m in ("sum", "mean", "max")}
    assert merged == {"sum": [-2.0, -1.0, 3.0, -3.0], "mean": [-2.0, -1.0, 3.0, -3.0], "max": [0.0, 0.0, 3.0, -3.0]}


def test_ties_exclude_leaves_blocks_out_of_the_ranking():
    """Excluding block b is TIES on block a alone (d = 3, k = 0.4: ⌊1.2⌋ = 1 kept, threshold the 2nd
    smallest magnitude), with b passed through unchanged."""
    out, _, info = _apply("ties:k=0.4,merge=sum,exclude=^b$")
    alone, _, _ = transforms.load("ties:k=0.4,merge=sum").apply([{"a": tv["a"]} for tv in _tvs()], ["x", "y", "z"], 0)
    assert all(torch.equal(o["a"], a["a"]) for o, a in zip(out, alone))
    assert all(torch.equal(o["b"], tv["b"]) for o, tv in zip(out, _tvs()))
    assert list(out[0]) == ["a", "b"] and info["excluded_blocks"] == 1
    with pytest.raises(HarnessError, match="exclude is not a regular expression"):
        transforms.canonical("ties:exclude=(")
    with pytest.raises(HarnessError, match="exclude='.' leaves out every block"):
        _apply("ties:exclude=.")


def test_grid_budget_follows_the_number_of_points():
    from harness.config import build_config
    from harness.problem import plan
    assert plan(build_config({"searcher": "ties", "searcher_options": {"hi": 4, "points": 41}})).config.budget == 41
    assert plan(build_config({"searcher": "task-arithmetic"})).config.budget == 21
    assert plan(build_config({"searcher": "iso", "budget": 5})).config.budget == 5
