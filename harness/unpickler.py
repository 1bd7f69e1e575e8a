"""The restricted unpickler behind :mod:`harness.unpickle`: it rebuilds tensors, storages and plain
containers from a torch pickle and nothing else.

The paper's and ``task_vectors``' checkpoints are ``torch.save(model)`` of a wrapper module (an
``ImageEncoder`` holding an open_clip ``CLIP`` and its preprocessing transforms). Unpickling them
normally imports and calls those classes — code from the file. This unpickler rebuilds only
tensors and storages (through torch's own rebuild functions) and plain containers; every other
class it meets becomes an inert :class:`Stub` that merely keeps its pickled state. Walking the
stubs' ``_modules`` / ``_parameters`` / ``_buffers`` then gives the state dict (``model.visual.*``
for the paper's files). Nothing named in the file is imported or called beyond that allow-list:
a pickle that tries to call ``os.system`` gets a stub instead, and yields no tensors.

Only torch's zip format (the default since torch 1.6) is recovered from, with old-style typed
storages (``torch.FloatStorage``, ...) as older files name them.

What a file can make these readers allocate is bounded by the file's size:

- a zip's members may claim at most ``_MAX_EXPANSION`` times its size (plus ``_SLACK_BYTES``, see
  :mod:`harness.checkpoints`), and a legacy (pre-zip) file's storages at most its size;
- the builtins a pickle may call take no sizes (``bytes(n)``, ``bytearray(n)`` and ``range`` are
  refused) and, with ``OrderedDict`` and ``torch.Size``, copy at most as many elements in total
  as the pickle has bytes (more would let a small pickle copy one big list many times);
- any other callable a pickle names (a stub here, possibly a real constructor in torch's own
  ``weights_only`` reader, such as ``torch.Tensor(n)``) is charged the integers and lengths of its
  arguments, which may total at most ``_MAX_EXPANSION`` times the file's size plus ``_SLACK_BYTES``;
- every tensor must lie inside its storage and have no more elements than it, and all tensors
  together view at most ``_MAX_EXPANSION`` times their storages' bytes (plus ``_SLACK_BYTES``);
- module trees nested deeper than :data:`MAX_DEPTH` are refused.

:func:`harness.unpickle.check_pickle` runs this unpickler without reading any storage (a dry run) so that a
file is refused before ``torch.load(weights_only=True)`` — whose allow-list includes
``bytearray`` and ``torch.Tensor`` — could allocate what it claims.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from functools import partial
from typing import Any

import torch
from torch import Tensor


MAX_DEPTH = 200  # module nesting refused beyond this (real models nest about ten deep)

_STORAGE_DTYPES = {f"{n}Storage": getattr(torch, d) for n, d in (
    ("Float", "float32"), ("Double", "float64"), ("Half", "float16"), ("BFloat16", "bfloat16"),
    ("Long", "int64"), ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"),
    ("Bool", "bool"), ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128"))}

# Modules whose callables exist to run code or touch the system: a pickle naming one is refused
# outright (it would be inert here too, but its intent is plain and the user should know).
_DANGEROUS = {"os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket", "importlib",
              "runpy", "pty", "code", "pickle", "marshal", "ctypes", "webbrowser", "pathlib", "io", "tempfile"}

# Plain data types a module's state holds (e.g. the set of non-persistent buffer names), callable
# from a pickle only with the arguments pickling produces: containers from a container the pickle
# built, bytes from a string (protocol 2's encoding), scalars from scalars. Nothing takes a size.
_CONTAINERS = {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}
_BYTES = {"bytes": bytes, "bytearray": bytearray}
_SCALARS = {"str": str, "int": int, "float": float, "bool": bool, "complex": complex, "slice": slice}
_SAFE_BUILTINS = set(_CONTAINERS) | set(_BYTES) | set(_SCALARS) | {"object"}
_SCALAR_TYPES = (str, int, float, bool, type(None))
_COPYABLE = (list, tuple, set, frozenset, dict)
# The magic number torch's legacy (pre-zip) format starts with.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Refused(Exception):
    """The pickle names a callable that runs code (nothing was called)."""


class Oversized(Exception):
    """The pickle claims more memory than its file's size allows (nothing that large was allocated)."""


class TooDeep(Exception):
    """The module tree nests deeper than MAX_DEPTH."""


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


class _LazyStorage:
    """A storage in a dry run: its dtype and size, none of its bytes."""

    def __init__(self, dtype: torch.dtype, nbytes: int):
        self.dtype, self.nbytes = dtype, nbytes


def _reconstructor(cls, base, state=None):
    """``copyreg._reconstructor``: how ``torch.save(module)`` pickles objects; only stubs come out."""
    return cls() if isinstance(cls, type) and issubclass(cls, Stub) else Stub()


