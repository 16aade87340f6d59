"""Raw MoE checkpoints for the attach benchmarks: many small expert matrices, written without any
library. A checkpoint of more tensors than one safetensors header holds comfortably is split into
several files with a model.safetensors.index.json, as Hugging Face checkpoints are."""
import json
import pathlib


def moe_shapes(count):
    """``count`` expert matrices (8 x 64 bf16, 1 KiB each), as a raw MoE checkpoint lists them."""
    experts = 256
    return {f"model.layers.{i // (3 * experts)}.mlp.experts.{(i // 3) % experts}."
            f"{('gate_proj', 'up_proj', 'down_proj')[i % 3]}.weight": (8, 64)
            for i in range(count)}


def write_safetensors(path, shapes, dtype="BF16", itemsize=2):
    """A safetensors file of the given shapes (bytes: a repeating pattern; no library needed)."""
    header = {}
    offset = 0
    for name, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        block = bytes(range(256)) * 4096
        left = offset
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))


def write_moe_checkpoint(directory, count, per_file=250_000):
    """A raw-MoE checkpoint of ``count`` tensors in ``directory``: one model.safetensors, or
    ceil(count / per_file) files and an index when there are more (each header stays far below
    the format's 100 MB cap: ~110 bytes a tensor). Returns the files written."""
    directory = pathlib.Path(directory)
    shapes = moe_shapes(count)
    if count <= per_file:
        write_safetensors(directory / "model.safetensors", shapes)
        return [directory / "model.safetensors"]
    names = list(shapes)
    parts = (count + per_file - 1) // per_file
    files, weight_map = [], {}
    for k in range(parts):
        file_name = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[k * per_file:(k + 1) * per_file]
        write_safetensors(directory / file_name, {n: shapes[n] for n in chunk})
        weight_map.update({n: file_name for n in chunk})
        files.append(directory / file_name)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files
