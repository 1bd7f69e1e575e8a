"""Tiny benchmark data sets in the real on-disk formats of the task_vectors / aTLAS layout.

:func:`make_tv` writes one data set under a root the way torchvision and ``AT:DATASETS.md`` leave
it (idx files with their big-endian headers, ``.mat`` files through ``scipy.io.savemat`` with the
variables the readers read, the GTSRB CSV, RESISC45 txt lists, CIFAR pickles, VOC xml, …), with a
handful of images per class, and returns what it wrote: per split, the label and serial number of
each image in the order a reader of the layout must list them.

Every image carries its label and serial recoverably (:func:`encode` / :func:`decode`): the top
half is a solid colour spelling the label in base 16 (one digit per channel, level ``16 d + 8``),
the bottom half spells the serial the same way; grayscale images hold one digit each. Solid 8x8
blocks survive JPEG (quality 95, no chroma subsampling) well within the ±8 the decoding allows.

Example:
    >>> info = make_tv("DTD", tmp_path)
    >>> raw = tv_layout.read("DTD", tmp_path)
    >>> list(raw.splits["test"].labels) == info["labels"]["test"]
    True
"""
from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data.suites import spec

# Data sets whose readers check the class folders (or class names taken from the samples) against
# the real class count: their fixtures use every class, one image per class and split by default.
FULL_CLASSES = ("GTSRB", "RESISC45", "SUN397", "DTD", "EuroSAT", "Caltech101", "Caltech256",
                "Country211", "ImageNet", "OxfordIIITPet", "UCF101")

H, W = 16, 8  # file images: an 8x8 label block over an 8x8 serial block


