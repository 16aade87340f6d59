"""vLLM model loader: engines share their post-processed weights through a Companion server.

Registered through vLLM's plugin entry point (``vllm.general_plugins`` -> :func:`register`, in
every vLLM process) as ``--load-format companion``::

    vllm serve /models/llama-8b --load-format companion \\
        --model-loader-extra-config '{"mode": "attach_or_publish", "fallback": true}'

What an engine does at load time (:class:`CompanionModelLoader`):

1. Computes its weights' identity before touching any weight: a key (checkpoint, parallel rank)
   and a fingerprint with what vLLM's own weight cache keys on (checkpoint content, revision,
   architecture, dtype, quantization and its config hash, TP/PP/DP/EP size and rank, vLLM and
   torch versions, device kind and compute capability, KV-cache dtype, config hash).
2. ``attach_or_publish`` (default): the first engine loads with vLLM's default loader
   (``process_weights_after_loading`` included), publishes every parameter and buffer, then drops
   its private copy and runs on the published one like everyone else; every later engine builds
   the model on the meta device, attaches the published tensors and skips weight loading.
   ``attach``: only attach (waits for another engine's publication, never loads).
   ``publish``: load from disk and publish a new generation (e.g. after the files changed).
3. No server, a fingerprint mismatch or a model that cannot be shared: one warning and vLLM's
   default loader (``fallback``: true, the default), or the typed :mod:`companion.errors` error
   (``fallback``: false).

Extra config keys (``--model-loader-extra-config``): ``mode``, ``fallback``, ``namespace``
(Companion namespace of the servers, default "companion"), ``key`` (key prefix, default
``vllm:<model>``; the parallel rank is always appended), ``socket_path``, ``runtime_dir``,
``registry`` (as :func:`companion.connect` takes them) and ``timeout`` (seconds to wait for
another engine's publication; default: as long as one is publishing).

The weights are read-only: the engine serves inference, and ``load_weights`` (in-place reloads)
is refused for an attached model.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import vllm
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
from vllm.model_executor.model_loader.weight_cache.protocol import (
    UnsupportedQuantForIPCError, check_ipc_quant_support, hash_checkpoint)
from vllm.model_executor.utils import weights_already_processed
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_default_torch_dtype

from . import _lib, errors
from . import publish as _publish
from .client import connect
from .torch import _alias_aware_state

__all__ = ["CompanionModelLoader", "register", "weight_identity", "LOAD_FORMAT"]

LOAD_FORMAT = "companion"
MODES = ("attach_or_publish", "attach", "publish")
_OPTIONS = ("mode", "fallback", "namespace", "key", "socket_path", "runtime_dir", "registry",
            "timeout")

# Under vLLM's logger, so that these lines appear in the engine's log with its format and level.
logger = init_logger("vllm.companion")
_registered = False
# What get_external_weight_memory told vLLM's memory profiler, by key: a load that then ends
# with a private copy makes that figure wrong, which the loader says loudly.
_reported_external: Dict[str, int] = {}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: makes ``--load-format companion`` available.
    vLLM calls it once per process; calling it again changes nothing."""
    global _registered
    if not _registered:
        register_model_loader(LOAD_FORMAT)(CompanionModelLoader)
        _registered = True


class NotShareable(Exception):
    """The engine's processed weights live outside its parameters and buffers (e.g. GEMM
    weights packed into a kernel library's private memory): publishing them would be
    incomplete."""


class PrivateModel(Exception):
    """This engine loaded the model from disk but could not publish it (``cause``): the model
    still serves this engine, privately."""

    def __init__(self, message: str, model: nn.Module, cause: BaseException) -> None:
        super().__init__(message)
        self.model = model
        self.cause = cause


def _with_report(model: nn.Module, report: "LoadReport") -> nn.Module:
    model.companion_report = report  # type: ignore[assignment]
    reported = _reported_external.get(report.key, 0)
    if report.route == "fallback" and reported:
        logger.error("companion: vLLM's memory profiler was told that %.1f MiB of weights are "
                     "held outside this engine, but it loaded its own copy: the KV cache may "
                     "not fit; lower --gpu-memory-utilization", reported / 2**20)
    return model


# ---- identity ------------------------------------------------------------------------------

def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _quant_config_hash(model_config: ModelConfig) -> str:
    quant = getattr(model_config.hf_config, "quantization_config", None)
    if hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    runtime = model_config.quantization_config
    try:
        from vllm.config.utils import normalize_value
        runtime = normalize_value(runtime)
    except ImportError:  # older vLLM: the repr is stable enough for equality
        pass
    return _digest({"checkpoint": quant, "runtime": runtime})


