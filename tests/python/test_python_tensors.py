"""Mapped tensors: exact contents, torch / numpy / DLPack consumption, read-only memory, and
lifetime (the mapping lives as long as anything made from it)."""
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

import companion
from companion import dlpack
from harness import wait_until


@pytest.fixture(params=["auto", "ctypes"])
def exporter(request):
    """Tensor.__dlpack__ through torch/numpy's own exporters, and through the ctypes fallback."""
    old = dlpack.EXPORTER
    dlpack.EXPORTER = request.param
    yield request.param
    dlpack.EXPORTER = old


@pytest.mark.parametrize("name", ["opt-f32", "opt-bf16", "opt-big"])
def test_state_dict_equals_the_file(client, model_root, name):
    expected = load_torch(str(model_root / name / "model.safetensors"))
    state = client.state_dict(str(model_root / name))
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        got = state[key]
        assert got.dtype == tensor.dtype and got.device.type == "cpu"
        assert torch.equal(got, tensor), key
    if name == "opt-bf16":
        assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_mapped_model_mapping_and_info(client, model_root):
    source = str(model_root / "opt-f32")
    with client.get_model_parameters(source) as model:
        assert len(model) == 36 and "model.decoder.embed_tokens.weight" in model
        assert sorted(model) == sorted(model.tensors())
        t = model["model.decoder.embed_tokens.weight"]
        assert isinstance(t, companion.Tensor)
        assert (t.name, t.dtype, t.dtype_name, t.shape, t.strides, t.itemsize) == \
            ("model.decoder.embed_tokens.weight", companion.DType.F32, "F32", (256, 64), (64, 1), 4)
        assert t.nbytes == 256 * 64 * 4 and t.numel == 256 * 64 and t.ndim == 2
        assert t.device == "cpu" and not t.is_cuda and t.is_contiguous() and t.data_ptr
        assert t.__dlpack_device__() == (1, 0)
        assert not hasattr(t, "__cuda_array_interface__")
        assert model.lease_id > 0 and model.mapped_bytes >= 36
        assert model.info["segments"] >= 1 and model.status.loaded
        assert model.info["read_only"] is True  # host memfds are mapped PROT_READ
        assert model.status.source == source and model.spec.source == source
        with pytest.raises(KeyError):
            model["nope"]
    assert model.released
    with pytest.raises(companion.InvalidArgument):
        model["model.decoder.embed_tokens.weight"]


def test_info_is_read_on_first_use_and_stays_readable_after_release(client, model_root):
    """get_model_parameters does not read the mapping's facts; release() keeps them readable."""
    source = str(model_root / "opt-f32")
    model = client.get_model_parameters(source)  # a str: a checkpoint or a published key
    assert model._info is None  # nothing read yet
    assert model.spec == companion.ModelSpec(source)  # a checkpoint (found out now)
    lease = model.lease_id
    assert lease > 0 and model.info is model.info  # read once, then kept
    unread = client.get_model_parameters(companion.ModelSpec(source))
    assert unread._info is None
    unread.release()
    assert unread.released and unread.info["lease_id"] > 0 and unread.info["lease_id"] != lease
    assert unread.status.source == source and "released" in repr(unread)
    model.release()
    assert model.info["lease_id"] == lease


def test_every_dtype_numpy_and_torch(client, model_root):
    expected = load_numpy(str(model_root / "mixed" / "model.safetensors"))
    model = client.get_model_parameters(str(model_root / "mixed"))
    for name, want in expected.items():
        t = model[name]
        array = t.numpy()
        assert array.dtype == want.dtype and array.shape == want.shape, name
        assert np.array_equal(array, want), name
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0  # numpy refuses: read-only
        assert np.array_equal(np.asarray(t), want)
        torch_dtype = getattr(torch, t.dtype_info.torch, None)
        if torch_dtype is None:  # unsigned 16/32/64-bit before torch 2.3
            with pytest.raises(TypeError, match="view_dtype"):
                t.torch()
            signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.itemsize]
            got = t.torch(view_dtype=signed)
            assert np.array_equal(got.numpy().view(want.dtype), want), name
        else:
            got = t.torch()
            assert got.dtype == torch_dtype and tuple(got.shape) == want.shape
            assert np.array_equal(got.numpy(), want), name
    assert model["scalar"].shape == () and model["scalar"].torch().item() == 1.5
    assert model["empty"].torch().shape == (0, 4)


