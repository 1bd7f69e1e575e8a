"""Hugging Face CLIP checkpoints (FusionBench's zoo): a ``CLIPModel`` folder for the pre-trained
model and one ``CLIPVisionModel`` folder (or ``.safetensors`` file) per fine-tuned task.

The weights are mapped onto open_clip's layout and run through open_clip's own modules, so every
task, engine and searcher sees the same kind of model as with the ``open_clip`` source. Nothing
here imports transformers: the folders are read as ``config.json`` + ``model.safetensors``.

The mapping (per layer N; the vision tower under ``vision_model.``, the text tower under
``text_model.``): ``embeddings.patch_embedding`` → ``conv1``, ``embeddings.class_embedding`` →
``class_embedding``, ``embeddings.position_embedding`` → ``positional_embedding``,
``pre_layrnorm`` → ``ln_pre``, ``encoder.layers.N.self_attn.{q,k,v}_proj`` → one
``transformer.resblocks.N.attn.in_proj_{weight,bias}`` (q, k, v stacked along dim 0),
``self_attn.out_proj`` → ``attn.out_proj``, ``layer_norm1/2`` → ``ln_1/2``, ``mlp.fc1/fc2`` →
``mlp.c_fc/c_proj``, ``post_layernorm`` → ``ln_post``, ``visual_projection.weight`` → ``proj``
transposed; the text tower alike (``final_layer_norm`` → ``ln_final``, ``text_projection.weight`` →
``text_projection`` transposed). ``hidden_act: quick_gelu`` (OpenAI's weights) selects open_clip's
QuickGELU. **Blocks**: q, k and v of one attention layer are one block (``in_proj_weight``), as
in the paper's counting of open_clip models; ViT-B/32's image tower has 152 blocks either way
from open_clip, 200 if HF's split q/k/v were counted separately.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from harness.api import HarnessError, Source, option
from harness.sources.base import ModelSource
from harness.sources.hf_format import (_check_against_config, clip_to_open_clip, factors_to_open_clip, lora_deltas,
                                       lora_factors, open_clip_config,
                                       read_folder, vision_to_open_clip)
from harness.sources.checkpoint_files import checkpoint_list, suite_checkpoints
from harness.sources.open_clip import FileOptions, check_bench_options, check_file_options, from_checkpoints
__all__ = ["HFClipOptions", "HFClipSource", "clip_to_open_clip", "convert", "lora_deltas", "open_clip_config",
           "read_folder", "vision_to_open_clip"]


def _mapped(fn, tensors: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """``fn(tensors)`` (a layout mapping), its failures as one-line errors naming ``path``."""
    try:
        return fn(tensors)
    except HarnessError as e:
        raise HarnessError(f"{path}: {e}") from None
    except KeyError as e:
        raise HarnessError(f"{path} lacks the weight {e.args[0]!r}") from None
    except (RuntimeError, ValueError, IndexError) as e:
        from harness.filecheck import one_line as _one_line
        raise HarnessError(f"{path}: weights of mismatched shapes ({_one_line(e)})") from None


def _write_json(path: Path, obj) -> None:
    from harness.checkpoints import WriteFailed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    except OSError as e:
        raise WriteFailed(path, e.strerror or str(e)) from None


def convert(pretrained: str, checkpoints: list[tuple[str, str]], out_dir: Path) -> tuple[str, list[str]]:
    """Write the pre-trained model as an open_clip ``local-dir:`` folder and each fine-tuned image
    tower as ``visual.*`` safetensors under ``out_dir``: ``model/`` and ``NAME.safetensors`` (names
    checked by :func:`harness.convert.check_names`)."""
    from harness.checkpoints import save_state_dict
    from harness.filecheck import check_names
    check_names([ds for ds, _ in checkpoints])
    out_dir = Path(out_dir)
    config, tensors = read_folder(pretrained)
    oc_cfg = open_clip_config(config, f"{pretrained}/config.json")
    for k in ("text_projection.weight", "visual_projection.weight"):
        if k in tensors and tensors[k].ndim != 2:
            raise HarnessError(f"{pretrained}: weight '{k}' has shape {tuple(tensors[k].shape)}, expected a matrix")
    base = _mapped(clip_to_open_clip, tensors, pretrained)
    _check_against_config(oc_cfg, base, pretrained)
    model_dir = out_dir / "model"
    _write_json(model_dir / "open_clip_config.json", {"model_cfg": oc_cfg, "preprocess_cfg": {}})
    save_state_dict(base, model_dir / "open_clip_model.safetensors")
    visual = {k for k in base if k.startswith("visual.")}
    paths = []
    tower = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    for ds, path in checkpoints:
        if (Path(path) / "adapter_config.json").is_file():  # a LoRA adapter: θ0's tower + ΔW
            deltas = lora_deltas(Path(path), {k: tuple(v.shape) for k, v in tower.items()})
            cfg, ft = {}, {k: v + deltas[k] if k in deltas else v for k, v in tower.items()}
        else:
            cfg, ft = read_folder(path)
        if cfg and cfg.get("model_type") not in ("clip_vision_model", "clip"):
            raise HarnessError(f"{path} holds a {str(cfg.get('model_type'))[:40]!r} model, not a CLIPVisionModel")
        if "visual_projection.weight" in ft and ft["visual_projection.weight"].ndim != 2:
            raise HarnessError(f"{path}: weight 'visual_projection.weight' has shape "
                               f"{tuple(ft['visual_projection.weight'].shape)}, expected a matrix")
        sd = _mapped(vision_to_open_clip, ft, path)
        sd.setdefault("visual.proj", base["visual.proj"])  # a CLIPVisionModel has no projection: θ0's
        missing = sorted(visual - set(sd))
        if missing:
            raise HarnessError(f"{path} lacks image-tower blocks such as {missing[:2]} (a different architecture?)")
        wrong = [k for k in visual if tuple(sd[k].shape) != tuple(base[k].shape)]
        if wrong:
            raise HarnessError(f"{path}: block '{wrong[0]}' has shape {tuple(sd[wrong[0]].shape)}, expected "
                               f"{tuple(base[wrong[0]].shape)} (a vision checkpoint of a different base model)")
        target = out_dir / f"{ds}.safetensors"
        save_state_dict({k: sd[k] for k in visual}, target)
        paths.append(str(target))
    return f"local-dir:{model_dir}", paths


@dataclass
class HFClipOptions(FileOptions):
    """Options of the Hugging Face CLIP source: :class:`FileOptions`, with ``pretrained`` a
    ``CLIPModel`` folder and ``checkpoints`` ``CLIPVisionModel`` folders, LoRA adapter folders or
    safetensors files."""

    pretrained: str = option("", "the pre-trained Hugging Face CLIPModel folder (config.json and model.safetensors)")
    checkpoints: list[str] = option(help="one fine-tuned checkpoint per data set, NAME=PATH or a path named "
                                         "after its data set: a CLIPVisionModel folder, a LoRA adapter folder or a "
                                         ".safetensors file",
                                    default_factory=list)


class HFClipSource(Source):
    """Hugging Face CLIP checkpoints (FusionBench's layout), run as open_clip models."""

    name = "hf_clip"
    description = "Hugging Face CLIP: -t pretrained=CLIPModel_DIR -t checkpoints=NAME=CLIPVisionModel_DIR,..."
    Options = HFClipOptions

    @classmethod
    def validate(cls, options):
        if not options.pretrained or not options.checkpoints:
            raise HarnessError("source hf_clip needs pretrained (a CLIPModel folder) and checkpoints "
                               "(CLIPVisionModel folders, NAME=PATH,...)")
        if not os.path.isdir(options.pretrained):
            raise HarnessError(f"Hugging Face model folder not found: {options.pretrained}")
        options.pretrained = os.path.abspath(options.pretrained)
        check_bench_options(options)
        pairs = (suite_checkpoints(options.suite, options.checkpoints, folders=True) if options.suite
                 else checkpoint_list(options.checkpoints, folders=True))
        options.checkpoints = [f"{n}={p}" for n, p in pairs]
        check_file_options(options)

    @classmethod
    def load(cls, options, *, cache_dir=None, progress=True) -> ModelSource:
        from harness.sources.cache import cache_root
        pairs = checkpoint_list(options.checkpoints, folders=True)
        key = hashlib.sha256(json.dumps([options.pretrained, pairs]).encode()).hexdigest()[:12]
        out = cache_root(cache_dir) / "hf_clip" / key
        local, paths = convert(options.pretrained, pairs, out)
        src = from_checkpoints("", local, paths, [n for n, _ in pairs], data_root=options.data_root or None,
                               max_n=options.max_n, reference_cache=str(cache_root(cache_dir)),
                               max_resident_mb=options.max_resident_mb, loader_workers=options.loader_workers,
                               bench=options.bench(), extra_datasets=options.extra_data)
        src.meta.update(pretrained=options.pretrained, checkpoints=[p for _, p in pairs], source="hf_clip")
        for name, path in pairs:  # LoRA adapters also as their factors, for -t lora_form=factors
            if (Path(path) / "adapter_config.json").is_file():
                src.lora_factors[name] = factors_to_open_clip(lora_factors(Path(path)))
        return src
