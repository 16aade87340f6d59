"""The seed's client API (``dynamo.companion``), on top of :mod:`companion`.

The seed's flow works unchanged::

    client = await create_model_client(runtime, vllm_config, namespace="companion")
    success, info = await client.wait_for_model_ready()
    if success:
        parameters = await client.get_model_parameters()
        for name, rebuild_info in parameters.items():
            tensor = client.reconstruct_parameter(rebuild_info)

``create_model_client`` is a coroutine function returning an :class:`AsyncModelClient`, whose
blocking calls run in the event loop's default executor. :func:`create_model_client_sync`
returns the synchronous :class:`ModelClient` with the same methods.

Differences from the seed: ``runtime`` (Dynamo's DistributedRuntime) is accepted and ignored
(discovery uses Companion's local registry); ``get_model_parameters()`` returns
:class:`RebuildInfo` descriptions of mapped memory, not pickled CUDA IPC handles; the default
device is the current CUDA device when torch has initialised CUDA, else the host server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import sys
from typing import Any, Dict, Optional, Tuple, TypeVar, Union

from ._types import ModelSpec, ModelStatus
from .client import Client, StatusStream, connect
from .errors import Error
from .model import MappedModel

__all__ = ["create_model_client", "create_model_client_sync", "ModelClient", "AsyncModelClient",
           "RebuildInfo", "spec_from_config", "default_device"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RebuildInfo:
    """How to rebuild one parameter: a description of mapped memory, no pickles. The ``model``
    reference keeps the mapping alive as long as the RebuildInfo (or a tensor from it) lives."""

    name: str
    dtype: str                  # safetensors spelling: "BF16", "F16", "F32", ...
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]    # in elements
    device: str                 # "cpu" or "cuda:N" (this process's ordinal)
    nbytes: int
    model: MappedModel = dataclasses.field(repr=False, compare=False)

    def tensor(self) -> Any:
        """The zero-copy torch.Tensor (same as ``reconstruct_parameter``)."""
        return self.model[self.name].torch()


def default_device() -> str:
    """The current CUDA device if torch is imported and has initialised CUDA, else "host"."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return str(torch.cuda.current_device())
    except Exception:
        pass
    return "host"


def spec_from_config(config: Any) -> ModelSpec:
    """A ModelSpec from a ModelSpec, a source (str or path), or an object shaped like vLLM's
    VllmConfig (``model_config.model``, ``model_config.dtype`` (torch dtype or str; "auto" =
    as stored), optional ``model_config.revision``, ``parallel_config.tensor_parallel_size``,
    ``parallel_config.rank`` (0 if absent)). A bare ModelConfig-like object (``.model``,
    ``.dtype``) works too."""
    if isinstance(config, ModelSpec):
        return config
    if isinstance(config, (str, os.PathLike)):
        return ModelSpec(config)
    model_config = getattr(config, "model_config", None)
    if model_config is None and isinstance(getattr(config, "model", None), (str, os.PathLike)):
        model_config = config
    if model_config is None:
        raise TypeError(f"cannot find a model in {type(config).__name__}: pass a ModelSpec, a "
                        "source, or a vLLM-config-shaped object with model_config.model")
    parallel = getattr(config, "parallel_config", None)
    tp_size = getattr(parallel, "tensor_parallel_size", 1) if parallel is not None else 1
    rank = getattr(parallel, "rank", 0) if parallel is not None else 0
    revision = getattr(model_config, "revision", None)
    return ModelSpec(model_config.model, revision=revision if isinstance(revision, str) else None,
                     dtype=getattr(model_config, "dtype", None), tp_size=tp_size or 1,
                     tp_rank=rank or 0)


