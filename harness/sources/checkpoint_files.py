"""Finding fine-tuned checkpoints on disk: ``-t checkpoints=`` entries (``NAME=PATH``, files,
folders of files) and, for a benchmark suite, each data set's checkpoint in a folder under any of
its names and the layouts the field publishes (``<name>.pt``, the aTLAS ``<name>Val/finetuned.pt``,
FusionBench's ``clip-vit-base-patch32_<name>`` model folders)."""
from __future__ import annotations

import os

from harness.api import HarnessError

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


_CHECKPOINT_FILES = ("{}.safetensors", "{}.pt", "{}.pth", "{}.bin", "{}Val/finetuned.pt", "{}/finetuned.pt",
                     "{}Val/finetuned.safetensors", "{}/finetuned.safetensors")


def _find_checkpoint(keys: list[str], folder: str, folders: bool) -> str | None:
    """A data set's checkpoint in ``folder`` under any of its names ``keys``: ``<key>.pt`` (and
    other suffixes), the aTLAS layout ``<key>Val/finetuned.pt``, or, for Hugging Face models
    (``folders``), a folder ``<key>`` or ``<anything>_<key>`` (FusionBench's
    ``clip-vit-base-patch32_<key>``)."""
    entries = {e.lower(): e for e in os.listdir(folder)}
    for key in keys:
        if folders:
            hits = [e for low, e in entries.items() if (low == key.lower() or low.endswith("_" + key.lower()))
                    and os.path.isdir(os.path.join(folder, e))]
            if len(hits) > 1:
                raise HarnessError(f"{folder} holds several checkpoints for '{key}': {', '.join(sorted(hits))}")
            if hits:
                return os.path.join(folder, hits[0])
        for pattern in _CHECKPOINT_FILES:
            path = os.path.join(folder, pattern.format(key))
            if os.path.isfile(path):
                return path
    return None


def suite_checkpoints(suite_name: str, entries: list[str], folders: bool = False) -> list[tuple[str, str]]:
    """``[(task name, checkpoint path)]`` for every task of a suite, in its order and naming.

    ``entries`` are ``NAME=PATH`` (NAME in either naming convention) and folders searched for the
    rest (:func:`_find_checkpoint`). A task without a checkpoint, or a checkpoint for a data set
    outside the suite, is a one-line error."""
    from harness.data.suites import spec, suite
    tasks = suite(suite_name)
    given, dirs = {}, []
    for entry in entries:
        name, sep, path = entry.partition("=")
        path = os.path.abspath(os.path.expanduser((path if sep else name).strip()))
        if not sep and os.path.isdir(path) and not (folders and os.path.isfile(os.path.join(path, "config.json"))):
            dirs.append(path)
            continue
        name = name.strip() if sep else os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]
        s = spec(name)
        if s is None or all(spec(t) != s for t in tasks):
            raise HarnessError(f"checkpoint '{name}' is not a data set of suite {suite_name} "
                               f"({', '.join(tasks)})")
        if not os.path.exists(path):
            raise HarnessError(f"checkpoint not found: {path} (task option checkpoints)")
        given[s.name] = path
    out, missing = [], []
    for task in tasks:
        s = spec(task)
        path = given.get(s.name)
        for d in dirs:
            if path:
                break
            path = _find_checkpoint(list(dict.fromkeys(k for k in (task, s.name, s.fb) if k)), d, folders)
        if path:
            out.append((task, path))
        else:
            missing.append(task)
    if missing:
        where = ", ".join(dirs) or "the NAME=PATH entries"
        raise HarnessError(f"suite {suite_name}: no checkpoint for {', '.join(missing)} in {where} "
                           f"(looked for <name>.pt|.safetensors, <Name>Val/finetuned.pt"
                           f"{', <model>_<key>/ folders' if folders else ''}; or give NAME=PATH)")
    return out
