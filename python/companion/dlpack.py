"""DLPack export through ctypes: the structs of dlpack.h and a legacy ``"dltensor"`` capsule.

How ownership works
-------------------
Each :func:`export` allocates a ``DLManagedTensor`` (plus its shape and strides arrays) in Python
memory and records it in a registry together with the *owner*: the object that keeps the mapped
memory alive (a model handle). The registry entry is what keeps the owner alive:

- A consumer (``torch.from_dlpack``, ``numpy.from_dlpack``, ...) that takes the capsule renames it
  ``"used_dltensor"`` and later calls the tensor's ``deleter``: the deleter drops the registry
  entry, and with it the owner's reference. The mapping lives until then, whatever happens to
  the Python objects it came from.
- A capsule that is never consumed (its name is still ``"dltensor"``) owes the owner nothing: once
  nothing but the registry refers to it, the entry is dropped. This is checked at the next
  export, after each garbage collection (``gc.callbacks``) and by :func:`collect`, instead of in a
  capsule destructor: a ctypes callback that runs while an exception is being raised (capsules
  are often freed during error unwinding) would replace that exception with a SystemError.
  Capsules therefore have no destructor, and an unconsumed capsule releases its owner at the
  next collection rather than at once.

The deleter itself is a ctypes callback. ctypes takes the GIL before running it, so a consumer may
call it from any thread. The callback object is deliberately never freed, so that a consumer that
calls it late in interpreter shutdown does not jump into freed memory.

Limitation: if a consumer's last reference to its tensor goes away *while a Python exception is
propagating* (a temporary passed to a call that raises), the ctypes deleter runs with that
exception pending; CPython then reports "Exception ignored on calling ctypes callback function"
and the pending exception is replaced. ``Tensor.torch()`` and ``Tensor.numpy()`` do not use
DLPack (they hand the memory to torch and numpy through buffer objects that torch and numpy release
natively) and are not affected; only direct ``from_dlpack(tensor)`` consumers are.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

c_int32, c_uint8, c_uint16, c_int64, c_uint64, c_void_p = (
    ctypes.c_int32, ctypes.c_uint8, ctypes.c_uint16, ctypes.c_int64, ctypes.c_uint64,
    ctypes.c_void_p)

kDLCPU = 1
kDLCUDA = 2


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(c_int64)),
        ("strides", ctypes.POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", DLTensor),
        ("manager_ctx", c_void_p),
        ("deleter", c_void_p),  # void (*)(DLManagedTensor*)
    ]


#: "auto": Tensor.__dlpack__ lets torch (if imported) or numpy make the capsule, and uses this
#: module only when they cannot; "ctypes": always this module.
EXPORTER = "auto"

CAPSULE_NAME = b"dltensor"
USED_CAPSULE_NAME = b"used_dltensor"


def _pyfunc(name: str, restype: Any, *argtypes: Any) -> Any:
    """A private prototype of a C-API function (ctypes.pythonapi's shared function objects are
    left alone: other libraries may set their own argtypes on them)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_PyCapsule_New = _pyfunc("PyCapsule_New", ctypes.py_object, c_void_p, c_void_p, c_void_p)
_PyCapsule_GetName = _pyfunc("PyCapsule_GetName", c_void_p, ctypes.py_object)
_PyCapsule_IsValid = _pyfunc("PyCapsule_IsValid", ctypes.c_int, ctypes.py_object,
                             ctypes.c_char_p)
_PyCapsule_GetPointer = _pyfunc("PyCapsule_GetPointer", c_void_p, ctypes.py_object,
                                ctypes.c_char_p)
_PyCapsule_SetName = _pyfunc("PyCapsule_SetName", ctypes.c_int, ctypes.py_object, c_void_p)
_Py_IncRef = _pyfunc("Py_IncRef", None, ctypes.py_object)

# The capsule's name must outlive every capsule: a buffer that is never freed.
_NAME_BUFFER = ctypes.create_string_buffer(CAPSULE_NAME)
_Py_IncRef(_NAME_BUFFER)


class _Export:
    """Everything one exported DLManagedTensor needs, kept until its deleter runs."""

    __slots__ = ("managed", "shape", "strides", "owner", "capsule", "__weakref__")

    def __init__(self, managed: DLManagedTensor, shape: Any, strides: Any, owner: Any) -> None:
        self.managed = managed
        self.shape = shape
        self.strides = strides
        self.owner = owner
        self.capsule: Any = None


# address of the DLManagedTensor -> its export. Entries leave when the consumer calls the
# deleter, or when their capsule is dropped unconsumed.
_LIVE: Dict[int, _Export] = {}
# The subset whose capsule this module still references (not yet seen consumed).
_PENDING: Dict[int, _Export] = {}
_registry_lock = threading.RLock()


def _deleter_impl(address: Optional[int], _live: Dict[int, _Export] = _LIVE,
                  _pending: Dict[int, _Export] = _PENDING,
                  _lock: Any = _registry_lock) -> None:
    if not address:
        return
    with _lock:
        _pending.pop(address, None)
        export = _live.pop(address, None)
    del export  # drops the owner (and may release the mapping) outside the lock


