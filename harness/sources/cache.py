"""Cached model zoos: a source built once (fine-tunes included), saved, and loaded in about a second.

A zoo is a :class:`ZooSource` plugin (the built-in ``effnet`` and ``tiny-clip``). It is keyed by
its config (plus the installed data sets, the torch version and the weights' package versions):
change any field and it is rebuilt into a new file. Files are safetensors (never pickle) with a
JSON sidecar for the metadata, both written atomically. The sidecar carries the sha256 of the
tensors file (``sha256``), its own checksum (``meta_sha256``, over the rest of the sidecar, whose
figures feed runs' references) and the entry's key; an entry whose checksums or key do not verify
is rebuilt, never used. One process builds an entry at a time (an ``flock`` on a lock file beside
it); another one asking for it meanwhile waits, then loads what the first one built.

Example:
    >>> source = get_zoo("effnet")                      # builds on first use, then loads in < 1 s
    >>> source = get_zoo("effnet", ft_steps=200)        # another config, another cache file
    >>> zoo_info("effnet")                              # zero-shot / fine-tuned accuracy per data set
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from harness.api import HarnessError, Source
from harness.config import resolve_options
from harness.data import OFFLINE, available
from harness.sources.base import SPLITS, ModelSource, source_stats
from harness.sources.building import Stages, atomic_write, torch_threads

FORMAT = 1  # bump when the file layout changes: old caches are then rebuilt, not misread

ENV_CACHE = "ATLAS_HARNESS_CACHE"
CACHE_FOLDER = "atlas-harness"  # under $XDG_CACHE_HOME, else under ~/.cache


class ZooSource(Source):
    """A source built from its ``Options`` (a frozen config dataclass whose fields are declared with
    :func:`harness.api.option`) and cached on disk.

    Subclasses set ``packages`` (distributions whose versions key the cache beside torch's) and
    implement :meth:`empty` (the untrained skeleton a cache file is restored into) and
    :meth:`build` (everything, fine-tunes included).
    """

    cached: ClassVar[bool] = True
    packages: ClassVar[tuple[str, ...]] = ()
    # Config fields added after zoos were cached, at the values that build the same zoo: left out of
    # the cache key there, so those zoos keep their entries.
    neutral_config: ClassVar[dict] = {"ft_mode": "standard", "ft_rank": 4}

    @classmethod
    def empty(cls, cfg, root: Path) -> ModelSource:
        raise NotImplementedError

    @classmethod
    def build(cls, cfg, datasets: list[str], stages: "Stages", progress: bool, root: Path) -> ModelSource:
        raise NotImplementedError

    @classmethod
    def load(cls, options, *, cache_dir: str | None = None, progress: bool = True) -> ModelSource:
        return build_zoo(cls, cache_dir=cache_dir, progress=progress, config=options)


# --------------------------------------------------------------------------- cache files

def cache_root(override: str | None = None) -> Path:
    """Where zoos are cached: ``override`` (``--cache-dir``), else ``$ATLAS_HARNESS_CACHE``, else
    ``$XDG_CACHE_HOME/atlas-harness``, else ``~/.cache/atlas-harness``."""
    root = override or os.environ.get(ENV_CACHE)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        # The XDG base-directory spec ignores a relative path; so does this.
        base = xdg if xdg and os.path.isabs(os.path.expanduser(xdg)) else os.path.join("~", ".cache")
        root = os.path.join(base, CACHE_FOLDER)
    return Path(root).expanduser()


def zoo_class(name: "str | type[ZooSource]") -> type[ZooSource]:
    """The cached source plugin registered as ``name``."""
    if isinstance(name, type):
        return name
    import harness.registry as registry
    cached = [n for n in registry.names("source") if getattr(registry.load("source", n), "cached", False)]
    if name not in cached:
        raise HarnessError(f"unknown zoo '{name}'; valid zoos: {', '.join(cached)}")
    return registry.load("source", name)


def _config(cls: type[ZooSource], overrides: dict):
    return resolve_options(cls, overrides, f"zoo '{cls.name}'")


def _datasets(name: str, cfg, warn: bool = True) -> tuple[list[str], dict[str, str]]:
    """The configured data sets that are installed, and a reason for each one skipped (printed
    as one warning line each when ``warn``)."""
    unknown = [d for d in cfg.datasets if d not in OFFLINE]
    if unknown:
        raise HarnessError(f"unknown data set '{unknown[0]}' for zoo '{name}'; valid: {', '.join(OFFLINE)}")
    if len(set(cfg.datasets)) != len(cfg.datasets) or not cfg.datasets:
        raise HarnessError(f"zoo '{name}' needs distinct data sets, got {list(cfg.datasets)}")
    reasons = available()
    skipped = {d: reasons[d] for d in cfg.datasets if reasons[d]}
    for ds, reason in skipped.items():
        if warn:
            print(f"warning: zoo '{name}' skips {ds}: {reason}", file=sys.stderr)
    kept = [d for d in cfg.datasets if d not in skipped]
    if not kept:
        raise HarnessError(f"zoo '{name}' has no installed data set; install one of: "
                           + "; ".join(skipped.values()))
    return kept, skipped


def _versions(cls: type[ZooSource]) -> dict[str, str]:
    """Versions of what a zoo's numbers depend on beyond its config."""
    out = {"torch": torch.__version__}
    for p in cls.packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def _key(cls: type[ZooSource], cfg, datasets: list[str]) -> str:
    config = {k: v for k, v in dataclasses.asdict(cfg).items()
              if not (k in cls.neutral_config and v == cls.neutral_config[k])}
    ident = {"format": FORMAT, "zoo": cls.name, "config": config, "datasets": datasets,
             "versions": _versions(cls)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]

def _paths(root: Path, name: str, key: str) -> tuple[Path, Path]:
    stem = root / f"{name}-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _meta_checksum(meta: dict) -> str:
    """The sha256 of a sidecar's content (canonical JSON of every field but ``meta_sha256``)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _entry_lock(tensor_path: Path, progress: bool):
    """Hold an exclusive ``flock`` on ``.NAME-KEY.lock`` beside the entry while building it: a
    second process waits here (one notice line when ``progress``), then finds the built entry.
    The kernel drops the lock when its holder dies. A cache folder where no lock file can be
    created (read-only) is used without one."""
    import fcntl
    lock_path = tensor_path.with_name(f".{tensor_path.stem}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if progress:
                print(f"notice: another process is building zoo cache {tensor_path}; waiting for it",
                      file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

def _save(source: ModelSource, tensor_path: Path, meta_path: Path, with_inputs: bool) -> None:
    from safetensors.torch import save_file
    t: dict[str, Tensor] = {f"base/{k}": v for k, v in source.base.items()}
    for ds in source.datasets:
        weight, bias = source.heads[ds]
        t[f"head/{ds}/weight"], t[f"head/{ds}/bias"] = weight, bias
        for k, v in source.task_vectors[ds].items():
            t[f"tv/{ds}/{k}"] = v
        for k, (a, b) in source.lora_factors.get(ds, {}).items():
            t[f"lora/{ds}/{k}/A"], t[f"lora/{ds}/{k}/B"] = a, b
        for split, y in source.labels[ds].items():
            t[f"label/{ds}/{split}"] = y
            t[f"image/{ds}/{split}"] = torch.from_numpy(source.images[ds][split])
            if with_inputs:
                t[f"input/{ds}/{split}"] = source.inputs[ds][split]
    t = {k: v.detach().contiguous().clone() for k, v in t.items()}  # safetensors refuses shared storage
    # The sidecar is written last: it marks the pair as complete, and carries the tensors' checksum.
    atomic_write(tensor_path, lambda p: save_file(t, str(p)))
    source.meta["sha256"] = _sha256(tensor_path)
    meta = json.loads(json.dumps(source.meta))  # as it reads back (tuples are lists)
    meta["meta_sha256"] = _meta_checksum(meta)
    source.meta["meta_sha256"] = meta["meta_sha256"]
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))


def _clean_stale(root: Path) -> None:
    """Delete temporary files that killed builds left (``.NAME.PID.tmp`` of a process that is gone)."""
    for tmp in root.glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def _restore(source: ModelSource, tensors: dict[str, Tensor], with_inputs: bool) -> ModelSource:
    """Fill ``source`` (tail, prefix and preprocessing set) from the saved tensors."""
    meta = source.meta
    source.base = {k: tensors[f"base/{k}"] for k in source.base}
    with torch.no_grad():  # the tail's own parameters are θ_0 too (for partial param dicts)
        for k, p in source.tail.named_parameters():
            p.copy_(source.base[k])
    for ds in meta["datasets"]:
        source.classes[ds] = meta["classes"][ds]
        source.heads[ds] = (tensors[f"head/{ds}/weight"], tensors[f"head/{ds}/bias"])
        source.task_vectors[ds] = {k: tensors[f"tv/{ds}/{k}"] for k in source.base}
        factors = {k: (tensors[f"lora/{ds}/{k}/A"], tensors[f"lora/{ds}/{k}/B"]) for k in source.base
                   if f"lora/{ds}/{k}/A" in tensors}
        if factors:
            source.lora_factors[ds] = factors
        splits = [s for s in SPLITS if f"label/{ds}/{s}" in tensors]
        source.labels[ds] = {s: tensors[f"label/{ds}/{s}"] for s in splits}
        source.images[ds] = {s: tensors[f"image/{ds}/{s}"].numpy() for s in splits}
        source.inputs[ds] = {s: tensors[f"input/{ds}/{s}"] if with_inputs
                             else source.encode(source.images[ds][s]) for s in splits}
    return source


# --------------------------------------------------------------------------- public API

def build_zoo(name: "str | type[ZooSource]" = "effnet", cache_dir: str | None = None, progress: bool = True,
              force: bool = False, config=None, **overrides) -> ModelSource:
    """Build a zoo (or load it if cached and not ``force``), save it, and return its source.

    Args:
        name: a cached source's name (``effnet``, ``tiny-clip``) or its class.
        cache_dir: see :func:`cache_root`.
        progress: tqdm bars and stage timings on stderr; False silences both.
        force: rebuild even if a cached file exists.
        config: the source's whole ``Options`` instance (instead of ``overrides``).
        **overrides: config fields, e.g. ``ft_steps=20, datasets=("fashion", "lfw")``.
    """
    cls = zoo_class(name)
    name = cls.name
    cfg = config if config is not None else _config(cls, overrides)
    datasets, skipped = _datasets(name, cfg)
    root = cache_root(cache_dir)
    key = _key(cls, cfg, datasets)
    tensor_path, meta_path = _paths(root, name, key)
    if not force:
        loaded = _cached(cls, cfg, root, key, tensor_path, meta_path, warn=False)
        if loaded is not None:
            return loaded
    with _entry_lock(tensor_path, progress):
        if not force:  # built by another process while this one waited for the lock, or damaged
            loaded = _cached(cls, cfg, root, key, tensor_path, meta_path, warn=True)
            if loaded is not None:
                return loaded
        return _build(cls, cfg, name, datasets, skipped, root, key, tensor_path, meta_path, progress)


def _cached(cls, cfg, root: Path, key: str, tensor_path: Path, meta_path: Path, warn: bool) -> ModelSource | None:
    """The cached entry, loaded; None when there is none or it does not verify (then, when
    ``warn``, one notice line on stderr says why it is rebuilt)."""
    if not (tensor_path.exists() and meta_path.exists()):
        return None
    loaded = _load(cls, cfg, root, key, tensor_path, meta_path)
    if isinstance(loaded, str):
        if warn:
            print(f"notice: zoo cache {tensor_path} {loaded}; rebuilding it", file=sys.stderr, flush=True)
        return None
    return loaded


def _build(cls, cfg, name: str, datasets: list[str], skipped: dict, root: Path, key: str, tensor_path: Path,
           meta_path: Path, progress: bool) -> ModelSource:
    _clean_stale(root)
    stages = Stages(name, progress)
    t0 = time.perf_counter()
    with torch_threads(cfg.threads):
        source = cls.build(cfg, datasets, stages, progress, root)
        with stages("evaluate"):
            source.evaluate_references()
    source.meta.update(
        source_stats(source), zoo=name, key=key, format=FORMAT, config=dataclasses.asdict(cfg),
        datasets=datasets, skipped=skipped, classes=source.classes, versions=_versions(cls),
        threads=cfg.threads, timings=stages.timings, file=tensor_path.name)
    source.meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    with stages("save"):
        _save(source, tensor_path, meta_path, with_inputs=source.prefix is not None)
    if progress:
        zs, ft = source.meta["zero_shot_acc"], source.meta["finetuned_acc"]
        print(f"[zoo {name}] built in {source.meta['build_seconds']:.0f} s → {tensor_path}; test accuracy "
              "zero-shot/fine-tuned: " + ", ".join(f"{d} {zs[d]:.3f}/{ft[d]:.3f}" for d in datasets),
              file=sys.stderr, flush=True)
    return source

def _load(cls: type[ZooSource], cfg, root: Path, key: str, tensor_path: Path,
          meta_path: Path) -> "ModelSource | str":
    """The entry, restored; or, when it does not verify, why (a phrase for the notice line)."""
    from safetensors.torch import load_file
    t0 = time.perf_counter()
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "has an unreadable sidecar (damaged)"
    if not isinstance(meta, dict) or not meta.get("sha256") or not meta.get("meta_sha256"):
        return "has no checksum in its sidecar"
    if meta["meta_sha256"] != _meta_checksum(meta):
        return "has a sidecar that does not match its checksum (damaged)"
    if meta.get("key") != key:
        return "has a sidecar of another entry (its key does not match)"
    try:
        if _sha256(tensor_path) != meta["sha256"]:
            return "does not match its checksum (damaged)"
        tensors = load_file(str(tensor_path))
    except Exception as e:
        raise HarnessError(f"zoo cache {tensor_path} is unreadable ({type(e).__name__}); delete it "
                           f"or rebuild it with `python -m harness zoo build {cls.name} --force`") from None
    source = cls.empty(cfg, root)
    source.meta = meta
    source = _restore(source, tensors, with_inputs=source.prefix is not None)
    meta["load_seconds"] = round(time.perf_counter() - t0, 2)
    return source

def get_zoo(name: str = "effnet", cache_dir: str | None = None, progress: bool = True,
            **overrides) -> ModelSource:
    """The zoo's :class:`ModelSource`, loaded from the cache or built (once) when missing.

    Args:
        name: ``"effnet"`` (default) or ``"tiny-clip"``.
        cache_dir: see :func:`cache_root`.
        progress: show a progress bar on stderr if a build is needed.
        **overrides: config fields; an unknown field is a HarnessError.
    """
    return build_zoo(name, cache_dir=cache_dir, progress=progress, force=False, **overrides)

def zoo_path(name: "str | type[ZooSource]" = "effnet", cache_dir: str | None = None, **overrides) -> Path:
    """The cache file a zoo with these overrides lives in (it may not exist yet)."""
    cls = zoo_class(name)
    cfg = _config(cls, overrides)
    datasets, _ = _datasets(cls.name, cfg, warn=False)
    return _paths(cache_root(cache_dir), cls.name, _key(cls, cfg, datasets))[0]

def zoo_info(name: str = "effnet", cache_dir: str | None = None, progress: bool = True, **overrides):
    """One row per data set: classes, zero_shot_acc, finetuned_acc, n_train, n_val, n_test.

    ``df.attrs`` holds the composed part's ``blocks`` and ``params``, the build timings and the
    cache file. Reads only the JSON sidecar when the zoo is cached; builds it otherwise.
    """
    import pandas as pd
    meta_path = zoo_path(name, cache_dir, **overrides).with_suffix(".json")
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, OSError) as e:
            raise HarnessError(f"zoo metadata {meta_path} is unreadable ({type(e).__name__}); rebuild it with "
                               f"`python -m harness zoo build {zoo_class(name).name} --force`") from None
    else:
        meta = build_zoo(name, cache_dir=cache_dir, progress=progress, **overrides).meta
    rows = [{"dataset": ds, "classes": len(meta["classes"][ds]),
             "zero_shot_acc": meta["zero_shot_acc"][ds], "finetuned_acc": meta["finetuned_acc"][ds],
             **{f"n_{s}": meta["sizes"][ds].get(s, 0) for s in SPLITS}} for ds in meta["datasets"]]
    df = pd.DataFrame(rows).set_index("dataset")
    df.attrs.update(zoo=zoo_class(name).name, blocks=meta["blocks"], params=meta["params"], skipped=meta["skipped"],
                    build_seconds=meta["build_seconds"], timings=meta["timings"],
                    file=str(meta_path.with_suffix(".safetensors")))
    return df