def test_bf16_in_numpy(client, model_root):
    model = client.get_model_parameters(str(model_root / "opt-bf16"))
    t = model["model.decoder.final_layer_norm.weight"]
    with pytest.raises(TypeError, match="view_dtype=numpy.uint16"):
        t.numpy()
    bits = t.numpy(view_dtype=np.uint16)
    expected = load_torch(str(model_root / "opt-bf16" / "model.safetensors"))
    assert np.array_equal(bits, expected[t.name].view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(TypeError, match="item size"):
        t.numpy(view_dtype=np.float32)


def test_numpy_from_dlpack(client, model_root, exporter):
    model = client.get_model_parameters(str(model_root / "opt-f32"))
    expected = load_numpy(str(model_root / "opt-f32" / "model.safetensors"))
    for name in ("model.decoder.embed_tokens.weight", "model.decoder.layers.0.fc1.bias"):
        assert np.array_equal(np.from_dlpack(model[name]), expected[name])


def test_torch_from_dlpack(client, model_root, exporter):
    state = load_torch(str(model_root / "opt-bf16" / "model.safetensors"))
    model = client.get_model_parameters(str(model_root / "opt-bf16"))
    for name, want in state.items():
        got = torch.utils.dlpack.from_dlpack(model[name])
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        assert got.data_ptr() == model[name].data_ptr  # shared, not copied
    if hasattr(torch, "from_dlpack"):
        assert torch.equal(torch.from_dlpack(model[name]), want)


def test_dlpack_capsule_is_consumed_once(client, model_root, exporter):
    model = client.get_model_parameters(str(model_root / "opt-f32"))
    t = model["model.decoder.layers.1.fc2.weight"]
    capsule = t.__dlpack__()
    assert type(capsule).__name__ == "PyCapsule"
    assert dlpack.capsule_name(capsule) in ("dltensor", "dltensor_versioned")
    first = torch.utils.dlpack.from_dlpack(capsule)
    assert dlpack.is_consumed(capsule)
    assert dlpack.capsule_name(capsule).startswith("used_")
    with pytest.raises(Exception):
        torch.utils.dlpack.from_dlpack(capsule)
    assert torch.equal(first, t.torch())
    with pytest.raises(BufferError):
        t.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        t.__dlpack__(dl_device=(2, 0))
    assert t.__dlpack__(dl_device=(1, 0), copy=False, max_version=(1, 0)) is not None


def test_ctypes_capsule_contents_and_deleter(client, model_root, monkeypatch):
    monkeypatch.setattr(dlpack, "EXPORTER", "ctypes")
    model = client.get_model_parameters(str(model_root / "opt-bf16"))
    t = model["model.decoder.layers.0.self_attn.q_proj.weight"]
    gc.collect()
    dlpack.collect()
    base = dlpack.live_exports()
    capsule = t.__dlpack__()
    assert dlpack.capsule_name(capsule) == "dltensor" and dlpack.live_exports() == base + 1
    managed = dlpack.view_capsule(capsule)
    dl = managed.dl_tensor
    assert dl.data == t.data_ptr and (dl.device.device_type, dl.device.device_id) == (1, 0)
    assert (dl.dtype.code, dl.dtype.bits, dl.dtype.lanes) == (4, 16, 1)  # kDLBfloat
    assert dl.ndim == 2 and [dl.shape[i] for i in range(2)] == [64, 64]
    assert not dl.strides and dl.byte_offset == 0
    # A consumer takes it and, when done, calls the deleter exactly once.
    taken = dlpack.consume(capsule)
    del capsule
    gc.collect()
    assert dlpack.live_exports() == base + 1  # the consumer still holds it
    dlpack.call_deleter(taken)
    assert dlpack.live_exports() == base
    # A capsule nobody consumes is released once it is dropped.
    capsule = t.__dlpack__()
    assert dlpack.live_exports() == base + 1
    del capsule
    gc.collect()
    assert dlpack.live_exports() == base
    # Consumers' tensors keep the export (and the mapping) until they are freed.
    x = torch.utils.dlpack.from_dlpack(t)
    assert dlpack.live_exports() == base + 1
    del x
    gc.collect()
    assert dlpack.live_exports() == base


def test_bool_and_float8_dlpack_codes(monkeypatch):
    """DLPack type codes of the dtypes torch 1.13 cannot take: kDLBool and kDLFloat8_*."""
    monkeypatch.setattr(dlpack, "EXPORTER", "ctypes")
    import ctypes

    memory = ctypes.create_string_buffer(bytes([1, 0, 1, 1]))
    for dtype, code in [(companion.DType.BOOL, 6), (companion.DType.F8_E4M3, 10),
                        (companion.DType.F8_E5M2, 12)]:
        t = companion.Tensor("x", dtype, (4,), (1,), ctypes.addressof(memory), 4, 1, 0, memory)
        managed = dlpack.view_capsule(t.__dlpack__())
        assert (managed.dl_tensor.dtype.code, managed.dl_tensor.dtype.bits) == (code, 8)
        if dtype == companion.DType.BOOL:
            assert t.torch().tolist() == [True, False, True, True]
            assert t.numpy().tolist() == [True, False, True, True]
        elif hasattr(torch, companion.DTYPES[dtype].torch):
            assert t.torch().view(torch.uint8).tolist() == [1, 0, 1, 1]
        else:
            with pytest.raises(TypeError, match="view_dtype=torch.uint8"):
                t.torch()
            assert t.torch(view_dtype=torch.uint8).tolist() == [1, 0, 1, 1]
    gc.collect()


def test_mapping_outlives_client_and_model_while_a_tensor_lives(server, model_root):
    source = str(model_root / "opt-big")
    name = "model.decoder.layers.3.fc1.weight"
    expected = load_torch(str(model_root / "opt-big" / "model.safetensors"))[name]
    observer = companion.connect(runtime_dir=server.runtime_dir)
    spec = companion.ModelSpec(source, tag="lifetime")
    client = companion.connect(runtime_dir=server.runtime_dir)
    model = client.get_model_parameters(spec)
    survivors = {
        "torch": model[name].torch(),
        "numpy": model[name].numpy(),
        "view": model[name].torch()[1:3, ::2],
        "dlpack": torch.utils.dlpack.from_dlpack(model[name]),
        "tensor": model[name],
    }
    del model
    client.close()
    del client
    gc.collect()
    assert observer.status(spec).leases == 1
    for kind in ["tensor", "dlpack", "view", "numpy", "torch"]:
        gc.collect()
        assert observer.status(spec).leases == 1, kind
        value = survivors[kind]
        if kind == "tensor":
            assert torch.equal(value.torch(), expected)
        elif kind == "numpy":
            assert np.array_equal(value, expected.numpy())
        elif kind == "view":
            assert torch.equal(value, expected[1:3, ::2])
        else:
            assert torch.equal(value, expected)
        del survivors[kind], value
    gc.collect()
    # The last one gone: the model is unmapped and its lease returned.
    assert wait_until(lambda: observer.status(spec).leases == 0)
    observer.unload(spec)
    observer.close()


def test_only_one_tensor_left(server, model_root):
    """Delete everything but one torch tensor, collect garbage, read it."""
    source = str(model_root / "opt-f32")
    name = "model.decoder.layers.0.fc2.weight"
    expected = load_torch(str(model_root / "opt-f32" / "model.safetensors"))[name].clone()
    client = companion.connect(runtime_dir=server.runtime_dir)
    state = client.state_dict(companion.ModelSpec(source, tag="one-left"))
    tensor = state[name]
    del state
    client.close()
    del client
    gc.collect()
    assert torch.equal(tensor, expected) and float(tensor.sum()) == float(expected.sum())


def test_writes_are_refused_by_the_memory(server, model_root):
    """The host mapping is PROT_READ: a write through a torch tensor kills the process."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(companion.__path__[0] + '/..')!r})
        import companion
        c = companion.connect(runtime_dir={str(server.runtime_dir)!r})
        t = c.state_dict({str(model_root / 'opt-f32')!r})["model.decoder.final_layer_norm.bias"]
        print("mapped", flush=True)
        t.add_(1)
        print("wrote", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ))
    assert "mapped" in r.stdout and "wrote" not in r.stdout
    assert r.returncode == -11, (r.returncode, r.stderr)  # SIGSEGV
