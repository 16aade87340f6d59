"""Loading libcompanion.so and declaring its C ABI (include/companion/companion.h) for ctypes.

The library is looked up on first use, not at import:

1. ``$COMPANION_LIBRARY`` (a path to the library file), if set;
2. ``libcompanion.so*`` beside this package's files (e.g. copied into ``python/companion/`` before
   ``pip install``);
3. when the package is imported from the source tree (``python/companion`` of a checkout), that
   tree's ``build/src/capi/libcompanion.so``: a developer's fresh build;
4. ``_native/libcompanion.so`` in this package: the copy an installed wheel carries (python/setup.py
   bundles it); after the checkout's build, so that a stale copy never shadows a fresh build;
5. ``ctypes.util.find_library("companion")`` (the system's library path).

Failing that, the call that needed it raises :class:`companion.LibraryNotFound`, naming every
place it looked.

Loading it also routes its log messages to ``logging.getLogger("companion")`` (see
:mod:`companion._log`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import pathlib
import threading
from typing import Any, List, Optional

from . import _log
from .errors import Error, LibraryNotFound, error_for_code

c_char_p = ctypes.c_char_p
c_void_p = ctypes.c_void_p
c_int = ctypes.c_int
c_double = ctypes.c_double
c_size_t = ctypes.c_size_t
c_uint32 = ctypes.c_uint32
c_int32 = ctypes.c_int32
c_uint64 = ctypes.c_uint64
c_int64 = ctypes.c_int64


class ConnectOptions(ctypes.Structure):
    """companion_connect_options."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("ns", c_char_p),
        ("device", c_char_p),
        ("socket_path", c_char_p),
        ("runtime_dir", c_char_p),
        ("client_name", c_char_p),
        ("discovery_timeout_s", c_double),
        ("registry", c_char_p),
        ("instance_id", c_char_p),
    ]


class ModelSpecC(ctypes.Structure):
    """companion_model_spec."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("source", c_char_p),
        ("revision", c_char_p),
        ("dtype", c_char_p),
        ("tp_size", c_uint32),
        ("tp_rank", c_uint32),
        ("tag", c_char_p),
    ]


class TensorC(ctypes.Structure):
    """companion_tensor (no size field: the calls filling it are passed its size, see
    _SIZED_BINDINGS)."""

    _fields_ = [
        ("name", c_void_p),  # not NUL-terminated: name_length bytes
        ("name_length", c_size_t),
        ("dtype", c_int32),
        ("ndim", c_int32),
        ("shape", ctypes.POINTER(c_int64)),
        ("strides", ctypes.POINTER(c_int64)),
        ("data", c_void_p),
        ("nbytes", c_uint64),
        ("device_type", c_int32),
        ("device_id", c_int32),
    ]


class ModelTableC(ctypes.Structure):
    """companion_model_table. The arrays it points at are read in place (model._Table: struct,
    memoryview columns or one torch tensor; see model._RECORD), stepping by record_size so that
    a newer library's longer records still read."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("record_size", c_uint32),
        ("count", c_size_t),
        ("records", c_void_p),
        ("names", c_void_p),
        ("names_bytes", c_size_t),
        ("dims", c_void_p),
        ("dims_count", c_size_t),
        ("segments", c_size_t),
    ]


class TensorDeclC(ctypes.Structure):
    """companion_tensor_decl."""

    _fields_ = [
        ("name", c_char_p),
        ("dtype", c_int32),
        ("ndim", c_int32),
        ("shape", ctypes.POINTER(c_int64)),
        ("alias_of", c_char_p),
    ]


