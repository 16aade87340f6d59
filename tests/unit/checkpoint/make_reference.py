#!/usr/bin/env python3
"""Writes reference data for unit_checkpoint into OUTDIR.

Checkpoints are written by the reference safetensors library (torch and numpy front ends) and
described in OUTDIR/manifest.json independently of the C++ reader: the dtype spelling comes from
our own table, the bytes' crc32 from the arrays we saved, and the offsets from the file header.
Conversion vectors (OUTDIR/convert/*.bin, raw little-endian) are torch's casts between F32, F16
and BF16.
"""

import os

# torch's AVX2/AVX-512 f32->bf16 kernel writes 0xffff for every NaN while its scalar cast
# (c10::BFloat16) writes 0x7fc0; the scalar cast is the portable definition the C++ code follows.
# Must be set before torch is imported.
os.environ["ATEN_CPU_CAPABILITY"] = "default"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

TORCH_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64",
}
NUMPY_NAMES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16", np.dtype(np.int16): "I16", np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32", np.dtype(np.uint64): "U64", np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
}

rng = np.random.default_rng(20240611)
gen = torch.Generator().manual_seed(20240611)


def tensor_bytes(t):
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).tobytes()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def dtype_name(t):
    return NUMPY_NAMES[t.dtype] if isinstance(t, np.ndarray) else TORCH_NAMES[t.dtype]


def read_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def describe(path, tensors, metadata):
    """Manifest entry for one file: the header's offsets, our dtype names and crc32s."""
    n, header = read_header(path)
    stored_metadata = header.pop("__metadata__", {})
    assert stored_metadata == (metadata or {}), (path, stored_metadata, metadata)
    assert set(header) == set(tensors), path
    entries = []
    for name, t in tensors.items():
        h = header[name]
        data = tensor_bytes(t)
        assert h["dtype"] == dtype_name(t), (name, h["dtype"], dtype_name(t))
        assert h["shape"] == list(t.shape), (name, h["shape"], list(t.shape))
        assert h["data_offsets"][1] - h["data_offsets"][0] == len(data), name
        entries.append({
            "name": name, "dtype": dtype_name(t), "shape": list(t.shape),
            "data_offsets": h["data_offsets"], "nbytes": len(data),
            "crc32": zlib.crc32(data) & 0xFFFFFFFF,
        })
    entries.sort(key=lambda e: (e["data_offsets"][0], e["data_offsets"][1], e["name"]))
    return {"header_bytes": n, "file_size": os.path.getsize(path),
            "metadata": metadata or {}, "tensors": entries}


def save_torch(out, rel, tensors, metadata=None):
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return rel, describe(path, tensors, metadata)


def save_numpy(out, rel, arrays, metadata=None):
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
    return rel, describe(path, arrays, metadata)


def random_torch(dtype, shape):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 10).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -2**62), min(info.max, 2**62), shape, generator=gen,
                         dtype=torch.int64).to(dtype)


