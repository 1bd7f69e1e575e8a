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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from harness.api import HarnessError, Source
from harness.sources.base import ModelSource
from harness.sources.open_clip import FileOptions, check_file_options, checkpoint_list, from_checkpoints

_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_VISION = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
_TEXT = {"embeddings.token_embedding.weight": "token_embedding.weight",
         "embeddings.position_embedding.weight": "positional_embedding",
         "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def read_folder(path: str) -> tuple[dict, dict[str, Tensor]]:
    """``(config, tensors)`` of a Hugging Face model folder (``config.json`` + ``model.safetensors``),
    or of a bare ``.safetensors`` file (config ``{}``). Never unpickles."""
    from safetensors.torch import load_file
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return {}, load_file(str(p))
    if not p.is_dir():
        raise HarnessError(f"Hugging Face checkpoint not found: {path} (a folder with config.json and model.safetensors)")
    if not (p / "config.json").is_file():
        raise HarnessError(f"{path} has no config.json: not a Hugging Face model folder")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise HarnessError(f"{path} has no .safetensors weights (pytorch_model.bin is not read: it is a pickle; "
                           "convert it with transformers' save_pretrained(safe_serialization=True))")
    try:
        config = json.loads((p / "config.json").read_text())
        tensors: dict[str, Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
    except Exception as e:
        raise HarnessError(f"{path} is not a readable Hugging Face folder: {type(e).__name__}: {e}") from None
    return config, tensors


def lora_deltas(folder: Path) -> dict[str, Tensor]:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as weight
    differences ``{module.weight: ΔW}`` with ΔW = (α/r)·B·A (α/√r with rsLoRA; per-module ranks and
    alphas from ``rank_pattern``/``alpha_pattern``), keyed like the vision tower's weights."""
    from safetensors.torch import load_file
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as e:
        raise HarnessError(f"{folder} is not a readable PEFT LoRA adapter: {type(e).__name__}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise HarnessError(f"{folder} is a {cfg.get('peft_type')} adapter; only LoRA adapters are task vectors here")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise HarnessError(f"{folder}: LoRA adapters with {flag} are not supported")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.").removeprefix("vision_model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        short = module.rsplit(".", 1)[-1]
        r = cfg.get("rank_pattern", {}).get(short, cfg.get("r"))
        alpha = cfg.get("alpha_pattern", {}).get(short, cfg.get("lora_alpha", r))
        if b is None or a.shape[0] != r or b.shape[1] != r:
            raise HarnessError(f"{folder}: LoRA rank mismatch at {module} (A {tuple(a.shape)}, "
                               f"B {tuple(b.shape) if b is not None else None}, r {r})")
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        out[f"{module}.weight"] = scale * (b.float() @ a.float())
    if not out:
        raise HarnessError(f"{folder} holds no LoRA A/B weights")
    return out


def _tower(tensors: dict[str, Tensor], prefix: str, fixed: dict[str, str], out_prefix: str) -> dict[str, Tensor]:
    """One tower's weights in open_clip's names (q/k/v concatenated into in_proj)."""
    out, qkv = {}, {}
    for k, v in tensors.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k in fixed:
            out[out_prefix + fixed[k]] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            continue
        n, part, kind = m.groups()
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((n, kind), {})[part[-6]] = v
        elif part in _LAYER:
            out[f"{out_prefix}transformer.resblocks.{n}.{_LAYER[part]}.{kind}"] = v
    for (n, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HarnessError(f"layer {n} lacks one of its q/k/v projections")
        out[f"{out_prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def vision_to_open_clip(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIPVisionModel``'s (or ``CLIPModel``'s) image tower as open_clip ``visual.*`` weights;
    keys with or without the ``vision_model.`` prefix (transformers 5 drops it)."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    out = _tower(tensors, prefix, _VISION, "visual.")
    if "visual_projection.weight" in tensors:
        out["visual.proj"] = tensors["visual_projection.weight"].T.contiguous()
    return out


def clip_to_open_clip(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole ``CLIPModel`` as an open_clip CLIP state dict."""
    out = vision_to_open_clip(tensors)
    out.update(_tower(tensors, "text_model.", _TEXT, ""))
    out["text_projection"] = tensors["text_projection.weight"].T.contiguous()
    out["logit_scale"] = tensors["logit_scale"].reshape(())
    return out


def open_clip_config(config: dict) -> dict:
    """The open_clip model config equivalent to a Hugging Face ``CLIPConfig``."""
    if config.get("model_type") != "clip":
        raise HarnessError(f"the pre-trained folder holds a {config.get('model_type')!r} model; it must be a "
                           "full CLIPModel (model_type 'clip', with the text tower for zero-shot heads)")
    v, t = config["vision_config"], config["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) > 1:
        raise HarnessError(f"unsupported CLIP activation {sorted(acts)}; quick_gelu or gelu")
    return {"embed_dim": config.get("projection_dim", 512), "quick_gelu": acts == {"quick_gelu"},
            "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                           "patch_size": v["patch_size"], "head_width": v["hidden_size"] // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
            "text_cfg": {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"],
                         "width": t["hidden_size"], "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"]}}


def convert(pretrained: str, checkpoints: list[tuple[str, str]], out_dir: Path) -> tuple[str, list[str]]:
    """Write the pre-trained model as an open_clip ``local-dir:`` folder and each fine-tuned image
    tower as ``visual.*`` safetensors under ``out_dir`` (keyed by content, so reused)."""
    from harness.checkpoints import save_state_dict
    config, tensors = read_folder(pretrained)
    oc_cfg = open_clip_config(config)
    base = clip_to_open_clip(tensors)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": oc_cfg, "preprocess_cfg": {}}))
    save_state_dict(base, model_dir / "open_clip_model.safetensors")
    visual = {k for k in base if k.startswith("visual.")}
    paths = []
    tower = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    for ds, path in checkpoints:
        if (Path(path) / "adapter_config.json").is_file():  # a LoRA adapter: θ0's tower + ΔW
            deltas = lora_deltas(Path(path))
            unknown = sorted(k for k in deltas if k not in tower)
            if unknown:
                raise HarnessError(f"{path}: LoRA targets {unknown[:2]}, which the pre-trained image tower does not have")
            bad = [k for k in deltas if deltas[k].shape != tower[k].shape]
            if bad:
                raise HarnessError(f"{path}: LoRA update of {bad[0]} has shape {tuple(deltas[bad[0]].shape)}, "
                                   f"expected {tuple(tower[bad[0]].shape)} (an adapter of a different base model)")
            cfg, ft = {}, {k: v + deltas[k] if k in deltas else v for k, v in tower.items()}
        else:
            cfg, ft = read_folder(path)
        if cfg and cfg.get("model_type") not in ("clip_vision_model", "clip"):
            raise HarnessError(f"{path} holds a {cfg.get('model_type')!r} model, not a CLIPVisionModel")
        sd = vision_to_open_clip(ft)
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
    """``pretrained``: a Hugging Face ``CLIPModel`` folder; ``checkpoints``: ``CLIPVisionModel``
    folders, LoRA adapter folders or safetensors files as ``NAME=PATH``."""


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
        options.checkpoints = [f"{n}={p}" for n, p in checkpoint_list(options.checkpoints, folders=True)]
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
                               max_resident_mb=options.max_resident_mb, loader_workers=options.loader_workers)
        src.meta.update(pretrained=options.pretrained, checkpoints=[p for _, p in pairs], source="hf_clip")
        return src
