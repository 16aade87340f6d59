"""torch helpers: point an ``nn.Module`` at shared weights without copying them.

``import companion.torch`` imports torch; the rest of the package does not.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Tuple, Union

import torch as _torch

from .model import MappedModel, Tensor

__all__ = ["load_into_module", "IncompatibleKeys", "as_torch_state_dict"]


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

    # Every slot (module, kind, name) under every name it is reachable by; slots holding the
    # same tensor object (tied weights) form one group.
    groups: Dict[int, Tuple[Any, List[Tuple[Any, str, str, str]]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        base = prefix + "." if prefix else ""
        for name, param in sub._parameters.items():
            if param is None:
                continue
            groups.setdefault(id(param), (param, []))[1].append((sub, "p", name, base + name))
        non_persistent = getattr(sub, "_non_persistent_buffers_set", set())
        for name, buf in sub._buffers.items():
            if buf is None or name in non_persistent:
                continue
            groups.setdefault(id(buf), (buf, []))[1].append((sub, "b", name, base + name))

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
        raise RuntimeError(f"Error(s) in loading shared weights into {type(module).__name__}:\n\t"
                           + "\n\t".join(errors))

    for slots, source in plan:
        parameter = None
        for sub, kind, name, _ in slots:
            if kind == "p":
                if parameter is None:
                    parameter = _torch.nn.Parameter(source, requires_grad=False)
                sub._parameters[name] = parameter
            else:
                sub._buffers[name] = source
    return IncompatibleKeys(missing, unexpected)
