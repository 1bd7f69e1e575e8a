"""A ViT-B-32-shaped composition problem on the CPU: dfo-gn beside gradient descent, loss per wall second.

The problem, written once (seeded) into ``--work``:

* the "pre-trained" model: a random-init open_clip CLIP whose image tower is ViT-B-32's (width
  768, 12 layers, 12 heads, patch 32: the same 152 floating blocks and 87.8M parameters, only
  the position embedding is shorter) at a small image size (32 px: one patch), with a small text
  tower (width 128, 2 layers) that only makes the zero-shot heads;
* 8 data sets ``syn0..syn7`` of real images (the harness's offline sets, resized), each with a
  fine-tuned checkpoint θ0 + τ_t, τ_t seeded noise of ``--noise`` × each tensor's RMS;
* labels that make the task vectors matter: data set t's label of an image is what fine-tuned
  model t predicts under the zero-shot head the harness builds for t (so fine-tuned t scores
  100% on t, θ0 much less; the check is printed after the build).

Why this shape: a per-block search over 8 × 152 = 1,216 coefficients is the real ViT-B-32 task
addition problem's size, and dfo-gn's cost grows with the number of coefficients (one probe each
per round), while a gradient step costs the same whatever their number. The small image keeps a
forward cheap enough for 2 CPU cores; merging 8 × 87.8M weights per candidate is as real as on
the field's checkpoints. dfo-gn's probes change one block each: the engine merges only that block
again and reruns the ViT from that block on (harness/engines/prefix.py).

Every run is ``--task addition --space per_block`` (a gradient step's mini-batch is ``--search-n``
images per data set, as many as one dfo-gn evaluation scores); each prints one JSON line
(normalised accuracy, evaluations, search seconds on the trace's clock, the best search loss at
25/50/75/100 % of the gradient run's search time, the seconds to reach the gradient run's final
loss) and all go to ``--work/summary.json``.

    python benchmarks/vit_synthetic.py                                   # CPU, 2 cores
    python benchmarks/vit_synthetic.py --device cuda --image-size 224 --search 256 --search-n 128 \\
        --test 512 --searchers gradient,dfo-gn,nevergrad --budgets gradient=300,dfo-gn=5r,nevergrad=5r

Budgets are evaluations (gradient: steps); ``Kr`` is K dfo-gn rounds, K × (1216 + 1) + 1. The same
searchers on the real ``ta8`` suite on a GPU box (checkpoints: a folder of the 8 fine-tuned ones):

    python -m harness run --task addition --searcher dfo-gn --space per_block --budget 6086 -t suite=ta8 \\
        -t model=ViT-B-32 -t pretrained=openai --data-root DATA -t checkpoints=CKPT_DIR --device cuda
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

N_DATASETS = 8
NAMES = [f"syn{t}" for t in range(N_DATASETS)]
# Each word four times: the class tokens, not the template's, then dominate a random text tower's
# prompt embedding, so the zero-shot heads lie apart (cosine ~0.7, ~0.9 for single words). Sorted,
# as the harness sorts class folders: label i is CLASSES[i].
CLASSES = tuple(sorted(" ".join([w] * 4) for w in ("airplane", "car", "bird", "cat", "deer", "dog", "frog",
                                                       "horse", "ship", "truck")))
POOL = ("fashion", "animals", "cvdigits", "textures")  # offline sets with enough images; syn_t reads POOL[t % 4]
POOL_IMAGES = 3200  # images in the smallest of them (textures)
# Searcher options: gradient as in benchmarks/dfo_check.py (lr 0.01), scored on the whole search set
# every 5 steps so that its loss curve has points to read; the others at their defaults.
SEARCHERS = {"gradient": {"lr": 0.01, "validate_every": 5}, "dfo-gn": {}, "nevergrad": {"optimizer": "NGOpt"}}
DEFAULT_BUDGETS = "gradient=100,dfo-gn=1r,nevergrad=1r"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def write_pretrained(work: Path, size: int) -> tuple[Path, dict]:
    """The seeded random-init CLIP as a ``local-dir:`` folder; returns it and its visual state."""
    import open_clip
    from harness.checkpoints import save_state_dict
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": size, "layers": 12, "width": 768, "patch_size": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
    folder = work / f"model-{size}"
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))  # trained CLIP's temperature (random init: 1/0.07)
    if not (folder / "open_clip_model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        save_state_dict(dict(model.state_dict()), folder / "open_clip_model.safetensors")
    return folder, {k: v for k, v in model.visual.state_dict().items() if v.is_floating_point()}


def write_finetuned(work: Path, size: int, noise: float, visual: dict) -> list[Path]:
    """One checkpoint per data set: every floating visual tensor + noise × its RMS × N(0, 1), seeded."""
    from harness.checkpoints import save_state_dict
    files = [work / f"ft-{size}-{noise:g}" / f"{ds}.safetensors" for ds in NAMES]
    for t, f in enumerate(files):
        if not f.exists():
            gen = torch.Generator().manual_seed(1000 + t)
            save_state_dict({f"visual.{k}": v + noise * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=gen)
                             for k, v in visual.items()}, f)
    return files


def write_images(root: Path, size: int, n_search: int, n_test: int) -> None:
    """Real images for every data set, all in the first class folder for now (every class folder
    exists, empty or not, so the class list, hence the zero-shot heads, never changes)."""
    from PIL import Image

    from harness import data
    for t, ds in enumerate(NAMES):
        d = data.load(POOL[t % len(POOL)], seed=0, max_n=None)
        x = np.concatenate([d.split(s)[0] for s in data.SPLITS])
        start = (t // len(POOL)) * (2 * n_search + n_test)
        for split, n in (("train", n_search), ("val", n_search), ("test", n_test)):
            for c in CLASSES:
                (root / ds / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(start, start + n):
                im = Image.fromarray(x[i]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
                im.save(root / ds / split / CLASSES[0] / f"{i:06d}.png")
            start += n


def build_source(folder: Path, fts: list[Path], root: Path):
    """The harness's own open_clip source on these files (heads, inputs, fine-tuned accuracies)."""
    from harness.sources.open_clip import from_checkpoints
    return from_checkpoints("", f"local-dir:{folder}", [str(f) for f in fts], NAMES, str(root), max_n=None)


