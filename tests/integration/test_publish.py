"""Published models and generations as a user meets them through the CLI: a writer process
publishes with the Python package, `companion ls`/`attach --published`/`unload` see it, a writer
killed mid-publish leaves nothing behind, and `companion reload` makes generations of a loaded
model whose files changed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib

import numpy as np
from checkpoints import write_opt_like
from harness import COMPANION, PYTHON_LIBRARY, REPO, wait_until

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import companion
    client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
    key, mode = sys.argv[3], sys.argv[4]
    rng = np.random.default_rng(5)
    tensors = {"embed": rng.standard_normal((64, 32)).astype(np.float32),
               "qkv": rng.integers(-128, 127, (96, 32), dtype=np.int8),
               "scale": rng.standard_normal((96,)).astype(np.float32)}
    if mode == "commit":
        model = client.publish(key, tensors, fingerprint={"engine": "test", "dtype": "f32"})
        print("committed", model.status.generation, flush=True)
        time.sleep(float(sys.argv[5]))
    else:  # declare, write half, then wait to be killed
        pub = client.begin_publish(key, {n: t for n, t in tensors.items()})
        print("declared", flush=True)
        time.sleep(60)
""")


def run_writer(server, key, mode, hold=0.0):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), COMPANION_LIBRARY=str(PYTHON_LIBRARY))
    return subprocess.Popen([sys.executable, "-c", WRITER, server.namespace,
                             str(server.runtime_dir), key, mode, str(hold)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_published_model_is_listed_attached_verified_and_unloaded(server):
    writer = run_writer(server, "engine/opt-fused", "commit", hold=0.5)
    assert writer.stdout.readline().split() == ["committed", "1"]
    writer.wait(timeout=30)
    models, _ = server.cli_json("ls")
    [entry] = [m for m in models if m["published"]]
    assert entry["key"] == "engine/opt-fused" and entry["state"] == "loaded"
    assert entry["generation"] == 1 and entry["fingerprint"] == {"engine": "test", "dtype": "f32"}
    assert entry["leases"] == 0  # the writer's lease went with it
    assert entry["generations"][0]["digests"][0].startswith("wsum64:")
    text = server.cli("ls").stdout
    assert "published: engine/opt-fused" in text and "GEN" in text

    out, _ = server.cli_json("attach", "engine/opt-fused", "--published", "--verify",
                             "--fingerprint", "engine=test", "--fingerprint", "dtype=f32")
    rng = np.random.default_rng(5)
    expected = {"embed": rng.standard_normal((64, 32)).astype(np.float32),
                "qkv": rng.integers(-128, 127, (96, 32), dtype=np.int8),
                "scale": rng.standard_normal((96,)).astype(np.float32)}
    crcs = {t["name"]: t["crc32"] for t in out["tensors"]}
    assert crcs == {n: zlib.crc32(a.tobytes()) for n, a in expected.items()}
    assert out["model"]["published"] and out["model"]["generation"] == 1

    wrong, code = server.cli_json("attach", "engine/opt-fused", "--published",
                                  "--fingerprint", "engine=test", "--fingerprint", "dtype=bf16",
                                  check=False)
    assert code == 1 and wrong["error"]["code"] == "FINGERPRINT_MISMATCH"
    assert "dtype" in wrong["error"]["message"]

    out, _ = server.cli_json("unload", "engine/opt-fused")
    assert out["state"] == "unloaded"
    assert [m for m in server.cli_json("ls")[0] if m["published"]] == []


def test_a_writer_killed_mid_publish_frees_its_slab(server):
    before = server.cli_json("health")[0]["slab_bytes"]
    writer = run_writer(server, "engine/killed", "declare")
    try:
        assert writer.stdout.readline().strip() == "declared"
        assert server.cli_json("health")[0]["slab_bytes"] > before
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        assert wait_until(lambda: server.cli_json("health")[0]["slab_bytes"] == before)
        assert [m for m in server.cli_json("ls")[0] if m["published"]] == []
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def test_reload_makes_a_generation_only_when_the_files_changed(server, model_root):
    model = model_root / "opt-reloaded"
    shutil.rmtree(model, ignore_errors=True)
    write_opt_like(model, hidden=64, layers=2, vocab=256, dtype="float32", seed=1)
    server.cli("load", str(model))
    out, _ = server.cli_json("reload", str(model))
    assert out["generation"] == 1 and "unchanged" in out["message"]
    holder = subprocess.Popen([str(COMPANION), "attach", str(model), "--hold", "30",
                               "--json", "--verify", "--namespace", server.namespace,
                               "--runtime-dir", str(server.runtime_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        old = json.loads(holder.stdout.readline())
        write_opt_like(model, hidden=64, layers=2, vocab=256, dtype="float32", seed=2)
        out, _ = server.cli_json("reload", str(model))
        assert out["generation"] == 2
        [entry] = server.cli_json("ls")[0]
        assert [g["generation"] for g in entry["generations"]] == [1, 2]
        assert entry["generations"][0]["leases"] == 1  # the holder keeps generation 1
        fresh, _ = server.cli_json("attach", str(model), "--verify")
        assert fresh["model"]["generation"] == 2
        assert fresh["tensors"] != old["tensors"]  # new bytes for new readers
        assert "(+1 held)" in server.cli("ls").stdout
    finally:
        holder.kill()
        holder.wait()
    assert wait_until(lambda: len(server.cli_json("ls")[0][0]["generations"]) == 1)