class AttachOptionsC(ctypes.Structure):
    """companion_attach_options."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("generation", c_uint64),
        ("fingerprint_json", c_char_p),
        ("or_source", c_int32),
        ("wait", c_int32),
        ("timeout_s", c_double),
    ]


_P = ctypes.POINTER
_status = c_int  # companion_status (an int-sized enum)

# name: (restype, argtypes). Opaque handles travel as c_void_p.
_PROTOTYPES = {
    "companion_status_string": (c_char_p, [_status]),
    "companion_last_error": (c_char_p, []),
    "companion_version": (c_char_p, []),
    "companion_free": (None, [c_void_p]),
    "companion_connect_options_init": (None, [_P(ConnectOptions)]),
    "companion_model_spec_init": (None, [_P(ModelSpecC)]),
    "companion_client_connect": (_status, [_P(ConnectOptions), _P(c_void_p)]),
    "companion_client_close": (None, [c_void_p]),
    "companion_client_server_info": (_status, [c_void_p, _P(c_void_p)]),
    "companion_client_status": (_status, [c_void_p, _P(ModelSpecC), _P(c_void_p)]),
    "companion_client_list": (_status, [c_void_p, _P(c_void_p)]),
    "companion_client_health": (_status, [c_void_p, _P(c_void_p)]),
    "companion_client_instances": (_status, [c_void_p, _P(c_void_p)]),
    "companion_client_load": (_status, [c_void_p, _P(ModelSpecC), c_int, c_double,
                                        _P(c_void_p)]),
    "companion_client_unload": (_status, [c_void_p, _P(ModelSpecC), c_char_p, c_int,
                                          _P(c_void_p)]),
    "companion_client_wait_for_model_ready": (_status, [c_void_p, _P(ModelSpecC), c_double,
                                                        c_double, _P(c_void_p)]),
    "companion_client_get_model_parameters": (_status, [c_void_p, _P(ModelSpecC), c_double,
                                                        _P(c_void_p)]),
    "companion_model_release": (None, [c_void_p]),
    "companion_model_tensor_count": (c_size_t, [c_void_p]),
    "companion_model_tensor": (_status, [c_void_p, c_size_t, _P(TensorC)]),
    "companion_model_find": (_status, [c_void_p, c_char_p, _P(TensorC)]),
    "companion_model_info": (_status, [c_void_p, _P(c_void_p)]),
    "companion_client_subscribe": (_status, [c_void_p, _P(ModelSpecC), _P(c_void_p)]),
    "companion_status_stream_next": (_status, [c_void_p, c_double, _P(c_void_p)]),
    "companion_status_stream_close": (None, [c_void_p]),
}

# Publishing, generations and reload (protocol 1.1). Optional: a library without them still
# loads; calling one of these then raises (see function()).
_OPTIONAL_PROTOTYPES = {
    "companion_publish_claim": (_status, [c_void_p, c_char_p, c_char_p, c_int32, c_double,
                                          _P(c_void_p)]),
    "companion_publication_declare": (_status, [c_void_p, _P(TensorDeclC), c_size_t]),
    "companion_publication_tensor_count": (c_size_t, [c_void_p]),
    "companion_publication_tensor": (_status, [c_void_p, c_size_t, _P(TensorC)]),
    "companion_publication_info": (_status, [c_void_p, _P(c_void_p)]),
    "companion_publication_commit": (_status, [c_void_p, _P(c_void_p)]),
    "companion_publication_close": (None, [c_void_p]),
    "companion_attach_options_init": (None, [_P(AttachOptionsC)]),
    "companion_client_attach": (_status, [c_void_p, c_char_p, _P(AttachOptionsC),
                                          _P(c_void_p)]),
    "companion_client_reload": (_status, [c_void_p, c_char_p, c_int32, c_double,
                                          _P(c_void_p)]),
    "companion_client_subscribe_key": (_status, [c_void_p, c_char_p, _P(c_void_p)]),
    # The whole tensor table in one call; without it (an older library) MappedModel reads the
    # table a tensor at a time.
    "companion_model_table_init": (None, [_P(ModelTableC)]),
    "companion_model_get_table": (_status, [c_void_p, _P(ModelTableC)]),
    # The plan of MappedModel.state_dict()'s views (runs of evenly spaced tensors).
    "companion_plan_views": (_status, [_P(ModelTableC), c_void_p, c_void_p, _P(c_size_t),
                                       _P(c_size_t), c_void_p]),
    # The calls taking the caller's struct size (see _SIZED_BINDINGS).
    "companion_connect_options_init_sized": (None, [_P(ConnectOptions), c_size_t]),
    "companion_model_spec_init_sized": (None, [_P(ModelSpecC), c_size_t]),
    "companion_attach_options_init_sized": (None, [_P(AttachOptionsC), c_size_t]),
    "companion_model_table_init_sized": (None, [_P(ModelTableC), c_size_t]),
    "companion_model_tensor_sized": (_status, [c_void_p, c_size_t, _P(TensorC), c_size_t]),
    "companion_model_find_sized": (_status, [c_void_p, c_char_p, _P(TensorC), c_size_t]),
    "companion_publication_tensor_sized": (_status, [c_void_p, c_size_t, _P(TensorC), c_size_t]),
    "companion_publication_declare_sized": (_status, [c_void_p, _P(TensorDeclC), c_size_t,
                                                      c_size_t]),
    # Where the library's messages go (_log: the "companion" logger).
    "companion_set_log_handler": (_status, [_log.LOG_FN, c_void_p, c_int]),
}

# In companion.h these names are macros passing sizeof the caller's struct to the *_sized call,
# so that a library newer than the caller (with longer structs) never writes past them. The
# package binds the same names the same way, passing the sizes of its own structs above: its
# callers keep calling lib.companion_model_tensor(...) and the like. A library without the
# *_sized calls keeps its own functions of these names (its structs are no longer than these).
_SIZED_BINDINGS = {
    "companion_connect_options_init": ("companion_connect_options_init_sized", ConnectOptions),
    "companion_model_spec_init": ("companion_model_spec_init_sized", ModelSpecC),
    "companion_attach_options_init": ("companion_attach_options_init_sized", AttachOptionsC),
    "companion_model_table_init": ("companion_model_table_init_sized", ModelTableC),
    "companion_model_tensor": ("companion_model_tensor_sized", TensorC),
    "companion_model_find": ("companion_model_find_sized", TensorC),
    "companion_publication_tensor": ("companion_publication_tensor_sized", TensorC),
    "companion_publication_declare": ("companion_publication_declare_sized", TensorDeclC),
}

# C claim modes (companion_claim_mode).
CLAIM_NOW = 0
CLAIM_WAIT = 1
CLAIM_IF_UNPUBLISHED = 2

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None


def _candidates() -> List[str]:
    """Where the library may be, in lookup order (for loading and for the error message)."""
    out: List[str] = []
    env = os.environ.get("COMPANION_LIBRARY")
    if env:
        out.append(env)
        return out  # an explicit choice is not second-guessed
    here = pathlib.Path(__file__).resolve().parent
    beside = sorted(here.glob("libcompanion.so*"), key=lambda p: (len(p.name), p.name))
    out.extend(str(p) for p in beside)
    tree_build = _tree_build_library()
    if tree_build is not None and tree_build.exists():
        out.append(str(tree_build))
    bundled = here / _BUNDLED
    if bundled.exists():
        out.append(str(bundled))
    found = ctypes.util.find_library("companion")
    if found:
        out.append(found)
    return out


_BUNDLED = pathlib.Path("_native") / "libcompanion.so"  # python/setup.py puts it there


def _tree_build_library() -> Optional[pathlib.Path]:
    """<repository>/build/src/capi/libcompanion.so when this package is the source tree's
    python/companion (scripts/setup.sh builds there); None for an installed copy."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not ((root / "python" / "pyproject.toml").is_file() and
            (root / "include" / "companion" / "companion.h").is_file()):
        return None
    return root / "build" / "src" / "capi" / "libcompanion.so"


