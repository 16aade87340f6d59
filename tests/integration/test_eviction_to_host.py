"""Eviction into the host tier: with `--host-budget`, a model evicted to make room (or idle,
`--idle-evict`) is offloaded rather than dropped, so that its next load or attach wakes it from
host memory, not from its checkpoint; LRU order holds; a model that cannot fit the host tier is
dropped as without one."""
import pathlib

import numpy as np
import pytest
from checkpoints import tensor_crcs
from harness import Server, wait_until
from safetensors.numpy import save_file

MIB = 1 << 20


def write_model(directory, seed, fill=None):
    """One 1 MiB float32 tensor; `fill` overwrites it (same header and size) with a constant."""
    directory.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).standard_normal((256, 1024)).astype(np.float32)
    if fill is not None:
        data = np.full_like(data, fill)
    save_file({"w": data}, str(directory / "model.safetensors"))


@pytest.fixture
def models(tmp_path):
    """a, b and c, written per test: tests overwrite them."""
    root = tmp_path / "models"
    for seed, name in enumerate("abc"):
        write_model(root / name, seed)
    return root


@pytest.fixture
def serve(runtime_dir, models):
    servers = []

    def start(*extra):
        s = Server(runtime_dir, [models], extra=["--memory-reserve", "0", *extra])
        servers.append(s)
        return s

    yield start
    for s in servers:
        code = s.stop()
        assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def listed(server):
    models, code = server.cli_json("ls")
    assert code == 0
    return {pathlib.Path(m["source"]).name: m for m in models}


def attach_crcs(server, model):
    out, code = server.cli_json("attach", str(model), "--verify")
    assert code == 0, out
    return {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in out["tensors"]}


def spoil(models, name):
    """Overwrites a checkpoint with other bytes of the same layout: a wake that read the file
    instead of the host copy would show them."""
    write_model(models / name, 0, fill=7.0)


def test_eviction_for_room_offloads_and_the_next_attach_wakes_it(serve, models):
    server = serve("--memory-budget", "2560KiB", "--host-budget", "8MiB")  # two fit on the device
    original = {n: tensor_crcs(models / n) for n in "abc"}
    server.cli("load", str(models / "a"))
    server.cli("load", str(models / "b"))
    assert attach_crcs(server, models / "a") == original["a"]  # b is the least recently used

    server.cli("load", str(models / "c"))  # needs room: b goes to the host tier
    now = listed(server)
    assert now["a"]["state"] == "loaded" and now["c"]["state"] == "loaded"
    b = now["b"]
    assert b["offloaded"] and b["host_bytes"] >= MIB and b["slab_bytes"] == 0, b
    assert b["message"].startswith("evicted to the host tier: to make room for"), b
    assert "offloaded" in server.cli("ls").stdout
    health, _ = server.cli_json("health")
    assert health["evictions"] == 1 and health["slab_bytes"] <= 2560 * 1024

    # b's file changes: its next attach must come from the host copy, with the bytes loaded.
    spoil(models, "b")
    assert attach_crcs(server, models / "b") == original["b"]
    assert "woke" in server.log_text()
    now = listed(server)
    # Waking b needed room too: a, used before c was loaded, went to the host tier, c stayed.
    assert now["b"]["state"] == "loaded" and now["c"]["state"] == "loaded"
    assert now["a"]["offloaded"], now["a"]
    health, _ = server.cli_json("health")
    assert health["evictions"] == 2


def test_idle_eviction_offloads(serve, models):
    server = serve("--idle-evict", "1", "--host-budget", "8MiB")
    original = tensor_crcs(models / "a")
    server.cli("load", str(models / "a"))
    assert wait_until(lambda: listed(server)["a"]["offloaded"], timeout=30), listed(server)
    a = listed(server)["a"]
    assert a["slab_bytes"] == 0 and "--idle-evict" in a["message"], a
    assert a["message"].startswith("evicted to the host tier"), a
    health, _ = server.cli_json("health")
    assert health["evictions"] == 1
    spoil(models, "a")
    assert attach_crcs(server, models / "a") == original
    assert "woke" in server.log_text()


def test_a_model_that_does_not_fit_the_host_tier_is_dropped(serve, models):
    server = serve("--memory-budget", "1536KiB", "--host-budget", "512KiB")  # a model is 1 MiB
    server.cli("load", str(models / "a"))
    server.cli("load", str(models / "b"))  # room for one: a goes, and not to the host tier
    assert sorted(listed(server)) == ["b"]
    log = server.log_text()
    assert "not kept in the host tier" in log and "--host-budget" in log, log
    health, _ = server.cli_json("health")
    assert health["evictions"] == 1
