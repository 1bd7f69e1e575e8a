"""File and folder helpers shared by the task_vectors-layout readers: reading text and .mat
files, listing folders once, and the one-line complaint (:class:`_Bad`) a malformed layout raises."""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np

from harness.data.samples import FileSamples

# torchvision.datasets.folder.IMG_EXTENSIONS (torchvision 0.29.1), matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class _Bad(Exception):
    """A malformed layout: ``path`` (a file or folder) and what is wrong with it."""

    def __init__(self, path, what: str):
        super().__init__(what)
        self.path, self.what = str(path), what


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
