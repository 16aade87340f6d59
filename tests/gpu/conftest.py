"""GPU suite: real servers on a real GPU, clients attaching through CUDA IPC. Skipped where no
GPU is visible (`companion devices` fails)."""
import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integration"))
from checkpoints import write_opt_like  # noqa: E402
from harness import COMPANION, Server, etcd, runtime_dir  # noqa: E402,F401 (fixtures)


def visible_gpus():
    if not COMPANION.exists():
        return []
    r = subprocess.run([str(COMPANION), "devices", "--json"], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else []


GPUS = visible_gpus()


def pytest_collection_modifyitems(config, items):
    if not GPUS:
        # 77: ctest's SKIP_RETURN_CODE for this suite.
        pytest.exit("no GPU visible (companion devices failed): GPU suite skipped", returncode=77)


@pytest.fixture(scope="session")
def gpu():
    return GPUS[0]


@pytest.fixture(scope="session")
def gpu_model_root(tmp_path_factory):
    """An OPT-like fp16 checkpoint of about 1.1 GB: big enough that a per-client copy would show
    in the GPU's memory use."""
    root = tmp_path_factory.mktemp("gpu-models")
    write_opt_like(root / "opt-1g", hidden=2048, layers=10, vocab=50272, positions=2050,
                   dtype="float16")
    return root


@pytest.fixture(params=["cuda-vmm", "cuda-ipc"])
def gpu_server(request, runtime_dir, gpu_model_root):
    s = Server(runtime_dir, [gpu_model_root], device="0", extra=["--backend", request.param])
    s.backend = request.param
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"
