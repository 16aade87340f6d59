"""Value types: element types, model specs and statuses."""
from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .errors import Error, error_for_name


class DType(enum.IntEnum):
    """Element types (``companion_dtype``); the numbering matches the wire protocol."""

    BOOL = 0
    U8 = 1
    I8 = 2
    U16 = 3
    I16 = 4
    F16 = 5
    BF16 = 6
    U32 = 7
    I32 = 8
    F32 = 9
    U64 = 10
    I64 = 11
    F64 = 12
    F8_E4M3 = 13
    F8_E5M2 = 14


class DTypeInfo(NamedTuple):
    name: str                 # safetensors spelling
    itemsize: int             # bytes per element
    numpy: Optional[str]      # numpy dtype string; None where numpy has no such type
    torch: str                # attribute of the torch module (may be missing in old torch)
    dlpack_code: int          # DLDataTypeCode
    dlpack_bits: int


# DLDataTypeCode values (dlpack.h, DLPack 1.1).
kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLBool = 0, 1, 2, 4, 6
kDLFloat8_e4m3fn, kDLFloat8_e5m2 = 10, 12

DTYPES: Dict[DType, DTypeInfo] = {
    DType.BOOL: DTypeInfo("BOOL", 1, "|b1", "bool", kDLBool, 8),
    DType.U8: DTypeInfo("U8", 1, "|u1", "uint8", kDLUInt, 8),
    DType.I8: DTypeInfo("I8", 1, "|i1", "int8", kDLInt, 8),
    DType.U16: DTypeInfo("U16", 2, "<u2", "uint16", kDLUInt, 16),
    DType.I16: DTypeInfo("I16", 2, "<i2", "int16", kDLInt, 16),
    DType.F16: DTypeInfo("F16", 2, "<f2", "float16", kDLFloat, 16),
    DType.BF16: DTypeInfo("BF16", 2, None, "bfloat16", kDLBfloat, 16),
    DType.U32: DTypeInfo("U32", 4, "<u4", "uint32", kDLUInt, 32),
    DType.I32: DTypeInfo("I32", 4, "<i4", "int32", kDLInt, 32),
    DType.F32: DTypeInfo("F32", 4, "<f4", "float32", kDLFloat, 32),
    DType.U64: DTypeInfo("U64", 8, "<u8", "uint64", kDLUInt, 64),
    DType.I64: DTypeInfo("I64", 8, "<i8", "int64", kDLInt, 64),
    DType.F64: DTypeInfo("F64", 8, "<f8", "float64", kDLFloat, 64),
    DType.F8_E4M3: DTypeInfo("F8_E4M3", 1, None, "float8_e4m3fn", kDLFloat8_e4m3fn, 8),
    DType.F8_E5M2: DTypeInfo("F8_E5M2", 1, None, "float8_e5m2", kDLFloat8_e5m2, 8),
}

# Spellings of the cast targets a ModelSpec may ask for (the server also accepts aliases).
_TORCH_CAST_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                     "float": "fp32"}


def normalize_dtype(dtype: Any) -> Optional[str]:
    """A ModelSpec dtype as the C ABI takes it: None (as stored) or a name such as "bf16".

    Accepts None, "auto", strings ("bf16", "bfloat16", "fp16", "half", "fp32", ...; passed on as
    given, the library validates them), torch dtypes (torch.bfloat16 -> "bf16") and numpy dtypes.
    """
    if dtype is None:
        return None
    if isinstance(dtype, DType):
        return DTYPES[dtype].name
    if isinstance(dtype, str):
        return None if dtype in ("", "auto") else dtype
    text = str(dtype)
    if text.startswith("torch."):  # a torch.dtype, without importing torch
        name = text[len("torch."):]
        return _TORCH_CAST_NAMES.get(name, name)
    name = getattr(dtype, "name", None)  # numpy dtype or scalar type
    if name is None and isinstance(dtype, type):
        name = getattr(dtype, "__name__", None)
    if isinstance(name, str):
        return name
    raise TypeError(f"cannot interpret {dtype!r} as a dtype: use 'bf16', 'fp16', 'fp32', "
                    "'auto' or a torch dtype")


