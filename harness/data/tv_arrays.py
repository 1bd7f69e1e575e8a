"""Readers of the task_vectors layout for data sets stored as arrays in files: MNIST (idx),
SVHN (.mat), CIFAR-10/100 (pickled batches, read with a restricted unpickler) and STL-10 (binary)."""
from __future__ import annotations

import codecs
import gzip
import os
import pickle
from typing import Sequence

import numpy as np

from harness.data.samples import ArraySamples
from harness.data.tv_files import _Bad, _int, _join, _loadmat, _text


# ---------------------------------------------------------------------------------------------
# MNIST, SVHN, CIFAR, STL10: small array formats, decoded into memory.

_DIGITS = [str(i) for i in range(10)]


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    """An idx file (big-endian int32 magic ``0x0000 08 ndim``, ``ndim`` int32 sizes, uint8 data);
    read through gzip when the name ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:
        raise _Bad(path, f"cannot be read ({type(e).__name__}: {e})") from None
    head = 4 + 4 * ndim
    if len(raw) < 4:
        raise _Bad(path, f"is {len(raw)} bytes long, too short for an idx file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _Bad(path, f"bad idx magic number {found} (expected {magic}: uint8 data of {ndim} dimensions)")
    if len(raw) < head:
        raise _Bad(path, f"is {len(raw)} bytes long, too short for its idx header ({head} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    want = head + int(np.prod(dims))
    if len(raw) != want:
        raise _Bad(path, f"is {len(raw)} bytes long; its header ({' x '.join(map(str, dims))}) says {want}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _mnist(folder: str, n_classes: int):
    """torchvision MNIST: ``{train,t10k}-images-idx3-ubyte`` and ``-labels-idx1-ubyte`` (or ``.gz``)."""
    splits = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        arrays = []
        for kind, magic, ndim in (("images-idx3", 2051, 3), ("labels-idx1", 2049, 1)):
            path = os.path.join(folder, f"{stem}-{kind}-ubyte")
            if not os.path.isfile(path):
                if not os.path.isfile(path + ".gz"):
                    raise _Bad(path, "missing file (nor its .gz)")
                path += ".gz"
            arrays.append((path, _read_idx(path, magic, ndim)))
        (ipath, images), (lpath, labels) = arrays
        if len(labels) != len(images):
            raise _Bad(lpath, f"has {len(labels)} labels for the {len(images)} images of {ipath}")
        bad = np.flatnonzero(labels >= n_classes)
        if len(bad):
            raise _Bad(lpath, f"label {int(labels[bad[0]])} at index {int(bad[0])} is out of range 0..{n_classes - 1}")
        splits[split] = ArraySamples(images, labels, ipath)
    return splits, list(_DIGITS)


def _svhn(folder: str, n_classes: int):
    """torchvision SVHN: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) in 1..10, where 10 is digit 0."""
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(folder, f"{split}_32x32.mat")
        mat = _loadmat(path, ("X", "y"), variable_names=["X", "y"])
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
            raise _Bad(path, f"X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
        if len(y) != x.shape[3]:
            raise _Bad(path, f"y has {len(y)} labels for the {x.shape[3]} images of X")
        if len(y) and (not np.all(np.isin(y, np.arange(1, 11)))):
            i = int(np.flatnonzero(~np.isin(y, np.arange(1, 11)))[0])
            raise _Bad(path, f"y[{i}] = {y[i]} is out of range 1..10")
        labels = y.astype(np.int64)
        labels[labels == 10] = 0
        splits[split] = ArraySamples(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels, path)
    return splits, list(_DIGITS)


class _Refused(Exception):
    pass


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as Python 3 pickles bytes under protocol 2, for latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise _Refused("_codecs.encode with other than latin-1 text")
    return codecs.encode(text, "latin-1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's python batches hold (dicts, lists, strings, numbers, numpy arrays)
    and refuses every other global: nothing the file names is imported or called beyond these."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs_encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return lambda buf, dtype, shape, order: np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)
        raise _Refused(f"{module}.{name}")


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise _Bad(path, "missing file")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise _Bad(path, f"refused: the pickle names {e}, which a CIFAR batch does not hold; nothing "
                         "from it was run") from None
    except Exception as e:  # a damaged pickle raises many kinds
        raise _Bad(path, f"is not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise _Bad(path, f"holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_names(path: str, key: str, n_classes: int) -> list[str]:
    meta = _unpickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise _Bad(path, f"has no list of strings under '{key}'")
    names = [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]
    if len(names) != n_classes:
        raise _Bad(path, f"'{key}' has {len(names)} names, expected {n_classes}")
    return names


def _cifar_batches(paths: Sequence[str], label_key: str, n_classes: int) -> ArraySamples:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        for key in ("data", label_key):
            if key not in batch:
                raise _Bad(path, f"has no '{key}' entry")
        data = batch["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise _Bad(path, f"'data' is not a uint8 (N, 3072) array")
        y = batch[label_key]
        if not isinstance(y, (list, np.ndarray)) or len(y) != len(data):
            raise _Bad(path, f"'{label_key}' is not a list of {len(data)} labels")
        y = np.asarray([_int(v, path, f"'{label_key}' entry") for v in y], dtype=np.int64)
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            i = int(np.flatnonzero((y < 0) | (y >= n_classes))[0])
            raise _Bad(path, f"'{label_key}'[{i}] = {y[i]} is out of range 0..{n_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return ArraySamples(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), paths[0])


def _cifar10(folder: str, n_classes: int):
    """torchvision CIFAR10: ``data_batch_1..5`` train, ``test_batch`` test, ``batches.meta`` names."""
    names = _cifar_names(_join(folder, "batches.meta"), "label_names", n_classes)
    train = _cifar_batches([_join(folder, f"data_batch_{i}") for i in range(1, 6)], "labels", n_classes)
    test = _cifar_batches([_join(folder, "test_batch")], "labels", n_classes)
    return {"train": train, "test": test}, names


def _cifar100(folder: str, n_classes: int):
    """torchvision CIFAR100: ``train``, ``test`` (``fine_labels``), ``meta`` (``fine_label_names``)."""
    names = _cifar_names(_join(folder, "meta"), "fine_label_names", n_classes)
    train = _cifar_batches([_join(folder, "train")], "fine_labels", n_classes)
    test = _cifar_batches([_join(folder, "test")], "fine_labels", n_classes)
    return {"train": train, "test": test}, names


def _stl10(folder: str, n_classes: int):
    """torchvision STL10: ``{train,test}_X.bin`` (N x 3 x 96 x 96 uint8, column-major images),
    ``{train,test}_y.bin`` (uint8 labels 1..10) and ``class_names.txt``."""
    names_path = _join(folder, "class_names.txt")
    names = _text(names_path).splitlines()
    if len(names) != n_classes:
        raise _Bad(names_path, f"has {len(names)} lines, expected {n_classes} class names")
    splits = {}
    for split in ("train", "test"):
        xp, yp = _join(folder, f"{split}_X.bin"), _join(folder, f"{split}_y.bin")
        for p in (xp, yp):
            if not os.path.isfile(p):
                raise _Bad(p, "missing file")
        x = np.fromfile(xp, dtype=np.uint8)
        if x.size % (3 * 96 * 96):
            raise _Bad(xp, f"is {x.size} bytes long, not a whole number of 3 x 96 x 96 images")
        y = np.fromfile(yp, dtype=np.uint8).astype(np.int64)
        images = x.reshape(-1, 3, 96, 96)
        if len(y) != len(images):
            raise _Bad(yp, f"has {len(y)} labels for the {len(images)} images of {xp}")
        bad = np.flatnonzero((y < 1) | (y > n_classes))
        if len(bad):
            raise _Bad(yp, f"label {y[bad[0]]} at index {int(bad[0])} is out of range 1..{n_classes}")
        splits[split] = ArraySamples(np.ascontiguousarray(images.transpose(0, 3, 2, 1)), y - 1, xp)
    return splits, names
