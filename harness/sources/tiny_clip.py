"""A tiny open_clip ViT, pre-trained from scratch for a few steps on the offline data sets, with
zero-shot heads from its text tower, cached as a zoo.

It is not weight-disentangled, so composition barely helps; it exists to exercise the CLIP code
path quickly (tests build it in seconds).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.api import option
from harness.data import OFFLINE
from harness.finetune import one_cycle
from harness.sources.base import ModelSource, freeze, tail_parameters
from harness.sources.building import (Stages, add_data, atomic_write, finetune_all, load_data, progress_bar,
                                      stage_seed)
from harness.sources.cache import ZooSource, cache_root
from harness.sources.clip import clip_preprocessing, zero_shot_heads


@dataclass(frozen=True)
class TinyClipConfig:
    """A tiny open_clip ViT, briefly pre-trained CLIP-style on the data sets' pretrain splits.

    Captions are class names in ``templates``; the same templates make the zero-shot heads.
    The architecture fields become an open_clip model config registered with
    ``open_clip.add_model_config`` under the name ``atlas-tiny-clip-<hash>``.

    Pre-training on class-name captions is close to supervised training, so zero-shot heads get
    strong quickly: a short pre-training (150 steps) with fine-tuning at lr 1e-3 leaves the most
    room between zero-shot and fine-tuned accuracy for composition, and builds fastest.
    """

    datasets: tuple[str, ...] = option(OFFLINE, "offline data sets of the zoo (one that is not installed is "
                                                "skipped with a warning)", choices=OFFLINE)
    seed: int = option(0, "seed of the data splits, the initialisation, the pre-training and the fine-tuning")
    max_n: int = option(2000, "samples kept per data set, before it is split", ge=1)
    fractions: tuple[float, ...] = option((0.3, 0.3, 0.15, 0.25), "shares of the pretrain, train, val and test "
                                                                  "splits (positive, summing to 1)", gt=0)
    embed_dim: int = option(64, "dimension of the shared image-text embedding")
    image_size: int = option(32, "input image side, in pixels")
    patch_size: int = option(8, "ViT patch side, in pixels")
    vision_width: int = option(64, "width of the image tower")
    vision_layers: int = option(2, "transformer layers of the image tower")
    vision_head_width: int = option(16, "width of each attention head of the image tower")
    context_length: int = option(16, "tokens per caption")
    text_width: int = option(64, "width of the text tower")
    text_heads: int = option(4, "attention heads of the text tower")
    text_layers: int = option(2, "transformer layers of the text tower")
    templates: tuple[str, ...] = option(("a photo of a {}.", "a drawing of a {}.", "a picture of the {}.",
                                         "a close-up photo of a {}.", "a black and white photo of a {}."),
                                        "caption templates ({} is the class name) for pre-training and the "
                                        "zero-shot heads")
    pretrain_steps: int = option(150, "CLIP-style pre-training steps (0: the randomly initialised model)")
    pretrain_batch_size: int = option(256, "images per pre-training step")
    pretrain_lr: float = option(2e-3, "peak learning rate of the pre-training (AdamW, one-cycle)")
    pretrain_weight_decay: float = option(0.1, "AdamW weight decay of the pre-training (matrices only)")
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

def register_tiny_clip(cfg: TinyClipConfig | None = None, cache_dir: str | None = None) -> str:
    """Register ``cfg``'s architecture with ``open_clip.add_model_config`` and return its name.

    The JSON config is written under ``<cache>/open_clip/``; the name carries a hash of the
    architecture, so different configs never collide. Afterwards ``open_clip.create_model(name)``
    and :func:`harness.sources.open_clip.from_checkpoints` accept the name.
    """
    import open_clip
    cfg = cfg or TinyClipConfig()
    arch = {"embed_dim": cfg.embed_dim,
            "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.vision_layers,
                           "width": cfg.vision_width, "patch_size": cfg.patch_size,
                           "head_width": cfg.vision_head_width},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408,
                         "width": cfg.text_width, "heads": cfg.text_heads, "layers": cfg.text_layers}}
    name = "atlas-tiny-clip-" + hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]
    if name not in open_clip.list_models():
        path = cache_root(cache_dir) / "open_clip" / f"{name}.json"
        atomic_write(path, lambda p: p.write_text(json.dumps(arch, indent=1)))
        open_clip.add_model_config(path)
    return name

def _tiny_clip_model(cfg: TinyClipConfig, root: Path):
    """A tiny CLIP initialised from ``cfg.seed``, and its tokenizer."""
    import open_clip
    name = register_tiny_clip(cfg, str(root))
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # "no pretrained weights loaded" is the point here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(name, pretrained=None)
    finally:
        root_logger.setLevel(level)
    return model, open_clip.get_tokenizer(name)

def _pretrain_clip(model, tokenizer, cfg: TinyClipConfig, data: dict, source: ModelSource,
                   progress: bool) -> list[float]:
    """Short CLIP-style contrastive pre-training on the pretrain splits.

    Captions are class names, so a batch holds many images per caption; the image→text loss is
    a cross-entropy over all distinct captions and the text→image loss spreads each caption's
    target over its images (multi-positive), instead of treating same-class pairs as negatives.
    Each step draws one random template per caption.
    """
    captions = list(dict.fromkeys(c for d in data.values() for c in d.classes))
    images, labels = [], []
    for d in data.values():
        x, y = d.splits["pretrain"]
        images.append(source.encode(x))
        labels.append(torch.tensor([captions.index(d.classes[i]) for i in y.tolist()]))
    images, labels = torch.cat(images), torch.cat(labels)
    tokens = torch.stack([tokenizer([t.format(c) for c in captions]) for t in cfg.templates])  # (T, U, L)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.pretrain_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.pretrain_lr)
    sched = one_cycle(opt, cfg.pretrain_steps)
    gen = torch.Generator().manual_seed(stage_seed(cfg.seed, 0, next(iter(data))))
    losses = []
    with progress_bar(cfg.pretrain_steps, "tiny-clip: pre-training", progress) as bar:
        for _ in range(cfg.pretrain_steps):
            idx = torch.randint(0, len(labels), (cfg.pretrain_batch_size,), generator=gen)
            which = torch.randint(0, len(cfg.templates), (len(captions),), generator=gen)
            img = F.normalize(model.encode_image(images[idx]), dim=-1)
            txt = F.normalize(model.encode_text(tokens[which, torch.arange(len(captions))]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T  # (B, U)
            y = labels[idx]
            present = torch.unique(y)
            target = (y[None, :] == present[:, None]).float()
            target = target / target.sum(1, keepdim=True)
            t2i = -(target * F.log_softmax(logits.T[present], dim=1)).sum(1).mean()
            loss = (F.cross_entropy(logits, y) + t2i) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    freeze(model)
    return losses

def _tiny_clip_source(cfg: TinyClipConfig, model) -> ModelSource:
    tail = freeze(model.visual)
    size, mean, std = clip_preprocessing(model)
    return ModelSource(name="tiny-clip", kind="clip", tail=tail, base=tail_parameters(tail), heads={},
                       classes={}, inputs={}, labels={}, normalize=True, image_size=size, mean=mean,
                       std=std)

def _build_tiny_clip(cfg: TinyClipConfig, datasets: list[str], stages: Stages, progress: bool,
                     root: Path) -> ModelSource:
    with stages("build model"):
        model, tokenizer = _tiny_clip_model(cfg, root)
        source = _tiny_clip_source(cfg, model)
    with stages("load data"):
        data = load_data(cfg, datasets)
    with stages("pre-train"):
        losses = _pretrain_clip(model, tokenizer, cfg, data, source, progress)
    source.base = tail_parameters(model.visual)  # θ_0 is the pre-trained tower
    if losses:  # pretrain_steps=0 gives the randomly initialised model
        source.meta["pretrain_loss"] = {"first": round(losses[0], 4), "last": round(losses[-1], 4)}
    add_data(source, data, stages, progress, "preprocess")
    with stages("zero-shot heads"):
        for ds in datasets:
            source.heads[ds] = zero_shot_heads(model, tokenizer, source.classes[ds], cfg.templates)
        source.meta["logit_scale"] = float(model.logit_scale.exp())
    finetune_all(source, cfg, stages, progress)
    return source


class TinyClipSource(ZooSource):
    """A tiny open_clip ViT pre-trained from scratch; zero-shot heads (the CLIP code path)."""

    name = "tiny-clip"
    description = "tiny open_clip ViT pre-trained from scratch, zero-shot heads (exercises the CLIP path)"
    Options = TinyClipConfig
    packages = ("open_clip_torch",)

    @classmethod
    def empty(cls, cfg, root):
        model, _ = _tiny_clip_model(cfg, root)
        return _tiny_clip_source(cfg, model)

    @classmethod
    def build(cls, cfg, datasets, stages, progress, root):
        return _build_tiny_clip(cfg, datasets, stages, progress, root)
