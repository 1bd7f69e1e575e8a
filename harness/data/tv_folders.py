"""Readers of the task_vectors layout for the other TA8 data sets: GTSRB, RESISC45, SUN397, DTD,
EuroSAT and Stanford Cars (image folders, split files, CSV and .mat annotations)."""
from __future__ import annotations

import csv
import os
import re
from typing import Sequence

import numpy as np

from harness.data.samples import FileSamples, Samples
from harness.data.tv_files import (_Bad, _Listing, _few, _folder, _image_folder, _in_range, _int, _join,
                                   _lines, _loadmat, _require, _set_diff, _subfolders, _text, _walk)


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
