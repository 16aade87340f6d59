"""Mapped models and their tensors.

Memory and lifetime
-------------------
A model's weights are mapped **read-only** into this process: host memory (sealed memfd, mapped
``PROT_READ``; a write kills the process with SIGSEGV) or GPU memory (CUDA VMM mapped read-only; a
write faults the CUDA context; the legacy ``cuda-ipc`` backend cannot enforce read-only, but writes
there corrupt every other client's weights). torch and numpy cannot express read-only memory in
general: numpy arrays returned here have ``writeable=False``, torch tensors look writable. Never
write to them (no in-place ops, no optimizer steps, no ``copy_`` into them).

The mapping (and the server-side lease) lives as long as anything made from it: the
:class:`MappedModel`, any :class:`Tensor`, any torch tensor or numpy array or DLPack capsule made
from a Tensor, and any view of those. ``MappedModel.release()`` gives up only the MappedModel's own
hold; the memory is unmapped (and the lease returned) when the last of them is gone.
"""
from __future__ import annotations

import collections.abc
import ctypes
import struct
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _lib
from . import dlpack as _dlpack
from ._types import DTYPES, DType, DTypeInfo, ModelSpec, ModelStatus
from .errors import Error, InvalidArgument


class _ModelHandle:
    """Owns one ``companion_model*``: released when the last reference goes away."""

    __slots__ = ("_ptr", "_release", "__weakref__")

    def __init__(self, ptr: int) -> None:
        lib = _lib.load_library()
        self._ptr = ptr
        self._release = lib.companion_model_release  # kept for interpreter shutdown

    @property
    def ptr(self) -> int:
        return self._ptr

    def __del__(self) -> None:
        ptr, self._ptr = self._ptr, 0
        if ptr:
            try:
                self._release(ptr)
            except Exception:
                pass


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    strides: List[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def _host_buffer(address: int, nbytes: int, owner: Any) -> Any:
    """A ctypes byte array over mapped host memory that keeps ``owner`` alive. torch.frombuffer
    and numpy.frombuffer hold a reference to it (released natively, without Python callbacks)."""
    buf = (ctypes.c_ubyte * nbytes).from_address(address)
    buf._companion_owner = owner  # type: ignore[attr-defined]
    return buf


class _CudaArray:
    """A ``__cuda_array_interface__`` (v3) exporter that keeps ``owner`` alive; torch.as_tensor
    holds it for the life of the tensor's storage and releases it natively."""

    __slots__ = ("__cuda_array_interface__", "_owner")

    def __init__(self, interface: Dict[str, Any], owner: Any) -> None:
        self.__cuda_array_interface__ = interface
        self._owner = owner


_INT_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


_EXPORTABLE: Dict[Tuple[str, DType], bool] = {}


def _exportable(library: str, dtype: DType) -> bool:
    """Whether torch's / numpy's own DLPack exporter handles this dtype, probed once on a
    one-element tensor (a failed export may leak what it was exporting, so the real tensor is
    only handed over when the probe passed)."""
    key = (library, dtype)
    known = _EXPORTABLE.get(key)
    if known is None:
        info = DTYPES[dtype]
        try:
            if library == "torch":
                import torch

                torch.empty(1, dtype=getattr(torch, info.torch)).__dlpack__()
            else:
                import numpy as np

                np.zeros(1, dtype=info.numpy).__dlpack__()
            known = True
        except Exception:
            known = False
        _EXPORTABLE[key] = known
    return known


def _delegate(make: Any, kwargs: Dict[str, Any]) -> Any:
    """``make().__dlpack__(**kwargs)``, retried without max_version for older exporters; None
    when the exporter cannot export this tensor."""
    try:
        obj = make()
    except Exception:
        return None
    for attempt in (kwargs, {k: v for k, v in kwargs.items() if k != "max_version"}):
        try:
            return obj.__dlpack__(**attempt)
        except TypeError:
            continue
        except Exception:
            return None
    return None


class Tensor:
    """One tensor of a mapped model: a read-only view of shared memory.

    Consume it with :meth:`torch` (zero-copy torch.Tensor), :meth:`numpy` (zero-copy read-only
    array, host memory only), DLPack (``torch.from_dlpack(t)``, ``numpy.from_dlpack(t)``, ...) or,
    for GPU memory, ``__cuda_array_interface__`` (CuPy, Numba).
    """

    __slots__ = ("name", "dtype", "shape", "strides", "data_ptr", "nbytes", "device_type",
                 "device_id", "_owner")

    def __init__(self, name: str, dtype: DType, shape: Sequence[int], strides: Sequence[int],
                 data_ptr: int, nbytes: int, device_type: int, device_id: int,
                 owner: Any) -> None:
        self.name = name
        self.dtype = DType(dtype)
        self.shape: Tuple[int, ...] = tuple(int(s) for s in shape)
        self.strides: Tuple[int, ...] = tuple(int(s) for s in strides)  # in elements
        self.data_ptr = int(data_ptr or 0)
        self.nbytes = int(nbytes)
        self.device_type = int(device_type)
        self.device_id = int(device_id)
        self._owner = owner

    @classmethod
    def _of(cls, name: str, dtype: DType, shape: Tuple[int, ...], strides: Tuple[int, ...],
            data_ptr: int, nbytes: int, device_type: int, device_id: int,
            owner: Any) -> "Tensor":
        """A Tensor from values already of the right types (the table's): skips __init__'s
        conversions, which dominate when a model has 100,000 tensors."""
        t = cls.__new__(cls)
        t.name = name
        t.dtype = dtype
        t.shape = shape
        t.strides = strides
        t.data_ptr = data_ptr
        t.nbytes = nbytes
        t.device_type = device_type
        t.device_id = device_id
        t._owner = owner
        return t

    # ---- description --------------------------------------------------------------------------

    @property
    def dtype_info(self) -> DTypeInfo:
        return DTYPES[self.dtype]

    @property
    def dtype_name(self) -> str:
        """The safetensors spelling: "BF16", "F32", ..."""
        return DTYPES[self.dtype].name

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_cuda(self) -> bool:
        return self.device_type == _dlpack.kDLCUDA

    @property
    def device(self) -> str:
        """"cpu" or "cuda:N" (N: this process's CUDA ordinal), as torch spells devices."""
        return f"cuda:{self.device_id}" if self.is_cuda else "cpu"

    def is_contiguous(self) -> bool:
        return self.numel == 0 or self.strides == _contiguous_strides(self.shape)

    def __repr__(self) -> str:
        return (f"companion.Tensor({self.name!r}, dtype={self.dtype_name}, shape={list(self.shape)}, "
                f"device={self.device})")

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __reduce__(self) -> Any:
        raise TypeError("a companion.Tensor is memory mapped into this process and cannot be "
                        "pickled: send the ModelSpec and map the model in the other process")

    # ---- DLPack -------------------------------------------------------------------------------

    def __dlpack_device__(self) -> Tuple[int, int]:
        return (self.device_type, self.device_id)

    def __dlpack__(self, stream: Any = None, max_version: Optional[Tuple[int, int]] = None,
                   dl_device: Optional[Tuple[int, int]] = None,
                   copy: Optional[bool] = None) -> Any:
        """A DLPack capsule sharing this tensor's memory (zero-copy).

        The capsule is made by torch (``self.torch().__dlpack__()``) when torch is already
        imported, else by numpy for host tensors numpy can type, else by this package through
        ctypes (a legacy "dltensor" capsule; see :mod:`companion.dlpack`). torch's and numpy's
        capsules release the memory natively, which stays correct even when a consumer drops
        its tensor while an exception is propagating; the ctypes fallback cannot (a Python
        callback cannot run then). ``companion.dlpack.EXPORTER = "ctypes"`` forces the fallback.

        ``stream`` needs no ordering (the weights were complete before the model was reported
        loaded); ``max_version`` is passed on to torch/numpy (the fallback always makes a legacy
        capsule, which the DLPack protocol allows); ``dl_device`` other than this tensor's
        device and ``copy=True`` raise BufferError."""
        if copy:
            raise BufferError("companion tensors are shared read-only memory: copy=True is not "
                              "supported by the producer (copy after import instead)")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"tensor is on {self.__dlpack_device__()}, not {tuple(dl_device)}")
        if _dlpack.EXPORTER == "auto" and self.nbytes > 0:
            kwargs: Dict[str, Any] = {}
            if stream is not None:
                kwargs["stream"] = stream
            if max_version is not None:
                kwargs["max_version"] = max_version
            torch = sys.modules.get("torch")
            if torch is not None and hasattr(torch, DTYPES[self.dtype].torch) \
                    and _exportable("torch", self.dtype):
                capsule = _delegate(lambda: self.torch(), kwargs)
                if capsule is not None:
                    return capsule
            if not self.is_cuda and DTYPES[self.dtype].numpy is not None \
                    and "numpy" in sys.modules and _exportable("numpy", self.dtype):
                kwargs.pop("stream", None)  # host memory: numpy takes no stream
                capsule = _delegate(lambda: self._numpy_array(writable=True), kwargs)
                if capsule is not None:
                    return capsule
        return self._dlpack_ctypes()

    def _dlpack_ctypes(self) -> Any:
        info = DTYPES[self.dtype]
        strides = None if self.is_contiguous() else self.strides
        return _dlpack.export(self.data_ptr, self.__dlpack_device__(),
                              (info.dlpack_code, info.dlpack_bits), self.shape, strides,
                              self._owner)

    # ---- numpy --------------------------------------------------------------------------------

    def numpy(self, view_dtype: Any = None) -> Any:
        """A read-only numpy array over the host memory (zero-copy; ``writeable`` is False).

        numpy has no bfloat16 or float8: for those, pass ``view_dtype`` (a numpy dtype of the
        same item size, e.g. ``numpy.uint16`` for the raw bits of BF16, or ``ml_dtypes.bfloat16``
        if installed), or use :meth:`torch`. GPU tensors raise TypeError (use :meth:`torch`)."""
        import numpy as np

        if self.is_cuda:
            raise TypeError(f"{self.name} is in GPU memory ({self.device}): use .torch() or a "
                            "__cuda_array_interface__/DLPack consumer (CuPy), not numpy")
        info = DTYPES[self.dtype]
        if view_dtype is not None:
            dtype = np.dtype(view_dtype)
            if dtype.itemsize != info.itemsize:
                raise TypeError(f"view_dtype {dtype} has item size {dtype.itemsize}, the tensor's "
                                f"{info.name} has {info.itemsize}")
        elif info.numpy is None:
            raise TypeError(
                f"numpy has no {info.name} dtype ({self.name}): use .torch(), or "
                f".numpy(view_dtype=numpy.uint{8 * info.itemsize}) for the raw bits"
                + (" (or view_dtype=ml_dtypes.bfloat16)" if self.dtype == DType.BF16 else ""))
        else:
            dtype = np.dtype(info.numpy)
        array = self._numpy_array(dtype=dtype)
        array.flags.writeable = False
        return array

    def _numpy_array(self, dtype: Any = None, writable: bool = False) -> Any:
        """The numpy view (writable=True only for handing to numpy's own DLPack exporter, which
        refuses read-only arrays; the memory itself stays read-only)."""
        import numpy as np

        info = DTYPES[self.dtype]
        if dtype is None:
            dtype = np.dtype(info.numpy)
        if self.nbytes == 0 or self.numel == 0:
            return np.empty(self.shape, dtype=dtype)
        flat = np.frombuffer(_host_buffer(self.data_ptr, self.nbytes, self._owner), dtype=dtype)
        if self.is_contiguous():
            return flat.reshape(self.shape)
        return np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=[s * info.itemsize for s in self.strides],
            writeable=writable)

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> Any:
        import numpy as np

        array = self.numpy()
        if dtype is not None and np.dtype(dtype) != array.dtype:
            if copy is False:
                raise ValueError("converting the dtype needs a copy")
            return array.astype(dtype)
        return array.copy() if copy else array

    # ---- CUDA array interface -------------------------------------------------------------

    def _cuda_interface(self, typestr: str) -> Dict[str, Any]:
        itemsize = DTYPES[self.dtype].itemsize
        return {
            "shape": self.shape,
            "typestr": typestr,
            "data": (self.data_ptr, False),
            "strides": None if self.is_contiguous()
            else tuple(s * itemsize for s in self.strides),
            "version": 3,
            "stream": None,  # nothing to synchronise: the data is complete
        }

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        """CUDA Array Interface v3 (GPU tensors whose dtype numpy can name). ``data`` carries the
        read-only flag True; the memory is read-only."""
        info = DTYPES[self.dtype]
        if not self.is_cuda:
            raise AttributeError("__cuda_array_interface__: the tensor is in host memory")
        if info.numpy is None:
            raise AttributeError(f"__cuda_array_interface__: no typestr for {info.name}")
        interface = self._cuda_interface(info.numpy)
        interface["data"] = (self.data_ptr, True)
        return interface

    # ---- torch --------------------------------------------------------------------------------

    def torch(self, view_dtype: Any = None) -> Any:
        """A torch.Tensor sharing this memory (zero-copy), on "cpu" or "cuda:N".

        The tensor looks writable but the memory is read-only: never write to it. ``view_dtype``
        reinterprets the bytes as another torch dtype of the same item size (e.g. torch.uint8
        for float8 tensors under a torch without float8 types). Raises TypeError for a dtype this
        torch lacks (unsigned 16/32/64-bit before torch 2.3, float8 before torch 2.1)."""
        import torch

        info = DTYPES[self.dtype]
        target = view_dtype if view_dtype is not None else getattr(torch, info.torch, None)
        if target is None:
            raise TypeError(
                f"torch {torch.__version__} has no {info.torch} ({self.name}, {info.name}): pass "
                f"view_dtype=torch.{'uint8' if info.itemsize == 1 else 'int%d' % (8 * info.itemsize)}"
                " to see the raw bits")
        target_size = torch.empty((), dtype=target).element_size()
        if target_size != info.itemsize:
            raise TypeError(f"view_dtype {target} has item size {target_size}, the tensor's "
                            f"{info.name} has {info.itemsize}")
        if self.nbytes == 0 or self.numel == 0:
            return torch.empty(self.shape, dtype=target,
                               device=self.device if self.is_cuda else "cpu")
        if self.is_cuda:
            return self._torch_cuda(torch, target)
        flat = torch.frombuffer(_host_buffer(self.data_ptr, self.nbytes, self._owner),
                                dtype=target)
        if self.is_contiguous():
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self.strides)

    def _torch_cuda(self, torch: Any, target: Any) -> Any:
        itemsize = DTYPES[self.dtype].itemsize
        device = torch.device("cuda", self.device_id)
        tensor = None
        try:
            holder = _CudaArray(self._cuda_interface(_INT_TYPESTR[itemsize]), self._owner)
            tensor = torch.as_tensor(holder, device=device)
        except Exception:  # e.g. a torch built without numpy: fall back to DLPack
            tensor = None
        if tensor is None or tensor.data_ptr() != self.data_ptr:
            tensor = self._torch_dlpack(torch)
        if tensor.dtype != target:
            tensor = tensor.view(target)
        return tensor

    def _torch_dlpack(self, torch: Any) -> Any:
        from torch.utils.dlpack import from_dlpack

        tensor = from_dlpack(self._dlpack_ctypes())
        if tensor.data_ptr() != self.data_ptr:
            raise RuntimeError(f"{self.name}: torch copied the tensor instead of sharing it")
        return tensor


