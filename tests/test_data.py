"""The offline data sets, the image-folder loader and tensor conversion.

The built-in data sets are installed by the project setup, so a missing one fails here.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from harness import data
from harness.api import HarnessError

N_CLASSES = {"fashion": 10, "animals": 10, "cvdigits": 10, "skdigits": 10, "lfw": 2, "textures": 8}


def test_every_offline_set_is_available():
    assert set(N_CLASSES) == set(data.OFFLINE)
    assert data.available() == {name: None for name in data.OFFLINE}


@pytest.mark.parametrize("name", data.OFFLINE)
def test_offline_set_loads(name):
    ds = data.load(name, seed=0, max_n=600)
    assert ds.name == name
    assert len(ds.classes) == N_CLASSES[name] == len(set(ds.classes))
    assert list(ds.splits) == list(data.SPLITS)
    sizes = [len(ds.split(s)[1]) for s in data.SPLITS]
    assert sum(sizes) == min(600, len(data._raw(name)[1]))
    for split in data.SPLITS:
        images, labels = ds.split(split)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert images.ndim in (3, 4) and len(images) == len(labels) > 0
        assert labels.min() >= 0 and labels.max() < len(ds.classes)
        assert images.max() > images.min()  # not blank
    # The whole raw set uses every class, so label ranges and class names agree.
    assert np.unique(data._raw(name)[1]).tolist() == list(range(N_CLASSES[name]))


@pytest.mark.parametrize("name", ["lfw", "textures"])
def test_splits_are_disjoint_and_seeded(name):
    a, b, c = data.load(name, seed=0), data.load(name, seed=0), data.load(name, seed=1)
    joined = np.concatenate([a.indices[s] for s in data.SPLITS])
    assert len(np.unique(joined)) == len(joined)
    for split in data.SPLITS:
        np.testing.assert_array_equal(a.split(split)[0], b.split(split)[0])
        np.testing.assert_array_equal(a.split(split)[1], b.split(split)[1])
        np.testing.assert_array_equal(a.split(split)[0], data._raw(name)[0][a.indices[split]])
    assert not np.array_equal(a.indices["test"], c.indices["test"])


def test_fractions_and_max_n():
    ds = data.load("lfw", max_n=100, fractions=(0.1, 0.5, 0.2, 0.2))
    assert [len(ds.split(s)[1]) for s in data.SPLITS] == [10, 50, 20, 20]
    with pytest.raises(HarnessError, match="summing to 1"):
        data.load("lfw", fractions=(0.5, 0.5, 0.5, 0.5))
    with pytest.raises(HarnessError, match="empty"):
        data.load("lfw", max_n=3)


def test_returned_arrays_do_not_alias_the_cache():
    images, _ = data.load("lfw").split("train")
    images[:] = 0
    assert data.load("lfw").split("train")[0].max() > 0


def test_unknown_name_lists_valid_names():
    with pytest.raises(HarnessError) as err:
        data.load("imagenet")
    message = str(err.value)
    assert "imagenet" in message and all(name in message for name in data.OFFLINE)


def test_unknown_split_lists_splits():
    with pytest.raises(HarnessError, match="pretrain, train, val, test"):
        data.load("lfw").split("validation")


def test_missing_data_set_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
    reason = data.available()["fashion"]
    assert reason == "data set 'fashion' is not installed: run `sudo apt-get install dataset-fashion-mnist`"
    with pytest.raises(data.DatasetUnavailable, match="dataset-fashion-mnist"):
        data.load("fashion")


def _write_tree(root, layout):
    """layout: {split: {class: number of images}}; each image's colour encodes its class."""
    colours = {"cat": (200, 0, 0), "dog": (0, 0, 200)}
    for split, counts in layout.items():
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 12), colours[cls]).save(root / split / cls / f"{i}.png")


def test_image_folder_labels_are_consistent(tmp_path):
    # "val" lacks "cat", so a per-split class list would give "dog" label 0 there.
    _write_tree(tmp_path, {"train": {"cat": 2, "dog": 3}, "val": {"dog": 2}})
    ds = data.load_image_folder(str(tmp_path), name="pets", size=16)
    assert ds.name == "pets" and ds.classes == ["cat", "dog"] and list(ds.splits) == ["train", "val"]
    for split in ds.splits:
        images, labels = ds.split(split)
        assert images.shape == (len(labels), 16, 16, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64
        red_is_cat = images[:, 8, 8, 0] > images[:, 8, 8, 2]
        np.testing.assert_array_equal(labels, np.where(red_is_cat, 0, 1))
    assert ds.split("val")[1].tolist() == [1, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        data.load_image_folder(str(tmp_path / "nowhere"))
    with pytest.raises(HarnessError, match="no split folders"):
        data.load_image_folder(str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(HarnessError, match="no .* images"):
        data.load_image_folder(str(tmp_path))


def test_to_tensor_shapes_and_range():
    gray = np.array([[[0, 255], [255, 0]]], dtype=np.uint8).repeat(4, axis=0)
    x = data.to_tensor(gray, size=8)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])  # grayscale repeated
    flat = data.to_tensor(np.full((2, 5, 5, 3), 255, np.uint8), size=5, mean=(0, 0.5, 1), std=1)
    assert flat.shape == (2, 3, 5, 5)
    torch.testing.assert_close(flat[0, :, 0, 0], torch.tensor([1.0, 0.5, 0.0]))
    assert data.to_tensor(np.zeros((1, 6, 6, 3), np.uint8), size=3, channels=1).shape == (1, 1, 3, 3)
    with pytest.raises(HarnessError, match="uint8"):
        data.to_tensor(np.zeros((1, 4, 4), np.float32), size=4)
