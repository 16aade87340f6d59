"""The host tier through the CLI: `companion offload` moves a model's bytes to the server's host
memory and frees its slab, `ls` shows it offloaded, `load` or an attach wakes it with the same
bytes, `--host-budget` drops the least recently offloaded copy, a leased model is offloaded only
with --force, and a published model (whose bytes no file holds) survives an offload and a wake
with its digests unchanged."""
import os
import pathlib
import subprocess
import sys
import zlib

import numpy as np
from checkpoints import tensor_crcs, write_opt_like
from harness import PYTHON_LIBRARY, REPO, Server, wait_until

# Seeds the published model's tensors (the writer and the checks make the same ones).
PUBLISHER = """
import sys
import numpy as np
import companion
client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
rng = np.random.default_rng(7)
tensors = {"embed": rng.standard_normal((256, 64)).astype(np.float32),
           "qkv": rng.integers(-128, 127, (192, 64), dtype=np.int8)}
model = client.publish(sys.argv[3], tensors, fingerprint={"engine": "test"})
print("committed", model.status.generation, flush=True)
"""


def published_crcs():
    rng = np.random.default_rng(7)
    tensors = {"embed": rng.standard_normal((256, 64)).astype(np.float32),
               "qkv": rng.integers(-128, 127, (192, 64), dtype=np.int8)}
    return {n: zlib.crc32(a.tobytes()) for n, a in tensors.items()}


def attach_crcs(server, model, *extra):
    out, code = server.cli_json("attach", str(model), "--verify", *extra)
    assert code == 0, out
    return {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in out["tensors"]}


def memfds(pid):
    """The names of the memfds the server holds: "companion:<id>:<segment>" for slabs,
    "companion:host:<id>:<segment>" for host copies."""
    names = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:companion:"):
            names.add(target[len("/memfd:"):].split(" ")[0])
    return names


def entry(server, model_id):
    [found] = [m for m in server.cli_json("ls")[0] if m["id"] == model_id]
    return found


def tier_server(runtime_dir, roots, budget):
    return Server(runtime_dir, roots, extra=["--host-budget", budget])


def test_offload_frees_the_slab_and_load_wakes_the_same_bytes(runtime_dir, model_root):
    model = model_root / "opt-small"
    server = tier_server(runtime_dir, [model_root], "256MiB")
    try:
        loaded, _ = server.cli_json("load", str(model))
        model_id, size = loaded["id"], loaded["slab_bytes"]
        assert loaded["state"] == "loaded" and size > 0
        assert attach_crcs(server, model) == tensor_crcs(model)
        assert f"companion:{model_id}:0" in memfds(server.pid)

        out, _ = server.cli_json("offload", str(model))
        assert out["offloaded"] and out["state"] == "unloaded"
        assert out["host_bytes"] == size and out["slab_bytes"] == 0
        listed = entry(server, model_id)
        assert listed["offloaded"] and listed["host_bytes"] == size and listed["slab_bytes"] == 0
        assert "offloaded" in server.cli("ls").stdout
        # The slab's memfd is closed; the host copy holds the bytes.
        held = memfds(server.pid)
        assert f"companion:{model_id}:0" not in held
        assert f"companion:host:{model_id}:0" in held

        # `load` by id wakes it from the host copy: the same bytes as the checkpoint.
        woken, _ = server.cli_json("load", model_id)
        assert woken["state"] == "loaded" and woken["host_bytes"] == 0
        assert woken["slab_bytes"] == size
        assert attach_crcs(server, model) == tensor_crcs(model)
        held = memfds(server.pid)
        assert f"companion:{model_id}:0" in held and f"companion:host:{model_id}:0" not in held
        assert "from the host tier" in server.log_text()

        # Offloaded again, an attach wakes it as well.
        server.cli("offload", model_id)
        assert entry(server, model_id)["offloaded"]
        assert attach_crcs(server, model) == tensor_crcs(model)
        assert entry(server, model_id)["state"] == "loaded"
    finally:
        assert server.stop() == 0, server.log_text()


