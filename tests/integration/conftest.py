"""Fixtures for the host end-to-end tests: real server processes, real sockets, real
safetensors files."""
import pytest

from checkpoints import write_opt_like
from harness import COMPANION, Server, etcd, other_user, runtime_dir, shared_tmp  # noqa: F401 (fixtures)


def pytest_configure(config):
    if not COMPANION.exists():
        raise pytest.UsageError(f"{COMPANION} is missing: build first (scripts/setup.sh)")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """A model root shared by the session's servers, with an OPT-like checkpoint."""
    root = tmp_path_factory.mktemp("models")
    write_opt_like(root / "opt-small", hidden=256, layers=4, vocab=4096, dtype="float32")
    return root


@pytest.fixture
def server(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"
