"""Zoos, model sources and fine-tuning, on small builds (two bundled data sets, few steps)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from harness.api import HarnessError
from harness.composition import Composition
from harness.data import available, to_tensor
from harness.finetune import finetune
from harness.sources.effnet import efficientnet_lite0
from harness.sources.cache import build_zoo, cache_root, get_zoo, zoo_info, zoo_path

DATASETS = ("skdigits", "lfw")  # bundled with scikit-learn / scikit-image: always offline
# One thread: on a shared 2-core machine two-thread torch ops slow down ~4x when another
# process competes for the cores (threads is a config field, so it is part of the cache key).
SMALL_EFFNET = dict(datasets=DATASETS, max_n=300, head_steps=30, ft_steps=4, ft_batch_size=32, threads=1)
SMALL_CLIP = dict(datasets=DATASETS, max_n=300, pretrain_steps=20, pretrain_batch_size=64,
                  ft_steps=10, ft_batch_size=32, threads=1)


@pytest.fixture(scope="module", autouse=True)
def _need_data():
    missing = [d for d in DATASETS if available()[d]]
    if missing:
        pytest.skip(f"data sets {missing} are not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="module")
def effnet(cache):
    return get_zoo("effnet", cache_dir=cache, progress=False, **SMALL_EFFNET)


@pytest.fixture(scope="module")
def clip(cache):
    return get_zoo("tiny-clip", cache_dir=cache, progress=False, **SMALL_CLIP)


def _clone(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_effnet_source_shape(effnet):
    assert effnet.kind == "linear" and effnet.datasets == list(DATASETS)
    assert effnet.meta["blocks"] == len(effnet.base) == 30
    assert effnet.meta["params"] == sum(v.numel() for v in effnet.base.values())
    assert not any(p.requires_grad for p in effnet.tail.parameters())
    assert not effnet.tail.training
    for ds in DATASETS:
        assert effnet.inputs[ds]["train"].shape[1:] == (192, 2, 2)  # output of block 12 at 64 px
        assert set(effnet.labels[ds]) == {"train", "val", "test"}
        assert effnet.heads[ds][0].shape == (len(effnet.classes[ds]), 1280)


def test_prefix_cache_equals_full_forward(effnet):
    net = efficientnet_lite0()
    images = effnet.images["skdigits"]["test"][:32]
    with torch.no_grad():
        full = net.extract_features(to_tensor(images, 64)).mean((2, 3))
        cached = effnet.features(effnet.base, effnet.inputs["skdigits"]["test"][:32])
        fresh = effnet.features(effnet.base, effnet.encode(images))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fresh, cached, rtol=0, atol=0)


def test_finetune_trains_only_the_tail(effnet):
    heads = {ds: (w.clone(), b.clone()) for ds, (w, b) in effnet.heads.items()}
    tail_before = _clone(dict(effnet.tail.named_parameters()))
    prefix_before = _clone(dict(effnet.prefix.named_parameters()))
    base_before = _clone(effnet.base)
    tv = finetune(effnet, "lfw", steps=3, batch_size=16, lr=1e-3, seed=0)
    for ds, (w, b) in effnet.heads.items():
        assert torch.equal(w, heads[ds][0]) and torch.equal(b, heads[ds][1])
    assert _equal(dict(effnet.tail.named_parameters()), tail_before)
    assert _equal(dict(effnet.prefix.named_parameters()), prefix_before)
    assert _equal(effnet.base, base_before)
    assert tv.keys() == effnet.base.keys()
    assert all(v.abs().max() > 0 for v in tv.values()), "every tail block should move"


def test_bn_running_stats_never_merged(effnet):
    buffers = _clone(dict(effnet.tail.named_buffers()))
    assert any(k.endswith("running_var") for k in buffers)
    assert not any(k in effnet.base for k in buffers), "BN statistics must not be blocks"
    tv = finetune(effnet, "skdigits", steps=2, batch_size=16, lr=1e-3, seed=0)
    comp = Composition(effnet.base, [tv, effnet.task_vectors["lfw"]], ["a", "b"])
    merged = comp.merge(comp.isotropic(0.7))
    effnet.logits(merged, effnet.inputs["lfw"]["val"], "lfw").sum()
    effnet.accuracy(merged, "lfw", "val")
    assert _equal(dict(effnet.tail.named_buffers()), buffers)


def test_build_is_deterministic(effnet, cache):
    again = build_zoo("effnet", cache_dir=cache, progress=False, force=True, **SMALL_EFFNET)
    assert "load_seconds" not in again.meta, "force=True rebuilds"
    for ds in DATASETS:
        assert _equal(again.task_vectors[ds], effnet.task_vectors[ds])
        assert torch.equal(again.heads[ds][0], effnet.heads[ds][0])
        assert _equal(again.inputs[ds], effnet.inputs[ds])


def test_cache_is_keyed_by_config(effnet, cache, capsys):
    first = zoo_path("effnet", cache, **SMALL_EFFNET)
    assert first.exists() and first.with_suffix(".json").exists()
    mtime = first.stat().st_mtime_ns
    reseeded = {**SMALL_EFFNET, "seed": 1}
    second = zoo_path("effnet", cache, **reseeded)
    assert second != first and not second.exists()
    other = get_zoo("effnet", cache_dir=cache, progress=False, **reseeded)
    assert second.exists() and "load_seconds" not in other.meta
    for ds in DATASETS:
        assert not torch.equal(other.task_vectors[ds]["_conv_head.weight"],
                               effnet.task_vectors[ds]["_conv_head.weight"])

    t0 = time.perf_counter()
    loaded = get_zoo("effnet", cache_dir=cache, progress=False, **SMALL_EFFNET)
    assert time.perf_counter() - t0 < 10 and "load_seconds" in loaded.meta
    assert first.stat().st_mtime_ns == mtime
    for ds in DATASETS:
        assert _equal(loaded.task_vectors[ds], effnet.task_vectors[ds])
        assert _equal(loaded.inputs[ds], effnet.inputs[ds])
        assert loaded.accuracy(loaded.finetuned(ds), ds) == effnet.meta["finetuned_acc"][ds]
    assert not [p for p in first.parent.iterdir() if ".tmp" in p.name], "no temporary files left"
    assert capsys.readouterr().err == "", "progress=False prints nothing"


def test_zoo_info(effnet, cache):
    df = zoo_info("effnet", cache_dir=cache, **SMALL_EFFNET)
    assert list(df.index) == list(DATASETS)
    assert {"zero_shot_acc", "finetuned_acc", "n_train", "n_val", "n_test"} <= set(df.columns)
    assert df.loc["lfw", "n_test"] == len(effnet.labels["lfw"]["test"])
    assert df.attrs["blocks"] == 30 and df.attrs["params"] == effnet.meta["params"]


def test_tiny_clip_heads_and_one_hot_composition(clip):
    assert clip.kind == "clip" and clip.normalize and clip.prefix is None
    scale = clip.meta["logit_scale"]
    for ds in DATASETS:
        w, b = clip.heads[ds]
        torch.testing.assert_close(w.norm(dim=1), torch.full((len(w),), scale), rtol=1e-5, atol=0)
        assert torch.equal(b, torch.zeros_like(b))
        assert clip.inputs[ds]["val"].shape[1:] == (3, 32, 32)
        torch.testing.assert_close(clip.inputs[ds]["val"], clip.encode(clip.images[ds]["val"]))
    comp = Composition(clip.base, [clip.task_vectors[d] for d in DATASETS], DATASETS)
    for i, ds in enumerate(DATASETS):
        assert clip.accuracy(comp.merge(comp.one_hot(i)), ds) == clip.meta["finetuned_acc"][ds]
    assert clip.accuracy(comp.merge(comp.isotropic(0.0)), "lfw") == clip.meta["zero_shot_acc"]["lfw"]


def test_missing_data_set_is_skipped_with_one_warning(cache, capsys, monkeypatch):
    import harness.sources.cache as zoo
    reasons = {**available(), "lfw": "data set 'lfw' is not installed: run `pip install scikit-image`"}
    monkeypatch.setattr(zoo, "available", lambda: reasons)
    source = get_zoo("tiny-clip", cache_dir=cache, progress=False, **SMALL_CLIP)
    assert source.datasets == ["skdigits"] and "lfw" in source.meta["skipped"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lfw" in err[0] and "pip install scikit-image" in err[0]


def test_errors_name_what_exists(cache):
    with pytest.raises(HarnessError, match="effnet, tiny-clip"):
        get_zoo("resnet", cache_dir=cache)
    with pytest.raises(HarnessError, match="ft_steps"):
        get_zoo("effnet", cache_dir=cache, ft_stpes=3)
    with pytest.raises(HarnessError, match="fashion"):
        get_zoo("effnet", cache_dir=cache, datasets=("mnist",))
    with pytest.raises(HarnessError, match="ft_steps"):
        get_zoo("effnet", cache_dir=cache, ft_steps="many")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_HARNESS_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("ATLAS_HARNESS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert str(cache_root()).endswith(".cache/atlas-harness")


def test_overrides_from_strings_match_typed(cache):
    assert (zoo_path("effnet", cache, datasets="skdigits,lfw", max_n="300", head_steps="30",
                     ft_steps="4", ft_batch_size="32", threads="1")
            == zoo_path("effnet", cache, **SMALL_EFFNET))


def test_from_checkpoints_with_image_folder_and_offline_set(tmp_path):
    from PIL import Image

    from harness.checkpoints import build_clip, save_state_dict
    from harness.sources.open_clip import from_checkpoints
    from harness.sources.tiny_clip import TinyClipConfig, register_tiny_clip

    name = register_tiny_clip(TinyClipConfig(), str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c, value in (("dark", 40), ("light", 210)):
            folder = tmp_path / "data" / "shades" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = np.clip(value + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model, _, _ = build_clip(name, None)
    save_state_dict(model.state_dict(), tmp_path / "base.safetensors")
    deltas, paths = [], []
    for i in range(2):
        delta = {k: 0.01 * torch.randn_like(v) for k, v in model.visual.named_parameters()}
        sd = {f"visual.{k}": v + delta.get(k, 0) for k, v in model.visual.state_dict().items()}
        save_state_dict(sd, tmp_path / f"ft{i}.safetensors")
        deltas.append(delta)
        paths.append(str(tmp_path / f"ft{i}.safetensors"))

    source = from_checkpoints(name, str(tmp_path / "base.safetensors"), paths, ["shades", "lfw"],
                              str(tmp_path / "data"), max_n=60)
    assert source.kind == "clip" and source.datasets == ["shades", "lfw"]
    assert source.classes["shades"] == ["dark", "light"]
    assert source.inputs["shades"]["test"].shape == (6, 3, 32, 32)
    scale = float(model.logit_scale.detach().exp())
    for i, ds in enumerate(source.datasets):
        torch.testing.assert_close(source.task_vectors[ds], deltas[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(source.heads[ds][0].norm(dim=1), torch.full((2,), scale))
        assert 0 <= source.meta["zero_shot_acc"][ds] <= 1 and ds in source.meta["finetuned_acc"]
    with pytest.raises(HarnessError, match="one fine-tuned checkpoint per data set"):
        from_checkpoints(name, None, paths[:1], ["shades", "lfw"], str(tmp_path / "data"))


def test_compact_inputs_score_like_fp32(tmp_path, tiny_open_clip):
    """User-model sources hold inputs as uint8 at the model's resolution (a quarter of fp32) and
    normalise them per chunk on the device: on image folders (read at the model's size) every
    logit is identical to the fp32 path; on a resized built-in set accuracy and logits agree to
    the rounding of one grey level."""
    import numpy as np
    from PIL import Image
    from harness.engines.local import LocalEngine, LocalOptions
    from harness.composition import Composition
    from harness.sources.open_clip import from_checkpoints
    _, folder = tiny_open_clip
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            (tmp_path / "data" / "blobs" / split / label).mkdir(parents=True)
            for j in range(5):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / "blobs" / split / label / f"{j}.png")
    kw = dict(datasets=["blobs", "skdigits"], data_root=str(tmp_path / "data"), max_n=120)
    small = from_checkpoints("", f"local-dir:{folder}", None, **kw)
    big = from_checkpoints("", f"local-dir:{folder}", None, compact=False, **kw)
    assert small.inputs["blobs"]["test"].dtype == torch.uint8 and big.inputs["blobs"]["test"].dtype == torch.float32
    assert small.meta["input_dtype"] == "torch.uint8"
    nbytes = [sum(x.numel() * x.element_size() for sp in s.inputs.values() for x in sp.values()) for s in (big, small)]
    assert nbytes[0] == 4 * nbytes[1] and small.meta["resident_inputs_mb"] == round(nbytes[1] / 2**20, 1)
    params = small.base
    assert torch.equal(small.logits(params, small.inputs["blobs"]["test"], "blobs"),
                       big.logits(params, big.inputs["blobs"]["test"], "blobs"))
    assert small.meta["zero_shot_acc"]["blobs"] == big.meta["zero_shot_acc"]["blobs"]
    diff = (small.prepare(small.inputs["skdigits"]["test"]) - big.inputs["skdigits"]["test"]).abs().max()
    assert 0 < float(diff) <= 0.5 / 255 / min(small.std) + 1e-6
    assert abs(small.meta["zero_shot_acc"]["skdigits"] - big.meta["zero_shot_acc"]["skdigits"]) <= 0.02
    # The engine's population (vmap) path normalises uint8 inputs too.
    gen = torch.Generator().manual_seed(0)
    tv = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    comp = Composition(params, [tv], ["blobs"], space="per_task")
    eng = LocalEngine(small, comp, "cpu", LocalOptions())
    x = small.inputs["blobs"]["test"]
    z = eng.population_features([comp.merge(np.array([0.5])), comp.merge(np.array([-0.5]))], x)
    torch.testing.assert_close(z[0], small.features(comp.merge(np.array([0.5])), x), rtol=1e-5, atol=1e-5)
