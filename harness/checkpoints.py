"""Loading open_clip models and fine-tuned checkpoints into task vectors, without running code from files.

Checkpoints are read with ``safetensors`` or with ``torch.load(weights_only=True)``; a pickle that
would need to import or call arbitrary objects is refused, never executed. Every failure a user can
fix is a one-line :class:`~harness.api.HarnessError` naming the file (and the block, when one is at fault).

Example:
    >>> model, preprocess, tokenizer = build_clip("ViT-B-32", "/ckpt/zeroshot.safetensors")
    >>> base, tvs = clip_task_vectors(model, ["/ckpt/mnist.pt", "/ckpt/svhn.safetensors"])
    >>> comp = Composition(base, tvs, ["mnist", "svhn"])
"""
from __future__ import annotations

import difflib
import os
import struct
import sys
import pickle
import re
import secrets
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from harness.api import HarnessError
from harness.filecheck import _MAX_EXPANSION, _SLACK_BYTES, check_regular_file, check_zip_bounds  # noqa: F401
from harness.filecheck import one_line as _one_line

LOCAL_DIR = "local-dir:"

# Messages of torch's weights-only unpickler that mean "this pickle wants to import or call
# something", as opposed to a damaged file (random bytes give e.g. "Unsupported operand 11").
# Operands 105/111/147 are INST/OBJ/STACK_GLOBAL, the opcodes that construct arbitrary objects.
_CODE_PICKLE = re.compile(r"GLOBAL|unrecognized function|Can only (create new object|build)"
                          r"|Unsupported operand (105|111|147)\b")
