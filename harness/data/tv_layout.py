"""Readers for the on-disk layout of the task_vectors / aTLAS data-preparation instructions.

``mlfoundations/task_vectors`` (TV) and ``fredzzhang/atlas`` (AT) read their 22 data sets from
one data root (``--data-location``, default ``~/data``) laid out as torchvision and
``AT:DATASETS.md`` leave it: ``MNIST/raw/*-ubyte``, ``svhn/*_32x32.mat``, ``gtsrb/GTSRB/…``,
``resisc45/…``, ``sun397/{train,val}``, ``dtd/{train,val}``, ``EuroSAT_splits/…``,
``stanford_cars/…`` and so on (docs/paper-benchmark.md lists every folder). This module
finds each data set under a root (:func:`locate`), lists its splits as :class:`Samples` with the
labels the reference loaders give (:func:`read`), and says how to get it (:func:`fetch_hint`).

What is read, per data set (labels are class indices in the reference code's class order):

- image folders (DTD, SUN397, EuroSAT, Country211, ImageNet, GTSRB train, RESISC45): classes are
  the sorted sub-folder names, images the sorted walk of each class folder (what torchvision's
  ``ImageFolder`` does); the number of class folders must equal the data set's class count and
  every split must have the same class folders;
- annotation files (Cars ``.mat``, GTSRB test CSV, Food101 json, FGVCAircraft/OxfordIIITPet/CUB200
  txt, Flowers102 ``.mat``, UCF101 json, PASCAL VOC xml) list image files and their labels; every
  listed image must exist (checked against a listing of its folder, not opened);
- small array formats (MNIST idx, SVHN ``.mat``, CIFAR python batches, STL10 binary) are decoded
  into memory (:class:`ArraySamples`). CIFAR batches are pickles; they are read with an unpickler
  that only rebuilds plain containers and numpy arrays, and refuses anything else unrun.

Caltech101/256 have no test split on disk: the reference splits the whole set 80/20 with
``torch.utils.data.random_split(…, generator=torch.Generator().manual_seed(0))``; so does
:func:`read`. Data sets with their own validation split (EuroSAT, FGVCAircraft, Flowers102,
PascalVOC, Country211, UCF101) also get a ``val`` split.

Every malformed layout raises one :class:`HarnessError` line naming the file or folder and what is
wrong with it. Nothing here touches the network.

Example:
    >>> raw = read("DTD", "/data")          # /data/dtd/{train,val}/<class>/*.jpg
    >>> len(raw.splits["train"]), raw.classes[:2]
    (3760, ['banded', 'blotchy'])
"""
from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import pickle
import re
from typing import Callable, Sequence

import numpy as np

from harness.api import HarnessError
from harness.data.raw import RawData
from harness.data.samples import ArraySamples, FileSamples, Samples
from harness.data.suites import spec as _spec

SUPPORTED: tuple[str, ...] = (
    "MNIST", "SVHN", "GTSRB", "RESISC45", "SUN397", "DTD", "EuroSAT", "Cars", "CIFAR10", "CIFAR100",
    "STL10", "Food101", "Caltech101", "Caltech256", "FGVCAircraft", "Flowers102", "OxfordIIITPet",
    "CUB200", "PascalVOC", "Country211", "UCF101", "ImageNet")

# torchvision.datasets.folder.IMG_EXTENSIONS (torchvision 0.29.1), matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Where each data set lives under the root, and what (relative to that folder; "" = the folder
# itself) says it is there: any one of the markers existing.
_PLACES: dict[str, tuple[str, tuple[str, ...]]] = {
    "MNIST": ("MNIST/raw", ("",)),
    "SVHN": ("svhn", ("train_32x32.mat", "test_32x32.mat")),
    "GTSRB": ("gtsrb", ("GTSRB", "GT-final_test.csv")),
    "RESISC45": ("resisc45", ("NWPU-RESISC45", "resisc45-train.txt", "resisc45-test.txt")),
    "SUN397": ("sun397", ("train", "val")),
    "DTD": ("dtd", ("train", "val")),
    "EuroSAT": ("EuroSAT_splits", ("",)),
    "Cars": ("stanford_cars", ("devkit", "cars_train", "cars_test")),
    "CIFAR10": ("cifar-10-batches-py", ("",)),
    "CIFAR100": ("cifar-100-python", ("",)),
    "STL10": ("stl10/stl10_binary", ("",)),
    "Food101": ("food-101", ("meta", "images")),
    "Caltech101": ("caltech101", ("101_ObjectCategories",)),
    "Caltech256": ("caltech256", ("256_ObjectCategories",)),
    "FGVCAircraft": ("fgvc-aircraft-2013b", ("",)),
    "Flowers102": ("flowers-102", ("jpg", "imagelabels.mat", "setid.mat")),
    "OxfordIIITPet": ("oxford-iiit-pet", ("images", "annotations")),
    "CUB200": ("CUB_200_2011", ("",)),
    "PascalVOC": ("VOCdevkit/VOC2007", ("",)),
    "Country211": ("country211", ("train", "valid", "test")),
    "UCF101": ("UCF-101-midframes", ("",)),
    "ImageNet": ("imagenet", ("train", "val_in_folder", "val")),
}

