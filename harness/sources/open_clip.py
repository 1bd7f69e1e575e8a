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

import torch
from torch import Tensor

from harness.api import HarnessError, Source
from harness.data import OFFLINE, load
from harness.sources.base import ModelSource, freeze, source_stats, tail_parameters
from harness.sources.clip import TEMPLATES, clip_preprocessing, zero_shot_heads

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

class _Reader:
    """Image files → :class:`harness.stream.FolderSplit` through the model's inference transform
    (``exact``: its uint8 half, so normalising on the device reproduces it), or, for a transform
    of another shape, a plain bilinear resize to the model's size."""

    def __init__(self, preprocess, size: int, workers: int):
        from harness.stream import SquashResize, uint8_transform
        split = uint8_transform(preprocess)
        self.exact = split is not None
        self.transform, self.mean, self.std = split if split else (SquashResize(size), None, None)
        self.size, self.workers = size, workers
        self.description = " ".join(repr(self.transform).split())

    def __call__(self, files):
        from harness.stream import FolderSplit
        return FolderSplit(files, self.transform, self.size, self.workers, self.description)


def _text_hash(model, tokenizer) -> str:
    """A content hash of everything the zero-shot heads depend on besides the prompts: the
    weights outside the image tower, and the tokenizer's kind and context length."""
    from harness.sources.base import content_hash
    text = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    return content_hash(text) + f"|{type(tokenizer).__name__}|{getattr(tokenizer, 'context_length', '')}"


def _heads(model, tokenizer, classes, templates, cache_dir, text_hash) -> tuple[tuple[Tensor, Tensor], bool]:
    """Zero-shot heads (:func:`harness.sources.clip.zero_shot_heads`), read from the reference
    cache when these weights, class names, templates and code made them before."""
    if cache_dir is None:
        return zero_shot_heads(model, tokenizer, classes, templates), False
    from harness import refcache
    material = {"text": text_hash, "classes": list(classes), "templates": list(templates),
                "code": refcache.code_version()}
    value, hit = refcache.cached(cache_dir, "heads", material,
                                 lambda: [t.tolist() for t in zero_shot_heads(model, tokenizer, classes, templates)])
    return (torch.tensor(value[0], dtype=torch.float32), torch.tensor(value[1], dtype=torch.float32)), hit


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


def check_file_options(options) -> None:
    """``options.data_root`` made absolute, or a one-line error if it is not a folder; the
    residency budget and loader workers checked."""
    if options.max_resident_mb < 0 or options.loader_workers < 0:
        raise HarnessError(f"source options max_resident_mb and loader_workers must be >= 0, got "
                           f"{options.max_resident_mb:g} and {options.loader_workers}")
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

def _split_data(ds: str, data_root: str | None, size: int, seed: int, max_n: int | None,
                read) -> tuple[list[str], dict[str, tuple]]:
    """A data set's class names and ``{split: (lazy split, labels)}``: an image folder's files
    through ``read`` (a :class:`harness.stream.FolderSplit` factory), or a built-in set's raw
    arrays. Nothing is decoded yet."""
    from harness.data import scan_image_folder
    from harness.stream import ArraySplit
    if ds in OFFLINE and not (data_root and os.path.isdir(os.path.join(data_root, ds))):
        data = load(ds, seed=seed, max_n=max_n)
        return list(data.classes), {s: (ArraySplit(x, size), y) for s, (x, y) in data.splits.items()}
    if data_root is None:
        raise HarnessError(f"data set '{ds}' is not built in ({', '.join(OFFLINE)}); "
                           "give data_root, a folder holding <data_root>/<ds>/<split>/<class>/*.png")
    if not os.path.isdir(os.path.join(data_root, ds)):
        raise HarnessError(f"data set '{ds}' not found: no folder {os.path.join(data_root, ds)} and it is not "
                           f"built in ({', '.join(OFFLINE)})")
    classes, listing = scan_image_folder(os.path.join(data_root, ds), max_n=max_n, seed=seed)
    missing = [s for s in ("val", "test") if s not in listing]
    if missing:
        raise HarnessError(f"image folder {os.path.join(data_root, ds)} has no "
                           f"{' or '.join(missing)} split folder; tasks need val and test")
    return classes, {s: (read(files), y) for s, (files, y) in listing.items()}


