"""The host tier on a real GPU, both CUDA backends: `companion offload` frees the model's device
memory (cuMemGetInfo, through torch.cuda.mem_get_info, shows it back), `companion load` wakes it
from host memory with the checkpoint's bytes (checked on the GPU: wsum64 per tensor), and the
wake time of a few-GB model is printed beside a load from the files."""
import re
import time

import pytest

from checkpoints import tensor_wsums, write_opt_like
from harness import Server

GiB = 1 << 30


@pytest.fixture(scope="module")
def tier_model_root(tmp_path_factory):
    """An OPT-like fp16 checkpoint of about 3 GB."""
    root = tmp_path_factory.mktemp("tier-models")
    write_opt_like(root / "opt-3g", hidden=4096, layers=6, vocab=50272, positions=2050,
                   dtype="float16")
    return root


def device_free(torch):
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(0)[0]


def wait_free_at_least(torch, floor, timeout=10.0):
    """cuMemGetInfo's free bytes once they reach floor (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    free = device_free(torch)
    while free < floor and time.monotonic() < deadline:
        time.sleep(0.05)
        free = device_free(torch)
    return free


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_offload_frees_device_memory_and_load_wakes_it(runtime_dir, tier_model_root, backend):
    torch = pytest.importorskip("torch")
    model = tier_model_root / "opt-3g"
    expected = tensor_wsums(model)
    s = Server(runtime_dir, [tier_model_root], device="0",
               extra=["--backend", backend, "--host-budget", "16GiB"])
    try:
        free_empty = device_free(torch)
        started = time.monotonic()
        loaded, _ = s.cli_json("load", str(model))
        cold_s = time.monotonic() - started
        size = loaded["slab_bytes"]
        assert loaded["state"] == "loaded" and size > 2 * GiB
        free_loaded = device_free(torch)
        assert free_empty - free_loaded >= size * 0.95, (free_empty, free_loaded, size)

        started = time.monotonic()
        out, _ = s.cli_json("offload", str(model))
        offload_s = time.monotonic() - started
        assert out["offloaded"] and out["host_bytes"] == size and out["slab_bytes"] == 0
        # The slab's device memory is back when the reply comes (the server's context, made by
        # its first load, stays).
        free_offloaded = wait_free_at_least(torch, free_loaded + size * 0.95)
        assert free_offloaded - free_loaded >= size * 0.95, (free_loaded, free_offloaded, size)

        started = time.monotonic()
        woken, _ = s.cli_json("load", loaded["id"])
        wake_s = time.monotonic() - started
        assert woken["state"] == "loaded" and woken["slab_bytes"] == size
        # One copy on the device again: the slab, and nothing left over from the wake.
        taken = free_offloaded - device_free(torch)
        assert size * 0.95 <= taken <= size + 256 * (1 << 20), (taken, size)

        out, code = s.cli_json("attach", str(model), "--verify", "--show", "0")
        assert code == 0, out
        assert {t["name"]: t["wsum64"] for t in out["tensors"]} == \
            {n: w for n, (_, _, w) in expected.items()}

        # The server answers the wake before it frees the host copy and logs the wake.
        woke = r"woke .* from the host tier in ([0-9.]+) s \(([0-9.]+) GB/s, ([^)]*)\)"
        deadline = time.monotonic() + 30
        logged = re.search(woke, s.log_text())
        while logged is None and time.monotonic() < deadline:
            time.sleep(0.05)
            logged = re.search(woke, s.log_text())
        assert logged, s.log_text()
        # Both CUDA backends page-lock the host copy and wake it by DMA straight from it.
        assert logged.group(3) == "DMA from page-locked host memory", s.log_text()
        assert "page-locked for its wake" in s.log_text(), s.log_text()
        print(f"\nhost tier, {backend}, {size / 1e9:.2f} GB model:")
        print(f"  {'load from files (page cache)':34} {cold_s:8.3f} s")
        print(f"  {'offload (CLI round trip)':34} {offload_s:8.3f} s")
        print(f"  {'wake (CLI round trip)':34} {wake_s:8.3f} s")
        print(f"  {'wake copy (server log)':34} {float(logged.group(1)):8.3f} s  "
              f"{float(logged.group(2)):6.1f} GB/s ({logged.group(3)})")
    finally:
        assert s.stop() == 0, s.log_text()