# How to get each data set in this layout (AT:DATASETS.md, and the reference loaders' download code).
_HINTS: dict[str, str] = {
    "MNIST": "automatic: torchvision.datasets.MNIST(root, download=True) writes <root>/MNIST/raw/*-ubyte "
             "(AT:DATASETS.md)",
    "SVHN": "automatic: torchvision.datasets.SVHN('<root>/svhn', split='train'|'test', download=True) writes "
            "svhn/{train,test}_32x32.mat (AT:DATASETS.md)",
    "GTSRB": "automatic: torchvision.datasets.GTSRB(root, split='train'|'test', download=True) extracts "
             "GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
             "(sid.erda.dk) into <root>/gtsrb (AT:DATASETS.md)",
    "RESISC45": "manual (AT:DATASETS.md): NWPU-RESISC45.rar (Google Drive 1DnPSU5nVSN7xv95bpZ3XQ0JhKXZOKgIv) into "
                "resisc45/NWPU-RESISC45/<class>/ and resisc45-{train,val,test}.txt from "
                "storage.googleapis.com/remote_sensing_representations/ into resisc45/",
    "SUN397": "manual (AT:DATASETS.md): SUN397 from vision.princeton.edu/projects/2010/SUN/, then copy "
              "Training_01.txt to sun397/train/<folder>/ and Testing_01.txt to sun397/val/<folder>/ with the "
              "DATASETS.md script",
    "DTD": "manual (AT:DATASETS.md): dtd-r1.0.1.tar.gz from robots.ox.ac.uk/~vgg/data/dtd/, then copy "
           "labels/{train1,val1}.txt to dtd/train/<class>/ and test1.txt to dtd/val/<class>/ with the "
           "DATASETS.md script",
    "EuroSAT": "manual (AT:DATASETS.md): EuroSAT.zip from madm.dfki.de/files/sentinel/EuroSAT.zip, then split "
               "2750/<class>/ into EuroSAT_splits/{train,val,test}/<class>/ (270 val + 270 test per class, "
               "unseeded shuffle) with the DATASETS.md script",
    "Cars": "manual (AT:DATASETS.md): images from Kaggle jessicali9530/stanford-cars-dataset into "
            "stanford_cars/cars_{train,test}/, devkit (github.com/pytorch/vision/files/11644847/car_devkit.tgz) "
            "into stanford_cars/devkit/, cars_test_annos_withlabels.mat into stanford_cars/",
    "CIFAR10": "automatic: torchvision.datasets.CIFAR10(root, download=True) writes <root>/cifar-10-batches-py/ "
               "(AT:DATASETS.md)",
    "CIFAR100": "automatic: torchvision.datasets.CIFAR100(root, download=True) writes <root>/cifar-100-python/ "
                "(AT:DATASETS.md)",
    "STL10": "automatic: torchvision.datasets.STL10('<root>/stl10', split='train'|'test', download=True) writes "
             "stl10/stl10_binary/ (AT:DATASETS.md)",
    "Food101": "automatic: torchvision.datasets.Food101(root, download=True) extracts food-101.tar.gz "
               "(data.vision.ee.ethz.ch/cvl/food-101.tar.gz) into <root>/food-101 (AT:DATASETS.md)",
    "Caltech101": "automatic: torchvision.datasets.Caltech101(root, download=True) writes "
                  "<root>/caltech101/101_ObjectCategories/ (AT:DATASETS.md)",
    "Caltech256": "automatic: torchvision.datasets.Caltech256(root, download=True) writes "
                  "<root>/caltech256/256_ObjectCategories/ (AT:DATASETS.md)",
    "FGVCAircraft": "automatic: torchvision.datasets.FGVCAircraft(root, download=True) extracts "
                    "fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft/) into "
                    "<root>/fgvc-aircraft-2013b (AT:DATASETS.md)",
    "Flowers102": "automatic: torchvision.datasets.Flowers102(root, download=True) writes "
                  "<root>/flowers-102/{jpg/,imagelabels.mat,setid.mat} (AT:DATASETS.md)",
    "OxfordIIITPet": "automatic: torchvision.datasets.OxfordIIITPet(root, download=True) writes "
                     "<root>/oxford-iiit-pet/{images,annotations}/ (AT:DATASETS.md)",
    "CUB200": "automatic: CUB_200_2011.tgz (s3.amazonaws.com/fast-ai-imageclas/CUB_200_2011.tgz) extracted "
              "under <root> (AT:DATASETS.md, AT:src/datasets/cub2011.py)",
    "PascalVOC": "automatic: VOCtrainval_06-Nov-2007.tar and the VOC2007 test tars (host.robots.ox.ac.uk/pascal/"
                 "VOC/voc2007/) extracted under <root>, giving <root>/VOCdevkit/VOC2007 (AT:src/datasets/voc2007.py)",
    "Country211": "automatic: torchvision.datasets.Country211(root, download=True) extracts country211.tgz "
                  "(openaipublic.azureedge.net/clip/data/) into <root>/country211 (AT:DATASETS.md)",
    "UCF101": "manual (AT:DATASETS.md): the mid-frames zip and split_zhou_UCF101.json from the Google Drive "
              "links in DATASETS.md, extracted to <root>/UCF-101-midframes/",
    "ImageNet": "manual (AT:DATASETS.md): ILSVRC CLS-LOC from Kaggle imagenet-object-localization-challenge; "
                "Data/CLS-LOC/train to <root>/imagenet/train, val re-foldered by class (valprep.sh) to "
                "<root>/imagenet/val_in_folder",
}


class _Bad(Exception):
    """A malformed layout: ``path`` (a file or folder) and what is wrong with it."""

    def __init__(self, path, what: str):
        super().__init__(what)
        self.path, self.what = str(path), what


def _name(name: str) -> str:
    s = _spec(name)
    if s is None or s.name not in _PLACES:
        raise HarnessError(f"'{name}' has no task_vectors/aTLAS on-disk layout here; supported: "
                           f"{', '.join(SUPPORTED)}")
    return s.name


