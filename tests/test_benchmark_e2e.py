"""A ViT-B-32-shaped model (random weights; a one-layer text tower to keep the heads cheap) over a
``ta8`` fixture suite, end to end through the command line, in each data convention, with a
gradient searcher, a black-box searcher and a grid baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.data.suites import spec, suite
from tests.hfdata import make_hf

pytestmark = pytest.mark.slow  # make test-fast leaves these out

# ViT-B/32's image tower exactly (152 parameter blocks); a tiny text tower.
VIT_B32_IMAGE = {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64,
                                "mlp_ratio": 4.0},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """``(model folder, checkpoint folder)``: θ0 as a ``local-dir:`` folder and one fp16 image-tower
    checkpoint per ta8 task, named by the aTLAS convention (``CarsVal/finetuned.safetensors`` for
    Cars, ``<key>.safetensors`` for the rest) to exercise the suite's checkpoint search."""
    import open_clip
    from harness.checkpoints import save_state_dict
    root = tmp_path_factory.mktemp("vitb32")
    (root / "model").mkdir()
    (root / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_B32_IMAGE, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**VIT_B32_IMAGE)
    save_state_dict(dict(model.state_dict()), root / "model" / "open_clip_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for task in suite("ta8"):
        sd = {f"visual.{k}": (v + 0.01 * torch.randn(v.shape, generator=gen)).half()
              for k, v in model.visual.state_dict().items()}
        path = root / "ft" / ("CarsVal/finetuned.safetensors" if task == "stanford-cars" else f"{task}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(sd, path)
    assert len([n for n, _ in model.visual.named_parameters()]) == 152
    return root / "model", root / "ft"


def _hf_suite(root):
    for k, task in enumerate(suite("ta8")):
        make_hf(root, task, {"train": 10, "test": 2}, n_classes=min(spec(task).n_classes, 5), fmt="jpeg", seed=k)


def _tv_suite(root):
    from tests.benchdata import make_tv
    # MNIST and SVHN with one test image of each of their ten classes: a model that predicts one
    # class for everything (as random weights tend to) still scores 0.1, so the normalised
    # accuracy is defined. Cars: four images of each of three classes, so that it has a val image.
    kw = {"MNIST": dict(n_classes=10, per_class=1), "SVHN": dict(n_classes=10, per_class=1),
          "Cars": dict(per_class=4)}
    for task in suite("ta8"):
        make_tv(task, root, **kw.get(spec(task).name, {}))


CONVENTIONS = {"hf": _hf_suite, "tv": _tv_suite}
# Val and test images scored per data set: enough that some fine-tuned (random) model scores
# above zero, so the normalised accuracy is defined.
SUBSET = {"hf": 1, "tv": 10}


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_vit_b32_over_ta8_end_to_end(tmp_path, vit_b32, convention, capsys):
    model, ft = vit_b32
    data = tmp_path / "data"
    CONVENTIONS[convention](data)
    common = ["--task", "addition", "-t", "suite=ta8", "-t", f"pretrained=local-dir:{model}",
              "-t", f"checkpoints={ft}", "-t", f"data_convention={convention}", "-t", f"bench_subset={SUBSET[convention]}", "--data-root", str(data),
              "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    # Every searcher kind on the Parquet copy; the task_vectors layout is shown to give the same
    # splits and the same run as Parquet in tests/test_benchmark_data.py, so one kind suffices there.
    runs = {"gradient": ["--budget", "3", "-s", "validate_every=1"], "nevergrad": ["--budget", "3"],
            "task-arithmetic": ["-s", "points=3"]}
    if convention == "tv":
        runs = {"nevergrad": runs["nevergrad"]}
    for searcher, extra in runs.items():
        assert main(["run", "--searcher", searcher, *common, *extra]) == 0, searcher
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*/record.json")]
    assert sorted(r["config"]["searcher"] for r in records) == sorted(runs)
    for rec in records:
        assert rec["status"] == "complete"
        assert [k.removeprefix("acc/") for k in rec["final"] if k.startswith("acc/")] == suite("ta8")
        assert 0 <= rec["final"]["abs_acc"] <= 1 and np.isfinite(rec["final"]["normalized_acc"])
        bench = rec["family"]["benchmark"]
        assert bench["suite"] == "ta8" and set(bench["datasets"]) == set(suite("ta8"))
        assert {d["convention"] for d in bench["datasets"].values()} == {convention}
        assert all(d["scored_sizes"]["val"] <= SUBSET[convention] and d["scored_sizes"]["test"] <= SUBSET[convention]
                   for d in bench["datasets"].values())
        assert bench["architecture"] == "ViT-B/32"
    assert len({json.dumps(r["family"], sort_keys=True) for r in records}) == 1
    from harness.leaderboards import leaderboard
    board = leaderboard(tmp_path / "results")
    assert board["family"].str.contains("/ta8:").all()
    if convention == "hf":
        paper = dict(zip(board["searcher"], board["paper"]))
        assert paper["gradient"] == "84.98 / 93.79 (Table 2, aTLAS)"
        assert paper["task-arithmetic"] == "70.12 / 77.24 (Table 2, search)" and paper["nevergrad"] == ""
    # --device cuda on a machine without CUDA is one line, exit 2, nothing recorded.
    capsys.readouterr()
    assert main(["run", "--searcher", "nevergrad", "--device", "cuda", "--budget", "2", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cuda" in err.lower() and "\n" not in err
    assert len(list((tmp_path / "results" / "runs").glob("*/record.json"))) == len(runs)
