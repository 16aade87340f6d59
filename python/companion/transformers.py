"""Hugging Face transformers models whose weights live in a Companion server.

``import companion.transformers`` imports torch and transformers; the rest of the package does
not. Needs torch >= 2 (models are built on the ``meta`` device) and transformers >= 5.

    import torch
    import companion.transformers

    model = companion.transformers.from_pretrained("/models/Llama-3.2-1B", device=0,
                                                  dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]], device="cuda:0")).logits

Every process that does this on the same server shares one copy of the weights.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import struct
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from .client import Client, connect, normalize_device
from .model import MappedModel
from ._types import ModelSpec

__all__ = ["from_pretrained", "plan_checkpoint_route", "published_key", "published_fingerprint",
           "checkpoint_headers"]

logger = logging.getLogger("companion")

# Published keys are bounded by the server (1024 bytes of UTF-8).
_MAX_KEY_BYTES = 1024

# safetensors dtype names -> torch dtype attribute names.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}

# What the server casts to with ModelSpec(dtype=...): floating tensors only.
_SERVER_CASTS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _torch() -> Any:
    import torch

    major = int(torch.__version__.split(".")[0])
    if major < 2:
        raise RuntimeError(
            f"companion.transformers needs torch >= 2.0 (it builds models on the meta device "
            f"with `with torch.device('meta')`); this is torch {torch.__version__}")
    return torch


# ---- the checkpoint on disk -----------------------------------------------------------------


def checkpoint_headers(source: str) -> Tuple[Dict[str, Dict[str, Any]], str]:
    """The safetensors headers of a local checkpoint directory: ``({tensor name: {"dtype",
    "shape", "file"}}, identity)`` where identity is a SHA-256 over every file's name and raw
    header (what decides the tensors' names, dtypes, shapes and offsets). Returns ``({}, "")``
    when the directory has no safetensors files (e.g. only ``pytorch_model.bin``)."""
    index = os.path.join(source, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(source, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return {}, ""
    digest = hashlib.sha256()
    tensors: Dict[str, Dict[str, Any]] = {}
    for name in files:
        with open(os.path.join(source, name), "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            raw = f.read(size)
        digest.update(name.encode("utf-8") + b"\0" + struct.pack("<Q", size) + raw)
        for key, entry in json.loads(raw).items():
            if key == "__metadata__":
                continue
            tensors[key] = {"dtype": entry["dtype"], "shape": tuple(entry["shape"]),
                            "file": name}
    return tensors, digest.hexdigest()


def _resolve_dtype(dtype: Any, config: Any, headers: Mapping[str, Mapping[str, Any]]) -> Any:
    """transformers' "auto": the config's dtype, else the checkpoint's first floating dtype,
    else float32."""
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
            return getattr(torch, dtype)
        raise TypeError(f"dtype must be a torch.dtype, 'auto' or None, not {dtype!r}")
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str) and configured != "auto":
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    for entry in headers.values():
        name = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if name and getattr(torch, name).is_floating_point:
            return getattr(torch, name)
    return torch.float32


# ---- route 1: the checkpoint's tensors as they are --------------------------------------------


def _conversions(model: Any) -> Tuple[List[Any], List[Any], Any]:
    """transformers' own weight renamings and converters for ``model`` (transformers 5), and its
    ``rename_source_key``; empty lists and None where this transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:
        return [], [], None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, rename_source_key


class _NoRenames(Exception):
    """This transformers' rename machinery is not one this module knows how to call."""


def _rename(rename: Any, key: str, renamings: List[Any], converters: List[Any],
            prefix: Optional[str], meta_state: Mapping[str, Any]) -> Tuple[str, Any]:
    """``(model name, converter pattern or None)`` of checkpoint tensor ``key``, as
    transformers' loader renames it (``rename_source_key`` of transformers 5)."""
    if rename is not None:
        try:
            return rename(key, renamings, converters, prefix, meta_state)
        except TypeError:
            pass  # another signature: apply the transforms one by one below
    renamed, converter = key, None
    for transform in renamings + converters:
        method = getattr(transform, "rename_source_key", None)
        if method is None:
            raise _NoRenames(f"cannot apply {type(transform).__name__} of this transformers")
        renamed, pattern = method(renamed)
        if pattern is not None and transform in converters:
            converter = pattern
            break
    if prefix and renamed not in meta_state:
        if renamed.startswith(prefix + ".") and renamed[len(prefix) + 1:] in meta_state:
            renamed = renamed[len(prefix) + 1:]
        elif f"{prefix}.{renamed}" in meta_state:
            renamed = f"{prefix}.{renamed}"
    return renamed, converter


def plan_checkpoint_route(model: Any, headers: Mapping[str, Mapping[str, Any]],
                          server_dtype: Optional[Any]) -> Tuple[Optional[Dict[str, str]], str]:
    """Whether the checkpoint maps 1:1 onto ``model`` (built on meta): returns ``({model name:
    checkpoint name}, "")`` when every persistent parameter and buffer has exactly one
    checkpoint tensor of its shape and dtype (after transformers' renames and
    ``base_model_prefix`` handling; tied names may share one tensor), else ``(None, why)``.

    ``server_dtype``: the torch dtype the server will cast floating tensors to (None: as
    stored)."""
    torch = _torch()
    if not headers:
        return None, "the checkpoint has no safetensors files"
    try:
        renamings, converters, rename = _conversions(model)
    except Exception as e:  # a transformers whose mapping API this module does not know
        return None, f"cannot read transformers' weight conversions: {e!r}"
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None)
                                       or [])]
    target_of: Dict[str, str] = {}
    unexpected: List[str] = []
    for key in headers:
        try:
            renamed, converter = _rename(rename, key, renamings, converters, prefix, meta_state)
        except _NoRenames as e:
            return None, str(e)
        if converter is not None:
            return None, f"transformers converts {key!r} at load ({converter})"
        if renamed not in meta_state:
            if not any(p.search(key) for p in ignored):
                unexpected.append(key)
            continue
        if renamed in target_of:
            return None, f"{key!r} and {target_of[renamed]!r} both map to {renamed!r}"
        target_of[renamed] = key
    if unexpected:
        return None, f"checkpoint tensors the model does not have: {unexpected[:5]}"

    # Tied names (one tensor under several names) need one checkpoint entry among them.
    groups: Dict[int, List[str]] = {}
    tensors: Dict[int, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    mapping: Dict[str, str] = {}
    for ident, names in groups.items():
        present = [n for n in names if n in target_of]
        if not present:
            return None, f"no checkpoint tensor for {names[0]!r}"
        if len(present) > 1:
            return None, f"{present} are tied in the model but stored separately"
        name = present[0]
        entry = headers[target_of[name]]
        tensor = tensors[ident]
        stored = getattr(torch, _SAFETENSORS_DTYPES.get(entry["dtype"], ""), None)
        if stored is None:
            return None, f"{target_of[name]!r} has dtype {entry['dtype']}"
        served = server_dtype if (server_dtype is not None and stored.is_floating_point) \
            else stored
        if tuple(entry["shape"]) != tuple(tensor.shape) or served != tensor.dtype:
            return None, (f"{target_of[name]!r} is {entry['dtype']} {tuple(entry['shape'])}, "
                          f"the model's {name!r} is {tensor.dtype} {tuple(tensor.shape)}")
        mapping[name] = target_of[name]
    return mapping, ""


def _materialize_non_persistent(model: Any, device: Any, shared: Set[int]) -> None:
    """Computes the non-persistent buffers (rotary ``inv_freq``, position ids, ...) of a model
    whose persistent tensors are attached, the way transformers' ``from_pretrained`` does: each
    becomes ``torch.empty_like(buffer, device=device)`` and ``model.initialize_weights()`` fills
    it with the model's ``_init_weights``. The shared tensors and every module without such a
    buffer are flagged ``_is_hf_initialized`` first, which transformers' init functions honour,
    so nothing is ever written into the read-only shared memory."""
    torch = _torch()
    pending: Set[int] = set()
    replaced: Dict[int, Any] = {}
    for module in model.modules():
        own = getattr(module, "_non_persistent_buffers_set", set())
        for name in list(own):
            buffer = module._buffers.get(name)
            if buffer is None:
                continue
            fresh = replaced.get(id(buffer))
            if fresh is None:
                fresh = torch.empty_like(buffer, device=device)
                replaced[id(buffer)] = fresh
            module._buffers[name] = fresh
            pending.add(id(module))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in shared:
            tensor._is_hf_initialized = True
    for module in model.modules():
        if id(module) not in pending:
            module._is_hf_initialized = True
    if pending:
        model.initialize_weights()


# ---- route 2: what transformers builds, published ---------------------------------------------


def published_key(source: str, dtype: Any) -> str:
    """``transformers:<absolute path>:<dtype>``; a path too long for the server's bound on keys
    (1024 bytes) is replaced by its SHA-256."""
    path = os.path.abspath(source)
    name = str(dtype).replace("torch.", "")
    key = f"transformers:{path}:{name}"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        key = f"transformers:sha256-{hashlib.sha256(path.encode('utf-8')).hexdigest()}:{name}"
    return key


def published_fingerprint(config: Any, checkpoint_identity: str, dtype: Any, device: Any,
                          model_class: Any, model_kwargs: Mapping[str, Any]) -> Dict[str, str]:
    """What decides that two processes can share the model transformers builds: transformers
    and torch versions, the config, the checkpoint's headers, dtype, model class and keyword
    arguments, device kind and CUDA compute capability."""
    import transformers

    torch = _torch()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    else:
        capability = "none"
    config_text = config.to_json_string(use_diff=False)
    kwargs_text = json.dumps({k: repr(v) for k, v in sorted(model_kwargs.items())})
    return {
        "engine": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "config": hashlib.sha256(config_text.encode("utf-8")).hexdigest(),
        "checkpoint": checkpoint_identity or "none",
        "dtype": str(dtype).replace("torch.", ""),
        "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
        "kwargs": hashlib.sha256(kwargs_text.encode("utf-8")).hexdigest(),
        "device": device.type,
        "compute_capability": capability,
    }


# ---- the entry point ------------------------------------------------------------------------


def _target_device(device: Any) -> Tuple[Any, str]:
    """(torch.device to compute on, the server's device string)."""
    torch = _torch()
    server = normalize_device(device)
    if server == "host":
        return torch.device("cpu"), server
    if not server.isdigit():
        raise ValueError(f"device must be None, 'cpu', a CUDA ordinal or 'cuda:N', not "
                         f"{device!r}")
    return torch.device("cuda", int(server)), server


def _build_on_meta(model_class: Any, config: Any, dtype: Any, model_kwargs: Mapping[str, Any]
                   ) -> Any:
    torch = _torch()
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # the Auto classes
            return model_class.from_config(config, dtype=dtype, **model_kwargs)
        return model_class._from_config(config, dtype=dtype, **model_kwargs)


def _check_materialized(model: Any) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after attaching: {left[:8]}")


def from_pretrained(source: "str | os.PathLike[str]", *, device: Any = None, dtype: Any = None,
                    client: Optional[Client] = None, model_class: Any = None,
                    timeout: Optional[float] = None, **kwargs: Any) -> Any:
    """A transformers model (e.g. ``LlamaForCausalLM``) in eval mode whose weights are the
    Companion server's, attached zero-copy: every process on the same server shares them.

    - ``source``: a local checkpoint directory (as ``AutoModelForCausalLM.from_pretrained``
      takes), under one of the server's ``--model-root`` directories.
    - ``device``: None or "cpu" (the host server), a CUDA ordinal or "cuda:N" (that GPU's
      server).
    - ``dtype``: a torch dtype, or None / "auto" (the config's dtype, else the checkpoint's).
    - ``client``: a :class:`companion.Client` of that device's server (default:
      ``companion.connect(device=...)``, found as ``connect`` finds servers).
    - ``model_class``: default ``transformers.AutoModelForCausalLM``.
    - ``timeout``: bounds the server-side waits (load, another process publishing); None: none.
    - ``**kwargs``: as transformers takes them: config overrides for ``AutoConfig`` and model
      arguments such as ``attn_implementation``. ``trust_remote_code`` may only be False.

    Two routes, chosen automatically and logged (logger "companion"):

    1. *checkpoint*: the checkpoint's tensors map 1:1 onto the model (same names after
       transformers' renames, shapes and dtypes): the server loads the safetensors itself and
       the model's parameters point at them. Non-persistent buffers (rotary ``inv_freq``, ...)
       are computed on ``device`` the way transformers' ``from_pretrained`` computes them.
    2. *published*: transformers rewrites the weights at load (e.g. fuses MoE experts into 3-D
       tensors): exactly one process loads the model with transformers' ``from_pretrained`` and
       publishes every parameter and buffer under ``transformers:<path>:<dtype>``
       (:func:`published_key`, fingerprint :func:`published_fingerprint`); every process, the
       publisher too, attaches to that. A key already published with another fingerprint
       (other transformers or torch versions, changed checkpoint files or config) raises
       :class:`companion.FingerprintMismatch`: unload the key (``client.unload(key)``) first.

    The weights are read-only (inference only: no optimizer steps, no in-place updates; PEFT
    adapters on top are fine). ``model.companion_weights`` holds the lease; it ends when the
    model is garbage collected. ``model.companion_route`` says which route was taken.

    Example::

        import torch, companion.transformers
        model = companion.transformers.from_pretrained("/models/opt-125m", device="cuda:0",
                                                      dtype=torch.float16)
        logits = model(torch.tensor([[2, 100, 200]], device="cuda:0")).logits
    """
    torch = _torch()
    import transformers

    if kwargs.get("trust_remote_code"):
        raise ValueError("companion.transformers.from_pretrained supports trust_remote_code="
                         "False only")
    kwargs.pop("trust_remote_code", None)
    for unsupported in ("device_map", "torch_dtype", "quantization_config", "tp_plan"):
        if unsupported in kwargs:
            raise TypeError(f"{unsupported}= is not supported: the weights come from the "
                            "server (use device= and dtype=)")
    source = os.path.abspath(os.fspath(source))
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is not a checkpoint directory")
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    target, server_device = _target_device(device)

    config, model_kwargs = transformers.AutoConfig.from_pretrained(
        source, return_unused_kwargs=True, trust_remote_code=False, **kwargs)
    headers, identity = checkpoint_headers(source)
    dtype = _resolve_dtype(dtype, config, headers)

    own_client = client is None
    if own_client:
        client = connect(device=server_device)
    try:
        model = _build_on_meta(model_class, config, dtype, model_kwargs)
        stored = {getattr(torch, _SAFETENSORS_DTYPES[e["dtype"]]) for e in headers.values()
                  if e["dtype"] in _SAFETENSORS_DTYPES
                  and getattr(torch, _SAFETENSORS_DTYPES[e["dtype"]]).is_floating_point}
        # The server casts floating tensors when asked (ModelSpec(dtype=...)); as stored
        # otherwise, so that one loaded copy serves every process asking for that dtype.
        cast = dtype if stored and stored != {dtype} else None
        if cast is not None and str(cast).replace("torch.", "") not in _SERVER_CASTS:
            mapping, why = None, f"the server cannot cast to {cast}"
        else:
            mapping, why = plan_checkpoint_route(model, headers, cast)

        if mapping is not None:
            spec = ModelSpec(source, dtype=_SERVER_CASTS[str(cast).replace("torch.", "")]
                             if cast is not None else None)
            mapped = client.get_model_parameters(spec, timeout=timeout)
            _check_device(mapped, target)
            state = mapped.state_dict()
            from .torch import load_into_module

            load_into_module(model, {name: state[key] for name, key in mapping.items()},
                             strict=False)
            shared = {id(t) for t in list(model.parameters()) + list(model.buffers())
                      if not t.is_meta}
            _materialize_non_persistent(model, target, shared)
            route = "checkpoint"
            logger.info("companion.transformers: %s attached from the checkpoint (%d tensors, "
                        "server dtype %s)", source, len(mapping), cast or "as stored")
        else:
            logger.info("companion.transformers: %s takes the published route: %s", source, why)
            mapped = _attach_published(client, source, config, identity, dtype, target,
                                       model_class, model_kwargs, timeout)
            _check_device(mapped, target)
            from .torch import attach_module

            attach_module(model, mapped, strict=True)
            route = "published"
        model.tie_weights()
        _check_materialized(model)
    finally:
        if own_client:
            client.close()
    model.eval()
    model.requires_grad_(False)
    # The lease lives as long as the model (the tensors hold the mapping too; this keeps the
    # MappedModel's facts at hand).
    model.companion_weights = mapped
    model.companion_route = route
    return model


def _check_device(mapped: MappedModel, target: Any) -> None:
    for tensor in mapped.tensors().values():
        if tensor.device != str(target) and not (target.type == "cpu" and tensor.device == "cpu"):
            raise RuntimeError(f"the server's tensors are on {tensor.device}, not {target}: "
                               "connect to the server of that device")
        break


def _attach_published(client: Client, source: str, config: Any, identity: str, dtype: Any,
                      target: Any, model_class: Any, model_kwargs: Mapping[str, Any],
                      timeout: Optional[float]) -> MappedModel:
    torch = _torch()
    key = published_key(source, dtype)
    fingerprint = published_fingerprint(config, identity, dtype, target, model_class,
                                        model_kwargs)
    built = []

    def build() -> Any:
        logger.info("companion.transformers: loading %s with transformers to publish it as %r",
                    source, key)
        built.append(True)
        # device_map needs accelerate; a CPU load is transformers' default without it.
        placement = {} if target.type == "cpu" else {"device_map": str(target)}
        return model_class.from_pretrained(source, config=config, dtype=dtype,
                                           trust_remote_code=False, **placement,
                                           **model_kwargs)

    mapped = client.attach_or_publish(key, fingerprint, build, timeout=timeout)
    if built:
        # The private copy transformers loaded is garbage now: give its memory back so that
        # the publisher holds only the published one.
        gc.collect()
        if target.type == "cuda":
            torch.cuda.empty_cache()
    logger.info("companion.transformers: attached %r (generation %s)", key,
                mapped.status.generation)
    return mapped
