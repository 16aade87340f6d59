"""Clients on the same GPU attach one copy of a model zero-copy (cuda-vmm and legacy cuda-ipc)."""
import json
import os
import signal
import subprocess

import pytest

from checkpoints import tensor_wsums
from harness import Server
from gpu_memory import gpu_memory_used_mib


def checksums(report):
    return {t["name"]: (t["dtype"], t["shape"], t["wsum64"]) for t in report["tensors"]}


def test_clients_attach_one_copy_and_see_the_checkpoint(gpu_server, gpu_model_root, gpu):
    s = gpu_server
    model = gpu_model_root / "opt-1g"
    model_mib = (model / "model.safetensors").stat().st_size / 2**20
    expected = tensor_wsums(model)
    s.cli("load", str(model), timeout=300)
    used_loaded = gpu_memory_used_mib(gpu["uuid"])
    clients = 4
    procs = [subprocess.Popen(s.command("attach", str(model), "--json", "--verify", "--hold", "8"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    reports = [json.loads(p.stdout.readline()) for p in procs]
    used_attached = gpu_memory_used_mib(gpu["uuid"])
    for p in procs:
        p.kill()
        p.wait()
    for r in reports:
        assert r["model"]["backend"] == s.backend
        assert all(t["on_device"] for t in r["tensors"])
        assert checksums(r) == expected
    growth = used_attached - used_loaded
    print(f"{s.backend}: model {model_mib:.0f} MiB; GPU memory used {used_loaded} MiB loaded, "
          f"{used_attached} MiB with {clients} clients attached (+{growth} MiB, their CUDA "
          f"contexts)")
    # A copy per client would add clients × model; contexts cost a few hundred MiB each.
    assert growth < clients * 0.5 * model_mib, (growth, model_mib)


def test_mapping_is_read_only(gpu_server, gpu_model_root):
    s = gpu_server
    r = s.cli("attach", str(gpu_model_root / "opt-1g"), "--json", "--try-write", timeout=300)
    report = json.loads(r.stdout)
    if s.backend == "cuda-vmm":
        assert report["write_refused"] is True
    else:
        # cuIpcOpenMemHandle has no read-only mode: legacy mappings are writable by design.
        assert report["write_refused"] is False


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_killed_server_leaves_clients_with_valid_weights(runtime_dir, gpu_model_root, backend):
    model = gpu_model_root / "opt-1g"
    s = Server(runtime_dir, [gpu_model_root], device="0", extra=["--backend", backend])
    client = subprocess.Popen(s.command("attach", str(model), "--json", "--verify", "--hold", "4",
                                        "--reverify"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(client.stdout.readline())
    os.kill(s.pid, signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    second = json.loads(client.stdout.readline())
    client.wait(timeout=60)
    assert second == {"reverified": True}, client.stderr.read()
    assert checksums(first) == tensor_wsums(model)
    # A restarted server is found by the next client; the dead one's record is ignored.
    s2 = Server(runtime_dir, [gpu_model_root], device="0", extra=["--backend", backend])
    try:
        health, code = s2.cli_json("health")
        assert code == 0 and health["server"]["instance_id"] == s2.instance != s.instance
    finally:
        assert s2.stop() == 0


def test_cuda_visible_devices_spelling_does_not_matter(runtime_dir, gpu_model_root, gpu):
    model = gpu_model_root / "opt-1g"
    expected = tensor_wsums(model)
    server_env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu["uuid"])
    s = Server(runtime_dir, [gpu_model_root], device="0", env=server_env)
    try:
        for env_value, device in [(str(gpu["ordinal"]), gpu["uuid"]),
                                  (gpu["uuid"], "0"),
                                  (None, gpu["pci_bus_id"])]:
            env = dict(os.environ)
            env.pop("CUDA_VISIBLE_DEVICES", None)
            if env_value is not None:
                env["CUDA_VISIBLE_DEVICES"] = env_value
            cmd = s.command("attach", str(model), "--json", "--verify")
            cmd[cmd.index("--device") + 1] = device
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, (env_value, device, r.stderr)
            assert checksums(json.loads(r.stdout)) == expected
    finally:
        assert s.stop() == 0