_DELETER_TYPE = ctypes.CFUNCTYPE(None, c_void_p)
_DELETER = _DELETER_TYPE(_deleter_impl)
_Py_IncRef(_DELETER)  # never freed: consumers may call it during interpreter shutdown
_DELETER_ADDRESS = ctypes.cast(_DELETER, c_void_p).value


def collect() -> int:
    """Drops the exports whose capsules were discarded without being consumed; returns how many.

    Runs automatically at each export and after each garbage collection."""
    dropped = []
    with _registry_lock:
        for address, export in list(_PENDING.items()):
            capsule = export.capsule
            if capsule is None:
                del _PENDING[address]
                continue
            consumed = not _PyCapsule_IsValid(capsule, CAPSULE_NAME)
            if consumed:
                # The consumer owns the DLManagedTensor now and will call the deleter.
                export.capsule = None
                del _PENDING[address]
            # References: export.capsule, the local `capsule`, getrefcount's argument.
            elif sys.getrefcount(capsule) <= 3:
                export.capsule = None
                del _PENDING[address]
                dropped.append(_LIVE.pop(address, None))
            del capsule
    count = len(dropped)
    del dropped
    return count


def _gc_callback(phase: str, info: Dict[str, Any]) -> None:
    if phase == "stop" and _PENDING:
        try:
            collect()
        except Exception:  # never let a gc callback raise
            pass


gc.callbacks.append(_gc_callback)


def live_exports() -> int:
    """How many DLPack exports are still alive (not yet deleted by a consumer or collected)."""
    return len(_LIVE)


def export(data: int, device: Tuple[int, int], dtype: Tuple[int, int],
           shape: Sequence[int], strides: Optional[Sequence[int]], owner: Any) -> Any:
    """A new legacy DLPack capsule (``"dltensor"``) for memory kept alive by ``owner``.

    ``device`` is (DLDeviceType, device id), ``dtype`` (DLDataTypeCode, bits), ``strides`` in
    elements (None = C-contiguous)."""
    if _PENDING:
        collect()
    ndim = len(shape)
    shape_array = (c_int64 * max(ndim, 1))(*shape)
    strides_array = (c_int64 * max(ndim, 1))(*strides) if strides is not None else None
    managed = DLManagedTensor()
    t = managed.dl_tensor
    t.data = data or None
    t.device = DLDevice(device[0], device[1])
    t.ndim = ndim
    t.dtype = DLDataType(dtype[0], dtype[1], 1)
    t.shape = ctypes.cast(shape_array, ctypes.POINTER(c_int64))
    t.strides = (ctypes.cast(strides_array, ctypes.POINTER(c_int64)) if strides_array is not None
                 else ctypes.POINTER(c_int64)())
    t.byte_offset = 0
    address = ctypes.addressof(managed)
    managed.manager_ctx = address
    managed.deleter = _DELETER_ADDRESS
    record = _Export(managed, shape_array, strides_array, owner)
    capsule = _PyCapsule_New(address, ctypes.addressof(_NAME_BUFFER), None)
    record.capsule = capsule
    with _registry_lock:
        _LIVE[address] = record
        _PENDING[address] = record
    return capsule


def is_consumed(capsule: Any) -> bool:
    """True once a consumer has taken the capsule (renamed it "used_dltensor")."""
    return not _PyCapsule_IsValid(capsule, CAPSULE_NAME)


def capsule_name(capsule: Any) -> str:
    address = _PyCapsule_GetName(capsule)
    return ctypes.string_at(address).decode() if address else ""


def view_capsule(capsule: Any) -> DLManagedTensor:
    """The DLManagedTensor of an unconsumed capsule, for inspection (tests, debugging)."""
    address = _PyCapsule_GetPointer(capsule, CAPSULE_NAME)
    return DLManagedTensor.from_address(address)


def consume(capsule: Any) -> DLManagedTensor:
    """Takes a capsule as a consumer would (renames it "used_dltensor"). The caller owns the
    returned DLManagedTensor and must call :func:`call_deleter` on it exactly once."""
    managed = view_capsule(capsule)
    if _PyCapsule_SetName(capsule, ctypes.addressof(_USED_NAME_BUFFER)) != 0:
        raise RuntimeError("PyCapsule_SetName failed")
    return managed


_USED_NAME_BUFFER = ctypes.create_string_buffer(USED_CAPSULE_NAME)
_Py_IncRef(_USED_NAME_BUFFER)


def call_deleter(managed: DLManagedTensor) -> None:
    """Calls a consumed DLManagedTensor's deleter, as a consumer does when it is done."""
    if managed.deleter:
        ctypes.CFUNCTYPE(None, c_void_p)(managed.deleter)(ctypes.addressof(managed))


__all__ = ["DLDevice", "DLDataType", "DLTensor", "DLManagedTensor", "export", "collect",
           "live_exports", "is_consumed", "capsule_name", "consume", "call_deleter",
           "kDLCPU", "kDLCUDA"]
