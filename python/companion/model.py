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
        if view_dtype is not None:  # (torch's own dtype for ours has our item size)
            target_size = torch.empty((), dtype=target).element_size()
            if target_size != info.itemsize:
                raise TypeError(f"view_dtype {target} has item size {target_size}, the "
                                f"tensor's {info.name} has {info.itemsize}")
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
# Each field as a column: the array format that reads it and its index in a record read as an
# array of that format (see _Table.column).
_DATA, _NBYTES, _OFFSET, _NAME_AT, _DIMS_AT = ("Q", 0), ("Q", 1), ("Q", 2), ("Q", 3), ("Q", 4)
_NAME_LENGTH, _CODE, _NDIM, _DEVICE_TYPE, _DEVICE_ID, _SEGMENT = (
    ("I", 10), ("i", 11), ("i", 12), ("i", 13), ("i", 14), ("I", 15))
_DTYPE_OF: Dict[int, DType] = {int(d): d for d in DType}
_ITEMSIZE: Dict[int, int] = {int(d): info.itemsize for d, info in DTYPES.items()}


def _borrow(address: Optional[int], nbytes: int, owner: Any) -> memoryview:
    """A writable byte memoryview of memory that ``owner`` keeps valid, keeping ``owner`` alive
    (so does anything made over it: a cast, a slice, torch.frombuffer)."""
    if not nbytes or not address:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(address)
    array._companion_owner = owner  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