# companion_tensor_record (companion.h), native byte order: data, nbytes, segment_offset,
# name_offset, dims_offset (u64 each), name_length (u32), dtype, ndim, device_type, device_id
# (i32 each), segment (u32). 64 bytes, no padding.
_RECORD = struct.Struct("=QQQQQIiiiiI")
_DTYPE_OF: Dict[int, DType] = {int(d): d for d in DType}
_ITEMSIZE: Dict[int, int] = {int(d): info.itemsize for d, info in DTYPES.items()}


class _Table:
    """A model's tensor table, copied out of the handle in one piece (companion_model_get_table:
    three ctypes calls whatever the number of tensors).

    The copy is Python's own bytes, so reading it never depends on the handle being alive: a
    Tensor can be made from it at any time (lazily, on first use) with no race against
    MappedModel.release(). Records are parsed only for the tensors asked for."""

    __slots__ = ("count", "record_size", "records", "dims", "names")

    def __init__(self, lib: Any, ptr: int) -> None:
        raw = _lib.ModelTableC()
        lib.companion_model_table_init(ctypes.byref(raw))
        _lib.check(lib.companion_model_get_table(ptr, ctypes.byref(raw)))
        count, size = int(raw.count), int(raw.record_size)
        if count and size < _RECORD.size:
            raise Error(f"{_lib.library_path()} describes tensors in {size}-byte records; this "
                        f"package needs at least {_RECORD.size}")
        self.count = count
        self.record_size = size
        self.records = ctypes.string_at(raw.records, count * size) if count else b""
        dims = ctypes.string_at(raw.dims, raw.dims_count * 8) if raw.dims_count else b""
        self.dims = memoryview(dims).cast("q")
        blob = ctypes.string_at(raw.names, raw.names_bytes) if raw.names_bytes else b""
        # Every name is followed by a NUL: one decode and one split name them all. NUL never
        # takes part in an invalid UTF-8 sequence, so 'replace' gives what decoding each name
        # alone gives. A name holding a NUL itself makes too many pieces: cut by the records.
        names = blob.decode("utf-8", "replace").split("\0")
        names.pop()
        if len(names) != count:
            names = [blob[r[3]:r[3] + r[5]].decode("utf-8", "replace") for r in self.rows()]
        self.names: List[str] = names

    def rows(self) -> Iterator[Tuple[int, ...]]:
        """Every record as a tuple (_RECORD's fields), in table order."""
        if self.record_size == _RECORD.size:
            return _RECORD.iter_unpack(self.records)
        size = self.record_size
        return (_RECORD.unpack_from(self.records, i * size) for i in range(self.count))

    def make_all(self, owner: Any, made: Dict[int, Tensor]) -> None:
        """Makes every Tensor not yet in ``made`` (one pass over the records)."""
        dims = self.dims.tolist()
        names = self.names
        for i, row in enumerate(self.rows()):
            if i in made:
                continue
            data, nbytes, _, _, at, _, code, ndim, device_type, device_id, _ = row
            dtype = _DTYPE_OF.get(code)
            made.setdefault(i, Tensor._of(names[i], DType(code) if dtype is None else dtype,
                                          tuple(dims[at:at + ndim]),
                                          tuple(dims[at + ndim:at + 2 * ndim]), data, nbytes,
                                          device_type, device_id, owner))

    def tensor(self, index: int, owner: Any) -> Tensor:
        data, nbytes, _, _, at, _, code, ndim, device_type, device_id, _ = _RECORD.unpack_from(
            self.records, index * self.record_size)
        dims = self.dims
        dtype = _DTYPE_OF.get(code)
        return Tensor._of(self.names[index], DType(code) if dtype is None else dtype,
                          tuple(dims[at:at + ndim]), tuple(dims[at + ndim:at + 2 * ndim]),
                          data, nbytes, device_type, device_id, owner)


