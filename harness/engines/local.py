"""The local engine: candidates → losses in this process, on one device.

It holds the model source and the composition, moved to its device once. For each candidate it
merges θ = θ0 + Σ λ τ, runs the tail on the search inputs in chunks, applies the frozen heads and
reduces per-sample losses to the weighted mean the task defined; only floats (and the gradient
as a numpy array) come back to the host. A batch of several full-set candidates may instead be
scored in one ``torch.func.vmap`` pass over their stacked parameters: ``population=auto`` times
the first three candidates both ways once per run and keeps the faster (recorded in ``info``;
on CPU, sequential usually wins).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from harness.api import Candidate, Engine, Evaluation, HarnessError, option
from harness.composition import functional_forward
from harness.engines import package
from harness.engines.prefix import PrefixCache
from harness.outputs import Outputs
from harness.sources.base import host_array, scalar

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_RTOL, ACC_ATOL = 0.01, 0.01  # reduced precision is kept within these of fp32
# An automatic evaluation chunk fills this fraction of the device memory free after set-up, and is
# at most CHUNK_CAP images (beyond that a GPU is saturated and only the memory grows).
CHUNK_FRACTION, CHUNK_CAP = 0.5, 4096


@dataclass
class LocalOptions:
    """``population``: ``auto`` (measure vmap against sequential once, keep the faster) or ``off``.
    ``precision``: ``fp32``, or ``bf16``/``fp16`` autocast of the tail's forward (and backward) when
    scoring candidates, kept only if, on the first candidate scored, the search loss is within
    :data:`LOSS_RTOL` and the search accuracy within :data:`ACC_ATOL` of fp32 (measured and
    recorded in ``task_info.precision``). Heads and losses run in fp32 on fp32 features, and
    accuracies (references, the final test score) are always computed in fp32.
    ``eval_chunk``: images run through the tail at once (search scoring and accuracies). ``auto``
    keeps the source's own chunking on the CPU (tuned there) and, on CUDA, sizes it to the device:
    the memory one image takes in a no-grad forward is measured on the first scored inputs and the
    chunk fills half of the memory then free (recorded in ``task_info.eval_chunk``). An integer
    sets it (0: one pass). ``prefix_cache``: see :mod:`harness.engines.prefix` (same results
    either way; ``off`` saves the memory of the kept activations)."""

    population: str = option("auto", "score a batch of candidates in one vmap pass where that measures faster "
                                     "(auto), or one after another (off)", choices=("auto", "off"))
    precision: str = option("fp32", "forward precision when scoring candidates: fp32, or bf16/fp16 autocast, used "
                                    "only where the first score stays within a tolerance of fp32",
                            choices=tuple(PRECISIONS))
    eval_chunk: str = option("auto", "images per forward pass: auto (the source's own on CPU, sized to free memory "
                                     "on CUDA) or N (0: one pass)")
    prefix_cache: str = option("auto", "keep an anchor candidate's activations at every stage of a staged tail and "
                                       "start candidates that change only later stages from there (auto), or never "
                                       "(off; saves the memory)", choices=("auto", "off"))


def parse_chunk(value) -> int | None:
    """``eval_chunk`` as an integer, or None for ``auto``; raises HarnessError on anything else."""
    text = str(value).strip()
    if text == "auto":
        return None
    if not text.isdigit():
        raise HarnessError(f"task option eval_chunk must be auto or an integer >= 0 (images per forward; "
                           f"0 = one pass), got {value!r}")
    return int(text)


def choose_chunk(free_bytes: float, per_image_bytes: float, fraction: float = CHUNK_FRACTION,
                 cap: int = CHUNK_CAP) -> int:
    """Images per forward so that their activations take ``fraction`` of ``free_bytes``: a multiple
    of 8 when that is at least 8, never below 1 nor above ``cap``."""
    n = int(fraction * free_bytes // max(per_image_bytes, 1.0))
    if n >= 8:
        n -= n % 8
    return max(1, min(cap, n))


class LocalEngine(Engine):
    """Merge and forward in this process on ``device`` (cpu, cuda, cuda:N; meta in tests)."""

    name = "local"
    description = "merge + chunked forward on one device; population (vmap) pass where it measured faster"
    Options = LocalOptions

    @classmethod
    def validate(cls, options):
        parse_chunk(options.eval_chunk)

    def __init__(self, source, composition, device: str, options):
        super().__init__(source, composition, device, options)
        self._vmap_faster = None
        self._amp = None  # the autocast dtype in use, once the precision check has run
        self._chunk_sized = False
        self.to(device)  # sets self.prefix

    def autocast(self):
        """The forward's precision context: autocast to the checked dtype, else nothing (fp32)."""
        if self._amp is None or self.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp)

    def features(self, params, x, c: Candidate | None = None):
        """The tail's features of ``x`` under :meth:`autocast`, as fp32. For a candidate ``c``
        without a gradient, through the prefix cache (:mod:`harness.engines.prefix`): an
        ``anchor`` is kept, and a later candidate starts from the kept state where it can."""
        with self.autocast():
            if c is not None and not c.grad and self._prefix_on():
                if c.anchor:
                    self.info.setdefault("prefix_cache", self.prefix.stats)  # recorded with the run
                    return self.prefix.keep(params, self.comp.coefficients(c.x), x, self._amp)
                z = self.prefix.reuse(params, x, self._amp)
                if z is not None:
                    return z
            return self.source.features(params, x).float()

    def check_precision(self, c: Candidate, data, shard=None) -> Evaluation | None:
        """Score ``c`` in fp32 and in the asked precision; keep the latter only within tolerance.
        Runs once, on the first candidate; the outcome is recorded in ``info["precision"]``.
        Returns ``c``'s score (no gradient, no regulariser) in the precision kept, or None when
        nothing was checked."""
        asked = self.options.precision
        if self._amp is not None or "precision" in self.info or asked == "fp32":
            return None
        full = Candidate(c.x, grad=False, batch=c.batch, fidelity=c.fidelity)
        ref = self.weighted_ce(full, data, shard)
        self._amp = PRECISIONS[asked]
        t0 = time.perf_counter()
        low = self.weighted_ce(full, data, shard)
        loss_err = abs(low.loss - ref.loss) / max(abs(ref.loss), 1e-12)
        acc_err = abs(low.metrics["acc"] - ref.metrics["acc"])
        ok = loss_err <= LOSS_RTOL and acc_err <= ACC_ATOL
        if not ok:
            self._amp = None
        self.info["precision"] = {
            "asked": asked, "used": asked if ok else "fp32", "loss_fp32": ref.loss, f"loss_{asked}": low.loss,
            "acc_fp32": ref.metrics["acc"], f"acc_{asked}": low.metrics["acc"],
            "loss_rel_err": loss_err, "acc_abs_err": acc_err, "tolerance": {"loss_rtol": LOSS_RTOL, "acc_atol": ACC_ATOL},
            f"{asked}_s": round(time.perf_counter() - t0, 4)}
        return low if ok else ref

    def adopt_precision(self, decision: dict) -> None:
        """Take a precision decided elsewhere (``info["precision"]`` of another engine of the same
        run, e.g. the driver's for Ray workers) instead of checking again: every shard and every
        worker of one run then computes in the same precision."""
        self.info["precision"] = dict(decision, adopted=True)
        used = decision.get("used", "fp32")
        if used not in PRECISIONS:
            raise HarnessError(f"precision decision names {used!r}; valid: {', '.join(PRECISIONS)}")
        self._amp = PRECISIONS[used]

    def size_chunk(self, sample) -> None:
        """Set the tail's evaluation chunk once, before the first forward pass (see ``eval_chunk``):
        a set chunk at once; ``auto`` on CUDA from a probe on ``sample()`` (a few stored inputs,
        or None when there are none yet)."""
        if self._chunk_sized:
            return
        self._chunk_sized = True
        asked = parse_chunk(self.options.eval_chunk)
        if asked is not None:
            self.source.chunk_size = asked
            self.info["eval_chunk"] = {"asked": asked, "chunk": asked}
            return
        if self.device.type != "cuda":
            return  # the source's own chunking, tuned on the CPU
        x = sample()
        if x is None or not len(x):
            self._chunk_sized = False  # nothing to probe on yet: try again at the next pass
            return
        k = min(16, len(x))
        with torch.no_grad():
            params, _ = self.params(np.zeros(self.comp.dim), False)  # the pre-trained model
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.features(params, x[:k])
            torch.cuda.synchronize(self.device)
            per_image = (torch.cuda.max_memory_allocated(self.device) - base) / k
            del params
        free, total = torch.cuda.mem_get_info(self.device)
        self.source.chunk_size = choose_chunk(free, per_image)
        self.info["eval_chunk"] = {"asked": "auto", "chunk": self.source.chunk_size, "per_image_mb": round(per_image / 2**20, 3),
                                   "free_mb": round(free / 2**20), "total_mb": round(total / 2**20),
                                   "fraction": CHUNK_FRACTION}

    def to(self, device) -> "LocalEngine":
        """Move the source (tail, θ0, heads, inputs) and the composition to ``device``, once."""
        self.device = torch.device(device)
        self.source.to(self.device)
        self.comp.to(self.device)
        self.prefix = PrefixCache(self.source, self.comp)  # nothing kept: it would be on the old device
        return self

    def _prefix_on(self) -> bool:
        return self.prefix.enabled and self.options.prefix_cache == "auto"

    def params(self, x, grad: bool):
        """Merged parameters for ``x`` and the tensor gradients flow to (None without grad).
        Without a gradient, blocks whose coefficients equal a kept anchor's take its tensors."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        if grad:
            xt = xt.clone().requires_grad_(True)
            return self.comp.merge(xt), xt
        return (self.prefix.merge(xt) if self._prefix_on() else self.comp.merge(xt)), xt

    def population_features(self, params: list[dict], x):
        """The tail's outputs for several parameter sets at once, ``(len(params), N, ...)``: one
        ``torch.func.vmap`` pass over the stacked parameters per chunk of ``x``. Equal to calling
        :meth:`features` per parameter set; faster only where the hardware batches well (GPU)."""
        src = self.source
        stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
        # Several candidates' activations at once: a chunk sized to the device is shared between them.
        size = src.chunk_size
        if size and "eval_chunk" in self.info:
            size = max(1, size // len(params))
        chunks = x.split(size) if size else (x,)
        outs = []
        for c in chunks:
            c = src.prepare(c)
            if src.channels_last and c.dim() == 4:
                c = c.contiguous(memory_format=torch.channels_last)
            with warnings.catch_warnings(), self.autocast():  # ops without a batching rule fall back (slower, same result)
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                outs.append(torch.func.vmap(lambda p, inp=c: functional_forward(src.tail, p, inp))(stacked).float())
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def per_sample_ce(self, params, names, xs, ys, c: Candidate | None = None):
        """Per-sample cross-entropy of each data set's samples under its own frozen head, from one
        concatenated tail forward (the tail is shared; only the heads differ)."""
        nonempty = [x for x in xs if len(x)]
        if not nonempty:
            return ([torch.zeros(0, device=self.device) for _ in xs],
                    [torch.zeros(0, dtype=torch.bool, device=self.device) for _ in xs])
        return ce_from_features(self.source, self.features(params, torch.cat(nonempty), c), names, xs, ys)

    def weighted_ce(self, c: Candidate, data, shard=None, regularizer=None) -> Evaluation:
        """Candidate ``c`` on shard ``shard`` of ``data`` (a :class:`harness.objective.WeightedSet`):
        the weighted mean cross-entropy (plus ``regularizer(coefficients)``, a per-candidate
        constant that survives the shard reduction) and the weighted accuracy. An empty shard has
        weight 0 and a zero gradient."""
        names, xs, ys, ws = data.part(shard)
        with torch.set_grad_enabled(c.grad):
            params, xt = self.params(c.x, c.grad)
            wsum = scalar(sum(w.sum() for w in ws))
            if not any(len(y) for y in ys):
                return package(xt.sum() * 0, 0.0, xt, c.grad, {"acc": 0.0})
            if c.outputs and shard is None:
                return self._with_outputs(c, params, xt, data, wsum, regularizer)
            loss, acc = _weighted_means(*self.per_sample_ce(params, names, xs, ys, c), ws, wsum)
            if regularizer is not None:
                loss = loss + regularizer(xt)
            return package(loss, wsum, xt, c.grad, {"acc": acc})

    def _with_outputs(self, c: Candidate, params, xt, data, wsum: float, regularizer=None, z=None) -> Evaluation:
        """:meth:`weighted_ce` of ``c`` on the whole of ``data`` with its logits attached
        (:class:`harness.outputs.Outputs`, whose loss formula gives the same loss); from the
        tail's features ``z`` where they are already known."""
        if regularizer is not None:
            raise HarnessError("a candidate's outputs were asked for, but this loss has a term on the coefficients "
                               "(l1/l2) that the outputs do not carry; set the penalty to 0")
        names, xs, ys, ws = data.part(None)
        logits = (self.per_sample_logits(params, names, xs, c) if z is None
                  else logits_from_features(self.source, z, names, xs))
        loss, acc = _weighted_means(*ce_from_logits(logits, ys), ws, wsum)
        ev = package(loss, wsum, xt, c.grad, {"acc": acc})
        ev.outputs = outputs_of(logits, ys, ws)
        return ev

    def per_sample_logits(self, params, names, xs, c: Candidate | None = None) -> list:
        """Each data set's logits under its own head, from one concatenated tail forward."""
        z = self.features(params, torch.cat([x for x in xs if len(x)]), c)
        return logits_from_features(self.source, z, names, xs)

    def population_ce(self, cands: list[Candidate], data, shard=None) -> list[Evaluation]:
        """:meth:`weighted_ce` of several candidates (no gradients) from one vmap pass of the tail."""
        names, xs, ys, ws = data.part(shard)
        wsum = scalar(sum(w.sum() for w in ws))
        if len(cands) < 2 or not any(len(y) for y in ys):
            return [self.weighted_ce(c, data, shard) for c in cands]
        with torch.no_grad():
            params = [self.params(c.x, False)[0] for c in cands]
            z = self.population_features(params, torch.cat([x for x in xs if len(x)]))
            out = []
            for k in range(len(cands)):
                loss, acc = _weighted_means(*ce_from_features(self.source, z[k], names, xs, ys), ws, wsum)
                out.append(package(loss, wsum, None, False, {"acc": acc}))
        return out

    def score(self, cands: list[Candidate], data, shard=None, regularizer=None) -> list[Evaluation]:
        """:meth:`weighted_ce` of every candidate: one vmap pass for a batch of several full-set
        scores where that measured faster (``population=auto``), else one after another."""
        if not cands:
            return []
        self.size_chunk(lambda: next((x[:16] for x in data.part(None)[1] if len(x)), None))
        first = self.check_precision(cands[0], data, shard)
        if first is not None and not cands[0].grad and not cands[0].outputs and regularizer is None:
            # The check already scored the first candidate: reuse it rather than score it again.
            return [first] + self.score(cands[1:], data, shard, regularizer)
        if (len(cands) > 1 and shard is None and regularizer is None and self._prefix_on()
                and all(c.outputs and not c.grad for c in cands) and any(len(y) for y in data.part(None)[2])):
            return self._probes(cands, data)
        # A linearised forward (a JVP) has no population pass: candidates go one after another.
        plain = (len(cands) < 2 or self.options.population == "off" or regularizer is not None
                 or any(c.grad or c.outputs for c in cands) or self.source.linearized)
        if plain or self._vmap_faster is False:
            return [self.weighted_ce(c, data, shard, regularizer) for c in cands]
        if self._vmap_faster:
            return self.population_ce(cands, data, shard)
        # The trial: the first few candidates both ways (their sequential scores are the ones
        # returned), once per run; the rest of this batch already takes the faster path.
        trial = cands[:3]
        t0 = time.perf_counter()
        seq = [self.weighted_ce(c, data, shard) for c in trial]
        t1 = time.perf_counter()
        try:
            self.population_ce(trial, data, shard)
            t2 = time.perf_counter()
            self._vmap_faster = (t2 - t1) < (t1 - t0)
            note = {"candidates": len(trial), "sequential_s": round(t1 - t0, 4), "vmap_s": round(t2 - t1, 4)}
        except Exception as e:  # an architecture without vmap rules: stay sequential
            self._vmap_faster, note = False, {"vmap_error": f"{type(e).__name__}: {e}"[:200]}
        self.info["population"] = {**note, "chosen": "vmap" if self._vmap_faster else "sequential"}
        return seq + self.score(cands[len(trial):], data, shard)

    def _probes(self, cands: list[Candidate], data) -> list[Evaluation]:
        """Candidates asking for outputs (``dfo-gn``'s probes) in order: an anchor alone (it is
        kept), runs of the others from the kept state in shared passes where the prefix cache can
        (:meth:`PrefixCache.reuse_batch`), one by one otherwise."""
        names, xs, ys, ws = data.part(None)
        x, wsum, out, run = torch.cat([x for x in xs if len(x)]), scalar(sum(w.sum() for w in ws)), [], []
        for c in [*cands, None]:
            if c is not None and not c.anchor:
                run.append(c)
                continue
            with torch.no_grad():
                ps = [self.params(r.x, False) for r in run]
                with self.autocast():  # the tail only, as in features(): heads and losses stay fp32
                    # a pass of at most a chunk's images (a source without chunks: 256 at most)
                    zs = self.prefix.reuse_batch([p for p, _ in ps], x, self._amp,
                                                 self.source.chunk_size or max(len(x), 256))
                # z None: this probe could not share a pass; scored alone from its merged weights
                out += [self._with_outputs(r, p, xt, data, wsum, z=z) for r, (p, xt), z in zip(run, ps, zs)]
            run = []
            if c is not None:
                out.append(self.weighted_ce(c, data))
        return out

    def accuracy(self, x, ds: str, split: str = "test") -> float:
        self.size_chunk(lambda: next(iter(self.source.batches(ds, split, 16)), None))
        with torch.no_grad():  # fp32 always: every reported accuracy is exact
            return self.source.accuracy(self.params(x, False)[0], ds, split)


