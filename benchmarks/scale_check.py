"""Real-scale check: a ViT-B-32 run on image folders whose test splits are streamed
from disk, against the same run with every split in memory, and a second run that reads its
references from the cache.

It writes, once, into ``--work``: a seeded random-init open_clip ViT-B-32 as the "pre-trained"
checkpoint, two fine-tuned checkpoints (image tower + seeded noise of 2% of each block's RMS),
and two image-folder data sets made of real images (Fashion-MNIST and Animal-MNIST, upscaled to
96-px JPEG/PNG files): ``--search`` train and val images and ``--test`` test images per data
set. Then it runs ``python -m harness run --task addition --searcher nevergrad --budget 1`` on
them, one process per mode, and prints each record's peak RSS, resident and streamed inputs,
time before the first evaluation (``setup_s``) and wall time:

    memory    every split resident (max_resident_mb large), uint8 at 224 px
    streamed  test splits streamed (max_resident_mb=--budget-mb), reference cache cleared first
    cached    the streamed command again: references come from the cache

Both ``streamed`` and ``memory`` must score the same ``final`` metrics (checked, MATCH/DIFF).
The "fp32 everything" row is arithmetic, not a run: every image as fp32 at 224 px (0.6 MB).

    python benchmarks/scale_check.py                        # ViT-B-32, 2 x 2000 test images
    python benchmarks/scale_check.py --modes streamed,cached --test 500
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("memory", "streamed", "cached")


def make_models(work: Path, model_name: str) -> tuple[Path, list[Path]]:
    import open_clip
    from harness.checkpoints import save_state_dict
    base, fts = work / "base.safetensors", [work / f"ft_{ds}.safetensors" for ds in ("fashion", "animals")]
    if base.exists() and all(f.exists() for f in fts):
        return base, fts
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None)
    save_state_dict(dict(model.state_dict()), base)
    gen = torch.Generator().manual_seed(1)
    for f in fts:
        tv = {f"visual.{k}": v + 0.02 * v.float().pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen)
              for k, v in model.visual.state_dict().items() if v.is_floating_point()}
        save_state_dict(tv, f)
    return base, fts


def make_folders(work: Path, search: int, test: int) -> Path:
    from PIL import Image

    from harness import data
    root = work / f"data-{search}-{test}"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for ds in ("fashion", "animals"):
        d = data.load(ds, seed=0, max_n=None)
        x = np.concatenate([d.split(s)[0] for s in data.SPLITS])
        y = np.concatenate([d.split(s)[1] for s in data.SPLITS])
        start = 0
        for split, n in (("train", search), ("val", search), ("test", test)):
            for i in range(start, start + n):
                folder = root / ds / split / d.classes[y[i]]
                folder.mkdir(parents=True, exist_ok=True)
                im = Image.fromarray(x[i]).convert("RGB").resize((96, 96), Image.Resampling.BICUBIC)
                im.save(folder / f"{i:06d}{'.jpg' if i % 2 else '.png'}")
            start += n
    (root / "done").write_text("")
    return root


def run(mode: str, args, base: Path, fts: list[Path], data_root: Path) -> dict:
    results = Path(args.work) / f"results-{mode}-{args.test}"
    shutil.rmtree(results, ignore_errors=True)
    budget = 1e6 if mode == "memory" else args.budget_mb
    cmd = [sys.executable, "-m", "harness", "run", "--task", "addition", "--searcher", "nevergrad",
           "--budget", "1", "--quiet", "--results-dir", str(results), "--cache-dir", str(Path(args.work) / "cache"),
           "-t", f"model={args.model}", "-t", f"pretrained={base}", "--data-root", str(data_root),
           "-t", "checkpoints=" + ",".join(f"{ds}={f}" for ds, f in zip(("fashion", "animals"), fts)),
           "-t", f"source_options=max_n={max(args.test, args.search)};max_resident_mb={budget:g};"
                 f"loader_workers={args.workers}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{mode} run failed: {r.stderr.strip()[-400:]}")
    rec = json.loads(next(results.glob("runs/*/record.json")).read_text())
    return {**rec, "process_wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/atlas-scale-check")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--test", type=int, default=2000, help="test images per data set")
    ap.add_argument("--search", type=int, default=64, help="train and val images per data set")
    ap.add_argument("--budget-mb", type=float, default=64, help="max_resident_mb of the streamed runs")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of a streamed split")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        print(f"error: unknown mode(s) {', '.join(bad)}; valid: {', '.join(MODES)}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, fts = make_models(work, args.model)
    data_root = make_folders(work, args.search, args.test)
    rows = {}
    for mode in modes:
        if mode == "streamed":
            shutil.rmtree(work / "cache" / "references", ignore_errors=True)
        rows[mode] = run(mode, args, base, fts, data_root)
        print(f"... {mode} done in {rows[mode]['process_wall_s']:.0f} s", file=sys.stderr, flush=True)
    n_img = 2 * (2 * args.search + args.test)
    print(f"{args.model}, 2 data sets x ({args.search} train + {args.search} val + {args.test} test) images, "
          f"budget 1, {os.cpu_count()} CPUs")
    print(f"{'mode':<16}{'peak RSS MB':>12}{'resident MB':>12}{'streamed MB':>12}{'setup s':>9}{'wall s':>8}  refs cached")
    print(f"{'fp32 everything':<16}{'':>12}{n_img * 3 * 224 * 224 * 4 / 2**20:>12.0f}{0:>12}{'':>9}{'':>8}  (arithmetic)")
    for mode, rec in rows.items():
        print(f"{mode:<16}{rec['peak_rss_mb']:>12.0f}{rec['resident_inputs_mb']:>12.1f}"
              f"{rec.get('streamed_inputs_mb', 0):>12.1f}{rec['setup_s']:>9.1f}{rec['process_wall_s']:>8.0f}  "
              f"source {rec.get('source_references_cached')}, task {rec.get('references_cached')}")
    if "memory" in rows and "streamed" in rows:
        same = rows["memory"]["final"] == rows["streamed"]["final"]
        print(f"final metrics, streamed vs memory: {'MATCH' if same else 'DIFF'} "
              f"({rows['streamed']['final']} vs {rows['memory']['final']})")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
