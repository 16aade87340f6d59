"""Companion's errors: one exception class per status code of ``status_codes.h``.

:data:`STATUS_CODES` mirrors ``COMPANION_STATUS_CODES`` in ``include/companion/status_codes.h``
entry for entry (a test checks that the two agree). Every other name here is generated from it.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple, Type


class StatusCodeInfo(NamedTuple):
    """One row of ``COMPANION_STATUS_CODES``: X(C_NAME, CppName, value, "description")."""

    c_name: str
    name: str
    value: int
    description: str


#: The list of ``include/companion/status_codes.h``, in its order.
STATUS_CODES: Tuple[StatusCodeInfo, ...] = (
    StatusCodeInfo("OK", "Ok", 0, "ok"),
    StatusCodeInfo("INVALID_ARGUMENT", "InvalidArgument", 1, "invalid argument"),
    StatusCodeInfo("NOT_FOUND", "NotFound", 2, "model not found"),
    StatusCodeInfo("BAD_CHECKPOINT", "BadCheckpoint", 3, "bad checkpoint"),
    StatusCodeInfo("UNKNOWN_DTYPE", "UnknownDtype", 4, "unknown dtype"),
    StatusCodeInfo("NOT_PERMITTED", "NotPermitted", 5, "not permitted"),
    StatusCodeInfo("OUT_OF_MEMORY", "OutOfMemory", 6, "out of memory"),
    StatusCodeInfo("DEVICE_MISMATCH", "DeviceMismatch", 7, "device mismatch"),
    StatusCodeInfo("VERSION_MISMATCH", "VersionMismatch", 8, "protocol version mismatch"),
    StatusCodeInfo("PROTOCOL_ERROR", "ProtocolError", 9, "protocol error"),
    StatusCodeInfo("IO_ERROR", "IoError", 10, "i/o error"),
    StatusCodeInfo("TIMEOUT", "Timeout", 11, "timed out"),
    StatusCodeInfo("UNAVAILABLE", "Unavailable", 12, "unavailable"),
    StatusCodeInfo("NOT_READY", "NotReady", 13, "model not loaded yet"),
    StatusCodeInfo("MODEL_IN_USE", "ModelInUse", 14, "model in use"),
    StatusCodeInfo("CANCELLED", "Cancelled", 15, "cancelled"),
    StatusCodeInfo("CUDA_ERROR", "CudaError", 16, "CUDA error"),
    StatusCodeInfo("CONNECTION_CLOSED", "ConnectionClosed", 17, "connection closed"),
    StatusCodeInfo("INTERNAL", "Internal", 18, "internal error"),
    StatusCodeInfo("LIMIT_EXCEEDED", "LimitExceeded", 19, "limit exceeded"),
    StatusCodeInfo("FINGERPRINT_MISMATCH", "FingerprintMismatch", 20, "fingerprint mismatch"),
)

_BY_VALUE: Dict[int, StatusCodeInfo] = {c.value: c for c in STATUS_CODES}
_BY_C_NAME: Dict[str, StatusCodeInfo] = {c.c_name: c for c in STATUS_CODES}


class Error(Exception):
    """Base of every Companion error.

    ``code`` is the numeric status code (``companion_status``), ``code_name`` its C name
    (``"NOT_FOUND"``, as ``companion ... --json`` prints it) and ``message`` the library's message
    (``companion_last_error()``), or the code's description when the library gave none.
    """

    #: Set on each generated subclass; ``Error`` itself covers codes this package does not know.
    code: int = -1
    code_name: str = "UNKNOWN"
    description: str = "unknown status"

    def __init__(self, message: Optional[str] = None, code: Optional[int] = None) -> None:
        if code is not None:
            self.code = int(code)
            info = _BY_VALUE.get(self.code)
            if info is not None:
                self.code_name = info.c_name
                self.description = info.description
        self.message = message if message else self.description
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.description}: {self.message}" if self.message != self.description \
            else self.message

    def __reduce__(self):  # picklable across processes (multiprocessing, Ray, ...)
        return (error_for_code, (self.code, self.message))


class LibraryNotFound(Error):
    """libcompanion.so could not be found or loaded (not a status code of the library)."""

    code = -1
    code_name = "LIBRARY_NOT_FOUND"
    description = "libcompanion.so not found"

    def __reduce__(self):
        return (LibraryNotFound, (self.message,))


# Extra base classes for codes that have a natural Python counterpart.
_EXTRA_BASES: Dict[str, Tuple[type, ...]] = {
    "INVALID_ARGUMENT": (ValueError,),
    "TIMEOUT": (TimeoutError,),
}

#: Exception class per code value (OK has none).
ERROR_CLASSES: Dict[int, Type[Error]] = {}
__all__: List[str] = ["Error", "LibraryNotFound", "STATUS_CODES", "StatusCodeInfo",
                      "ERROR_CLASSES", "error_for_code", "code_name"]


def _make_class(info: StatusCodeInfo) -> Type[Error]:
    bases = (Error,) + _EXTRA_BASES.get(info.c_name, ())
    doc = f"Status {info.c_name} ({info.value}): {info.description}."

    def __init__(self, message: Optional[str] = None, code: Optional[int] = None) -> None:
        Error.__init__(self, message, info.value if code is None else code)

    # OSError and friends take positional arguments of their own: always go through Error's.
    def __str__(self) -> str:
        return Error.__str__(self)

    return type(info.name, bases, {"__doc__": doc, "__module__": __name__, "code": info.value,
                                   "code_name": info.c_name, "description": info.description,
                                   "__init__": __init__, "__str__": __str__})


for _info in STATUS_CODES:
    if _info.value == 0:
        continue
    _cls = _make_class(_info)
    globals()[_info.name] = _cls
    ERROR_CLASSES[_info.value] = _cls
    __all__.append(_info.name)
del _info, _cls

# Static names for type checkers and readers (the classes above, bound once more).
InvalidArgument: Type[Error] = ERROR_CLASSES[1]
NotFound: Type[Error] = ERROR_CLASSES[2]
BadCheckpoint: Type[Error] = ERROR_CLASSES[3]
UnknownDtype: Type[Error] = ERROR_CLASSES[4]
NotPermitted: Type[Error] = ERROR_CLASSES[5]
OutOfMemory: Type[Error] = ERROR_CLASSES[6]
DeviceMismatch: Type[Error] = ERROR_CLASSES[7]
VersionMismatch: Type[Error] = ERROR_CLASSES[8]
ProtocolError: Type[Error] = ERROR_CLASSES[9]
IoError: Type[Error] = ERROR_CLASSES[10]
Timeout: Type[Error] = ERROR_CLASSES[11]
Unavailable: Type[Error] = ERROR_CLASSES[12]
NotReady: Type[Error] = ERROR_CLASSES[13]
ModelInUse: Type[Error] = ERROR_CLASSES[14]
Cancelled: Type[Error] = ERROR_CLASSES[15]
CudaError: Type[Error] = ERROR_CLASSES[16]
ConnectionClosed: Type[Error] = ERROR_CLASSES[17]
Internal: Type[Error] = ERROR_CLASSES[18]
LimitExceeded: Type[Error] = ERROR_CLASSES[19]
FingerprintMismatch: Type[Error] = ERROR_CLASSES[20]


def error_for_code(code: int, message: Optional[str] = None) -> Error:
    """The exception instance for a status code (``Error`` itself for an unknown code)."""
    cls = ERROR_CLASSES.get(int(code))
    if cls is None:
        return Error(message or f"unknown status code {code}", code)
    return cls(message)


def error_for_name(name: str, message: Optional[str] = None) -> Error:
    """The exception instance for a C status name as JSON documents carry it ("NOT_FOUND")."""
    info = _BY_C_NAME.get(name)
    if info is None or info.value == 0:
        err = Error(message or name)
        err.code_name = name
        return err
    return ERROR_CLASSES[info.value](message)


def code_name(code: int) -> str:
    """"NOT_FOUND" for 2; "UNKNOWN(99)" for a code this package does not know."""
    info = _BY_VALUE.get(int(code))
    return info.c_name if info else f"UNKNOWN({code})"