def test_without_a_host_budget_offload_is_refused(server, model_root):
    model = model_root / "opt-small"
    server.cli("load", str(model))
    out, code = server.cli_json("offload", str(model), check=False)
    assert code == 1 and out["error"]["code"] == "INVALID_ARGUMENT"
    assert "--host-budget" in out["error"]["message"]
    assert server.cli_json("ls")[0][0]["state"] == "loaded"


def test_offload_of_an_attached_model_needs_force(runtime_dir, model_root):
    model = model_root / "opt-small"
    server = tier_server(runtime_dir, [model_root], "256MiB")
    try:
        holder = subprocess.Popen(server.command("attach", str(model), "--hold", "30"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: [m for m in server.cli_json("ls")[0] if m["leases"] == 1],
                              timeout=30)
            out, code = server.cli_json("offload", str(model), check=False)
            assert code == 1 and out["error"]["code"] == "MODEL_IN_USE"
            assert server.cli_json("ls")[0][0]["state"] == "loaded"
            out, _ = server.cli_json("offload", str(model), "--force")
            assert out["offloaded"] and out["leases"] == 0
        finally:
            holder.kill()
            holder.wait()
        assert attach_crcs(server, model) == tensor_crcs(model)
    finally:
        assert server.stop() == 0, server.log_text()


def test_the_host_budget_drops_the_least_recently_offloaded_copy(runtime_dir, tmp_path):
    root = tmp_path / "models"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_opt_like(root / name, hidden=128, layers=2, vocab=2048, dtype="float32", seed=seed)
    # One model's size, from a server without a host tier.
    sizing = Server(runtime_dir, [root])
    size = sizing.cli_json("load", str(root / "a"))[0]["slab_bytes"]
    assert sizing.stop() == 0
    server = tier_server(runtime_dir, [root], str(size * 2 + size // 2))  # two fit, not three
    try:
        ids = {n: server.cli_json("load", str(root / n))[0]["id"] for n in ("a", "b", "c")}
        for name in ("a", "b", "c"):
            server.cli("offload", str(root / name))
        listed = {m["id"]: m for m in server.cli_json("ls")[0]}
        assert ids["a"] not in listed  # the least recently offloaded went
        assert listed[ids["b"]]["offloaded"] and listed[ids["c"]]["offloaded"]
        assert "dropped" in server.log_text()
        # b wakes from its copy; a is read from its files again.
        assert attach_crcs(server, root / "b") == tensor_crcs(root / "b")
        assert attach_crcs(server, root / "a") == tensor_crcs(root / "a")
    finally:
        assert server.stop() == 0, server.log_text()


def test_a_published_model_is_offloaded_and_woken_with_its_digests(runtime_dir, model_root):
    server = tier_server(runtime_dir, [model_root], "256MiB")
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"),
                   COMPANION_LIBRARY=str(PYTHON_LIBRARY))
        writer = subprocess.run([sys.executable, "-c", PUBLISHER, server.namespace,
                                 str(server.runtime_dir), "engine/tier"], capture_output=True,
                                text=True, env=env, timeout=60)
        assert writer.stdout.split() == ["committed", "1"], writer.stderr
        [published] = [m for m in server.cli_json("ls")[0] if m["published"]]
        digests = published["generations"][0]["digests"]

        out, _ = server.cli_json("offload", "engine/tier", "--published")
        assert out["offloaded"] and out["published"] and out["host_bytes"] > 0
        assert f"companion:host:{published['id']}:0" in memfds(server.pid)

        # An attach wakes it; the bytes and the digests are those committed.
        out, code = server.cli_json("attach", "engine/tier", "--published", "--verify",
                                    "--fingerprint", "engine=test")
        assert code == 0, out
        assert {t["name"]: t["crc32"] for t in out["tensors"]} == published_crcs()
        [woken] = [m for m in server.cli_json("ls")[0] if m["published"]]
        assert woken["state"] == "loaded" and woken["generation"] == 1
        assert woken["generations"][0]["digests"] == digests

        # And `load --published` wakes it too.
        server.cli("offload", "engine/tier", "--published")
        out, _ = server.cli_json("load", "engine/tier", "--published")
        assert out["state"] == "loaded" and out["generations"][0]["digests"] == digests
    finally:
        assert server.stop() == 0, server.log_text()