def _normalize_source(source: Union[str, "os.PathLike[str]"]) -> str:
    if isinstance(source, os.PathLike):
        return os.path.abspath(os.fspath(source))
    if not isinstance(source, str):
        raise TypeError(f"ModelSpec.source must be a str or a path, not {type(source).__name__}")
    # The server takes absolute paths or Hugging Face ids; make an existing relative path
    # absolute (as vLLM and transformers prefer a local directory over a hub id).
    if source and not os.path.isabs(source) and os.path.exists(source):
        return os.path.abspath(source)
    return source


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a client asks for. Equal specs name one shared copy on the server.

    - ``source``: an absolute directory or ``.safetensors`` path, or a Hugging Face id
      ("org/name") present in the server's hub cache. ``pathlib.Path`` objects and existing
      relative paths are made absolute.
    - ``revision``: Hugging Face revision; None = main.
    - ``dtype``: None / "auto" = as stored; "bf16", "fp16", "fp32" (or aliases, or a torch
      dtype) casts floating tensors while loading.
    - ``tp_size`` / ``tp_rank``: tensor-parallel shard (the server refuses tp_size != 1 for now).
    - ``tag``: opaque string that keeps otherwise equal models apart.
    """

    source: str
    revision: Optional[str] = None
    dtype: Optional[str] = None
    tp_size: int = 1
    tp_rank: int = 0
    tag: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _normalize_source(self.source))
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        object.__setattr__(self, "revision", self.revision or None)
        object.__setattr__(self, "tag", self.tag or None)
        object.__setattr__(self, "tp_size", int(self.tp_size))
        object.__setattr__(self, "tp_rank", int(self.tp_rank))

    @classmethod
    def of(cls, spec_or_source: "SpecLike", **overrides: Any) -> "ModelSpec":
        """A ModelSpec from a ModelSpec (returned as is unless overridden) or a source."""
        if isinstance(spec_or_source, ModelSpec):
            return dataclasses.replace(spec_or_source, **overrides) if overrides \
                else spec_or_source
        return cls(spec_or_source, **overrides)  # type: ignore[arg-type]

    def describe(self) -> str:
        out = self.source + (f"@{self.revision}" if self.revision else "")
        if self.dtype:
            out += f" dtype={self.dtype}"
        if self.tp_size != 1 or self.tp_rank != 0:
            out += f" tp={self.tp_rank}/{self.tp_size}"
        if self.tag:
            out += f" tag={self.tag}"
        return out


SpecLike = Union[ModelSpec, str, "os.PathLike[str]"]


class ModelState(str, enum.Enum):
    """A model's lifecycle state (the JSON "state" field)."""

    READY = "ready"
    LOADING = "loading"
    LOADED = "loaded"
    ERROR = "error"
    UNLOADED = "unloaded"

    def __str__(self) -> str:
        return self.value


def _state(value: Any) -> Union[ModelState, str]:
    try:
        return ModelState(value)
    except ValueError:
        return str(value)


Fingerprint = Dict[str, str]


def check_fingerprint(fingerprint: Any, what: str = "fingerprint") -> Optional[Dict[str, str]]:
    """A fingerprint as the library takes it: None, or a dict of str -> str (engine, version,
    dtype, ranks...). Raises TypeError naming the offending entry otherwise."""
    if fingerprint is None:
        return None
    if not isinstance(fingerprint, collections.abc.Mapping):
        raise TypeError(f"{what} must be a dict of str -> str (or None), not "
                        f"{type(fingerprint).__name__}")
    out: Dict[str, str] = {}
    for field, value in fingerprint.items():
        if not isinstance(field, str):
            raise TypeError(f"{what}: field names must be str, not {type(field).__name__} "
                            f"({field!r})")
        if not isinstance(value, str):
            raise TypeError(f"{what}[{field!r}] must be a str, not {type(value).__name__} "
                            f"({value!r}): convert it (str(...)) so that it compares exactly")
        out[field] = value
    return out


