"""Reading Hugging Face CLIP folders without transformers: ``config.json`` + ``model.safetensors``
(sharded or not), LoRA adapters as dense deltas, and the mapping of the weights onto open_clip's
layout (see :mod:`harness.sources.hf_clip` for the mapping in words)."""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

import torch
from torch import Tensor

from harness.api import HarnessError

_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_VISION = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
_TEXT = {"embeddings.token_embedding.weight": "token_embedding.weight",
         "embeddings.position_embedding.weight": "positional_embedding",
         "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


_MAX_JSON_BYTES = 64 << 20  # config.json, model.safetensors.index.json, adapter_config.json
_INDEX = "model.safetensors.index.json"


def _read_json(path: Path) -> object:
    """A JSON file of a Hugging Face folder (a regular file, at most 64 MiB), parsed."""
    from harness.filecheck import check_regular_file, one_line as _one_line
    size = check_regular_file(path, "file")
    if size > _MAX_JSON_BYTES:
        raise HarnessError(f"{path} is {size} bytes; a Hugging Face JSON file is at most {_MAX_JSON_BYTES >> 20} MiB")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise HarnessError(f"{path} is not valid JSON: {_one_line(e)}") from None
    except OSError as e:
        raise HarnessError(f"{path} cannot be read: {e.strerror or e}") from None


def _plain_file_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and os.path.basename(name) == name)


def _weight_files(folder: Path) -> dict[str, list[str] | None]:
    """The safetensors files a Hugging Face folder's format names, each with the tensor names to take
    from it (None: all): the shards ``model.safetensors.index.json`` maps, else ``model.safetensors``.
    Any other ``*.safetensors`` in the folder is an error (an older save beside a newer one)."""
    present = sorted(f.name for f in folder.glob("*.safetensors"))
    index = folder / _INDEX
    if os.path.lexists(index):
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise HarnessError(f"{index} has no weight_map (an object of tensor names to shard file names)")
        files: dict[str, list[str] | None] = {}
        for key, shard in weight_map.items():
            if not _plain_file_name(shard) or not shard.endswith(".safetensors"):
                raise HarnessError(f"{index} names shard {shard[:80]!r}, which is not a .safetensors file name "
                                   f"inside {folder} (no folders, no '..')")
            files.setdefault(shard, []).append(key)
        for shard in files:
            if shard not in present:
                raise HarnessError(f"{index} names shard {shard}, which is not in {folder}")
        named = f"{_INDEX} does not name it"
    else:
        if "model.safetensors" not in present:
            held = f" (it holds {present[0]})" if present else ""
            raise HarnessError(f"{folder} has no model.safetensors or {_INDEX}{held}; pytorch_model.bin is not "
                               "read (it is a pickle): convert it with transformers' "
                               "save_pretrained(safe_serialization=True)")
        files, named = {"model.safetensors": None}, "it is not model.safetensors and there is no " + _INDEX
    extra = [f for f in present if f not in files]
    if extra:
        raise HarnessError(f"{folder} holds {extra[0]}, which is not read ({named}): remove or move it, so that "
                           "the weights read are the ones the folder's format names")
    return files


def read_folder(path: str) -> tuple[dict, dict[str, Tensor]]:
    """``(config, tensors)`` of a Hugging Face model folder (``config.json`` + ``model.safetensors``,
    or the shards ``model.safetensors.index.json`` names), or of a bare ``.safetensors`` file
    (config ``{}``). Never unpickles. Exactly the files the format names are read; another
    ``*.safetensors`` in the folder, a missing shard or a missing tensor is a one-line error."""
    from harness.checkpoints import read_safetensors
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except OSError:
        raise HarnessError(f"Hugging Face checkpoint not found: {path} (a folder with config.json and "
                           "model.safetensors)") from None
    if stat.S_ISREG(mode):
        if p.suffix != ".safetensors":
            raise HarnessError(f"Hugging Face checkpoint {path} is neither a model folder (config.json and "
                               "model.safetensors) nor a .safetensors file")
        return {}, read_safetensors(p)
    if not stat.S_ISDIR(mode):
        raise HarnessError(f"Hugging Face checkpoint {path} is not a regular file or folder (a FIFO, socket or device)")
    if not os.path.lexists(p / "config.json"):
        raise HarnessError(f"{path} has no config.json: not a Hugging Face model folder")
    config = _read_json(p / "config.json")
    if not isinstance(config, dict):
        raise HarnessError(f"{p / 'config.json'} holds a JSON {type(config).__name__}, not an object "
                           "(a Hugging Face model config)")
    tensors: dict[str, Tensor] = {}
    for name, keys in _weight_files(p).items():
        found = read_safetensors(p / name)
        if keys is None:
            tensors.update(found)
            continue
        missing = [k for k in keys if k not in found]
        if missing:
            raise HarnessError(f"{p / name} lacks {missing[0]!r}, which {_INDEX} places in it "
                               f"({len(missing)} of {len(keys)} tensors missing)")
        tensors.update((k, found[k]) for k in keys)
    return config, tensors


