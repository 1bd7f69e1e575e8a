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
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

import harness.sources.task_check as task_check
from harness.api import HarnessError, Source, option
from harness.data import OFFLINE, load
from harness.data.benchmark import CONVENTIONS, VAL_RULES
from harness.data.prompts import VARIANTS
from harness.sources.base import ModelSource, freeze, source_stats, tail_parameters
from harness.sources.checkpoint_files import checkpoint_list, suite_checkpoints
from harness.sources.clip import TEMPLATES, clip_preprocessing, zero_shot_heads
from harness.sources.linear import tangent_checkpoint


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

    def samples(self, samples):
        """A benchmark split (:mod:`harness.data.samples`) read through the same transform."""
        from harness.stream import SampleSplit
        return SampleSplit(samples, self.transform, self.size, self.workers, self.description)


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
    import harness.refcache as refcache
    material = {"text": text_hash, "classes": list(classes), "templates": list(templates),
                "code": refcache.code_version()}
    value, hit = refcache.cached(cache_dir, "heads", material,
                                 lambda: [t.tolist() for t in zero_shot_heads(model, tokenizer, classes, templates)])
    return (torch.tensor(value[0], dtype=torch.float32), torch.tensor(value[1], dtype=torch.float32)), hit


def check_file_options(options) -> None:
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

def _split_data(ds: str, data_root: str | None, size: int, seed: int, max_n: int | None,
                read, bench: "BenchOptions | None" = None) -> tuple[list[str], dict[str, tuple], dict | None]:
    """A data set's class names, ``{split: (lazy split, labels)}`` and, for a benchmark data set,
    what to record about it (else None): a benchmark data set found under ``data_root`` in
    either convention (:mod:`harness.data.benchmark`), an image folder's files through ``read``
    (a :class:`harness.stream.FolderSplit` factory), or a built-in set's raw arrays. Nothing is
    decoded yet."""
    from harness.data import scan_image_folder
    from harness.stream import ArraySplit
    bench = bench or BenchOptions()
    if data_root and bench.data_convention != "folders":
        from harness.data import benchmark
        if benchmark.find(ds, data_root, bench.data_convention) is not None:
            return _benchmark_data(ds, data_root, read, bench, seed)
    if bench.data_convention in ("tv", "hf") and data_root:
        raise HarnessError(f"data set '{ds}' not found under {data_root} in the {bench.data_convention} "
                           f"convention (run `python -m harness data check --data-root {data_root} --datasets {ds}`)")
    if ds in OFFLINE and not (data_root and os.path.isdir(os.path.join(data_root, ds))):
        data = load(ds, seed=seed, max_n=max_n)
        return list(data.classes), {s: (ArraySplit(x, size), y) for s, (x, y) in data.splits.items()}, None
    if data_root is None:
        raise HarnessError(f"data set '{ds}' is not built in ({', '.join(OFFLINE)}); "
                           "give data_root, a folder holding <data_root>/<ds>/<split>/<class>/*.png")
    if not os.path.isdir(os.path.join(data_root, ds)):
        raise HarnessError(f"data set '{ds}' not found: no folder {os.path.join(data_root, ds)} and it is not "
                           f"built in ({', '.join(OFFLINE)}) or a benchmark data set in a known layout")
    classes, listing = scan_image_folder(os.path.join(data_root, ds), max_n=max_n, seed=seed)
    missing = [s for s in ("val", "test") if s not in listing]
    if missing:
        raise HarnessError(f"image folder {os.path.join(data_root, ds)} has no "
                           f"{' or '.join(missing)} split folder; tasks need val and test")
    return classes, {s: (read(files), y) for s, (files, y) in listing.items()}, None


def _benchmark_data(ds: str, data_root: str, read, bench: "BenchOptions", seed: int):
    """A benchmark data set's splits as :class:`harness.stream.SampleSplit` (a seeded subset of
    at most ``bench.bench_subset`` val and test images when set) and its record entry."""
    import numpy as np
    from harness.data import benchmark
    d = benchmark.load(ds, data_root, convention=bench.data_convention, val_rule=bench.val_rule,
                       prompts=bench.prompts)
    splits = dict(d.splits)
    if bench.bench_subset:
        for k, split in enumerate(("val", "test")):
            n = len(splits[split])
            if n > bench.bench_subset:
                keep = np.sort(np.random.default_rng([seed, k]).permutation(n)[:bench.bench_subset])
                splits[split] = splits[split].subset(keep)
    info = {**d.info, "name": d.spec.name, "val_rule": d.val_rule, "prompt_lists": d.prompts,
            "fingerprint": d.fingerprint(), "templates": d.templates,
            "subset": bench.bench_subset or None, "scored_sizes": {k: len(v) for k, v in splits.items()}}
    # Val first, then test, then train: the order residency is granted in (plan_residency).
    return d.classes, {s: (read.samples(splits[s]), splits[s].labels) for s in ("val", "test", "train")}, info


