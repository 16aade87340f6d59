"""The client: find a device's server, load and unload models, map their weights."""
from __future__ import annotations

import collections.abc
import ctypes
import os
import re
import threading
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Union)

from . import _lib
from ._types import ModelSpec, ModelStatus, SpecLike, check_fingerprint, fingerprint_json
from .errors import InvalidArgument, NotFound, Timeout
from .model import MappedModel, _ModelHandle

if TYPE_CHECKING:
    from .publish import Publication

DeviceLike = Union[str, int, Any]


def _timeout(value: Optional[float]) -> float:
    """None = no limit (the C ABI's negative value)."""
    return -1.0 if value is None else float(value)


def normalize_device(device: DeviceLike) -> str:
    """The ``device`` string of the C ABI: "host", a GPU ordinal ("0"), UUID ("GPU-...") or PCI
    bus id. Also accepts ints, "cpu" (= host), "cuda" / "cuda:N" and torch.device objects."""
    if device is None:
        return "host"
    if isinstance(device, bool):
        raise TypeError("device must be 'host', a GPU ordinal, UUID or PCI bus id")
    if isinstance(device, int):
        return str(device)
    kind = getattr(device, "type", None)
    if kind is not None and not isinstance(device, str):  # torch.device
        if kind == "cpu":
            return "host"
        if kind == "cuda":
            index = device.index
            if index is None:
                import torch

                index = torch.cuda.current_device()
            return str(index)
        raise ValueError(f"unsupported device {device!r}")
    text = str(device)
    if text in ("", "cpu", "host"):
        return "host"
    if text == "cuda":
        import torch

        return str(torch.cuda.current_device())
    if text.startswith("cuda:"):
        return text[len("cuda:"):]
    return text


