"""Companion: attach to AI model weights shared zero-copy by a Companion server.

Pure Python over the C ABI of ``libcompanion.so`` (ctypes). Importing the package needs neither
the library nor torch nor numpy; the first call that needs the library loads it (see
:mod:`companion._lib` for where it looks) and raises :class:`LibraryNotFound` if it cannot.

    import companion
    with companion.connect(device=0) as client:
        weights = client.state_dict("/models/opt-125m")   # {name: torch.Tensor}, zero-copy

A process can also publish its own tensors (engine-shaped: fused, quantized, sharded) under a key
for others to attach, one writer building for many readers:

    with companion.connect() as client:
        mapped = client.attach_or_publish("llama-8b/int8/tp0", {"engine": "mine", "tp": "0/2"},
                                          build=lambda: build_and_quantize())
        companion.torch.attach_module(meta_model, mapped)

See :func:`connect`, :class:`Client`, :class:`MappedModel`, :class:`Tensor`, :class:`Publication`,
:func:`companion.torch.publish_module`, :func:`companion.torch.attach_module`,
:func:`companion.torch.load_into_module` and the seed-compatible
:func:`create_model_client` (``companion.dynamo_compat``).

The library's log messages go to ``logging.getLogger("companion")`` (never straight to stderr);
:func:`set_log_level` sets which of them the library passes on.
"""
from __future__ import annotations

from . import errors
from ._lib import library_path, load_library
from ._lib import version as library_version
from ._log import set_log_level
from ._types import DTYPES, DType, GenerationInfo, ModelSpec, ModelState, ModelStatus
from .client import Client, StatusStream, connect
from .dynamo_compat import (AsyncModelClient, ModelClient, RebuildInfo, create_model_client,
                            create_model_client_sync)
from .errors import (STATUS_CODES, BadCheckpoint, Cancelled, ConnectionClosed, CudaError,
                     DeviceMismatch, Error, FingerprintMismatch, Internal, InvalidArgument, IoError, LibraryNotFound,
                     LimitExceeded, ModelInUse, NotFound, NotPermitted, NotReady, OutOfMemory, ProtocolError,
                     Timeout, Unavailable, UnknownDtype, VersionMismatch)
from .model import MappedModel, Tensor
from .publish import Publication, WritableTensor

__version__ = "0.1.0"

__all__ = [
    "__version__", "connect", "Client", "StatusStream", "ModelSpec", "ModelStatus", "ModelState",
    "MappedModel", "Tensor", "Publication", "WritableTensor", "GenerationInfo", "DType",
    "DTYPES", "library_path", "load_library", "set_log_level",
    "library_version", "errors", "STATUS_CODES",
    "create_model_client", "create_model_client_sync", "ModelClient", "AsyncModelClient",
    "RebuildInfo",
    "Error", "LibraryNotFound", "InvalidArgument", "NotFound", "BadCheckpoint", "UnknownDtype",
    "NotPermitted", "OutOfMemory", "DeviceMismatch", "VersionMismatch", "ProtocolError",
    "IoError", "Timeout", "Unavailable", "NotReady", "ModelInUse", "Cancelled", "CudaError",
    "ConnectionClosed", "Internal", "LimitExceeded", "FingerprintMismatch",
]
