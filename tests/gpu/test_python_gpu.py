"""The Python package on a GPU: an OPT-125m-shaped model served by Companion on GPU 0, attached in
another process into a model built on the meta device, gives exactly the logits of the model
loaded the usual way. Needs torch with CUDA and transformers; the library comes from
$COMPANION_LIBRARY, else $COMPANION_BUILD_DIR/src/capi/libcompanion.so."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from harness import BUILD, Server

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON_PACKAGE = REPO / "python"
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                      BUILD / "src" / "capi" / "libcompanion.so"))
# A fixed batch of token ids (OPT's vocabulary has 50272 entries).
INPUT_IDS = [[2, 100, 2000, 31414, 232, 328, 740, 1437, 50000, 7, 8, 9, 10, 11, 12, 13],
             [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 50271]]
# Bitwise-reproducible kernels in both processes.
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

if str(PYTHON_PACKAGE) not in sys.path:
    sys.path.insert(0, str(PYTHON_PACKAGE))


def child_env():
    env = dict(os.environ, COMPANION_LIBRARY=str(LIBRARY), PYTHONUNBUFFERED="1",
               **DETERMINISTIC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_PACKAGE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} missing: set COMPANION_LIBRARY or build target companion_capi")
    os.environ["COMPANION_LIBRARY"] = str(LIBRARY)
    os.environ.update(DETERMINISTIC_ENV)
    return torch


@pytest.fixture(scope="module")
def opt_checkpoint(torch_cuda, tmp_path_factory):
    """OPTConfig() defaults (the shape of facebook/opt-125m), random weights, fp32, saved as
    safetensors by save_pretrained (which drops lm_head.weight, tied to the embedding)."""
    transformers = pytest.importorskip("transformers")
    torch = torch_cuda
    root = tmp_path_factory.mktemp("python-gpu-models")
    torch.manual_seed(0)
    config = transformers.OPTConfig()
    model = transformers.OPTForCausalLM(config).to(torch.float32).eval()
    path = root / "opt-125m-random"
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    except TypeError:  # transformers without the argument: safetensors is the only format
        model.save_pretrained(str(path))
    assert list(path.glob("*.safetensors")), list(path.iterdir())
    return root, path


ATTACH = textwrap.dedent("""
    import json, sys
    import torch
    import transformers
    import companion
    from companion.torch import load_into_module

    path, runtime_dir, out = sys.argv[1:4]  # argv[4]: the token ids, as JSON
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    torch.cuda.set_device(0)

    config = transformers.OPTConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.OPTForCausalLM._from_config(config, attn_implementation="eager")
    client = companion.connect(device=0, runtime_dir=runtime_dir)
    mapped = client.get_model_parameters(path)
    keys = load_into_module(model, mapped, strict=False)
    model.tie_weights()  # lm_head.weight is not in the checkpoint: it is the embedding
    model.eval()
    client.close()

    embed = model.get_input_embeddings().weight
    pointers = {name: t.data_ptr for name, t in mapped.items()}
    report = {
        "missing": keys.missing_keys, "unexpected": keys.unexpected_keys,
        "meta": [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta],
        "devices": sorted({str(p.device) for p in model.parameters()}),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "zero_copy": all(p.data_ptr() in pointers.values() for p in model.parameters()),
        "tied": model.get_output_embeddings().weight.data_ptr() == embed.data_ptr(),
        "tensor_devices": sorted({t.device for t in mapped.values()}),
        "backend": mapped.status.backend,
    }
    ids = torch.tensor(json.loads(sys.argv[4]), device="cuda:0")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save(logits.cpu(), out)
    print(json.dumps(report), flush=True)
""")


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_meta_model_in_another_process_matches_from_pretrained(torch_cuda, opt_checkpoint,
                                                               runtime_dir, tmp_path, backend):
    import transformers

    torch = torch_cuda
    root, path = opt_checkpoint
    server = Server(runtime_dir, [root], device="0", extra=["--backend", backend])
    try:
        out = tmp_path / "logits.pt"
        r = subprocess.run([sys.executable, "-c", ATTACH, str(path), str(runtime_dir), str(out),
                            json.dumps(INPUT_IDS)],
                           capture_output=True, text=True, timeout=600, env=child_env())
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        assert server.stop() == 0, server.log_text()
    assert set(report["missing"]) <= {"lm_head.weight"}, report
    assert report["unexpected"] == [] and report["meta"] == [], report
    assert report["devices"] == ["cuda:0"] and report["dtypes"] == ["torch.float32"], report
    assert report["zero_copy"] and report["tied"], report
    assert report["tensor_devices"] == ["cuda:0"] and report["backend"] == backend, report

    # The usual way, in this process.
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    major = int(transformers.__version__.split(".")[0])
    dtype_arg = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    reference = transformers.OPTForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", **dtype_arg).cuda().eval()
    ids = torch.tensor(INPUT_IDS, device="cuda:0")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.cpu()
    got = torch.load(str(out))
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_gpu_tensors_through_every_consumer(torch_cuda, opt_checkpoint, runtime_dir):
    """state_dict equals the file; DLPack, __cuda_array_interface__ and numpy behave on GPU
    memory; the mapping outlives the client and the MappedModel."""
    import gc

    import companion
    from safetensors.torch import load_file

    torch = torch_cuda
    root, path = opt_checkpoint
    expected = {}
    for f in sorted(path.glob("*.safetensors")):
        expected.update(load_file(str(f), device="cuda:0"))
    server = Server(runtime_dir, [root], device="0")
    try:
        client = companion.connect(device=0, runtime_dir=runtime_dir)
        model = client.get_model_parameters(str(path))
        state = model.state_dict()
        assert sorted(state) == sorted(expected)
        for name, tensor in expected.items():
            got = state[name]
            assert got.device == torch.device("cuda", 0) and got.dtype == tensor.dtype
            assert got.data_ptr() == model[name].data_ptr
            assert torch.equal(got, tensor), name
        t = model["model.decoder.embed_tokens.weight"]
        assert t.is_cuda and t.device == "cuda:0" and t.__dlpack_device__() == (2, 0)
        with pytest.raises(TypeError, match="GPU memory"):
            t.numpy()
        via_dlpack = torch.from_dlpack(t)
        assert via_dlpack.data_ptr() == t.data_ptr and torch.equal(via_dlpack, expected[t.name])
        from companion import dlpack
        old, dlpack.EXPORTER = dlpack.EXPORTER, "ctypes"
        try:
            via_ctypes = torch.utils.dlpack.from_dlpack(t)
            assert via_ctypes.data_ptr() == t.data_ptr
            assert torch.equal(via_ctypes, expected[t.name])
            del via_ctypes
        finally:
            dlpack.EXPORTER = old
        interface = t.__cuda_array_interface__
        assert interface["data"] == (t.data_ptr, True) and interface["typestr"] == "<f4"
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            array = cupy.asarray(t)
            assert array.data.ptr == t.data_ptr
            assert bool((array == cupy.asarray(expected[t.name])).all())
            del array
        survivor = state[t.name]
        del state, model, via_dlpack, t
        client.close()
        del client
        gc.collect()
        torch.cuda.synchronize()
        assert torch.equal(survivor, expected["model.decoder.embed_tokens.weight"])
    finally:
        assert server.stop() == 0, server.log_text()