def _describe_search() -> str:
    env = os.environ.get("COMPANION_LIBRARY")
    here = pathlib.Path(__file__).resolve().parent
    if env:
        return f"$COMPANION_LIBRARY={env}"
    tree_build = _tree_build_library()
    in_tree = f"{tree_build} (the source tree's build), " if tree_build is not None else ""
    return (f"$COMPANION_LIBRARY (not set), {here}/libcompanion.so*, {in_tree}"
            f"{here / _BUNDLED} (a wheel's copy), "
            f"ctypes.util.find_library('companion') (the system library path)")


def load_library() -> ctypes.CDLL:
    """The loaded libcompanion.so (loaded once, on first use)."""
    global _lib, _lib_path
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is not None:
            return _lib
        problems = []
        for path in _candidates():
            try:
                candidate = ctypes.CDLL(path)
            except OSError as e:
                problems.append(f"{path}: {e}")
                continue
            missing = [n for n in _PROTOTYPES if not hasattr(candidate, n)]
            if missing:
                problems.append(f"{path}: not a Companion C library (no {', '.join(missing[:3])})")
                continue
            for name, (restype, argtypes) in _PROTOTYPES.items():
                fn = getattr(candidate, name)
                fn.restype = restype
                fn.argtypes = argtypes
            for name, (restype, argtypes) in _OPTIONAL_PROTOTYPES.items():
                fn = getattr(candidate, name, None)
                if fn is not None:
                    fn.restype = restype
                    fn.argtypes = argtypes
            _bind_sized(candidate)
            _log.install(candidate)
            _lib, _lib_path = candidate, path
            return candidate
        detail = "; ".join(problems) if problems else "no candidate file exists"
        raise LibraryNotFound(
            f"looked in {_describe_search()}: {detail}. Build it (target companion_capi: "
            f"<build>/src/capi/libcompanion.so) and set COMPANION_LIBRARY to its path, or copy it "
            f"into {pathlib.Path(__file__).resolve().parent}/.")