class _Table:
    """A model's tensor table, read where the library keeps it (companion_model_get_table: three
    ctypes calls whatever the number of tensors, nothing copied).

    The arrays belong to the model handle, which every view of them holds (see _borrow): whoever
    holds the table reads valid memory, whatever MappedModel.release() does meanwhile in another
    thread. Names, the name index and each Tensor are made on first use and kept; Tensors in
    ``made`` (index -> Tensor or None), filled under ``lock`` so that a name gives one object."""

    __slots__ = ("count", "record_size", "records", "dims", "names_blob", "segments", "_names",
                 "_index", "made", "all_made", "lock")

    def __init__(self, lib: Any, handle: Any) -> None:
        raw = _lib.initialized(_lib.ModelTableC, "companion_model_table_init")
        _lib.check(lib.companion_model_get_table(handle.ptr, ctypes.byref(raw)))
        count, size = int(raw.count), int(raw.record_size)
        if count and size < _RECORD.size:
            raise Error(f"{_lib.library_path()} describes tensors in {size}-byte records; this "
                        f"package needs at least {_RECORD.size}")
        records = _borrow(raw.records, count * size, handle)
        if size % 8:  # records that are not whole 8-byte words: the fields we read, repacked
            records = memoryview(bytearray(b"".join(
                records[i * size:i * size + _RECORD.size] for i in range(count))))
            size = _RECORD.size
        self.count = count
        self.record_size = size
        self.records = records
        self.dims = _borrow(raw.dims, raw.dims_count * 8, handle)  # int64 sizes and strides
        self.names_blob = _borrow(raw.names, raw.names_bytes, handle)
        self.segments = int(raw.segments)
        self._names: Optional[List[str]] = None
        self._index: Optional[Dict[str, int]] = None
        self.made: List[Optional[Tensor]] = [None] * count
        self.all_made = False
        self.lock = threading.Lock()

    @property
    def names(self) -> List[str]:
        """Every name, in table order."""
        names = self._names
        if names is None:
            # Every name is followed by a NUL: one decode and one split name them all. NUL never
            # takes part in an invalid UTF-8 sequence, so 'replace' gives what decoding each
            # name alone gives. A name holding a NUL itself makes too many pieces: cut by the
            # records.
            blob = self.names_blob
            names = str(blob, "utf-8", "replace").split("\0")
            names.pop()
            if len(names) != self.count:
                names = [str(blob[at:at + n], "utf-8", "replace")
                         for at, n in zip(self.column(_NAME_AT), self.column(_NAME_LENGTH))]
            self._names = names
        return names

    @property
    def index(self) -> Dict[str, int]:
        """name -> index; a name given twice maps to its last entry, as a dict built in table
        order would."""
        index = self._index
        if index is None:
            index = self._index = dict(zip(self.names, range(self.count)))
        return index

    def column(self, field: Tuple[str, int]) -> List[int]:
        """One field of every record (_DATA, _NBYTES, ...), in table order."""
        fmt, at = field
        return self.records.cast(fmt)[at::self.record_size // struct.calcsize(fmt)].tolist()

    def tensor(self, index: int, owner: Any) -> Tensor:
        data, nbytes, _, _, at, _, code, ndim, device_type, device_id, _ = _RECORD.unpack_from(
            self.records, index * self.record_size)
        dims = self.dims.cast("q")
        dtype = _DTYPE_OF.get(code)
        return Tensor._of(self.names[index], DType(code) if dtype is None else dtype,
                          tuple(dims[at:at + ndim]), tuple(dims[at + ndim:at + 2 * ndim]),
                          data, nbytes, device_type, device_id, owner)

    def rows(self) -> Iterator[Tuple[int, ...]]:
        """Every record as a tuple (_RECORD's fields), in table order."""
        if self.record_size == _RECORD.size:
            return _RECORD.iter_unpack(self.records)
        size = self.record_size
        return (_RECORD.unpack_from(self.records, i * size) for i in range(self.count))

    def make_all(self, owner: Any) -> None:
        """Makes every Tensor not made yet (one pass over the records)."""
        dims = self.dims.cast("q").tolist()
        of = Tensor._of
        dtype_of = _DTYPE_OF
        try:
            tensors = [of(name, dtype_of[code], tuple(dims[at:at + ndim]),
                          tuple(dims[at + ndim:at + 2 * ndim]), data, nbytes, device_type,
                          device_id, owner)
                       for name, (data, nbytes, _, _, at, _, code, ndim, device_type, device_id,
                                  _) in zip(self.names, self.rows())]
        except KeyError as e:  # a dtype this package does not know: DType's own ValueError
            DType(e.args[0])
            raise
        with self.lock:
            made = self.made
            if made.count(None) == len(made):
                made[:] = tensors
            else:  # keep those already handed out
                made[:] = [old if old is not None else new for old, new in zip(made, tensors)]
            self.all_made = True

    def get(self, index: int, owner: Any) -> Tensor:
        """The Tensor at ``index``, made now if it was not."""
        made = self.made
        t = made[index]
        if t is None:
            with self.lock:
                t = made[index]
                if t is None:
                    t = made[index] = self.tensor(index, owner)
        return t


class _Listing:
    """The table of a library older than companion_model_get_table: a call per tensor, every
    Tensor made at once."""

    __slots__ = ("count", "names", "index", "made", "all_made")

    def __init__(self, lib: Any, handle: Any) -> None:
        names: List[str] = []
        made: List[Optional[Tensor]] = []
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
            made.append(Tensor(name, DType(raw.dtype), shape, strides, raw.data or 0,
                               raw.nbytes, raw.device_type, raw.device_id, handle))
        self.count = len(names)
        self.names = names
        self.index = dict(zip(names, range(len(names))))
        self.made = made
        self.all_made = True

    def get(self, index: int, owner: Any) -> Tensor:
        t = self.made[index]
        assert t is not None
        return t


_TORCH_ITEMSIZES: Dict[Any, Dict[int, int]] = {}  # torch -> {dtype code: item size}


def _torch_itemsizes(torch: Any) -> Dict[int, int]:
    """Item size by dtype code, for the dtypes this torch has."""
    known = _TORCH_ITEMSIZES.get(torch)
    if known is None:
        known = _TORCH_ITEMSIZES[torch] = {
            code: _ITEMSIZE[code] for code, dtype in _DTYPE_OF.items()
            if getattr(torch, DTYPES[dtype].torch, None) is not None}
    return known


def _address(view: memoryview) -> Optional[int]:
    """The address of a writable buffer's first byte; None when it is empty."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if view.nbytes else None


def _plan_views(table: "_Table") -> Tuple[memoryview, List[Tuple[int, int, int]], int,
                                          List[int]]:
    """The library's view plan of the table (companion_plan_views): its rows (table rows, run
    by run, then those left out), its runs as (step in bytes, first, count), how many rows the
    runs cover, and where each segment's last planned tensor ends."""
    lib = _lib.load_library()
    n = table.count
    c_table = _lib.initialized(_lib.ModelTableC, "companion_model_table_init")
    c_table.record_size = table.record_size
    c_table.count = n
    c_table.records = _address(table.records)
    c_table.dims = _address(table.dims)
    c_table.dims_count = table.dims.nbytes // 8
    c_table.segments = table.segments
    rows = (ctypes.c_uint32 * n)()
    runs = (ctypes.c_uint64 * (2 * n))()  # companion_view_run: step (u64), first, count (u32)
    ends = (ctypes.c_uint64 * max(table.segments, 1))()
    run_count, planned = ctypes.c_size_t(), ctypes.c_size_t()
    _lib.check(lib.companion_plan_views(ctypes.byref(c_table), rows, runs, ctypes.byref(run_count),
                                        ctypes.byref(planned), ends))
    words = memoryview(runs).cast("B")
    k = run_count.value
    steps = words.cast("Q")[0:2 * k:2]
    halves = words.cast("I")
    return (memoryview(rows).cast("B").cast("I"),
            list(zip(steps, halves[2:4 * k:4], halves[3:4 * k:4])), planned.value, ends[:])


