"""Publishing: a process writes its own tensors (engine-shaped weights: fused, quantized, sharded,
whatever the engine runs) into server memory under a key; other processes attach them zero-copy.

Flow (see :meth:`companion.Client.publish`, :meth:`~companion.Client.begin_publish` and
:meth:`~companion.Client.attach_or_publish`): claim the key (the publication's own connection is
the key's writer lock) -> declare the table (the server allocates one slab, mapped writable into
this process) -> write the tensors -> commit (the server digests and seals the slab; new attaches
get this generation). Closing the publication, or the process dying, before commit aborts and
frees the memory.

Memory and lifetime
-------------------
The writable tensors a :class:`Publication` hands out stay valid after :meth:`Publication.commit`:
the library remaps the same memory read-only in place (a write after commit then faults, as
writes to any attached model do). Every such tensor (and every view of it) keeps the native
publication, and after commit the committed model's mapping and lease, alive, as tensors of a
:class:`companion.MappedModel` keep theirs. :meth:`Publication.abort` gives up the Publication's
own hold: the server frees the slab (and the key) at once when no tensor from the publication is
left, else when the last one is gone.
"""
from __future__ import annotations

import collections.abc
import ctypes
import sys
import threading
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from . import _lib
from ._types import DTYPES, DType, fingerprint_json
from .errors import InvalidArgument
from .model import MappedModel, Tensor, _contiguous_strides, _ModelHandle

__all__ = ["Publication", "WritableTensor", "TableEntry", "dtype_of", "module_tensors",
           "collect_sources"]

_MAX_NDIM = 8

_BY_TORCH_NAME = {info.torch: dtype for dtype, info in DTYPES.items()}
_BY_NUMPY_STR = {info.numpy: dtype for dtype, info in DTYPES.items() if info.numpy}
_BY_NAME = {info.name.lower(): dtype for dtype, info in DTYPES.items()}
_BY_NAME.update({"bf16": DType.BF16, "fp16": DType.F16, "half": DType.F16, "fp32": DType.F32,
                 "float": DType.F32, "fp64": DType.F64, "double": DType.F64})


def dtype_of(value: Any) -> DType:
    """The companion DType of a torch dtype, numpy dtype (or type), DType, or name ("F32",
    "float32", "bf16"...). Raises TypeError for anything else (e.g. complex or big-endian)."""
    if isinstance(value, DType):
        return value
    if isinstance(value, bool):
        raise TypeError(f"cannot interpret {value!r} as a dtype")
    if isinstance(value, int):
        return DType(value)
    if isinstance(value, str):
        key = value.lower()
        if key.startswith("torch."):
            key = key[len("torch."):]
        found = _BY_NAME.get(key) or _BY_TORCH_NAME.get(key)
        if found is None:
            try:
                import numpy as np

                found = _BY_NUMPY_STR.get(np.dtype(value).str)
            except Exception:
                found = None
        if found is None:
            raise TypeError(f"unknown dtype {value!r}")
        return found
    text = str(value)
    if text.startswith("torch."):  # a torch.dtype, without importing torch
        found = _BY_TORCH_NAME.get(text[len("torch."):])
        if found is None:
            raise TypeError(f"{value} has no companion dtype")
        return found
    try:
        import numpy as np

        found = _BY_NUMPY_STR.get(np.dtype(value).str)
    except Exception:
        found = None
    if found is None:
        raise TypeError(f"cannot interpret {value!r} as a dtype (use a torch or numpy dtype, "
                        "or a name such as 'F32' or 'bf16')")
    return found


def _shape_of(shape: Any) -> Tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"a shape must be a sequence of ints, not {shape!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"negative size in shape {out}")
    if len(out) > _MAX_NDIM:
        raise ValueError(f"shape {out} has {len(out)} dimensions; at most {_MAX_NDIM}")
    return out


