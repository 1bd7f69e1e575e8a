"""Hugging Face datasets as a hub download leaves them (FusionBench's data): Parquet shards
``data/<split>-NNNNN-of-MMMMM.parquet`` with an ``image`` column (``{bytes, path}``, encoded
PNG/JPEG) and an integer ``label`` column, read with pyarrow (no ``datasets`` package).

Where a data set is looked for under the data root, in this order (``<key>`` is the FusionBench
key, ``<org>/<repo>`` the hub id FusionBench downloads, e.g. ``tanganke/sun397``):
``<root>/<key>``, ``<root>/<repo>``, ``<root>/<org>/<repo>``, ``<root>/<org>___<repo>``, and the
hub cache form ``<root>/datasets--<org>--<repo>/snapshots/<commit>`` (the commit ``refs/main``
names, else the only snapshot). A folder counts when it holds ``data/*.parquet`` (or
``*.parquet`` at its top); split names are the file-name prefixes.

Split names: ``train`` and ``test``; ``food101``'s test set is its ``validation`` split (as
FusionBench reads it); Flowers102 keeps its ``validation`` split as its own validation split.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from harness.api import HarnessError
from harness.data.raw import RawData
from harness.data.samples import ParquetSamples
from harness.data.suites import Spec, spec as find_spec

_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)(?:-\d{5}-of-\d{5})?\.parquet$")
# Which hub split is the reference test split, and which is a shipped validation split.
_TEST = {"food101": "validation"}
_OWN_VAL = {"Flowers102": "validation"}


def _candidates(s: Spec, root: Path) -> list[Path]:
    out = []
    if s.fb:
        out.append(root / s.fb)
    out.append(root / s.name)
    if s.hf:
        org, repo = s.hf.split("/")
        out += [root / repo, root / org / repo, root / f"{org}___{repo}"]
        cache = root / f"datasets--{org}--{repo}"
        if cache.is_dir():
            ref = cache / "refs" / "main"
            snaps = cache / "snapshots"
            if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
                out.append(snaps / ref.read_text().strip())
            elif snaps.is_dir() and len(list(snaps.iterdir())) == 1:
                out.append(next(snaps.iterdir()))
    return out


def _shards(folder: Path) -> dict[str, list[Path]]:
    """``{split: sorted shard files}`` of a folder (its ``data/`` sub-folder, else its top)."""
    for d in (folder / "data", folder):
        if not d.is_dir():
            continue
        found: dict[str, list[Path]] = {}
        for f in sorted(d.iterdir()):
            m = _SHARD.match(f.name)
            if m and f.is_file():
                found.setdefault(m.group("split"), []).append(f)
        if found:
            return found
    return {}


def locate(name: str, root: str) -> str | None:
    """The folder under ``root`` holding ``name`` as Parquet shards, or None."""
    s = find_spec(name)
    if s is None:
        return None
    for c in _candidates(s, Path(root)):
        if c.is_dir() and _shards(c):
            return str(c)
    return None


def _check_shards(files: list[Path], split: str, folder: Path) -> None:
    """Sharded names must be complete: ``-00000-of-00003`` … ``-00002-of-00003``."""
    nums = [re.search(r"-(\d{5})-of-(\d{5})\.parquet$", f.name) for f in files]
    if not any(nums):
        return
    if not all(nums):
        raise HarnessError(f"{folder}: split '{split}' mixes sharded and unsharded Parquet files")
    total = {int(m.group(2)) for m in nums}
    have = sorted(int(m.group(1)) for m in nums)
    if len(total) != 1 or have != list(range(next(iter(total)))):
        want = max(total)
        missing = sorted(set(range(want)) - set(have))
        raise HarnessError(f"{folder}: split '{split}' is missing shard(s) "
                           f"{', '.join(f'{split}-{i:05d}-of-{want:05d}.parquet' for i in missing[:3])}")


def read_split(files: list[Path], n_classes: int | None) -> ParquetSamples:
    """The rows of one split's shards: labels read now (one column), images listed by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows, labels = [], []
    for k, f in enumerate(files):
        try:
            pf = pq.ParquetFile(str(f))
        except Exception as e:
            raise HarnessError(f"{f} is not a readable Parquet file: {type(e).__name__}: {e}") from None
        names = pf.schema_arrow.names
        for col in ("image", "label"):
            if col not in names:
                raise HarnessError(f"{f} has no '{col}' column (columns: {', '.join(names)}); "
                                   "expected a Hugging Face image data set with image and label")
        image_type = pf.schema_arrow.field("image").type
        if not (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0) \
                and not pa.types.is_binary(image_type) and not pa.types.is_large_binary(image_type):
            raise HarnessError(f"{f}: column 'image' is {image_type}, not encoded image bytes "
                               "(a struct with 'bytes', or binary)")
        label_type = pf.schema_arrow.field("label").type
        if not (pa.types.is_integer(label_type) or pa.types.is_boolean(label_type)):
            raise HarnessError(f"{f}: column 'label' is {label_type}, not integer class indices")
        for g in range(pf.num_row_groups):
            try:
                y = pf.read_row_group(g, columns=["label"]).column("label")
            except Exception as e:
                raise HarnessError(f"cannot read {f} row group {g}: {type(e).__name__}: {e}") from None
            if y.null_count:
                raise HarnessError(f"{f} row group {g}: {y.null_count} row(s) without a label")
            y = np.asarray(y.to_numpy(zero_copy_only=False)).astype(np.int64)
            labels.append(y)
            rows.append(np.stack([np.full(len(y), k), np.full(len(y), g), np.arange(len(y))], 1))
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if n_classes is not None and len(y) and (y.min() < 0 or y.max() >= n_classes):
        bad = int(y[(y < 0) | (y >= n_classes)][0])
        raise HarnessError(f"{files[0].parent}: label {bad} is outside 0..{n_classes - 1} "
                           f"({n_classes} classes)")
    return ParquetSamples([str(f) for f in files], np.concatenate(rows) if rows else np.zeros((0, 3)), y)


def read(name: str, root: str) -> RawData:
    """The data set's train and test splits (and a shipped validation split) from Parquet shards."""
    s = find_spec(name)
    folder = locate(name, root) if s else None
    if folder is None:
        raise HarnessError(f"data set '{name}' not found as Parquet shards under {root}")
    shards = _shards(Path(folder))
    test = _TEST.get(s.fb or "", "test")
    want = {"train": "train", "test": test}
    if s.name in _OWN_VAL and _OWN_VAL[s.name] in shards:
        want["val"] = _OWN_VAL[s.name]
    missing = [hub for hub in want.values() if hub not in shards]
    if missing:
        raise HarnessError(f"{folder}: no '{missing[0]}' split (found {', '.join(sorted(shards))}); "
                           f"expected data/{missing[0]}-NNNNN-of-MMMMM.parquet")
    splits = {}
    for ours, hub in want.items():
        _check_shards(shards[hub], hub, Path(folder))
        splits[ours] = read_split(shards[hub], s.n_classes)
    return RawData(s.name, "hf", folder, splits)


def fetch_hint(name: str) -> str:
    """How to download ``name`` as FusionBench does, on a machine with network."""
    s = find_spec(name)
    if s is None or not s.hf:
        return "no Hugging Face copy is known for this data set"
    return (f"huggingface-cli download --repo-type dataset {s.hf} --local-dir "
            f"<data_root>/{s.fb or s.name}")


def folder_size(folder: str) -> int:
    """Bytes of the Parquet shards in a folder (for reports)."""
    return sum(os.path.getsize(f) for fs in _shards(Path(folder)).values() for f in fs)