def _bulk_state_dict(torch: Any, table: "_Table", owner: Any) -> Dict[str, Any]:
    """``{name: Tensor.torch()}`` for every name of the table, without a torch call per tensor.

    The library plans the views (companion_plan_views): runs of tensors of one segment, dtype,
    shape and strides whose offsets step evenly. One torch tensor (the base) is made per
    (segment, dtype, offset modulo item size) through Tensor.torch() (so the route, the device
    and the lifetime are the per-tensor ones: the base's storage holds the mapping), from the
    segment's start to the last byte any tensor of that segment uses. A run is one
    ``as_strided`` of its base with a leading dimension, split by ``unbind(0)`` (each view made
    in C++): the dtype, shape, strides, device and data pointer of Tensor.torch()'s result,
    sharing the base's storage. Tensors the plan leaves out (no bytes, a size of 0) or of a
    dtype this torch lacks go through ``Tensor.torch()`` one by one, which also raises as
    before."""
    n = table.count
    names = table.names
    if n == 0:
        return {}
    rows, runs, planned, ends = _plan_views(table)
    sizes = _torch_itemsizes(torch)
    records, record_size = table.records, table.record_size
    dims = table.dims.cast("q")
    unpack = _RECORD.unpack_from
    views: List[Any] = []
    bases: Dict[Tuple[int, int, int], Any] = {}
    left: List[int] = []
    view_rows: Any = rows[:planned]
    for step, first, count in runs:
        data, _, offset, _, at, _, code, ndim, device_type, device_id, segment = unpack(
            records, rows[first] * record_size)
        size = sizes.get(code)
        if size is None:  # a dtype this torch lacks: one by one (which raises)
            left.extend(rows[first:first + count])
            continue
        residue = offset % size
        base = bases.get((segment, code, residue))
        if base is None:
            length = (ends[segment] - residue) // size
            flat = Tensor._of("", _DTYPE_OF[code], (length,), (1,), data - offset + residue,
                              length * size, device_type, device_id, owner)
            base = bases[(segment, code, residue)] = flat.torch()
        shape, strides = tuple(dims[at:at + ndim]), tuple(dims[at + ndim:at + 2 * ndim])
        if count == 1:
            views.append(base.as_strided(shape, strides, offset // size))
        else:
            views.extend(base.as_strided((count,) + shape, (step // size,) + strides,
                                         offset // size).unbind(0))
    if left:  # the rows of the runs viewed, in plan order
        skipped = set(left)
        view_rows = [row for row in view_rows if row not in skipped]
    left.extend(rows[planned:])
    ordered: List[Any] = [None] * n
    collections.deque(map(ordered.__setitem__, view_rows, views), maxlen=0)  # a loop in C
    if left:  # one by one; an entry that a later one of its name replaces is not made
        index = table.index
        for i in sorted(left):
            if index[names[i]] == i:
                ordered[i] = table.get(i, owner).torch()
    # A name given twice keeps its first place and its last entry, as in the table's index.
    return dict(zip(names, ordered))


class MappedModel(collections.abc.Mapping):
    """A model's weights mapped into this process: a read-only mapping name -> :class:`Tensor`.

    ``mm["model.decoder.embed_tokens.weight"].torch()``; ``mm.state_dict()`` for every tensor as
    torch; ``mm.info`` for the mapping's facts (lease id, segments, bytes; ``mm.status`` for the
    model's status). Use as a context manager or call :meth:`release` to give up this object's
    hold; tensors made from it stay valid (see the module docs).

    The table crosses from the library in one block and is read where the library keeps it; the
    names and the name index are made on first use, and each :class:`Tensor` the first time it is
    asked for (``mm[name]``, ``tensors()``, ``values()``...) and then kept, so that the same name
    gives the same object. ``get_model_parameters`` itself does no work per tensor in Python."""

    def __init__(self, handle: _ModelHandle, spec: Optional[ModelSpec] = None) -> None:
        lib = _lib.load_library()
        self._handle: Optional[_ModelHandle] = handle
        self._spec = spec
        self._checkpoint_name: Optional[str] = None  # see _spec_if_checkpoint
        self._lock = threading.Lock()
        self._table: Optional[Any] = _Table(lib, handle) \
            if getattr(lib, "companion_model_get_table", None) is not None \
            else _Listing(lib, handle)  # a library older than the table call
        self._info: Optional[Dict[str, Any]] = None

    # ---- facts --------------------------------------------------------------------------------

    @property
    def spec(self) -> Optional[ModelSpec]:
        """The ModelSpec the model was mapped by: the one given, or for a str that named a
        checkpoint ``ModelSpec(str)``; None for a published key."""
        name = self._checkpoint_name
        if name is not None:  # whether it is a checkpoint: in the facts, read now
            spec = None
            if not self.status.published:
                try:
                    spec = ModelSpec(name)
                except (TypeError, ValueError):
                    pass
            with self._lock:
                if self._checkpoint_name is name:
                    self._spec, self._checkpoint_name = spec, None
        return self._spec

    @spec.setter
    def spec(self, value: Optional[ModelSpec]) -> None:
        with self._lock:
            self._spec, self._checkpoint_name = value, None

    def _spec_if_checkpoint(self, name: str) -> None:
        """``spec`` becomes ModelSpec(name) if the model is a checkpoint (not a published key),
        found out on first use of ``spec``: get_model_parameters(str) does not read the facts."""
        self._checkpoint_name = name

    @property
    def info(self) -> Dict[str, Any]:
        """The mapping's facts: model (its status), lease_id, segments, segment_inodes,
        mapped_bytes, read_only. Read from the library on first use (a JSON document: not worth
        making for callers that only want the tensors), then kept; release() reads it first, so
        it stays readable after."""
        info = self._info
        if info is None:
            with self._lock:
                info = self._read_info()
        return info

    def _read_info(self) -> Dict[str, Any]:
        """self._info, read now if it was not (the caller holds self._lock)."""
        info = self._info
        if info is None:
            handle = self._handle
            if handle is None:  # released before this was read: nothing left to read it from
                return {}
            raw = _lib.c_void_p()
            _lib.check(_lib.load_library().companion_model_info(handle.ptr, ctypes.byref(raw)))
            info = self._info = _lib.take_json(raw) or {}
        return info

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

    def _live(self) -> Tuple[_ModelHandle, Any]:
        """The handle and the table, read once: release() may run in another thread meanwhile,
        and what was read stays consistent (the table holds the memory it reads; the handle read
        here keeps the mapping for any Tensor made from it)."""
        handle, table = self._handle, self._table
        if handle is None or table is None:
            raise InvalidArgument("the MappedModel was released")
        return handle, table

    # ---- mapping protocol -------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        handle, table = self._live()
        return table.get(table.index[name], handle)

    def __iter__(self) -> Iterator[str]:
        return iter(self._live()[1].index)

    def __len__(self) -> int:
        table = self._table
        return 0 if table is None else len(table.index)

    def __contains__(self, name: object) -> bool:
        table = self._table
        return table is not None and name in table.index

    def tensors(self) -> Dict[str, Tensor]:
        """Every tensor, by name (a new dict; the Tensor objects are shared)."""
        handle, table = self._live()
        if not table.all_made:
            table.make_all(handle)
        # A name given twice keeps its first place and its last entry, as in the index.
        return dict(zip(table.names, table.made))

    def state_dict(self) -> Dict[str, Any]:
        """Every tensor as a zero-copy torch.Tensor, by name (imports torch): each as
        ``self[name].torch()`` would make it (dtype, shape, strides, device, data pointer), but
        made in bulk as views of one torch tensor per segment and dtype. The views share that
        tensor's storage, which holds the mapping while any of them lives. (So a view's
        ``untyped_storage()`` spans its whole segment: ``torch.save`` of one would write that
        span; ``.clone()`` first.)"""
        handle, table = self._live()
        import torch

        if not isinstance(table, _Table):
            return {name: table.get(i, handle).torch() for name, i in table.index.items()}
        return _bulk_state_dict(torch, table, handle)

    # ---- lifetime -----------------------------------------------------------------------------

    def release(self) -> None:
        """Gives up this object's hold on the mapping. Tensors, arrays and capsules made from it
        keep the memory (and the lease) until they are gone; with none left, the model is
        unmapped and its lease returned now. Idempotent."""
        with self._lock:
            if self._handle is not None:
                try:
                    self._read_info()
                except Error:  # giving up the hold must not fail; info then reads as {}
                    pass
            self._handle = None
            self._table = None

    close = release

    def __enter__(self) -> "MappedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __reduce__(self) -> Any:
        raise TypeError("a MappedModel is memory mapped into this process and cannot be "
                        "pickled: send the ModelSpec and map the model in the other process")

    def __repr__(self) -> str:
        state = "released" if self._handle is None else f"{len(self)} tensors"
        source = self.spec.source if self.spec else (self.status.source or self.status.key)
        return f"<companion.MappedModel {source!r} {state}, lease {self.lease_id}>"