class _NativeHandle:
    """An owned C handle that may be used from several threads and closed from any of them: the
    native close happens once no call is using it."""

    def __init__(self, ptr: int, closer: Callable[[int], None], what: str) -> None:
        self._ptr = ptr
        self._closer = closer
        self._what = what
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if self._closed:
                raise InvalidArgument(f"the {self._what} is closed")
            self._users += 1
            return self._ptr

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            ptr = self._take_if_done()
        if ptr:
            self._closer(ptr)

    def _take_if_done(self) -> int:
        if self._closed and self._users == 0 and self._ptr:
            ptr, self._ptr = self._ptr, 0
            return ptr
        return 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ptr = self._take_if_done()
        if ptr:
            self._closer(ptr)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _SpecBuffer:
    """A companion_model_spec filled from a ModelSpec (the encoded strings stay referenced)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.struct = _lib.initialized(_lib.ModelSpecC, "companion_model_spec_init")
        self._keep = [_lib.encode(spec.source), _lib.encode(spec.revision),
                      _lib.encode(spec.dtype), _lib.encode(spec.tag)]
        self.struct.source, self.struct.revision, self.struct.dtype, self.struct.tag = self._keep
        if spec.tp_size < 1 or spec.tp_rank < 0 or spec.tp_size > 0xFFFFFFFF \
                or spec.tp_rank > 0xFFFFFFFF:
            raise InvalidArgument(f"tp_size {spec.tp_size} / tp_rank {spec.tp_rank} out of range")
        self.struct.tp_size = spec.tp_size
        self.struct.tp_rank = spec.tp_rank

    @property
    def ref(self) -> Any:
        return ctypes.byref(self.struct)


_SHORT_ID = re.compile(r"[0-9a-f]{12}")
_DEFAULT: Any = object()


class StatusStream:
    """Status updates of one model, or of every model: the current state first, then each
    change. Iterate it (each item waits up to ``timeout`` seconds, then raises
    :class:`companion.Timeout`; None = forever), or call :meth:`next` with a timeout of its own.
    Close it (or use it as a context manager) when done. One thread at a time."""

    def __init__(self, ptr: int, timeout: Optional[float]) -> None:
        lib = _lib.load_library()
        self._handle = _NativeHandle(ptr, lib.companion_status_stream_close, "status stream")
        self.timeout = timeout

    def next(self, timeout: Any = _DEFAULT) -> ModelStatus:
        """The next status; waits up to ``timeout`` s (None = forever; default: the stream's
        own timeout). Raises :class:`companion.Timeout` when none came in time."""
        if timeout is _DEFAULT:
            timeout = self.timeout
        lib = _lib.load_library()
        out = ctypes.c_void_p()
        with self._handle as ptr:
            _lib.check(lib.companion_status_stream_next(ptr, _timeout(timeout),
                                                        ctypes.byref(out)))
        return ModelStatus.from_json(_lib.take_json(out))

    def __iter__(self) -> Iterator[ModelStatus]:
        return self

    def __next__(self) -> ModelStatus:
        if self._handle.closed:
            raise StopIteration
        return self.next()

    def close(self) -> None:
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def __enter__(self) -> "StatusStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass


class Client:
    """A connection to one device's Companion server. Thread-safe: requests are serialised by the
    library; blocking calls release the GIL. Close it, or use it as a context manager. Models
    mapped through it stay valid after it is closed."""

    def __init__(self, ptr: int, options: Dict[str, Any]) -> None:
        lib = _lib.load_library()
        self._handle = _NativeHandle(ptr, lib.companion_client_close, "client")
        self.options = options

    # ---- plumbing -----------------------------------------------------------------------------

    def _json_call(self, fn: Callable[..., int], *args: Any) -> Any:
        out = ctypes.c_void_p()
        with self._handle as ptr:
            _lib.check(fn(ptr, *args, ctypes.byref(out)))
        return _lib.take_json(out)

    # ---- information ------------------------------------------------------------------------

    def server_info(self) -> Dict[str, Any]:
        """The identity of the instance used last: instance_id, namespace, component, device,
        gpu_uuid, pci_bus_id, device_ordinal, backends, default_backend, pid, version,
        socket_path..."""
        return self._json_call(_lib.load_library().companion_client_server_info)

    def health(self) -> Dict[str, Any]:
        """state ("serving"), uptime_ms, models_loaded, models_total, clients, leases,
        slab_bytes, server (the identity), registry ("local" or the etcd URL), registered and
        registry_error (etcd: whether the record is in etcd now, and why not), refused (requests
        and connections refused by a limit or the peer policy since start, by reason),
        memory_budget (bytes; 0: none) and evictions (models evicted since start)."""
        return self._json_call(_lib.load_library().companion_client_health)

    def instances(self) -> List[Dict[str, Any]]:
        """The live server instances this client chooses among (their identities). Requests
        about a model go to the instance that holds it, else round robin; when an instance is
        lost, requests fail over to the next one and mapped models stay valid."""
        return self._json_call(_lib.load_library().companion_client_instances) or []

    def list(self) -> List[ModelStatus]:
        """Every model the server holds."""
        docs = self._json_call(_lib.load_library().companion_client_list) or []
        return [ModelStatus.from_json(d) for d in docs]

    def status(self, spec: SpecLike) -> ModelStatus:
        """One model's status (state "ready" for a model the server does not hold)."""
        s = _SpecBuffer(ModelSpec.of(spec))
        return ModelStatus.from_json(
            self._json_call(_lib.load_library().companion_client_status, s.ref))

    # ---- loading ------------------------------------------------------------------------------

    def load(self, spec: SpecLike, wait: bool = True,
             timeout: Optional[float] = None) -> ModelStatus:
        """Starts loading the model (wait=False returns at once) or loads it and waits until it
        is loaded (up to ``timeout`` s; None = no limit). Raises the load's error."""
        s = _SpecBuffer(ModelSpec.of(spec))
        return ModelStatus.from_json(self._json_call(
            _lib.load_library().companion_client_load, s.ref, 1 if wait else 0,
            _timeout(timeout)))

    def unload(self, spec_or_key: Union[SpecLike, str], force: bool = False) -> ModelStatus:
        """Unloads a model, named by a ModelSpec, a source, a key ("source=...;dtype=...", or a
        published key) or a short id (12 hex digits, as ``list()`` shows). Raises ModelInUse
        while clients hold leases, unless ``force`` (clients keep their mappings)."""
        lib = _lib.load_library()
        if isinstance(spec_or_key, str) and (_SHORT_ID.fullmatch(spec_or_key)
                                             or spec_or_key.startswith("source=")):
            return ModelStatus.from_json(self._json_call(
                lib.companion_client_unload, None, _lib.encode(spec_or_key), 1 if force else 0))
        if isinstance(spec_or_key, str) and spec_or_key:
            # A published key is any string: try it as a key first, then as a source.
            try:
                return ModelStatus.from_json(self._json_call(
                    lib.companion_client_unload, None, spec_or_key.encode("utf-8"),
                    1 if force else 0))
            except (NotFound, InvalidArgument):
                pass
        s = _SpecBuffer(ModelSpec.of(spec_or_key))  # type: ignore[arg-type]
        return ModelStatus.from_json(self._json_call(
            lib.companion_client_unload, s.ref, None, 1 if force else 0))

    def wait_for_model_ready(self, spec: SpecLike, initial_timeout: Optional[float] = 30.0,
                             loading_timeout: Optional[float] = 600.0) -> ModelStatus:
        """As the seed: triggers the load if needed and waits until the model is loaded.
        ``initial_timeout`` bounds the wait for the load to start, ``loading_timeout`` the load
        itself (None = no limit). Raises Timeout, or the load's own error."""
        s = _SpecBuffer(ModelSpec.of(spec))
        return ModelStatus.from_json(self._json_call(
            _lib.load_library().companion_client_wait_for_model_ready, s.ref,
            _timeout(initial_timeout), _timeout(loading_timeout)))

    def get_model_parameters(self, key_or_spec: Union[SpecLike, str],
                             generation: Optional[int] = None,
                             fingerprint: Optional[Mapping[str, str]] = None,
                             timeout: Optional[float] = None) -> MappedModel:
        """Maps every tensor of a model read-only into this process.

        - A :class:`ModelSpec` (or a path object): loads the checkpoint if needed (waiting up to
          ``timeout`` s; None = no limit), as before publishing existed.
        - A str: a checkpoint the server finds under that name (as ``ModelSpec(str)``), else a
          published key: its newest generation, or ``generation``; the ``fingerprint`` checked
          when given (FingerprintMismatch names the differing fields). Waits while the key's
          first generation is being published (up to ``timeout``).

        Pass ``timeout`` as a keyword (the second positional parameter is ``generation``)."""
        if isinstance(key_or_spec, str) and (generation is not None or fingerprint is not None
                                             or _lib.has_function("companion_client_attach")):
            model = self.attach(key_or_spec, generation=generation, fingerprint=fingerprint,
                                timeout=timeout, or_source=True)
            model._spec_if_checkpoint(key_or_spec)  # a checkpoint: the spec it was loaded by
            return model
        if not isinstance(key_or_spec, str) and (generation is not None
                                                 or fingerprint is not None):
            raise TypeError("generation and fingerprint apply to keys (str), not to a "
                            "ModelSpec; the timeout is a keyword argument (timeout=...)")
        model_spec = ModelSpec.of(key_or_spec)
        s = _SpecBuffer(model_spec)
        lib = _lib.load_library()
        out = ctypes.c_void_p()
        with self._handle as ptr:
            _lib.check(lib.companion_client_get_model_parameters(ptr, s.ref, _timeout(timeout),
                                                                 ctypes.byref(out)))
        return MappedModel(_ModelHandle(out.value or 0), model_spec)

    def state_dict(self, key_or_spec: Union[SpecLike, str], generation: Optional[int] = None,
                   fingerprint: Optional[Mapping[str, str]] = None,
                   timeout: Optional[float] = None) -> Dict[str, Any]:
        """Every tensor of the model (as :meth:`get_model_parameters` finds it) as a zero-copy
        torch.Tensor (read-only memory). The mapping lives as long as any of the tensors."""
        return self.get_model_parameters(key_or_spec, generation=generation,
                                         fingerprint=fingerprint, timeout=timeout).state_dict()

    def attach(self, key: str, generation: Optional[int] = None,
               fingerprint: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
               wait: bool = True, or_source: bool = False) -> MappedModel:
        """Maps a published model read-only: its newest committed generation, or ``generation``
        (NotFound once that generation is freed). ``fingerprint`` (dict str -> str) must equal
        the generation's (FingerprintMismatch names the differing fields). ``wait``: wait while
        the key's first generation is being published (up to ``timeout`` s; None = no limit),
        else NotReady at once. ``or_source``: the key may name a checkpoint too, and one the
        server finds is used before a published key; a checkpoint's generations are those
        ``reload`` made, and its fingerprint is empty (asking for fields raises
        FingerprintMismatch)."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if generation is not None and (isinstance(generation, bool)
                                       or not isinstance(generation, int)):
            raise TypeError(f"generation must be an int, not {type(generation).__name__} "
                            "(pass timeout= as a keyword)")
        if generation is not None and generation < 0:
            raise InvalidArgument(f"generation {generation} is negative")
        if or_source and key and not os.path.isabs(key) and os.path.exists(key):
            key = os.path.abspath(key)  # as ModelSpec treats an existing relative path
        fp = fingerprint_json(fingerprint)
        options = _lib.initialized(_lib.AttachOptionsC, "companion_attach_options_init")
        options.generation = int(generation or 0)
        options.fingerprint_json = fp
        options.or_source = 1 if or_source else 0
        options.wait = 1 if wait else 0
        options.timeout_s = _timeout(timeout)
        attach = _lib.function("companion_client_attach")
        out = ctypes.c_void_p()
        with self._handle as ptr:
            _lib.check(attach(ptr, key.encode("utf-8"), ctypes.byref(options),
                              ctypes.byref(out)))
        return MappedModel(_ModelHandle(out.value or 0))

    def reload(self, key_or_id: str, force: bool = False,
               timeout: Optional[float] = None) -> ModelStatus:
        """Loads a new generation of a loaded model whose files changed (size, mtime, inode), or
        of any loaded model with ``force``; readers of the old generation keep it until they
        release it. Waits up to ``timeout`` s (None = no limit); returns the final status."""
        if not isinstance(key_or_id, str):
            raise TypeError(f"key_or_id must be a str, not {type(key_or_id).__name__}")
        return ModelStatus.from_json(self._json_call(
            _lib.function("companion_client_reload"), key_or_id.encode("utf-8"),
            1 if force else 0, _timeout(timeout)))

    # ---- publishing ---------------------------------------------------------------------------

    def publish(self, key: str, tensors: Any,
                fingerprint: Optional[Mapping[str, str]] = None) -> MappedModel:
        """Publishes this process's tensors under ``key`` as the key's next generation and
        returns the committed model (read-only, zero-copy; a lease of that generation).

        ``tensors``: a dict name -> torch tensor (any device; Parameters welcome, e.g.
        ``module.state_dict(keep_vars=True)``) or numpy array, or a torch module (every
        parameter and buffer, persistent or not). Tensors sharing memory with the same dtype,
        shape and strides (tied weights) are stored once; the other names are aliases.
        ``fingerprint``: a dict str -> str that attachers may require (engine, version, dtype,
        ranks...). Raises ModelInUse while another writer publishes the key."""
        from . import publish as _publish

        sources = _publish.collect_sources(tensors)
        model, _ = _publish.publish_sources(self._handle, key, sources, fingerprint,
                                            _lib.CLAIM_NOW)
        assert model is not None
        return model

    def begin_publish(self, key: str, table: Mapping[str, Any],
                      fingerprint: Optional[Mapping[str, str]] = None,
                      wait: bool = False, timeout: Optional[float] = None) -> "Publication":
        """Claims ``key`` and declares ``table`` (name -> tensor, of which only dtype and shape
        are used, meta tensors welcome; or ``(dtype, shape)``, or ``(dtype, shape, alias_of)``);
        returns a :class:`companion.Publication` whose ``.tensors`` are writable. Write them,
        then ``commit()``; as a context manager it aborts unless committed. ``wait``: wait for
        another writer of the key to finish (up to ``timeout``) instead of ModelInUse."""
        from . import publish as _publish

        if not isinstance(table, collections.abc.Mapping):
            raise TypeError(f"table must be a dict, not {type(table).__name__}")
        entries = _publish.plan_table(table.items(), allow_specs=True, allow_meta=True)
        pub = _publish.claim(self._handle, key, fingerprint,
                             _lib.CLAIM_WAIT if wait else _lib.CLAIM_NOW, timeout)
        assert pub is not None
        try:
            pub._declare(entries)
        except BaseException:
            pub.abort()
            raise
        return pub

    def attach_or_publish(self, key: str, fingerprint: Optional[Mapping[str, str]],
                          build: Callable[[], Any],
                          timeout: Optional[float] = None) -> MappedModel:
        """The model published under ``key`` with this ``fingerprint``, built and published by
        exactly one of many concurrent callers (any processes): the first claims the key, runs
        ``build()`` (returning what :meth:`publish` takes: a dict of tensors, a state dict or a
        module) and publishes; the others wait on the server for its commit and attach, and one
        of them takes over when the builder fails or dies. A committed generation with another
        fingerprint raises FingerprintMismatch. ``timeout`` bounds the waits (None = none)."""
        from . import publish as _publish

        check_fingerprint(fingerprint)
        pub = _publish.claim(self._handle, key, fingerprint, _lib.CLAIM_IF_UNPUBLISHED,
                             timeout)
        if pub is None:
            return self.attach(key, fingerprint=fingerprint, timeout=timeout)
        with pub:
            sources = _publish.collect_sources(build())
            entries = _publish.plan_table(sources)
            return _publish._declare_fill_commit(pub, sources, entries)

    def status_stream(self, spec: Optional[SpecLike] = None, timeout: Optional[float] = None,
                      *, key: Optional[str] = None) -> StatusStream:
        """Follows one model's status (``spec``), one published key's (``key=``, generations
        included) or every model's (neither): the current state, then each change. ``timeout``
        bounds the wait for each item when iterating."""
        lib = _lib.load_library()
        out = ctypes.c_void_p()
        if key is not None:
            if spec is not None:
                raise TypeError("pass spec or key=, not both")
            if not isinstance(key, str):
                raise TypeError(f"key must be a str, not {type(key).__name__}")
            subscribe_key = _lib.function("companion_client_subscribe_key")
            with self._handle as ptr:
                _lib.check(subscribe_key(ptr, key.encode("utf-8"), ctypes.byref(out)))
            return StatusStream(out.value or 0, timeout)
        s = _SpecBuffer(ModelSpec.of(spec)) if spec is not None else None
        with self._handle as ptr:
            _lib.check(lib.companion_client_subscribe(ptr, s.ref if s else None,
                                                      ctypes.byref(out)))
        return StatusStream(out.value or 0, timeout)

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connection (after calls in flight return). Idempotent."""
        self._handle.close()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<companion.Client {state} namespace={self.options.get('namespace')!r} "
                f"device={self.options.get('device')!r}>")


