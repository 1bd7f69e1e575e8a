"""Numerical check that harness.transforms reproduce FusionBench's implementations of the same methods.

    python -m pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb
    python -m zipfile -e /tmp/fb/fusion_bench-0.2.33-py3-none-any.whl /tmp/fb/src
    python benchmarks/fusionbench_check.py --fusion-bench /tmp/fb/src/fusion_bench

FusionBench's package ``__init__`` pulls in omegaconf, datasets, lightning, hydra...; this script
never runs it: ``fusion_bench`` and ``fusion_bench.utils`` are registered as empty packages pointing
at the given directory, so only the leaf modules it needs (``utils/type.py``, ``utils/timer.py`` and
the method ``*utils.py`` files) are executed, with torch alone; from the two method files whose
top-level imports need the whole package (WUDI's ``wudi.py``, TALL's ``tall_mask/utils.py``) only the
one function compared is taken from the file's syntax tree and executed.

Seeded random task vectors shaped like a small ViT (conv stem, embeddings, attention/MLP weights and
biases; keys deliberately not sorted, since FusionBench's ``state_dict_to_vector`` sorts them) go
through both sides. TIES, Iso-C, Iso-CTS, TSV-M, consensus masks and WUDI are compared entry by
entry (MATCH: max |diff| <= 1e-6 · max |reference|, 1e-4 for the methods built from several SVDs,
whose fp32 results differ at that level; the fp64 distance is printed beside them); DARE masks come
from different generators, so its properties are compared instead. The harness's defaults that
decompose convolution kernels as matrices (``iso``, ``iso-cts``, ``tsvm``, ``wudi``; FusionBench
decomposes 2-D weights only) and sum 1-D blocks (``iso``) differ on purpose and are marked so.
Exit code 1 when any other comparison differs.
"""
from __future__ import annotations

import argparse, ast, contextlib, importlib, importlib.util, io, math, sys, time, types  # noqa: E401
from pathlib import Path
from typing import Optional

import torch
import tqdm as _tqdm

tqdm = _tqdm.tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import transforms  # noqa: E402

SHAPES = {  # a ViT-B-like layout, shrunk; insertion order is not the sorted order
    "conv1.weight": (16, 3, 4, 4), "class_embedding": (32,), "positional_embedding": (17, 32),
    "ln_pre.weight": (32,), "blocks.0.attn.in_proj_weight": (96, 32), "blocks.0.attn.in_proj_bias": (96,),
    "blocks.0.attn.out_proj.weight": (32, 32), "blocks.0.mlp.c_fc.weight": (128, 32),
    "blocks.0.mlp.c_fc.bias": (128,), "blocks.0.mlp.c_proj.weight": (32, 128), "proj": (32, 16),
}


