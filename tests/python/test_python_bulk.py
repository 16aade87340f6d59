"""The tensor table in one block (companion_model_get_table) and state_dict() in bulk: the same
tensors, the same torch tensors and the same lifetimes as the per-tensor routes, also for a
100,000-tensor table."""
import ctypes
import gc
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import companion
from companion import _lib
from harness import wait_until


def per_tensor_table(model):
    """{name: (dtype, shape, strides, data, nbytes, device_type, device_id)} through
    companion_model_tensor, one call per tensor (the route the table replaces)."""
    lib = _lib.load_library()
    ptr = model._handle.ptr
    raw = _lib.TensorC()
    out = {}
    for i in range(lib.companion_model_tensor_count(ptr)):
        _lib.check(lib.companion_model_tensor(ptr, i, ctypes.byref(raw)))
        name = ctypes.string_at(raw.name, raw.name_length).decode()
        shape = tuple(raw.shape[d] for d in range(raw.ndim))
        strides = tuple(raw.strides[d] for d in range(raw.ndim))
        out[name] = (int(raw.dtype), shape, strides, raw.data or 0, raw.nbytes, raw.device_type,
                     raw.device_id)
    return out


def describe(t):
    return (int(t.dtype), t.shape, t.strides, t.data_ptr, t.nbytes, t.device_type, t.device_id)


def same_torch(a, b):
    """Both torch tensors show the same memory the same way."""
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and a.stride() == b.stride()
            and a.device == b.device and a.data_ptr() == b.data_ptr()
            and a.is_contiguous() == b.is_contiguous())


@pytest.mark.parametrize("name", ["opt-f32", "opt-bf16", "opt-big", "mixed"])
def test_table_and_bulk_state_dict_match_the_per_tensor_routes(client, model_root, name):
    with client.get_model_parameters(str(model_root / name)) as model:
        expected = per_tensor_table(model)
        assert len(model) == len(expected) and list(model) == list(expected)
        tensors = model.tensors()
        assert {n: describe(t) for n, t in tensors.items()} == expected
        assert all(model[n] is t for n, t in tensors.items())  # made once, then shared
        torch_has = all(hasattr(torch, t.dtype_info.torch) for t in tensors.values())
        if not torch_has:  # e.g. uint16 before torch 2.3: both routes refuse alike
            with pytest.raises(TypeError):
                model.state_dict()
            return
        state = model.state_dict()
        assert list(state) == list(expected)
        for n, t in tensors.items():
            one = t.torch()
            assert same_torch(state[n], one), n
            assert torch.equal(state[n], one), n


def test_bulk_views_keep_the_mapping_until_the_last_is_gone(server, model_root):
    source = str(model_root / "opt-big")
    spec = companion.ModelSpec(source, tag="bulk-lifetime")
    observer = companion.connect(runtime_dir=server.runtime_dir)
    client = companion.connect(runtime_dir=server.runtime_dir)
    model = client.get_model_parameters(spec)
    state = model.state_dict()
    pointers = {n: model[n].data_ptr for n in model}
    assert {n: t.data_ptr() for n, t in state.items()} == pointers  # zero-copy
    names = sorted(state)
    keep = {names[0]: state[names[0]], names[-1]: state[names[-1]][1:]}
    copies = {n: t.clone() for n, t in state.items() if n in keep}
    del model, state
    client.close()
    del client
    gc.collect()
    assert observer.status(spec).leases == 1
    assert torch.equal(keep[names[0]], copies[names[0]])
    del keep[names[0]]
    gc.collect()
    assert observer.status(spec).leases == 1
    assert torch.equal(keep[names[-1]], copies[names[-1]][1:])
    del keep
    gc.collect()
    assert wait_until(lambda: observer.status(spec).leases == 0)
    observer.unload(spec)
    observer.close()


def test_the_table_is_read_in_place_and_holds_the_mapping(server, model_root):
    """The table is read where the library keeps it (no copy): whoever holds it holds the model
    handle, so a reader that took it before release() reads valid memory; the mapping (and the
    lease) goes when the last holder does."""
    spec = companion.ModelSpec(str(model_root / "opt-f32"), tag="table-lifetime")
    observer = companion.connect(runtime_dir=server.runtime_dir)
    with companion.connect(runtime_dir=server.runtime_dir) as client:
        model = client.get_model_parameters(spec)
        expected = per_tensor_table(model)
        table = model._table
        model.release()
        del model
        gc.collect()
    assert observer.status(spec).leases == 1  # the table's views hold the handle
    rows = list(table.rows())
    assert table.names == list(expected)
    assert [(r[6], r[0], r[1]) for r in rows] == [(e[0], e[3], e[4]) for e in expected.values()]
    dims = table.dims.cast("q")
    assert [tuple(dims[r[4]:r[4] + r[7]]) for r in rows] == [e[1] for e in expected.values()]
    del table, rows, dims
    gc.collect()
    assert wait_until(lambda: observer.status(spec).leases == 0)
    observer.unload(spec)
    observer.close()


