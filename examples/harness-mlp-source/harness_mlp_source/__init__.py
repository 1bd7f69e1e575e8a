"""A model source that trains its own tiny model: the example source plugin of the README.

``mlp-digits`` builds everything a composing task needs in a few seconds, offline, from nothing
but scikit-learn's bundled 8x8 digits (1797 images):

- four data sets, each another view of the digits, 10 classes each: ``digits`` (as is),
  ``inverted`` (255 - x), ``flipped`` (mirrored left-right) and ``transposed``. Every base image
  goes to exactly one place: the shared pre-training pool or one data set's train/val/test split,
  so no test image is a disguised copy of an image some model was trained on;
- a small MLP, the composed *tail*, briefly pre-trained on the pooled views of the pre-training
  images and then frozen: its parameters are θ0;
- per data set a frozen linear head fitted on a few shots of pre-trained features, and a task
  vector from :func:`harness.finetune.finetune`.

Install it (``pip install ./examples/harness-mlp-source``) and run any composing task with
``-t source=mlp-digits``; options go in ``-t source_options="ft_steps=50;seed=1"``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import HarnessError, Source
from harness.finetune import finetune
from harness.sources.base import (ModelSource, few_shot_indices, fit_linear_head, freeze, source_stats,
                                  tail_parameters)

# The data sets, in a fixed order: a data set's images and seeds are keyed by its position here,
# so building fewer of them leaves the others exactly as they are.
VIEWS = {
    "digits": lambda x: x,
    "inverted": lambda x: 255 - x,
    "flipped": lambda x: x[:, :, ::-1],
    "transposed": lambda x: x.transpose(0, 2, 1),
}
N_IMAGES = 1797  # load_digits() holds this many images
CLASSES = [str(i) for i in range(10)]
TRAIN_VAL = (0.5, 0.2)  # of each data set's images; the rest is its test split


@dataclass
class MLPDigitsOptions:
    """``datasets``: which of digits, inverted, flipped, transposed to build (always in that
    order; e.g. ``datasets=digits,flipped`` in ``source_options``); ``n_per_set``: base
    images per data set (split 50/20/30 into train/val/test); ``pretrain_n``: base images in the
    shared pre-training pool (each seen in every view); ``hidden``, ``width``: the MLP's layer
    sizes; ``pretrain_steps``, ``pretrain_lr``: Adam pre-training on the pool; ``head_shots``:
    training images per class the frozen heads are fitted on; ``ft_steps``, ``ft_lr``,
    ``batch_size``: fine-tuning per data set; ``seed``: everything random."""

    datasets: list[str] = field(default_factory=lambda: list(VIEWS))
    n_per_set: int = 350
    pretrain_n: int = 360
    hidden: int = 64
    width: int = 32
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    head_shots: int = 2
    ft_steps: int = 100
    ft_lr: float = 1e-2
    batch_size: int = 64
    seed: int = 0


class GrayFlatten(nn.Module):
    """The frozen prefix: (N, 3, 8, 8) preprocessed images → (N, 64) pixel vectors.

    :meth:`ModelSource.encode` always makes 3 identical channels of a grayscale image; one is
    kept, so the cached tail inputs are 3x smaller and the first layer 3x narrower.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0].flatten(1)


def mlp(options: MLPDigitsOptions) -> nn.Module:
    """The tail: Linear → GELU → Linear → GELU; each weight and bias is one composed block."""
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, options.hidden), act1=nn.GELU(),
        fc2=nn.Linear(options.hidden, options.width), act2=nn.GELU()))