def load_fusion_bench(pkg: Path) -> dict:
    """The FusionBench modules, executed from their files under empty parent packages."""
    for name, sub in (("fusion_bench", pkg), ("fusion_bench.utils", pkg / "utils")):
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub} is not a directory")
        mod = types.ModuleType(name)
        mod.__path__ = [str(sub)]
        sys.modules[name] = mod
    sys.modules["fusion_bench.utils"].timeit_context = importlib.import_module("fusion_bench.utils.timer").timeit_context
    out = {}
    for key, rel in (("ties", "method/ties_merging/ties_merging_utils.py"),
                     ("iso", "method/isotropic_merging/iso_utils.py"), ("dare", "method/dare/utils.py"),
                     ("tsvm", "method/task_singular_vector/utils/TSVM_utils.py")):
        spec = importlib.util.spec_from_file_location(f"_fb_{key}", pkg / rel)
        out[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(out[key])
    names = {"torch": torch, "List": list, "Optional": Optional, "tqdm": tqdm,
             "timeit_context": sys.modules["fusion_bench.utils"].timeit_context}
    out["wudi"] = function_from(pkg / "method/wudi/wudi.py", "wudi_merging", names)
    out["tall"] = function_from(pkg / "method/tall_mask/utils.py", "generate_task_masks", names)
    return out


def function_from(path: Path, name: str, names: dict):
    """The function ``name`` defined at the top level of ``path``, executed alone in ``names``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise AttributeError(f"{path} defines no function {name}")
    scope = dict(names)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102 - the pinned wheel
    return scope[name]


def task_vectors(n: int, seed: int, quantized: bool = False) -> list[dict]:
    """n task vectors = a shared direction + a task-specific one (so signs partly agree), heavy-ish
    tails; ``quantized`` rounds to multiples of 1/8 (exact in fp32) to force magnitude ties at the
    top-k threshold and trimmed sums that cancel to exactly 0 (the zero-sign rule)."""
    g = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tvs = []
    for _ in range(n):
        tv = {k: 0.5 * shared[k] + torch.randn(s, generator=g) * torch.rand(s, generator=g).pow(2) * 3
              for k, s in SHAPES.items()}
        tvs.append({k: (v * 8).round() / 8 if quantized else v for k, v in tv.items()})
    return tvs


def flat(d: dict) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def row(rows, method, variant, ours, ref, note="", tol=1e-6, by_design=False):
    diff, scale = (ours - ref).abs(), max(ref.abs().max().item(), ours.abs().max().item(), 1e-30)
    rel, n = diff.max().item() / scale, int((diff > tol * scale).sum())
    verdict = "MATCH" if rel <= tol else "DIFFERS (by design)" if by_design else "DIFFERS"
    rows.append((method, variant, f"{diff.max().item():.3g}", str(n), verdict,
                 f"rel {rel:.2g}" + (f"; {note}" if note else "")))


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its progress output swallowed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def merged(spec: str, tvs: list[dict]) -> dict:
    """The plain sum of the vectors transform ``spec`` returns: the method's merged task vector."""
    out = transforms.load(spec).apply(tvs, [f"t{i}" for i in range(len(tvs))], 0)[0]
    return {k: sum(o[k] for o in out) for k in out[0]}


def check_spectral(fb, tvs, rows):
    """Iso-CTS, TSV-M and WUDI against FusionBench on the same vectors, each also in fp64."""
    t64 = [{k: v.double() for k, v in tv.items()} for tv in tvs]
    refs = {"iso-cts": lambda v: fb["iso"].iso_cts(v, 0.8, accelerator="cpu"),
            "tsvm": lambda v: fb["tsvm"].compute_and_sum_svd_mem_reduction(v, accelerator="cpu"),
            "wudi": lambda v: fb["wudi"](v, accelerator="cpu", iter_num=300)}
    for method, ref_fn in refs.items():
        ref = flat(quiet(ref_fn, [{k: v.clone() for k, v in tv.items()} for tv in tvs]))
        ref64 = flat(quiet(ref_fn, t64)) if method != "wudi" else None
        for spec in (f"{method}:conv=other", method):
            ours = flat(merged(spec, tvs))
            note = "" if ref64 is None else (
                f"vs fp64 FusionBench: ours {(ours.double() - ref64).abs().max().item() / ref64.abs().max().item():.2g}, "
                f"fb {(ref.double() - ref64).abs().max().item() / ref64.abs().max().item():.2g}")
            by_design = spec == method  # kernels decomposed as matrices
            row(rows, method, spec, ours, ref, "; ".join(n for n in (note, "kernels as matrices" * by_design) if n),
                tol=1e-4, by_design=by_design)
    # WUDI's fixed Adam step (1e-5) moves entries by at most 3e-3 in 300 steps: on vectors 1000x
    # smaller the optimisation changes the merge a lot, and both sides must still agree.
    small = [{k: v * 1e-3 for k, v in tv.items()} for tv in tvs]
    ref = flat(quiet(refs["wudi"], [{k: v.clone() for k, v in tv.items()} for tv in small]))
    ours, plain = flat(merged("wudi:conv=other", small)), flat(merged("wudi:conv=other,steps=1,lr=1e-12", small))
    row(rows, "wudi", "wudi:conv=other, vectors x 1e-3", ours, ref,
        f"moved {(ours - plain).norm().item() / plain.norm().item():.2f} of the sum's norm", tol=1e-4)
    # TSV-M's per-task shares: FusionBench's single-task models hold the same matrices.
    out = transforms.load("tsvm:conv=other").apply(tvs, [f"t{i}" for i in range(len(tvs))], 0)[0]
    _, single = quiet(fb["tsvm"].compute_and_sum_svd_mem_reduction, tvs, accelerator="cpu", return_single_task_models=True)
    keys = [k for k in SHAPES if len(SHAPES[k]) == 2]
    row(rows, "tsvm", "per-task shares (matrices)", torch.cat([o[k].reshape(-1) for o in out for k in keys]),
        torch.cat([s[k].reshape(-1) for s in single for k in keys]), tol=1e-4)


def check_consensus(fb, tvs, rows):
    """The TALL masks and the consensus merge. FusionBench's mask function takes fine-tuned and
    pre-trained weights; with θ0 = 0 the fine-tuned weights are the task vectors themselves."""
    stacked = torch.stack([flat(tv) for tv in tvs])
    for lam, k in ((0.6, 2), (0.2, 1), (0.4, 3)):
        masks = quiet(fb["tall"], stacked, stacked, torch.zeros_like(stacked[0]), tall_mask_lambda=lam)
        ref = (masks.float().sum(0) >= k) * stacked.sum(0)  # construct_consensus_mask: count >= prun_thre_k
        row(rows, "consensus", f"consensus:lam={lam},k={k}", flat(merged(f"consensus:lam={lam},k={k}", tvs)), ref,
            f"kept={float((masks.float().sum(0) >= k).float().mean()):.3f}")


def check_ties(fb, tvs, rows):
    names = [f"t{i}" for i in range(len(tvs))]
    stacked = torch.stack([fb["ties"].state_dict_to_vector(tv) for tv in tvs])
    assert torch.equal(stacked[0], flat(tvs[0])), "key order of state_dict_to_vector changed"
    for spec, thresh, merge in (("ties:k=0.2,merge=sum", 0.2, "sum"), ("ties:k=0.2,merge=sum", 20, "sum"),
                                ("ties:k=0.2,merge=mean", 0.2, "mean"), ("ties:k=0.2,merge=max", 0.2, "max"),
                                ("ties:k=0.05,merge=sum", 5, "sum")):
        out, _, info = transforms.load(spec).apply(tvs, names, 0)
        with contextlib.redirect_stdout(io.StringIO()):
            ref = fb["ties"].ties_merging(stacked, reset_thresh=thresh, merge_func=merge)
        ours = flat({k: sum(o[k] for o in out) for k in out[0]})
        row(rows, "ties", f"{spec[5:]} vs reset_thresh={thresh}", ours, ref,
            f"kept={info['kept_fraction']:.3f} zero-sign={info['zero_sign_entries']}")


def check_ties_majority_zero(fb, rows):
    """Degenerate case: every trimmed sum cancels, so the elected signs sum to 0 and the majority
    sign is 0 too. FusionBench then keeps the negative entries (``torch.where(0 > 0, v > 0, v < 0)``)
    for sum/mean, but ``max`` multiplies by the 0 sign."""
    tvs = [{"w": torch.tensor([3.0, -3.0, 0.0, 0.0])}, {"w": torch.tensor([-3.0, 3.0, 0.0, 0.0])}]
    stacked = torch.stack([fb["ties"].state_dict_to_vector(tv) for tv in tvs])
    for merge in ("sum", "max"):
        out, _, _ = transforms.load(f"ties:k=0.5,merge={merge}").apply(tvs, ["a", "b"], 0)
        with contextlib.redirect_stdout(io.StringIO()):
            ref = fb["ties"].ties_merging(stacked, reset_thresh=0.5, merge_func=merge)
        ours = sum(o["w"] for o in out)
        row(rows, "ties", f"k=0.5,merge={merge} majority sign 0 (toy)", ours, ref,
            f"ours={ours.tolist()} fb={ref.tolist()}")


def check_iso(fb, tvs, rows):
    """fp32 SVDs differ at ~1e-6 relative; FusionBench's iso_c keeps the dtype, so its float64 run is
    the yardstick: both fp32 results are printed with their distance to it."""
    with contextlib.redirect_stdout(io.StringIO()):
        ref = fb["iso"].iso_c([{k: v.clone() for k, v in tv.items()} for tv in tvs], accelerator="cpu")
        ref64 = flat(fb["iso"].iso_c([{k: v.double() for k, v in tv.items()} for tv in tvs], accelerator="cpu"))
    for spec in ("iso:other=mean,conv=other", "iso"):
        out = transforms.load(spec).apply(tvs, [f"t{i}" for i in range(len(tvs))], 0)[0][0]
        far = [(x.double() - ref64).abs().max().item() / ref64.abs().max().item() for x in (flat(out), flat(ref))]
        row(rows, "iso", spec, flat(out), flat(ref), f"vs fp64 FusionBench: ours {far[0]:.2g}, fb {far[1]:.2g}")
        if spec == "iso":  # the harness's default differs on purpose (1-D summed, kernels as matrices)
            rows[-1] = (*rows[-1][:4], "DIFFERS (by design)", rows[-1][5])
        for k in SHAPES:  # per-block detail of what differs beyond fp32 SVD noise
            d = (out[k] - ref[k]).abs().max().item()
            if d > 1e-4 * ref[k].abs().max().item():
                verdict = "DIFFERS (by design)" if spec == "iso" else "DIFFERS"
                rows.append(("", f"  block {k} {tuple(SHAPES[k])}", f"{d:.3g}", str(ref[k].numel()), verdict,
                             f"ours/fb={(out[k].norm() / ref[k].norm()).item():.3g} (norm ratio)"))


def check_dare(fb, tvs, rows, p: float, seeds: int):
    names = [f"t{i}" for i in range(len(tvs))]
    plain = flat({k: sum(tv[k] for tv in tvs) for k in SHAPES})
    n = plain.numel() * len(tvs)
    kept, ratio_err, mean_sum = {"ours": [], "fb": []}, {"ours": 0.0, "fb": 0.0}, {}
    for side in ("ours", "fb"):
        acc = torch.zeros_like(plain)
        for s in range(seeds):
            if side == "ours":
                out = transforms.load(f"dare:p={p}").apply(tvs, names, s)[0]
            else:
                torch.manual_seed(s)
                out = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
                for tv in out:
                    fb["dare"].module_random_drop_(tv, p, rescale=True)
            for tv, o in zip(tvs, out):
                a, b = flat(tv), flat(o)
                keep = b != 0
                kept[side].append(keep.float().mean().item())
                ratio_err[side] = max(ratio_err[side], (b[keep] / a[keep] - 1 / (1 - p)).abs().max().item())
                acc += b
        mean_sum[side] = acc / seeds
    sd = math.sqrt(p * (1 - p) / n / seeds)  # std of the overall kept fraction
    for side in ("ours", "fb"):
        f = sum(kept[side]) / len(kept[side])
        ok = abs(f - (1 - p)) < 4 * sd
        rows.append(("dare", f"{side}: kept fraction p={p}", f"{abs(f - (1 - p)):.3g}", "-",
                     "MATCH" if ok else "DIFFERS", f"{f:.5f} vs 1-p={1 - p:g} (4sd={4 * sd:.2g})"))
        rows.append(("dare", f"{side}: kept entry / input", f"{ratio_err[side]:.3g}", "-",
                     "MATCH" if ratio_err[side] <= 1e-6 / (1 - p) else "DIFFERS", f"vs 1/(1-p) = {1 / (1 - p):g}"))
    # E||mean - plain||^2 = sum_i sum_e tau_ie^2 * p/(1-p) / seeds: observed / expected should be ~1
    expect = math.sqrt(sum(flat(tv).pow(2).sum().item() for tv in tvs) * p / (1 - p) / seeds)
    for side in ("ours", "fb"):
        r = (mean_sum[side] - plain).norm().item() / expect
        rows.append(("dare", f"{side}: mean of {seeds} merges - sum", f"{(mean_sum[side] - plain).norm().item():.3g}",
                     "-", "MATCH" if 0.9 < r < 1.1 else "DIFFERS", f"observed/expected noise = {r:.3f}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fusion-bench", required=True, type=Path, help="the unpacked fusion_bench package directory")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dare-p", type=float, default=0.5)
    ap.add_argument("--dare-seeds", type=int, default=200)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # tiny tensors; on a loaded machine OpenMP spinning makes a 96x32 SVD take ~0.7 s
    try:
        fb = load_fusion_bench(a.fusion_bench.resolve())
    except Exception as e:  # noqa: BLE001 - any failure to import is the same user error
        print(f"error: cannot import FusionBench from {a.fusion_bench}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    tvs = task_vectors(a.tasks, a.seed)
    rows: list[tuple] = []
    check_ties(fb, tvs, rows)
    n = len(rows)
    check_ties(fb, task_vectors(a.tasks, a.seed + 1, quantized=True), rows)
    rows[n:] = [(m, v + " (1/8-quantized)", *r) for m, v, *r in rows[n:]]
    check_ties_majority_zero(fb, rows)
    check_iso(fb, tvs, rows)
    check_dare(fb, tvs, rows, a.dare_p, a.dare_seeds)
    check_spectral(fb, tvs, rows)
    check_consensus(fb, tvs, rows)
    head = ("method", "variant", "max|diff|", "entries≠", "verdict", "notes")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    d = sum(v.numel() for v in tvs[0].values())
    print(f"\n{a.tasks} task vectors x {d} entries ({len(SHAPES)} blocks), torch {torch.__version__}, "
          f"wall {time.perf_counter() - t0:.1f}s")
    bad = [f"{r[0]} {r[1].strip()}" for r in rows if r[4] == "DIFFERS"]
    if bad:
        print(f"FAIL: {len(bad)} comparison(s) differ from FusionBench: {'; '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
