"""state_dict() in bulk against the per-tensor route on tables made here, record by record (no
server): layouts the checkpoints of the other tests do not have (interleaved MoE experts, strides
that are not contiguous, tensors with no bytes, names given twice, tensors at one offset, dtypes
torch lacks or this package does not know, several segments, offsets that are not a multiple of
the item size, longer records of a newer library), planned by the library (companion_plan_views)."""
import ctypes
import struct
import threading

import pytest
import torch

from companion import model as model_module

KDLCPU = 1
CODE = {"bool": 0, "u8": 1, "u16": 3, "f16": 5, "bf16": 6, "i32": 8, "f32": 9, "f64": 12}
ITEMSIZE = {0: 1, 1: 1, 3: 2, 5: 2, 6: 2, 8: 4, 9: 4, 12: 8}


def contiguous(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def extent(shape, strides, itemsize):
    if 0 in shape:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, strides))) * itemsize


class Memory:
    """The segments the table's records point into (host memory, filled with small bytes: no NaN in any dtype)."""

    def __init__(self, sizes):
        self.segments = [(ctypes.c_ubyte * size).from_buffer_copy(
            (bytes(range(7)) * (size // 7 + 1))[:size]) for size in sizes]

    def address(self, segment):
        return ctypes.addressof(self.segments[segment])


def make_table(entries, memory, record_size=64, dims_backwards=False):
    """A model._Table over records built here. entries: (name, dtype code, shape, strides or
    None, segment, byte offset[, nbytes]). dims_backwards: the records' sizes and strides laid
    out last record first (a library may lay them out in any order)."""
    records, dims, blob = bytearray(), [], bytearray()
    total, laid = sum(2 * len(entry[2]) for entry in entries), 0
    for entry in entries:
        name, code, shape, strides, segment, offset = entry[:6]
        strides = contiguous(shape) if strides is None else strides
        nbytes = entry[6] if len(entry) > 6 else extent(shape, strides, ITEMSIZE.get(code, 1))
        raw = name.encode()
        at = total - laid - 2 * len(shape) if dims_backwards else laid
        laid += 2 * len(shape)
        records += struct.pack("=QQQQQIiiiiI", memory.address(segment) + offset, nbytes, offset,
                               len(blob), at, len(raw), code, len(shape), KDLCPU, 0, segment)
        records += bytes(record_size - 64)
        dims.append(list(shape) + list(strides))
        blob += raw + b"\0"
    table = object.__new__(model_module._Table)
    table.count = len(entries)
    table.record_size = record_size
    table.records = memoryview(records)
    dims = [d for chunk in (reversed(dims) if dims_backwards else dims) for d in chunk]
    table.dims = memoryview(bytearray(struct.pack(f"={len(dims)}q", *dims)))
    table.names_blob = memoryview(blob)
    table.segments = len(memory.segments)
    table._names = None
    table._index = None
    table.made = [None] * len(entries)
    table.all_made = False
    table.lock = threading.Lock()
    return table


def same_torch(a, b):
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and a.stride() == b.stride()
            and a.device == b.device and a.data_ptr() == b.data_ptr())


def check_bulk(table, owner):
    """The bulk state_dict equals, name by name and in the index's order, the per-tensor route;
    every view its own object."""
    state = model_module._bulk_state_dict(torch, table, owner)
    expected = {name: table.get(i, owner).torch() for name, i in table.index.items()}
    assert list(state) == list(expected)
    for name, one in expected.items():
        assert same_torch(state[name], one), name
        assert torch.equal(state[name], one), name
    assert len({id(t) for t in state.values()}) == len(state)
    return state


def moe(experts, layers, hidden=8, inter=12):
    """Experts as a raw MoE checkpoint lists them: sorted names (experts.10 before experts.2),
    gate/up (inter x hidden) and down (hidden x inter) interleaved, laid out in name order."""
    names = sorted(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer in range(layers)
                   for e in range(experts) for proj in ("down_proj", "gate_proj", "up_proj"))
    entries, offset = [], 0
    for name in names:
        shape = (hidden, inter) if "down" in name else (inter, hidden)
        entries.append((name, CODE["bf16"], shape, None, 0, offset))
        offset += hidden * inter * 2
    return entries, offset


def llama(layers, hidden=16, kv=8, inter=24):
    """A Llama-like layout: per layer q, k, v, o, gate, up, down and two norms; a final norm."""
    parts = [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
             ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
             ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
             ("mlp.down_proj", (hidden, inter)), ("input_layernorm", (hidden,)),
             ("post_attention_layernorm", (hidden,))]
    entries, offset = [("model.embed_tokens.weight", CODE["f16"], (64, hidden), None, 0, 0)], \
        64 * hidden * 2
    for layer in range(layers):
        for part, shape in parts:
            entries.append((f"model.layers.{layer}.{part}.weight", CODE["f16"], shape, None, 0,
                            offset))
            offset += 2 * extent(shape, contiguous(shape), 1)
    entries.append(("model.norm.weight", CODE["f16"], (hidden,), None, 0, offset))
    return entries, offset + 2 * hidden


@pytest.mark.parametrize("experts,layers", [(4, 1), (40, 3)])
def test_interleaved_moe_experts(experts, layers):
    entries, size = moe(experts, layers)
    memory = Memory([size])
    check_bulk(make_table(entries, memory), memory)
    check_bulk(make_table(entries, memory, dims_backwards=True), memory)


def test_llama_layout():
    entries, size = llama(6)
    memory = Memory([size])
    check_bulk(make_table(entries, memory), memory)


def test_strides_offsets_segments_and_ndims():
    f32, f16, u8, f64 = CODE["f32"], CODE["f16"], CODE["u8"], CODE["f64"]
    entries = [
        ("transposed", f32, (4, 6), (1, 4), 0, 0),               # not contiguous
        ("transposed.again", f32, (4, 6), (1, 4), 0, 96),
        ("strided", f32, (3, 2), (4, 2), 0, 192),                # gaps between rows
        ("odd.f16", f16, (5,), None, 0, 301),                    # offset not a multiple of 2
        ("odd.f16.b", f16, (5,), None, 0, 311),
        ("even.f16", f16, (5,), None, 0, 322),
        ("scalar", f32, (), (), 0, 340),
        ("scalar.b", f32, (), (), 0, 344),
        ("three.d", f64, (2, 3, 2), None, 1, 0),                 # another segment
        ("bytes", u8, (7,), None, 1, 96),
        ("sparse.0", f32, (2,), None, 1, 200),                   # one shape far apart
        ("sparse.1", f32, (2,), None, 1, 960),
        ("sparse.2", f32, (2,), None, 1, 1000),
        ("sparse.3", f32, (2,), None, 1, 2040),
        ("sparse.4", f32, (2,), None, 1, 2044),
    ]
    # One shape at offsets a few steps of one lattice apart, not a few interleaved progressions.
    for k, step in enumerate((0, 1, 2, 4, 5, 7, 10, 11, 12, 15, 17, 18, 19, 22, 24, 25, 27, 28)):
        entries.append((f"holes.{k}", f16, (3,), None, 2, 6 * step))
    memory = Memory([400, 2048, 200])
    for record_size in (64, 80):  # a newer library's longer records
        check_bulk(make_table(entries, memory, record_size), memory)
    check_bulk(make_table(entries, memory, dims_backwards=True), memory)


def test_only_scalars_only_empties_and_no_tensors():
    f32 = CODE["f32"]
    memory = Memory([64])
    check_bulk(make_table([(f"s{i}", f32, (), (), 0, 4 * i) for i in range(5)], memory), memory)
    check_bulk(make_table([(f"e{i}", f32, (0, i), None, 0, 0) for i in range(3)], memory), memory)
    assert model_module._bulk_state_dict(torch, make_table([], memory), memory) == {}


def test_no_bytes_and_one_offset_twice():
    f32 = CODE["f32"]
    entries = [
        ("weight", f32, (4, 4), None, 0, 0),
        ("tied", f32, (4, 4), None, 0, 0),                       # the same memory, its own view
        ("tied.again", f32, (4, 4), None, 0, 0),
        ("empty", f32, (0, 4), None, 0, 64),
        ("empty.too", f32, (3, 0), None, 0, 64),
        ("bias", f32, (4,), None, 0, 64),
    ]
    memory = Memory([128])
    state = check_bulk(make_table(entries, memory), memory)
    assert state["weight"] is not state["tied"] and state["tied"].data_ptr() == \
        state["weight"].data_ptr()
    assert state["empty"].numel() == 0 and state["empty"].shape == (0, 4)


def test_dtypes_of_one_item_size_interleaved_out_of_table_order():
    """f16 and bf16 tensors of one shape side by side (one key but for the dtype), listed in the
    table against their order in memory, one offset twice, gaps, a tensor with no bytes among
    them and a second segment: each group's views in memory order, the state in table order."""
    f16, bf16, f32 = CODE["f16"], CODE["bf16"], CODE["f32"]
    entries = []
    for k in reversed(range(12)):  # the table lists the last in memory first
        entries.append((f"layer.{k}.a", f16 if k % 2 else bf16, (2, 3), None, k % 2, 16 * k))
    entries += [
        ("dup.of.layer.4", bf16, (2, 3), None, 0, 64),      # layer.4's memory, its own view
        ("nothing", f32, (0, 2), None, 0, 200),              # no bytes: made one by one
        ("gap.after", f16, (2, 3), None, 0, 300),           # far from the others
        ("odd", f16, (2, 3), None, 1, 301),                 # another residue
    ]
    memory = Memory([400, 400])
    state = check_bulk(make_table(entries, memory), memory)
    assert state["layer.3.a"].dtype == torch.float16 and state["layer.4.a"].dtype == torch.bfloat16
    assert state["dup.of.layer.4"].data_ptr() == state["layer.4.a"].data_ptr()
    assert state["odd"].data_ptr() == memory.address(1) + 301


def test_names_given_twice():
    f32, u16 = CODE["f32"], CODE["u16"]
    entries = [
        ("a", f32, (2,), None, 0, 0),
        ("b", f32, (2,), None, 0, 8),
        ("a", f32, (2,), None, 0, 16),      # replaces the first "a", which keeps its place
        ("c", u16, (2,), None, 0, 24),      # replaced below: its dtype never matters
        ("c", f32, (2,), None, 0, 32),
    ]
    memory = Memory([64])
    table = make_table(entries, memory)
    state = check_bulk(table, memory)
    assert list(state) == ["a", "b", "c"]
    assert state["a"].data_ptr() == memory.address(0) + 16


def test_dtypes_torch_lacks_or_unknown_raise_as_per_tensor():
    f32 = CODE["f32"]
    memory = Memory([64])
    lacking = [("ok", f32, (2,), None, 0, 0), ("u16", CODE["u16"], (2,), None, 0, 8)]
    table = make_table(lacking, memory)
    if hasattr(torch, "uint16"):
        check_bulk(table, memory)
    else:
        with pytest.raises(TypeError):
            table.get(1, memory).torch()
        with pytest.raises(TypeError):
            model_module._bulk_state_dict(torch, table, memory)
    unknown = make_table([("ok", f32, (2,), None, 0, 0), ("new", 77, (2,), None, 0, 8, 8)],
                         memory)
    with pytest.raises(ValueError):
        model_module._bulk_state_dict(torch, unknown, memory)


def test_a_100k_interleaved_table():
    entries, size = moe(256, 131, hidden=2, inter=2)  # 100,608 tensors
    memory = Memory([size])
    table = make_table(entries, memory)
    state = model_module._bulk_state_dict(torch, table, memory)
    index = table.index
    assert list(state) == list(index)
    for name, i in index.items():
        assert state[name].data_ptr() == memory.address(0) + entries[i][5]
        assert state[name].shape == entries[i][2]
