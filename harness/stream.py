"""Splits that are not held in memory: image files decoded in batches, or small raw arrays
resized in batches, so a large test split costs its file list, not its pixels.

A :class:`LazySplit` stands where a source keeps a resident tensor of inputs
(``ModelSource.inputs[ds][split]``): it has a length, fancy indexing (``split[idx]`` decodes just
those images, e.g. a task's search subset of the test split) and :meth:`LazySplit.batches`, which
:meth:`harness.sources.base.ModelSource.accuracy` streams. What it yields are uint8 images at the
model's resolution; the source normalises them on the device, exactly as a resident compact split.

Image files go through the source's own inference transform, split in two by
:func:`uint8_transform`: decode, resize and crop (and RGB conversion) on the host, in
:class:`torch.utils.data.DataLoader` worker processes; ``/ 255`` and the normalisation on the
device. The two halves compose to exactly open_clip's preprocessing (tested).

Example:
    >>> split = FolderSplit(files, transform)            # files: image paths in label order
    >>> for x in split.batches(256, device):             # uint8 (B, 3, S, S) on the device
    ...     pass
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from harness.api import HarnessError


def uint8_transform(preprocess) -> tuple[Callable, tuple[float, ...], tuple[float, ...]] | None:
    """Split an inference transform ending in ``ToTensor, Normalize`` (open_clip's) into its
    uint8 part (PIL image → uint8 tensor (3, S, S): everything before ``ToTensor``, then
    ``PILToTensor``) and its normalisation's mean and std. ``(x.float() / 255 − mean) / std`` of
    the uint8 part is then bit for bit what ``preprocess`` returns. None for a transform of
    another shape (the caller then keeps fp32 inputs)."""
    from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or not isinstance(steps[-2], ToTensor):
        return None
    norm = steps[-1]
    return (Compose([*steps[:-2], PILToTensor()]),
            tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std))


class SquashResize:
    """PIL image → uint8 (3, size, size): RGB, bilinear resize to a square (aspect ratio not
    kept), for a model whose own transform :func:`uint8_transform` cannot split."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, im) -> Tensor:
        from PIL import Image
        im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"SquashResize({self.size}, bilinear)"


def one_line_error(e: HarnessError) -> HarnessError:
    """A HarnessError raised in a DataLoader worker comes back wrapped in the worker's traceback;
    this is the original one-line message again."""
    text = str(e).strip()
    if "\n" not in text:
        return e
    last = text.splitlines()[-1]
    return HarnessError(last.split("HarnessError: ", 1)[-1])


def iterate_loader(loader) -> Iterator:
    """``loader``'s batches; a worker's HarnessError (an image that cannot be read) surfaces as
    the same one-line error it would be in this process."""
    try:
        yield from loader
    except HarnessError as e:
        raise one_line_error(e) from None


class LazySplit:
    """A split read on demand. Subclasses implement :meth:`_read` (uint8 (k, 3, S, S) on the CPU
    for positions ``idx``) and :meth:`fingerprint`."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, idx: np.ndarray) -> Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash that changes when what this split yields could change."""
        raise NotImplementedError

    @property
    def item_bytes(self) -> int:
        """Bytes of one image as held: 3 × S × S."""
        return 3 * self.size * self.size

    def __getitem__(self, idx) -> Tensor:
        """Decode the images at ``idx`` (int, slice, index array or tensor) onto :attr:`device`."""
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        elif isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        idx = np.asarray(idx, dtype=np.int64)
        single = idx.ndim == 0
        idx = idx.reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} images")
        x = self._read(idx % max(len(self), 1)).to(self.device)
        return x[0] if single else x

    def to(self, device) -> "LazySplit":
        """Where :meth:`__getitem__` and :meth:`batches` put what they read (the split itself
        stays on disk). In place."""
        self.device = torch.device(device)
        return self

    def batches(self, batch_size: int, device=None) -> Iterator[Tensor]:
        """The whole split in order, ``batch_size`` images at a time, on ``device``."""
        device = torch.device(device) if device is not None else self.device
        for i in range(0, len(self), batch_size):
            yield self._read(np.arange(i, min(i + batch_size, len(self)))).to(device)

    def _stream(self, dataset, batch_size: int, device=None) -> Iterator[Tensor]:
        """:meth:`batches` of a split whose items ``dataset[i]`` are ``(uint8 image, i)``: decoded in
        :attr:`workers` DataLoader processes (in this one when there are none, or one batch holds
        the whole split), in order, which is checked (labels are matched by position)."""
        device = torch.device(device) if device is not None else self.device
        if self.workers <= 0 or len(self) <= batch_size:
            yield from LazySplit.batches(self, batch_size, device)
            return
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=self.workers,
            pin_memory=device.type == "cuda", persistent_workers=False)
        expect = 0
        for x, pos in iterate_loader(loader):
            if int(pos[0]) != expect:
                raise HarnessError(f"image loader returned position {int(pos[0])}, expected {expect}")
            expect += len(pos)
            yield x.to(device, non_blocking=True)

    def hwc(self) -> "HWCView":
        """The split as raw images (N, S, S, 3) indexed on demand, for tasks that augment them."""
        return HWCView(self)