def _weighted_means(losses, correct, ws, wsum: float):
    """The weighted mean loss (a tensor) and accuracy (a float) of per-sample results."""
    loss = sum((l * w).sum() for l, w in zip(losses, ws)) / wsum
    return loss, scalar(sum((k.float() * w).sum() for k, w in zip(correct, ws))) / wsum


def outputs_of(logits, ys, ws, caps=None) -> Outputs:
    """:class:`Outputs` of per-data-set logits, labels and weights (copied to the host)."""
    return Outputs(logits=[host_array(z.detach().float()) for z in logits], labels=[host_array(y) for y in ys],
                   weights=[host_array(w.float()) for w in ws], caps=list(caps or []))


def logits_from_features(source, z, names, xs) -> list:
    """Each data set's logits under its own frozen head, from the tail's features ``z`` of the
    concatenated non-empty inputs ``xs``."""
    if source.normalize:
        z = F.normalize(z, dim=-1)
    out, i = [], 0
    for name, x in zip(names, xs):
        w, b = source.heads[name]
        out.append(F.linear(z[i:i + len(x)], w, b))
        i += len(x)
    return out


def ce_from_logits(logits, ys):
    """Per-sample cross-entropy and correctness of each data set's logits against its labels."""
    losses, correct = [], []
    for z, y in zip(logits, ys):
        losses.append(F.cross_entropy(z, y, reduction="none") if len(y) else z.new_zeros(0))
        correct.append(z.argmax(1) == y)
    return losses, correct


def ce_from_features(source, z, names, xs, ys):
    """Per-sample cross-entropy and correctness from the tail's features ``z`` of the concatenated
    non-empty inputs ``xs`` (one head per data set)."""
    return ce_from_logits(logits_from_features(source, z, names, xs), ys)
