"""The CUDA backends' own self-test (tests/gpu/cuda_selftest.cpp), as part of the GPU suite."""
import subprocess

from harness import BUILD


def test_cuda_backend_selftest():
    r = subprocess.run([str(BUILD / "tests" / "gpu" / "cuda_selftest")], capture_output=True,
                       text=True, timeout=600)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
