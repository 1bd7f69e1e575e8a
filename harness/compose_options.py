"""The options every composing task takes (:class:`ComposeOptions`) and how they pick the model
source and the engine plugins (:func:`resolve_source`, :func:`resolve_engine`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import harness.registry as registry
from harness.api import HarnessError, option
from harness.config import resolve_options

# Task options forwarded to the source / the engine when their Options have a field of that name.
SOURCE_FIELDS = ("model", "pretrained", "checkpoints", "data_root", "extra_data", "suite", "data_convention", "val_rule",
                 "prompts", "bench_subset")
ENGINE_FIELDS = ("population", "precision", "eval_chunk", "prefix_cache")


@dataclass
class ComposeOptions:
    """Options every composing task takes.

    ``source`` names the model source plugin (``effnet``, the default; ``tiny-clip``;
    ``open_clip``, chosen by itself when ``checkpoints`` are given; or any installed one) and
    ``source_options`` its own options as ``"key=value;key=value"``. ``model``, ``pretrained``,
    ``checkpoints`` and ``data_root`` go to sources that take them (your own open_clip model), and
    so do the benchmark-data options ``suite``, ``data_convention``, ``val_rule``, ``prompts`` and
    ``bench_subset`` (:class:`harness.sources.open_clip.BenchOptions`). The source declares and
    checks their valid values; empty here means the source's own default.

    ``engine`` names the engine plugin (``local``); ``population`` (``auto`` or ``off``) is its
    choice of vmap evaluation for batches of candidates, and ``precision`` (``fp32``, ``bf16`` or
    ``fp16``) the autocast of its forward, used only where it stays within a tolerance of fp32;
    ``eval_chunk`` (``auto`` or N) the images per forward pass (sized to the GPU's memory on CUDA);
    ``prefix_cache`` (``auto`` or ``off``) its reuse of an anchor's activations (same results).
    The engine declares and checks their valid values.

    ``select=b`` (b ≥ 1) keeps only the ``b`` most informative task vectors per block, ranked by
    |∂L/∂λ| at the start point before any search (informative block selection, paper App. D.6;
    needs ``--space per_block`` or ``per_partition:K``); 0 keeps them all.

    ``lora_form=factors`` composes LoRA task vectors in factor form
    (:class:`harness.lora.FactorComposition`); it needs a source holding factors: PEFT LoRA adapter
    folders given to ``hf_clip``, or a zoo built with ``ft_mode=lora``.

    ``transform=NAME[:key=value,...]`` rewrites the task vectors before they are composed
    (``ties``, ``dare``, ``iso``; see ``python -m harness list transform``); it is recorded in its
    canonical form (non-default options only) and is part of the run's identity.
    """

    source: str = option("", "model source plugin (empty: effnet, or open_clip / hf_clip when checkpoints are given)")
    source_options: str = option("", "the source's own options, \"key=value;key=value\" (python -m harness list SOURCE)")
    model: str = option("", "open_clip architecture of your model, e.g. ViT-B-32 (source open_clip)")
    pretrained: str = option("", "your pre-trained weights: a file, local-dir:DIR, or a Hugging Face CLIPModel folder")
    checkpoints: list[str] = option(help="fine-tuned checkpoints, one per data set: NAME=PATH,... (or files/folders named after their data sets)",
                                    default_factory=list)
    data_root: str = option("", "image folders DIR/<data set>/<split>/<class>/, or benchmark data sets in their own layouts")
    extra_data: list[str] = option(help="data sets loaded without a checkpoint (heads and data only), e.g. negation's control",
                                   default_factory=list)
    suite: str = option("", "benchmark suite: ta8, ta8-atlas, tall14, tall20, atlas22 (needs --data-root; empty: none)")
    data_convention: str = option("", "benchmark data layout: auto, tv, hf or folders (empty: the source's default, auto)")
    val_rule: str = option("", "validation split of train: atlas (at most 5,000) or fusionbench (no cap) (empty: atlas)")
    prompts: str = option("", "class names and templates: atlas or fusionbench (empty: atlas)")
    bench_subset: int = option(0, "score benchmark val/test on a seeded subset of at most N images (0: all)")
    engine: str = option("local", "engine plugin that merges the weights and runs the forward pass")
    bound: float = option(1.5, "searchers keep every coefficient in [-bound, bound]", gt=0)
    dtype: str = option("fp32", "storage precision of the stacked task vectors", choices=("fp32", "fp16"))
    select: int = option(0, "keep the b most informative task vectors per block, by |dL/dλ| at the start "
                            "(needs --space per_block or per_partition:K; 0: keep all)", ge=0)
    select_vectors: int = option(0, "compose only the b most relevant whole task vectors, ranked by select_by "
                                    "(few_shot and tta; 0: all)", ge=0)
    select_by: str = option("gradient", "how select_vectors ranks task vectors: gradient (|dL/dα| of the whole "
                                        "vector at the start), features (target vs data-set feature centroids) or random",
                            choices=("gradient", "features", "random"))
    population: str = option("auto", "engine's vmap evaluation of a batch of candidates: auto or off")
    precision: str = option("fp32", "engine's forward precision: fp32, or bf16/fp16 autocast, used only where it "
                                    "stays within a tolerance of fp32")
    eval_chunk: str = option("auto", "images per forward pass: auto (the source's own on CPU, sized to free memory "
                                     "on CUDA) or N")
    prefix_cache: str = option("auto", "engine's reuse of an anchor candidate's activations for candidates that change "
                                       "only later stages (same results): auto or off")
    transform: str = option("", "rewrite the task vectors before composing: NAME[:key=value,...] with NAME ties, "
                                "dare or iso (empty: none)")
    lora_form: str = option("dense", "how LoRA task vectors (PEFT adapter folders, a zoo's ft_mode=lora) are composed: dense (ΔW = B·A scaled "
                                     "per block, like any task vector) or factors (A and B scaled separately, "
                                     "ΔW = (Σλ_B B)(Σλ_A A); --space per_block or per_layer)",
                            choices=("dense", "factors"))
    linearize: bool = option(False, "score the first-order Taylor expansion of the model at the pre-trained weights, "
                                    "f(x;θ0) + J·Δθ (linearised task vectors; references are the linearised fine-tuned models)")


def source_name(options) -> str:
    """The source plugin a task's options pick: ``source``, else ``hf_clip`` when ``pretrained`` is
    a Hugging Face folder (it has a config.json), ``open_clip`` when checkpoints are given, else effnet."""
    if options.source:
        return options.source
    if options.checkpoints:
        hf = options.pretrained and os.path.isfile(os.path.join(options.pretrained, "config.json"))
        return "hf_clip" if hf else "open_clip"
    return "effnet"


def _pairs(spec: str, what: str) -> dict[str, str]:
    out = {}
    for pair in [p for p in spec.split(";") if p.strip()]:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise HarnessError(f"bad {what} {pair!r}: expected key=value;key=value")
        out[k.strip()] = v.strip()
    return out


def resolve_source(options):
    """``(source class, its typed Options)`` for a task's options; raises HarnessError."""
    cls = registry.load("source", source_name(options))
    given = _pairs(options.source_options, f"source option for '{cls.name}'")
    fields = cls.option_fields()
    for k in SOURCE_FIELDS:
        value = getattr(options, k, None)
        if not value:
            continue
        if k not in fields:
            raise HarnessError(f"task option {k} is for sources that load your files (open_clip); "
                               f"source '{cls.name}' does not take it")
        given[k] = value
    opts = resolve_options(cls, given, f"source '{cls.name}'")
    registry.validate("source", cls, opts)
    return cls, opts


def resolve_engine(options):
    """``(engine class, its typed Options)`` for a task's options; raises HarnessError."""
    cls = registry.load("engine", options.engine)
    fields = cls.option_fields()
    given = {k: getattr(options, k) for k in ENGINE_FIELDS if k in fields}
    opts = resolve_options(cls, given, f"engine '{cls.name}'")
    registry.validate("engine", cls, opts)
    return cls, opts
