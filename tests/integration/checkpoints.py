"""Test checkpoints, written with the reference safetensors library."""
import json
import pathlib
import struct
import zlib

import torch
from safetensors.torch import save_file


def opt_like_state_dict(hidden=768, layers=12, vocab=50272, positions=2050, ffn=None,
                        dtype="float16", seed=0):
    """A state dict with the tensor names and shapes of facebook/opt-125m (196 tensors at the
    default sizes), filled with seeded random values."""
    ffn = ffn or 4 * hidden
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    sd = {
        "model.decoder.embed_tokens.weight": rand(vocab, hidden),
        "model.decoder.embed_positions.weight": rand(positions, hidden),
        "model.decoder.final_layer_norm.weight": rand(hidden),
        "model.decoder.final_layer_norm.bias": rand(hidden),
    }
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rand(hidden, hidden)
            sd[p + f"self_attn.{proj}.bias"] = rand(hidden)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{norm}.weight"] = rand(hidden)
            sd[p + f"{norm}.bias"] = rand(hidden)
        sd[p + "fc1.weight"] = rand(ffn, hidden)
        sd[p + "fc1.bias"] = rand(ffn)
        sd[p + "fc2.weight"] = rand(hidden, ffn)
        sd[p + "fc2.bias"] = rand(hidden)
    return sd


def write_opt_like(directory, **kwargs):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = opt_like_state_dict(**kwargs)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def write_sharded(directory, state_dict, shards=3):
    """Splits a state dict over several files plus model.safetensors.index.json, as
    transformers' save_pretrained does."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state_dict)
    weight_map = {}
    total = 0
    for k in range(shards):
        part = {n: state_dict[n] for n in names[k::shards]}
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def tensor_crcs(directory):
    """crc32 of every tensor's bytes, read straight from the files (not through our reader)."""
    directory = pathlib.Path(directory)
    files = [directory] if directory.is_file() else sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], zlib.crc32(data[8 + n + b:8 + n + e]))
    return out


def wsum64(data):
    """The checksum a GPU computes over a mapped tensor (common/checksum.hpp): sum of
    little-endian 32-bit words w[i] * (2i + 1) mod 2^64, the last word zero-padded."""
    import numpy as np
    pad = (-len(data)) % 4
    words = np.frombuffer(bytes(data) + b"\0" * pad, dtype="<u4").astype(np.uint64)
    weights = np.arange(len(words), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return int(np.sum(words * weights, dtype=np.uint64))


def tensor_wsums(directory):
    """wsum64 of every tensor's bytes, read straight from the files."""
    directory = pathlib.Path(directory)
    files = [directory] if directory.is_file() else sorted(directory.glob("*.safetensors"))
    out = {}
    for f in files:
        data = memoryview(f.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8:8 + n]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], wsum64(data[8 + n + b:8 + n + e]))
    return out
