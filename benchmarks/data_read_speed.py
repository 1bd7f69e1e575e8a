"""Reading and decoding a split: the harness's :class:`harness.stream.SampleSplit` against
torchvision's ``ImageFolder`` + ``DataLoader`` with the same worker count.

    python benchmarks/data_read_speed.py                       # 2000 images of 256 px, JPEG and PNG
    python benchmarks/data_read_speed.py --n 500 --formats jpeg --workers 2 --repeats 5 --out r.json

The same ``--n`` seeded random-content images (a smooth random colour field plus noise, square,
``--size`` px) are written in a temporary folder twice per format:

(a) an ImageFolder tree ``<root>/<fmt>/imagefolder/test/class<k>/<i>.<ext>`` (10 classes);
(b) Parquet shards ``<root>/<fmt>/parquet/data/test-0000k-of-00004.parquet`` holding the same
    files' bytes in ImageFolder's order, as a Hugging Face hub download stores them (an
    ``image`` struct ``{bytes, path}`` and an int64 ``label``; ``--row-group`` rows per row group,
    100 by default as ``datasets`` writes image data sets).

Then one full pass over the split is timed for each path, all in this one process, the order
reversed every other repeat (timings on a shared machine vary several-fold with load, so only
ratios of passes measured side by side mean anything):

    torchvision        ImageFolder(root, transform=T) + DataLoader(batch, num_workers=workers);
                       T = ``open_clip.image_transform(224, is_train=False)`` (resize, crop,
                       ToTensor, Normalize: fp32 normalised batches)
    files uint8        SampleSplit(FileSamples(...), uint8 half of T, 224, workers).batches(batch):
                       uint8 batches, as the harness streams them (it normalises on the device)
    files +norm        the same, each batch then ``(x / 255 − mean) / std`` on the CPU in this
                       process (``ModelSource.prepare``): like for like with torchvision's output
    parquet uint8      SampleSplit(ParquetSamples from ``hf_parquet.read_split``) over the shards
    parquet +norm      the same, normalised on the CPU

Split listings (ImageFolder's directory scan, ``read_split``'s label column) are built once,
outside the timings; each timed pass includes starting and stopping its DataLoader workers.
The table gives images/s (median over repeats, with the range), harness ÷ torchvision
(median of the per-repeat ratios) and the CPU time a pass used per image, in this process and its
workers together (median; far less sensitive to other load than the wall-clock rates). Before the timings the first images are checked to decode to
the same pixels on every path (printed, never asserted). The script never asserts a speed; it
exits 0.

Note: ``SampleSplit.batches`` decodes in this process (no workers) when the whole split fits
in one batch, so ``--n`` should exceed ``--batch`` for a comparison of worker pools.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CLASSES = 10
SPLIT = "test"
SHARDS = 4
MODEL_SIZE = 224
EXT = {"jpeg": "jpg", "png": "png"}
PATHS = ("torchvision", "files uint8", "files +norm", "parquet uint8", "parquet +norm")
REFERENCE = "torchvision"


def random_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random-content RGB image (size, size, 3): an upsampled random 8 × 8 colour field plus
    Gaussian noise, so JPEG and PNG files have photo-like sizes rather than pure noise's."""
    from PIL import Image
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def encode(im: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        Image.fromarray(im).save(buf, format="PNG")
    else:
        raise ValueError(f"unknown format {fmt!r} (jpeg, png)")
    return buf.getvalue()


def write_parquet(folder: Path, images: list[bytes], labels: list[int], shards: int,
                  row_group: int) -> list[Path]:
    """One split as ``shards`` Parquet files the way ``datasets`` stores an Image feature
    (the layout of tests/hfdata.py's ``write_split``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    out = []
    for k, idx in enumerate(np.array_split(np.arange(len(labels)), shards)):
        table = pa.table({
            "image": pa.array([{"bytes": images[i], "path": f"{i}.img"} for i in idx], type=image_type),
            "label": pa.array([int(labels[i]) for i in idx], type=pa.int64())})
        path = folder / f"{SPLIT}-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        out.append(path)
    return out


def build(root: Path, n: int, size: int, formats: list[str], row_group: int = 100,
          seed: int = 0) -> dict[str, dict]:
    """Write the images per format as an ImageFolder tree and as Parquet shards (same bytes, in
    ImageFolder's order). Returns ``{fmt: {"folder", "files", "labels", "shards", "bytes"}}``."""
    from torchvision.datasets import ImageFolder
    rng = np.random.default_rng(seed)
    for i in range(n):
        px = random_image(rng, size)
        for fmt in formats:
            d = root / fmt / "imagefolder" / SPLIT / f"class{i % CLASSES}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.{EXT[fmt]}").write_bytes(encode(px, fmt))
    out = {}
    for fmt in formats:
        folder = root / fmt / "imagefolder" / SPLIT
        listing = ImageFolder(str(folder)).samples  # (path, label) in ImageFolder's order
        files = [p for p, _ in listing]
        labels = [y for _, y in listing]
        data = [Path(p).read_bytes() for p in files]
        shards = write_parquet(root / fmt / "parquet" / "data", data, labels, SHARDS, row_group)
        out[fmt] = {"folder": folder, "files": files, "labels": labels, "shards": shards,
                    "bytes": float(np.mean([len(b) for b in data]))}
    return out


class Paths:
    """The five ways of reading one format's split, each a callable doing one full pass and
    returning how many images it yielded."""

    def __init__(self, data: dict, batch: int, workers: int):
        import open_clip
        from torchvision.datasets import ImageFolder

        from harness.data.hf_parquet import read_split
        from harness.data.samples import FileSamples
        from harness.stream import SampleSplit, uint8_transform

        self.batch, self.workers = batch, workers
        self.preprocess = open_clip.image_transform(MODEL_SIZE, is_train=False)
        u8, mean, std = uint8_transform(self.preprocess)
        self.norm = SimpleNamespace(mean=mean, std=std)
        self.imagefolder = ImageFolder(str(data["folder"]), transform=self.preprocess)
        self.files = SampleSplit(FileSamples(data["files"], data["labels"]), u8, MODEL_SIZE, workers)
        parquet = read_split(list(data["shards"]), CLASSES)
        if parquet.labels.tolist() != list(data["labels"]):
            raise RuntimeError("the Parquet shards' labels are not ImageFolder's")
        self.parquet = SampleSplit(parquet, u8, MODEL_SIZE, workers)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What the harness's source does on the device: ``(x / 255 − mean) / std`` in fp32."""
        from harness.sources.base import ModelSource
        return ModelSource.prepare(self.norm, x)

    def run(self, path: str) -> int:
        n = 0
        if path == "torchvision":
            loader = torch.utils.data.DataLoader(self.imagefolder, batch_size=self.batch, shuffle=False,
                                                 num_workers=self.workers)
            for x, _ in loader:
                n += len(x)
            return n
        split = self.files if path.startswith("files") else self.parquet
        normalise = path.endswith("+norm")
        for x in split.batches(self.batch):
            if normalise:
                x = self.prepare(x)
            n += len(x)
        return n

    def pixel_check(self, k: int) -> dict[str, float]:
        """Max |harness − torchvision| over the first ``k`` images, per harness source."""
        k = min(k, len(self.imagefolder))
        want = torch.stack([self.imagefolder[i][0] for i in range(k)])
        return {name: float((self.prepare(split[np.arange(k)]) - want).abs().max())
                for name, split in (("files", self.files), ("parquet", self.parquet))}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images in the split (default 2000)")
    ap.add_argument("--size", type=int, default=256, help="side of the source images in px (default 256)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers on every path (default 2)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    ap.add_argument("--formats", default="jpeg,png", help="comma-separated: jpeg, png (default both)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per path (default 3)")
    ap.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group (default 100)")
    ap.add_argument("--check", type=int, default=8, help="images checked for equal pixels (default 8)")
    ap.add_argument("--root", default=None, help="an empty folder for the data, kept (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in EXT]
    if bad or not args.formats:
        ap.error(f"--formats: {', '.join(bad) or 'none given'} (choose from jpeg, png)")
    if args.n < 1 or args.size < 1 or args.batch < 1 or args.repeats < 1 or args.workers < 0:
        ap.error("--n, --size, --batch and --repeats must be positive, --workers non-negative")
    return args


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its ended children: the DataLoader
    workers of a finished pass are joined, so a pass's difference is all the CPU it used."""
    import resource
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(args, root: Path) -> dict:
    t0 = time.perf_counter()
    data = build(root, args.n, args.size, args.formats, row_group=args.row_group)
    build_s = time.perf_counter() - t0
    readers = {fmt: Paths(data[fmt], args.batch, args.workers) for fmt in args.formats}
    pixels = {fmt: readers[fmt].pixel_check(args.check) for fmt in args.formats}

    order = [(fmt, p) for fmt in args.formats for p in PATHS]
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    for r in range(args.repeats):
        for fmt, p in (order if r % 2 == 0 else order[::-1]):
            c, t = cpu_seconds(), time.perf_counter()
            n = readers[fmt].run(p)
            dt, dc = time.perf_counter() - t, cpu_seconds() - c
            if n != args.n:
                raise RuntimeError(f"{fmt} {p}: a pass yielded {n} images, not {args.n}")
            rates[(fmt, p)].append(n / dt)
            cpu[(fmt, p)].append(1e3 * dc / n)

    rows = []
    for fmt, p in order:
        ref = rates[(fmt, REFERENCE)]
        ratios = [a / b for a, b in zip(rates[(fmt, p)], ref)]
        rows.append({"format": fmt, "path": p, "rates": rates[(fmt, p)],
                     "median": statistics.median(rates[(fmt, p)]), "ratio": statistics.median(ratios),
                     "ratios": ratios, "cpu_ms": cpu[(fmt, p)],
                     "cpu_ms_median": statistics.median(cpu[(fmt, p)])})
    return {"config": {k: v for k, v in vars(args).items() if k not in ("out", "root")},
            "build_s": build_s, "mean_file_bytes": {fmt: data[fmt]["bytes"] for fmt in args.formats},
            "pixels_max_abs_diff": pixels, "rows": rows,
            "env": {"python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": __import__("torchvision").__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()}}


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"read + decode one pass: {c['n']} images of {c['size']} px -> {MODEL_SIZE} px, "
             f"batch {c['batch']}, workers {c['workers']}, {c['repeats']} repeat(s), alternating order",
             f"{'format':<7} {'path':<15} {'images/s':>9} {'(min-max)':>15} {'harness/torchvision':>20} "
             f"{'CPU ms/image':>13}"]
    for row in res["rows"]:
        ratio = "1 (reference)" if row["path"] == REFERENCE else f"{row['ratio']:.2f}"
        span = f"{min(row['rates']):.0f}-{max(row['rates']):.0f}"
        lines.append(f"{row['format']:<7} {row['path']:<15} {row['median']:>9.1f} {span:>15} {ratio:>20} "
                     f"{row['cpu_ms_median']:>13.2f}")
    sizes = ", ".join(f"{f} {b / 1024:.1f} KiB" for f, b in res["mean_file_bytes"].items())
    diffs = "; ".join(f"{f}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items())
                      for f, d in res["pixels_max_abs_diff"].items())
    lines.append(f"mean file size: {sizes}; built in {res['build_s']:.1f} s")
    lines.append(f"max |harness - torchvision| over the first {c['check']} images: {diffs}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.root:
        root = Path(args.root)
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"--root {root} is not empty (the split is written there afresh)")
        root.mkdir(parents=True, exist_ok=True)
        res = measure(args, root)
    else:
        with tempfile.TemporaryDirectory(prefix="data_read_speed-") as tmp:
            res = measure(args, Path(tmp))
    print(table(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
