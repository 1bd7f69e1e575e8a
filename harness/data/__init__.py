"""Offline image-classification data sets, a loader for image folders, and tensor conversion.

Every data set is uint8 images, (N,H,W) grayscale or (N,H,W,3) RGB, with int64 labels and
human-readable class names (they end up in CLIP prompts such as "a photo of a {c}"). Nothing here
touches the network: the built-in sets come from Debian packages or from files bundled inside
Python packages.

Example:
    >>> ds = load("fashion", seed=1)
    >>> images, labels = ds.split("train")
    >>> x = to_tensor(images, size=64)          # float (N,3,64,64), normalised to [-1, 1]
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from harness.api import HarnessError

if TYPE_CHECKING:
    import torch

OFFLINE: tuple[str, ...] = ("fashion", "animals", "cvdigits", "skdigits", "lfw", "textures")
SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CV_DIGITS_PNG = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
# skimage.data image name -> class name that reads well after "a photo of a".
_TEXTURES = {"brick": "brick wall", "grass": "grass", "gravel": "gravel", "moon": "moon surface",
             "camera": "cameraman", "text": "printed text", "page": "book page", "coins": "coins"}
_TEXTURE_PATCH, _TEXTURE_PER_CLASS, _TEXTURE_SEED = 32, 400, 0
_DIGITS = tuple(str(i) for i in range(10))


class DatasetUnavailable(HarnessError):
    """A built-in data set whose files are not installed; the message says how to install them."""

    def __init__(self, name: str, install: str):
        super().__init__(f"data set '{name}' is not installed: run `{install}`")
        self.name, self.install = name, install


@dataclass
class Dataset:
    """Images and labels in named splits (a subset of ``SPLITS``), plus the class names.

    ``indices`` gives, for ``load()``, each split's positions in the raw data set, so that
    disjointness and provenance can be checked; it is empty for image folders.
    """

    name: str
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    indices: dict[str, np.ndarray] = field(default_factory=dict)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` of one split; an unknown split is a HarnessError."""
        if name not in self.splits:
            raise HarnessError(f"data set '{self.name}' has no split '{name}'; "
                               f"it has {', '.join(self.splits)}")
        return self.splits[name]

    def __repr__(self) -> str:  # the default repr would print the arrays
        sizes = " ".join(f"{s}={len(y)}" for s, (_, y) in self.splits.items())
        return f"Dataset({self.name!r}, {len(self.classes)} classes, {sizes})"


def _in_package(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it (importing skimage or
    sklearn takes about a second, and ``available()`` should be cheap)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.zeros(1).__reduce__()[0]  # the public route to numpy's _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain numpy array")


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST format): magic, dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion():
    x = np.concatenate([_read_idx(FASHION_DIR / f) for f in _FASHION_FILES[0::2]])
    y = np.concatenate([_read_idx(FASHION_DIR / f) for f in _FASHION_FILES[1::2]])
    return x, y


def _animals():
    arrays = []
    for f in _ANIMAL_FILES:
        with gzip.open(_in_package("animal_mnist", "data", "Animal_MNIST", f), "rb") as fh:
            arrays.append(np.asarray(_NumpyUnpickler(fh).load()))
    return arrays[0], arrays[1]


def _cvdigits():
    from PIL import Image
    with Image.open(CV_DIGITS_PNG) as im:
        sheet = np.asarray(im.convert("L"))
    # 50 rows x 100 columns of 20x20 digits; each digit fills 5 consecutive rows.
    x = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    return x, np.repeat(np.arange(10), 500)


def _skdigits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.rint(d.images * (255 / 16)), d.target  # pixel values are 0..16


def _lfw():
    import skimage.data
    x = skimage.data.lfw_subset()  # floats in 0..1: 100 faces, then 100 non-faces
    return np.rint(x * 255), np.repeat([0, 1], 100)


def _textures():
    import skimage.data
    rng = np.random.default_rng(_TEXTURE_SEED)  # fixed, so the raw set is the same every time
    p, patches = _TEXTURE_PATCH, []
    for image_name in _TEXTURES:
        im = getattr(skimage.data, image_name)()
        for _ in range(_TEXTURE_PER_CLASS):
            i, j = rng.integers(0, im.shape[0] - p), rng.integers(0, im.shape[1] - p)
            patches.append(im[i:i + p, j:j + p])
    return np.stack(patches), np.repeat(np.arange(len(_TEXTURES)), _TEXTURE_PER_CLASS)