def random_numpy(dtype, shape):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 10).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def opt_like_state_dict(dtype=torch.float16):
    """OPT-125m's tensor names and layout, shrunk: hidden 64, 2 layers, vocab 256."""
    hidden, ffn, vocab, positions, layers = 64, 256, 256, 66, 2
    sd = {
        "model.decoder.embed_tokens.weight": (vocab, hidden),
        "model.decoder.embed_positions.weight": (positions, hidden),
        "model.decoder.final_layer_norm.weight": (hidden,),
        "model.decoder.final_layer_norm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
            sd[p + f"self_attn.{proj}.bias"] = (hidden,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{norm}.weight"] = (hidden,)
            sd[p + f"{norm}.bias"] = (hidden,)
        sd[p + "fc1.weight"] = (ffn, hidden)
        sd[p + "fc1.bias"] = (ffn,)
        sd[p + "fc2.weight"] = (hidden, ffn)
        sd[p + "fc2.bias"] = (hidden,)
    return {k: random_torch(dtype, v) for k, v in sd.items()}


def write_sharded(out, rel_dir, state_dict, max_shard_bytes):
    """Shards like transformers' save_pretrained: fill a shard until the next tensor would not fit,
    name them model-0000i-of-0000n.safetensors, and write the index."""
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    files, weight_map = {}, {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        rel, desc = save_torch(out, os.path.join(rel_dir, file_name), shard, {"format": "pt"})
        files[rel] = desc
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out, rel_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return files, len(shards)


def write_checkpoints(out):
    files, checkpoints = {}, {}

    def add(entry):
        files[entry[0]] = entry[1]

    add(save_torch(out, "files/torch_dtypes.safetensors",
                   {f"t_{name.lower()}": random_torch(dtype, (3, 5))
                    for dtype, name in TORCH_NAMES.items()},
                   {"format": "pt", "note": "every dtype torch writes"}))
    add(save_numpy(out, "files/numpy_dtypes.safetensors",
                   {f"n_{name.lower()}": random_numpy(dtype, (7,))
                    for dtype, name in NUMPY_NAMES.items()}))
    shapes = {
        "scalar_f32": torch.tensor(3.5, dtype=torch.float32),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "scalar_bf16": torch.tensor(1.25, dtype=torch.bfloat16),
        "empty_1d": torch.zeros(0, dtype=torch.float32),
        "empty_3d": torch.zeros(3, 0, 2, dtype=torch.float16),
        "vector": random_torch(torch.float32, (17,)),
        "matrix": random_torch(torch.bfloat16, (4, 9)),
        "rank4": random_torch(torch.int32, (2, 3, 4, 5)),
        "rank6": random_torch(torch.uint8, (1, 2, 1, 3, 1, 2)),
    }
    add(save_torch(out, "files/shapes.safetensors", shapes))
    add(save_numpy(out, "files/numpy_scalars.safetensors",
                   {"u16_scalar": np.array(65535, dtype=np.uint16),
                    "u64_max": np.array([2**64 - 1, 0], dtype=np.uint64),
                    "f16_empty": np.zeros((0,), dtype=np.float16)},
                   {"a": "1", "b": "", "unicode": "h\u00e9llo \u2603"}))
    add(save_torch(out, "files/no_tensors.safetensors", {}, {"empty": "yes"}))

    opt = opt_like_state_dict()
    rel, desc = save_torch(out, "opt_like/model.safetensors", opt, {"format": "pt"})
    add((rel, desc))
    checkpoints["opt_like"] = {"files": [rel], "tensors": len(opt),
                               "total_bytes": sum(e["nbytes"] for e in desc["tensors"])}
    with open(os.path.join(out, "opt_like", "config.json"), "w") as f:
        json.dump({"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2,
                   "vocab_size": 256, "torch_dtype": "float16"}, f)

    sharded = opt_like_state_dict(torch.bfloat16)
    shard_files, shard_count = write_sharded(out, "sharded", sharded, 100 * 1024)
    assert shard_count == 3, shard_count
    files.update(shard_files)
    checkpoints["sharded"] = {"files": sorted(shard_files), "tensors": len(sharded),
                              "total_bytes": sum(e["nbytes"] for d in shard_files.values()
                                                 for e in d["tensors"])}

    # Several files and no index: opened by listing *.safetensors.
    rels = []
    for name, part in (("b.safetensors", {"z.w": random_torch(torch.float32, (8, 8))}),
                       ("a.safetensors", {"y.w": random_torch(torch.float16, (4,)),
                                          "y.b": random_torch(torch.float16, (4, 2))})):
        rel, desc = save_torch(out, os.path.join("multi", name), part)
        files[rel] = desc
        rels.append(rel)
    checkpoints["multi"] = {"files": sorted(rels), "tensors": 3,
                            "total_bytes": sum(files[r]["tensors"][i]["nbytes"] for r in rels
                                               for i in range(len(files[r]["tensors"])))}
    return files, checkpoints


def bits_f32(values):
    return np.asarray(values, dtype=np.uint32)


def conversion_inputs():
    """F32 bit patterns that exercise rounding: specials, both formats' edges and every midpoint."""
    specials = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000,  # NaNs
        0x00000001, 0x007FFFFF, 0x00800000, 0x80000001,  # f32 subnormals, min normal
        0x7F7FFFFF, 0xFF7FFFFF,  # f32 max
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # f16 max and overflow edge
        0x38800000, 0x387FFFFF, 0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF,  # f16 min normal/sub
        0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001,  # bf16 max, halfway to inf
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bf16 ties to even
    ]
    # Every f16 value and the exact midpoint above each one (f32 holds it exactly), and the
    # floats one ulp either side of the midpoint.
    h = np.arange(0, 0x7C00, dtype=np.uint16)
    lo = torch.from_numpy(h.view(np.int16).copy()).view(torch.float16).to(torch.float64)
    hi = torch.from_numpy((h + 1).view(np.int16).copy()).view(torch.float16).to(torch.float64)
    mid = ((lo + hi) / 2).to(torch.float32).numpy().view(np.uint32)
    f16_mid = np.concatenate([mid, mid - 1, mid + 1, lo.to(torch.float32).numpy().view(np.uint32)])
    # bf16 midpoints and neighbours for random upper halves, all exponents.
    upper = rng.integers(0, 0x7F80, 20000, dtype=np.uint32)
    bf16_mid = np.concatenate([(upper << 16) | 0x8000, (upper << 16) | 0x7FFF,
                               (upper << 16) | 0x8001, upper << 16])
    random_bits = rng.integers(0, 2**32, 50000, dtype=np.uint64).astype(np.uint32)
    random_values = (rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000)).astype(
        np.float32).view(np.uint32)
    positive = np.concatenate([bits_f32(specials), f16_mid, bf16_mid])
    return np.concatenate([positive, positive ^ np.uint32(0x80000000), random_bits,
                           random_values]).astype("<u4")


def write_conversions(out):
    d = os.path.join(out, "convert")
    os.makedirs(d, exist_ok=True)

    def save(name, array):
        array.tofile(os.path.join(d, name + ".bin"))

    f32_bits = conversion_inputs()
    f32 = torch.from_numpy(f32_bits.view(np.int32).copy()).view(torch.float32)
    save("f32", f32_bits)
    save("f32_to_bf16", f32.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2"))
    save("f32_to_f16", f32.to(torch.float16).view(torch.int16).numpy().astype("<i2"))

    # 16-bit sources: every bit pattern.
    all16 = np.arange(0, 65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
    bf16 = torch.from_numpy(all16.copy()).view(torch.bfloat16)
    f16 = torch.from_numpy(all16.copy()).view(torch.float16)
    save("u16_all", all16.astype("<i2"))
    save("bf16_to_f32", bf16.to(torch.float32).view(torch.int32).numpy().astype("<i4"))
    save("f16_to_f32", f16.to(torch.float32).view(torch.int32).numpy().astype("<i4"))
    save("bf16_to_f16", bf16.to(torch.float16).view(torch.int16).numpy().astype("<i2"))
    save("f16_to_bf16", f16.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2"))
    return {"f32_count": int(f32_bits.size), "u16_count": 65536}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_reference.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for sub in ("files", "opt_like", "sharded", "multi", "convert"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    files, checkpoints = write_checkpoints(out)
    conversions = write_conversions(out)
    manifest = {"torch": torch.__version__, "safetensors": safetensors.__version__,
                "files": files, "checkpoints": checkpoints, "conversions": conversions}
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "manifest.json"))


if __name__ == "__main__":
    main()
