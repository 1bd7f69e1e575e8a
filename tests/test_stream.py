"""Streamed splits (harness/stream.py): open_clip's preprocessing bit for bit, order, worker
processes, and a run whose test split is streamed scoring exactly what the in-memory run scores."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.api import HarnessError
from harness.sources.base import ModelSource
from harness.stream import ArraySplit, FolderSplit, uint8_transform

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, seed: int, level: int) -> list[Path]:
    """``n`` images of mixed sizes, aspect ratios, modes and formats (PNG/JPEG, RGB/L/RGBA/P)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        mean = level + rng.uniform(-90, 90)  # classes overlap, so accuracies are neither 0 nor 1
        px = np.clip(mean + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(px)
        mode, ext = [("RGB", ".png"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".jpg")][j % 5]
        im = im.convert(mode) if mode != "P" else im.quantize(16)
        path = folder / f"{j:03d}{ext}"
        im.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image-folder data sets with small search splits and a larger test split."""
    root = tmp_path_factory.mktemp("stream")
    for k, name in enumerate(("blobs", "stripes")):
        for i, (split, n) in enumerate((("train", 4), ("val", 4), ("test", 30))):
            for j, (label, level) in enumerate((("light", 140), ("dark", 110))):
                _images(root / name / split / label, n, seed=100 * k + 10 * i + j, level=level + 10 * k)
    return root


def _open_clip_eval(size=32):
    from open_clip.transform import image_transform
    return image_transform(size, is_train=False)


def test_uint8_half_then_device_normalisation_is_open_clips_preprocessing_bit_for_bit(tmp_path):
    from PIL import Image
    pre = _open_clip_eval(32)
    transform, mean, std = uint8_transform(pre)
    norm = SimpleNamespace(mean=mean, std=std)
    for path in _images(tmp_path, 10, seed=3, level=120):
        with Image.open(path) as im:
            want = pre(im)
            u8 = transform(im)
        assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
        assert torch.equal(ModelSource.prepare(norm, u8[None])[0], want), path.name


def test_transform_of_another_shape_is_not_split():
    from torchvision.transforms import Compose, Resize, ToTensor
    assert uint8_transform(Compose([Resize(8), ToTensor()])) is None
    assert uint8_transform(lambda im: im) is None


def test_streamed_batches_keep_file_order_with_workers_and_shut_them_down(tmp_path):
    transform, _, _ = uint8_transform(_open_clip_eval(32))
    files = _images(tmp_path, 23, seed=5, level=90)
    split = FolderSplit(files, transform, 32, workers=2)
    before = set(multiprocessing.active_children())
    batches = list(split.batches(5, "cpu"))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(batches), split[np.arange(23)])          # same order as reading one by one
    assert torch.equal(split[[7, 2]], torch.stack([split[7], split[2]]))  # fancy indexing, any order
    assert torch.equal(split[torch.tensor([22])][0], split[-1])
    assert set(multiprocessing.active_children()) <= before              # workers gone after a full pass
    gen = split.batches(4, "cpu")
    next(gen)
    assert len(set(multiprocessing.active_children()) - before) == 2      # two worker processes running
    gen.close()                                                          # a pass abandoned half-way
    assert set(multiprocessing.active_children()) <= before
    with pytest.raises(IndexError):
        split[23]


def test_unreadable_file_is_one_line(tmp_path):
    transform, _, _ = uint8_transform(_open_clip_eval(32))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(HarnessError, match="cannot read image .*broken.png"):
        FolderSplit([bad], transform, 32, workers=0)[0]


def test_fingerprint_follows_files_and_transform(tmp_path):
    import os
    transform, _, _ = uint8_transform(_open_clip_eval(32))
    files = _images(tmp_path, 3, seed=1, level=100)
    a = FolderSplit(files, transform, 32).fingerprint()
    assert FolderSplit(files, transform, 32).fingerprint() == a
    assert FolderSplit(files[:2], transform, 32).fingerprint() != a
    assert FolderSplit(files, transform, 32, description="another").fingerprint() != a
    os.utime(files[0], ns=(1, 1))  # an edited file
    assert FolderSplit(files, transform, 32).fingerprint() != a


def test_array_split_resizes_per_batch_exactly_as_the_whole_split():
    from harness.data import load, to_uint8
    x, _ = load("skdigits", seed=0, max_n=200).split("test")
    lazy = ArraySplit(x, 24)
    assert torch.equal(torch.cat(list(lazy.batches(7))), to_uint8(x, 24))
    assert lazy.hwc() is x


def _run(model_dir, data_root, results, *extra):
    cmd = [sys.executable, "-m", "harness", "run", "--task", "addition", "--searcher", "nevergrad",
           "--budget", "4", "--quiet", "-t", f"pretrained=local-dir:{model_dir}", "--data-root", str(data_root),
           "-t", "checkpoints=blobs={0}/blobs.safetensors,stripes={0}/stripes.safetensors".format(results.parent / "ft"),
           "--results-dir", str(results), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(next(results.glob("runs/*/record.json")).read_text())


def test_a_run_with_its_test_split_streamed_scores_what_the_in_memory_run_scores(tiny_open_clip, folders, tmp_path):
    from harness.checkpoints import save_state_dict
    model, folder = tiny_open_clip
    gen = torch.Generator().manual_seed(2)
    (tmp_path / "ft").mkdir()
    visual = {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    for name in ("blobs", "stripes"):
        save_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in visual.items()},
                        tmp_path / "ft" / f"{name}.safetensors")
    memory = _run(folder, folders, tmp_path / "memory")
    streamed = _run(folder, folders, tmp_path / "streamed", "-t", "source_options=max_resident_mb=0.1;loader_workers=2")
    image_mb = 3 * 32 * 32 / 2**20
    assert memory["resident_inputs_mb"] == pytest.approx(2 * 76 * image_mb, abs=0.06)   # every split of both
    assert streamed["resident_inputs_mb"] == pytest.approx(2 * 16 * image_mb, abs=0.06)  # train and val only
    assert streamed["streamed_inputs_mb"] == pytest.approx(2 * 60 * image_mb, abs=0.06)
    assert streamed["streamed_splits"] == {"blobs": ["test"], "stripes": ["test"]}
    assert memory.get("streamed_splits") in (None, {})
    for key in ("final", "best_search_loss", "references"):
        assert streamed[key] == memory[key], key
    # The budget cannot hold the search splits: a one-line error, exit 2.
    r = subprocess.run([sys.executable, "-m", "harness", "run", "--task", "addition", "--searcher", "nevergrad",
                        "--budget", "2", "-t", f"pretrained=local-dir:{folder}", "--data-root", str(folders),
                        "-t", f"checkpoints=blobs={tmp_path}/ft/blobs.safetensors,stripes={tmp_path}/ft/stripes.safetensors",
                        "-t", "source_options=max_resident_mb=0.01", "--results-dir", str(tmp_path / "small")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 2 and "max_resident_mb=0.01" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_to_uint8_at_the_models_size_equals_the_float_round_trip():
    from harness.data import to_tensor, to_uint8
    x = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    slow = (to_tensor(x, 16, mean=0.0, std=1.0) * 255).round_().clamp_(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8(x, 16), slow)
    assert to_uint8(x, 8).shape == (5, 3, 8, 8)  # a resize still takes the float path
