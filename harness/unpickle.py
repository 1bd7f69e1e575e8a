"""Recover the weights from a whole pickled model without running any of its code, and check any
torch pickle before torch itself reads it.

The paper's and ``task_vectors``' checkpoints are ``torch.save(model)`` of a wrapper module.
:func:`recover_state_dict` reads them with the restricted unpickler of :mod:`harness.unpickler`
(every class it meets becomes an inert stub) and walks the stubs' ``_modules`` / ``_parameters``
/ ``_buffers`` into a state dict; :func:`check_pickle` runs the same unpickler as a dry run, so a
file is refused before ``torch.load(weights_only=True)`` could allocate what it claims. What a
file can make them allocate is bounded by its size (see :mod:`harness.unpickler`).
"""
from __future__ import annotations

import io
import pickle
import zipfile

from torch import Tensor

from harness.api import HarnessError
from harness.unpickler import (_LEGACY_MAGIC, MAX_DEPTH, Oversized, Refused, Stub, TooDeep, _Bounded,
                               _Unpickler)

__all__ = ["MAX_DEPTH", "check_pickle", "recover_state_dict"]


def _names(obj) -> list:
    """The ``(name, value)`` pairs of a mapping from a pickle; anything else holds none."""
    if not isinstance(obj, dict):
        return []
    return [(k, v) for k, v in obj.items() if isinstance(k, str)]


def _walk(root, out: dict) -> None:
    """Tensors under ``root`` into ``out`` by dotted name: a dict's values at the top, then the
    ``_parameters``/``_buffers``/``_modules`` of each module stub, depth first, each object once."""
    seen: set[int] = set()
    stack = [(root, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth > MAX_DEPTH:
            raise TooDeep(prefix)
        if isinstance(obj, Tensor):
            out.setdefault(prefix.rstrip("."), obj)
            continue
        if isinstance(obj, Stub):
            state = getattr(obj, "_stub_state", None)
            if not isinstance(state, dict):
                continue
            transient = state.get("_non_persistent_buffers_set")  # not in a state dict either
            transient = transient if isinstance(transient, (set, frozenset, list, tuple, dict)) else ()
            for part in ("_parameters", "_buffers"):
                for k, v in _names(state.get(part)):
                    if isinstance(v, Tensor) and not (part == "_buffers" and k in transient):
                        out.setdefault(prefix + k, v)
            for k, v in reversed(_names(state.get("_modules"))):
                stack.append((v, prefix + k + ".", depth + 1))
            continue
        if isinstance(obj, dict) and prefix == "":
            for k, v in reversed(list(obj.items())):
                if isinstance(v, (Tensor, Stub, dict)):
                    stack.append((v, f"{k}.", depth + 1))


def _refusal(path, e: BaseException) -> HarnessError | None:
    """The one-line error for a refusal raised while unpickling ``path``; None for other errors."""
    if isinstance(e, Refused):
        return HarnessError(f"checkpoint {path} was refused: it is a pickle that would run code ({e}); "
                            "nothing from it was run. Save it with safetensors or as a plain state dict")
    if isinstance(e, Oversized):
        return HarnessError(f"checkpoint {path} was refused: {str(e)[:200]}; nothing that large was allocated")
    if isinstance(e, TooDeep):
        return HarnessError(f"checkpoint {path} nests modules more than {MAX_DEPTH} levels deep (at "
                            f"{str(e)[:60]}...); not a model's state")
    return None


def check_pickle(path: str, size: int, unreadable: str) -> None:
    """Unpickle a torch file (zip or legacy format) without reading its storages or building its
    tensors, so that what it claims is checked before ``torch.load`` allocates it (see the module
    docstring). ``size`` is the file's size; errors that are not refusals start with ``unreadable``.

    Raises:
        HarnessError: a refusal (code, sizes, nesting) or a file that is not a torch pickle.
    """
    from harness.filecheck import one_line as _one_line
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    return  # torch's reader says what is wrong
                prefix = names[0].rsplit("/", 1)[0] if "/" in names[0] else ""
                data = archive.read(names[0])
                _Unpickler(io.BytesIO(data), archive, prefix, size, len(data) + 4096, dry=True).load()
            return
        with open(path, "rb") as f:  # the legacy format: magic number, protocol, system info, then the data
            bounded = io.BufferedReader(_Bounded(f, size))
            if _Unpickler(bounded, None, "", size, 64, dry=True).load() != _LEGACY_MAGIC:
                raise pickle.UnpicklingError("neither a zip nor torch's legacy format (no magic number)")
            for _ in range(2):
                _Unpickler(bounded, None, "", size, 4096, dry=True).load()
            _Unpickler(bounded, None, "", size, size + 4096, dry=True).load()
    except Exception as e:
        refusal = _refusal(path, e)
        if refusal is not None:
            raise refusal from None
        if isinstance(e, RecursionError):
            raise HarnessError(f"{unreadable}: objects nested too deep") from None
        raise HarnessError(f"{unreadable}: {type(e).__name__}: {_one_line(e)}") from None


def recover_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a pickled module (or of a dict of tensors), by name, with no code run.

    Raises:
        HarnessError: not torch's zip format, no tensor could be recovered, or the file claims more
            than its size allows (see the module docstring).
    """
    from harness.filecheck import check_regular_file, check_zip_bounds, one_line as _one_line
    size = check_regular_file(path)
    if not zipfile.is_zipfile(path):
        raise HarnessError(f"checkpoint {path} is a pickle in torch's legacy (pre-1.6) format, which the safe "
                           "reader does not open; re-save it with a current torch (torch.save(model.state_dict()))")
    check_zip_bounds(str(path), size)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise HarnessError(f"checkpoint {path} is a zip without a torch data.pkl")
            prefix = names[0].rsplit("/", 1)[0] if "/" in names[0] else ""
            data = archive.read(names[0])
            obj = _Unpickler(io.BytesIO(data), archive, prefix, size, len(data) + 4096).load()
            out: dict[str, Tensor] = {}
            _walk(obj, out)
    except HarnessError:
        raise
    except Exception as e:
        refusal = _refusal(path, e)
        if refusal is not None:
            raise refusal from None
        if isinstance(e, RecursionError):
            raise HarnessError(f"checkpoint {path} could not be read safely: objects nested too deep") from None
        raise HarnessError(f"checkpoint {path} could not be read safely: {type(e).__name__}: {_one_line(e)}") from None
    if not out:
        raise HarnessError(f"checkpoint {path} holds no recoverable weights (a pickle that would run code, "
                           "with no module state in it); nothing from it was run")
    return {k.rstrip("."): v for k, v in out.items()}