@torch.no_grad()
def relabel(src, root: Path) -> None:
    """Move each image into the class folder that fine-tuned model t predicts for it on data set t."""
    from harness.data import scan_image_folder
    for ds in NAMES:
        classes, listing = scan_image_folder(str(root / ds))
        assert classes == src.classes[ds] == list(CLASSES), (ds, classes)
        params = src.finetuned(ds)
        for split, (files, _) in listing.items():
            pred = torch.cat([src.logits(params, x, ds).argmax(1) for x in src.batches(ds, split, 256)])
            assert len(pred) == len(files), (ds, split, len(pred), len(files))
            for f, p in zip(files, pred.tolist()):
                if CLASSES[p] != f.parent.name:
                    f.rename(f.parent.parent / CLASSES[p] / f.name)


def make_problem(args) -> tuple[Path, list[Path], Path]:
    """Write the model, checkpoints and labelled folders once; print and keep the label check."""
    work = Path(args.work)
    folder, visual = write_pretrained(work, args.image_size)
    fts = write_finetuned(work, args.image_size, args.noise, visual)
    root = work / f"data-{args.image_size}-{args.noise:g}-{args.search}-{args.test}"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_images(root, args.image_size, args.search, args.test)
        src = build_source(folder, fts, root)
        heads = {ds: src.heads[ds][0].clone() for ds in NAMES}
        relabel(src.to(args.device), root)
        del src  # before the rebuild: each source holds 8 task vectors (2.8 GB)
        gc.collect()
        src = build_source(folder, fts, root)  # rebuilt from the relabelled folders: the check
        same = all(torch.equal(heads[ds], src.heads[ds][0]) for ds in NAMES)
        y = {ds: np.bincount(src.labels[ds]["test"].numpy(), minlength=len(CLASSES)).tolist() for ds in NAMES}
        check = {"heads_unchanged": same, "finetuned_test_acc": src.meta["finetuned_acc"],
                 "zero_shot_test_acc": src.meta["zero_shot_acc"], "test_label_counts": y,
                 "blocks": src.meta["blocks"], "params": src.meta["params"]}
        if not same or min(check["finetuned_test_acc"].values()) < 0.99:
            sys.exit(f"label check failed: {json.dumps(check)}")
        (root / "done").write_text(json.dumps(check))
    print(json.dumps({"problem": str(root), **json.loads((root / "done").read_text())}), flush=True)
    return folder, fts, root