def _config_hash(hf_config: Any) -> str:
    # Where the config was read from does not change the weights (the checkpoint field says
    # what they are).
    config = {k: v for k, v in hf_config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version")}
    return _digest(config)


def _compute_hash(config: Any) -> str:
    """vLLM's own hash of a config section (the kernel choice decides weight layouts)."""
    compute = getattr(config, "compute_hash", None)
    return str(compute()) if compute is not None else ""


def unsupported_reason(vllm_config: VllmConfig, model_config: ModelConfig) -> Optional[str]:
    """Why this engine must not share its weights, decided before anything is built: features
    that write into the weights after loading, move them, or need load-time state that is not
    published."""
    spec = vllm_config.speculative_config
    if spec is not None and model_config is getattr(spec, "draft_model_config", None):
        return ("speculative draft models are not shared (their load-time flags are not "
                "published)")
    if getattr(model_config, "enable_sleep_mode", False):
        return "sleep mode restores weights in place"
    if getattr(vllm_config.parallel_config, "enable_eplb", False):
        return "expert-parallel load balancing moves expert weights in place"
    offload = getattr(vllm_config, "offload_config", None)
    if offload is not None and (
            getattr(getattr(offload, "uva", None), "cpu_offload_gb", 0) > 0
            or getattr(getattr(offload, "prefetch", None), "offload_group_size", 0) > 0):
        return "weight offloading keeps weights in host memory"
    return None


def _parallel_ranks() -> Dict[str, int]:
    from vllm.distributed import (get_dp_group, get_pp_group,
                                  get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)
    dp, pp = get_dp_group(), get_pp_group()
    return {"tp_size": get_tensor_model_parallel_world_size(),
            "tp_rank": get_tensor_model_parallel_rank(),
            "pp_size": pp.world_size, "pp_rank": pp.rank_in_group,
            "dp_size": dp.world_size, "dp_rank": dp.rank_in_group}


def _device_kind() -> Tuple[str, str]:
    """(device kind, what decides the kernels' weight layout on it)."""
    if current_platform.is_cpu():
        capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        return "cpu", str(capability)
    index = torch.accelerator.current_device_index()
    capability = current_platform.get_device_capability(index)
    cc = f"{capability.major}.{capability.minor}" if capability is not None else ""
    return f"{current_platform.device_name}:{current_platform.get_device_name(index)}", cc


def weight_identity(vllm_config: VllmConfig, model_config: ModelConfig,
                    key_prefix: Optional[str] = None,
                    ranks: Optional[Dict[str, int]] = None) -> Tuple[str, Dict[str, str]]:
    """(key, fingerprint) of the weights this engine would run, computed from its configuration
    before any weight is loaded or processed (processing may change the quantization config).
    Two engines may share weights exactly when both are equal."""
    ranks = ranks if ranks is not None else _parallel_ranks()
    spec = vllm_config.speculative_config
    is_draft = spec is not None and model_config is getattr(spec, "draft_model_config", None)
    parallel = vllm_config.parallel_config
    hf_config = model_config.hf_config
    device, capability = _device_kind()
    ep = bool(getattr(parallel, "enable_expert_parallel", False))
    fingerprint = {
        "checkpoint": hash_checkpoint(model_config.model) or model_config.model,
        "revision": str(model_config.revision or ""),
        "architecture": ",".join(getattr(hf_config, "architectures", None) or []),
        "dtype": str(model_config.dtype),
        "quantization": str(model_config.quantization or ""),
        "quant_config_hash": _quant_config_hash(model_config),
        "config_hash": _config_hash(hf_config),
        "kernel_config_hash": _compute_hash(getattr(vllm_config, "kernel_config", None)),
        "kv_cache_dtype": str(getattr(vllm_config.cache_config, "cache_dtype", "")),
        "tp": f"{ranks['tp_rank']}/{ranks['tp_size']}",
        "pp": f"{ranks['pp_rank']}/{ranks['pp_size']}",
        "dp": f"{ranks['dp_rank']}/{ranks['dp_size']}",
        "ep": f"{ranks['tp_size'] * ranks['dp_size']}" if ep else "off",
        "draft": "1" if is_draft else "0",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "device": device,
        "capability": capability,
    }
    prefix = key_prefix or f"vllm:{model_config.model}"
    key = (f"{prefix}:tp{ranks['tp_rank']}of{ranks['tp_size']}"
           f"-pp{ranks['pp_rank']}of{ranks['pp_size']}-dp{ranks['dp_rank']}of{ranks['dp_size']}")
    if is_draft:
        key += ":draft"
    return key, fingerprint


# ---- the loader ----------------------------------------------------------------------------

@dataclasses.dataclass
class LoadReport:
    """What the loader did, kept on the model as ``model.companion_report``."""

    route: str                    # "attached", "published", "fallback"
    key: str = ""
    generation: int = 0
    tensors: int = 0
    shared_bytes: int = 0         # bytes of the published model this engine maps
    used_shared_bytes: int = 0    # of which the model's parameters still use
    private_buffer_bytes: int = 0  # buffers copied (vLLM may write them in place)
    seconds: float = 0.0          # request to a runnable model (weights included)
    reason: str = ""              # why it fell back


class CompanionModelLoader(BaseModelLoader):
    """``--load-format companion``: see the module's documentation."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = sorted(set(extra) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"unknown --model-loader-extra-config keys for load format "
                             f"{LOAD_FORMAT!r}: {unknown} (known: {list(_OPTIONS)})")
        self.mode = str(extra.get("mode", "attach_or_publish"))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        fallback = extra.get("fallback", True)
        if isinstance(fallback, str):
            fallback = fallback.lower() not in ("0", "false", "no", "off")
        self.fallback = bool(fallback)
        self.key_prefix: Optional[str] = extra.get("key")
        timeout = extra.get("timeout")
        # None: wait as long as an engine is publishing (the server hands the key to a waiter
        # when the publisher dies).
        self.timeout = None if timeout is None else float(timeout)
        self.connect_options = {name: extra[name] for name in
                                ("namespace", "socket_path", "runtime_dir", "registry")
                                if extra.get(name) is not None}

    # -- plumbing --

    def _default_loader(self) -> DefaultModelLoader:
        # The default loader must see neither this load format nor its options.
        return DefaultModelLoader(dataclasses.replace(
            self.load_config, load_format="auto", model_loader_extra_config={}))

    def _connect(self) -> Any:
        device: Any = "host" if current_platform.is_cpu() else \
            torch.accelerator.current_device_index()
        return connect(device=device, **self.connect_options)

    def _target_device(self, vllm_config: VllmConfig) -> torch.device:
        device = self.load_config.device or vllm_config.device_config.device
        target = torch.device(device)
        if target.type != "cpu" and target.index is None:
            target = torch.device(target.type, torch.accelerator.current_device_index())
        return target

    # -- BaseModelLoader --

    def download_model(self, model_config: ModelConfig) -> None:
        self._default_loader().download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if getattr(model, "companion_weights", None) is not None:
            raise RuntimeError("this model's weights are attached read-only from Companion and "
                               "cannot be reloaded in place: publish a new generation "
                               "(mode 'publish') and restart the engine")
        self._default_loader().load_weights(model, model_config)

    def get_external_weight_memory(self, vllm_config: VllmConfig) -> int:
        """Bytes of this engine's weights that a Companion server already holds (a committed
        generation with this engine's fingerprint), which vLLM's memory profiler must not
        count against the engine: 0 when this engine will load them itself."""
        if self.mode == "publish" or unsupported_reason(vllm_config,
                                                          vllm_config.model_config):
            return 0
        try:
            key, fingerprint = weight_identity(vllm_config, vllm_config.model_config,
                                               self.key_prefix)
            with self._connect() as client:
                for status in client.list():
                    if status.published and status.key == key and status.generation:
                        if status.fingerprint != fingerprint:
                            return 0
                        current = [g for g in status.generations if g.current]
                        size = int(current[0].slab_bytes if current else status.slab_bytes)
                        _reported_external[key] = size
                        return size
        except errors.Error as e:
            logger.info("companion: cannot query the server for external weights (%s)", e)
        return 0

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str = "") -> nn.Module:
        start = time.perf_counter()
        key = ""
        try:
            reason = unsupported_reason(vllm_config, model_config)
            if reason is not None:
                raise errors.InvalidArgument(reason)
            key, fingerprint = weight_identity(vllm_config, model_config, self.key_prefix)
            with self._connect() as client:
                mapped, loaded = self._obtain(client, key, fingerprint, vllm_config,
                                              model_config, prefix)
        except PrivateModel as e:
            # Loaded from disk, but not published: it still serves this engine.
            if not self.fallback:
                raise e.cause from e
            logger.warning("companion: %s; this engine keeps its own copy of the weights", e)
            return _with_report(e.model, LoadReport(route="fallback", key=key, reason=str(e),
                                                    seconds=time.perf_counter() - start))
        except errors.Error as e:
            if not self.fallback:
                raise
            logger.warning("companion: cannot share weights under %r (%s: %s); loading with "
                           "vLLM's default loader", key, type(e).__name__, e)
            model = self._default_loader().load_model(vllm_config, model_config, prefix)
            return _with_report(model, LoadReport(route="fallback", key=key,
                                                  reason=f"{type(e).__name__}: {e}",
                                                  seconds=time.perf_counter() - start))
        # From here on the model exists in this process (vLLM builds a model once per process),
        # so an error is raised whatever ``fallback`` says.
        published = loaded is not None
        if loaded is None:
            model = self._build_attached(vllm_config, model_config, prefix, mapped)
        else:
            model = self._adopt(loaded, mapped)
            del loaded
        report = model.companion_report
        report.route = "published" if published else "attached"
        report.seconds = time.perf_counter() - start
        logger.info("companion: %s %r generation %d: %d tensors, %.1f MiB shared, in %.3f s%s",
                    report.route, key, report.generation, report.tensors,
                    report.shared_bytes / 2**20, report.seconds,
                    "" if published else " (no weights loaded)")
        return model

    # -- the two halves --

    def _obtain(self, client: Any, key: str, fingerprint: Dict[str, str],
                vllm_config: VllmConfig, model_config: ModelConfig,
                prefix: str) -> Tuple[Any, Optional[nn.Module]]:
        """The committed published model for ``key``, and the model this engine loaded and
        published (None when it attached another engine's publication)."""
        if self.mode == "attach":
            return client.attach(key, fingerprint=fingerprint, timeout=self.timeout), None
        claim_mode = _lib.CLAIM_WAIT if self.mode == "publish" else _lib.CLAIM_IF_UNPUBLISHED
        pub = _publish.claim(client._handle, key, fingerprint, claim_mode, self.timeout)
        if pub is None:  # another engine published it (or was publishing it and committed)
            return client.attach(key, fingerprint=fingerprint, timeout=self.timeout), None
        with pub:
            model = self._default_loader().load_model(vllm_config, model_config, prefix)
            try:
                _check_shareable(model)
                sources = _publish.module_tensors(model)
                entries = _publish.plan_table(sources)
                mapped = _publish._declare_fill_commit(pub, sources, entries)
            except Exception as e:  # noqa: BLE001  the model exists: it serves privately
                raise PrivateModel(f"publishing {key!r} failed ({type(e).__name__}: {e})",
                                   model, e) from e
        return mapped, model

    def _adopt(self, model: nn.Module, mapped: Any) -> nn.Module:
        """The publisher runs on the published tensors too, like every other engine: its
        parameters and buffers are re-pointed at them and its private copy is freed. (vLLM
        cannot build the model a second time in one process: attention layers register their
        names once.)"""
        count, copied = _register_tensors(model, mapped)
        gc.collect()
        torch.accelerator.empty_cache()
        _trim_host_heap()
        return self._finish(model, mapped, count, copied)

    def _build_attached(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str,
                        mapped: Any) -> nn.Module:
        target = self._target_device(vllm_config)
        with set_default_torch_dtype(model_config.dtype):
            with torch.device("meta"):
                model = initialize_model(vllm_config=vllm_config, model_config=model_config,
                                         prefix=prefix)
            count, copied = _register_tensors(model, mapped)
            # The tensors went through process_weights_after_loading in the publisher; this
            # rebuilds only the Python-side state (kernels, handles) around them.
            with weights_already_processed():
                process_weights_after_loading(model, model_config, target)
            _materialize_leftovers(model, target)
        return self._finish(model, mapped, count, copied)

    def _finish(self, model: nn.Module, mapped: Any, count: int, copied: int) -> nn.Module:
        model.companion_weights = mapped  # type: ignore[assignment]  # the lease
        # vLLM's weight-update paths call model.load_weights directly: on shared read-only
        # memory that would fault, or (writable CUDA IPC) change every engine's weights.
        model.load_weights = _refuse_load_weights  # type: ignore[method-assign]
        shared, used = _shared_use(model, mapped)
        if used + copied < shared:
            logger.warning("companion: vLLM's weight processing on this platform replaced %.1f "
                           "of %.1f MiB of shared weights with private copies",
                           (shared - used - copied) / 2**20, shared / 2**20)
        status = mapped.status
        model.companion_report = LoadReport(  # type: ignore[assignment]
            route="attached", key=status.key, generation=status.generation, tensors=count,
            shared_bytes=shared, used_shared_bytes=used, private_buffer_bytes=copied)
        return model.eval()


def _check_shareable(model: nn.Module) -> None:
    """Quantization methods that cannot run on already-processed weights (vLLM raises for them
    under ``weights_already_processed``) would fail in every attaching engine.

    vLLM's CPU backend may pack a linear layer's weight into oneDNN/kernel memory and leave
    an empty parameter behind (``dispatch_cpu_unquantized_gemm``): what is published would then
    miss those weights."""
    try:
        check_ipc_quant_support(model)
    except UnsupportedQuantForIPCError as e:
        raise NotShareable(f"attaching engines could not use these weights: {e}") from e
    packed = [name for name, module in model.named_modules()
              if hasattr(module, "cpu_linear") and isinstance(getattr(module, "weight", None),
                                                               torch.Tensor)
              and module.weight.numel() == 0]
    if packed:
        raise NotShareable(f"vLLM packed {len(packed)} linear weights (e.g. {packed[0]}) into "
                           "private kernel memory on this CPU, which cannot be shared")


def _refuse_load_weights(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this model's weights are attached read-only from Companion and cannot "
                       "be updated in place: publish a new generation (mode 'publish') and "
                       "restart the engines")


def _register_tensors(model: nn.Module, mapped: Any) -> Tuple[int, int]:
    """Puts each published tensor into the model under its name: parameters zero-copy (names
    that share memory, tied weights and aliases, get one object), and everything the model
    registers as a buffer as a private copy. vLLM writes some buffers in place after loading
    (attention scales, caches): the shared memory is read-only, and buffers are small. Tensors
    that weight processing added in the publisher become frozen Parameters."""
    modules = dict(model.named_modules(remove_duplicate=False))
    state = _alias_aware_state(mapped)
    made: Dict[Tuple[int, bool], Any] = {}
    copied = 0
    for name, tensor in state.items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise errors.InvalidArgument(
                f"published tensor {name} has no module {module_name!r} in this engine's model "
                "(another architecture or vLLM version under the same key?)")
        as_buffer = leaf in module._buffers and leaf not in module._parameters
        obj = made.get((id(tensor), as_buffer))
        if obj is None:
            if as_buffer:
                obj = tensor.clone()
                copied += obj.numel() * obj.element_size()
            else:
                obj = nn.Parameter(tensor, requires_grad=False)
            made[(id(tensor), as_buffer)] = obj
        if as_buffer:
            persistent = leaf not in module._non_persistent_buffers_set
            module._buffers.pop(leaf, None)
            module.register_buffer(leaf, obj, persistent=persistent)
        else:
            module._parameters.pop(leaf, None)
            module._buffers.pop(leaf, None)
            module.register_parameter(leaf, obj)
    return len(state), copied


def _trim_host_heap() -> None:
    """Hands the freed private copy back to the system: glibc keeps freed blocks below its
    (adaptive, up to 32 MiB) mmap threshold in the heap, where they would stay resident."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _materialize_leftovers(model: nn.Module, device: torch.device) -> None:
    """Tensors the publisher did not have (its weight processing dropped them) are not read at
    run time; they get (uninitialised) memory so that nothing is left on the meta device."""
    missing = []
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                missing.append(f"{module_name}.{leaf}")
                module._parameters[leaf] = nn.Parameter(torch.empty_like(param, device=device),
                                                        requires_grad=False)
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[leaf] = torch.empty_like(buf, device=device)
    if missing:
        logger.info("companion: %d parameters were not published (e.g. %s); left "
                    "uninitialised", len(missing), missing[0])


def _shared_use(model: nn.Module, mapped: Any) -> Tuple[int, int]:
    """(bytes of the published tensors, bytes of them the model's tensors still point at)."""
    spans: List[Tuple[int, int]] = []
    for tensor in mapped.tensors().values():
        if tensor.nbytes:
            spans.append((tensor.data_ptr, tensor.data_ptr + tensor.nbytes))
    spans.sort()
    merged: List[List[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    shared = sum(hi - lo for lo, hi in merged)
    used_spans = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.numel() == 0 or tensor.is_meta:
            continue
        ptr = tensor.data_ptr()
        for lo, hi in merged:
            if lo <= ptr < hi:
                used_spans.add((ptr, tensor.numel() * tensor.element_size()))
                break
    used = min(shared, sum(size for _, size in used_spans))
    return shared, used
