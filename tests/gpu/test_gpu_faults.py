"""Fault injection on a real GPU, both CUDA backends: the server killed with SIGKILL in the middle
of a load gives every byte of GPU memory back (nvidia-smi's count returns to where it was before
the server started) while a client of another model keeps reading its weights on the GPU; a load
that runs out of memory at allocation or mid-load fails with OUT_OF_MEMORY, frees what it had
taken, and the server goes on serving. Faults come from COMPANION_TEST_FAULT
(src/common/fault_point.hpp)."""
import functools
import json
import os
import signal
import subprocess

import pytest

from checkpoints import tensor_wsums, write_opt_like
from harness import Server, SessionClient, wait_until
from gpu_memory import gpu_memory_used_mib

BACKENDS = ["cuda-vmm", "cuda-ipc"]
VICTIM = "opt-1g"  # gpu_model_root's model, about 1.1 GB
# GPU memory may differ this much from the baseline (driver bookkeeping).
TOLERANCE_MIB = 64


@pytest.fixture(scope="module")
def bystander_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-bystander")
    write_opt_like(root / "opt-bystander", hidden=256, layers=2, vocab=4096, positions=64,
                   dtype="float16", seed=11)
    return root


@functools.lru_cache(maxsize=None)
def wsums(model):
    """wsum64 of every tensor of the model's file (computed once: the victim is 1.1 GB)."""
    return {name: s for name, (_, _, s) in tensor_wsums(model).items()}


def check_sums(session, model, expected):
    got = session("verify")
    assert got["ok"], got
    sums = [m["sums"] for m in got["models"] if m["source"] == str(model)]
    assert sums and all(s == expected for s in sums), "weights on the GPU changed"


def start(runtime_dir, roots, backend, fault):
    return Server(runtime_dir, roots, device="0", extra=["--backend", backend],
                  env={**os.environ, "COMPANION_TEST_FAULT": f"{fault},path={VICTIM}"})


@pytest.mark.parametrize("stage", ["copy", "seal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_server_killed_mid_load_gives_the_gpu_memory_back(backend, stage, runtime_dir,
                                                          gpu_model_root, bystander_root, gpu):
    victim, bystander = gpu_model_root / VICTIM, bystander_root / "opt-bystander"
    expected = wsums(bystander)
    victim_mib = (victim / "model.safetensors").stat().st_size / 2**20
    used_before = gpu_memory_used_mib(gpu["uuid"])
    # copy: mid-load (the 20th of ~300 items), the slab allocated and partly written.
    point = "copy@20" if stage == "copy" else stage
    server = start(runtime_dir, [gpu_model_root, bystander_root], backend, f"pause-at={point}")
    session = SessionClient("--socket", server.socket, "--device", "0")
    pending = None
    try:
        got = session(f"attach {bystander}")
        assert got["ok"], got
        check_sums(session, bystander, expected)
        used_attached = gpu_memory_used_mib(gpu["uuid"])
        pending = subprocess.Popen(server.command("load", str(victim), "--json"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: f"paused at {stage} " in server.log_text(), timeout=120), \
            server.log_text()
        # The victim's slab is on the GPU (allocated before the copies): the count sees it.
        used_paused = gpu_memory_used_mib(gpu["uuid"])
        assert used_paused - used_attached >= 0.9 * victim_mib, (used_attached, used_paused)

        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        out, _ = pending.communicate(timeout=60)
        assert pending.returncode != 0
        assert json.loads(out)["error"]["code"] in ("CONNECTION_CLOSED", "UNAVAILABLE"), out
        check_sums(session, bystander, expected)  # the other model's client is unaffected
    finally:
        if pending and pending.poll() is None:
            pending.kill()
            pending.wait()
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.log.close()
        assert session.close() == 0
    # Server and client gone: the GPU has back everything they took.
    assert wait_until(lambda: gpu_memory_used_mib(gpu["uuid"]) <= used_before + TOLERANCE_MIB,
                      timeout=60, interval=0.5), (used_before, gpu_memory_used_mib(gpu["uuid"]))
    print(f"{backend}: killed at {stage} with {used_paused - used_attached} MiB of the victim "
          f"on the GPU; used {used_before} MiB before, "
          f"{gpu_memory_used_mib(gpu['uuid'])} MiB after")

    # A new server loads the model.
    restarted = Server(runtime_dir, [gpu_model_root], device="0", extra=["--backend", backend])
    try:
        out, code = restarted.cli_json("load", str(victim), timeout=300)
        assert code == 0 and out["state"] == "loaded", out
    finally:
        assert restarted.stop() == 0, restarted.log_text()


@pytest.mark.parametrize("point", ["allocate", "copy@20"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_memory_frees_the_load_and_the_server_serves_on(backend, point, runtime_dir,
                                                                gpu_model_root, bystander_root,
                                                                gpu):
    victim, bystander = gpu_model_root / VICTIM, bystander_root / "opt-bystander"
    expected = wsums(bystander)
    server = start(runtime_dir, [gpu_model_root, bystander_root], backend,
                   f"fail-at={point}:OUT_OF_MEMORY")
    session = SessionClient("--socket", server.socket, "--device", "0")
    try:
        got = session(f"attach {bystander}")
        assert got["ok"], got
        used_before = gpu_memory_used_mib(gpu["uuid"])
        out, code = server.cli_json("load", str(victim), check=False, timeout=300)
        assert code != 0 and out["error"]["code"] == "OUT_OF_MEMORY", out
        assert out["error"]["message"].startswith(point.split("@")[0] + " "), out
        # The slab (allocated before the copies, for copy@20) is freed.
        assert wait_until(lambda: gpu_memory_used_mib(gpu["uuid"]) <= used_before + TOLERANCE_MIB,
                          timeout=30, interval=0.5), \
            (used_before, gpu_memory_used_mib(gpu["uuid"]))
        health = server.cli_json("health")[0]
        assert health["leases"] == 1, health
        check_sums(session, bystander, expected)
        # The fault fires once: asked again, the model loads and reads right on the GPU.
        got = session(f"attach {victim}")
        assert got["ok"], got
        check_sums(session, victim, wsums(victim))
    finally:
        assert session.close() == 0
        assert server.stop() == 0, server.log_text()
