"""Memory admission on a real GPU: a load that does not fit the device's free memory (as the driver
reports it, less --memory-reserve) is refused at once with OUT_OF_MEMORY, nothing is allocated,
and the server goes on serving."""

import pytest

from harness import Server
from gpu_memory import gpu_memory_mib


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_a_load_past_free_memory_is_refused_and_allocates_nothing(runtime_dir, gpu_model_root,
                                                                   gpu, backend):
    model = gpu_model_root / "opt-1g"  # about 1.1 GB
    _, free = gpu_memory_mib(gpu["uuid"])
    # Leave about 256 MiB for loads: the 1.1 GB model cannot fit.
    reserve = f"{free - 256}MiB"
    s = Server(runtime_dir, [gpu_model_root], device="0",
               extra=["--backend", backend, "--memory-reserve", reserve])
    try:
        used_before, _ = gpu_memory_mib(gpu["uuid"])
        out, code = s.cli_json("load", str(model), check=False)
        assert code != 0, out
        assert out["error"]["code"] == "OUT_OF_MEMORY", out
        assert "available" in out["error"]["message"], out
        used_after, _ = gpu_memory_mib(gpu["uuid"])
        assert used_after - used_before < 64, (used_before, used_after)
        health, code = s.cli_json("health")
        assert code == 0 and health["refused"]["memory"] == 1, health
    finally:
        assert s.stop() == 0, s.log_text()

    # The same server settings with room to spare load it.
    s = Server(runtime_dir, [gpu_model_root], device="0", extra=["--backend", backend])
    try:
        out, code = s.cli_json("load", str(model))
        assert code == 0 and out["state"] == "loaded", out
    finally:
        assert s.stop() == 0, s.log_text()