def _is_torch(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_numpy(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _storage_key(value: Any) -> Optional[Tuple[Any, ...]]:
    """What identifies tied tensors: the same memory seen with the same dtype, shape and strides.
    None for tensors without data of their own (meta, empty)."""
    if _is_torch(value):
        if value.is_meta or value.numel() == 0:
            return None
        return ("torch", str(value.device), value.data_ptr(), str(value.dtype),
                tuple(value.shape), tuple(value.stride()))
    if _is_numpy(value):
        if value.size == 0:
            return None
        return ("numpy", value.__array_interface__["data"][0], value.dtype.str, value.shape,
                value.strides)
    if isinstance(value, Tensor):
        if value.nbytes == 0:
            return None
        return ("companion", value.device, value.data_ptr, int(value.dtype), value.shape,
                value.strides)
    return None


class TableEntry(NamedTuple):
    """One row of a table to declare: ``alias_of`` names an earlier row sharing its bytes."""

    name: str
    dtype: DType
    shape: Tuple[int, ...]
    alias_of: Optional[str] = None


def _describe(value: Any) -> Tuple[DType, Tuple[int, ...]]:
    """dtype and shape of a tensor-like value (torch incl. meta, numpy, companion Tensor)."""
    if _is_torch(value):
        return dtype_of(value.dtype), tuple(int(s) for s in value.shape)
    if _is_numpy(value):
        return dtype_of(value.dtype), tuple(int(s) for s in value.shape)
    if isinstance(value, Tensor):
        return value.dtype, value.shape
    raise TypeError(f"{type(value).__name__} is not a tensor (torch.Tensor, numpy.ndarray or "
                    "companion.Tensor)")


def plan_table(items: Iterable[Tuple[str, Any]], allow_specs: bool = False,
               allow_meta: bool = False) -> List[TableEntry]:
    """The declaration of named values: tensors (tied ones, same memory + dtype + shape +
    strides, or the very same object, declared once and then as aliases) and, with
    ``allow_specs``, ``(dtype, shape)`` / ``(dtype, shape, alias_of)`` tuples."""
    entries: List[TableEntry] = []
    first_by_storage: Dict[Tuple[Any, ...], str] = {}
    first_by_id: Dict[int, str] = {}
    seen: Dict[str, TableEntry] = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, not {name!r}")
        if "\0" in name:
            raise ValueError(f"tensor name {name!r} contains NUL")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        if allow_specs and isinstance(value, tuple) and len(value) in (2, 3):
            alias = value[2] if len(value) == 3 else None
            entry = TableEntry(name, dtype_of(value[0]), _shape_of(value[1]), alias)
            if alias is not None:
                target = seen.get(alias)
                if target is None:
                    raise ValueError(f"{name!r} is an alias of {alias!r}, which is not an "
                                     "earlier entry")
                if target.alias_of is not None:
                    entry = entry._replace(alias_of=target.alias_of)
                    target = seen[target.alias_of]
                if (target.dtype, target.shape) != (entry.dtype, entry.shape):
                    raise ValueError(f"{name!r} aliases {alias!r} but its dtype/shape "
                                     f"({entry.dtype.name}, {entry.shape}) differ from "
                                     f"({target.dtype.name}, {target.shape})")
        else:
            if _is_torch(value) and value.is_meta and not allow_meta:
                raise ValueError(f"{name!r} is a meta tensor: it has no data to publish (use "
                                 "begin_publish to declare by dtype and shape)")
            dtype, shape = _describe(value)
            if len(shape) > _MAX_NDIM:
                raise ValueError(f"{name!r} has {len(shape)} dimensions; at most {_MAX_NDIM}")
            alias = first_by_id.get(id(value))
            if alias is None:
                key = _storage_key(value)
                if key is not None:
                    alias = first_by_storage.get(key)
                    if alias is None:
                        first_by_storage[key] = name
            entry = TableEntry(name, dtype, shape, alias)
            first_by_id.setdefault(id(value), name)
        seen[name] = entry
        entries.append(entry)
    return entries


def module_tensors(module: Any) -> List[Tuple[str, Any]]:
    """Every parameter and every buffer of a torch module, persistent or not, under every name
    it is reachable by (tied parameters appear once per name: the table declares them as
    aliases). Walks the modules' ``_parameters`` / ``_buffers`` (also on torch 1.13)."""
    out: List[Tuple[str, Any]] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        base = prefix + "." if prefix else ""
        for name, param in sub._parameters.items():
            if param is not None:
                out.append((base + name, param))
        for name, buf in sub._buffers.items():
            if buf is not None:
                out.append((base + name, buf))
    return out


def collect_sources(tensors: Any) -> List[Tuple[str, Any]]:
    """(name, value) pairs of what publish() takes: a mapping name -> tensor (a state dict, also
    ``state_dict(keep_vars=True)``), a MappedModel, a list of (name, tensor) pairs, or a torch
    module (all parameters and buffers)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensors, torch.nn.Module):
        return module_tensors(tensors)
    if isinstance(tensors, collections.abc.Mapping):
        return list(tensors.items())
    if isinstance(tensors, (list, tuple)) and all(isinstance(p, tuple) and len(p) == 2
                                                  for p in tensors):
        return list(tensors)
    raise TypeError(f"publish takes a dict of tensors, a state dict or a torch module, not "
                    f"{type(tensors).__name__}")


class _PublicationHandle:
    """Owns one ``companion_publication*`` and, after commit, the committed model's handle.
    Closed (aborting if uncommitted) when the last reference goes away, or by close()."""

    __slots__ = ("_ptr", "_close", "model", "_lock", "__weakref__")

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self._close = _lib.function("companion_publication_close")  # kept for shutdown
        self.model: Optional[_ModelHandle] = None
        self._lock = threading.Lock()

    @property
    def ptr(self) -> int:
        return self._ptr

    def close(self) -> None:
        with self._lock:
            ptr, self._ptr = self._ptr, 0
        if ptr:
            self._close(ptr)

    def __del__(self) -> None:
        ptr, self._ptr = self._ptr, 0
        if ptr:
            try:
                self._close(ptr)
            except Exception:
                pass


class WritableTensor(Tensor):
    """A declared tensor of a publication: as :class:`companion.Tensor`, but writable until
    commit (``numpy()`` is writable, ``__cuda_array_interface__`` says so). After commit the
    memory is read-only: writes then fault."""

    __slots__ = ()

    def numpy(self, view_dtype: Any = None) -> Any:
        import numpy as np

        if self.is_cuda:
            raise TypeError(f"{self.name} is in GPU memory ({self.device}): use .torch()")
        info = DTYPES[self.dtype]
        if view_dtype is not None:
            dtype = np.dtype(view_dtype)
            if dtype.itemsize != info.itemsize:
                raise TypeError(f"view_dtype {dtype} has item size {dtype.itemsize}, the tensor's "
                                f"{info.name} has {info.itemsize}")
        elif info.numpy is None:
            raise TypeError(f"numpy has no {info.name} dtype ({self.name}): use .torch() or "
                            f".numpy(view_dtype=numpy.uint{8 * info.itemsize})")
        else:
            dtype = np.dtype(info.numpy)
        return self._numpy_array(dtype=dtype, writable=True)

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        info = DTYPES[self.dtype]
        if not self.is_cuda:
            raise AttributeError("__cuda_array_interface__: the tensor is in host memory")
        if info.numpy is None:
            raise AttributeError(f"__cuda_array_interface__: no typestr for {info.name}")
        return self._cuda_interface(info.numpy)


def _read_tensors(handle: _PublicationHandle) -> Dict[str, WritableTensor]:
    count = _lib.function("companion_publication_tensor_count")(handle.ptr)
    read = _lib.function("companion_publication_tensor")
    out: Dict[str, WritableTensor] = {}
    raw = _lib.TensorC()
    for index in range(count):
        _lib.check(read(handle.ptr, index, ctypes.byref(raw)))
        name = ctypes.string_at(raw.name, raw.name_length).decode("utf-8", "replace") \
            if raw.name_length else ""
        shape = tuple(raw.shape[i] for i in range(raw.ndim))
        strides = tuple(raw.strides[i] for i in range(raw.ndim)) if raw.strides \
            else _contiguous_strides(shape)
        out[name] = WritableTensor(name, DType(raw.dtype), shape, strides, raw.data or 0,
                                   raw.nbytes, raw.device_type, raw.device_id, handle)
    return out


def _copy_into(name: str, dst: WritableTensor, src: Any, torch_view: Any = None) -> None:
    """Copies one source tensor into its slot of the writable mapping."""
    dtype, shape = _describe(src)
    if (dtype, shape) != (dst.dtype, dst.shape):
        raise ValueError(f"{name}: the source is {dtype.name}{list(shape)}, the declared "
                         f"slot {dst.dtype.name}{list(dst.shape)}")
    if dst.nbytes == 0 or dst.numel == 0:
        return
    if isinstance(src, Tensor):  # a tensor of another mapped model
        src = src.numpy() if (not src.is_cuda and DTYPES[src.dtype].numpy is not None
                              and not dst.is_cuda) else src.torch()
    if _is_numpy(src) and not dst.is_cuda:
        import numpy as np

        np.copyto(dst.numpy(), src, casting="no")
        return
    import torch

    if _is_numpy(src):
        import numpy as np

        src = torch.from_numpy(np.ascontiguousarray(src))
    target = torch_view if torch_view is not None else dst.torch()
    with torch.no_grad():
        target.copy_(src.detach())


class Publication:
    """A claimed and declared key: write :attr:`tensors`, then :meth:`commit` (or
    :meth:`abort`). Use it as a context manager: leaving the block without commit (or through
    an exception) aborts; so does dropping the last reference before commit.

    - ``key``: the published key; ``generation``: the generation this becomes when committed.
    - ``tensors``: name -> writable torch tensor (CPU, or the server's GPU), or
      :class:`WritableTensor` where torch is absent (or lacks the dtype). Tied entries (aliases)
      are the same tensor object. They stay valid after commit, read-only (see the module docs).
    - ``info``: key, generation, segments and bytes, as the library reports them.
    """

    def __init__(self, handle: _PublicationHandle, key: str,
                 fingerprint: Optional[Dict[str, str]]) -> None:
        self._handle: Optional[_PublicationHandle] = handle
        self.key = key
        self.fingerprint = dict(fingerprint or {})
        self.generation = 0
        self.info: Dict[str, Any] = {}
        self.tensors: Dict[str, Any] = {}
        self._raw: Dict[str, WritableTensor] = {}
        self._declared = False
        self._state = "claimed"  # claimed, declared, committed, aborted
        self._model: Optional[MappedModel] = None
        self._lock = threading.Lock()

    # ---- declaring ------------------------------------------------------------------------------

    def _declare(self, entries: Sequence[TableEntry]) -> None:
        handle = self._live("declare")
        if self._declared:
            raise InvalidArgument("the publication is already declared")
        count = len(entries)
        decls = (_lib.TensorDeclC * max(count, 1))()
        keep: List[Any] = []
        for i, entry in enumerate(entries):
            name = entry.name.encode("utf-8")
            shape = (ctypes.c_int64 * max(len(entry.shape), 1))(*entry.shape)
            alias = entry.alias_of.encode("utf-8") if entry.alias_of else None
            keep += [name, shape, alias]
            decls[i].name = name
            decls[i].dtype = int(entry.dtype)
            decls[i].ndim = len(entry.shape)
            decls[i].shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
            decls[i].alias_of = alias
        _lib.check(_lib.function("companion_publication_declare")(handle.ptr, decls, count))
        del keep
        self._declared = True
        self._state = "declared"
        self._raw = _read_tensors(handle)
        self.info = self._read_info(handle)
        self.generation = int(self.info.get("generation", 0) or 0)
        self.tensors = self._torch_views(entries)

    def _read_info(self, handle: _PublicationHandle) -> Dict[str, Any]:
        out = ctypes.c_void_p()
        try:
            _lib.check(_lib.function("companion_publication_info")(handle.ptr,
                                                                    ctypes.byref(out)))
        except Exception:
            return {}
        return _lib.take_json(out) or {}

    def _torch_views(self, entries: Sequence[TableEntry]) -> Dict[str, Any]:
        """name -> torch tensor over the writable mapping (one object per memory: aliases share
        it), or the WritableTensor where torch cannot view it."""
        try:
            import torch  # noqa: F401
        except ImportError:
            torch = None
        aliases = {e.name: e.alias_of for e in entries if e.alias_of}
        by_key: Dict[Tuple[Any, ...], Any] = {}
        out: Dict[str, Any] = {}
        names = list(self._raw)
        for name in [e.name for e in entries if e.name not in self._raw]:
            names.append(name)  # an alias the library does not list on its own
        for name in names:
            raw = self._raw.get(name)
            if raw is None:
                target = aliases.get(name)
                if target is None or target not in out:
                    continue
                out[name] = out[target]
                continue
            key = (raw.data_ptr, int(raw.dtype), raw.shape, raw.strides, raw.device) \
                if raw.nbytes else ("empty", name)
            if key in by_key:
                out[name] = by_key[key]
                continue
            value: Any = raw
            if torch is not None:
                try:
                    value = raw.torch()
                except TypeError:  # a dtype this torch lacks
                    value = raw
            by_key[key] = value
            out[name] = value
        return out

    # ---- writing --------------------------------------------------------------------------------

    def _fill(self, sources: Sequence[Tuple[str, Any]], entries: Sequence[TableEntry]) -> None:
        """Copies each non-alias source into its slot."""
        self._live("write")
        for (name, src), entry in zip(sources, entries):
            if entry.alias_of is not None:
                continue
            dst = self._raw.get(name)
            if dst is None:
                raise InvalidArgument(f"the library did not declare {name!r}")
            view = self.tensors.get(name)
            _copy_into(name, dst, src, view if _is_torch(view) else None)

    # ---- ending ---------------------------------------------------------------------------------

    def _live(self, what: str) -> _PublicationHandle:
        handle = self._handle
        if self._state == "aborted" or handle is None:
            raise InvalidArgument(f"cannot {what}: the publication of {self.key!r} was aborted")
        if self._state == "committed":
            raise InvalidArgument(f"cannot {what}: the publication of {self.key!r} is already "
                                  "committed")
        return handle

    def commit(self) -> MappedModel:
        """Finishes writing and has the server seal this generation; returns the committed model
        (the same memory, now read-only). CUDA work on the tensors is synchronised first."""
        with self._lock:
            handle = self._live("commit")
            if not self._declared:
                raise InvalidArgument(f"cannot commit {self.key!r}: nothing was declared")
            self._synchronize()
            out = ctypes.c_void_p()
            _lib.check(_lib.function("companion_publication_commit")(handle.ptr,
                                                                      ctypes.byref(out)))
            model_handle = _ModelHandle(out.value or 0)
            handle.model = model_handle  # the writable tensors now live on the model's mapping
            self._state = "committed"
            handle.close()  # the key's writer lock goes; the mapping stays with the model
            self._model = MappedModel(model_handle)
            return self._model

    def _synchronize(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        devices = {t.device_id for t in self._raw.values() if t.is_cuda}
        for device in devices:
            torch.cuda.synchronize(device)

    def abort(self) -> None:
        """Gives the key up without committing: the server frees the slab once no tensor from
        this publication is left (at once when none was kept). Idempotent; no-op after commit."""
        with self._lock:
            if self._state == "committed":
                return
            self._state = "aborted"
            handle, self._handle = self._handle, None
            self.tensors = {}
            self._raw = {}
        del handle  # the native close happens with the last reference

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    @property
    def aborted(self) -> bool:
        return self._state == "aborted"

    @property
    def model(self) -> Optional[MappedModel]:
        """The committed model (None before commit)."""
        return self._model

    def __enter__(self) -> "Publication":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._state != "committed":
            self.abort()

    def __del__(self) -> None:
        try:
            if getattr(self, "_state", "committed") != "committed":
                self.abort()
        except Exception:
            pass

    def __reduce__(self) -> Any:
        raise TypeError("a Publication is memory mapped into this process and cannot be pickled")

    def __repr__(self) -> str:
        return (f"<companion.Publication {self.key!r} generation {self.generation} "
                f"{self._state}, {len(self.tensors)} tensors>")


def claim(client_handle: Any, key: str, fingerprint: Any, mode: int,
          timeout: Optional[float]) -> Optional[Publication]:
    """companion_publish_claim on an open client handle (its _NativeHandle)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidArgument("key must not be empty")
    fp = fingerprint_json(fingerprint)
    fn = _lib.function("companion_publish_claim")
    out = ctypes.c_void_p()
    with client_handle as ptr:
        _lib.check(fn(ptr, key.encode("utf-8"), fp, mode,
                      -1.0 if timeout is None else float(timeout), ctypes.byref(out)))
    if not out.value:
        return None
    from ._types import check_fingerprint

    return Publication(_PublicationHandle(out.value), key, check_fingerprint(fingerprint))


def publish_sources(client_handle: Any, key: str, sources: Sequence[Tuple[str, Any]],
                    fingerprint: Any, mode: int,
                    timeout: Optional[float] = None) -> Tuple[Optional[MappedModel], bool]:
    """Claims (mode), declares, copies and commits; (model, True). (None, False) when the claim
    answers that a generation is committed (CLAIM_IF_UNPUBLISHED)."""
    entries = plan_table(sources)
    pub = claim(client_handle, key, fingerprint, mode, timeout)
    if pub is None:
        return None, False
    return _declare_fill_commit(pub, sources, entries), True


def _declare_fill_commit(pub: Publication, sources: Sequence[Tuple[str, Any]],
                         entries: Sequence[TableEntry]) -> MappedModel:
    with pub:
        pub._declare(entries)
        pub._fill(sources, entries)
        model = pub.commit()
    # The publication's own torch views are not handed out: drop them with it.
    pub.tensors = {}
    pub._raw = {}
    return model
