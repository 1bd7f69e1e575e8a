"""CLIP pieces every CLIP-kind source shares: zero-shot heads from the text tower and the image
tower's preprocessing."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A few CLIP prompt templates (a subset of the ImageNet ensemble of Radford et al.).
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
             "a close-up photo of a {}.", "a drawing of a {}.")


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


def vit_stages(visual: nn.Module) -> list | None:
    """The stages of an open_clip ``VisionTransformer`` (see :mod:`harness.engines.prefix`): the
    patch and position embeddings with the first LayerNorm, each residual block, then pooling and
    projection; ``(parameter name prefixes, step)`` each. None for any other image tower, or one
    whose pieces this does not know (the engine then checks nothing and runs the full forward)."""
    from open_clip.transformer import VisionTransformer
    t = visual
    blocks = getattr(getattr(t, "transformer", None), "resblocks", None)
    if (not isinstance(t, VisionTransformer) or blocks is None or not hasattr(t, "_embeds") or not hasattr(t, "_pool")
            or getattr(t, "output_tokens", False) or t.transformer.grad_checkpointing):
        return None
    first = getattr(t.transformer, "batch_first", True)

    def embed(x):  # the transformer's own layout change, done once before the blocks
        x = t._embeds(x)
        return x if first else x.transpose(0, 1).contiguous()

    def pool(x):
        pooled, _ = t._pool(x if first else x.transpose(0, 1))
        return pooled @ t.proj if t.proj is not None else pooled
    head = ["conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout"]
    rest = [n for n, _ in t.named_children() if n not in head and n != "transformer"] + ["proj"]
    return ([(head, embed)] + [([f"transformer.resblocks.{i}"], lambda x, r=r: r(x, attn_mask=None))
                               for i, r in enumerate(blocks)] + [(rest, pool)])
