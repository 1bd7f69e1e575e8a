"""The model-source data type: the composed part, its task vectors, frozen heads and cached inputs.

A :class:`ModelSource` is what a source plugin (``harness.sources`` entry points) builds and what
every objective and engine consumes. A network is split into a frozen *prefix* (run once per
image, its outputs cached as ``inputs``) and a *tail* whose parameters are the composed blocks. On
CPU this split is the biggest single speed lever: fine-tuning and every candidate evaluation run
only the tail. Heads are frozen and per data set.

Two kinds exist: ``linear`` (a plain torch backbone with linear heads fitted on the pre-trained
features) and ``clip`` (an image tower whose heads are zero-shot text embeddings; features are
L2-normalised first). A source is built on the CPU and moved once with :meth:`ModelSource.to`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.composition import functional_forward
from harness.data import to_tensor, to_uint8

SPLITS = ("train", "val", "test")  # the splits a source carries (pretrain data is a zoo's business)


@dataclass(eq=False)
class ModelSource:
    """A pre-trained tail with per-data-set task vectors, frozen heads and cached tail inputs.

    Attributes:
        name: the zoo or model name.
        kind: ``"linear"`` or ``"clip"``.
        tail: the composed module, eval mode, ``requires_grad`` False everywhere. BN running
            statistics are buffers of this module and are never merged.
        base: the tail's pre-trained floating parameters (fp32), i.e. θ_0 of the composition.
        heads: ``{ds: (W, b)}``; logits are ``features @ W.T + b``.
        classes: ``{ds: class names}``.
        inputs: ``{ds: {split: tail input}}`` for splits train/val/test (prefix outputs, or the
            preprocessed images when there is no prefix).
        labels: ``{ds: {split: int64 labels}}``.
        task_vectors: ``{ds: {block: τ}}``, same keys as ``base``.
        lora_factors: ``{ds: {block: (A, B)}}`` for task vectors fine-tuned as LoRA adapters (a
            zoo's ``ft_mode=lora``): their factors, B scaled by α/r, for ``-t lora_form=factors``;
            ``task_vectors`` holds the same updates dense.
        normalize: L2-normalise features before the head (CLIP).
        prefix: the frozen module in front of the tail, or None.
        image_size, mean, std: how :meth:`encode` preprocesses raw images.
        images: ``{ds: {split: raw uint8 images}}`` (for tasks that augment, e.g. TTA).
        chunk_size: run the tail on chunks of at most this many inputs (0: one pass). On 2 CPU
            cores the EfficientNet tail is ~1.7x faster on chunks of 96 than on 384 at once.
        channels_last: feed 4-D inputs in channels-last memory format (2x faster for the
            EfficientNet tail's depthwise convolutions, forward and backward).
        compact: hold the cached inputs as uint8 images at the tail's resolution (4× less memory
            than fp32; no prefix only) and normalise them chunk by chunk on the device, in
            :meth:`prepare`. The user-model sources (open_clip, hf_clip) are compact.
        meta: facts about the source: accuracies, block and parameter counts, timings, config.
        device: where the tail, θ_0, heads and cached inputs live (see :meth:`to`).
    """

    name: str
    kind: str
    tail: nn.Module
    base: dict[str, Tensor]
    heads: dict[str, tuple[Tensor, Tensor]]
    classes: dict[str, list[str]]
    inputs: dict[str, dict[str, Tensor]]
    labels: dict[str, dict[str, Tensor]]
    task_vectors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    lora_factors: dict[str, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)
    normalize: bool = False
    prefix: nn.Module | None = None
    image_size: int = 64
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    chunk_size: int = 0
    channels_last: bool = False
    compact: bool = False
    meta: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # True for a linearised tail forward (:class:`harness.sources.linear.LinearizedSource`).
    linearized = False

    @property
    def datasets(self) -> list[str]:
        """The data sets of this source, in build order."""
        return list(self.heads)

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.base.values())
        return (f"ModelSource({self.name!r}, kind={self.kind!r}, datasets={self.datasets}, "
                f"blocks={len(self.base)}, params={n})")

    def features(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The tail's output on ``x`` with ``params`` in place of its parameters (differentiable)."""
        return self.chunked(lambda c: functional_forward(self.tail, params, c), x)

    def chunked(self, forward, x: Tensor) -> Tensor:
        """``forward`` applied to ``x`` chunk by chunk (:attr:`chunk_size`), each chunk prepared
        (:meth:`prepare`, channels-last where set) first; the outputs concatenated."""
        outs = [forward(c) for c in self.prepared_chunks(x)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def prepared_chunks(self, x: Tensor):
        """The chunks of ``x`` :meth:`chunked` runs the tail on, prepared, one at a time."""
        for c in x.split(self.chunk_size) if self.chunk_size else (x,):
            c = self.prepare(c)
            if self.channels_last and c.dim() == 4:
                c = c.contiguous(memory_format=torch.channels_last)
            yield c

    def prepare(self, x: Tensor) -> Tensor:
        """Tail inputs from stored ones: uint8 images (``compact``) become ``(x / 255 − mean) / std``
        in fp32 on their device, the same arithmetic :func:`harness.data.to_tensor` does; anything
        else is returned as it is."""
        if x.dtype != torch.uint8:
            return x
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
        # In place on the one fp32 copy: the same operations in the same order (bit for bit), one
        # allocation instead of four (allocating fresh memory per batch dominated on the CPU).
        return x.float().div_(255).sub_(mean).div_(std)

    def head(self, z: Tensor, ds: str) -> Tensor:
        """``ds``'s frozen head on tail features ``z`` (L2-normalised first for CLIP). Lets a task
        run one tail pass over several data sets' inputs and split the features per head."""
        if self.normalize:
            z = F.normalize(z, dim=-1)
        weight, bias = self.heads[ds]
        return F.linear(z, weight, bias)

    def logits(self, params: dict[str, Tensor], x: Tensor, ds: str) -> Tensor:
        """Functional tail forward with ``params`` (e.g. merged ones), then ``ds``'s frozen head."""
        return self.head(self.features(params, x), ds)

    @torch.no_grad()
    def accuracy(self, params: dict[str, Tensor], ds: str, split: str = "test",
                 batch_size: int = 512) -> float:
        """Top-1 accuracy of the tail with ``params`` on one cached split."""
        y, correct, i = self.labels[ds][split], 0, 0
        for x in self.batches(ds, split, batch_size):
            correct += scalar((self.logits(params, x, ds).argmax(1) == y[i:i + len(x)]).sum())
            i += len(x)
        if i != len(y):
            raise RuntimeError(f"split {ds}/{split} yielded {i} inputs for {len(y)} labels")
        return correct / max(len(y), 1)

    def batches(self, ds: str, split: str, batch_size: int = 512):
        """One split's tail inputs in order, ``batch_size`` at a time, on the source's device:
        slices of a resident tensor, or a streamed split's batches (:mod:`harness.stream`)."""
        x = self.inputs[ds][split]
        if isinstance(x, Tensor):
            return (x[i:i + batch_size] for i in range(0, len(x), batch_size))
        return x.batches(batch_size, self.device)

    def finetuned(self, ds: str) -> dict[str, Tensor]:
        """θ_0 + τ_ds: the parameters of ``ds``'s own fine-tuned tail."""
        tv = self.task_vectors[ds]
        return {k: v + tv[k] for k, v in self.base.items()}

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 128) -> Tensor:
        """Raw uint8 images (N,H,W) or (N,H,W,3) → tail inputs: preprocess, then the frozen prefix.

        Tasks use this to cache extra views of images (e.g. augmentations for test-time adaptation).
        """
        if self.compact and self.prefix is None:
            return to_uint8(images, self.image_size, channels=3).to(self.device)
        x = to_tensor(images, self.image_size, channels=3, mean=self.mean, std=self.std).to(self.device)
        if self.prefix is None:
            return x
        outs = []
        for i in range(0, len(x), batch_size):
            c = x[i:i + batch_size]
            if self.channels_last:
                c = c.contiguous(memory_format=torch.channels_last)
            outs.append(self.prefix(c).contiguous())
        return torch.cat(outs) if outs else x.new_zeros((0,))

    def to(self, device: torch.device | str) -> "ModelSource":
        """Move the tail, the prefix, θ_0, the heads and the cached inputs and labels to ``device``,
        once, in place. Task vectors stay where they are: a composition stacks its own copy and
        moves that (:meth:`harness.composition.Composition.to`)."""
        device = torch.device(device)
        self.tail.to(device)
        if self.prefix is not None:
            self.prefix.to(device)
        self.base = {k: v.to(device) for k, v in self.base.items()}
        self.heads = {ds: (w.to(device), b.to(device)) for ds, (w, b) in self.heads.items()}
        self.inputs = {ds: {s: x.to(device) for s, x in sp.items()} for ds, sp in self.inputs.items()}  # lazy splits too
        self.labels = {ds: {s: y.to(device) for s, y in sp.items()} for ds, sp in self.labels.items()}
        self.device = device
        return self

    def add_data(self, ds: str, splits: dict[str, tuple]) -> None:
        """Encode and store raw ``{split: (images, labels)}`` of ``ds`` (train/val/test only).

        ``images`` is a uint8 array, or a :class:`harness.stream.LazySplit`, which is kept as it
        is and read in batches when scored (a streamed split). A compact source's raw images of
        a resident split at the model's size are a view of its inputs, not a second copy.
        """
        from harness.stream import LazySplit
        self.images[ds], self.inputs[ds], self.labels[ds] = {}, {}, {}
        for split in SPLITS:
            if split not in splits:
                continue
            images, labels = splits[split]
            self.labels[ds][split] = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
            if isinstance(images, LazySplit):
                self.inputs[ds][split], self.images[ds][split] = images.to(self.device), images.hwc()
                continue
            x = self.inputs[ds][split] = self.encode(images)
            at_size = images.ndim == 4 and images.shape[1:] == (self.image_size, self.image_size, 3)
            if x.dtype == torch.uint8 and x.device.type == "cpu" and at_size:
                self.images[ds][split] = x.permute(0, 2, 3, 1).numpy()  # the same values, shared
            else:
                self.images[ds][split] = np.ascontiguousarray(images)

    def evaluate_references(self, cache_dir: str | None = None, extra=None) -> None:
        """Record zero-shot and fine-tuned test accuracy per data set in ``meta``. With a
        ``cache_dir``, figures computed before from the same weights, heads, test data and code
        are read from the reference cache (``harness/refcache.py``); ``meta["references_cached"]``
        says which. ``extra`` is ``(name, version, compute)``: further figures of the same content
        (the checkpoint check, :mod:`harness.sources.task_check`), ``compute(self)``, kept in the
        same cache entry (``version`` is part of its key) and stored in ``meta[name]``."""
        def compute():
            zs, ft = self._reference_accuracies()
            return (zs, ft) if extra is None else (zs, ft, extra[2](self))
        if cache_dir is not None:
            import harness.refcache as refcache
            material = {"base": content_hash(self.base), "device": self.device.type if self.device else "cpu",
                        "task_vectors": content_hash({f"{ds}/{k}": v for ds in sorted(self.task_vectors)
                                                      for k, v in self.task_vectors[ds].items()}),
                        "data": data_hash(self), "code": refcache.code_version()}
            material.update(self.reference_material())
            if extra is not None:
                material[extra[0]] = extra[1]
            value, hit = refcache.cached(cache_dir, "source", material, compute)
            self.meta["references_cached"] = hit
        else:
            value = compute()
        self.meta["zero_shot_acc"], self.meta["finetuned_acc"] = value[0], value[1]
        if extra is not None:
            self.meta[extra[0]] = value[2]

    def reference_material(self) -> dict:
        """What else, besides weights, data and code, decides this source's reference accuracies
        (part of their cache key): nothing for a plain forward."""
        return {}

    def _reference_accuracies(self) -> tuple[dict, dict]:
        zs, ft = {}, {}
        for ds in self.datasets:
            if "test" not in self.inputs[ds]:
                continue
            zs[ds] = self.accuracy(self.base, ds, "test")
            if ds in self.task_vectors:
                ft[ds] = self.accuracy(self.finetuned(ds), ds, "test")
        return zs, ft


def scalar(t: Tensor) -> float:
    """A 0-d tensor as a Python float, copied to the host. On the ``meta`` device (shape-only
    runs that check no tensor of the evaluation path stays on the CPU) there is no value: NaN."""
    if not isinstance(t, Tensor):
        return float(t)
    return float("nan") if t.device.type == "meta" else float(t)


def content_hash(tensors: dict[str, Tensor]) -> str:
    """A short sha256 of named tensors (names, dtypes, shapes and bytes, in name order): the same
    weights give the same hash on any machine, any other weights a different one."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def data_hash(src) -> str:
    """A content hash of what a source scores on: every split's inputs and labels and the heads."""
    tensors = {f"{ds}/{split}/{kind}": t for ds in src.inputs for split in src.inputs[ds]
               for kind, t in (("x", src.inputs[ds][split]), ("y", src.labels[ds][split]))}
    for k, t in tensors.items():  # a streamed split counts by its fingerprint (files and transform)
        if not isinstance(t, Tensor):
            tensors[k] = torch.frombuffer(bytearray(f"{type(t).__name__}:{t.fingerprint()}".encode()), dtype=torch.uint8)
    tensors.update({f"{ds}/head/{i}": t for ds, head in src.heads.items() for i, t in enumerate(head)
                    if t is not None})
    return content_hash(tensors)


def host_array(t: Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the host (NaN-filled for a ``meta`` tensor, see :func:`scalar`)."""
    if t.device.type == "meta":
        return np.full(tuple(t.shape), np.nan)
    return t.detach().cpu().double().numpy().copy()


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients anywhere: the module's own tensors are never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module

def tail_parameters(tail: nn.Module) -> dict[str, Tensor]:
    """θ_0: detached fp32 copies of the tail's floating parameters (buffers excluded)."""
    return {n: p.detach().float().clone() for n, p in tail.named_parameters() if p.is_floating_point()}

def source_stats(source: ModelSource) -> dict:
    """Block and parameter counts of the composed part, split sizes per data set, and what the
    inputs take in memory: resident tensors, and the splits streamed instead (with what they
    would have taken)."""
    held = [x for sp in source.inputs.values() for x in sp.values()]
    resident = [x for x in held if isinstance(x, Tensor)]
    return {
        "blocks": len(source.base),
        "params": int(sum(v.numel() for v in source.base.values())),
        "sizes": {ds: {s: int(len(y)) for s, y in source.labels[ds].items()} for ds in source.datasets},
        "resident_inputs_mb": round(sum(x.numel() * x.element_size() for x in resident) / 2**20, 1),
        "streamed_splits": {ds: [s for s, x in sp.items() if not isinstance(x, Tensor)]
                            for ds, sp in source.inputs.items() if any(not isinstance(x, Tensor) for x in sp.values())},
        "streamed_inputs_mb": round(sum(len(x) * x.item_bytes for x in held if not isinstance(x, Tensor)) / 2**20, 1),
        "input_dtype": str(next((x.dtype for x in held), "none")),
    }


# --------------------------------------------------------------------------- linear heads

def fit_linear_head(features: Tensor, labels: Tensor, n_classes: int, steps: int = 300,
                    lr: float = 1e-2, weight_decay: float = 1e-3) -> tuple[Tensor, Tensor]:
    """A linear classifier on fixed features: full-batch Adam from zero, L2 on the weights.

    Deterministic (zero init, no sampling). Returns ``(W, b)`` with W of shape (n_classes, dim).
    """
    weight = torch.zeros(n_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay * weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()

def few_shot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Indices of ``shots`` random samples per class (fewer if a class has fewer), seeded."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:shots]])
    return torch.cat(picks)
