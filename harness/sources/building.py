"""Building blocks for zoo sources (:class:`harness.sources.cache.ZooSource` subclasses): timed
build stages, progress bars, per-(stage, data set) seeds, loading the offline data sets into a
source, fine-tuning every data set's task vector, and writing files atomically."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness.data import OFFLINE, load
from harness.finetune import finetune, finetune_lora
from harness.sources.base import SPLITS, ModelSource


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, then rename over ``path``: a killed build never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Stages:
    """Times build stages, logs each to stderr (when verbose) and keeps them for the metadata."""

    def __init__(self, zoo: str, verbose: bool):
        self.zoo, self.verbose, self.timings = zoo, verbose, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[stage] = round(dt, 2)
        if self.verbose:
            print(f"[zoo {self.zoo}] {stage}: {dt:.1f} s", file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def stage_seed(seed: int, stage: int, ds: str) -> int:
    """A per-(stage, data set) seed; keyed by the data set's fixed position in ``OFFLINE``, so
    dropping a data set from a zoo leaves the others' heads and task vectors unchanged."""
    return int(np.random.SeedSequence([seed, stage, OFFLINE.index(ds)]).generate_state(1)[0])


@contextlib.contextmanager

def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_data(cfg, datasets: list[str]) -> dict:
    return {ds: load(ds, seed=cfg.seed, max_n=cfg.max_n, fractions=cfg.fractions) for ds in datasets}


def add_data(source: ModelSource, data: dict, stages: Stages, progress: bool, stage: str) -> None:
    total = sum(len(d.splits[s][1]) for d in data.values() for s in SPLITS)
    with stages(stage), progress_bar(total, f"{source.name}: {stage}", progress) as bar:
        for ds, d in data.items():
            source.classes[ds] = list(d.classes)
            source.add_data(ds, {s: d.splits[s] for s in SPLITS})
            bar.update(sum(len(d.splits[s][1]) for s in SPLITS))


def finetune_all(source: ModelSource, cfg, stages: Stages, progress: bool) -> None:
    """Every data set's task vector, fine-tuned on its train split; in the tangent space at θ0 (the
    linearised model, :mod:`harness.sources.linear`) when ``cfg.ft_mode`` is ``linear``; as a
    rank-``cfg.ft_rank`` LoRA adapter (dense update and factors) when it is ``lora``."""
    model, mode = source, getattr(cfg, "ft_mode", "standard")
    if mode == "linear":
        from harness.sources.linear import linearized
        model = linearized(source, references=False)
        source.meta["fine_tuning"] = "linear"
    elif mode == "lora":
        source.meta["fine_tuning"] = f"lora:{cfg.ft_rank}"
    with progress_bar(len(source.datasets) * cfg.ft_steps, f"{source.name}: fine-tuning", progress) as bar:
        for ds in source.datasets:
            kw = dict(steps=cfg.ft_steps, batch_size=cfg.ft_batch_size, lr=cfg.ft_lr, seed=stage_seed(cfg.seed, 2, ds),
                      weight_decay=cfg.ft_weight_decay,
                      progress=lambda step, loss: (bar.update(1), bar.set_postfix(ds=ds, loss=f"{loss:.3f}")))
            with stages(f"fine-tune {ds}"):
                if mode == "lora":
                    source.task_vectors[ds], source.lora_factors[ds] = finetune_lora(model, ds, cfg.ft_rank, **kw)
                else:
                    source.task_vectors[ds] = finetune(model, ds, **kw)
