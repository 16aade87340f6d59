"""JAX and CuPy consume a Companion model's GPU tensors without copying, on both CUDA backends.

A small checkpoint (float32, float16, bfloat16 and int8 tensors, odd sizes so that all tensors
but one sit at an offset inside the server's slab) is served on GPU 0 by a ``cuda-vmm`` and a
``cuda-ipc`` server. Each consumer runs in a fresh process, once for each way
``Tensor.__dlpack__`` makes its capsule (torch's own exporter when torch is imported, else the
ctypes fallback of ``companion.dlpack``):

- ``jax.dlpack.from_dlpack(t)`` and ``jnp.from_dlpack(t)``: ``arr.unsafe_buffer_pointer()``
  equals ``t.data_ptr`` (no copy), the array is on JAX's GPU 0, its bits equal the checkpoint's
  as numpy reads the file (bfloat16 included);
- ``cupy.from_dlpack(t)`` (bfloat16 included) and ``cupy.asarray(t)`` through
  ``__cuda_array_interface__``: ``arr.data.ptr`` equals ``t.data_ptr``, ``arr.device.id == 0``,
  bits equal;
- a transposed view: the server's API hands out only contiguous tensors (256-byte aligned in the
  slab), so a ``companion.Tensor`` with strides ``(1, cols)`` is made by hand over the mapped
  memory of one; both consumers take it zero-copy (CuPy keeps the strides; JAX takes them as a
  layout without copying);
- lifetime: with the arrays alive, the ``MappedModel`` and the ``Client`` are dropped: the
  server still counts the lease, the arrays still read the checkpoint, and computations on them
  (``jnp.sum``, ``jnp.matmul``; ``cupy.sum``, ``cupy.matmul``) equal numpy's on the file; once
  the arrays are freed the server's lease count returns to 0 (and no ctypes export is left).

The one refusal, by design: ``cupy.asarray`` of a bfloat16 tensor. The CUDA array interface
names dtypes with numpy typestrs, numpy has no bfloat16 (ml_dtypes' bfloat16 is the ambiguous
``<V2``), so ``Tensor.__cuda_array_interface__`` is not offered for bf16 and CuPy falls back to
``__array__``, which refuses GPU memory. ``cupy.from_dlpack`` takes bfloat16 (``kDLBfloat``,
CuPy 14). Seen on an H200 with JAX 0.11.2 and CuPy 14.2.0: JAX refused nothing, neither torch's
capsules nor the legacy ctypes ones (whose exporter ignores the stream JAX passes: the weights
were complete before the model was reported loaded).

Needs JAX with a CUDA backend, CuPy, torch and safetensors on the GPU machine (each consumer is
skipped where it is missing); JAX is told not to preallocate GPU memory.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from harness import BUILD, Server

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON_PACKAGE = REPO / "python"
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                      BUILD / "src" / "capi" / "libcompanion.so"))

# name -> (torch dtype name, shape). Odd element counts put the next tensor at an offset.
TENSORS = {
    "a.f32": ("float32", (64, 96)),
    "b.f32": ("float32", (96, 48)),
    "c.f16": ("float16", (3, 5, 7)),
    "d.bf16": ("bfloat16", (33, 17)),
    "e.i8": ("int8", (1001,)),
    "f.f16": ("float16", (128, 64)),
}
RAW = {"F32": ("<u4", "float32"), "F16": ("<u2", "float16"), "BF16": ("<u2", "bfloat16"),
       "I8": ("|u1", "int8")}


def read_checkpoint_bits(path):
    """{name: (safetensors dtype, numpy array of the raw bits, shaped)} straight from the file."""
    data = pathlib.Path(path).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(data[base + begin:base + end], dtype=RAW[entry["dtype"]][0])
        out[name] = (entry["dtype"], raw.reshape(entry["shape"]))
    return out


CHILD = textwrap.dedent(r'''
    import gc, json, os, sys, time
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    runtime_dir, path, consumer, exporter, out = sys.argv[1:6]
    if exporter == "torch":
        import torch  # Tensor.__dlpack__ delegates to torch's exporter once torch is imported
    import numpy as np
    import companion
    from companion import dlpack

    assert ("torch" in sys.modules) == (exporter == "torch"), sorted(sys.modules)[:5]
    report = {"consumer": consumer, "exporter": exporter, "cases": {}}
    RAW = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16, "I8": np.uint8}

    if consumer == "jax":
        import jax, jax.numpy as jnp
        gpu = jax.devices("gpu")[0]
        report["consumer_version"] = jax.__version__
        report["device"] = f"{gpu} {gpu.device_kind}"

        def imports(t):
            return {"jax.dlpack.from_dlpack": lambda: jax.dlpack.from_dlpack(t),
                    "jnp.from_dlpack": lambda: jnp.from_dlpack(t)}

        def pointer(a):
            return a.unsafe_buffer_pointer()

        def on_gpu0(a):
            return a.devices() == {gpu} and gpu.platform == "gpu" and gpu.id == 0

        def to_host(a):
            return np.asarray(a)

        def strides_of(a):
            return None
    else:
        import cupy
        report["consumer_version"] = cupy.__version__
        report["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()

        def imports(t):
            return {"cupy.from_dlpack": lambda: cupy.from_dlpack(t),
                    "cupy.asarray": lambda: cupy.asarray(t)}

        def pointer(a):
            return a.data.ptr

        def on_gpu0(a):
            return a.device.id == 0

        def to_host(a):
            return cupy.asnumpy(a)

        def strides_of(a):
            return list(a.strides)

    status_client = companion.connect(device=0, runtime_dir=runtime_dir)
    client = companion.connect(device=0, runtime_dir=runtime_dir)
    mapped = client.get_model_parameters(path)
    report["leases_mapped"] = status_client.status(path).leases
    report["backend"] = mapped.status.backend
    tensors = dict(mapped.items())
    base = min(t.data_ptr for t in tensors.values())
    report["tensors"] = {n: {"ptr_offset": t.data_ptr - base, "dtype": t.dtype_name,
                             "shape": list(t.shape), "device": t.device,
                             "dlpack_device": list(t.__dlpack_device__())}
                         for n, t in tensors.items()}
    # A transposed view of a.f32 over the same memory (the server only hands out contiguous
    # tensors, so it is made by hand).
    a = tensors["a.f32"]
    rows, cols = a.shape
    tensors["a.f32.T"] = companion.Tensor("a.f32.T", a.dtype, (cols, rows), (1, cols), a.data_ptr,
                                          a.nbytes, a.device_type, a.device_id, a._owner)

    arrays = {}
    for name, t in tensors.items():
        for how, make in imports(t).items():
            case = {"name": name, "how": how}
            try:
                arr = make()
            except Exception as e:
                case["error"] = f"{type(e).__name__}: {e}"
            else:
                case.update(ptr_equal=pointer(arr) == t.data_ptr, on_gpu0=bool(on_gpu0(arr)),
                            shape=list(arr.shape), dtype=str(arr.dtype),
                            strides=strides_of(arr))
                arrays[(name, how)] = arr
            report["cases"][f"{name} {how}"] = case
            del make
    report["live_exports_ctypes"] = dlpack.live_exports()

    # Drop every companion object but the consumers' arrays.
    del a, t, tensors, mapped
    client.close()
    del client
    gc.collect()
    time.sleep(0.5)
    report["leases_after_drop"] = status_client.status(path).leases

    for (name, how), arr in arrays.items():
        host = to_host(arr)
        source = "a.f32" if name == "a.f32.T" else name
        raw = RAW[report["tensors"][source]["dtype"]]
        report["cases"][f"{name} {how}"]["bits"] = np.ascontiguousarray(host).view(raw).tolist()

    # Computations on the shared memory, after the client and the MappedModel are gone.
    if consumer == "jax":
        a_arr = arrays[("a.f32", "jax.dlpack.from_dlpack")]
        b_arr = arrays[("b.f32", "jnp.from_dlpack")]
        i8 = arrays[("e.i8", "jax.dlpack.from_dlpack")]
        f16 = arrays[("f.f16", "jnp.from_dlpack")]
        report["compute"] = {
            "sum_a": float(jnp.sum(a_arr, dtype=jnp.float32)),
            "matmul_ab": np.asarray(jnp.matmul(a_arr, b_arr, precision="highest")).tolist(),
            "sum_i8": int(jnp.sum(i8.astype(jnp.int32))),
            "sum_f16_as_f32": float(jnp.sum(f16.astype(jnp.float32))),
        }
        report["compute_device"] = str(list(jnp.matmul(a_arr, b_arr).devices())[0])
    else:
        a_arr = arrays[("a.f32", "cupy.from_dlpack")]
        b_arr = arrays[("b.f32", "cupy.asarray")]
        i8 = arrays[("e.i8", "cupy.asarray")]
        f16 = arrays[("f.f16", "cupy.from_dlpack")]
        report["compute"] = {
            "sum_a": float(cupy.sum(a_arr, dtype=cupy.float32)),
            "matmul_ab": cupy.asnumpy(cupy.matmul(a_arr, b_arr)).tolist(),
            "sum_i8": int(cupy.sum(i8.astype(cupy.int32))),
            "sum_f16_as_f32": float(cupy.sum(f16.astype(cupy.float32))),
        }
        cupy.cuda.runtime.deviceSynchronize()
    report["leases_while_computing"] = status_client.status(path).leases

    del arrays, a_arr, b_arr, i8, f16, arr, host
    gc.collect()
    if consumer == "jax":
        jax.clear_caches()
    deadline = time.monotonic() + 15
    while status_client.status(path).leases != 0 and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    report["leases_after_free"] = status_client.status(path).leases
    report["live_exports_end"] = dlpack.live_exports()
    status_client.close()
    with open(out, "w") as f:
        json.dump(report, f)
''')


def child_env():
    env = dict(os.environ, COMPANION_LIBRARY=str(LIBRARY), PYTHONUNBUFFERED="1",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_PACKAGE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} missing: set COMPANION_LIBRARY or build target companion_capi")
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, (dtype, shape) in TENSORS.items():
        if dtype == "int8":
            state[name] = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        else:
            state[name] = torch.randn(*shape, generator=g).to(getattr(torch, dtype))
    root = tmp_path_factory.mktemp("dlpack-models")
    path = root / "mixed"
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return root, path, read_checkpoint_bits(path / "model.safetensors")


@pytest.fixture(scope="module", params=["cuda-vmm", "cuda-ipc"])
def served(request, checkpoint, tmp_path_factory):
    root, path, bits = checkpoint
    runtime = tmp_path_factory.mktemp("dlpack-runtime") / "runtime"
    runtime.mkdir(mode=0o700)
    server = Server(runtime, [root], device="0", extra=["--backend", request.param])
    yield request.param, server, runtime, path, bits
    assert server.stop() == 0, server.log_text()


def run_child(consumer, exporter, runtime, path, tmp_path):
    out = tmp_path / f"{consumer}-{exporter}.json"
    r = subprocess.run([sys.executable, "-c", CHILD, str(runtime), str(path), consumer, exporter,
                        str(out)], capture_output=True, text=True, timeout=300, env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stderr[-2000:] if r.stderr else "", end="")
    return json.loads(out.read_text())


CONSUMER_MODULE = {"jax": "jax", "cupy": "cupy"}


@pytest.mark.parametrize("exporter", ["torch", "ctypes"])
@pytest.mark.parametrize("consumer", ["jax", "cupy"])
def test_consumer_maps_companion_tensors_zero_copy(served, consumer, exporter, tmp_path):
    pytest.importorskip(CONSUMER_MODULE[consumer])
    backend, server, runtime, path, bits = served
    report = run_child(consumer, exporter, runtime, path, tmp_path)
    print(f"\n[{backend} {consumer} {report['consumer_version']} via {exporter}] "
          f"device {report['device']}")

    assert report["backend"] == backend
    assert report["leases_mapped"] == 1
    tensors = report["tensors"]
    assert set(tensors) == set(TENSORS)
    offsets = sorted(t["ptr_offset"] for t in tensors.values())
    assert offsets[0] == 0 and all(o > 0 for o in offsets[1:])  # all but one sit at an offset
    for name, t in tensors.items():
        assert t["device"] == "cuda:0" and t["dlpack_device"] == [2, 0], t

    refused = []
    for key, case in sorted(report["cases"].items()):
        name = case["name"]
        if name == "a.f32.T":
            dtype, raw = bits["a.f32"]
            raw = raw.T
        else:
            dtype, raw = bits[name]
        if "error" in case:
            refused.append(f"{key}: {case['error']}")
            print(f"  refused  {key}: {case['error'][:300]}")
            continue
        print(f"  zero-copy {key}: ptr_equal={case['ptr_equal']} dtype={case['dtype']} "
              f"strides={case['strides']}")
        assert case["ptr_equal"], case
        assert case["on_gpu0"], case
        assert case["shape"] == list(raw.shape), case
        assert np.array_equal(np.asarray(case["bits"], dtype=raw.dtype), raw), key
        if name == "a.f32.T" and consumer == "cupy":
            assert case["strides"] == [4, 96 * 4], case

    # The only refusal: bfloat16 through the CUDA array interface, which cannot name it.
    expected_refusals = {"d.bf16 cupy.asarray"} if consumer == "cupy" else set()
    assert {line.split(":")[0] for line in refused} == expected_refusals, refused
    for line in refused:
        assert "is in GPU memory" in line, line
    assert len(report["cases"]) == 2 * (len(TENSORS) + 1)

    # Lifetime: the consumers' arrays alone keep the mapping and the lease.
    assert report["leases_after_drop"] == 1
    assert report["leases_while_computing"] == 1
    assert report["leases_after_free"] == 0
    if exporter == "ctypes":
        assert report["live_exports_end"] == 0

    # The computations ran on the shared memory and equal numpy's on the file.
    a = bits["a.f32"][1].view(np.float32).astype(np.float64)
    b = bits["b.f32"][1].view(np.float32).astype(np.float64)
    f16 = bits["f.f16"][1].view(np.float16).astype(np.float64)
    i8 = bits["e.i8"][1].view(np.int8).astype(np.int64)
    c = report["compute"]
    assert c["sum_i8"] == int(i8.sum())
    assert np.isclose(c["sum_a"], a.sum(), rtol=1e-5, atol=1e-3), (c["sum_a"], a.sum())
    assert np.isclose(c["sum_f16_as_f32"], f16.sum(), rtol=1e-5, atol=1e-3)
    assert np.allclose(np.asarray(c["matmul_ab"]), a @ b, rtol=1e-5, atol=1e-4)
    if consumer == "jax":
        assert "cuda" in report["compute_device"].lower() or \
            "gpu" in report["compute_device"].lower(), report["compute_device"]