def locate(name: str, root: str) -> str | None:
    """The folder under ``root`` that holds data set ``name`` in this layout (``<root>/dtd``,
    ``<root>/MNIST/raw``, …) if one of its distinctive parts exists there, else None.

    ``name`` may be in either naming convention (``Cars`` or ``stanford-cars``).
    """
    base, markers = _PLACES[_name(name)]
    folder = os.path.join(os.path.expanduser(str(root)), *base.split("/"))
    for m in markers:
        if os.path.exists(os.path.join(folder, m) if m else folder) and os.path.isdir(folder):
            return folder
    return None


def fetch_hint(name: str) -> str:
    """One line: how to get data set ``name`` in this layout on a machine with network."""
    return _HINTS[_name(name)]


def read(name: str, root: str) -> RawData:
    """Data set ``name`` under ``root``: its ``train`` and ``test`` splits (plus ``val`` where it
    ships its own) as :class:`Samples`, and the class names where the layout carries them.

    Raises:
        HarnessError: the data set is not under ``root``, or one of its files or folders is
            malformed (one line naming the file or folder).
    """
    canonical = _name(name)
    folder = locate(canonical, root)
    if folder is None:
        base = _PLACES[canonical][0]
        raise HarnessError(f"{canonical}: not found at {os.path.join(str(root), *base.split('/'))}; "
                           f"get it with: {_HINTS[canonical]}")
    n_classes = _spec(canonical).n_classes
    try:
        splits, classes = _READERS[canonical](folder, n_classes)
    except _Bad as e:
        raise HarnessError(_line(f"{canonical}: {e.path}: {e.what}")) from None
    except OSError as e:
        raise HarnessError(_line(f"{canonical}: {e.filename or folder}: cannot be read: "
                                 f"{e.strerror or e}")) from None
    for split, samples in splits.items():
        bad = np.flatnonzero((samples.labels < 0) | (samples.labels >= n_classes))
        if len(bad):
            raise HarnessError(_line(f"{canonical}: {samples.where(int(bad[0]))}: label "
                                     f"{int(samples.labels[bad[0]])} of the {split} split is out of range "
                                     f"0..{n_classes - 1}"))
    if classes is not None and len(classes) != n_classes:
        raise HarnessError(_line(f"{canonical}: {folder}: {len(classes)} class names, expected {n_classes}"))
    return RawData(name=canonical, convention="tv", location=folder, splits=splits, classes=classes)


def _line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# Shared helpers: text files, folder listings, class folders, .mat files.

def _join(folder: str, *parts: str) -> str:
    return os.path.join(folder, *parts)


def _text(path: str) -> str:
    if not os.path.isfile(path):
        raise _Bad(path, "missing file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(path, f"is not UTF-8 text (byte {e.start})") from None


def _lines(path: str):
    """``(line number, stripped line)`` of a text file, blank lines left out."""
    for n, line in enumerate(_text(path).splitlines(), 1):
        if line.strip():
            yield n, line.strip()


class _Listing:
    """Folder listings, read once each, to check that listed images exist without a stat per file;
    ``base`` is the data set's folder, which listed images may not leave."""

    def __init__(self, base: str):
        self.base = os.path.normpath(base)
        self._names: dict[str, set[str] | None] = {}

    def inside(self, path: str) -> bool:
        return os.path.normpath(path).startswith(self.base + os.sep)

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder))
            except OSError:
                self._names[folder] = None
        names = self._names[folder]
        return names is not None and name in names


def _require(listing: _Listing, path: str, where: str, what: str) -> None:
    if not listing.inside(path):
        raise _Bad(where, f"{what}: image {path} lies outside {listing.base}")
    if not listing.exists(path):
        raise _Bad(where, f"{what}: image {path} does not exist")


def _folder(path: str) -> str:
    if not os.path.isdir(path):
        raise _Bad(path, "missing folder")
    return path


def _subfolders(path: str) -> list[str]:
    """Sorted names of the sub-folders of ``path`` (torchvision's ``find_classes``)."""
    _folder(path)
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _walk(folder: str, keep: Callable[[str], bool]) -> list[str]:
    """Files under ``folder`` in torchvision ``make_dataset`` order (sorted walk, sorted names)."""
    out = []
    for dirpath, _dirs, files in sorted(os.walk(folder, followlinks=True)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            if keep(path):
                out.append(path)
    return out


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def _few(items: Sequence[str], k: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:k]) + (f" … ({len(items)} in all)" if len(items) > k else "")


def _set_diff(found: Sequence[str], expected: Sequence[str]) -> str:
    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]
    parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"extra {_few(extra)}"] if extra else [])
    return "; ".join(parts)


def _image_folder(path: str, n_classes: int,
                  same_as: tuple[str, list[str]] | None = None) -> tuple[list[str], FileSamples]:
    """torchvision ``ImageFolder(path)``: the sorted class folders and their image files.

    There must be ``n_classes`` class folders, the same as ``same_as = (folder, class folders)``
    (the train split's) when given, and each must hold at least one image (``ImageFolder`` refuses
    empty classes too).
    """
    found = _subfolders(path)
    if len(found) != n_classes:
        raise _Bad(path, f"has {len(found)} class folders, expected {n_classes}"
                   + (" (are the images re-foldered by class?)" if not found else "")
                   + (f"; compared with {same_as[0]}: {_set_diff(found, same_as[1])}"
                      if found and same_as is not None else ""))
    if same_as is not None and found != same_as[1]:
        raise _Bad(path, f"class folders differ from those of {same_as[0]}: {_set_diff(found, same_as[1])}")
    paths, labels = [], []
    for i, c in enumerate(found):
        files = _walk(os.path.join(path, c), _is_image)
        if not files:
            raise _Bad(os.path.join(path, c), f"class folder holds no image files ({', '.join(IMG_EXTENSIONS)})")
        paths += files
        labels += [i] * len(files)
    return found, FileSamples(paths, labels)