def parse_budgets(spec: str, dim: int) -> dict[str, int]:
    """``gradient=30,dfo-gn=2r,...`` → evaluations per searcher (``Kr``: K dfo-gn rounds)."""
    out = {}
    for item in filter(None, spec.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in SEARCHERS:
            raise ValueError(f"bad budget {item!r}: expected NAME=N or NAME=Kr, NAME one of {', '.join(SEARCHERS)}")
        rounds = value.endswith("r")
        digits = value[:-1] if rounds else value
        n = int(digits) if digits.isdigit() else 0
        if n < 1:
            raise ValueError(f"bad budget {item!r}: N or Kr must be a whole number of at least 1")
        out[name] = n * (dim + 1) + 1 if rounds else n
    return out


def best_at(trace, t: float) -> float | None:
    """The best whole-search-set loss reached by ``t`` search seconds (None: none scored yet)."""
    rows = trace[(trace["t"] <= t) & trace["best"].notna()]
    return None if rows.empty else round(float(rows["best"].iloc[-1]), 5)


def time_to(trace, loss: float | None) -> float | None:
    """Search seconds until the best loss first reached ``loss`` (None: never, or no ``loss``)."""
    if loss is None:
        return None
    rows = trace[trace["best"] <= loss + 1e-5]  # ``loss`` is rounded to 5 decimals
    return None if rows.empty else round(float(rows["t"].iloc[0]), 1)


def run_one(name: str, budget: int, args, folder: Path, fts: list[Path], root: Path):
    import harness
    task = {"pretrained": f"local-dir:{folder}", "data_root": str(root), "search_n": args.search_n,
            "batch_size": args.search_n, "checkpoints": ",".join(f"{ds}={f}" for ds, f in zip(NAMES, fts))}
    return harness.run("addition", name, space="per_block", budget=budget, seed=args.seed, task_options=task,
                       searcher_options=SEARCHERS[name], results_dir=Path(args.work) / f"results-{name}",
                       cache_dir=str(Path(args.work) / "cache"), device=args.device, rerun=True)


def summarise(name: str, run, ref: dict | None) -> dict:
    """One JSON-able row: accuracy, cost (``search_s``: the trace's clock, setup and final scoring
    excluded), the best loss at fractions of the gradient run's search time and the time to reach
    its final loss (``ref``: the gradient row, None for that row itself)."""
    tr = run.trace
    search_s = float(tr["t"].max()) if len(tr) else 0.0
    t_ref = ref["search_s"] if ref else search_s
    refs = {k: round(v.get("normalized_acc", float("nan")), 4) for k, v in run.references.items()}
    return {"searcher": name, "normalized_acc": round(run.score, 4), "evaluations": run.evaluations,
            "search_s": round(search_s, 1), "s_per_eval": round(search_s / max(run.evaluations, 1), 3),
            "run_wall_s": round(run.wall_time_s, 1), "setup_s": run.record.get("setup_s"),
            "best_loss": (best := best_at(tr, float("inf"))),
            "t_ref_s": round(t_ref, 1), "best_loss_at": {f"{f:.0%}": best_at(tr, f * t_ref) for f in FRACTIONS},
            "s_to_gradient_loss": time_to(tr, ref["best_loss"] if ref else best if name == "gradient" else None),
            "references": refs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/atlas-vit-synthetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=32, help="pixels, a multiple of 32 (patches = (size/32)^2)")
    ap.add_argument("--noise", type=float, default=0.3, help="task-vector noise, times each tensor's RMS")
    ap.add_argument("--search", type=int, default=32, help="train and val images per data set")
    ap.add_argument("--test", type=int, default=64, help="test images per data set")
    ap.add_argument("--search-n", type=int, default=8, help="search-set (val) images per data set (task option)")
    ap.add_argument("--searchers", default="gradient,dfo-gn",
                    help=f"comma list of {', '.join(SEARCHERS)} (empty: only build the problem)")
    ap.add_argument("--budgets", default="", help=f"NAME=N evaluations (gradient: steps) or NAME=Kr (K dfo-gn "
                    f"rounds of 1217), over the defaults {DEFAULT_BUDGETS}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    searchers = [s for s in args.searchers.split(",") if s]
    try:
        if bad := [s for s in searchers if s not in SEARCHERS]:
            raise ValueError(f"unknown searcher(s) {', '.join(bad)}; valid: {', '.join(SEARCHERS)}")
        if args.image_size < 32 or args.image_size % 32:
            raise ValueError(f"--image-size must be a positive multiple of 32, got {args.image_size}")
        if min(args.search, args.test, args.search_n) < 1 or args.search_n > args.search or args.noise <= 0:
            raise ValueError("--search, --test, --search-n and --noise must be positive, --search-n at most --search")
        if 2 * args.search + args.test > POOL_IMAGES // 2:
            raise ValueError(f"2 x --search + --test must be at most {POOL_IMAGES // 2} (two data sets share "
                             "a pool set)")
        budgets = parse_budgets(f"{DEFAULT_BUDGETS},{args.budgets}", N_DATASETS * 152)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder, fts, root = make_problem(args)
    from harness import HarnessError
    rows, ref = [], None
    for s in sorted(searchers, key=lambda s: s != "gradient"):  # gradient first: its wall time is the clock
        try:
            run = run_one(s, budgets[s], args, folder, fts, root)
        except HarnessError as e:
            print(f"error: {s}: {e}", file=sys.stderr)
            return 1
        rows.append(summarise(s, run, ref))
        ref = ref or (rows[-1] if s == "gradient" else None)
        print(json.dumps(rows[-1]), flush=True)
    out = {"options": vars(args), "budgets": {s: budgets[s] for s in searchers}, "runs": rows}
    (Path(args.work) / "summary.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
