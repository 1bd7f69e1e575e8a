"""Readers of the task_vectors layout for the data sets beyond TA8: Food-101, Caltech-101/256,
FGVC-Aircraft, Flowers-102, Oxford-IIIT Pet, CUB-200, Pascal VOC 2007, Country211, UCF101 and ImageNet."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from harness.data.samples import FileSamples, Samples
from harness.data.tv_files import (_Bad, _Listing, _few, _folder, _in_range, _int, _join, _lines,
                                   _loadmat, _require, _set_diff, _text)
from harness.data.tv_folders import _folder_splits


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