def _loadmat(path: str, fields: Sequence[str], **kw) -> dict:
    """A MATLAB (v4-v7.2) file's variables; each of ``fields`` must be present."""
    import scipy.io
    if not os.path.isfile(path):
        raise _Bad(path, "missing file")
    try:
        mat = scipy.io.loadmat(path, **kw)
    except NotImplementedError:
        raise _Bad(path, "is a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read") from None
    except Exception as e:  # scipy raises several kinds for damaged files
        raise _Bad(path, f"is not a readable .mat file ({type(e).__name__}: {e})") from None
    for f in fields:
        if f not in mat:
            raise _Bad(path, f"has no '{f}' variable (found: {_few(sorted(k for k in mat if not k.startswith('__')))})")
    return mat


def _int(value, where: str, what: str) -> int:
    """``value`` (a number, numpy scalar or one-element array, or decimal text) as an int."""
    v = value
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
        return int(v)
    raise _Bad(where, f"{what} {value!r} is not an integer")


def _in_range(label: int, lo: int, hi: int, where: str, what: str) -> int:
    if not lo <= label <= hi:
        raise _Bad(where, f"{what} {label} is out of range {lo}..{hi}")
    return label


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


# ---------------------------------------------------------------------------------------------
# The eight task-addition data sets stored as image files.

def _gtsrb(folder: str, n_classes: int):
    """Reference ``PyTorchGTSRB``: ``GTSRB/Training/<00000..00042>/*.ppm`` (label = the sorted class
    folder's index, which is its number) and ``GTSRB/Final_Test/Images`` listed by
    ``GT-final_test.csv`` (``;``-separated, ``Filename`` and ``ClassId`` columns)."""
    train_dir = _join(folder, "GTSRB", "Training")
    expected = [f"{i:05d}" for i in range(n_classes)]
    found = _subfolders(train_dir)
    if found != expected:
        raise _Bad(train_dir, f"class folders differ from 00000..{n_classes - 1:05d}: {_set_diff(found, expected)}")
    paths, labels = [], []
    for i, c in enumerate(expected):
        files = _walk(_join(train_dir, c), lambda p: p.lower().endswith(".ppm"))
        if not files:
            raise _Bad(_join(train_dir, c), "class folder holds no .ppm images")
        paths += files
        labels += [i] * len(files)
    test_dir = _folder(_join(folder, "GTSRB", "Final_Test", "Images"))
    csv_path = _join(folder, "GT-final_test.csv")
    rows = csv.DictReader(_text(csv_path).splitlines(), delimiter=";", skipinitialspace=True)
    if not rows.fieldnames or "Filename" not in rows.fieldnames or "ClassId" not in rows.fieldnames:
        raise _Bad(csv_path, f"header {';'.join(rows.fieldnames or [])!r} lacks the Filename and ClassId columns")
    listing, tpaths, tlabels = _Listing(folder), [], []
    try:
        for row in rows:
            where = f"line {rows.line_num}"
            fname, cid = row.get("Filename"), row.get("ClassId")
            if not fname or cid is None:
                raise _Bad(csv_path, f"{where} has no Filename or ClassId field")
            try:
                label = int(cid)
            except ValueError:
                raise _Bad(csv_path, f"{where}: ClassId {cid!r} is not an integer") from None
            if not 0 <= label < n_classes:
                raise _Bad(csv_path, f"{where}: ClassId {label} is out of range 0..{n_classes - 1}")
            path = _join(test_dir, fname)
            _require(listing, path, csv_path, where)
            tpaths.append(path)
            tlabels.append(label)
    except csv.Error as e:
        raise _Bad(csv_path, f"line {rows.line_num} does not parse as CSV: {e}") from None
    return {"train": FileSamples(paths, labels), "test": FileSamples(tpaths, tlabels)}, None


# RESISC45Dataset.classes (TV/AT src/datasets/resisc45.py, from torchgeo); sorted, so it is also
# the ImageFolder order of the class folders.
_RESISC45 = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert",
    "forest", "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area",
    "intersection", "island", "lake", "meadow", "medium_residential", "mobile_home_park",
    "mountain", "overpass", "palace", "parking_lot", "railway", "railway_station",
    "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]


def _resisc45(folder: str, n_classes: int):
    """Reference ``RESISC45Dataset``: ImageFolder on ``NWPU-RESISC45`` keeping the files whose base
    name is listed in ``resisc45-{train,test}.txt`` (the val list is unused). Every listed name must
    be found, and every class must keep at least one image."""
    img_dir = _join(folder, "NWPU-RESISC45")
    found = _subfolders(img_dir)
    if found != _RESISC45:
        raise _Bad(img_dir, f"class folders differ from the {len(_RESISC45)} RESISC45 classes: "
                            f"{_set_diff(found, _RESISC45)}")
    files = {c: _walk(_join(img_dir, c), lambda p: True) for c in found}
    splits = {}
    for split in ("train", "test"):
        list_path = _join(folder, f"resisc45-{split}.txt")
        names = {line for _, line in _lines(list_path)}
        seen, paths, labels = set(), [], []
        for i, c in enumerate(found):
            keep = [p for p in files[c] if os.path.basename(p) in names]
            if not keep:
                raise _Bad(_join(img_dir, c), f"class folder holds none of the images listed in {list_path}")
            seen.update(os.path.basename(p) for p in keep)
            paths += keep
            labels += [i] * len(keep)
        if names - seen:
            raise _Bad(list_path, f"{len(names - seen)} listed images are not in {img_dir}/<class>/ "
                                  f"(first: {sorted(names - seen)[0]})")
        splits[split] = FileSamples(paths, labels)
    return splits, [c.replace("_", " ") for c in found]


