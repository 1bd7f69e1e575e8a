"""Recover the weights from a whole pickled model without running any of its code.

The paper's and ``task_vectors``' checkpoints are ``torch.save(model)`` of a wrapper module (an
``ImageEncoder`` holding an open_clip ``CLIP`` and its preprocessing transforms). Unpickling them
normally imports and calls those classes — code from the file. This unpickler rebuilds only
tensors and storages (through torch's own rebuild functions) and plain containers; every other
class it meets becomes an inert :class:`Stub` that merely keeps its pickled state. Walking the
stubs' ``_modules`` / ``_parameters`` / ``_buffers`` then gives the state dict (``model.visual.*``
for the paper's files). Nothing named in the file is imported or called beyond that allow-list:
a pickle that tries to call ``os.system`` gets a stub instead, and yields no tensors.

Only torch's zip format (the default since torch 1.6) is read, with old-style typed storages
(``torch.FloatStorage``, ...) as older files name them.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import torch
from torch import Tensor

from harness.api import HarnessError

_STORAGE_DTYPES = {f"{n}Storage": getattr(torch, d) for n, d in (
    ("Float", "float32"), ("Double", "float64"), ("Half", "float16"), ("BFloat16", "bfloat16"),
    ("Long", "int64"), ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"),
    ("Bool", "bool"), ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128"))}
# What may be rebuilt for real: tensors from storages, and plain containers.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
}


# Modules whose callables exist to run code or touch the system: a pickle naming one is refused
# outright (it would be inert here too, but its intent is plain and the user should know).
_DANGEROUS = {"os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket", "importlib",
              "runpy", "pty", "code", "pickle", "marshal", "ctypes", "webbrowser", "pathlib", "io", "tempfile"}


# Plain data types a module's state holds (e.g. the set of non-persistent buffer names).
_SAFE_BUILTINS = {n: getattr(__builtins__, n) if hasattr(__builtins__, n) else __builtins__[n]
                  for n in ("set", "frozenset", "dict", "list", "tuple", "slice", "complex", "bytearray",
                            "bytes", "str", "int", "float", "bool", "range", "object")}


class Refused(Exception):
    """The pickle names a callable that runs code (nothing was called)."""


class Stub:
    """An inert stand-in for any class the file names: it is created without running anything and
    keeps the state the pickle gives it (``_stub_name`` says which class it stands for)."""

    _stub_name = "?"

    def __init__(self, *args, **kwargs):
        self._stub_args = args

    def __setstate__(self, state):
        self._stub_state = state

    def __call__(self, *args, **kwargs):  # a "function" the file wants called: do nothing
        return Stub()


class _StorageType:
    """An old-style typed storage class named in a persistent id: only its dtype matters."""

    def __init__(self, dtype):
        self.dtype = dtype


def _reconstructor(cls, base, state=None):
    """``copyreg._reconstructor``: how ``torch.save(module)`` pickles objects; only stubs come out."""
    return cls() if isinstance(cls, type) and issubclass(cls, Stub) else Stub()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module.split(".")[0] in _DANGEROUS:
            raise Refused(f"{module}.{name}")
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        return type(name, (Stub,), {"_stub_name": f"{module}.{name}"})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else storage_type
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a storage of an unknown type")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def _walk(obj, prefix: str, out: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        out.setdefault(prefix.rstrip("."), obj)
        return
    if isinstance(obj, Stub):
        state = getattr(obj, "_stub_state", None)
        if isinstance(state, dict):
            transient = state.get("_non_persistent_buffers_set") or set()  # not in a state dict either
            for part in ("_parameters", "_buffers"):
                for k, v in (state.get(part) or {}).items():
                    if isinstance(v, Tensor) and not (part == "_buffers" and k in transient):
                        out.setdefault(prefix + k, v)
            for k, v in (state.get("_modules") or {}).items():
                _walk(v, prefix + k + ".", out, seen)
        return
    if isinstance(obj, dict) and prefix == "":
        for k, v in obj.items():
            if isinstance(v, (Tensor, Stub, dict)):
                _walk(v, f"{k}.", out, seen)


def recover_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a pickled module (or of a dict of tensors), by name, with no code run.

    Raises:
        HarnessError: not torch's zip format, or no tensor could be recovered.
    """
    if not zipfile.is_zipfile(path):
        raise HarnessError(f"checkpoint {path} is a pickle in torch's legacy (pre-1.6) format, which the safe "
                           "reader does not open; re-save it with a current torch (torch.save(model.state_dict()))")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise HarnessError(f"checkpoint {path} is a zip without a torch data.pkl")
        prefix = names[0].rsplit("/", 1)[0] if "/" in names[0] else ""
        try:
            obj = _Unpickler(archive.read(names[0]), archive, prefix).load()
        except Refused as e:
            raise HarnessError(f"checkpoint {path} was refused: it is a pickle that would run code ({e}); "
                               "nothing from it was run. Save it with safetensors or as a plain state dict") from None
        except Exception as e:
            raise HarnessError(f"checkpoint {path} could not be read safely: {type(e).__name__}: {e}") from None
    out: dict[str, Tensor] = {}
    _walk(obj, "", out, set())
    if not out:
        raise HarnessError(f"checkpoint {path} holds no recoverable weights (a pickle that would run code, "
                           "with no module state in it); nothing from it was run")
    return {k.rstrip("."): v for k, v in out.items()}