def _bulk_state_dict(torch: Any, table: _Table, index: Dict[str, int], owner: Any,
                     tensor_at: Any) -> Dict[str, Any]:
    """``{name: Tensor.torch()}`` for every name in ``index``, without a round trip per tensor.

    One torch tensor (the base) is made per (segment, dtype, offset modulo item size) through
    Tensor.torch() (so the route, the device and the lifetime are the per-tensor ones: the base's
    storage holds the mapping), from the segment's start to the last byte any tensor of that
    segment uses. Every tensor is a view of its base with its own shape, strides and offset: the
    dtype, shape, strides, device and data pointer of Tensor.torch()'s result, sharing the base's
    storage. Grouping by the offset's residue keeps every start a whole number of elements into
    its base. Tensors torch cannot view this way (no bytes, a dtype this torch lacks) go through
    ``tensor_at(i).torch()`` as before, which also raises as before.

    Views are made a run at a time where they can be: tensors of one base, shape and strides
    whose offsets step evenly (the experts of a MoE layer, the same matrix of every layer) are
    one ``as_strided`` with a leading dimension, split by ``unbind(0)``, which makes each view
    in C++ (about three times cheaper than an ``as_strided`` call from Python per tensor)."""
    itemsize_of = {code: _ITEMSIZE[code] for code, d in _DTYPE_OF.items()
                   if getattr(torch, DTYPES[d].torch, None) is not None}
    # Where each segment's used bytes end: every base of the segment may reach that far.
    seg_end: Dict[int, int] = {}
    for row in table.rows():
        end = row[2] + row[1]
        if seg_end.get(row[10], -1) < end:
            seg_end[row[10]] = end
    dims = table.dims.tolist()
    if len(index) == table.count:  # no name given twice: the table's order is the dict's
        items: Any = zip(table.names, range(table.count), table.rows())
    else:
        rows = list(table.rows())
        items = ((name, i, rows[i]) for name, i in index.items())
    out: Dict[str, Any] = dict.fromkeys(index)  # the index's order, filled below
    first: Dict[Tuple[int, int, int], Tuple[int, ...]] = {}  # a row of each base's group
    groups: Dict[Tuple[Any, ...], List[Tuple[int, str]]] = {}
    for name, i, row in items:
        offset, code, ndim, segment = row[2], row[6], row[7], row[10]
        itemsize = itemsize_of.get(code)
        at = row[4]
        shape = tuple(dims[at:at + ndim])
        if itemsize is None or row[1] == 0 or 0 in shape:
            out[name] = tensor_at(i).torch()
            continue
        skew = offset % itemsize
        if (segment, code, skew) not in first:
            first[(segment, code, skew)] = row
        key = (segment, code, skew, shape, tuple(dims[at + ndim:at + 2 * ndim]))
        members = groups.get(key)
        if members is None:
            members = groups[key] = []
        members.append((offset // itemsize, name))
    bases: Dict[Tuple[int, int, int], Any] = {}
    for (segment, code, skew, shape, strides), members in groups.items():
        base = bases.get((segment, code, skew))
        if base is None:
            data, _, offset, _, _, _, _, _, device_type, device_id, _ = first[(segment, code, skew)]
            itemsize = _ITEMSIZE[code]
            count = (seg_end[segment] - skew) // itemsize
            flat = Tensor._of("", _DTYPE_OF[code], (count,), (1,), data - offset + skew,
                              count * itemsize, device_type, device_id, owner)
            base = bases[(segment, code, skew)] = flat.torch()
        members.sort()
        n = len(members)
        k = 0
        while k < n:
            j = k + 1
            if j < n:  # the longest run from k whose offsets step evenly
                step = members[j][0] - members[k][0]
                while j + 1 < n and members[j + 1][0] - members[j][0] == step:
                    j += 1
                j += 1
                views = base.as_strided((j - k,) + shape, (step,) + strides,
                                        members[k][0]).unbind(0)
                for (_, name), view in zip(members[k:j], views):
                    out[name] = view
            else:
                element, name = members[k]
                out[name] = base.as_strided(shape, strides, element)
            k = j
    return out


class MappedModel(collections.abc.Mapping):
    """A model's weights mapped into this process: a read-only mapping name -> :class:`Tensor`.

    ``mm["model.decoder.embed_tokens.weight"].torch()``; ``mm.state_dict()`` for every tensor as
    torch; ``mm.info`` for the mapping's facts (lease id, segments, bytes; ``mm.status`` for the
    model's status). Use as a context manager or call :meth:`release` to give up this object's
    hold; tensors made from it stay valid (see the module docs).

    The table crosses from the library in one block; each :class:`Tensor` is made the first time
    it is asked for (``mm[name]``, ``tensors()``, ``values()``...) and then kept, so that the
    same name gives the same object."""

    def __init__(self, handle: _ModelHandle, spec: Optional[ModelSpec] = None) -> None:
        lib = _lib.load_library()
        self._handle: Optional[_ModelHandle] = handle
        self.spec = spec
        self._lock = threading.Lock()
        self._table: Optional[_Table] = None
        self._made: Dict[int, Tensor] = {}
        if getattr(lib, "companion_model_get_table", None) is not None:
            self._table = _Table(lib, handle.ptr)
            names = self._table.names
        else:  # a library older than the table call: a call per tensor, all made now
            names = []
            raw = _lib.TensorC()
            for index in range(lib.companion_model_tensor_count(handle.ptr)):
                _lib.check(lib.companion_model_tensor(handle.ptr, index, ctypes.byref(raw)))
                name = ctypes.string_at(raw.name, raw.name_length).decode("utf-8", "replace") \
                    if raw.name_length else ""
                ndim = raw.ndim
                shape = tuple(raw.shape[i] for i in range(ndim))
                strides = tuple(raw.strides[i] for i in range(ndim)) if raw.strides \
                    else _contiguous_strides(shape)
                names.append(name)
                self._made[index] = Tensor(name, DType(raw.dtype), shape, strides, raw.data or 0,
                                           raw.nbytes, raw.device_type, raw.device_id, handle)
        # A name given twice maps to its last entry, as a dict built in table order would.
        self._index: Dict[str, int] = dict(zip(names, range(len(names))))
        info = _lib.c_void_p()
        _lib.check(lib.companion_model_info(handle.ptr, ctypes.byref(info)))
        self.info: Dict[str, Any] = _lib.take_json(info) or {}

    # ---- facts --------------------------------------------------------------------------------

    @property
    def status(self) -> ModelStatus:
        return ModelStatus.from_json(self.info.get("model", {}))

    @property
    def lease_id(self) -> int:
        return int(self.info.get("lease_id", 0))

    @property
    def mapped_bytes(self) -> int:
        return int(self.info.get("mapped_bytes", 0))

    @property
    def released(self) -> bool:
        return self._handle is None

    def _check(self) -> None:
        if self._handle is None:
            raise InvalidArgument("the MappedModel was released")

    def _live(self) -> Tuple[_ModelHandle, Optional[_Table], Dict[str, int], Dict[int, Tensor]]:
        """The handle, table, index and made tensors, read once: release() may run in another
        thread meanwhile, and what was read stays consistent (the handle read here keeps the
        mapping for any Tensor made from it)."""
        handle, table, index, made = self._handle, self._table, self._index, self._made
        if handle is None:
            raise InvalidArgument("the MappedModel was released")
        return handle, table, index, made

    @staticmethod
    def _tensor(i: int, handle: _ModelHandle, table: Optional[_Table],
                made: Dict[int, Tensor]) -> Tensor:
        t = made.get(i)
        if t is None:
            assert table is not None  # without a table every Tensor was made at construction
            # setdefault: two threads making the same tensor at once hand out one object.
            t = made.setdefault(i, table.tensor(i, handle))
        return t

    # ---- mapping protocol -------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        handle, table, index, made = self._live()
        return self._tensor(index[name], handle, table, made)

    def __iter__(self) -> Iterator[str]:
        self._check()
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def tensors(self) -> Dict[str, Tensor]:
        """Every tensor, by name (a new dict; the Tensor objects are shared)."""
        handle, table, index, made = self._live()
        if table is not None and len(made) < table.count:
            table.make_all(handle, made)
        return {name: made[i] for name, i in index.items()}

    def state_dict(self) -> Dict[str, Any]:
        """Every tensor as a zero-copy torch.Tensor, by name (imports torch): each as
        ``self[name].torch()`` would make it (dtype, shape, strides, device, data pointer), but
        made in bulk as views of one torch tensor per segment and dtype. The views share that
        tensor's storage, which holds the mapping while any of them lives. (So a view's
        ``untyped_storage()`` spans its whole segment: ``torch.save`` of one would write that
        span; ``.clone()`` first.)"""
        handle, table, index, made = self._live()
        import torch

        if table is None:
            return {name: self._tensor(i, handle, table, made).torch()
                    for name, i in index.items()}
        return _bulk_state_dict(torch, table, index, handle,
                                lambda i: self._tensor(i, handle, table, made))

    # ---- lifetime -----------------------------------------------------------------------------

    def release(self) -> None:
        """Gives up this object's hold on the mapping. Tensors, arrays and capsules made from it
        keep the memory (and the lease) until they are gone; with none left, the model is
        unmapped and its lease returned now. Idempotent."""
        with self._lock:
            self._handle = None
            self._table = None
            self._index = {}
            self._made = {}

    close = release

    def __enter__(self) -> "MappedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __reduce__(self) -> Any:
        raise TypeError("a MappedModel is memory mapped into this process and cannot be "
                        "pickled: send the ModelSpec and map the model in the other process")

    def __repr__(self) -> str:
        state = "released" if self._handle is None else f"{len(self._index)} tensors"
        source = self.spec.source if self.spec else (self.status.source or self.status.key)
        return f"<companion.MappedModel {source!r} {state}, lease {self.lease_id}>"
