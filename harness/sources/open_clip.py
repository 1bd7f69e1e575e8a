"""Your own open_clip model: a pre-trained checkpoint, one fine-tuned checkpoint per data set, and
image folders (or the built-in data sets), read without running code from any file.

Example:
    >>> source = from_checkpoints("ViT-B-32", "base.pt", ["ft_a.pt", "ft_b.pt"], ["a", "b"], "data/")
    >>> comp = Composition(source.base, [source.task_vectors[d] for d in source.datasets], source.datasets)
    >>> source.accuracy(comp.merge(comp.isotropic(0.3)), "a", "val")
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from harness.api import HarnessError, Source
from harness.data import OFFLINE, load, load_image_folder
from harness.sources.base import ModelSource, freeze, source_stats, tail_parameters
from harness.sources.clip import TEMPLATES, clip_preprocessing, zero_shot_heads

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

def checkpoint_list(entries: list[str], folders: bool = False) -> list[tuple[str, str]]:
    """``["mnist=ft/mnist.pt", "ft/cars.safetensors", "ft/"]`` → ``[(data set, absolute path)]``.

    A bare path names its data set by its file stem; a folder contributes every checkpoint file in
    it, or, with ``folders`` (Hugging Face model folders), is one checkpoint itself. A path that
    does not exist, or a data set named twice, is an error.
    """
    out: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = "", entry
        path = os.path.abspath(os.path.expanduser(path.strip()))
        if folders and os.path.isdir(path):
            out.append((name.strip() or os.path.basename(path.rstrip(os.sep)), path))
            continue
        if os.path.isdir(path) and not name:
            files = sorted(f for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
            if not files:
                raise HarnessError(f"checkpoint folder {path} holds no {'/'.join(CHECKPOINT_SUFFIXES)} files")
            out += [(os.path.splitext(f)[0], os.path.join(path, f)) for f in files]
            continue
        if not os.path.isfile(path):
            raise HarnessError(f"checkpoint not found: {path} (task option checkpoints)")
        out.append((name.strip() or os.path.splitext(os.path.basename(path))[0], path))
    seen: set[str] = set()
    for name, path in out:
        if name in seen:
            raise HarnessError(f"data set '{name}' has two checkpoints (task option checkpoints); "
                               "name each as NAME=PATH")
        seen.add(name)
    return out


def check_data_root(options) -> None:
    """``options.data_root`` made absolute, or a one-line error if it is not a folder."""
    if options.data_root:
        if not os.path.isdir(options.data_root):
            raise HarnessError(f"data root not found: {options.data_root} (a folder holding "
                               "<data_root>/<data set>/<split>/<class>/*.png)")
        options.data_root = os.path.abspath(options.data_root)


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
    data = load_image_folder(os.path.join(data_root, ds), name=ds, size=image_size, max_n=max_n, seed=seed)
    missing = [s for s in ("val", "test") if s not in data.splits]
    if missing:
        raise HarnessError(f"image folder {os.path.join(data_root, ds)} has no "
                           f"{' or '.join(missing)} split folder; tasks need val and test")
    return data

def from_checkpoints(model_name: str, pretrained: str | None, checkpoints: Sequence[str] | None,
                     datasets: Sequence[str], data_root: str | None = None, *,
                     templates: Sequence[str] = TEMPLATES, seed: int = 0,
                     max_n: int | None = 4000, reference_cache: str | None = None,
                     compact: bool = True) -> ModelSource:
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
        seed, max_n: subset and split of the built-in data sets (and the cap of an image folder).
        reference_cache: a cache root: zero-shot and fine-tuned accuracies computed before from
            the same weights, data and code are read from there (:mod:`harness.refcache`).
        compact: hold inputs as uint8 images (0.15 MB per 224-px image instead of 0.6 MB in fp32),
            normalised chunk by chunk on the device.
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
                         image_size=size, mean=mean, std=std, compact=compact)
    for ds in datasets:
        data = _load_split_data(ds, data_root, size, seed, max_n)
        source.classes[ds] = list(data.classes)
        source.heads[ds] = zero_shot_heads(model, tokenizer, data.classes, templates)
        source.add_data(ds, data.splits)
    source.evaluate_references(reference_cache)
    source.meta.update(source_stats(source), model=model_name, pretrained=pretrained,
                       checkpoints=checkpoints, templates=list(templates),
                       build_seconds=round(time.perf_counter() - t0, 2))
    return source


@dataclass
class FileOptions:
    """Options of a source that loads a user's files: ``pretrained`` (the pre-trained weights),
    ``checkpoints`` (one fine-tuned checkpoint per data set as ``NAME=PATH``, or a path whose file
    stem is the data set name, or a folder of such files), ``data_root`` (image folders
    ``<data_root>/<NAME>/<split>/<class>/*.png`` for data sets that are not built in) and ``max_n``
    (images per built-in data set)."""

    pretrained: str = ""
    checkpoints: list[str] = field(default_factory=list)
    data_root: str = ""
    max_n: int = 4000


@dataclass
class OpenClipOptions(FileOptions):
    """``model``: the open_clip architecture; ``pretrained``: a local file, ``local-dir:DIR``, or
    empty for random init (see :class:`FileOptions` for the rest)."""

    model: str = ""


class OpenClipSource(Source):
    """A user's open_clip model and fine-tuned checkpoints (zero-shot heads from its text tower)."""

    name = "open_clip"
    description = "your open_clip model: -t model=ARCH -t pretrained=FILE -t checkpoints=NAME=PATH,... [--data-root]"
    Options = OpenClipOptions

    @classmethod
    def validate(cls, options):
        if not options.checkpoints:
            raise HarnessError("source open_clip needs checkpoints (one fine-tuned checkpoint per data set, "
                               "-t checkpoints=NAME=PATH,NAME=PATH)")
        if not options.model and not options.pretrained.startswith("local-dir:"):
            raise HarnessError("task option checkpoints needs model (an open_clip architecture, e.g. "
                               "-t model=ViT-B-32) or pretrained=local-dir:DIR")
        options.checkpoints = [f"{n}={p}" for n, p in checkpoint_list(options.checkpoints)]
        check_data_root(options)

    @classmethod
    def load(cls, options, *, cache_dir=None, progress=True) -> ModelSource:
        from harness.sources.cache import cache_root
        pairs = checkpoint_list(options.checkpoints)
        return from_checkpoints(options.model, options.pretrained or None, [p for _, p in pairs],
                                [n for n, _ in pairs], data_root=options.data_root or None,
                                max_n=options.max_n, reference_cache=str(cache_root(cache_dir)))