def _number(value, positive_int: bool) -> bool:
    if isinstance(value, bool):
        return False
    if positive_int:
        return isinstance(value, int) and 0 < value <= 1 << 24
    return isinstance(value, (int, float)) and math.isfinite(value)


def _pattern_value(pattern: dict, module: str):
    """The value of the first key of a PEFT ``rank_pattern``/``alpha_pattern`` naming ``module``
    (the whole name or its dotted tail), or None."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return None


def lora_deltas(folder: Path, shapes: dict[str, tuple] | None = None) -> dict[str, Tensor]:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as weight
    differences ``{module.weight: ΔW}`` with ΔW = (α/r)·B·A (α/√r with rsLoRA; per-module ranks and
    alphas from ``rank_pattern``/``alpha_pattern``), keyed like the vision tower's weights.

    ``shapes`` (the base model's weight shapes by those keys), when given, is checked before any
    product is formed: a module the base lacks or of another shape is an error.
    """
    return {k: b @ a for k, (a, b) in lora_factors(folder, shapes).items()}


def lora_factors(folder: Path, shapes: dict[str, tuple] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The same adapter as its factors ``{module.weight: (A, (α/r)·B)}`` in fp32 (see :func:`lora_deltas`)."""
    from harness.checkpoints import read_safetensors
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise HarnessError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object (a PEFT adapter config)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise HarnessError(f"{folder} is a {str(cfg.get('peft_type'))[:40]!r} adapter; only LoRA adapters are task "
                           "vectors here")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise HarnessError(f"{folder}: LoRA adapters with {flag} are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not _number(r, True):
        raise HarnessError(f"{cfg_path}: r is {str(r)[:40]!r}; expected the LoRA rank, a positive integer")
    if not _number(alpha, False):
        raise HarnessError(f"{cfg_path}: lora_alpha is {str(alpha)[:40]!r}; expected a finite number")
    if cfg.get("use_rslora") not in (None, True, False):
        raise HarnessError(f"{cfg_path}: use_rslora is {str(cfg.get('use_rslora'))[:40]!r}; expected true or false")
    patterns = {}
    for field, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and _number(v, positive_int)
                                                    for k, v in pattern.items()):
            what = "positive integers" if positive_int else "finite numbers"
            raise HarnessError(f"{cfg_path}: {field} must be an object of module names to {what}")
        patterns[field] = pattern
    if not weights.exists():
        raise HarnessError(f"{folder} has no adapter_model.safetensors (adapter_model.bin is not read: it is a "
                           "pickle; save the adapter with safe_serialization=True)")
    tensors = read_safetensors(weights)
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        full = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        module = full.removeprefix("vision_model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        rank = _pattern_value(patterns["rank_pattern"], full)
        rank = r if rank is None else rank
        scale_alpha = _pattern_value(patterns["alpha_pattern"], full)
        scale_alpha = alpha if scale_alpha is None else scale_alpha
        if a.ndim != 2 or (b is not None and b.ndim != 2):
            raise HarnessError(f"{weights}: LoRA weights of {module} are not matrices (A {tuple(a.shape)}); only "
                               "LoRA on linear layers is supported")
        if b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise HarnessError(f"{folder}: LoRA rank mismatch at {module} (A {tuple(a.shape)}, "
                               f"B {tuple(b.shape) if b is not None else None}, r {rank})")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise HarnessError(f"{weights}: LoRA weights of {module} are {a.dtype}/{b.dtype}, not floating point")
        name = f"{module}.weight"
        if shapes is not None:
            if name not in shapes:
                raise HarnessError(f"{folder}: LoRA targets {[name]}, which the pre-trained image tower does not have")
            if (b.shape[0], a.shape[1]) != tuple(shapes[name]):
                raise HarnessError(f"{folder}: LoRA update of {name} has shape {(b.shape[0], a.shape[1])}, "
                                   f"expected {tuple(shapes[name])} (an adapter of a different base model)")
        scale = scale_alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
        out[name] = (a.float(), scale * b.float())
    if not out:
        raise HarnessError(f"{folder} holds no LoRA A/B weights")
    return out


def factors_to_open_clip(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """A vision tower's LoRA factors (:func:`lora_factors`, Hugging Face names) in open_clip's image
    tower names. The q/k/v projections of a layer become one factor pair of its ``in_proj_weight``:
    A the adapted projections' A stacked, B block-diagonal, so B·A is [ΔW_q; ΔW_k; ΔW_v] with 0 for
    a projection the adapter leaves alone. The projection head's factors are transposed (open_clip
    stores ``proj`` = Wᵀ, so ΔWᵀ = Aᵀ·Bᵀ)."""
    out, qkv = {}, {}
    for k, (a, b) in factors.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.weight", k)
        if k == "visual_projection.weight":
            out["proj"] = (b.T.contiguous(), a.T.contiguous())
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(m.group(1), {})["qkv".index(m.group(2)[-6])] = (a, b)
        elif m and m.group(2) in _LAYER:
            out[f"transformer.resblocks.{m.group(1)}.{_LAYER[m.group(2)]}.weight"] = (a, b)
        else:
            raise HarnessError(f"LoRA on {k!r} has no place in the factor form (adapters of the attention, MLP and "
                               "projection matrices do)")
    for n, parts in qkv.items():
        a = torch.cat([parts[i][0] for i in sorted(parts)])
        width = a.shape[1]  # q, k and v map the width onto itself
        b = torch.zeros(3 * width, a.shape[0])
        col = 0
        for i in sorted(parts):
            r = parts[i][0].shape[0]
            b[i * width:(i + 1) * width, col:col + r] = parts[i][1]
            col += r
        out[f"transformer.resblocks.{n}.attn.in_proj_weight"] = (a, b)
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


_VISION_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_hidden_layers")
_TEXT_FIELDS = ("max_position_embeddings", "vocab_size", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_hidden_layers")


def open_clip_config(config: dict, where: str = "config.json") -> dict:
    """The open_clip model config equivalent to a Hugging Face ``CLIPConfig``; every size it uses
    must be a positive integer (at most 2**24) and the widths divisible by the head counts.
    ``where`` (the config file) is named in errors."""
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise HarnessError(f"{where} describes a {str(kind)[:40]!r} model; the pre-trained model must be a "
                           "full CLIPModel (model_type 'clip', with the text tower for zero-shot heads)")
    towers = {}
    for tower, fields in (("vision_config", _VISION_FIELDS), ("text_config", _TEXT_FIELDS)):
        sub = config.get(tower)
        if not isinstance(sub, dict):
            raise HarnessError(f"{where}: {tower} is {'missing' if sub is None else 'a ' + type(sub).__name__}; "
                               "expected an object with the tower's sizes (a CLIPModel config)")
        for f in fields:
            if not _number(sub.get(f), True):
                raise HarnessError(f"{where}: {tower}.{f} is {str(sub.get(f))[:40]!r}; expected a positive integer "
                                   "(at most 2**24)")
        if sub["hidden_size"] % sub["num_attention_heads"]:
            raise HarnessError(f"{where}: {tower}.hidden_size {sub['hidden_size']} is not divisible by "
                               f"num_attention_heads {sub['num_attention_heads']}")
        act = sub.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise HarnessError(f"unsupported CLIP activation {str(act)[:40]!r} ({where}: {tower}.hidden_act); "
                               "quick_gelu or gelu")
        towers[tower] = sub
    v, t = towers["vision_config"], towers["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) > 1:
        raise HarnessError(f"unsupported CLIP activation {sorted(acts)} (the towers differ; {where}); quick_gelu or gelu")
    projection = config.get("projection_dim", 512)
    if not _number(projection, True):
        raise HarnessError(f"{where}: projection_dim is {str(projection)[:40]!r}; expected a positive integer")
    return {"embed_dim": projection, "quick_gelu": acts == {"quick_gelu"},
            "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                           "patch_size": v["patch_size"], "head_width": v["hidden_size"] // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
            "text_cfg": {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"],
                         "width": t["hidden_size"], "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"]}}


def _check_against_config(oc_cfg: dict, sd: dict[str, Tensor], folder: str) -> None:
    """The weights must be exactly those of the open_clip model ``oc_cfg`` describes (built on the
    meta device: no memory), so that a config that does not match its weights fails here."""
    import open_clip
    from harness.filecheck import one_line as _one_line
    try:
        with torch.device("meta"):
            model = open_clip.CLIP(**oc_cfg)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as e:
        raise HarnessError(f"{folder}/config.json describes no model open_clip can build: {_one_line(e)}") from None
    missing = [k for k in want if k not in sd]
    if missing:
        raise HarnessError(f"{folder} lacks weights such as {missing[:2]} of the model its config.json describes "
                           f"({len(missing)} of {len(want)} missing)")
    extra = [k for k in sd if k not in want]
    if extra:
        raise HarnessError(f"{folder} has weights such as {extra[:2]} that the model its config.json describes "
                           "does not have")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise HarnessError(f"{folder}: weight '{k}' has shape {tuple(sd[k].shape)}, but its config.json "
                               f"describes {shape}")
        if not sd[k].is_floating_point():
            raise HarnessError(f"{folder}: weight '{k}' is {sd[k].dtype}, expected floating point")