class HWCView:
    """``view[idx]`` → uint8 numpy images (k, S, S, 3) of a :class:`LazySplit` (what
    ``ModelSource.images`` holds for resident splits)."""

    def __init__(self, split: LazySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx) -> np.ndarray:
        return self.split[idx].cpu().permute(0, 2, 3, 1).numpy()


class _Files(torch.utils.data.Dataset):
    """The DataLoader's view of a :class:`FolderSplit`: item i is (uint8 image, i)."""

    def __init__(self, files: Sequence[str], transform: Callable):
        self.files, self.transform = list(files), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return read_image(self.files[i], self.transform), i


def read_image(path: str, transform: Callable) -> Tensor:
    """One image file through ``transform`` (PIL → uint8 (3, S, S)); a file that is not an image
    is a one-line HarnessError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            x = transform(im)
    except (OSError, UnidentifiedImageError) as e:
        raise HarnessError(f"cannot read image {path}: {e}") from None
    if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
        raise HarnessError(f"the image transform turned {path} into {x.dtype} {tuple(x.shape)}, "
                           "not uint8 (3, S, S)")
    return x


class FolderSplit(LazySplit):
    """Image files decoded in batches through ``transform`` (see :func:`uint8_transform`).

    Args:
        files: the image paths, in the split's order (its labels are the source's business).
        transform: PIL image → uint8 tensor (3, size, size).
        size: the side of what ``transform`` returns.
        workers: DataLoader worker processes for :meth:`batches` (0: decode in this process).
            They start for one pass and shut down when it ends or is abandoned.
        description: what the transform is, for :meth:`fingerprint` (e.g. its repr).
    """

    def __init__(self, files: Sequence[str | Path], transform: Callable, size: int, workers: int = 2,
                 description: str = ""):
        self.files = [str(f) for f in files]
        self.transform, self.size, self.workers = transform, int(size), int(workers)
        self.description = description or repr(transform)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderSplit({len(self)} files, size={self.size}, workers={self.workers})"

    def _read(self, idx: np.ndarray) -> Tensor:
        if not len(idx):
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return torch.stack([read_image(self.files[i], self.transform) for i in idx.tolist()])

    def batches(self, batch_size: int, device=None) -> Iterator[Tensor]:
        yield from self._stream(_Files(self.files, self.transform), batch_size, device)

    def fingerprint(self) -> str:
        """Hash of each file's path, size and modification time, and of the transform: an edited,
        added or removed file, or another transform, gives another fingerprint."""
        h = hashlib.sha256(f"{self.size}|{self.description}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


class ArraySplit(LazySplit):
    """Small raw images (e.g. a built-in 28-px data set) resized to ``size`` on demand with
    :func:`harness.data.to_uint8`: the same values as resizing the whole split at once."""

    def __init__(self, images: np.ndarray, size: int):
        self.images, self.size = images, int(size)

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, idx: np.ndarray) -> Tensor:
        from harness.data import to_uint8
        if not len(idx):
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return to_uint8(self.images[idx], self.size, channels=3)

    def hwc(self) -> np.ndarray:
        """The raw images themselves (what a resident split of them keeps as ``images``)."""
        return self.images

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.size}|{self.images.shape}|{self.images.dtype}|".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()[:16]


class _Items(torch.utils.data.Dataset):
    """The DataLoader's view of a :class:`SampleSplit`: item i is (uint8 image, i)."""

    def __init__(self, samples, transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return transform_image(self.samples.open(i), self.transform, self.samples.where(i)), i


def transform_image(im, transform: Callable, where: str) -> Tensor:
    """A decoded PIL image through ``transform`` (PIL → uint8 (3, S, S)), RGB first."""
    try:
        x = transform(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise HarnessError(f"cannot transform image {where}: {e}") from None
    if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
        raise HarnessError(f"the image transform turned {where} into {x.dtype} {tuple(x.shape)}, "
                           "not uint8 (3, S, S)")
    return x


class SampleSplit(LazySplit):
    """A benchmark split (:class:`harness.data.samples.Samples`: files, arrays or Parquet rows)
    decoded in batches through ``transform``, in DataLoader worker processes for whole passes.

    Grayscale and palette images are converted to RGB before the transform, as the reference
    code's ``convert("RGB")`` does. A file that cannot be decoded is a one-line error naming it:
    a split is never scored with images silently left out.
    """

    def __init__(self, samples, transform: Callable, size: int, workers: int = 2, description: str = ""):
        self.samples, self.transform = samples, transform
        self.size, self.workers = int(size), int(workers)
        self.description = description or repr(transform)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SampleSplit({type(self.samples).__name__}, {len(self)} images, size={self.size})"

    def _read(self, idx: np.ndarray) -> Tensor:
        if not len(idx):
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return torch.stack([transform_image(self.samples.open(i), self.transform, self.samples.where(i))
                            for i in idx.tolist()])

    def batches(self, batch_size: int, device=None) -> Iterator[Tensor]:
        yield from self._stream(_Items(self.samples, self.transform), batch_size, device)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.size}|{self.description}|{self.samples.fingerprint()}".encode())
        return h.hexdigest()[:16]