class WriteFailed(HarnessError):
    """A file could not be written (read-only folder, full disk, ...); ``reason`` says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = str(path), reason


def _safetensors_problem(path: str, size: int) -> str | None:
    """Why ``path`` (``size`` bytes) cannot be a safetensors file, judged from its 8-byte header
    length; None when the length fits the file."""
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length (truncated?)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        return f"its header claims {n} bytes but only {size - 8} follow (truncated, or not safetensors)"
    return None


def read_safetensors(path: str | os.PathLike, unreadable: str | None = None) -> dict[str, Tensor]:
    """The tensors of a regular ``.safetensors`` file (never unpickles), or a one-line error that
    starts with ``unreadable`` (default: ``"<path> is not a readable safetensors file"``)."""
    from safetensors.torch import load_file
    path = str(path)
    size = check_regular_file(path)
    unreadable = unreadable or f"{path} is not a readable safetensors file"
    problem = _safetensors_problem(path, size)
    if problem:
        raise HarnessError(f"{unreadable}: {problem}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise HarnessError(f"{unreadable}: {_one_line(e)}") from None


def check_tensor_sizes(sd: dict, path: str) -> None:
    """Every tensor of ``sd`` is dense, lies inside its storage, has no more elements than it, and
    all of them together view at most ``_MAX_EXPANSION`` times their storages' bytes (plus
    ``_SLACK_BYTES``): what a file holds cannot grow when made contiguous or written out."""
    viewed, stored = 0, {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            continue
        if v.layout != torch.strided:
            raise HarnessError(f"checkpoint {path}: entry '{k}' is a {v.layout} tensor; only dense tensors "
                               "are weights here")
        storage = v.untyped_storage()
        item = v.element_size()
        capacity = storage.nbytes() // item if item else 0
        if v.numel():
            last = v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride()))
            if min(v.stride(), default=0) < 0 or v.storage_offset() < 0 or last >= capacity or v.numel() > capacity:
                raise HarnessError(f"checkpoint {path}: entry '{k}' (shape {tuple(v.shape)}, stride {v.stride()}, "
                                   f"offset {v.storage_offset()}) does not fit its storage of {capacity} elements")
        viewed += v.numel() * item
        stored[storage.data_ptr()] = max(stored.get(storage.data_ptr(), 0), storage.nbytes())
    if viewed > _MAX_EXPANSION * sum(stored.values()) + _SLACK_BYTES:
        raise HarnessError(f"checkpoint {path} was refused: its tensors view {viewed} bytes of storages that hold "
                           f"{sum(stored.values())} (the same storage many times over)")


def is_pickled_module(path: str) -> bool:
    """Whether a torch file is a whole pickled model (weights recovered by :mod:`harness.unpickle`)
    rather than a plain state dict."""
    if str(path).endswith(".safetensors"):
        return False
    try:
        from harness.unpickle import check_pickle
        size = check_regular_file(path)
        check_zip_bounds(str(path), size)
        check_pickle(str(path), size, "unreadable")
        torch.load(path, map_location="cpu", weights_only=True)
        return False
    except pickle.UnpicklingError as e:
        return bool(_CODE_PICKLE.search(str(e)))
    except Exception:
        return False


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never executing code from it.

    Torch files (``.pt``, ``.pth``, ``.bin``, anything not ``.safetensors``) are read with
    ``torch.load(map_location="cpu", weights_only=True)``. A dict wrapping the state dict under
    ``"state_dict"`` or ``"model"`` is unwrapped, and a DataParallel ``module.`` prefix is removed.

    Args:
        path: the checkpoint file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        HarnessError: missing, unreadable or unsafe file, or content that is not a state dict.
    """
    path = str(path)
    size = check_regular_file(path)
    unreadable = f"checkpoint {path} is not a readable safetensors/torch state dict"
    if path.endswith(".safetensors"):
        obj = read_safetensors(path, unreadable)
    else:
        from harness.unpickle import check_pickle
        check_zip_bounds(path, size)
        check_pickle(path, size, unreadable)  # what the file claims, before torch allocates it
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not _CODE_PICKLE.search(str(e)):
                raise HarnessError(f"{unreadable}: {_one_line(e)}") from None
            # A whole pickled model (the paper's checkpoints): recover its weights without running it.
            from harness.unpickle import recover_state_dict
            obj = recover_state_dict(path)
            if all(k.startswith("model.") for k in obj):  # the paper's ImageEncoder wraps the CLIP as .model
                obj = {k[len("model."):]: v for k, v in obj.items()}
        except HarnessError:
            raise
        except Exception as e:
            raise HarnessError(f"{unreadable}: {_one_line(e)}") from None

    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise HarnessError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict "
                           "(a dict of tensor names to tensors)")
    if not obj:
        raise HarnessError(f"checkpoint {path} holds an empty state dict")
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise HarnessError(f"checkpoint {path}: entry '{k}' is a {type(v).__name__}, not a tensor; "
                               "expected a state dict (a dict of tensor names to tensors)")
    check_tensor_sizes(obj, path)
    if all(str(k).startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} for another format or none)."""
    path = str(path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable file is reported where its tensors are read
        return {}


def save_state_dict(sd: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``sd`` as safetensors (contiguous CPU tensors; shared storage is copied, which
    safetensors requires), with string ``metadata`` in its header. Parent directories are created.
    The file is written under a temporary name beside ``path`` and renamed onto it when complete,
    so ``path`` is never half-written.

    Raises:
        WriteFailed: the folder is read-only, the disk is full, ... (nothing is left at ``path``'s
            temporary name).
    """
    from safetensors.torch import save_file
    out, seen = {}, set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise HarnessError(f"cannot save entry '{k}': it is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise WriteFailed(path, e.strerror or _one_line(e)) from None
    except Exception as e:  # safetensors' own error type for a failed write
        raise WriteFailed(path, _one_line(e)) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def build_clip(model_name: str, pretrained: str | None = None):
    """Build an open_clip model, its inference transform and its tokenizer, offline when possible.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``, including configs added
            with ``open_clip.add_model_config``). Ignored for ``local-dir:`` (the folder's config wins).
        pretrained: ``None`` (random init, offline), a local checkpoint file (read safely, see
            :func:`load_state_dict`), ``"local-dir:DIR"`` (an open_clip folder with
            ``open_clip_config.json`` and weights), or a pretrained tag (needs the network unless cached).

    Returns:
        ``(model, preprocess, tokenizer)``; the model is in eval mode on the CPU, ``preprocess`` is
        open_clip's validation transform.
    """
    import open_clip

    pretrained = pretrained or None
    if pretrained is not None and pretrained.startswith(LOCAL_DIR):
        folder = pretrained[len(LOCAL_DIR):]
        if not os.path.isdir(folder):
            raise HarnessError(f"model folder not found: {folder} (from {pretrained!r})")
        # Validate pickled weights with our strict loader before open_clip reads the folder.
        for f in sorted(Path(folder).glob("*")):
            if f.suffix in (".bin", ".pth", ".pt"):
                load_state_dict(f)
        source, name_arg, pre_arg = pretrained, pretrained, None
    else:
        known = open_clip.list_models()
        if model_name.replace("/", "-") not in known:
            close = difflib.get_close_matches(model_name, known, n=3)
            common = [n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "convnext_base") if n in known]
            few = ", ".join(dict.fromkeys(close + common))
            raise HarnessError(f"unknown open_clip model {model_name!r}; valid names include {few} "
                               f"({len(known)} in open_clip.list_models())")
        name_arg, pre_arg = model_name, pretrained
        source = pretrained or "random init"
        recovered = None
        if pretrained is not None and os.path.exists(pretrained):
            sd = load_state_dict(pretrained)
            if is_pickled_module(pretrained):  # a whole pickled model: open_clip would unpickle it; we don't
                recovered, pre_arg = sd, None
        elif pretrained is not None:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags and (os.sep in pretrained or Path(pretrained).suffix):
                raise HarnessError(f"checkpoint not found: {pretrained}")
            if pretrained not in tags:
                raise HarnessError(f"pretrained {pretrained!r} is neither a file nor a known tag of "
                                   f"{model_name} (tags: {', '.join(tags[:6]) or 'none'}); pass a local file")
    try:
        # pretrained_text=False: never fetch default text-tower weights from a hub as a side effect.
        model, _, preprocess = open_clip.create_model_and_transforms(
            name_arg, pretrained=pre_arg, weights_only=True, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name_arg)
        if pretrained is not None and not pretrained.startswith(LOCAL_DIR) and recovered is not None:
            _load_recovered(model, recovered, pretrained)
    except HarnessError:
        raise
    except Exception as e:
        if pre_arg is not None and not os.path.exists(pre_arg):
            raise HarnessError(f"pretrained tag {pre_arg!r} of {model_name} could not be loaded offline; "
                               "pass a local checkpoint file instead") from None
        raise HarnessError(f"could not build open_clip {model_name} from {source}: {_one_line(e)}") from None
    model.eval()
    return model, preprocess, tokenizer