class ModelClient:
    """The seed's client, synchronous: one model on one server."""

    def __init__(self, client: Client, spec: ModelSpec, owns_client: bool = True) -> None:
        self.client = client
        self.spec = spec
        self._owns_client = owns_client
        self.model: Optional[MappedModel] = None

    def wait_for_model_ready(self, initial_timeout: Optional[float] = 30.0,
                             loading_timeout: Optional[float] = 600.0
                             ) -> Tuple[bool, Dict[str, Any]]:
        """Triggers the load if needed and waits for it. Returns (True, status) once loaded, or
        (False, info) with info["error"] = {"code", "message"} on failure or timeout."""
        try:
            status = self.client.wait_for_model_ready(self.spec, initial_timeout,
                                                      loading_timeout)
        except Error as e:
            return False, {"source": self.spec.source, "state": "error",
                           "error": {"code": e.code_name, "message": e.message}}
        return status.loaded, status.to_dict()

    def get_model_parameters(self, timeout: Optional[float] = None) -> Dict[str, RebuildInfo]:
        """Maps the model (loading it if needed): ``{name: RebuildInfo}``."""
        model = self.client.get_model_parameters(self.spec, timeout=timeout)
        self.model = model
        return {name: RebuildInfo(name, t.dtype_name, t.shape, t.strides, t.device, t.nbytes,
                                  model)
                for name, t in model.tensors().items()}

    def reconstruct_parameter(self, rebuild_info: RebuildInfo) -> Any:
        """The parameter as a zero-copy torch.Tensor (read-only memory: do not write)."""
        return rebuild_info.tensor()

    def get_status(self) -> ModelStatus:
        return self.client.status(self.spec)

    def status_stream(self, timeout: Optional[float] = None) -> StatusStream:
        return self.client.status_stream(self.spec, timeout)

    def close(self) -> None:
        """Closes the connection (if this client opened it). Mapped tensors stay valid."""
        self.model = None
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


class AsyncModelClient:
    """The seed's client as the seed used it: ``await`` the blocking calls, which run in the
    event loop's default executor; ``reconstruct_parameter`` is synchronous."""

    def __init__(self, sync: ModelClient) -> None:
        self.sync = sync

    @property
    def client(self) -> Client:
        return self.sync.client

    @property
    def spec(self) -> ModelSpec:
        return self.sync.spec

    async def wait_for_model_ready(self, initial_timeout: Optional[float] = 30.0,
                                   loading_timeout: Optional[float] = 600.0
                                   ) -> Tuple[bool, Dict[str, Any]]:
        return await _run(self.sync.wait_for_model_ready, initial_timeout, loading_timeout)

    async def get_model_parameters(self, timeout: Optional[float] = None
                                   ) -> Dict[str, RebuildInfo]:
        return await _run(self.sync.get_model_parameters, timeout)

    def reconstruct_parameter(self, rebuild_info: RebuildInfo) -> Any:
        return self.sync.reconstruct_parameter(rebuild_info)

    async def get_status(self) -> ModelStatus:
        return await _run(self.sync.get_status)

    def close(self) -> None:
        self.sync.close()

    async def aclose(self) -> None:
        await _run(self.sync.close)

    async def __aenter__(self) -> "AsyncModelClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def create_model_client_sync(runtime: Any = None,
                             vllm_config: Union[ModelSpec, str, Any, None] = None,
                             namespace: str = "companion", device: Any = None,
                             **connect_options: Any) -> ModelClient:
    """Connects to the server of ``device`` (default: :func:`default_device`) and returns the
    synchronous seed client for the model ``vllm_config`` describes (a ModelSpec, a source, or
    a vLLM-config-shaped object). ``runtime`` is ignored. ``connect_options``: socket_path,
    runtime_dir, discovery_timeout, client_name (see :func:`companion.connect`)."""
    if vllm_config is None:
        raise TypeError("create_model_client needs a model: a ModelSpec, a source or a vLLM "
                        "config")
    spec = spec_from_config(vllm_config)
    client = connect(namespace=namespace,
                     device=default_device() if device is None else device, **connect_options)
    return ModelClient(client, spec)


async def create_model_client(runtime: Any = None,
                              vllm_config: Union[ModelSpec, str, Any, None] = None,
                              namespace: str = "companion", device: Any = None,
                              **connect_options: Any) -> AsyncModelClient:
    """As the seed: ``client = await create_model_client(runtime, vllm_config,
    namespace="companion")``. See :func:`create_model_client_sync` for the arguments."""
    if device is None:
        device = default_device()  # in the caller's thread, where torch's CUDA state is
    sync = await _run(create_model_client_sync, runtime, vllm_config, namespace, device,
                      **connect_options)
    return AsyncModelClient(sync)