def _item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class _Bounded(io.RawIOBase):
    """A file read no further than ``limit`` bytes, whatever size a read asks for (a pickle's
    length fields cannot make a read allocate more than the file holds)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        data = self.f.read(n)
        buf[:len(data)] = data
        self.left -= len(data)
        return len(data)

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self, limit=-1):
        limit = self.left if limit is None or limit < 0 else min(limit, self.left)
        data = self.f.readline(limit)
        self.left -= len(data)
        return data


class _Unpickler(pickle.Unpickler):
    """The restricted unpickler. ``archive``/``prefix``: the torch zip the storages are read from
    (None: the legacy format, storages sized by their persistent ids). ``dry``: read no storage,
    build no tensor (placeholders), only check what the pickle claims. ``file_size``: the size of
    the whole file, which bounds the sizes the pickle may ask for."""

    def __init__(self, file, archive: zipfile.ZipFile | None, prefix: str, file_size: int, copy_budget: int,
                 dry: bool = False):
        super().__init__(file)
        from harness.filecheck import _MAX_EXPANSION, _SLACK_BYTES
        self.archive, self.prefix, self.dry, self.file_size = archive, prefix, dry, file_size
        self.storages: dict = {}
        self.stub_classes: dict = {}
        self.copies_left = copy_budget  # elements the builtins may still copy
        self.sizes_left = _MAX_EXPANSION * file_size + _SLACK_BYTES  # integers other callables may still ask for
        self.viewed = self.stored = 0  # bytes viewed by the tensors / held by the storages so far
        self.expansion, self.slack = _MAX_EXPANSION, _SLACK_BYTES

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return partial(self._builtin, name)
        if module.split(".")[0] in _DANGEROUS:
            raise Refused(f"{module}.{name}")
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return self._rebuild_parameter
        if (module, name) == ("torch", "Size"):
            return partial(self._builtin, "tuple")
        if (module, name) == ("collections", "OrderedDict"):
            return partial(self._copy, collections.OrderedDict, "OrderedDict")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if (module, name) not in self.stub_classes:
            charge = partial(self._charge, f"{module}.{name}")
            self.stub_classes[(module, name)] = type(name, (Stub,), {
                "_stub_name": f"{module}.{name}", "__new__": lambda cls, *a, **k: charge(a, k) or object.__new__(cls),
                "__call__": lambda obj, *a, **k: charge(a, k) or Stub()})
        return self.stub_classes[(module, name)]

    # --- what calls may ask for ---------------------------------------------------------------------

    def _spend(self, n: int) -> None:
        self.copies_left -= n
        if self.copies_left < 0:
            raise Oversized("its builtins copy more elements than the pickle has bytes")

    def _charge(self, name: str, args: tuple, kwargs: dict) -> None:
        """Charge a call of ``name``, a callable this reader does not model (torch's reader may call
        the real one): the integers and lengths among its arguments, each object once. Tensor and
        storage classes (``torch.Tensor(n, m)`` allocates n·m elements) may not be called with any."""
        if (args or kwargs) and name.startswith("torch") and name.endswith(("Tensor", "Storage")):
            raise Oversized(f"it calls {name} with arguments (a size to allocate)")
        seen, todo = set(), [args, kwargs]
        while todo:
            obj = todo.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, bool) or obj is None:
                continue
            if isinstance(obj, int):
                self.sizes_left -= min(abs(obj), 1 << 62)
            elif isinstance(obj, (str, bytes, bytearray)):
                self._spend(len(obj))
            elif isinstance(obj, _COPYABLE):
                self._spend(len(obj))
                todo.extend(obj)
                if isinstance(obj, dict):
                    todo.extend(obj.values())
            if self.sizes_left < 0:
                raise Oversized(f"it asks for sizes adding up to more than {self.expansion}x the file's "
                                f"{self.file_size} bytes")

    def _copy(self, make, name: str, *args, **kwargs):
        if kwargs or len(args) > 1 or (args and not isinstance(args[0], _COPYABLE)):
            raise pickle.UnpicklingError(f"{name} of a {type(args[0]).__name__ if args else 'keyword'}; "
                                         "only of a container")
        self._spend(len(args[0]) if args else 0)
        return make(*args)

    def _builtin(self, name: str, *args, **kwargs):
        """A builtin called with only the arguments pickling produces (see _SAFE_BUILTINS)."""
        if kwargs or len(args) > 3:
            raise pickle.UnpicklingError(f"builtins.{name} called with unexpected arguments")
        if name == "object":
            if args:
                raise pickle.UnpicklingError("builtins.object called with arguments")
            return object()
        if name in _CONTAINERS:
            return self._copy(_CONTAINERS[name], f"builtins.{name}", *args)
        if name in _BYTES:  # protocol 2 writes bytearray(str, "latin-1"); bytearray(n) would allocate n bytes
            if args and not isinstance(args[0], (str, bytes)) or not all(isinstance(a, str) for a in args[1:]):
                raise Oversized(f"it calls builtins.{name} with a size or a non-string argument")
            self._spend(len(args[0]) if args else 0)
            return _BYTES[name](*args)
        if not all(isinstance(a, _SCALAR_TYPES) for a in args):
            raise pickle.UnpicklingError(f"builtins.{name} of a non-scalar argument")
        self._spend(sum(len(a) for a in args if isinstance(a, str)))
        return _SCALARS[name](*args)

    # --- tensors and storages ---------------------------------------------------------------------

    def _rebuild_tensor(self, storage, offset, size, stride, *rest):
        """``torch._utils._rebuild_tensor_v2`` (or v1) once the view is known to fit its storage."""
        if isinstance(storage, _LazyStorage):
            dtype, nbytes = storage.dtype, storage.nbytes
        elif isinstance(storage, torch.storage.TypedStorage):
            dtype, nbytes = storage.dtype, storage._untyped_storage.nbytes()
        else:
            raise pickle.UnpicklingError(f"a tensor over a {type(storage).__name__}, not a storage")
        dims = (tuple(size) if isinstance(size, (tuple, list)) else None,
                tuple(stride) if isinstance(stride, (tuple, list)) else None)
        if (dims[0] is None or dims[1] is None or len(dims[0]) != len(dims[1]) or isinstance(offset, bool)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in dims[0] + dims[1] + (offset,))):
            raise pickle.UnpicklingError("a tensor view whose size, stride or offset is not a tuple of "
                                         "non-negative integers of matching length")
        numel = math.prod(dims[0])
        item = _item_size(dtype)
        capacity = nbytes // item
        if numel and (offset + sum((n - 1) * s for n, s in zip(*dims)) >= capacity or numel > capacity):
            raise Oversized(f"a tensor of size {dims[0]}, stride {dims[1]} and offset {offset} does not fit "
                            f"its storage of {capacity} elements")
        self.viewed += numel * item
        if self.viewed > self.expansion * self.stored + self.slack:
            raise Oversized(f"its tensors view {self.viewed} bytes of storages that hold {self.stored}")
        if self.dry:
            return Stub()
        return torch._utils._rebuild_tensor_v2(storage, offset, torch.Size(dims[0]), dims[1], False,
                                               collections.OrderedDict())

    def _rebuild_parameter(self, data, requires_grad=False, *rest):
        """``torch._utils._rebuild_parameter`` of a tensor rebuilt here (anything else is refused)."""
        if self.dry:
            return Stub()
        if not isinstance(data, Tensor):
            raise pickle.UnpicklingError(f"a parameter of a {type(data).__name__}, not a tensor")
        return torch.nn.Parameter(data, requires_grad is True and (data.is_floating_point() or data.is_complex()))

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise pickle.UnpicklingError(f"a persistent id that is a {type(pid).__name__}, not a storage")
        kind, storage_type, key, _location, numel = pid[:5]
        if kind == "module" and self.archive is None:  # legacy format: the source of a pickled module class
            return Stub()
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind[:40] if isinstance(kind, str) else type(kind).__name__!r}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else storage_type
        if not isinstance(dtype, torch.dtype):
            if not self.dry:
                raise pickle.UnpicklingError("a storage of an unknown type")
            dtype = torch.uint8  # e.g. torch.UntypedStorage: torch's reader decides
        if not isinstance(key, str):
            raise pickle.UnpicklingError(f"a storage key that is a {type(key).__name__}, not a string")
        if key in self.storages:
            return self.storages[key]
        item = _item_size(dtype)
        if self.archive is None:  # legacy: torch allocates numel elements before reading them from the file
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise pickle.UnpicklingError("a storage whose size is not a non-negative integer")
            nbytes = numel * item
            if self.stored + nbytes > self.file_size:
                raise Oversized(f"its storages claim {self.stored + nbytes} bytes, more than the file's "
                                f"{self.file_size}")
            storage = _LazyStorage(dtype, nbytes)
        elif self.dry:
            try:
                nbytes = self.archive.getinfo(f"{self.prefix}/data/{key}").file_size
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key[:40]} is not in the archive") from None
            storage = _LazyStorage(dtype, nbytes)
        else:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            nbytes = len(raw)
            if nbytes % item:
                raise pickle.UnpicklingError(f"storage {key[:40]} has {nbytes} bytes, not a whole number of {dtype}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        self.stored += nbytes
        self.storages[key] = storage
        return storage