def plan_residency(data: dict[str, dict[str, tuple]], max_resident_mb: float,
                   streamable: frozenset[str] | set[str] = frozenset()) -> dict[str, dict[str, tuple]]:
    """Decide which splits are held in memory: every train and val split (the search reads them
    at random; they must fit in ``max_resident_mb`` together, else a one-line error), then each
    test split, in data-set order, while the total stays within the budget. Data sets in
    ``streamable`` (benchmark data sets, whose train splits alone can be gigabytes) have no split
    that must be resident: theirs are held in the order given while the budget lasts and streamed
    otherwise (a search subset drawn from a streamed split is decoded once, when the task builds
    it). A resident split is decoded now (an image folder's into uint8 images at the model's size,
    a built-in set's raw arrays as they are); the others stay lazy and are streamed when scored."""
    import numpy as np
    from harness.stream import ArraySplit
    budget = max_resident_mb * 2**20
    search = sum(len(x) * x.item_bytes for ds, sp in data.items() if ds not in streamable
                 for s, (x, _) in sp.items() if s != "test")
    if search > budget:
        raise HarnessError(f"the train and val splits need {search / 2**20:.0f} MB in memory, over "
                           f"max_resident_mb={max_resident_mb:g}; raise it, or lower max_n (images per split)")
    used, out = search, {}
    for ds, sp in data.items():
        out[ds] = {}
        for s, (x, y) in sp.items():
            optional = s == "test" or ds in streamable
            if optional and used + len(x) * x.item_bytes > budget:
                out[ds][s] = (x, y)
                continue
            used += len(x) * x.item_bytes if optional else 0
            if isinstance(x, ArraySplit):
                images = x.hwc()
            elif len(x) == 0:
                images = np.zeros((0, x.size, x.size, 3), np.uint8)
            else:
                images = torch.cat(list(x.batches(256, "cpu"))).permute(0, 2, 3, 1).numpy()
            out[ds][s] = (images, y)
    return out


def from_checkpoints(model_name: str, pretrained: str | None, checkpoints: Sequence[str] | None,
                     datasets: Sequence[str], data_root: str | None = None, *,
                     templates: Sequence[str] = TEMPLATES, seed: int = 0,
                     max_n: int | None = 4000, reference_cache: str | None = None,
                     compact: bool = True, max_resident_mb: float = 2048,
                     loader_workers: int = 2, bench: "BenchOptions | None" = None,
                     extra_datasets: Sequence[str] = ()) -> ModelSource:
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
        extra_datasets: data sets loaded without a checkpoint (heads and splits, no task
            vector), after ``datasets``: e.g. negation's control data set.
        bench: how benchmark data sets under ``data_root`` are read (convention, validation
            rule, prompt lists, subset); their own class names and templates replace
            ``templates``, and what was read is recorded in ``meta["data"]``.

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
    data, hits, bench_info, used_templates = {}, [], {}, {}
    text = _text_hash(model, tokenizer) if reference_cache is not None else None
    extra = [d for d in extra_datasets if d not in datasets]
    for ds in datasets + extra:
        source.classes[ds], data[ds], info = _split_data(ds, data_root, size, seed, max_n, read, bench)
        used_templates[ds] = info["templates"] if info else list(templates)
        if info:
            bench_info[ds] = {k: v for k, v in info.items() if k != "templates"}
        source.heads[ds], hit = _heads(model, tokenizer, source.classes[ds], used_templates[ds], reference_cache, text)
        hits.append(hit)
    source.meta["heads_cached"] = all(hits)
    if bench_info:
        source.meta["data"] = bench_info
    for ds, splits in plan_residency(data, max_resident_mb, set(bench_info)).items():
        source.add_data(ds, splits)
    # The checkpoint check's table rides in the same cache entry as the references: it is figures
    # of the same content, and a run judges it before its search (harness.runner).
    source.evaluate_references(reference_cache, extra=task_check.EXTRA if task_vectors else None)
    source.meta.update(source_stats(source), max_resident_mb=max_resident_mb, image_transform=read.description,
                       model=model_name, pretrained=pretrained,
                       checkpoints=checkpoints,
                       **({"fine_tuning": "linear"} if any(tangent_checkpoint(c) for c in checkpoints or ()) else {}),
                       templates=list(templates) if not bench_info else used_templates,
                       build_seconds=round(time.perf_counter() - t0, 2))
    return source


