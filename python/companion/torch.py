"""torch helpers: point an ``nn.Module`` at shared weights without copying them.

``import companion.torch`` imports torch; the rest of the package does not.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch as _torch

from .model import MappedModel, Tensor
from .publish import module_tensors

__all__ = ["load_into_module", "IncompatibleKeys", "as_torch_state_dict", "attach_module",
           "publish_module", "attach_or_publish_module", "module_state"]


class IncompatibleKeys(NamedTuple):
    """What ``load_into_module`` could not match, as ``nn.Module.load_state_dict`` reports it."""

    missing_keys: List[str]
    unexpected_keys: List[str]


def as_torch_state_dict(weights: Union[MappedModel, Mapping[str, Any]]) -> Dict[str, Any]:
    """``{name: torch.Tensor}`` from a MappedModel, a dict of companion Tensors or of torch
    tensors (zero-copy in every case)."""
    if isinstance(weights, MappedModel):
        return weights.state_dict()
    out: Dict[str, Any] = {}
    for name, value in weights.items():
        out[name] = value.torch() if isinstance(value, Tensor) else value
    return out


def load_into_module(module: "_torch.nn.Module",
                     weights: Union[MappedModel, Mapping[str, Any]],
                     strict: bool = True) -> IncompatibleKeys:
    """Points ``module``'s parameters and persistent buffers at the given tensors, without
    copying: each parameter becomes ``nn.Parameter(shared_tensor, requires_grad=False)`` and each
    buffer the shared tensor itself. The module may be built on the meta device (``with
    torch.device("meta"): model = Model(config)``): nothing needs to be allocated first.

    - Names are matched as in ``load_state_dict``. A parameter object shared by several modules
      (tied weights, e.g. ``lm_head.weight`` is ``embed_tokens.weight``) is one slot: an entry
      under any of its names loads it, and every alias keeps pointing at the same Parameter.
    - Shapes and dtypes must match exactly (there is no conversion: zero-copy cannot change
      the dtype; ask the server for a cast with ``ModelSpec(dtype=...)`` instead). Mismatches
      raise RuntimeError before anything is changed.
    - ``strict``: missing or unexpected keys raise RuntimeError (nothing is changed); otherwise
      they are returned. Entries left missing keep their old tensors (on meta: still meta).
    - Non-persistent buffers (not part of a state dict) are left alone; a module built on the
      meta device must compute those itself.

    The memory is read-only: use the module for inference only (no optimizer steps, no in-place
    updates of weights). Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
    """
    state = as_torch_state_dict(weights)
    return _assign(module, state, strict, non_persistent=False, what="shared weights")


def _slot_groups(module: "_torch.nn.Module", non_persistent: bool
                 ) -> Dict[int, Tuple[Any, List[Tuple[Any, str, str, str]]]]:
    """Every slot (module, kind, name, full name) under every name it is reachable by; slots
    holding the same tensor object (tied weights) form one group."""
    groups: Dict[int, Tuple[Any, List[Tuple[Any, str, str, str]]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        base = prefix + "." if prefix else ""
        for name, param in sub._parameters.items():
            if param is None:
                continue
            groups.setdefault(id(param), (param, []))[1].append((sub, "p", name, base + name))
        skip = set() if non_persistent else getattr(sub, "_non_persistent_buffers_set", set())
        for name, buf in sub._buffers.items():
            if buf is None or name in skip:
                continue
            groups.setdefault(id(buf), (buf, []))[1].append((sub, "b", name, base + name))
    return groups


def _same_memory(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return (a.device == b.device and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and a.numel() > 0 and a.data_ptr() == b.data_ptr()
            and tuple(a.stride()) == tuple(b.stride()))


def _assign(module: "_torch.nn.Module", state: Mapping[str, Any], strict: bool,
            non_persistent: bool, what: str) -> IncompatibleKeys:
    groups = _slot_groups(module, non_persistent)
    known = set()
    missing: List[str] = []
    errors: List[str] = []
    plan = []
    for current, slots in groups.values():
        keys = [key for _, _, _, key in slots]
        known.update(keys)
        present = [key for key in keys if key in state]
        if not present:
            missing.extend(keys)
            continue
        source_key = present[0]
        source = state[source_key]
        if not isinstance(source, _torch.Tensor):
            errors.append(f'"{source_key}" is a {type(source).__name__}, not a tensor')
            continue
        others = [key for key in present[1:] if not (isinstance(state[key], _torch.Tensor)
                                                     and _same_memory(state[key], source))]
        if others:
            errors.append(f"{source_key} is tied to {', '.join(others)} in the module, but the "
                          "given tensors differ")
            continue
        if tuple(source.shape) != tuple(current.shape):
            errors.append(f"size mismatch for {source_key}: the shared tensor has shape "
                          f"{tuple(source.shape)}, the module's is {tuple(current.shape)}")
            continue
        if source.dtype != current.dtype:
            errors.append(f"dtype mismatch for {source_key}: the shared tensor is {source.dtype}, "
                          f"the module's is {current.dtype} (no conversion is possible without "
                          "a copy: load the model with ModelSpec(dtype=...) or build the module "
                          "in the checkpoint's dtype)")
            continue
        plan.append((slots, source))
    unexpected = sorted(key for key in state if key not in known)
    missing.sort()
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: "
                          + ", ".join(f'"{k}"' for k in unexpected) + ".")
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: "
                          + ", ".join(f'"{k}"' for k in missing) + ".")
    if errors:
        raise RuntimeError(f"Error(s) in loading {what} into {type(module).__name__}:\n\t"
                           + "\n\t".join(errors))

    # One Parameter per source tensor: slots given the same tensor (a tie in the module, or
    # aliases in the published table) end up holding the same object.
    parameters: Dict[int, Any] = {}
    for slots, source in plan:
        for sub, kind, name, _ in slots:
            if kind == "p":
                parameter = parameters.get(id(source))
                if parameter is None:
                    parameter = _torch.nn.Parameter(source, requires_grad=False)
                    parameters[id(source)] = parameter
                sub._parameters[name] = parameter
            else:
                sub._buffers[name] = source
    return IncompatibleKeys(missing, unexpected)


def _alias_aware_state(weights: Union[MappedModel, Mapping[str, Any]]) -> Dict[str, Any]:
    """{name: torch.Tensor} in which names over the same memory (published aliases, tied
    weights) share one tensor object."""
    if isinstance(weights, MappedModel):
        weights = weights.state_dict()  # in bulk; grouped by memory below as torch tensors
    by_memory: Dict[Tuple[Any, ...], Any] = {}
    out: Dict[str, Any] = {}
    for name, value in weights.items():
        if isinstance(value, Tensor):
            key = (value.device, value.data_ptr, int(value.dtype), value.shape, value.strides) \
                if value.nbytes else None
            if key is not None and key in by_memory:
                out[name] = by_memory[key]
                continue
            tensor = value.torch()
        elif isinstance(value, _torch.Tensor):
            tensor = value.detach() if isinstance(value, _torch.nn.Parameter) else value
            key = (str(tensor.device), tensor.data_ptr(), str(tensor.dtype), tuple(tensor.shape),
                   tuple(tensor.stride())) if tensor.numel() and not tensor.is_meta else None
            if key is not None and key in by_memory:
                out[name] = by_memory[key]
                continue
        else:
            out[name] = value
            continue
        if key is not None:
            by_memory[key] = tensor
        out[name] = tensor
    return out


def attach_module(module: "_torch.nn.Module", mapped: Union[MappedModel, Mapping[str, Any]],
                  strict: bool = True) -> IncompatibleKeys:
    """Fills ``module`` (typically built on the meta device, e.g. ``nn.Linear(..., device=
    "meta")``, with the same post-processed architecture as the publisher's) with a published
    model's tensors, zero-copy, so that it runs:

    - every parameter becomes ``nn.Parameter(shared, requires_grad=False)``, every buffer the
      shared tensor, non-persistent buffers included (e.g. rotary ``inv_freq``): a published
      module (:func:`publish_module`) carries them all;
    - ties are restored: names that share memory in the published model (aliases), or that the
      module ties itself, get the same tensor object;
    - shapes and dtypes must match exactly; ``strict`` (default): missing or unexpected names
      raise RuntimeError listing them, before anything is changed.

    Read-only memory: inference only. Returns ``IncompatibleKeys(missing, unexpected)``."""
    state = _alias_aware_state(mapped)
    return _assign(module, state, strict, non_persistent=True, what="a published model")


def module_state(module: "_torch.nn.Module") -> Dict[str, Any]:
    """Every parameter and buffer of ``module``, persistent or not, by every name it is
    reachable by (tied tensors under each of their names): what :func:`publish_module`
    publishes."""
    return dict(module_tensors(module))


def publish_module(client: Any, key: str, module: "_torch.nn.Module",
                   fingerprint: Optional[Mapping[str, str]] = None) -> MappedModel:
    """Publishes every parameter and every buffer of ``module`` (persistent or not) under
    ``key``, each storage once: tied parameters are declared once and the other names as
    aliases. The tensors may be on any device. Returns the committed MappedModel; another
    process restores the module with :func:`attach_module`."""
    if not isinstance(module, _torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, not {type(module).__name__}")
    return client.publish(key, module, fingerprint=fingerprint)


def attach_or_publish_module(client: Any, key: str, fingerprint: Optional[Mapping[str, str]],
                             build: Callable[[], "_torch.nn.Module"],
                             module: "_torch.nn.Module", strict: bool = True,
                             timeout: Optional[float] = None) -> MappedModel:
    """``client.attach_or_publish(key, fingerprint, build)`` (exactly one caller builds the
    module and publishes it), then :func:`attach_module` into ``module`` (e.g. built on the meta
    device). Returns the MappedModel (keep it, or the module, alive as long as needed)."""
    mapped = client.attach_or_publish(key, fingerprint, build, timeout=timeout)
    attach_module(module, mapped, strict=strict)
    return mapped
