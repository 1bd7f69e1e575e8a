"""Device check: throughput and loss agreement of the harness's real scoring
path on a GPU and on the CPU, side by side in one run (meant to take <= 5 min on one GPU).

It runs the ``addition`` task on a synthetic source defined here: an open_clip image tower with
random weights (``open_clip.create_model("ViT-B-32", pretrained=None)``, no download), 8 task
vectors that are seeded random perturbations of its weights (~2% of each block's RMS), 8 data sets
of 128 seeded random 224-px images with random frozen 5-class heads; per-block coefficients
(``harness.composition.Composition``) scored by the local engine (``harness.engines.local``) one
candidate after another (``weighted_ce``: "sequential") or in one vmap pass (``population_ce``).

    python benchmarks/gpu_check.py --device cuda   # ViT-B-32, batches 8, 32; CPU rows on 4 images per data set
    python benchmarks/gpu_check.py --device cpu    # --size small (auto on cpu): tiny ViT from a config dict, batches 2, 4

Table: one row per device x batch x path. evals/s: candidates scored per second, each on the row's
``images``; img-evals/s = evals/s x images (compares the device rows with the CPU rows, which score
fewer images); vs seq: population / sequential; peak: torch.cuda.max_memory_allocated on a GPU, the
process's peak RSS (VmHWM, reset before the row) on the CPU. A population that would not fit in
free memory (2 x batch merged parameter sets) is SKIPPED. Loss check: max |loss difference| of the
same candidates on two paths, PASS within the stated absolute tolerance; device-vs-CPU rows run in
strict fp32 (TF32 off) on the CPU rows' images, an INFO row under torch's default flags; gradients
relative to their largest entry. Ray (2+ GPUs): evals/s of the largest batch on 1 and N workers
(harness.ray_evaluator, one GPU each). NOT TESTED / SKIPPED lines say what this run did not check.
Exit code 1 if a check FAILs, 2 (one line on stderr) for a bad --device or option. Host memory:
~9 GB peak while each ViT-B-32 task is built (two are). Tests run ``--device cpu --with-cpu --ray-cpu 2``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import logging
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the source below is loaded as gpu_check:SyntheticClipSource (Ray workers too)
    sys.path.insert(0, HERE)

from harness.api import Candidate, HarnessError, Source  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.engines import check_device  # noqa: E402
from harness.engines.local import ACC_ATOL, LOSS_RTOL  # noqa: E402
from harness.objective import WeightedSet  # noqa: E402
from harness.problem import make_task, plan  # noqa: E402
from harness.sources.base import ModelSource, freeze, tail_parameters  # noqa: E402

# --size small: a tiny open_clip CLIP (32-px ViT, 2 layers) built from this config by open_clip.CLIP.
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
# threads 0: torch's default. The tiny model runs on 1 thread: its many small ops, on 2 threads of 2
# busy cores, measured 40x slower (OpenMP threads waiting for each other).
SIZES = {"full": {"arch": "ViT-B-32", "images": 128, "cpu_images": 4, "batches": "8,32", "chunk": 128, "threads": 0},
         "small": {"arch": "tiny", "images": 16, "cpu_images": 16, "batches": "2,4", "chunk": 0, "threads": 1}}
GRAD_TOL = 1e-3  # gradient check: max |difference| / max |gradient|


@dataclass
class SyntheticOptions:
    """``arch``: an open_clip architecture or ``tiny``; ``scale``: task vectors relative to each block's
    RMS. The images are drawn last: sources differing only in ``images`` share weights, τ and heads."""

    arch: str = "tiny"
    datasets: int = 8
    images: int = 16
    classes: int = 5
    chunk: int = 0
    scale: float = 0.02
    seed: int = 0


class SyntheticClipSource(Source):
    """An open_clip image tower with random weights, seeded random task vectors, images and heads."""

    name, Options = "gpu-check", SyntheticOptions
    description = "random-weight open_clip image tower, seeded random task vectors, images and heads"

    @classmethod
    def load(cls, o, *, cache_dir=None, progress=True) -> ModelSource:
        import open_clip
        logging.disable(logging.WARNING)  # "no pretrained weights loaded" is the point here
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(o.seed)
                model = open_clip.CLIP(**TINY) if o.arch == "tiny" else open_clip.create_model(o.arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        tail = freeze(model.visual)
        base, gen, names = tail_parameters(tail), torch.Generator().manual_seed(o.seed), [f"ds{i}" for i in range(o.datasets)]
        scale = {k: o.scale * (float(v.square().mean().sqrt()) + 0.01) for k, v in base.items()}  # biases start at 0
        tvs = {d: {k: torch.randn(v.shape, generator=gen).mul_(scale[k]) for k, v in base.items()} for d in names}
        heads = {d: (20 * F.normalize(torch.randn(o.classes, tail.output_dim, generator=gen), dim=-1),
                     torch.zeros(o.classes)) for d in names}
        size = tail.image_size[0] if isinstance(tail.image_size, (tuple, list)) else tail.image_size
        inputs = {d: {"val": torch.randn(o.images, 3, size, size, generator=gen)} for d in names}
        labels = {d: {"val": torch.randint(0, o.classes, (o.images,), generator=gen)} for d in names}
        src = ModelSource(name=f"gpu-check {o.arch}", kind="clip", tail=tail, base=base, heads=heads,
                          classes={d: [f"c{j}" for j in range(o.classes)] for d in names}, inputs=inputs,
                          labels=labels, task_vectors=tvs, normalize=True, image_size=int(size), chunk_size=o.chunk)
        src.meta["finetuned_acc"] = {d: 1.0 for d in names}  # read by the addition task, unused here
        return src


def build(args, device: str, images: int):
    """The addition task on the synthetic source, set up on ``device``: (plan, task)."""
    so = f"arch={args.arch};datasets={args.datasets};images={images};classes={args.classes};chunk={args.chunk};seed={args.seed}"
    p = plan(RunConfig(task="addition", searcher="random", space="per_block", seed=args.seed, device=device, quiet=True,
                       task_options={"source": "gpu_check:SyntheticClipSource", "source_options": so, "search_n": 0}))
    task = make_task(p)
    task.setup(device)
    task.source.task_vectors = {}  # the composition holds its own stacked copy
    with contextlib.suppress(OSError, AttributeError):  # glibc: give the freed heap back, so RSS shows what is held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return p, task


def _peak(device: torch.device, reset: bool = False) -> str:
    if device.type == "cuda":
        if reset:
            torch.cuda.synchronize(device), torch.cuda.reset_peak_memory_stats(device)
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB alloc"
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        with open("/proc/self/status") as f:
            return f"{next(int(x.split()[1]) for x in f if x.startswith('VmHWM')) / 2**20:.2f} GiB RSS"
    except (OSError, StopIteration):
        return "n/a"


def _fits(task, n: int) -> str | None:
    """Why a population pass of ``n`` candidates would not fit in free memory, or None."""
    need = 2 * n * sum(v.numel() * v.element_size() for v in task.comp.base.values())  # merged + stacked
    dev = task.engine.device
    import psutil  # ships with ray
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else psutil.virtual_memory().available
    return None if need < 0.8 * free else f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def score(task, cands, path: str, data=None, repeats: int = 1) -> dict:
    """Score ``cands`` on ``data`` (default: the task's search set) by ``path``, timed."""
    eng, data = task.engine, data if data is not None else task.search
    if path == "population" and (why := _fits(task, len(cands))):
        return {"status": "SKIPPED", "note": why}
    times, failed = [], None
    _peak(eng.device, reset=True)
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            evs = ([eng.weighted_ce(c, data) for c in cands] if path == "sequential" else eng.population_ce(cands, data))
            times.append(time.perf_counter() - t0)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        failed = {"status": "SKIPPED", "note": f"out of memory ({type(e).__name__})"}
    except Exception as e:  # e.g. an op without a vmap rule: reported, and its loss check FAILs
        failed = {"status": "ERROR", "note": f"{type(e).__name__}: {e}"[:100]}
    if failed:
        torch.cuda.empty_cache()  # after the exception (and the tensors its frames held) is gone; no-op without CUDA
        return failed
    return {"status": "ok", "rate": len(cands) / statistics.median(times), "losses": [e.loss for e in evs],
            "grads": [e.grad for e in evs], "peak": _peak(eng.device), "note": ""}


def precision_rows(task, cands, fp32: dict) -> list[str]:
    """For bf16 (and fp16 on CUDA): what the engine's precision check measured on the first
    candidate, whether it kept the precision, and its sequential evals/s against fp32."""
    eng, rows = task.engine, []
    for name in ("bf16", "fp16") if eng.device.type == "cuda" else ("bf16",):
        eng.options.precision, eng._amp = name, None
        eng.info.pop("precision", None)
        eng.check_precision(cands[0], task.search)
        note = eng.info["precision"]
        r = score(task, cands, "sequential") if note["used"] == name else {"status": "refused"}
        speed = f"{r['rate'] / fp32['rate']:.2f}x fp32 evals/s" if r["status"] == "ok" and fp32["status"] == "ok" else r["status"]
        rows.append(f"{name}: loss rel err {note['loss_rel_err']:.1e}, acc err {note['acc_abs_err']:.3f} -> "
                    f"{'kept' if note['used'] == name else 'refused (stays fp32)'}; {speed}")
    eng.options.precision, eng._amp = "fp32", None
    eng.info.pop("precision", None)
    return rows


def chunk_rows(task, cands) -> tuple[dict, dict]:
    """The engine's evaluation chunk (``-t eval_chunk``): on CUDA sized automatically from the
    memory one image takes and the memory free; on the CPU set to half the configured chunk (the
    automatic sizing is CUDA-only). Returns what the engine chose and the candidates' scores with it."""
    eng, src = task.engine, task.source
    old, opt = src.chunk_size, eng.options.eval_chunk
    images = sum(len(y) for y in task.search.labels)
    eng.options.eval_chunk = "auto" if eng.device.type == "cuda" else str(max(1, (old or images) // 2))
    eng._chunk_sized = False
    eng.info.pop("eval_chunk", None)
    try:
        eng.size_chunk(lambda: next((x[:16] for x in task.search.inputs if len(x)), None))
        note = dict(eng.info.get("eval_chunk", {}))
        r = score(task, cands, "sequential")
    finally:
        src.chunk_size, eng.options.eval_chunk = old, opt
        eng.info.pop("eval_chunk", None)
    return note, r


def probe_rows(task, n: int, images: int = 16) -> tuple[dict, dict]:
    """``dfo-gn``'s probes (one coefficient each, spread over the blocks) around a kept anchor, on
    the first ``images`` search images of one data set (a few-shot search set, smaller than a
    chunk): scored one by one, then together (the prefix cache's shared passes), timed."""
    eng, dim, s = task.engine, task.comp.dim, task.search
    data = WeightedSet([(s.names[0], s.inputs[0][:images], s.labels[0][:images], 1.0)])
    x0 = np.zeros(dim)
    probes = [Candidate(x=x0 + 0.05 * np.eye(dim)[i], outputs=True) for i in np.linspace(0, dim - 1, n).round().astype(int)]
    out = []
    for together in (False, True):
        eng.score([Candidate(x=x0, outputs=True, anchor=True)], data)  # kept: the probes start from it
        t0 = time.perf_counter()
        evs = eng.score(probes, data) if together else [eng.score([c], data)[0] for c in probes]
        out.append({"status": "ok", "rate": n / (time.perf_counter() - t0), "losses": [e.loss for e in evs]})
    return out[0], out[1]


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuDNN convolutions and cuBLAS matmuls (plain flags; harmless without a GPU)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def ray_rows(p, cands, counts, gpus: float) -> list[tuple[int, dict]]:
    """evals/s and losses of ``cands`` on 1 → N Ray workers, each holding the task set up from ``p``."""
    import ray

    from harness.ray_evaluator import RayEvaluator
    from harness.ray_worker import start_local_ray
    start_local_ray(num_cpus=max(counts), quiet=True)
    out = []
    try:
        for n in counts:
            ev = RayEvaluator(p, workers=n, cpus_per_worker=1, gpus_per_worker=gpus, mode="candidates", quiet=True)
            try:
                ev.evaluate(cands[:n])  # warm-up: each worker's first evaluation
                t0 = time.perf_counter()
                evs = ev.evaluate(cands)
                out.append((n, {"rate": len(cands) / (time.perf_counter() - t0), "losses": [e.loss for e in evs]}))
            finally:
                ev.close()
    finally:
        ray.shutdown()
    return out


def show(check) -> None:
    name, d, tol, status = check
    print(f"  {name:66} max |diff| {'-' if d is None else f'{d:.2e}':>9}  tol {tol:.0e}  {status}")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--size", choices=("auto", "small", "full"), default="auto", help="auto: full on cuda, small on cpu")
    for flag in ("images", "cpu-images", "chunk", "threads"):
        ap.add_argument(f"--{flag}", type=int, default=None, help="default: from --size")
    ap.add_argument("--batches", default=None, help="candidate batch sizes, e.g. 8,32 (default: from --size)")
    for flag, default in (("datasets", 8), ("classes", 5), ("repeats", 1), ("seed", 0)):
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--tol", type=float, default=1e-4, help="absolute tolerance of the loss checks")
    ap.add_argument("--with-cpu", action="store_true", help="CPU rows and device-vs-CPU checks also when --device "
                    "is cpu (always on for cuda; exercises that code without a GPU)")
    ap.add_argument("--ray-cpu", type=int, default=0, metavar="N", help="without 2+ GPUs, the Ray rows on 1 and N "
                    "CPU workers (exercises that code; not a GPU figure)")
    args = ap.parse_args(argv)
    args.device = check_device(args.device)
    size = args.size if args.size != "auto" else ("small" if args.device == "cpu" else "full")
    for k, v in SIZES[size].items():
        setattr(args, k, v if getattr(args, k, None) is None else getattr(args, k))
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", str(args.batches)):
        raise HarnessError(f"--batches must be comma-separated integers, got {args.batches!r}")
    args.batches = sorted({int(b) for b in str(args.batches).split(",")})
    if min(args.batches) < 2 or min(args.images, args.cpu_images, args.datasets, args.classes) < 1 or args.tol < 0:
        raise HarnessError("--batches needs sizes >= 2 (a population is 2+ candidates); --images, --cpu-images, "
                           "--datasets and --classes must be >= 1 and --tol >= 0")
    return args


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except HarnessError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    device, batches, t_start = args.device, args.batches, time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = f" ({torch.cuda.get_device_name(device)}, capability {torch.cuda.get_device_capability(device)})" if ngpu else ""
    print(f"torch {torch.__version__}; device {device}{name}; {ngpu} GPU(s); CPU threads {torch.get_num_threads()}; "
          f"TF32: cudnn conv {torch.backends.cudnn.allow_tf32}, cuda matmul {torch.backends.cuda.matmul.allow_tf32}")
    runs = {device: build(args, device, args.images)}
    if device != "cpu" or args.with_cpu:
        runs["cpu" if device != "cpu" else "cpu-ref"] = build(args, "cpu", args.cpu_images)
    comp = runs[device][1].comp
    print(f"model {args.arch} (random weights): image tower {sum(v.numel() for v in comp.base.values()) / 1e6:.1f} M "
          f"params in {comp.B} blocks; {comp.T} task vectors; {comp.dim} coefficients (per_block); {args.datasets} data "
          f"sets x {args.images} images ({args.cpu_images} on the CPU rows), {args.classes} classes; chunk {args.chunk}; "
          f"set-up {time.perf_counter() - t_start:.1f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    cands = {b: [Candidate(x=rng.uniform(-0.5, 0.5, comp.dim)) for _ in range(b)] for b in batches}
    res = {}
    for label, (_, task) in runs.items():
        print(f"timing {label} ...", flush=True)
        score(task, cands[batches[0]][:2], "sequential"), score(task, cands[batches[0]][:2], "population")  # warm-up
        for b in batches:
            for path in ("sequential", "population"):
                res[label, b, path] = r = score(task, cands[b], path, repeats=args.repeats)
                r["images"] = sum(len(y) for y in task.search.labels)

    print(f"\n{'device':8} {'images':>6} {'batch':>5} {'path':11} {'evals/s':>9} {'img-evals/s':>11} {'vs seq':>7}  {'peak':18}")
    for (label, b, path), r in res.items():
        head = f"{label:8} {r['images']:6d} {b:5d} {path:11}"
        if r["status"] != "ok":
            print(f"{head} {'-':>9} {'-':>11} {'-':>7}  {'-':18} {r['status']}: {r['note']}")
            continue
        seq = res[label, b, "sequential"]
        vs = f"{r['rate'] / seq['rate']:.2f}x" if path == "population" and seq["status"] == "ok" else ""
        print(f"{head} {r['rate']:9.3f} {r['rate'] * r['images']:11.1f} {vs:>7}  {r['peak']:18}")

    checks = []  # (name, max |diff| or None, tolerance, status)

    def check(name, a, b, tol=args.tol, info=False, key="losses"):
        if a.get("status", "ok") != "ok" or b.get("status", "ok") != "ok":
            why = a.get("note") or b.get("note")
            return checks.append((name, None, tol, f"FAIL ({why})" if "ERROR" in (a.get("status"), b.get("status"))
                                  else f"SKIPPED ({why})"))
        x, y = (np.concatenate([np.ravel(v) for v in r[key]]) for r in (a, b))
        d = float(np.max(np.abs(x - y)) / (max(np.max(np.abs(y)), 1e-30) if key == "grads" else 1))
        checks.append((name, d, tol, "INFO" if info else ("PASS" if d <= tol else "FAIL")))

    for label in runs:
        for b in batches:
            check(f"{label} population vs {label} sequential, batch {b}", res[label, b, "population"], res[label, b, "sequential"])
    if len(runs) == 2:
        (ref_label, (_, ref)), task, k = list(runs.items())[1], runs[device][1], cands[batches[0]]
        data = copy.copy(ref.search).to(device)  # the CPU rows' images, on the device
        cpu_seq = res[ref_label, batches[0], "sequential"]
        with strict_fp32():
            check(f"{device} sequential vs {ref_label} sequential (strict fp32)", score(task, k, "sequential", data), cpu_seq)
            check(f"{device} population vs {ref_label} sequential (strict fp32)", score(task, k, "population", data), cpu_seq)
            g = [Candidate(x=k[0].x, grad=True)]
            check(f"{device} gradient vs {ref_label} gradient (strict fp32, relative)", score(task, g, "sequential", data),
                  score(ref, g, "sequential"), tol=GRAD_TOL, key="grads")
        if device != "cpu":
            check(f"{device} sequential vs {ref_label} sequential (torch default flags)", score(task, k, "sequential", data),
                  cpu_seq, info=True)
    amp_rows = precision_rows(runs[device][1], cands[batches[0]], res[device, batches[0], "sequential"])
    chunk_note, chunk_res = chunk_rows(runs[device][1], cands[batches[0]])
    base = res[device, batches[0], "sequential"]
    check(f"{device} eval_chunk {chunk_note.get('chunk')} vs chunk {args.chunk}, batch {batches[0]}", chunk_res, base)
    n_probes = 2 * batches[-1]
    alone, shared = probe_rows(runs[device][1], n_probes)
    check(f"{device} {n_probes} probes together vs one by one", shared, alone)
    seen = [x for r in res.values() for x in r.get("losses", [])]
    print(f"\nloss check: the same candidates on two paths; max |loss difference| <= {args.tol:g} (absolute) passes; "
          f"losses of {min(seen, default=0):.3f} .. {max(seen, default=0):.3f}")
    for c in checks:
        show(c)
    print("autocast (the engine's -t precision check on the first candidate; kept within "
          f"loss rtol {LOSS_RTOL:g}, acc atol {ACC_ATOL:g}), sequential batch {batches[0]}:")
    for row in amp_rows:
        print("  " + row)
    if chunk_res.get("status") == "ok" and base.get("status") == "ok":
        sized = (f"sized to the device: {chunk_note['per_image_mb']} MB per image, {chunk_note['free_mb']} MB free of "
                 f"{chunk_note['total_mb']} -> {chunk_note['chunk']} images" if chunk_note.get("asked") == "auto"
                 else f"set to {chunk_note.get('chunk')} images")
        print(f"evaluation chunk (-t eval_chunk): {sized}; {chunk_res['rate'] / base['rate']:.2f}x the evals/s of chunk "
              f"{args.chunk}; peak {chunk_res['peak']}")
    print(f"dfo-gn probes from a kept anchor ({n_probes}, on 16 images): one by one {alone['rate']:.1f} evals/s, "
          f"together {shared['rate']:.1f} evals/s ({shared['rate'] / alone['rate']:.2f}x)")

    big, counts, gpus = batches[-1], [], 0.0
    if ngpu >= 2 and device.startswith("cuda"):
        counts, gpus = [1, ngpu], 1.0
    else:
        print(f"\nSKIPPED: Ray GPU scaling needs 2+ GPUs, found {ngpu}" if ngpu < 2 else
              f"\nSKIPPED: Ray GPU scaling runs with --device cuda (found {ngpu} GPUs)")
        if args.ray_cpu >= 2:
            counts = [1, args.ray_cpu]
            print(f"--ray-cpu {args.ray_cpu}: the same rows on CPU workers (exercises the code; not a GPU figure)")
    if counts:
        print(f"Ray scaling, batch {big}, {'GPU' if gpus else 'CPU'} workers (one candidate per work item):")
        torch.cuda.empty_cache()  # hand the blocks this process cached back: a worker shares its GPU (no-op on CPU)
        try:
            rows = ray_rows(runs[device][0], cands[big], counts, gpus)
        except Exception as e:
            rows = []
            checks.append(("ray scaling", None, args.tol, f"FAIL ({type(e).__name__}: {e})"[:200]))
            show(checks[-1])
        for n, r in rows:
            check(f"ray {n} worker(s) vs {device} sequential, batch {big}", r, res[device, big, "sequential"],
                  info=not gpus and device != "cpu")  # CPU workers vs GPU losses: precision, not plumbing
            print(f"  {n} worker(s) {r['rate']:9.3f} evals/s  {r['rate'] / rows[0][1]['rate']:.2f}x 1 worker")
            show(checks[-1])

    print()
    if device == "cpu":
        print(f"NOT TESTED: CUDA (device is cpu; torch.cuda.is_available() = {torch.cuda.is_available()})")
    if device == "cpu":
        print("NOT TESTED: automatic evaluation chunk (-t eval_chunk=auto sizes from free CUDA memory; on CPU it keeps "
              "the source's chunk, so a set chunk was compared instead)")
    if len(runs) == 1:
        print("NOT TESTED: device vs CPU losses and gradients (device is cpu; --with-cpu runs that code on two CPU tasks)")
    print("NOT TESTED: fp16 task-vector storage (-t dtype=fp16), "
          "searchers and the runner (only the engine's scoring path is timed)")
    n = {k: sum(c[3].startswith(k) for c in checks) for k in ("PASS", "FAIL", "SKIPPED", "INFO")}
    print(f"{'FAIL' if n['FAIL'] else 'PASS'}: {', '.join(f'{v} {k}' for k, v in n.items())} of {len(checks)} checks; "
          f"wall time {time.perf_counter() - t_start:.1f} s")
    return 1 if n["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