def _bind_sized(lib: ctypes.CDLL) -> None:
    """Binds each name of _SIZED_BINDINGS on lib to its *_sized call with the package's struct
    size appended (as companion.h's macros do)."""
    for name, (sized_name, struct) in _SIZED_BINDINGS.items():
        sized = getattr(lib, sized_name, None)
        if sized is None:
            continue

        def call(*args: Any, _sized: Any = sized, _size: int = ctypes.sizeof(struct)) -> Any:
            return _sized(*args, _size)

        call.__name__ = name
        setattr(lib, name, call)


def function(name: str) -> Any:
    """A function of the library, also one of the optional ones (publishing, attach, reload):
    raises :class:`companion.Error` naming the library when it lacks it (an older build)."""
    lib = load_library()
    fn = getattr(lib, name, None) if name in _OPTIONAL_PROTOTYPES else getattr(lib, name)
    if fn is None:
        raise Error(f"{_lib_path} has no {name}(): the library is older than this package "
                    "(publishing came with protocol 1.1, the *_sized calls later); rebuild or "
                    "upgrade libcompanion.so")
    return fn


_INITIALIZED: dict = {}  # init function name -> the struct as it left it


def initialized(struct: Any, init: str) -> Any:
    """A new ``struct`` as the library's ``init`` call (e.g. companion_model_spec_init) leaves
    it: its struct_size and defaults. The call runs once per library; later structs are copies
    of its result (no call into the library on every request)."""
    template = _INITIALIZED.get(init)
    if template is None:
        template = struct()
        function(init)(ctypes.byref(template))
        _INITIALIZED[init] = template
    return struct.from_buffer_copy(template)


def has_function(name: str) -> bool:
    """Whether the loaded library has this function (optional ones: publishing, attach...)."""
    return getattr(load_library(), name, None) is not None


def library_path() -> str:
    """The path of the library in use (loading it if needed)."""
    load_library()
    assert _lib_path is not None
    return _lib_path


def last_error() -> str:
    raw = load_library().companion_last_error()
    return raw.decode("utf-8", "replace") if raw else ""


def check(status: int) -> None:
    """Raises the Error subclass of a non-OK status, with the thread's last error message."""
    if status != 0:
        raise error_for_code(status, last_error())


def take_string(pointer: c_void_p) -> Optional[str]:
    """Copies a library-allocated NUL-terminated string and frees it."""
    if not pointer.value:
        return None
    lib = load_library()
    try:
        return ctypes.string_at(pointer.value).decode("utf-8", "replace")
    finally:
        lib.companion_free(pointer)


def take_json(pointer: c_void_p) -> Any:
    text = take_string(pointer)
    return None if text is None else json.loads(text)


def encode(value: Optional[str]) -> Optional[bytes]:
    if value is None:
        return None
    return os.fsencode(value) if isinstance(value, (str, os.PathLike)) else bytes(value)


def version() -> str:
    """The library's software version (``companion_version()``)."""
    raw = load_library().companion_version()
    return raw.decode() if raw else ""


def status_string(code: int) -> str:
    raw = load_library().companion_status_string(code)
    return raw.decode() if raw else ""


__all__ = ["load_library", "library_path", "check", "take_json", "take_string", "Error",
           "ConnectOptions", "ModelSpecC", "TensorC", "ModelTableC", "TensorDeclC",
           "AttachOptionsC", "function", "has_function", "version", "status_string"]