def plan_residency(data: dict[str, dict[str, tuple]], max_resident_mb: float) -> dict[str, dict[str, tuple]]:
    """Decide which splits are held in memory: every train and val split (the search reads them
    at random; they must fit in ``max_resident_mb`` together, else a one-line error), then each
    test split, in data-set order, while the total stays within the budget. A resident split is
    decoded now (an image folder's into uint8 images at the model's size, a built-in set's raw
    arrays as they are); the others stay lazy and are streamed when scored."""
    from harness.stream import FolderSplit
    budget = max_resident_mb * 2**20
    search = sum(len(x) * x.item_bytes for sp in data.values() for s, (x, _) in sp.items() if s != "test")
    if search > budget:
        raise HarnessError(f"the train and val splits need {search / 2**20:.0f} MB in memory, over "
                           f"max_resident_mb={max_resident_mb:g}; raise it, or lower max_n (images per split)")
    used, out = search, {}
    for ds, sp in data.items():
        out[ds] = {}
        for s, (x, y) in sp.items():
            if s == "test" and used + len(x) * x.item_bytes > budget:
                out[ds][s] = (x, y)
                continue
            used += len(x) * x.item_bytes if s == "test" else 0
            if isinstance(x, FolderSplit):
                images = torch.cat(list(x.batches(256, "cpu"))).permute(0, 2, 3, 1).numpy()
            else:
                images = x.hwc()
            out[ds][s] = (images, y)
    return out


def from_checkpoints(model_name: str, pretrained: str | None, checkpoints: Sequence[str] | None,
                     datasets: Sequence[str], data_root: str | None = None, *,
                     templates: Sequence[str] = TEMPLATES, seed: int = 0,
                     max_n: int | None = 4000, reference_cache: str | None = None,
                     compact: bool = True, max_resident_mb: float = 2048,
                     loader_workers: int = 2) -> ModelSource:
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
        max_resident_mb: memory for resident inputs (uint8 at the model's size): train and val
            must fit; a test split that does not is streamed from disk (:func:`plan_residency`).
        loader_workers: DataLoader worker processes that decode a streamed image folder.

    Image folders are read through the model's own inference transform (open_clip's resize,
    centre crop and normalisation, bit for bit; :func:`harness.stream.uint8_transform`).
    """
    from harness.checkpoints import build_clip, clip_task_vectors

    checkpoints = list(checkpoints or [])
    datasets = list(datasets)
    if checkpoints and len(checkpoints) != len(datasets):
        raise HarnessError(f"{len(checkpoints)} checkpoints for {len(datasets)} data sets; "
                           "give one fine-tuned checkpoint per data set, in the same order")
    t0 = time.perf_counter()
    model, preprocess, tokenizer = build_clip(model_name, pretrained)
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
    read = _Reader(preprocess, size, loader_workers)
    if read.exact:
        mean, std = read.mean, read.std
    source = ModelSource(name=model_name, kind="clip", tail=tail, base=base, heads={}, classes={},
                         inputs={}, labels={}, task_vectors=task_vectors, normalize=True,
                         image_size=size, mean=mean, std=std, compact=compact)
    data, hits = {}, []
    text = _text_hash(model, tokenizer) if reference_cache is not None else None
    for ds in datasets:
        source.classes[ds], data[ds] = _split_data(ds, data_root, size, seed, max_n, read)
        source.heads[ds], hit = _heads(model, tokenizer, source.classes[ds], templates, reference_cache, text)
        hits.append(hit)
    source.meta["heads_cached"] = all(hits)
    for ds, splits in plan_residency(data, max_resident_mb).items():
        source.add_data(ds, splits)
    source.evaluate_references(reference_cache)
    source.meta.update(source_stats(source), max_resident_mb=max_resident_mb, image_transform=read.description,
                       model=model_name, pretrained=pretrained,
                       checkpoints=checkpoints, templates=list(templates),
                       build_seconds=round(time.perf_counter() - t0, 2))
    return source


@dataclass
class FileOptions:
    """Options of a source that loads a user's files: ``pretrained`` (the pre-trained weights),
    ``checkpoints`` (one fine-tuned checkpoint per data set as ``NAME=PATH``, or a path whose file
    stem is the data set name, or a folder of such files), ``data_root`` (image folders
    ``<data_root>/<NAME>/<split>/<class>/*.png`` for data sets that are not built in) and ``max_n``
    (images per built-in data set, or per split of an image folder), ``max_resident_mb`` (memory
    for resident inputs: train and val must fit, a test split that does not is streamed from disk)
    and ``loader_workers`` (processes that decode a streamed image folder)."""

    pretrained: str = ""
    checkpoints: list[str] = field(default_factory=list)
    data_root: str = ""
    max_n: int = 4000
    max_resident_mb: float = 2048
    loader_workers: int = 2


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
        check_file_options(options)

    @classmethod
    def load(cls, options, *, cache_dir=None, progress=True) -> ModelSource:
        from harness.sources.cache import cache_root
        pairs = checkpoint_list(options.checkpoints)
        return from_checkpoints(options.model, options.pretrained or None, [p for _, p in pairs],
                                [n for n, _ in pairs], data_root=options.data_root or None,
                                max_n=options.max_n, reference_cache=str(cache_root(cache_dir)),
                                max_resident_mb=options.max_resident_mb, loader_workers=options.loader_workers)
