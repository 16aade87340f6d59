"""Engine-style post-processing of Llama-shaped torch models, for the publishing tests and
benchmarks: what an inference engine does to a checkpoint's weights after loading them, so that
what gets published is no longer the checkpoint's layout.

- ``fuse_qkv(model)``: every attention module with ``q_proj``, ``k_proj`` and ``v_proj`` Linear
  layers (transformers' Llama, Mistral, Qwen2...) gets one ``qkv_proj`` Linear whose weight is
  the three stacked ([q; k; v] rows); ``q_proj``/``k_proj``/``v_proj`` become plain callables
  (not modules, no parameters) that run the fused projection once and return their slice, so
  the model's own attention forward runs unchanged.
- ``quantize_int8(model)``: every ``nn.Linear`` (``lm_head`` only when asked; embeddings never)
  becomes an :class:`Int8Linear`: an int8 ``weight`` parameter plus a float32 per-output-channel
  ``weight_scale`` buffer (symmetric absmax / 127), and a forward that dequantizes
  deterministically: ``F.linear(x, (weight.float() * scale[:, None]).to(x.dtype), bias)``.

Both work in place and return the model. Applied to a model built on the meta device they give
the same parameter and buffer names, dtypes and shapes as on real weights (no data is computed),
so a reader can build the architecture on meta, post-process it, then attach published tensors.
Pure torch: runs with torch 1.13 (CPU) and torch 2.x (CUDA).

``python tests/support/engine_shaped.py`` checks all of this on the CPU with a small hand-made
Llama-like module (no transformers needed).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fuse_qkv", "quantize_int8", "postprocess", "Int8Linear", "FusedProjectionSlice",
           "named_tensors", "tensor_table", "fingerprint", "QUANT", "ENGINE", "ENGINE_VERSION"]

ENGINE = "companion-engine-shaped"
ENGINE_VERSION = "1"
QUANT = "int8-per-output-channel-absmax"
_QKV = ("q_proj", "k_proj", "v_proj")


# ---- fused q/k/v ---------------------------------------------------------------------------------

class _FusedQKVOutput:
    """Runs an attention module's ``qkv_proj`` once per input: q, k and v projections of the same
    hidden states share one matmul. Keyed by the input tensor's identity (it holds the input, so
    the identity cannot be reused); the last slice to be taken drops both."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None

    def get(self, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x:
            # Looked up on every call: quantize_int8 may have replaced qkv_proj since.
            self.output = self.attention.qkv_proj(x)
            self.input = x
        assert self.output is not None
        return self.output

    def drop(self) -> None:
        self.input = None
        self.output = None


class FusedProjectionSlice:
    """Stands where ``q_proj``, ``k_proj`` or ``v_proj`` was: returns columns [start, stop) of the
    fused projection. A plain object, not an ``nn.Module``: the fused ``qkv_proj`` is the only
    parameter holder."""

    def __init__(self, fused: _FusedQKVOutput, name: str, start: int, stop: int,
                 last: bool) -> None:
        self.fused = fused
        self.name = name
        self.start = start
        self.stop = stop
        self.last = last

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.get(x)[..., self.start:self.stop].contiguous()
        if self.last:
            self.fused.drop()
        return y

    def __repr__(self) -> str:
        return f"FusedProjectionSlice({self.name}: qkv_proj[..., {self.start}:{self.stop}])"


def _new_parameter(data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=False)


def _attention_modules(model: nn.Module) -> List[nn.Module]:
    found = []
    seen = set()
    for _, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if all(isinstance(module._modules.get(n), nn.Linear) for n in _QKV):
            found.append(module)
    return found


def fuse_qkv(model: nn.Module) -> nn.Module:
    """Replaces each attention module's q/k/v Linear layers with one ``qkv_proj`` Linear (weight
    rows [q; k; v], bias likewise when present) and slicing callables in their place. In place;
    returns ``model``. Modules already fused are left alone. Raises ValueError when no attention
    module has the three projections and none was fused before."""
    attentions = _attention_modules(model)
    if not attentions:
        if any(isinstance(getattr(m, "q_proj", None), FusedProjectionSlice)
               for m in model.modules()):
            return model
        raise ValueError(f"{type(model).__name__}: no module with q_proj/k_proj/v_proj Linear "
                         "layers to fuse")
    for attention in attentions:
        linears = [attention._modules[n] for n in _QKV]
        weights = [lin.weight for lin in linears]
        in_features = weights[0].shape[1]
        dtype, device = weights[0].dtype, weights[0].device
        for name, w in zip(_QKV, weights):
            if w.shape[1] != in_features or w.dtype != dtype or w.device != device:
                raise ValueError(f"{name}: weight {tuple(w.shape)} {w.dtype} on {w.device} does "
                                 f"not stack with q_proj's {tuple(weights[0].shape)} {dtype} "
                                 f"on {device}")
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("q/k/v projections must all have a bias or none")
        sizes = [w.shape[0] for w in weights]
        out_features = sum(sizes)
        # Built on meta (no initialisation work), then given its real tensors.
        fused = nn.Linear(in_features, out_features, bias=all(has_bias), device="meta",
                          dtype=dtype)
        with torch.no_grad():
            if device.type == "meta":
                weight = torch.empty((out_features, in_features), dtype=dtype, device=device)
            else:
                weight = torch.cat([w.detach() for w in weights], dim=0)
            fused.weight = _new_parameter(weight)
            if all(has_bias):
                biases = [lin.bias for lin in linears]
                if device.type == "meta":
                    bias = torch.empty((out_features,), dtype=biases[0].dtype, device=device)
                else:
                    bias = torch.cat([b.detach() for b in biases], dim=0)
                fused.bias = _new_parameter(bias)
        for name in _QKV:
            delattr(attention, name)  # out of _modules: no longer part of the state
        attention.qkv_proj = fused
        output = _FusedQKVOutput(attention)
        start = 0
        for i, (name, size) in enumerate(zip(_QKV, sizes)):
            # Not a Module, a Parameter nor a Tensor: nn.Module stores it as a plain attribute.
            setattr(attention, name, FusedProjectionSlice(output, name, start, start + size,
                                                          last=i == len(_QKV) - 1))
            start += size
    return model


# ---- int8 weights --------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and one float32 scale per output channel. ``weight``
    (int8, [out, in]) is a parameter (requires_grad=False), ``weight_scale`` (float32, [out]) a
    persistent buffer, ``bias`` as the original layer's. Forward dequantizes to the input's dtype:
    ``F.linear(x, (weight.float() * weight_scale[:, None]).to(x.dtype), bias)`` (deterministic)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-d int8 tensor, not {weight.dtype} "
                             f"{tuple(weight.shape)}")
        if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32:
            raise ValueError(f"weight_scale must be float32 of shape ({weight.shape[0]},), not "
                             f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.weight = _new_parameter(weight)
        self.register_buffer("weight_scale", weight_scale)
        if bias is not None:
            self.bias = _new_parameter(bias)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "Int8Linear":
        """Symmetric per-output-channel absmax quantization of ``linear``'s weight (on meta:
        tensors of the right dtypes and shapes, nothing computed)."""
        w = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        if w.is_meta:
            q = torch.empty(tuple(w.shape), dtype=torch.int8, device=w.device)
            scale = torch.empty((w.shape[0],), dtype=torch.float32, device=w.device)
            return cls(q, scale, bias)
        with torch.no_grad():
            wf = w.to(torch.float32)
            scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q = torch.round(wf / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.contiguous(), bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale.unsqueeze(1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-output-channel")


def quantize_int8(model: nn.Module, include_lm_head: bool = False,
                  skip: Tuple[str, ...] = ()) -> nn.Module:
    """Replaces every ``nn.Linear`` in ``model`` (the fused ``qkv_proj`` too) with an
    :class:`Int8Linear`. Layers named ``lm_head`` are kept unless ``include_lm_head`` (a tied
    lm_head stops being tied when quantized); ``skip`` names more child names to keep.
    Embeddings are not Linear layers and are never touched. In place; returns ``model``."""
    keep = set(skip) | (set() if include_lm_head else {"lm_head"})
    replaced: Dict[int, Int8Linear] = {}  # a layer shared by two parents stays shared
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None or type(child) is not nn.Linear or child_name in keep:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = Int8Linear.quantize(child)
            setattr(parent, child_name, replaced[id(child)])
    return model


def postprocess(model: nn.Module, quantize: bool = True) -> nn.Module:
    """``fuse_qkv`` then (by default) ``quantize_int8``: the layout the tests publish."""
    fuse_qkv(model)
    if quantize:
        quantize_int8(model)
    return model


# ---- describing a module's tensors -------------------------------------------------------------

def named_tensors(module: nn.Module) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """(name, "parameter" | "buffer", tensor) for every parameter and buffer (non-persistent
    ones included) under every name it is reachable by (tied tensors appear once per name)."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        base = prefix + "." if prefix else ""
        for name, p in sub._parameters.items():
            if p is not None:
                yield base + name, "parameter", p
        for name, b in sub._buffers.items():
            if b is not None:
                yield base + name, "buffer", b


def tensor_table(module: nn.Module) -> Dict[str, Tuple[str, str, Tuple[int, ...]]]:
    """name -> (kind, dtype, shape) for every parameter and buffer: what must agree between a
    writer's post-processed model and a reader's meta-built one."""
    return {name: (kind, str(t.dtype), tuple(int(s) for s in t.shape))
            for name, kind, t in named_tensors(module)}


def fingerprint(dtype: Any, quant: str = QUANT, **extra: str) -> Dict[str, str]:
    """The fingerprint the tests publish under: engine and version, torch version, dtype,
    quantization, q/k/v layout, plus ``extra`` fields."""
    fp = {"engine": ENGINE, "engine_version": ENGINE_VERSION, "torch": torch.__version__,
          "dtype": str(dtype).replace("torch.", ""), "quant": quant, "qkv": "fused"}
    fp.update({k: str(v) for k, v in extra.items()})
    return fp


# ---- a CPU self-check ----------------------------------------------------------------------------

class _TinyRMSNorm(nn.Module):
    def __init__(self, hidden: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _TinyAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, device: Any,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.groups = heads // kv_heads
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, **kw)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(h).view(shape).transpose(1, 2)
        k = self.k_proj(h).view(shape).transpose(1, 2)
        v = self.v_proj(h).view(shape).transpose(1, 2)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return torch.cat((-x2, x1), dim=-1)

        q = q * cos + rotate(q) * sin
        k = k * cos + rotate(k) * sin
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        attn = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(b, t, -1))


class _TinyMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TinyLayer(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int, device: Any,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = _TinyAttention(hidden, heads, kv_heads, device, dtype)
        self.mlp = _TinyMLP(hidden, inter, device, dtype)
        self.input_layernorm = _TinyRMSNorm(hidden, device, dtype)
        self.post_attention_layernorm = _TinyRMSNorm(hidden, device, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class _TinyRotary(nn.Module):
    def __init__(self, head_dim: int, device: Any) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device,
                                                   dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class _TinyBody(nn.Module):
    def __init__(self, vocab: int, hidden: int, inter: int, layers: int, heads: int,
                 kv_heads: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, device=device, dtype=dtype)
        self.layers = nn.ModuleList([_TinyLayer(hidden, inter, heads, kv_heads, device, dtype)
                                     for _ in range(layers)])
        self.norm = _TinyRMSNorm(hidden, device, dtype)
        self.rotary_emb = _TinyRotary(hidden // heads, device)


class TinyLlama(nn.Module):
    """A Llama-like causal LM with transformers' attribute names (model.embed_tokens,
    model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, the norms,
    model.rotary_emb.inv_freq as a non-persistent buffer, lm_head tied to the embedding), for
    checks where transformers is not installed. ``forward(ids)`` returns the logits."""

    def __init__(self, vocab: int = 320, hidden: int = 64, inter: int = 160, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, device: Any = None,
                 dtype: torch.dtype = torch.float32, tie: bool = True) -> None:
        super().__init__()
        self.model = _TinyBody(vocab, hidden, inter, layers, heads, kv_heads, device, dtype)
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        cos, sin = self.model.rotary_emb(torch.arange(ids.shape[1], device=ids.device), h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))


def _fill(module: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """What an attach does, for the self-check: every parameter and buffer (non-persistent ones
    too) of ``module`` takes the tensor of its name; tied slots stay one object."""
    done: Dict[int, torch.Tensor] = {}
    for prefix, sub in list(module.named_modules(remove_duplicate=False)):
        base = prefix + "." if prefix else ""
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                src = tensors[base + name]
                assert src.dtype == p.dtype and src.shape == p.shape, (base + name, src, p)
                done[id(p)] = _new_parameter(src)
            sub._parameters[name] = done[id(p)]  # type: ignore[assignment]
        for name, b in list(sub._buffers.items()):
            if b is None:
                continue
            if id(b) not in done:
                src = tensors[base + name]
                assert src.dtype == b.dtype and src.shape == b.shape, (base + name, src, b)
                done[id(b)] = src
            sub._buffers[name] = done[id(b)]


def _selftest() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 3, 11], [0, 2, 4, 8, 16, 32, 64, 128]])
    results = []

    # Fusing keeps the function (float32: close; the matmuls are shaped differently).
    ref = TinyLlama().eval()
    with torch.no_grad():
        before = ref(ids)
        names_before = set(tensor_table(ref))
        fuse_qkv(ref)
        after = ref(ids)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5), (before - after).abs().max()
    table = tensor_table(ref)
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        assert p + "qkv_proj.weight" in table and p + "q_proj.weight" not in table
        assert table[p + "qkv_proj.weight"][2] == (64 + 32 + 32, 64), table[p + "qkv_proj.weight"]
        assert isinstance(ref.model.layers[i].self_attn.q_proj, FusedProjectionSlice)
    assert set(table) == (names_before - {f"model.layers.{i}.self_attn.{n}.weight"
                                          for i in range(2) for n in _QKV}
                          | {f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(2)})
    fuse_qkv(ref)  # already fused: nothing to do
    assert tensor_table(ref) == table
    results.append("fuse_qkv keeps the logits (float32, max diff "
                   f"{(before - after).abs().max().item():.2e})")

    # The fused output is computed once per input and never reused for another input.
    attn = ref.model.layers[0].self_attn
    calls = []
    handle = attn.qkv_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(2, 3, 64)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert len(calls) == 1 and attn.q_proj.fused.input is None, calls
    x2 = torch.randn(2, 3, 64)
    q2 = attn.q_proj(x2)
    assert len(calls) == 2 and not torch.equal(q, q2)
    full = attn.qkv_proj(x)
    assert torch.equal(torch.cat([q, k, v], -1), full)
    handle.remove()
    attn.q_proj.fused.drop()
    results.append("q/k/v slices share one fused matmul per input")

    # Quantization: int8 weights, float32 scales, lm_head (tied) kept, logits close.
    with torch.no_grad():
        quantize_int8(ref)
        quantized = ref(ids)
    table = tensor_table(ref)
    p = "model.layers.0."
    assert table[p + "self_attn.qkv_proj.weight"] == ("parameter", "torch.int8", (128, 64))
    assert table[p + "self_attn.qkv_proj.weight_scale"] == ("buffer", "torch.float32", (128,))
    assert table[p + "mlp.down_proj.weight"] == ("parameter", "torch.int8", (64, 160))
    assert table["lm_head.weight"] == ("parameter", "torch.float32", (320, 64))
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    assert table["model.rotary_emb.inv_freq"] == ("buffer", "torch.float32", (8,))
    assert sum(isinstance(m, Int8Linear) for m in ref.modules()) == 2 * 5
    cos = F.cosine_similarity(quantized.flatten(), after.flatten(), dim=0).item()
    assert cos > 0.999, cos
    lin = ref.model.layers[1].mlp.up_proj
    assert lin.weight.abs().max().item() == 127 and lin.weight.dtype == torch.int8
    results.append(f"quantize_int8: logits cosine {cos:.6f} to the float32 model")

    # Writer (bf16, as the GPU test) vs a reader built on meta: same table, same logits.
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(1)
        writer = TinyLlama(dtype=dtype).eval()
        postprocess(writer)
        with torch.no_grad():
            expected = writer(ids)
        reader = TinyLlama(device="meta", dtype=dtype).eval()
        postprocess(reader)
        assert tensor_table(reader) == tensor_table(writer), \
            sorted(set(tensor_table(reader).items()) ^ set(tensor_table(writer).items()))
        assert all(t.is_meta for _, _, t in named_tensors(reader))
        # Separate memory, as an attach gives (clones of every tensor, ties kept by _fill).
        published = {name: t.detach().clone() for name, _, t in named_tensors(writer)}
        _fill(reader, published)
        assert not any(t.is_meta for _, _, t in named_tensors(reader))
        assert reader.lm_head.weight is reader.model.embed_tokens.weight
        with torch.no_grad():
            got = reader(ids)
            again = reader(ids)
        assert got.dtype == expected.dtype == dtype
        assert torch.equal(got, expected) and torch.equal(again, expected), \
            (got.float() - expected.float()).abs().max()
        results.append(f"{str(dtype).replace('torch.', '')}: a meta-built reader has the "
                       f"writer's {len(tensor_table(writer))} names/dtypes/shapes and its "
                       "logits bit for bit")

    # Without quantization; and lm_head quantized when asked.
    m = TinyLlama(tie=False)
    postprocess(m, quantize=False)
    assert tensor_table(m)["model.layers.0.self_attn.qkv_proj.weight"][1] == "torch.float32"
    quantize_int8(m, include_lm_head=True)
    assert isinstance(m.lm_head, Int8Linear)
    try:
        fuse_qkv(nn.Sequential(nn.Linear(2, 2)))
    except ValueError:
        pass
    else:
        raise AssertionError("fuse_qkv accepted a model with nothing to fuse")
    assert fingerprint(torch.bfloat16)["dtype"] == "bfloat16"
    results.append("options: quantize=False, include_lm_head=True; errors")

    for line in results:
        print("ok:", line)
    print(f"engine_shaped self-check passed (torch {torch.__version__})")


if __name__ == "__main__":
    _selftest()