def connect(namespace: str = "companion", device: DeviceLike = "host",
            socket_path: Optional[Union[str, "os.PathLike[str]"]] = None,
            runtime_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
            discovery_timeout: float = 0.0, client_name: Optional[str] = None,
            registry: Optional[str] = None, instance_id: Optional[str] = None) -> Client:
    """Connects to the Companion server of ``device`` in ``namespace``.

    - ``device``: "host" (default), a GPU ordinal as this process sees it (int or "0"), a GPU
      UUID ("GPU-...") or PCI bus id; also "cuda:N" or a torch.device.
    - ``socket_path``: connect to this socket directly instead of discovering.
    - ``runtime_dir``: the local registry directory (default: $COMPANION_RUNTIME_DIR, else
      $XDG_RUNTIME_DIR/companion, else /tmp/companion-<uid>).
    - ``discovery_timeout``: keep looking for a live server this many seconds.
    - ``registry``: where servers are found: "local", or "etcd://host:port[,host:port]"
      (default: $COMPANION_REGISTRY, else local). From etcd, instances on this host only.
    - ``instance_id``: use only this server instance.

    Raises Unavailable when no live server is found, DeviceMismatch when this process cannot
    see the server's GPU.
    """
    lib = _lib.load_library()
    options = _lib.ConnectOptions()
    lib.companion_connect_options_init(ctypes.byref(options))
    dev = normalize_device(device)
    keep = [_lib.encode(namespace), _lib.encode(dev),
            _lib.encode(os.fspath(socket_path)) if socket_path is not None else None,
            _lib.encode(os.fspath(runtime_dir)) if runtime_dir is not None else None,
            _lib.encode(client_name or f"companion-python[{os.getpid()}]"),
            _lib.encode(registry) if registry else None,
            _lib.encode(instance_id) if instance_id else None]
    options.ns, options.device, options.socket_path, options.runtime_dir, \
        options.client_name, options.registry, options.instance_id = keep
    options.discovery_timeout_s = float(discovery_timeout)
    out = ctypes.c_void_p()
    _lib.check(lib.companion_client_connect(ctypes.byref(options), ctypes.byref(out)))
    return Client(out.value or 0, {"namespace": namespace, "device": dev,
                                   "socket_path": socket_path, "runtime_dir": runtime_dir})


__all__ = ["Client", "StatusStream", "connect", "normalize_device", "Timeout"]
