"""Pieces several transforms share: stacking a block across task vectors, magnitude thresholds,
per-task generator seeds, and the SVD helpers of the spectral methods."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from harness.api import HarnessError, option


def stack(tvs: list[dict[str, Tensor]], key: str) -> Tensor:
    return torch.stack([tv[key].detach().float() for tv in tvs])


def trim_threshold(tensors: list[Tensor], k: float) -> Tensor:
    """The magnitude at or above which an entry is among the largest fraction ``k`` of the entries
    of ``tensors`` taken together: the (d − ⌊k·d⌋)-th smallest of the d magnitudes, so entries
    tied with it are all kept; 0 (keep everything) when that rank is 0."""
    mags = torch.cat([t.detach().reshape(-1).float().abs() for t in tensors])
    drop = mags.numel() - int(mags.numel() * k)
    return torch.kthvalue(mags, drop).values if drop > 0 else torch.tensor(0.0)



def task_seed(seed: int, i: int) -> int:
    """A generator seed for task vector ``i`` of a run with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, 0xDA4E, i]).generate_state(1)[0])


def other_option():
    """The ``other`` option of the spectral merges: how blocks that are not matrices combine."""
    return option("mean", "how blocks that are not matrices combine: mean (the paper) or sum", choices=("mean", "sum"))


def conv_option(verb: str):
    """The ``conv`` option of the spectral merges: whether kernels are ``verb`` as matrices."""
    return option("matrix", f"weights of more than 2 dimensions: {verb} as (out, rest) matrices, or combined like "
                            "the other blocks (FusionBench)", choices=("matrix", "other"))


def combine(t: Tensor, other: str) -> Tensor:
    """A block that is not a matrix, stacked over the T task vectors, merged by its ``other`` rule:
    the mean (``mean``) or the sum (``sum``)."""
    return t.sum(0) / len(t) if other == "mean" else t.sum(0)


def is_matrix(t: Tensor, conv: str = "matrix") -> bool:
    """Whether a block is treated as a matrix by the spectral methods: 2-D weights, and weights of
    more dimensions (convolution kernels, flattened to (out, rest)) when ``conv`` is ``matrix``."""
    return t.dim() == 2 or (t.dim() > 2 and conv == "matrix")


def as_matrix(t: Tensor) -> Tensor:
    """``t`` as the matrix (shape[0], rest) the spectral methods decompose."""
    return t.reshape(t.shape[0], -1)


def svd(x: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``(U, S, Vh)`` of the 2-D ``x``; a non-finite input, an SVD that does not
    converge and a non-finite result are one-line errors naming the transform ``method``."""
    if not torch.isfinite(x).all():
        raise HarnessError(f"transform {method}: a task vector of shape {tuple(x.shape)} holds non-finite "
                           "values (task vectors too large to add up); check the checkpoints")
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    except RuntimeError as e:  # torch.linalg.LinAlgError: the SVD did not converge
        raise HarnessError(f"transform {method}: the SVD of a task vector of shape {tuple(x.shape)} failed "
                           f"({str(e).splitlines()[0]}); check the checkpoints for extreme values") from None
    if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
        raise HarnessError(f"transform {method}: the SVD of a task vector of shape {tuple(x.shape)} is not finite "
                           "(singular values too large); check the checkpoints for extreme values")
    return u, s, vh


def orthogonal_factor(m: Tensor, method: str) -> Tensor:
    """The orthogonal matrix nearest ``m`` (the polar factor U·Vh of its SVD): the columns of ``m``
    made orthonormal while moving them as little as possible (TSV-M, Iso-CTS)."""
    u, _, vh = svd(m, method)
    return u @ vh


def finite(out: Tensor, method: str) -> Tensor:
    """``out`` unchanged, or a one-line error when the method produced a non-finite value."""
    if not torch.isfinite(out).all():
        raise HarnessError(f"transform {method}: a transformed task vector of shape {tuple(out.shape)} is not "
                           "finite (values too large); check the checkpoints for extreme values")
    return out


def flat_spectrum(m: Tensor, method: str = "iso") -> Tensor:
    """``m`` (2-D, or reshaped to (shape[0], -1)) with every singular value set to their mean."""
    u, s, vh = svd(as_matrix(m), method)
    return finite((s.mean() * (u @ vh)).reshape(m.shape), method)
