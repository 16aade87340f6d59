"""Eviction on a real GPU, both CUDA backends: with a memory budget that holds two of three
models, loading the third evicts the least recently used one into the host tier (its device
memory freed, as nvidia-smi shows), and attaching it again wakes it with its checkpoint's bytes
(wsum64 checked on the GPU); `--idle-evict` moves an idle model to the host tier the same way."""
import pathlib

import pytest

from checkpoints import tensor_wsums, write_opt_like
from harness import Server, wait_until
from gpu_memory import gpu_memory_used_mib

MIB = 1 << 20


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """a, b and c: OPT-like fp16 checkpoints of about 210 MB each."""
    root = tmp_path_factory.mktemp("eviction-models")
    for i, name in enumerate("abc"):
        write_opt_like(root / name, hidden=1024, layers=4, vocab=50272, positions=2050,
                       dtype="float16", seed=i)
    return root


def listed(server):
    models, code = server.cli_json("ls")
    assert code == 0, models
    return {pathlib.Path(m["source"]).name: m for m in models}


def attached_wsums(server, model):
    out, code = server.cli_json("attach", str(model), "--verify", "--show", "0")
    assert code == 0, out
    return {t["name"]: t["wsum64"] for t in out["tensors"]}


def expected_wsums(model):
    return {n: w for n, (_, _, w) in tensor_wsums(model).items()}


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_the_least_recently_used_model_is_evicted_into_the_host_tier(runtime_dir, three_models,
                                                                    gpu, backend):
    a, b, c = (three_models / n for n in "abc")
    s = Server(runtime_dir, [three_models], device="0",
               extra=["--backend", backend, "--memory-budget", "480MiB", "--host-budget", "2GiB"])
    try:
        s.cli_json("load", str(a))
        s.cli_json("load", str(b))
        size = listed(s)["b"]["slab_bytes"]
        assert 2 * size <= 480 * MIB < 3 * size, size
        assert attached_wsums(s, a) == expected_wsums(a)  # a used last: b goes first
        before = gpu_memory_used_mib(gpu["uuid"])
        out, code = s.cli_json("load", str(c))
        assert code == 0 and out["state"] == "loaded", out
        models = listed(s)
        assert models["b"]["offloaded"] and models["b"]["host_bytes"] == size, models["b"]
        assert "evicted to the host tier" in models["b"]["message"], models["b"]
        assert models["a"]["state"] == "loaded" and models["c"]["state"] == "loaded", models
        # c's slab took b's place: one model's worth more at most (the driver's own rounding).
        assert gpu_memory_used_mib(gpu["uuid"]) - before < size / MIB / 2, (before, gpu_memory_used_mib(gpu["uuid"]))
        health, _ = s.cli_json("health")
        assert health["evictions"] == 1, health

        # Attaching b wakes it from host memory, evicting the least recently used of a and c.
        assert attached_wsums(s, b) == expected_wsums(b)
        models = listed(s)
        assert models["b"]["state"] == "loaded", models["b"]
        assert models["a"]["offloaded"] and models["c"]["state"] == "loaded", models
    finally:
        assert s.stop() == 0, s.log_text()


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_an_idle_model_is_evicted_into_the_host_tier(runtime_dir, three_models, gpu, backend):
    a = three_models / "a"
    s = Server(runtime_dir, [three_models], device="0",
               extra=["--backend", backend, "--idle-evict", "1", "--host-budget", "2GiB"])
    try:
        s.cli_json("load", str(a))
        loaded = gpu_memory_used_mib(gpu["uuid"])
        size = listed(s)["a"]["slab_bytes"]
        assert wait_until(lambda: listed(s)["a"].get("offloaded"), timeout=30), listed(s)
        freed = wait_until(lambda: loaded - gpu_memory_used_mib(gpu["uuid"]) >= size / MIB * 0.9, timeout=10)
        assert freed, (loaded, gpu_memory_used_mib(gpu["uuid"]), size)
        assert attached_wsums(s, a) == expected_wsums(a)
    finally:
        assert s.stop() == 0, s.log_text()