def test_release_from_another_thread_while_reading(client, model_root):
    """Readers racing release(): each call either raises InvalidArgument or gives the right
    tensors (the memory they read stays mapped while they hold what they read)."""
    source = str(model_root / "opt-big")
    with client.get_model_parameters(source) as model:
        truth = {n: t.clone() for n, t in model.state_dict().items()}
    names = list(truth)
    for _ in range(20):
        model = client.get_model_parameters(source)
        failures, done = [], []

        def read(model, kind):
            try:
                for k in range(200):
                    if kind == 0:
                        got = {names[k % len(names)]: model[names[k % len(names)]].torch()}
                    elif kind == 1:
                        got = {n: t.torch() for n, t in model.tensors().items()}
                    else:
                        got = model.state_dict()
                    for n, t in got.items():
                        if not torch.equal(t, truth[n]):
                            failures.append(n)
            except companion.InvalidArgument:
                done.append(kind)
            except Exception as e:  # anything else is a failure
                failures.append(repr(e))

        readers = [threading.Thread(target=read, args=(model, kind)) for kind in (0, 1, 2)]
        for r in readers:
            r.start()
        model.release()
        for r in readers:
            r.join()
        assert not failures
    gc.collect()


def test_released_models_raise_and_made_tensors_stay(client, model_root):
    model = client.get_model_parameters(str(model_root / "opt-f32"))
    name = "model.decoder.layers.0.fc2.weight"
    kept = model[name]
    model.release()
    assert len(model) == 0 and name not in model
    for call in (lambda: model[name], model.tensors, model.state_dict, lambda: list(model)):
        with pytest.raises(companion.InvalidArgument):
            call()
    assert kept.torch().shape == kept.shape


@pytest.fixture(scope="module")
def many_root(tmp_path_factory):
    """A checkpoint of 100,000 small tensors (raw MoE experts), in three dtypes and shapes, some
    starting at offsets that are not a multiple of their item size."""
    rng = np.random.default_rng(7)
    tensors = {}
    for i in range(100_000):
        kind = i % 3
        if kind == 0:
            value = rng.standard_normal((2, 3)).astype(np.float32)
        elif kind == 1:
            value = rng.standard_normal((3,)).astype(np.float16)
        else:
            value = rng.integers(0, 255, (5,), dtype=np.uint8)
        tensors[f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w"] = value
    root = tmp_path_factory.mktemp("many")
    (root / "moe").mkdir()
    save_file(tensors, str(root / "moe" / "model.safetensors"))
    return root, tensors


def test_a_100k_tensor_table(tmp_path_factory, many_root):
    root, expected = many_root
    from harness import Server

    rt = tmp_path_factory.mktemp("rt-many")
    rt.chmod(0o700)
    server = Server(rt, [root])
    try:
        with companion.connect(runtime_dir=server.runtime_dir) as c:
            model = c.get_model_parameters(str(root / "moe"))
            assert len(model) == 100_000
            assert list(model) == list(per_tensor_table(model))
            some = [f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w"
                    for i in (0, 1, 2, 4999, 77777, 99999)]
            for n in some:
                assert np.array_equal(model[n].numpy(), expected[n]), n
            state = model.state_dict()
            assert len(state) == 100_000
            for n in some:
                assert same_torch(state[n], model[n].torch()), n
            for n, value in expected.items():
                got = state[n]
                assert got.data_ptr() == model[n].data_ptr
                assert np.array_equal(got.numpy(), value), n
            spec = companion.ModelSpec(str(root / "moe"))
            del model, got
            gc.collect()
            assert c.status(spec).leases == 1  # the views hold the mapping
            del state
            gc.collect()
            assert wait_until(lambda: c.status(spec).leases == 0)
    finally:
        assert server.stop() == 0, server.log_text()


def test_an_older_library_without_the_table_call(client, model_root, monkeypatch):
    """A libcompanion.so that predates companion_model_get_table: the package falls back to a
    call per tensor, with the same tensors and state_dict."""
    source = str(model_root / "opt-f32")
    def described(model):  # each mapping has its own address: all but the data pointer
        return {n: describe(t)[:3] + describe(t)[4:] for n, t in model.tensors().items()}

    with client.get_model_parameters(source) as model:
        new = described(model)
        new_state = model.state_dict()
    real = _lib.load_library()

    class Older:
        def __getattr__(self, name):
            if name == "companion_model_get_table":
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(_lib, "load_library", lambda: Older())
    with client.get_model_parameters(source) as model:
        assert not isinstance(model._table, companion.model._Table)
        assert described(model) == new
        state = model.state_dict()
        assert list(state) == list(new_state)
        for n, t in state.items():
            assert torch.equal(t, new_state[n]) and t.data_ptr() == model[n].data_ptr
