"""Tiny Hugging Face image data sets as a hub download leaves them: ``<root>/<key>/data/
<split>-NNNNN-of-MMMMM.parquet`` with an ``image`` struct column ``{bytes, path}`` (encoded PNG or
JPEG) and an int64 ``label`` column, written with pyarrow the way ``datasets`` stores them."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def label_image(label: int, i: int, size: int = 24) -> np.ndarray:
    """An RGB image whose colour says its label (and a corner pixel its index), so a test can
    read a decoded image's label back: red channel = 20 * label + 10."""
    im = np.zeros((size, size, 3), np.uint8)
    im[..., 0] = 20 * label + 10
    im[..., 1] = 120
    im[..., 2] = (37 * i) % 256
    return im


def encode(im: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format={"png": "PNG", "jpeg": "JPEG"}[fmt], **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()


def write_split(folder: Path, split: str, images: list[bytes], labels: list[int], shards: int = 2,
                row_group: int = 4, label_type=None) -> list[Path]:
    """Write one split as ``shards`` Parquet files (row groups of ``row_group`` rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(labels)), shards)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    out = []
    for k, idx in enumerate(parts):
        table = pa.table({
            "image": pa.array([{"bytes": images[i], "path": f"{i}.img"} for i in idx], type=image_type),
            "label": pa.array([labels[i] for i in idx], type=label_type or pa.int64())})
        path = folder / f"{split}-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        out.append(path)
    return out


def make_hf(root: Path, key: str, sizes: dict[str, int], n_classes: int = 3, fmt: str = "png",
            shards: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A data set ``<root>/<key>/data/<split>-*.parquet`` with ``sizes[split]`` images each; returns
    the labels written per split (labels cycle through the classes in a seeded order)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in sizes.items():
        labels = rng.integers(0, n_classes, n)
        images = [encode(label_image(int(y), i), fmt) for i, y in enumerate(labels)]
        write_split(Path(root) / key / "data", split, images, labels.tolist(), shards=shards)
        out[split] = labels
    return out
