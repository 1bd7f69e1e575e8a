"""Random views of raw uint8 images, for tasks that learn from augmented inputs (few-shot
augmentation, test-time adaptation's weak and strong views)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from harness.api import HarnessError


def _shift(img: np.ndarray, rng: np.random.Generator, max_px: int) -> np.ndarray:
    """Translate by up to ``max_px`` pixels each way, filling with the border (edge) pixels."""
    if max_px <= 0:
        return img
    h, w = img.shape[:2]
    pad = [(max_px, max_px), (max_px, max_px)] + [(0, 0)] * (img.ndim - 2)
    big = np.pad(img, pad, mode="edge")
    dy, dx = rng.integers(0, 2 * max_px + 1, size=2)
    return big[dy:dy + h, dx:dx + w]


def _resized_crop(img: np.ndarray, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop on one uint8 image, resized back to its own size."""
    h, w = img.shape[:2]
    area = rng.uniform(*scale) * h * w
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch = int(np.clip(round(math.sqrt(area / r)), 1, h))
    cw = int(np.clip(round(math.sqrt(area * r)), 1, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    patch = torch.from_numpy(np.ascontiguousarray(img[top:top + ch, left:left + cw])).float()
    patch = patch[None, None] if patch.dim() == 2 else patch.permute(2, 0, 1)[None]
    out = F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0]
    out = out[0] if img.ndim == 2 else out.permute(1, 2, 0)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def augment(images: np.ndarray, rng: np.random.Generator, strength: str = "weak", flip: bool = True) -> np.ndarray:
    """Random views of raw uint8 images, (N,H,W) grayscale or (N,H,W,3) RGB, same shape out.

    ``weak`` (FixMatch's weak view): a horizontal flip with probability ½ and a shift of up to
    ⅛ of the image side. ``strong``: a random resized crop of 50–100% of the area and aspect
    ratio ¾–4⁄3, and the flip (the paper's UFM view: TIP's crop with a flip). Deterministic for
    a given generator state.

    Args:
        images: raw images as stored in ``ModelSource.images``.
        rng: a seeded numpy generator (advanced by the call).
        strength: ``"weak"`` or ``"strong"``.
        flip: allow horizontal flips (turn off for data where mirroring changes the class).
    """
    if strength not in ("weak", "strong"):
        raise HarnessError(f"augmentation strength must be 'weak' or 'strong', got {strength!r}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise HarnessError(f"augment wants uint8 images (N,H,W) or (N,H,W,3), got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    max_px = max(1, round(min(images.shape[1:3]) / 8))
    for i, img in enumerate(images):
        if strength == "weak":
            img = _shift(img, rng, max_px)
        else:
            img = _resized_crop(img, rng)
        if flip and rng.random() < 0.5:
            img = img[:, ::-1]
        out[i] = img
    return out


# --------------------------------------------------------------------------- UFM pieces