def fingerprint_json(fingerprint: Any, what: str = "fingerprint") -> Optional[bytes]:
    """The companion ABI's fingerprint_json: None, or a JSON object of strings (checked)."""
    checked = check_fingerprint(fingerprint, what)
    if checked is None:
        return None
    return json.dumps(checked, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _strings(doc: Any) -> Dict[str, str]:
    if not isinstance(doc, dict):
        return {}
    return {str(k): str(v) for k, v in doc.items()}


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
    """One live generation of a model: each publish (or reload) of a key makes a new one;
    readers keep the generation they attached until they release it."""

    generation: int                 # 1, 2, ... per key
    leases: int = 0
    slab_bytes: int = 0
    digests: Tuple[str, ...] = ()   # per segment, "wsum64:<16 hex>" (published models)
    fingerprint: Dict[str, str] = dataclasses.field(default_factory=dict, compare=False)
    created_at_ms: int = 0          # unix epoch milliseconds
    current: bool = False           # what new attaches get

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "GenerationInfo":
        return cls(generation=int(doc.get("generation", 0)), leases=int(doc.get("leases", 0)),
                   slab_bytes=int(doc.get("slab_bytes", 0)),
                   digests=tuple(str(d) for d in doc.get("digests") or ()),
                   fingerprint=_strings(doc.get("fingerprint")),
                   created_at_ms=int(doc.get("created_at_ms", 0)),
                   current=bool(doc.get("current", False)))


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One model's status, from the JSON the library returns (``companion ... --json``)."""

    id: str
    key: str
    source: str
    state: Union[ModelState, str]
    bytes_done: int = 0
    bytes_total: int = 0
    progress: float = 0.0
    tensors: int = 0
    leases: int = 0
    backend: str = ""
    slab_bytes: int = 0
    error_code: Optional[str] = None      # "NOT_FOUND", ... when state is "error"
    error_message: Optional[str] = None
    published: bool = False          # written by a client under ``key``, not loaded from files
    generation: int = 0              # the current generation (0: none committed yet)
    fingerprint: Dict[str, str] = dataclasses.field(default_factory=dict, compare=False)
    generations: Tuple[GenerationInfo, ...] = dataclasses.field(default=(), compare=False)
    last_used_ms: int = 0            # last acquire, release or load end (unix ms; 0: unknown)
    eviction_rank: int = 0           # 1: evicted first when room is needed; 0: not evictable
    raw: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "ModelStatus":
        error = doc.get("error") or {}
        return cls(id=str(doc.get("id", "")), key=str(doc.get("key", "")),
                   source=str(doc.get("source", "")), state=_state(doc.get("state", "")),
                   bytes_done=int(doc.get("bytes_done", 0)),
                   bytes_total=int(doc.get("bytes_total", 0)),
                   progress=float(doc.get("progress", 0.0)), tensors=int(doc.get("tensors", 0)),
                   leases=int(doc.get("leases", 0)), backend=str(doc.get("backend", "")),
                   slab_bytes=int(doc.get("slab_bytes", 0)),
                   error_code=error.get("code"), error_message=error.get("message"),
                   published=bool(doc.get("published", False)),
                   generation=int(doc.get("generation", 0)),
                   fingerprint=_strings(doc.get("fingerprint")),
                   generations=tuple(GenerationInfo.from_json(g)
                                     for g in doc.get("generations") or ()),
                   last_used_ms=int(doc.get("last_used_ms", 0)),
                   eviction_rank=int(doc.get("eviction_rank", 0)),
                   raw=doc)

    @property
    def loaded(self) -> bool:
        return self.state == ModelState.LOADED

    def generation_info(self, number: int) -> Optional[GenerationInfo]:
        """The live generation ``number``, or None when it is gone (or never was)."""
        for g in self.generations:
            if g.generation == number:
                return g
        return None

    @property
    def error(self) -> Optional[Error]:
        """The load's error as an exception instance (state "error"), else None."""
        if self.error_code is None:
            return None
        return error_for_name(self.error_code, self.error_message)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document this status came from."""
        return dict(self.raw)
