"""Coefficient spaces: how a flat coefficient vector maps onto (task, block) scales.

The names a ``--space`` takes (:func:`parse_space`), how blocks group into layers and depths
(:func:`layer_of`, :func:`depth_of`), which blocks are normalisation layers (:func:`is_norm_block`),
and the random partitions of aTLAS×K (:func:`draw_partitions`). :class:`harness.composition.Composition`
uses them to read λ from ``x``.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor

from harness.api import HarnessError

SPACES = ("per_task", "per_layer", "per_block", "per_partition:K", "per_partition:K:matrices", "lines", "norms",
          "lora:R[:ALPHA]")
_PARTITION = re.compile(r"per_partition:(\d+)(:matrices)?")
# A normalisation layer's name (the component before ``weight``/``bias``): open_clip's ln_1/ln_pre,
# Hugging Face's layer_norm1/pre_layrnorm/post_layernorm, EfficientNet's _bn0, torchvision's bn1/norm.
_LORA = re.compile(r"lora:(\d+)(?::(\d+(?:\.\d*)?))?")
_NORM_LAYER = re.compile(r"^_?(ln|bn)(_?\w*)?$|norm|layrnorm", re.IGNORECASE)

# Container names whose next component is a layer index (timm/EfficientNet, efficientnet_pytorch,
# open_clip's transformer, torchvision/HF encoders).
_LAYER_CONTAINERS = {"blocks", "_blocks", "resblocks", "layers", "layer"}


def parse_space(spec: str) -> tuple[str, int]:
    """Parse a space spec into ``(kind, K)``; K is 1 except for ``per_partition:K`` and ``lora:R`` (K = R).

    Args:
        spec: one of ``per_task``, ``per_layer``, ``per_block``, ``per_partition:K`` (K ≥ 2),
            ``per_partition:K:matrices`` (the released code's aTLAS×K, see :func:`draw_partitions`),
            ``lines``, ``norms``, ``lora:R[:ALPHA]`` (R ≥ 1; low-rank adaptation, :mod:`harness.lora`).
    """
    if spec in ("per_task", "per_layer", "per_block", "lines", "norms"):
        return spec, 1
    m = _PARTITION.fullmatch(str(spec).strip())
    if m and int(m.group(1)) >= 2:
        return "per_partition", int(m.group(1))
    m = _LORA.fullmatch(str(spec).strip())
    if m and int(m.group(1)) >= 1 and (m.group(2) is None or float(m.group(2)) > 0):
        return "lora", int(m.group(1))
    raise HarnessError(f"unknown coefficient space {spec!r}; valid forms: "
                       f"{', '.join(SPACES)} (K an integer >= 2, R an integer >= 1, ALPHA > 0)")


def layer_of(block_name: str) -> str:
    """The layer a parameter belongs to, for the ``per_layer`` space.

    The first integer index right after a container such as ``blocks``/``resblocks``/``layers``
    (``"transformer.resblocks.3.attn.in_proj_weight"`` → ``"resblocks.3"``), otherwise the first name
    component (``"conv_head.weight"`` → ``"conv_head"``, ``"weight"`` → ``"weight"``).
    """
    parts = block_name.split(".")
    for name, nxt in zip(parts, parts[1:]):
        if name in _LAYER_CONTAINERS and nxt.isdigit():
            return f"{name}.{nxt}"
    return parts[0]


def is_norm_block(name: str, shape: Sequence[int]) -> bool:
    """Whether a block is a normalisation layer's affine weight or bias (1-D, its layer named
    like ``ln_1``, ``layer_norm1``, ``_bn0`` or ``norm``): what the ``norms`` space tunes."""
    parts = name.split(".")
    return len(shape) == 1 and len(parts) >= 2 and parts[-1] in ("weight", "bias") and bool(_NORM_LAYER.search(parts[-2]))


def depth_of(blocks: Sequence[str]) -> list[float]:
    """Each block's depth in [0, 1] for the ``lines`` space: its layer index (the integer after
    a container such as ``resblocks``, as in :func:`layer_of`) scaled so the first indexed layer
    is 0 and the last is 1. Blocks before the first indexed layer (stem, embeddings) take depth 0,
    blocks after one (final norm, projection, head) the depth of the layer before them. Without
    any indexed layer, the layers in order of first appearance are spread evenly."""
    index = []
    for b in blocks:
        parts = b.split(".")
        index.append(next((int(n) for c, n in zip(parts, parts[1:]) if c in _LAYER_CONTAINERS and n.isdigit()), None))
    known = [i for i in index if i is not None]
    if not known:
        groups = list(dict.fromkeys(layer_of(b) for b in blocks))
        index, known = [groups.index(layer_of(b)) for b in blocks], list(range(len(groups)))
    lo, hi, last, out = min(known), max(known), None, []
    for i in index:
        last = i if i is not None else (last if last is not None else lo)
        out.append(0.0 if hi == lo else (last - lo) / (hi - lo))
    return out


def matrices_only(spec: str) -> bool:
    """Whether a ``per_partition`` spec asks for the released code's variant (``:matrices``)."""
    m = _PARTITION.fullmatch(str(spec).strip())
    return bool(m and m.group(2))


def draw_partitions(shapes: Sequence[tuple], K: int, seed: int, matrices: bool = False) -> list[Tensor | None]:
    """The random partition assignment of aTLAS×K: per block, a tensor of its shape holding each
    element's partition in 0..K−1 (uint8 while K ≤ 256, one byte per parameter), drawn from a
    generator seeded with ``seed``, in block order.

    ``matrices=False`` (the default, and the paper's description): every block has its own draw,
    1-D blocks included. ``matrices=True`` reproduces what the paper's released code does
    (``WeightedImageEncoder`` with ``--partition K``): only 2-D weight matrices take part, all
    blocks of one shape share one draw, and every other block (biases, norms, the patch
    embedding's convolution) gets ``None``, i.e. keeps its pre-trained value."""
    gen = torch.Generator().manual_seed(int(seed))
    dtype = torch.uint8 if K <= 256 else torch.int32
    out: list[Tensor | None] = []
    drawn: dict[tuple, Tensor] = {}
    for shape in shapes:
        shape = tuple(shape)
        if matrices and len(shape) != 2:
            out.append(None)
        elif matrices and shape in drawn:
            out.append(drawn[shape])
        else:
            drawn[shape] = torch.randint(0, K, shape, generator=gen).to(dtype)
            out.append(drawn[shape])
    return out