def _load_recovered(model: nn.Module, sd: dict[str, Tensor], path: str) -> None:
    """Weights recovered from a pickled model into ``model``: every block must be there, shaped alike."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise HarnessError(f"checkpoint {path} lacks blocks of this model such as {missing[:3]} "
                           f"({len(missing)} of {len(own)} missing; a different architecture?)")
    wrong = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise HarnessError(f"checkpoint {path}: block '{wrong[0]}' has shape {tuple(sd[wrong[0]].shape)}, "
                           f"expected {tuple(own[wrong[0]].shape)}")
    model.load_state_dict({k: sd[k] for k in own})


def clip_task_vectors(model: nn.Module, checkpoint_paths: Sequence[str], prefix: str = "visual.",
                      dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Task vectors of fine-tuned image encoders relative to ``model``'s image encoder.

    Each checkpoint may be a full CLIP state dict (keys ``visual.…``) or an image-encoder-only state
    dict (keys relative to ``model.visual``); the form is detected per file. Keys outside the image
    encoder (the text tower, ``logit_scale``) are ignored.

    Args:
        model: the pre-trained CLIP model (θ_0).
        checkpoint_paths: one fine-tuned checkpoint per task.
        prefix: where the image encoder sits in the full model.
        dtype: dtype of the returned task vectors (fp16 halves their memory before composing).

    Returns:
        ``(base, task_vectors)``: ``base`` maps the encoder's floating entries (keys relative to the
        encoder) to the model's own tensors (no copy); one task vector dict per checkpoint.

    Raises:
        HarnessError: a file cannot be read, or a block is missing or has the wrong shape.
    """
    encoder = model.get_submodule(prefix.rstrip(".")) if prefix else model
    base = {k: v for k, v in encoder.state_dict().items() if v.is_floating_point()}
    tvs = []
    for path in checkpoint_paths:
        sd = load_state_dict(path)
        with_prefix = sum(prefix + k in sd for k in base)
        bare = sum(k in sd for k in base)
        lead = prefix if with_prefix > bare else ""
        if max(with_prefix, bare) == 0:
            first = next(iter(base))
            raise HarnessError(f"checkpoint {path} holds none of the image encoder's {len(base)} blocks "
                               f"(expected keys like '{prefix}{first}' or '{first}')")
        known = set(model.state_dict()) if lead else set(encoder.state_dict())
        unknown = sorted(k for k in sd if k not in known)
        if unknown:
            print(f"warning: checkpoint {path} has {len(unknown)} key(s) this model does not have, such as "
                  f"{unknown[:3]}; they are ignored", file=sys.stderr)
        tau = {}
        for k, b in base.items():
            v = sd.get(lead + k)
            if v is None:
                raise HarnessError(f"checkpoint {path}: block '{k}' is missing "
                                   f"({max(with_prefix, bare)} of {len(base)} image-encoder blocks present)")
            if tuple(v.shape) != tuple(b.shape):
                raise HarnessError(f"checkpoint {path}: block '{k}' has shape {tuple(v.shape)}, "
                                   f"expected {tuple(b.shape)}")
            if not v.is_floating_point():
                raise HarnessError(f"checkpoint {path}: block '{k}' is {v.dtype}, expected floating point")
            tau[k] = (v.float() - b.float()).to(dtype)
        del sd
        tvs.append(tau)
    return base, tvs