@dataclass(frozen=True)
class _Source:
    classes: tuple[str, ...]
    install: str
    needs: Callable[[], list[Path | None]]  # files that must exist (None: package missing)
    read: Callable[[], tuple[np.ndarray, np.ndarray]]


_SKIMAGE = "pip install scikit-image"
_SOURCES: dict[str, _Source] = {
    "fashion": _Source(
        ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
         "ankle boot"), "sudo apt-get install dataset-fashion-mnist",
        lambda: [FASHION_DIR / f for f in _FASHION_FILES], _fashion),
    "animals": _Source(
        ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"),
        "pip install --no-deps animal-mnist==0.4",
        lambda: [_in_package("animal_mnist", "data", "Animal_MNIST", f) for f in _ANIMAL_FILES],
        _animals),
    "cvdigits": _Source(_DIGITS, "sudo apt-get install opencv-doc", lambda: [CV_DIGITS_PNG],
                        _cvdigits),
    "skdigits": _Source(_DIGITS, "pip install scikit-learn",
                        lambda: [_in_package("sklearn", "datasets", "data", "digits.csv.gz")],
                        _skdigits),
    "lfw": _Source(("face", "not a face"), _SKIMAGE,
                   lambda: [_in_package("skimage", "data", "lfw_subset.npy")], _lfw),
    "textures": _Source(tuple(_TEXTURES.values()), _SKIMAGE,
                        lambda: [_in_package("skimage", "data", f"{n}.png") for n in _TEXTURES],
                        _textures),
}


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise HarnessError(f"unknown data set '{name}'; valid names: {', '.join(OFFLINE)} "
                           "(for a folder of images use load_image_folder)")
    return _SOURCES[name]


def _missing(name: str) -> str | None:
    source = _source(name)
    if all(p is not None and p.is_file() for p in source.needs()):
        return None
    return str(DatasetUnavailable(name, source.install))


