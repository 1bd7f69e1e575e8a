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

import os
from typing import Callable

import numpy as np

from harness.api import HarnessError
from harness.data.raw import RawData
from harness.data.samples import Samples
from harness.data.suites import spec as _spec
from harness.data.tv_arrays import _cifar10, _cifar100, _mnist, _stl10, _svhn
from harness.data.tv_files import IMG_EXTENSIONS, _Bad  # noqa: F401  (IMG_EXTENSIONS: part of this module's interface)
from harness.data.tv_folders import _RESISC45, _cars, _dtd, _eurosat, _gtsrb, _resisc45, _sun397
from harness.data.tv_more import (_caltech101, _caltech256, _country211, _cub, _fgvc, _flowers, _food101,
                                  _imagenet, _pets, _ucf101, _voc)

SUPPORTED: tuple[str, ...] = (
    "MNIST", "SVHN", "GTSRB", "RESISC45", "SUN397", "DTD", "EuroSAT", "Cars", "CIFAR10", "CIFAR100",
    "STL10", "Food101", "Caltech101", "Caltech256", "FGVCAircraft", "Flowers102", "OxfordIIITPet",
    "CUB200", "PascalVOC", "Country211", "UCF101", "ImageNet")


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


_READERS: dict[str, Callable[[str, int], tuple[dict[str, Samples], list[str] | None]]] = {
    "MNIST": _mnist, "SVHN": _svhn, "GTSRB": _gtsrb, "RESISC45": _resisc45, "SUN397": _sun397,
    "DTD": _dtd, "EuroSAT": _eurosat, "Cars": _cars, "CIFAR10": _cifar10, "CIFAR100": _cifar100,
    "STL10": _stl10, "Food101": _food101, "Caltech101": _caltech101, "Caltech256": _caltech256,
    "FGVCAircraft": _fgvc, "Flowers102": _flowers, "OxfordIIITPet": _pets, "CUB200": _cub,
    "PascalVOC": _voc, "Country211": _country211, "UCF101": _ucf101, "ImageNet": _imagenet,
}
