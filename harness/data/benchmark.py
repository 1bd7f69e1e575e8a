"""A benchmark data set as the reference protocol uses it: found under a data root in either
convention, split into train / val / test the reference way, with its own class names and
prompt templates.

Conventions, detected per data set (``tv`` first):

- ``tv``: the layout the aTLAS and task_vectors data-preparation instructions produce
  (:mod:`harness.data.tv_layout`);
- ``hf``: FusionBench's Hugging Face datasets as Parquet shards (:mod:`harness.data.hf_parquet`).

Splits: ``test`` is the data set's test split. ``val`` is its shipped validation split where it has
one (EuroSAT, FGVCAircraft, Flowers102, PascalVOC, Country211, UCF101 in the ``tv`` layout;
Flowers102 on the hub), else the reference code's split of train
(:func:`harness.data.suites.split_train`: ``random_split`` seeded with 0, ``min(int(0.1 n), 5000)``
images under the ``atlas`` rule, ``int(0.1 n)`` under ``fusionbench``). ``train`` is what is left
of the train split.

Example:
    >>> d = load("MNIST", "/data")                     # tv layout: /data/MNIST/raw/...
    >>> d.convention, {s: len(x) for s, x in d.splits.items()}
    ('tv', {'train': 55000, 'val': 5000, 'test': 10000})
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from harness.api import HarnessError
from harness.data import hf_parquet
from harness.data.samples import Samples
from harness.data.suites import Spec, spec as find_spec, split_train

CONVENTIONS = ("auto", "tv", "hf")
VAL_RULES = ("atlas", "fusionbench")


def _tv():
    from harness.data import tv_layout
    return tv_layout


def _readers(convention: str):
    if convention not in CONVENTIONS:
        raise HarnessError(f"unknown data convention '{convention}'; valid: {', '.join(CONVENTIONS)}")
    order = {"auto": ("tv", "hf"), "tv": ("tv",), "hf": ("hf",)}[convention]
    return [(c, _tv() if c == "tv" else hf_parquet) for c in order]


def find(name: str, root: str, convention: str = "auto") -> tuple[str, str] | None:
    """``(convention, location)`` of benchmark data set ``name`` under ``root``, or None when it
    is not a benchmark data set or is not there in any accepted convention."""
    s = find_spec(name)
    if s is None or not root:
        return None
    for conv, reader in _readers(convention):
        if conv == "tv" and s.name not in reader.SUPPORTED:
            continue
        where = reader.locate(s.name, root)
        if where is not None:
            return conv, where
    return None


@dataclass
class BenchData:
    """A benchmark data set ready to score: ``splits`` are train / val / test Samples."""

    name: str
    spec: Spec
    convention: str
    location: str
    classes: list[str]
    templates: list[str]
    prompts: str
    val_rule: str
    splits: dict[str, Samples]
    info: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of every split's images and labels, the class names and the templates."""
        h = hashlib.sha256(f"{self.spec.name}|{self.classes}|{self.templates}".encode())
        for s in ("train", "val", "test"):
            h.update(f"{s}:{self.splits[s].fingerprint()}".encode())
        return h.hexdigest()[:16]


def load(name: str, root: str, *, convention: str = "auto", val_rule: str = "atlas",
         prompts: str = "atlas") -> BenchData:
    """Read benchmark data set ``name`` (either naming convention) from ``root``.

    Args:
        convention: ``auto`` (``tv`` layout first, then Parquet), ``tv`` or ``hf``.
        val_rule: ``atlas`` (validation capped at 5,000 images) or ``fusionbench`` (no cap).
        prompts: class-name and template lists, ``atlas`` or ``fusionbench``
            (:mod:`harness.data.prompts`).
    """
    from harness.data.prompts import prompts as prompt_lists
    s = find_spec(name)
    if s is None:
        raise HarnessError(f"'{name}' is not a benchmark data set")
    if val_rule not in VAL_RULES:
        raise HarnessError(f"unknown validation rule '{val_rule}'; valid: {', '.join(VAL_RULES)}")
    found = find(name, root, convention)
    if found is None:
        raise HarnessError(f"data set '{name}' not found under {root} "
                           f"(run `python -m harness data check --data-root {root} --datasets {name}`)")
    conv, _ = found
    reader = _tv() if conv == "tv" else hf_parquet
    raw = reader.read(s.name, root)
    p = prompt_lists(s.name, prompts)
    # Class names read from the files win under the atlas lists (the reference code reads them
    # there); the fusionbench lists are FusionBench's own, whatever the files say.
    classes = list(raw.classes) if raw.classes and prompts == "atlas" else list(p.classes or [])
    if not classes:
        raise HarnessError(f"{raw.location}: no class names for '{s.name}' (neither the files nor "
                           "the prompt lists give them)")
    if len(classes) != s.n_classes:
        raise HarnessError(f"{raw.location}: {len(classes)} class names for '{s.name}', expected {s.n_classes}")
    for split, samples in raw.splits.items():
        if len(samples) and int(samples.labels.max()) >= len(classes):
            raise HarnessError(f"{raw.location}: {split} label {int(samples.labels.max())} has no class "
                               f"name ({len(classes)} classes)")
    if "val" in raw.splits:
        splits = {"train": raw.splits["train"], "val": raw.splits["val"], "test": raw.splits["test"]}
        val_from = "shipped"
    else:
        train_idx, val_idx = split_train(len(raw.splits["train"]), val_rule)
        splits = {"train": raw.splits["train"].subset(train_idx), "val": raw.splits["train"].subset(val_idx),
                  "test": raw.splits["test"]}
        val_from = f"train split, {val_rule} rule"
    sizes = {k: len(v) for k, v in splits.items()}
    if empty := [k for k in ("val", "test") if not sizes[k]]:
        raise HarnessError(f"{raw.location}: the {empty[0]} split of '{name}' is empty "
                           f"(train has {len(raw.splits['train'])} images, test {len(raw.splits['test'])})")
    expected = dict(zip(("train", "val", "test"), s.sizes)) if s.sizes else None
    info = {"convention": conv, "location": raw.location, "val_from": val_from, "sizes": sizes,
            "paper_sizes": expected, "prompts": p.provenance}
    return BenchData(name, s, conv, raw.location, classes, list(p.templates), prompts, val_rule, splits, info)