@dataclass
class BenchOptions:
    """How benchmark data sets (:mod:`harness.data.benchmark`) under the data root are read."""

    suite: str = option("", "a named task list (ta8, ta8-atlas, tall14, tall20, atlas22): the data sets, in order "
                            "(needs data_root; empty: none)")
    data_convention: str = option("auto", "data layout: auto (task_vectors layout, then Hugging Face Parquet), tv, "
                                          "hf, or folders (plain image folders only)",
                                  choices=CONVENTIONS + ("folders",))
    val_rule: str = option("atlas", "validation split of train: atlas (10%, at most 5,000) or fusionbench "
                                    "(10%, no cap)", choices=VAL_RULES)
    prompts: str = option("atlas", "class names and templates: atlas (task_vectors/aTLAS lists) or fusionbench",
                          choices=VARIANTS)
    bench_subset: int = option(0, "score benchmark data sets on a seeded subset of at most N val and test images "
                                  "(0: all)", ge=0)


def check_bench_options(options) -> None:
    """One-line errors for an unknown suite, or a suite without a data root (the other benchmark
    options' choices and bounds are declared on :class:`BenchOptions`)."""
    from harness.data.suites import SUITES
    if options.suite not in ("",) + tuple(SUITES):
        raise HarnessError(f"option suite must be one of {', '.join(SUITES)}, got {options.suite!r}")
    if options.suite and not options.data_root:
        raise HarnessError(f"suite {options.suite} needs --data-root (where its data sets are)")


@dataclass
class FileOptions(BenchOptions):
    """Options of a source that loads a user's files: the pre-trained weights, one fine-tuned
    checkpoint per data set, image folders or benchmark data sets under ``data_root``, and how
    much of them is held in memory; see :class:`BenchOptions` for suites."""

    pretrained: str = option("", "the pre-trained weights: a file, or local-dir:DIR (empty: random initialisation)")
    checkpoints: list[str] = option(help="one fine-tuned checkpoint per data set: NAME=PATH, a path whose file stem "
                                         "is the data set name, or a folder of such files",
                                    default_factory=list)
    data_root: str = option("", "image folders <data_root>/<NAME>/<split>/<class>/*.png for data sets that are not "
                                "built in, or benchmark data sets in their own layouts (empty: built-in data only)")
    extra_data: list[str] = option(help="data sets loaded without a checkpoint (heads and splits only), e.g. "
                                        "negation's control ImageNet", default_factory=list)
    max_n: int = option(4000, "images per built-in data set, or per split of an image folder", ge=1)
    max_resident_mb: float = option(2048, "memory (MB) for inputs held in memory: train and val must fit, a test "
                                          "split that does not is streamed from disk", ge=0)
    loader_workers: int = option(2, "processes that decode a streamed image folder", ge=0)

    def bench(self) -> BenchOptions:
        return BenchOptions(**{f: getattr(self, f) for f in BenchOptions.__dataclass_fields__})


@dataclass
class OpenClipOptions(FileOptions):
    """Options of the open_clip source (see :class:`FileOptions` for the files and data)."""

    model: str = option("", "the open_clip architecture, e.g. ViT-B-32 (not needed with pretrained=local-dir:DIR)")


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
        check_bench_options(options)
        pairs = (suite_checkpoints(options.suite, options.checkpoints) if options.suite
                 else checkpoint_list(options.checkpoints))
        options.checkpoints = [f"{n}={p}" for n, p in pairs]
        check_file_options(options)

    @classmethod
    def load(cls, options, *, cache_dir=None, progress=True) -> ModelSource:
        from harness.sources.cache import cache_root
        pairs = checkpoint_list(options.checkpoints)
        return from_checkpoints(options.model, options.pretrained or None, [p for _, p in pairs],
                                [n for n, _ in pairs], data_root=options.data_root or None,
                                max_n=options.max_n, reference_cache=str(cache_root(cache_dir)),
                                max_resident_mb=options.max_resident_mb, loader_workers=options.loader_workers,
                                bench=options.bench(), extra_datasets=options.extra_data)