def _folder_splits(folder: str, n_classes: int,
                   pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, Samples], list[str]]:
    """ImageFolder on each ``(split, sub-folder)``; the first one's class folders rule the rest."""
    splits, first = {}, None
    for split, sub in pairs:
        path = _join(folder, sub)
        found, samples = _image_folder(path, n_classes, first)
        first = first or (path, found)
        splits[split] = samples
    return splits, first[1]


def _sun397(folder: str, n_classes: int):
    """Reference SUN397: ImageFolder on ``sun397/train`` (train) and ``sun397/val`` (test); class
    name = folder name without its ``<letter>_`` prefix, ``_`` as space."""
    splits, found = _folder_splits(folder, n_classes, (("train", "train"), ("test", "val")))
    return splits, [c[2:].replace("_", " ") for c in found]


def _dtd(folder: str, n_classes: int):
    """Reference DTD: ImageFolder on ``dtd/train`` (train1 + val1) and ``dtd/val`` (test1)."""
    splits, found = _folder_splits(folder, n_classes, (("train", "train"), ("test", "val")))
    return splits, [c.replace("_", " ") for c in found]


# TV/AT src/datasets/eurosat.py: pretify_classname, then ours_to_open_ai.
_EUROSAT_OPENAI = {
    "annual crop": "annual crop land", "forest": "forest",
    "herbaceous vegetation": "brushland or shrubland", "highway": "highway or road",
    "industrial area": "industrial buildings or commercial buildings", "pasture": "pasture land",
    "permanent crop": "permanent crop land",
    "residential area": "residential buildings or homes or apartments", "river": "river",
    "sea lake": "lake or sea",
}


def _pretify(classname: str) -> str:
    words = [w.lower() for w in re.findall(r"[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))", classname)]
    out = " ".join(words)
    return out + " area" if out.endswith("al") else out


def _eurosat(folder: str, n_classes: int):
    """Reference EuroSAT: ImageFolder on ``EuroSAT_splits/{train,val,test}``; the CamelCase folder
    names map to the OpenAI class names (``SeaLake`` → ``lake or sea``)."""
    splits, found = _folder_splits(folder, n_classes, (("train", "train"), ("val", "val"), ("test", "test")))
    names = []
    for c in found:
        key = _pretify(c.replace("_", " "))
        if key not in _EUROSAT_OPENAI:
            raise _Bad(_join(folder, "train", c), "is not a EuroSAT class folder (AnnualCrop, Forest, "
                                                  "HerbaceousVegetation, Highway, Industrial, Pasture, "
                                                  "PermanentCrop, Residential, River, SeaLake)")
        names.append(_EUROSAT_OPENAI[key])
    return splits, names


def _mat_strings(value) -> list[str]:
    return [str(v) for v in np.atleast_1d(np.asarray(value, dtype=object)).reshape(-1).tolist()]


def _cars(folder: str, n_classes: int):
    """Reference ``PytorchStanfordCars``: ``devkit/cars_meta.mat`` ``class_names`` (in label order,
    ``_`` as space); ``annotations`` (fields ``fname``, ``class`` 1-based) of
    ``devkit/cars_train_annos.mat`` over ``cars_train/`` and of ``cars_test_annos_withlabels.mat``
    over ``cars_test/``."""
    meta_path = _join(folder, "devkit", "cars_meta.mat")
    names = _mat_strings(_loadmat(meta_path, ("class_names",), squeeze_me=True)["class_names"])
    if len(names) != n_classes:
        raise _Bad(meta_path, f"class_names has {len(names)} entries, expected {n_classes}")
    if len(set(names)) != len(names):
        raise _Bad(meta_path, "class_names has repeated entries")
    splits = {}
    for split, mat_path, img_dir in (
            ("train", _join(folder, "devkit", "cars_train_annos.mat"), _join(folder, "cars_train")),
            ("test", _join(folder, "cars_test_annos_withlabels.mat"), _join(folder, "cars_test"))):
        annos = np.atleast_1d(_loadmat(mat_path, ("annotations",), squeeze_me=True)["annotations"])
        fields = annos.dtype.names or ()
        if "fname" not in fields or "class" not in fields:
            raise _Bad(mat_path, f"'annotations' has no 'fname' and 'class' fields (found: {_few(fields)})")
        _folder(img_dir)
        listing, paths, labels = _Listing(folder), [], []
        for k, a in enumerate(annos.reshape(-1)):
            where = f"annotation {k}"
            label = _int(a["class"], mat_path, f"{where}: class") - 1
            _in_range(label + 1, 1, n_classes, mat_path, f"{where}: class")
            path = _join(img_dir, str(a["fname"]))
            _require(listing, path, mat_path, where)
            paths.append(path)
            labels.append(label)
        splits[split] = FileSamples(paths, labels)
    return splits, [n.replace("_", " ") for n in names]


# ---------------------------------------------------------------------------------------------
# The other fourteen data sets of the aTLAS pool.

