"""The library's log messages, routed to ``logging.getLogger("companion")``.

libcompanion.so writes nothing to stderr by itself: it hands each message to one handler that
its host installs (``companion_set_log_handler``). When the package loads the library it installs
a ctypes callback, kept for the life of the process, that passes every message on to the
``companion`` logger at the matching level (debug, info, warning, error).

The library filters by level before it calls Python, so a message below the level costs no call
into the interpreter. That level is the logger's effective level when the library loads (the
first call that needs it); :func:`set_log_level` changes it later. Like any library's logger,
``companion`` has a ``NullHandler``: its records show wherever the application's logging
configuration sends them (``logging.basicConfig()``...), and nowhere without one.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
from typing import Any, Optional, Union

logger = logging.getLogger("companion")
logger.addHandler(logging.NullHandler())

# companion_log_level, and the logging levels they become.
LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF = range(5)
_TO_LOGGING = {LOG_DEBUG: logging.DEBUG, LOG_INFO: logging.INFO, LOG_WARN: logging.WARNING,
               LOG_ERROR: logging.ERROR}

# companion_log_fn: void (*)(void* user, int level, const char* message).
LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)


def _forward(_user: Any, level: int, message: Optional[bytes]) -> None:
    # Runs on the thread that logged (a library thread too); ctypes takes the GIL for it. An
    # exception cannot cross into C: logging reports its handlers' own errors.
    try:
        text = message.decode("utf-8", "replace") if message else ""
        logger.log(_TO_LOGGING.get(level, logging.ERROR), text)
    except Exception:
        pass


# The one callback object, alive as long as the process: the library holds its address.
_CALLBACK = LOG_FN(_forward)
_NO_HANDLER = LOG_FN()  # NULL
_installed_in: Optional[ctypes.CDLL] = None


def library_level(level: int) -> int:
    """The library level passing on the messages that a logger at ``level`` keeps."""
    for library, python in sorted(_TO_LOGGING.items()):
        if level <= python:
            return library
    return LOG_OFF


def install(lib: ctypes.CDLL) -> None:
    """Routes lib's messages to the ``companion`` logger at its effective level (called when the
    library loads). A library without companion_set_log_handler is left as it is."""
    if getattr(lib, "companion_set_log_handler", None) is not None:
        _route(lib, logger.getEffectiveLevel())


def _route(lib: ctypes.CDLL, level: int) -> int:
    """Installs the callback in lib at the library level for ``level``; the call's status."""
    global _installed_in
    status = lib.companion_set_log_handler(_CALLBACK, None, library_level(level))
    if _installed_in is None:
        # Before the interpreter goes, the library's own threads must stop calling into it.
        atexit.register(_uninstall)
    _installed_in = lib
    return status


def _uninstall() -> None:
    global _installed_in
    if _installed_in is not None:
        _installed_in.companion_set_log_handler(_NO_HANDLER, None, LOG_OFF)
        _installed_in = None


def set_log_level(level: Union[int, str, None] = None) -> None:
    """Which of the library's messages reach ``logging.getLogger("companion")``: those at
    ``level`` and above (``logging.DEBUG``, ``"INFO"``...); None: the logger's effective level
    now. The logger's own level is not changed: set both to see debug messages, e.g.
    ``logging.getLogger("companion").setLevel(logging.DEBUG); companion.set_log_level()``.
    Loads the library if it is not loaded yet."""
    from . import _lib

    if level is None:
        level = logger.getEffectiveLevel()
    elif isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise ValueError(f"unknown logging level {level!r}")
        level = named
    _lib.function("companion_set_log_handler")  # raises for a library without it
    _lib.check(_route(_lib.load_library(), level))
