"""Fixtures for the Python package's tests: a real `companion serve` process on the host backend
(tests/integration/harness.py), checkpoints written with the reference safetensors library, and
the package imported from python/ against $COMPANION_BUILD_DIR/src/capi/libcompanion.so."""
import os
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "integration"))
sys.path.insert(0, str(REPO / "python"))

from checkpoints import write_opt_like  # noqa: E402
from harness import BUILD, COMPANION, Server, etcd, other_user, runtime_dir, shared_tmp  # noqa: E402,F401,E501

LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       BUILD / "src" / "capi" / "libcompanion.so"))
os.environ["COMPANION_LIBRARY"] = str(LIBRARY)


def pytest_configure(config):
    missing = [p for p in (COMPANION, LIBRARY) if not p.exists()]
    if missing:
        raise pytest.UsageError(
            f"{', '.join(map(str, missing))} missing: build first (cmake --build "
            f"{BUILD}; COMPANION_BUILD_DIR names the build directory)")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """Checkpoints shared by the session: OPT-like in fp32 and bf16, and one with a tensor of
    every dtype numpy can write."""
    import numpy as np
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("models")
    write_opt_like(root / "opt-f32", hidden=64, layers=2, vocab=256, positions=64,
                   dtype="float32")
    write_opt_like(root / "opt-bf16", hidden=64, layers=2, vocab=256, positions=64,
                   dtype="bfloat16", seed=1)
    write_opt_like(root / "opt-big", hidden=256, layers=4, vocab=4096, positions=512,
                   dtype="float16", seed=2)
    rng = np.random.default_rng(3)
    mixed = {
        "bool": rng.integers(0, 2, (3, 5)).astype(np.bool_),
        "u8": rng.integers(0, 255, (7,), dtype=np.uint8),
        "i8": rng.integers(-100, 100, (2, 3), dtype=np.int8),
        "u16": rng.integers(0, 60000, (4,), dtype=np.uint16),
        "i16": rng.integers(-30000, 30000, (4,), dtype=np.int16),
        "f16": rng.standard_normal((3, 3)).astype(np.float16),
        "u32": rng.integers(0, 2**31, (5,), dtype=np.uint32),
        "i32": rng.integers(-2**31, 2**31 - 1, (5,), dtype=np.int32),
        "f32": rng.standard_normal((2, 2, 2)).astype(np.float32),
        "u64": rng.integers(0, 2**62, (3,), dtype=np.uint64),
        "i64": rng.integers(-2**62, 2**62, (3,), dtype=np.int64),
        "f64": rng.standard_normal((6,)).astype(np.float64),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    (root / "mixed").mkdir()
    save_file(mixed, str(root / "mixed" / "model.safetensors"))
    data = (root / "opt-f32" / "model.safetensors").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    """One server per test module (tests that need a fresh one start their own)."""
    rt = tmp_path_factory.mktemp("rt")
    os.chmod(rt, 0o700)
    s = Server(rt, [model_root])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


@pytest.fixture
def client(server):
    import companion

    with companion.connect(runtime_dir=server.runtime_dir) as c:
        yield c
