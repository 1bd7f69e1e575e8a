"""Samples of a data set split, listed without decoding: image files, in-memory arrays (MNIST's
idx files, SVHN's .mat) or rows of Parquet shards (Hugging Face datasets).

A :class:`Samples` knows how many images it has, their labels, how to open image ``i`` as a PIL
image, where image ``i`` comes from (for error messages) and a fingerprint of what it yields. It
is picklable, so :class:`harness.stream.SampleSplit` can hand it to DataLoader worker processes,
which decode and transform images in parallel.

Example:
    >>> s = FileSamples(["a.png", "b.png"], [0, 1])
    >>> s.open(1).size, s.where(1)
    ((32, 32), 'b.png')
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Sequence

import numpy as np

from harness.api import HarnessError


class Samples:
    """Base class: ``labels`` (int64, one per image) and :meth:`open`, :meth:`where`,
    :meth:`fingerprint`, :meth:`subset`."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int):
        """Image ``i`` as a PIL image (decoded, any mode)."""
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where image ``i`` comes from, for messages: a path, or a shard and row."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash that changes when the images or labels could have changed."""
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> "Samples":
        """The images at positions ``idx``, in that order."""
        return Subset(self, idx)


def _pil(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise HarnessError(f"cannot decode image {where}: {e}") from None


class FileSamples(Samples):
    """Image files with their labels; ``boxes`` (optional, one ``(left, top, right, bottom)`` per
    image) crops each image to a box once opened (PASCAL VOC's one-sample-per-object protocol)."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int],
                 boxes: Sequence[tuple[int, int, int, int]] | None = None):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.boxes = None if boxes is None else [tuple(int(v) for v in b) for b in boxes]
        if len(self.paths) != len(self.labels) or (self.boxes is not None and len(self.boxes) != len(self.paths)):
            raise HarnessError(f"{len(self.paths)} image files for {len(self.labels)} labels")

    def open(self, i: int):
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise HarnessError(f"cannot read image {path}: {e.strerror or e}") from None
        im = _pil(data, path)
        return im.crop(self.boxes[i]) if self.boxes is not None else im

    def where(self, i: int) -> str:
        return self.paths[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"files")
        for i, p in enumerate(self.paths):
            st = os.stat(p)
            box = self.boxes[i] if self.boxes is not None else ""
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{self.labels[i]}|{box}\n".encode())
        return h.hexdigest()[:16]

    def subset(self, idx: Sequence[int]) -> "FileSamples":
        idx = [int(i) for i in idx]
        return FileSamples([self.paths[i] for i in idx], self.labels[idx],
                           None if self.boxes is None else [self.boxes[i] for i in idx])


class ArraySamples(Samples):
    """uint8 images held in memory, (N, H, W) grayscale or (N, H, W, 3) RGB (decoded from MNIST's
    idx files, SVHN's .mat, …); ``origin`` names where they were read from."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], origin: str):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise HarnessError(f"{origin}: expected uint8 images (N,H,W) or (N,H,W,3), got "
                               f"{images.dtype} {images.shape}")
        self.images, self.origin = images, origin
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.images) != len(self.labels):
            raise HarnessError(f"{origin}: {len(self.images)} images for {len(self.labels)} labels")

    def open(self, i: int):
        from PIL import Image
        return Image.fromarray(self.images[i])

    def where(self, i: int) -> str:
        return f"{self.origin} image {i}"

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"array|{self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


class ParquetSamples(Samples):
    """Rows of Parquet shards with an ``image`` column (a struct ``{bytes, path}`` holding encoded
    PNG/JPEG, the Hugging Face ``datasets`` Image feature) and a ``label`` column.

    ``rows`` lists ``(shard index, row group, row in group)`` per image; a process reads one row
    group at a time and keeps the last one, so reading in order decodes each group once.
    """

    def __init__(self, shards: Sequence[str], rows: np.ndarray, labels: Sequence[int]):
        self.shards = [str(s) for s in shards]
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self._group: tuple[int, int] | None = None
        self._column = None

    def __getstate__(self):  # workers re-read their own row groups
        return {**self.__dict__, "_group": None, "_column": None}

    def _image_bytes(self, i: int) -> bytes:
        import pyarrow.parquet as pq
        shard, group, row = (int(v) for v in self.rows[i])
        if self._group != (shard, group):
            try:
                table = pq.ParquetFile(self.shards[shard]).read_row_group(group, columns=["image"])
            except Exception as e:  # pyarrow raises several kinds for damaged files
                raise HarnessError(f"cannot read {self.shards[shard]} row group {group}: "
                                   f"{type(e).__name__}: {e}") from None
            self._column = table.column("image").combine_chunks()
            self._group = (shard, group)
        value = self._column[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, (bytes, bytearray)):
            raise HarnessError(f"{self.where(i)}: the image column holds no encoded image bytes")
        return bytes(data)

    def open(self, i: int):
        return _pil(self._image_bytes(i), self.where(i))

    def where(self, i: int) -> str:
        shard, group, row = (int(v) for v in self.rows[i])
        return f"{self.shards[shard]} row group {group} row {row}"

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"parquet")
        for s in self.shards:
            st = os.stat(s)
            h.update(f"{s}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(self.rows.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]

    def subset(self, idx: Sequence[int]) -> "ParquetSamples":
        idx = np.asarray(idx, dtype=np.int64)
        return ParquetSamples(self.shards, self.rows[idx], self.labels[idx])


class Subset(Samples):
    """Positions ``idx`` of another :class:`Samples` (for kinds without their own ``subset``)."""

    def __init__(self, base: Samples, idx: Sequence[int]):
        self.base, self.idx = base, np.asarray(idx, dtype=np.int64).reshape(-1)
        self.labels = base.labels[self.idx]

    def open(self, i: int):
        return self.base.open(int(self.idx[i]))

    def where(self, i: int) -> str:
        return self.base.where(int(self.idx[i]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(self.idx.tobytes())
        return h.hexdigest()[:16]
