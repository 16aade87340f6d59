"""companion.transformers.from_pretrained on a GPU server, on both CUDA backends: for six
architectures (tests/torch2/tiny_models.py) the logits equal transformers' own
from_pretrained(device_map="cuda:0") bit for bit, the parameters are the server's memory (no
private copy in torch's allocator) and the route is the one expected (checkpoint, or published
for the MoE model). Needs torch with CUDA and transformers >= 5."""
import os
import pathlib
import sys

import pytest

from harness import BUILD, Server

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "tests" / "torch2"))
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       BUILD / "src" / "capi" / "libcompanion.so"))
# Bitwise-reproducible cuBLAS in both models.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from tiny_models import ARCHITECTURES, INPUT_IDS, route_of, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} missing: set COMPANION_LIBRARY or build target companion_capi")
    os.environ["COMPANION_LIBRARY"] = str(LIBRARY)
    return torch


@pytest.fixture(scope="module")
def gpu_hf_root(torch_cuda, tmp_path_factory):
    """The six architectures in bfloat16 (what GPU serving uses), written on the CPU."""
    root = tmp_path_factory.mktemp("gpu-hf-models")
    for seed, name in enumerate(ARCHITECTURES):
        write_checkpoint(root, name, seed=seed, dtype=torch_cuda.bfloat16)
    return root


@pytest.fixture(scope="module", params=["cuda-vmm", "cuda-ipc"])
def hf_gpu_server(request, tmp_path_factory, gpu_hf_root):
    rt = tmp_path_factory.mktemp("rt")
    os.chmod(rt, 0o700)
    s = Server(rt, [gpu_hf_root], device="0", extra=["--backend", request.param])
    s.backend = request.param
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_gpu_logits_bit_exact(name, torch_cuda, gpu_hf_root, hf_gpu_server):
    import transformers

    import companion
    import companion.transformers as ct

    torch = torch_cuda
    path = gpu_hf_root / name
    ids = torch.tensor(INPUT_IDS, device="cuda:0")
    client = companion.connect(device=0, runtime_dir=hf_gpu_server.runtime_dir,
                               instance_id=hf_gpu_server.instance)
    try:
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated(0)
        model = ct.from_pretrained(path, device="cuda:0", client=client)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated(0) - allocated
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert model.companion_route == route_of(name)
        assert {p.device for p in model.parameters()} == {torch.device("cuda", 0)}
        # The parameters are the lease's memory; torch's allocator holds at most the
        # non-persistent buffers (rotary inv_freq...), far less than the weights.
        mapped = {t.data_ptr for t in model.companion_weights.tensors().values()}
        assert {p.data_ptr() for p in model.parameters()} <= mapped
        assert grown < weights / 4, (grown, weights)

        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path, device_map="cuda:0").eval()
        with torch.no_grad():
            ours, theirs = model(ids).logits, reference(ids).logits
        assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()
        for key, buffer in reference.named_buffers():
            assert torch.equal(dict(model.named_buffers())[key], buffer), key
        tied = reference.config.get_text_config().tie_word_embeddings
        assert (model.get_output_embeddings().weight
                is model.get_input_embeddings().weight) == tied
        print(f"{hf_gpu_server.backend} {name}: route {model.companion_route}, "
              f"{weights} weight bytes shared, torch allocator +{grown} bytes")
    finally:
        client.close()