def _seed(seed: int, stage: int, ds: str) -> int:
    """A seed per (stage, data set), keyed by the data set's fixed position in ``VIEWS``."""
    return int(np.random.SeedSequence([seed, stage, list(VIEWS).index(ds)]).generate_state(1)[0])


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (1797, 8, 8) in 0..255, and their int64 labels."""
    from sklearn.datasets import load_digits  # imported here: `harness list` should not pay for it
    d = load_digits()
    return np.rint(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def make_data(options: MLPDigitsOptions):
    """The pre-training pool and each data set's splits, as raw uint8 images and labels.

    Returns:
        ``(pool, splits)``: ``pool`` is ``(images, labels)`` of the pre-training images in every
        configured view; ``splits`` is ``{ds: {"train"|"val"|"test": (images, labels)}}``.
    """
    images, labels = digit_images()
    n, order = options.n_per_set, np.random.default_rng([options.seed, 0]).permutation(len(labels))
    pool = order[:options.pretrain_n]
    n_train, n_val = round(TRAIN_VAL[0] * n), round(TRAIN_VAL[1] * n)
    splits = {}
    for k, (ds, view) in enumerate(VIEWS.items()):
        if ds not in options.datasets:
            continue
        own = order[options.pretrain_n + k * n: options.pretrain_n + (k + 1) * n]
        own = own[np.random.default_rng([options.seed, 1, k]).permutation(n)]
        parts = {"train": own[:n_train], "val": own[n_train:n_train + n_val], "test": own[n_train + n_val:]}
        splits[ds] = {s: (np.ascontiguousarray(view(images[i])), labels[i]) for s, i in parts.items()}
    views = [VIEWS[ds] for ds in splits]
    pool_xy = (np.concatenate([np.ascontiguousarray(v(images[pool])) for v in views]),
               np.tile(labels[pool], len(views)))
    return pool_xy, splits


def pretrain(tail: nn.Module, x: Tensor, y: Tensor, options: MLPDigitsOptions) -> None:
    """Train ``tail`` in place with a throw-away 10-way head on the pooled views (Adam).

    One head for every view: the pre-trained features then know digits in general but none of
    the views especially well, which leaves fine-tuning (and composition) something to add.
    """
    if options.pretrain_steps == 0 or len(y) == 0:
        return
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG as it was
        torch.manual_seed(_seed(options.seed, 3, "digits"))
        head = nn.Linear(options.width, len(CLASSES))
    opt = torch.optim.Adam([*tail.parameters(), *head.parameters()], lr=options.pretrain_lr)
    gen = torch.Generator().manual_seed(_seed(options.seed, 4, "digits"))
    for _ in range(options.pretrain_steps):
        idx = torch.randint(0, len(y), (options.batch_size,), generator=gen)
        loss = F.cross_entropy(head(tail(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def build(options: MLPDigitsOptions, progress: bool = False) -> ModelSource:
    """Build the whole source on the CPU: data, pre-training, heads, fine-tunes, references.

    Deterministic for a given ``options``: every random choice draws from a generator seeded by
    ``options.seed``, and the build runs on one thread whatever the caller's setting.
    """
    threads = torch.get_num_threads()
    # One thread: on matrices this small a second one buys nothing, and on a shared 2-core machine
    # two threads contend with other jobs (a 0.6 s build once took 53 s beside another 2-thread
    # job). It also makes the task vectors independent of the caller's thread count.
    torch.set_num_threads(1)
    try:
        return _build(options, progress)
    finally:
        torch.set_num_threads(threads)


def _build(options: MLPDigitsOptions, progress: bool) -> ModelSource:
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(options.seed)
        tail = mlp(options)
    source = ModelSource(name="mlp-digits", kind="linear", tail=tail, base={}, heads={}, classes={},
                         inputs={}, labels={}, prefix=freeze(GrayFlatten()), image_size=8,
                         mean=(0.5,), std=(0.5,))
    pool, splits = make_data(options)
    pretrain(tail, source.encode(pool[0]), torch.as_tensor(pool[1]), options)
    source.tail = freeze(tail)
    source.base = tail_parameters(tail)
    for ds, data in splits.items():
        source.classes[ds] = list(CLASSES)
        source.add_data(ds, data)
        # Heads see only a few shots: heads fitted on all training images would leave the
        # pre-trained model close to the fine-tuned one, and composition nothing to win.
        x, y = source.inputs[ds]["train"], source.labels[ds]["train"]
        shots = few_shot_indices(y, options.head_shots, _seed(options.seed, 1, ds))
        with torch.no_grad():
            z = source.features(source.base, x[shots])
        source.heads[ds] = fit_linear_head(z, y[shots], len(CLASSES))
    for ds in source.datasets:
        source.task_vectors[ds] = finetune(source, ds, steps=options.ft_steps, batch_size=options.batch_size,
                                           lr=options.ft_lr, seed=_seed(options.seed, 2, ds))
    source.evaluate_references()
    source.meta.update(source_stats(source), config=dataclasses.asdict(options),
                       build_seconds=round(time.perf_counter() - t0, 2))
    if progress:
        zs, ft = source.meta["zero_shot_acc"], source.meta["finetuned_acc"]
        print(f"[mlp-digits] built in {source.meta['build_seconds']:.1f} s; test accuracy zero-shot/fine-tuned: "
              + ", ".join(f"{ds} {zs[ds]:.3f}/{ft[ds]:.3f}" for ds in source.datasets), file=sys.stderr, flush=True)
    return source


class MLPDigitsSource(Source):
    """A tiny MLP pre-trained and fine-tuned here, on four views of scikit-learn's digits."""

    name = "mlp-digits"
    description = ("tiny MLP on four views of sklearn digits, built in seconds "
                   "(example plugin from examples/harness-mlp-source)")
    Options = MLPDigitsOptions

    @classmethod
    def validate(cls, options):
        o = options
        unknown = [d for d in o.datasets if d not in VIEWS]
        if unknown:
            raise HarnessError(f"unknown data set '{unknown[0]}' for source mlp-digits; valid: {', '.join(VIEWS)}")
        if not o.datasets or len(set(o.datasets)) != len(o.datasets):
            raise HarnessError(f"source mlp-digits needs distinct data sets, got {o.datasets}")
        if o.n_per_set < 20 or o.pretrain_n < 0:
            raise HarnessError(f"source mlp-digits needs n_per_set >= 20 and pretrain_n >= 0, "
                               f"got {o.n_per_set} and {o.pretrain_n}")
        # Image slots are reserved for all four views whichever are built (see VIEWS).
        if o.pretrain_n + len(VIEWS) * o.n_per_set > N_IMAGES:
            raise HarnessError(f"source mlp-digits: pretrain_n + {len(VIEWS)} x n_per_set must be at most "
                               f"{N_IMAGES}, got {o.pretrain_n} + {len(VIEWS)} x {o.n_per_set}")
        if min(o.hidden, o.width, o.head_shots, o.ft_steps, o.batch_size) < 1 or o.pretrain_steps < 0:
            raise HarnessError("source mlp-digits needs hidden, width, head_shots, ft_steps, batch_size >= 1 "
                               "and pretrain_steps >= 0")
        if o.pretrain_lr <= 0 or o.ft_lr <= 0:
            raise HarnessError(f"source mlp-digits needs positive learning rates, got {o.pretrain_lr} and {o.ft_lr}")

    @classmethod
    def load(cls, options, *, cache_dir=None, progress=True) -> ModelSource:
        """Build the source (nothing is cached: it takes a few seconds); ``cache_dir`` is unused."""
        return build(options, progress=progress)