@functools.lru_cache(maxsize=None)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of one built-in set, parsed once per process (Fashion-MNIST is 70k images).
    The arrays are read-only because every caller shares them."""
    x, y = _SOURCES[name].read()
    x, y = np.asarray(x).astype(np.uint8), np.asarray(y).astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def available() -> dict[str, str | None]:
    """Map each built-in data set to None if it can be loaded, else a one-line reason.

    Only checks that the files exist; nothing is parsed.
    """
    return {name: _missing(name) for name in OFFLINE}


def load(name: str, seed: int = 0, max_n: int | None = 4000,
         fractions: Sequence[float] = (0.15, 0.45, 0.15, 0.25)) -> Dataset:
    """Load a built-in data set as a random subset split into pretrain/train/val/test.

    Args:
        name: one of ``OFFLINE``.
        seed: picks the subset and the split; the same seed always gives the same arrays.
        max_n: keep at most this many samples in total (None: all of them).
        fractions: shares of the pretrain, train, val and test splits; they must sum to 1.
    """
    source = _source(name)
    if _missing(name) is not None:
        raise DatasetUnavailable(name, source.install)
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (len(SPLITS),) or (fractions <= 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise HarnessError(f"fractions must be {len(SPLITS)} positive numbers summing to 1 "
                           f"(for {', '.join(SPLITS)}), got {fractions.tolist()}")
    if max_n is not None and max_n < 1:
        raise HarnessError(f"max_n must be at least 1 or None, got {max_n}")
    x, y = _raw(name)
    # Seeded by the name's position, not hash(name): hash() of a str changes between processes.
    rng = np.random.default_rng([seed, OFFLINE.index(name)])
    order = rng.permutation(len(y))[:max_n]
    edges = np.rint(np.cumsum(fractions)[:-1] * len(order)).astype(int)
    indices = dict(zip(SPLITS, np.split(order, edges)))
    if empty := [s for s, idx in indices.items() if len(idx) == 0]:
        raise HarnessError(f"{len(order)} samples of '{name}' leave split(s) {', '.join(empty)} "
                           "empty; raise max_n or the fractions")
    splits = {s: (x[idx], y[idx]) for s, idx in indices.items()}  # fancy indexing copies
    return Dataset(name, list(source.classes), splits, indices)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    except (OSError, UnidentifiedImageError) as e:
        raise HarnessError(f"cannot read image {path}: {e}") from None


def scan_image_folder(root: str, max_n: int | None = None, seed: int = 0
                      ) -> tuple[list[str], dict[str, tuple[list[Path], np.ndarray]]]:
    """List ``root/<split>/<class>/*.png|jpg|jpeg`` without decoding anything.

    Returns the class list (the sorted union of class folder names over all splits, so a label
    means the same class in every split) and ``{split: (files, labels)}`` for the splits of
    ``SPLITS`` present as folders. ``max_n`` caps every split at that many files, a random
    subset drawn with ``seed`` and kept in file order.
    """
    base = Path(root)
    if not base.is_dir():
        raise HarnessError(f"image folder {root} does not exist")
    folders = {s: base / s for s in SPLITS if (base / s).is_dir()}
    if not folders:
        raise HarnessError(f"image folder {root} has no split folders; expected some of "
                           f"{', '.join(SPLITS)}")
    classes = sorted({d.name for f in folders.values() for d in f.iterdir() if d.is_dir()})
    splits = {}
    for split, folder in folders.items():
        files = [(p, classes.index(d.name)) for d in sorted(folder.iterdir()) if d.is_dir()
                 for p in sorted(d.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
        if not files:
            raise HarnessError(f"split folder {folder} has no {'/'.join(_IMAGE_SUFFIXES)} images "
                               "in class folders")
        if max_n is not None and len(files) > max_n:
            keep = np.sort(np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(files))[:max_n])
            files = [files[i] for i in keep]
        splits[split] = ([p for p, _ in files], np.array([label for _, label in files], dtype=np.int64))
    return classes, splits


def load_image_folder(root: str, name: str | None = None, size: int = 64, max_n: int | None = None,
                      seed: int = 0) -> Dataset:
    """Load ``root/<split>/<class>/*.png|jpg|jpeg`` as RGB images resized to ``size`` x ``size``
    (bilinear, aspect ratio not kept; sources with their own transform read folders through
    :mod:`harness.stream` instead). Splits, classes and ``max_n``: see :func:`scan_image_folder`.
    """
    classes, listing = scan_image_folder(root, max_n, seed)
    splits = {split: (np.stack([_read_image(p, size) for p in files]), labels)
              for split, (files, labels) in listing.items()}
    return Dataset(name or Path(root).resolve().name, classes, splits)


def to_uint8(images: np.ndarray, size: int, channels: int = 3) -> "torch.Tensor":
    """:func:`to_tensor` without the normalisation, held as uint8 (N,channels,size,size): the
    resized values rounded to the nearest level (exact when no resize is needed, e.g. image
    folders, which are read at the model's size). A quarter of fp32's memory."""
    import torch
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (size, size, channels):
        # Already at size: the values are the answer, without a float copy of the whole split.
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    x = to_tensor(images, size, channels=channels, mean=0.0, std=1.0)
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def to_tensor(images: np.ndarray, size: int, channels: int = 3,
              mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
              ) -> "torch.Tensor":
    """Turn uint8 images (N,H,W) or (N,H,W,C) into a normalised float tensor (N,channels,size,size).

    Resizing is bilinear with antialiasing; grayscale is repeated to 3 channels, RGB is reduced to
    luminance for ``channels=1``. The result is ``(x / 255 - mean) / std``, where mean and std are
    scalars or one value per channel.
    """
    import torch  # imported here so that listing data sets does not pay for importing torch
    import torch.nn.functional as F

    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise HarnessError(f"to_tensor wants uint8 images (N,H,W) or (N,H,W,C), got "
                           f"{images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = (x[..., None] if x.ndim == 3 else x).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (size, size):  # resize before expanding channels: a third of the work
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != channels:
        raise HarnessError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    stats = [torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std)]
    if any(s.shape[0] not in (1, channels) for s in stats):
        raise HarnessError(f"mean and std need 1 or {channels} values, got {mean} and {std}")
    return ((x - stats[0]) / stats[1]).contiguous()