def encode(label: int, serial: int, h: int = H, w: int = W, gray: bool = False) -> np.ndarray:
    """A uint8 image, ``(h, w, 3)`` (or ``(h, w)`` if ``gray``), whose top half spells ``label`` and
    bottom half ``serial`` (base 16, one digit per channel: up to 4096 in colour, 16 in gray)."""
    def levels(v):
        return [16 * ((v >> (4 * c)) % 16) + 8 for c in range(1 if gray else 3)]
    img = np.zeros((h, w) if gray else (h, w, 3), np.uint8)
    img[: h // 2] = levels(label) if not gray else levels(label)[0]
    img[h // 2:] = levels(serial) if not gray else levels(serial)[0]
    return img


def decode(image) -> tuple[int, int]:
    """``(label, serial)`` spelt by an image made by :func:`encode` (a PIL image or an array);
    grayscale images give them modulo 16, colour ones modulo 4096."""
    arr = np.asarray(image).astype(np.float64)
    h = arr.shape[0]
    if arr.ndim == 2:
        return int(arr[: h // 2].mean()) // 16, int(arr[h // 2:].mean()) // 16
    top, bottom = (arr[s].reshape(-1, arr.shape[2])[:, :3].mean(0) for s in (slice(0, h // 2), slice(h // 2, h)))
    value = lambda px: sum((int(v) // 16) << (4 * c) for c, v in enumerate(px))
    return value(top), value(bottom)


def write_idx(path, array: np.ndarray, magic: int) -> None:
    """An idx file: big-endian int32 ``magic`` (2051 images, 2049 labels), the dimension sizes,
    then the uint8 data; gzipped when ``path`` ends in ``.gz``."""
    array = np.asarray(array, np.uint8)
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


class _Fixture:
    """Writes images and records, per split, the labels and serials in reader order."""

    def __init__(self, root, seed: int):
        self.root = Path(root)
        self.rng = np.random.default_rng(seed)
        self.serial = 0
        self.labels: dict[str, list[int]] = {}
        self.serials: dict[str, list[int]] = {}

    def new(self) -> int:
        self.serial += 1
        return self.serial

    def add(self, split: str, label: int, serial: int) -> None:
        self.labels.setdefault(split, []).append(int(label))
        self.serials.setdefault(split, []).append(int(serial))

    def image(self, path: Path, label: int, serial: int | None = None, array: np.ndarray | None = None) -> int:
        """Write an image file spelling ``label`` (format from the suffix); returns its serial."""
        serial = self.new() if serial is None else serial
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(encode(label, serial) if array is None else array)
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg"):
            im.save(path, "JPEG", quality=95, subsampling=0)
        elif suffix == ".ppm":
            im.save(path, "PPM")
        else:
            im.save(path, "PNG")
        return serial

    def order(self, items):
        """``items`` in a seeded random order (files whose order the reader takes from a list)."""
        items = list(items)
        return [items[i] for i in self.rng.permutation(len(items))]


def _used(full: int, n: int) -> list[int]:
    """``n`` labels spread over ``0..full-1`` (both ends included)."""
    return sorted({int(round(v)) for v in np.linspace(0, full - 1, n)}) if n > 1 else [0]


def make_tv(name: str, root, per_class: int | None = None, n_classes: int | None = None,
            seed: int = 0) -> dict:
    """Write data set ``name`` under ``root`` in the task_vectors / aTLAS layout.

    ``n_classes`` classes get ``per_class`` images in each split (defaults: every class and one
    image for the data sets in :data:`FULL_CLASSES`, else 3 classes spread over the label range
    and 3 images). Class-name files (Cars' ``cars_meta.mat``, CIFAR's meta, …) always hold the
    real number of names.

    Returns:
        ``{"location": the data set's folder, "labels": {split: [label, …]}, "serials": {split:
        [serial, …]}, "classes": the class names a reader must return (or None)}``, both lists in
        the order the reader must list the images.
    """
    s = spec(name)
    full = s.n_classes
    if n_classes is None:
        n_classes = full if s.name in FULL_CLASSES else 3
    if per_class is None:
        per_class = 1 if s.name in FULL_CLASSES and full > 10 else 3
    fx = _Fixture(root, seed)
    location, classes = _MAKERS[s.name](fx, full, n_classes, per_class)
    return {"location": str(location), "labels": fx.labels, "serials": fx.serials, "classes": classes}


# ---------------------------------------------------------------------------------------------
# Array formats.

def _plan(fx: _Fixture, full: int, n_classes: int, per_class: int, split: str):
    """Shuffled ``(label, serial)`` pairs of a split stored in file order, recorded as expected."""
    items = fx.order([(c, fx.new()) for c in _used(full, n_classes) for _ in range(per_class)])
    for label, serial in items:
        fx.add(split, label, serial)
    return items


def _mnist(fx, full, n, per):
    raw = fx.root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, stem in (("train", "train"), ("test", "t10k")):
        items = _plan(fx, full, n, per, split)
        images = np.stack([encode(c, sn, 28, 28, gray=True) for c, sn in items])
        write_idx(raw / f"{stem}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{stem}-labels-idx1-ubyte", np.array([c for c, _ in items]), 2049)
    return raw, [str(i) for i in range(10)]


def _svhn(fx, full, n, per):
    import scipy.io
    folder = fx.root / "svhn"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        items = _plan(fx, full, n, per, split)
        x = np.stack([encode(c, sn, 32, 32) for c, sn in items], axis=3)  # (32, 32, 3, N)
        y = np.array([[10 if c == 0 else c] for c, _ in items], np.uint8)  # digit 0 is stored as 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return folder, [str(i) for i in range(10)]


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def py2_pickle(obj) -> bytes:
    """``obj`` (dicts, lists, str, int, uint8 numpy arrays) pickled as Python 2's cPickle wrote the
    CIFAR batches: protocol 2, text as 8-bit ``str`` (BINSTRING), arrays through
    ``numpy.core.multiarray._reconstruct`` with their bytes as a ``str``."""
    out = bytearray(b"\x80\x02")

    def text(b: bytes):
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int):
        out.extend(b"J" + struct.pack("<i", v))

    def dump(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                dump(k)
                dump(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                dump(v)
            out.extend(b"e")
        elif isinstance(o, str):
            text(o.encode("latin-1"))
        elif isinstance(o, (int, np.integer)):
            integer(int(o))
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")
            text(b"b")
            out.extend(b"\x87R(")
            integer(1)
            out.extend(b"(")
            for d in o.shape:
                integer(d)
            out.extend(b"tcnumpy\ndtype\n")
            text(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            text(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")
            text(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(f"py2_pickle does not write {type(o).__name__}")

    dump(obj)
    out.extend(b".")
    return bytes(out)


def _pickle(path: Path, obj) -> None:
    Path(path).write_bytes(py2_pickle(obj))


def _cifar_rows(items) -> np.ndarray:
    return np.stack([encode(c, sn, 32, 32).transpose(2, 0, 1).reshape(-1) for c, sn in items]).astype(np.uint8)


def _cifar10(fx, full, n, per):
    folder = fx.root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    _pickle(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    items = _plan(fx, full, n, per * 2, "train")
    for b, part in enumerate(np.array_split(np.arange(len(items)), 5), 1):
        chunk = [items[i] for i in part]
        _pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5",
                                             "labels": [c for c, _ in chunk],
                                             "data": _cifar_rows(chunk) if chunk else np.zeros((0, 3072), np.uint8),
                                             "filenames": [f"img_{sn}.png" for _, sn in chunk]})
    items = _plan(fx, full, n, per, "test")
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": [c for c, _ in items],
                                    "data": _cifar_rows(items), "filenames": [f"img_{sn}.png" for _, sn in items]})
    return folder, CIFAR10_NAMES


def _cifar100(fx, full, n, per):
    folder = fx.root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine_{i:02d}" for i in range(full)]
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    for split in ("train", "test"):
        items = _plan(fx, full, n, per, split)
        _pickle(folder / split, {"batch_label": f"{split}ing batch 1 of 1", "fine_labels": [c for c, _ in items],
                                 "coarse_labels": [c // 5 for c, _ in items], "data": _cifar_rows(items),
                                 "filenames": [f"img_{sn}.png" for _, sn in items]})
    return folder, names


STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _stl10(fx, full, n, per):
    folder = fx.root / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    for split in ("train", "test"):
        items = _plan(fx, full, n, per, split)
        # column-major images: bytes are channel, then column, then row
        x = np.stack([encode(c, sn, 96, 96).transpose(2, 1, 0) for c, sn in items])
        x.astype(np.uint8).tofile(folder / f"{split}_X.bin")
        np.array([c + 1 for c, _ in items], np.uint8).tofile(folder / f"{split}_y.bin")
    return folder, STL10_NAMES


# ---------------------------------------------------------------------------------------------
# Image folders.

def _folders(fx, base: Path, splits, names: list[str], n: int, per: int, ext: str = ".jpg"):
    """ImageFolder splits: ``base/<sub>/<name>/<serial>.ext`` for the first ``n`` sorted names."""
    names = sorted(names)[:n]
    for split, sub in splits:
        for label, c in enumerate(names):
            for _ in range(per):
                serial = fx.new()
                fx.image(base / sub / c / f"img_{serial:05d}{ext}", label, serial)
                fx.add(split, label, serial)
    return names


DTD_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
]


def _dtd(fx, full, n, per):
    base = fx.root / "dtd"
    names = _folders(fx, base, (("train", "train"), ("test", "val")), DTD_CLASSES, n, per)
    return base, names


def _sun397_folders(full: int) -> list[str]:
    words = ["abbey", "airport_terminal", "bakery_shop", "canyon", "dining_room", "forest_path"]
    return sorted(f"{w[0]}_{w}_{i:03d}" for i, w in ((i, words[i % len(words)]) for i in range(full)))


def _sun397(fx, full, n, per):
    base = fx.root / "sun397"
    names = _folders(fx, base, (("train", "train"), ("test", "val")), _sun397_folders(full), n, per)
    return base, [c[2:].replace("_", " ") for c in names]


EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
EUROSAT_NAMES = ["annual crop land", "forest", "brushland or shrubland", "highway or road",
                 "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                 "residential buildings or homes or apartments", "river", "lake or sea"]


def _eurosat(fx, full, n, per):
    base = fx.root / "EuroSAT_splits"
    names = _folders(fx, base, (("train", "train"), ("val", "val"), ("test", "test")), EUROSAT_FOLDERS, n, per)
    return base, [EUROSAT_NAMES[EUROSAT_FOLDERS.index(c)] for c in names]


def _country_codes(full: int) -> list[str]:
    return sorted(f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(full))


def _country211(fx, full, n, per):
    base = fx.root / "country211"
    _folders(fx, base, (("train", "train"), ("val", "valid"), ("test", "test")), _country_codes(full), n, per)
    return base, None


def _imagenet(fx, full, n, per):
    base = fx.root / "imagenet"
    _folders(fx, base, (("train", "train"), ("test", "val_in_folder")),
             [f"n{1440764 + 97 * i:08d}" for i in range(full)], n, per, ext=".JPEG")
    return base, None


RESISC45_FOLDERS = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert",
    "forest", "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area",
    "intersection", "island", "lake", "meadow", "medium_residential", "mobile_home_park",
    "mountain", "overpass", "palace", "parking_lot", "railway", "railway_station",
    "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]


def _resisc45(fx, full, n, per):
    base = fx.root / "resisc45"
    names = RESISC45_FOLDERS[:n]
    lists = {"train": [], "val": [], "test": []}
    for label, c in enumerate(names):
        k = 0
        for split in ("train", "val", "test"):
            for _ in range(per):
                k += 1
                fname = f"{c}_{k:03d}.jpg"
                serial = fx.image(base / "NWPU-RESISC45" / c / fname, label)
                lists[split].append(fname)
                if split != "val":
                    fx.add(split, label, serial)
    for split, fnames in lists.items():
        (base / f"resisc45-{split}.txt").write_text("\n".join(fx.order(fnames)) + "\n")
    return base, [c.replace("_", " ") for c in names]


def _gtsrb(fx, full, n, per):
    base = fx.root / "gtsrb"
    train = base / "GTSRB" / "Training"
    for label in range(n):
        folder = train / f"{label:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for k in range(per):
            fname = f"{k // 30:05d}_{k % 30:05d}.ppm"
            serial = fx.image(folder / fname, label)
            fx.add("train", label, serial)
            rows.append(f"{fname};{W};{H};0;0;{W - 1};{H - 1};{label}")
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(rows) + "\n")
    images = base / "GTSRB" / "Final_Test" / "Images"
    items = fx.order([(label, fx.new()) for label in range(n) for _ in range(per)])
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for label, serial in sorted(items, key=lambda t: t[1]):
        fx.image(images / f"{serial:05d}.ppm", label, serial)
    for label, serial in items:
        rows.append(f"{serial:05d}.ppm;{W};{H};0;0;{W - 1};{H - 1};{label}")
        fx.add("test", label, serial)
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return base, None


# ---------------------------------------------------------------------------------------------
# Annotation files.

def _cars_annotations(items, with_class: bool = True) -> np.ndarray:
    """The ``annotations`` struct array of the Cars devkit: bbox, ``class`` (1-based), ``fname``."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    out = np.empty((1, len(items)), dtype=[(f, "O") for f in fields])
    for k, (fname, label) in enumerate(items):
        vals = [np.array([[v]], np.uint16) for v in (1, 1, W, H)]
        cls = [np.array([[label + 1]], np.uint8)] if with_class else []
        out[0, k] = tuple(vals + cls + [np.array([fname])])
    return out


def _cars(fx, full, n, per):
    import scipy.io
    base = fx.root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = [f"Make_{i:03d} Model {2000 + i % 13}" for i in range(full)]
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    for split, folder, mat in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                               ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        items = _plan(fx, full, n, per, split)
        annos = []
        for k, (label, serial) in enumerate(items, 1):
            fname = f"{k:05d}.jpg"
            fx.image(base / folder / fname, label, serial)
            annos.append((fname, label))
        scipy.io.savemat(mat, {"annotations": _cars_annotations(annos)})
        if split == "test":
            scipy.io.savemat(base / "devkit" / "cars_test_annos.mat",
                             {"annotations": _cars_annotations(annos, with_class=False)})
    return base, [c.replace("_", " ") for c in names]


def _food101(fx, full, n, per):
    base = fx.root / "food-101"
    names = sorted(f"dish_{i:03d}" for i in range(full))
    used = [names[i] for i in _used(full, n)]
    (base / "meta").mkdir(parents=True)
    for split in ("train", "test"):
        meta = {}
        for c in fx.order(names):  # the json's key order is not the label order
            meta[c] = []
            if c in used:
                for _ in range(per):
                    serial = fx.new()
                    fx.image(base / "images" / c / f"{serial}.jpg", names.index(c), serial)
                    meta[c].append(f"{c}/{serial}")
                    fx.add(split, names.index(c), serial)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return base, [c.replace("_", " ") for c in names]


def _caltech_expected(fx, items):
    import torch
    from torch.utils.data import random_split
    n = len(items)
    train, test = random_split(range(n), [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(0))
    for split, part in (("train", train), ("test", test)):
        for i in part.indices:
            fx.add(split, *items[i])


def _caltech101(fx, full, n, per):
    base = fx.root / "caltech101"
    cats = sorted([f"cat_{i:03d}" for i in range(n - 1)] + ["Faces_easy"]) if n else []
    cats_dir = base / "101_ObjectCategories"
    fx.image(cats_dir / "BACKGROUND_Google" / "image_0001.jpg", 0)
    items = []
    for label, c in enumerate(cats):
        for k in range(1, per * 2 + 1):
            items.append((label, fx.image(cats_dir / c / f"image_{k:04d}.jpg", label)))
    _caltech_expected(fx, items)
    return base, [c.split(".")[-1].replace("-", " ").replace(" 101", "") for c in cats]


def _caltech256(fx, full, n, per):
    base = fx.root / "caltech256"
    cats = [f"{i + 1:03d}.thing-{i}" if i != 1 else "002.faces-easy-101" for i in range(n)]
    cats_dir = base / "256_ObjectCategories"
    items = []
    for label, c in enumerate(cats):
        for k in range(1, per * 2 + 1):
            items.append((label, fx.image(cats_dir / c / f"{label + 1:03d}_{k:04d}.jpg", label)))
        (cats_dir / c / "RENAME2").write_text("not an image\n")  # real folders hold such strays
    _caltech_expected(fx, items)
    return base, [c.split(".")[-1].replace("-", " ").replace(" 101", "") for c in cats]


def _fgvc(fx, full, n, per):
    base = fx.root / "fgvc-aircraft-2013b"
    data = base / "data"
    data.mkdir(parents=True)
    names = [f"Variant {i:03d}" if i % 3 else f"F-{i}A/B" for i in range(full)]
    (data / "variants.txt").write_text("\n".join(names) + "\n")
    for split in ("train", "val", "test"):
        lines = []
        for label, serial in _plan(fx, full, n, per, split):
            image_id = f"{1000000 + serial:07d}"
            fx.image(data / "images" / f"{image_id}.jpg", label, serial)
            lines.append(f"{image_id} {names[label]}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return base, names


def _flowers(fx, full, n, per):
    import scipy.io
    base = fx.root / "flowers-102"
    plans = {split: _plan(fx, full, n, per, split) for split in ("train", "val", "test")}
    everything = sorted((serial, label) for p in plans.values() for label, serial in p)
    ids = {serial: k for k, (serial, _) in enumerate(everything, 1)}  # image ids 1..N
    for serial, label in everything:
        fx.image(base / "jpg" / f"image_{ids[serial]:05d}.jpg", label, serial)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([[label + 1 for _, label in everything]], np.uint8)})
    scipy.io.savemat(base / "setid.mat", {key: np.array([[ids[serial] for _, serial in plans[split]]], np.uint16)
                                          for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))})
    return base, None


def _pets(fx, full, n, per):
    base = fx.root / "oxford-iiit-pet"
    breeds = [f"Breed{i:02d}" if i % 2 else f"breed_dog_{i:02d}" for i in range(full)]
    (base / "annotations").mkdir(parents=True)
    k = 0
    for split, file in (("train", "trainval"), ("test", "test")):
        lines = []
        for label, serial in _plan(fx, full, n, per, split):
            k += 1
            image_id = f"{breeds[label]}_{k}"
            fx.image(base / "images" / f"{image_id}.jpg", label, serial)
            lines.append(f"{image_id} {label + 1} {1 + label % 2} {label // 2 + 1}")
        (base / "annotations" / f"{file}.txt").write_text("\n".join(lines) + "\n")
    return base, [" ".join(p.title() for p in b.split("_")) for b in breeds]


def _cub(fx, full, n, per):
    base = fx.root / "CUB_200_2011"
    base.mkdir(parents=True)
    folders = [f"{i + 1:03d}.Bird_Name_{i + 1:03d}" for i in range(full)]
    (base / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(folders)))
    entries = [(split, label, serial) for split in ("train", "test")
               for label, serial in _plan(fx, full, n, per, split)]
    # images.txt is sorted by class, so it interleaves the splits; each split keeps its order
    images, labels, flags = [], [], []
    for image_id, (split, label, serial) in enumerate(sorted(entries, key=lambda e: (e[1], e[0], e[2])), 1):
        rel = f"{folders[label]}/{folders[label].split('.')[1]}_{serial:04d}_{image_id}.jpg"
        fx.image(base / "images" / rel, label, serial)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {label + 1}")
        flags.append(f"{image_id} {1 if split == 'train' else 0}")
    fx.labels.clear()
    fx.serials.clear()
    for split, label, serial in sorted(entries, key=lambda e: (e[1], e[0], e[2])):
        fx.add(split, label, serial)
    for fname, rows in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", flags)):
        (base / fname).write_text("\n".join(rows) + "\n")
    return base, [f.split(".")[-1].replace("_", " ") for f in folders]


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def voc_xml(filename: str, objects, width: int, height: int) -> str:
    """A VOC2007 annotation file; ``objects`` are ``(class name, (xmin, ymin, xmax, ymax))``."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n" for name, b in objects)
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{filename}</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objs}</annotation>\n")


def _voc(fx, full, n, per):
    base = fx.root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    used = _used(full, n)
    image_no = 0
    for split in ("train", "val", "test"):
        ids = []
        for k in range(per):
            image_no += 1
            image_id = f"{image_no:06d}"
            labels = [used[(k + j) % len(used)] for j in range(1 + k % 2)]  # one or two objects
            blocks, objects = [], []
            for j, label in enumerate(labels):
                serial = fx.new()
                blocks.append(encode(label, serial))
                objects.append((VOC_CLASSES[label], (W * j, 0, W * (j + 1), H)))
                fx.add(split, label, serial)
            fx.image(base / "JPEGImages" / f"{image_id}.jpg", 0, array=np.concatenate(blocks, axis=1))
            (base / "Annotations" / f"{image_id}.xml").write_text(
                voc_xml(f"{image_id}.jpg", objects, W * len(labels), H))
            ids.append(f"{image_id} {' 1' if VOC_CLASSES[labels[0]] == 'aeroplane' else '-1'}")
        (base / "ImageSets" / "Main" / f"aeroplane_{split}.txt").write_text("\n".join(ids) + "\n")
    return base, None


def _ucf101(fx, full, n, per):
    base = fx.root / "UCF-101-midframes"
    folders = [f"Action{i:03d}Move" for i in range(full)]
    names = [f"Action{i:03d}_Move" for i in range(full)]
    split_json = {}
    for split in ("train", "val", "test"):
        entries = []
        for label, serial in _plan(fx, full, n, per, split):
            rel = f"{folders[label]}/v_{folders[label]}_g{serial:03d}_c01.jpg"
            fx.image(base / rel, label, serial)
            entries.append([rel, label, names[label]])
        split_json[split] = entries
    (base / "split_zhou_UCF101.json").write_text(json.dumps(split_json))
    return base, names


_MAKERS = {
    "MNIST": _mnist, "SVHN": _svhn, "GTSRB": _gtsrb, "RESISC45": _resisc45, "SUN397": _sun397,
    "DTD": _dtd, "EuroSAT": _eurosat, "Cars": _cars, "CIFAR10": _cifar10, "CIFAR100": _cifar100,
    "STL10": _stl10, "Food101": _food101, "Caltech101": _caltech101, "Caltech256": _caltech256,
    "FGVCAircraft": _fgvc, "Flowers102": _flowers, "OxfordIIITPet": _pets, "CUB200": _cub,
    "PascalVOC": _voc, "Country211": _country211, "UCF101": _ucf101, "ImageNet": _imagenet,
}


def remove(path) -> None:
    """Delete a file or a folder tree (for malformed-layout tests)."""
    path = Path(path)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