def _food101(folder: str, n_classes: int):
    """Reference ``PyTorchFood101``: ``meta/{train,test}.json`` map each class to ``<class>/<id>``
    entries of ``images/<class>/<id>.jpg``; classes are the sorted keys (``_`` as space), samples
    follow the json's order."""
    splits, classes = {}, None
    for split in ("train", "test"):
        path = _join(folder, "meta", f"{split}.json")
        try:
            meta = json.loads(_text(path))
        except json.JSONDecodeError as e:
            raise _Bad(path, f"is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                 for v in meta.values()):
            raise _Bad(path, "is not a json object of class → list of image names")
        keys = sorted(meta)
        if classes is None:
            if len(keys) != n_classes:
                raise _Bad(path, f"has {len(keys)} classes, expected {n_classes}")
            classes = keys
        elif keys != classes:
            raise _Bad(path, f"classes differ from those of train.json: {_set_diff(keys, classes)}")
        index = {c: i for i, c in enumerate(classes)}
        listing, paths, labels = _Listing(folder), [], []
        for c, rels in meta.items():
            for rel in rels:
                p = _join(folder, "images", *f"{rel}.jpg".split("/"))
                _require(listing, p, path, f"entry {rel!r}")
                paths.append(p)
                labels.append(index[c])
        splits[split] = FileSamples(paths, labels)
    return splits, [c.replace("_", " ") for c in classes]


def _caltech_split(samples: FileSamples) -> dict[str, Samples]:
    """The reference's ``random_split(dataset, [int(0.8 n), n - int(0.8 n)], Generator().manual_seed(0))``."""
    import torch
    from torch.utils.data import random_split
    n = len(samples)
    train_n = int(n * 0.8)
    train, test = random_split(range(n), [train_n, n - train_n], generator=torch.Generator().manual_seed(0))
    return {"train": samples.subset(list(train.indices)), "test": samples.subset(list(test.indices))}


def _caltech_name(folder: str) -> str:
    return folder.split(".")[-1].replace("-", " ").replace(" 101", "")


def _caltech101(folder: str, n_classes: int):
    """Reference ``PyTorchCaltech101``: the sorted entries of ``101_ObjectCategories`` without
    ``BACKGROUND_Google``; category ``c`` with ``n`` entries is ``c/image_0001.jpg`` …
    ``image_<n>.jpg``; then the 80/20 seeded split."""
    cat_dir = _folder(_join(folder, "101_ObjectCategories"))
    cats = sorted(e for e in os.listdir(cat_dir) if e != "BACKGROUND_Google")
    return _caltech(cat_dir, cats, n_classes, lambda i, k: f"image_{k:04d}.jpg", lambda e: True)


def _caltech256(folder: str, n_classes: int):
    """Reference ``PyTorchCaltech256``: the sorted entries of ``256_ObjectCategories``; the ``i``-th
    category with ``n`` ``.jpg`` files is ``<i+1:03d>_0001.jpg`` … ; then the 80/20 seeded split."""
    cat_dir = _folder(_join(folder, "256_ObjectCategories"))
    cats = sorted(os.listdir(cat_dir))
    return _caltech(cat_dir, cats, n_classes, lambda i, k: f"{i + 1:03d}_{k:04d}.jpg",
                    lambda e: e.endswith(".jpg"))


def _caltech(cat_dir: str, cats: list[str], n_classes: int, file_name, counted):
    if len(cats) != n_classes:
        raise _Bad(cat_dir, f"has {len(cats)} category folders, expected {n_classes}")
    paths, labels = [], []
    for i, c in enumerate(cats):
        d = _join(cat_dir, c)
        if not os.path.isdir(d):
            raise _Bad(d, "is not a category folder")
        entries = set(os.listdir(d))
        n = sum(1 for e in entries if counted(e))
        if n == 0:
            raise _Bad(d, "category folder holds no images")
        for k in range(1, n + 1):
            if file_name(i, k) not in entries:
                raise _Bad(d, f"holds {n} images but no {file_name(i, k)} (the reference reads "
                              f"{file_name(i, 1)} … {file_name(i, n)})")
            paths.append(_join(d, file_name(i, k)))
            labels.append(i)
    return _caltech_split(FileSamples(paths, labels)), [_caltech_name(c) for c in cats]


def _fgvc(folder: str, n_classes: int):
    """Reference ``PyTorchFGVCAircraft`` (variant level): ``data/variants.txt`` names the classes;
    ``data/images_variant_{train,val,test}.txt`` lines are ``<image id> <variant>`` for
    ``data/images/<image id>.jpg``."""
    data = _join(folder, "data")
    vpath = _join(data, "variants.txt")
    classes = [line for _, line in _lines(vpath)]
    if len(classes) != n_classes or len(set(classes)) != n_classes:
        raise _Bad(vpath, f"has {len(set(classes))} distinct variants, expected {n_classes}")
    index = {c: i for i, c in enumerate(classes)}
    listing, splits = _Listing(folder), {}
    for split in ("train", "val", "test"):
        path = _join(data, f"images_variant_{split}.txt")
        paths, labels = [], []
        for n, line in _lines(path):
            parts = line.split(" ", 1)
            if len(parts) != 2:
                raise _Bad(path, f"line {n} does not parse as '<image id> <variant>'")
            if parts[1] not in index:
                raise _Bad(path, f"line {n}: variant {parts[1]!r} is not in {vpath}")
            p = _join(data, "images", f"{parts[0]}.jpg")
            _require(listing, p, path, f"line {n}")
            paths.append(p)
            labels.append(index[parts[1]])
        splits[split] = FileSamples(paths, labels)
    return splits, classes


def _flowers(folder: str, n_classes: int):
    """Reference ``PyTorchFlowers102``: ``setid.mat`` ``trnid``/``valid``/``tstid`` (1-based image
    ids) for train/val/test, ``imagelabels.mat`` ``labels`` (1-based, per image id), images
    ``jpg/image_<id:05d>.jpg``."""
    setid_path, labels_path = _join(folder, "setid.mat"), _join(folder, "imagelabels.mat")
    setid = _loadmat(setid_path, ("trnid", "valid", "tstid"), squeeze_me=True)
    all_labels = np.atleast_1d(_loadmat(labels_path, ("labels",), squeeze_me=True)["labels"]).reshape(-1)
    jpg = _folder(_join(folder, "jpg"))
    listing, splits = _Listing(folder), {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        paths, labels = [], []
        for k, v in enumerate(np.atleast_1d(setid[key]).reshape(-1)):
            image_id = _int(v, setid_path, f"{key}[{k}]")
            if not 1 <= image_id <= len(all_labels):
                raise _Bad(setid_path, f"{key}[{k}] = {image_id} is not an image id of {labels_path} "
                                       f"(1..{len(all_labels)})")
            label = _int(all_labels[image_id - 1], labels_path, f"labels[{image_id - 1}]")
            _in_range(label, 1, n_classes, labels_path, f"labels[{image_id - 1}]")
            p = _join(jpg, f"image_{image_id:05d}.jpg")
            _require(listing, p, setid_path, f"{key}[{k}]")
            paths.append(p)
            labels.append(label - 1)
        splits[split] = FileSamples(paths, labels)
    return splits, None


def _pets(folder: str, n_classes: int):
    """Reference ``PytorchOxfordIIITPet``: ``annotations/{trainval,test}.txt`` lines are
    ``<image id> <class id 1..37> …`` for ``images/<image id>.jpg``; class names come from the
    trainval ids (breed = id without its ``_<n>``, words title-cased)."""
    listing, splits, breeds = _Listing(folder), {}, {}
    images = _folder(_join(folder, "images"))
    for split, file in (("train", "trainval"), ("test", "test")):
        path = _join(folder, "annotations", f"{file}.txt")
        paths, labels = [], []
        for n, line in _lines(path):
            parts = line.split()
            if len(parts) < 2:
                raise _Bad(path, f"line {n} does not parse as '<image id> <class id> …'")
            label = _in_range(_int(parts[1], path, f"line {n}: class id"), 1, n_classes, path, f"line {n}: class id")
            if split == "train":
                breed = parts[0].rsplit("_", 1)[0]
                if breeds.setdefault(label, breed) != breed:
                    raise _Bad(path, f"line {n}: class id {label} is both {breeds[label]!r} and {breed!r}")
            p = _join(images, f"{parts[0]}.jpg")
            _require(listing, p, path, f"line {n}")
            paths.append(p)
            labels.append(label - 1)
        splits[split] = FileSamples(paths, labels)
    if len(breeds) != n_classes:
        missing = [str(i) for i in range(1, n_classes + 1) if i not in breeds]
        raise _Bad(_join(folder, "annotations", "trainval.txt"),
                   f"names {len(breeds)} classes, expected {n_classes} (class ids missing: {_few(missing)})")
    return splits, [" ".join(part.title() for part in breeds[i].split("_")) for i in range(1, n_classes + 1)]


def _id_table(path: str, what: str) -> dict[int, str]:
    """A CUB ``<id> <value>`` file as ``{id: value}``."""
    out = {}
    for n, line in _lines(path):
        parts = line.split(" ")
        if len(parts) != 2:
            raise _Bad(path, f"line {n} does not parse as '<id> <{what}>'")
        out[_int(parts[0], path, f"line {n}: id")] = parts[1]
    return out


def _cub(folder: str, n_classes: int):
    """Reference ``Cub2011``: ``images.txt`` (``<id> <path>``, its order is the sample order),
    ``image_class_labels.txt`` (``<id> <class 1..200>``), ``train_test_split.txt``
    (``<id> <1 train | 0 test>``), ``classes.txt`` (``<id> <nnn.Name_With_Underscores>``);
    images under ``images/``."""
    cpath = _join(folder, "classes.txt")
    classes = [v.split(".")[-1].replace("_", " ") for v in _id_table(cpath, "class name").values()]
    if len(classes) != n_classes:
        raise _Bad(cpath, f"has {len(classes)} classes, expected {n_classes}")
    ipath, lpath, spath = (_join(folder, f) for f in ("images.txt", "image_class_labels.txt",
                                                       "train_test_split.txt"))
    images, targets, is_train = _id_table(ipath, "path"), _id_table(lpath, "class"), _id_table(spath, "0|1")
    listing = _Listing(folder)
    splits = {"train": ([], []), "test": ([], [])}
    for image_id, rel in images.items():
        for table, path in ((targets, lpath), (is_train, spath)):
            if image_id not in table:
                raise _Bad(path, f"has no line for image id {image_id} of {ipath}")
        label = _in_range(_int(targets[image_id], lpath, f"image {image_id}: class"), 1, n_classes, lpath,
                          f"image {image_id}: class")
        flag = _int(is_train[image_id], spath, f"image {image_id}: is_training_img")
        if flag not in (0, 1):
            raise _Bad(spath, f"image {image_id}: is_training_img {flag} is neither 0 nor 1")
        p = _join(folder, "images", *rel.split("/"))
        _require(listing, p, ipath, f"image {image_id}")
        paths, labels = splits["train" if flag == 1 else "test"]
        paths.append(p)
        labels.append(label - 1)
    return {k: FileSamples(p, l) for k, (p, l) in splits.items()}, classes


# AT src/datasets/voc2007.py object_categories: the names in the annotation files, in label order.
_VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
        "tvmonitor"]


def _voc_objects(path: str):
    """``(class index, (xmin, ymin, xmax, ymax))`` per ``<object>`` of a VOC annotation file.
    Files with a DOCTYPE or ENTITY declaration are refused (no entity expansion)."""
    import xml.etree.ElementTree as ET
    with open(path, "rb") as f:
        data = f.read()
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise _Bad(path, "has a DOCTYPE/ENTITY declaration, which VOC annotations do not; refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise _Bad(path, f"is not well-formed XML ({e})") from None
    out = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in _VOC:
            raise _Bad(path, f"object {k}: class {name!r} is not a VOC2007 class")
        box = obj.find("bndbox")
        if box is None:
            raise _Bad(path, f"object {k} has no bndbox")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = (box.findtext(tag) or "").strip()
            if not re.fullmatch(r"-?\d+", text):
                raise _Bad(path, f"object {k}: bndbox {tag} {text!r} is not an integer")
            coords.append(int(text))
        out.append((_VOC.index(name), tuple(coords)))
    return out


def _voc(folder: str, n_classes: int):
    """Reference ``PASCALVoc2007Cropped``: the image ids of ``ImageSets/Main/aeroplane_<split>.txt``
    (lines ``<id> <±1>``), one sample per ``<object>`` of ``Annotations/<id>.xml``, the image
    ``JPEGImages/<id>.jpg`` cropped to the object's box."""
    listing, splits = _Listing(folder), {}
    for split in ("train", "val", "test"):
        path = _join(folder, "ImageSets", "Main", f"aeroplane_{split}.txt")
        paths, labels, boxes = [], [], []
        for n, line in _lines(path):
            parts = line.split()
            if len(parts) != 2:
                raise _Bad(path, f"line {n} does not parse as '<image id> <±1>'")
            xml_path = _join(folder, "Annotations", f"{parts[0]}.xml")
            _require(listing, xml_path, path, f"line {n}: annotation")
            image = _join(folder, "JPEGImages", f"{parts[0]}.jpg")
            _require(listing, image, path, f"line {n}")
            for label, box in _voc_objects(xml_path):
                paths.append(image)
                labels.append(label)
                boxes.append(box)
        splits[split] = FileSamples(paths, labels, boxes)
    return splits, None


def _country211(folder: str, n_classes: int):
    """Reference ``PyTorchCountry211``: ImageFolder on ``country211/{train,valid,test}`` (ISO-code
    folders; the names are a hard-coded list in the reference, so none are returned)."""
    splits, _ = _folder_splits(folder, n_classes, (("train", "train"), ("val", "valid"), ("test", "test")))
    return splits, None


def _ucf101(folder: str, n_classes: int):
    """Reference ``PytorchUCF101``: ``split_zhou_UCF101.json`` with ``train``/``val``/``test``
    lists of ``[relative path, label, class name]`` over the mid-frame images. Class names are
    the train split's, by label (the reference takes them in order of first appearance, which is
    label order in the released json)."""
    path = _join(folder, "split_zhou_UCF101.json")
    try:
        meta = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise _Bad(path, f"is not valid JSON ({e})") from None
    listing, splits, names = _Listing(folder), {}, {}
    for split in ("train", "val", "test"):
        entries = meta.get(split) if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise _Bad(path, f"has no '{split}' list")
        paths, labels = [], []
        for k, e in enumerate(entries):
            where = f"{split}[{k}]"
            if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[2], str)
                    and isinstance(e[1], int) and not isinstance(e[1], bool)):
                raise _Bad(path, f"{where} is not [relative path, label, class name]")
            label = _in_range(e[1], 0, n_classes - 1, path, f"{where}: label")
            if names.setdefault(label, e[2]) != e[2]:
                raise _Bad(path, f"{where}: label {label} is both {names[label]!r} and {e[2]!r}")
            p = _join(folder, *e[0].split("/"))
            _require(listing, p, path, where)
            paths.append(p)
            labels.append(label)
        splits[split] = FileSamples(paths, labels)
        if split == "train" and len(names) != n_classes:
            missing = [str(i) for i in range(n_classes) if i not in names]
            raise _Bad(path, f"the train split names {len(names)} classes, expected {n_classes} "
                             f"(labels missing: {_few(missing)})")
    return splits, [names[i] for i in range(n_classes)]


def _imagenet(folder: str, n_classes: int):
    """Reference ``ImageNet``: ImageFolder on ``imagenet/train`` and on ``imagenet/val_in_folder``
    (else ``imagenet/val``), wnid folders; the names are a hard-coded list in the reference."""
    test = "val_in_folder" if os.path.exists(_join(folder, "val_in_folder")) else "val"
    splits, _ = _folder_splits(folder, n_classes, (("train", "train"), ("test", test)))
    return splits, None


_READERS: dict[str, Callable[[str, int], tuple[dict[str, Samples], list[str] | None]]] = {
    "MNIST": _mnist, "SVHN": _svhn, "GTSRB": _gtsrb, "RESISC45": _resisc45, "SUN397": _sun397,
    "DTD": _dtd, "EuroSAT": _eurosat, "Cars": _cars, "CIFAR10": _cifar10, "CIFAR100": _cifar100,
    "STL10": _stl10, "Food101": _food101, "Caltech101": _caltech101, "Caltech256": _caltech256,
    "FGVCAircraft": _fgvc, "Flowers102": _flowers, "OxfordIIITPet": _pets, "CUB200": _cub,
    "PascalVOC": _voc, "Country211": _country211, "UCF101": _ucf101, "ImageNet": _imagenet,
}
