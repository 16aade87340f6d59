"""Status streams, unload, leases, and servers that die."""
import json
import os
import signal
import subprocess
import time

from checkpoints import write_opt_like
from harness import COMPANION, Server, wait_until


def test_status_stream_sends_current_state_then_changes(server, model_root):
    model = str(model_root / "opt-small")
    follow = subprocess.Popen([str(COMPANION), "status", model, "--follow", "--json",
                               "--namespace", server.namespace, "--runtime-dir",
                               str(server.runtime_dir)], stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(follow.stdout.readline())
        assert first["state"] == "ready"
        server.cli("load", model)
        states = []
        while not states or states[-1]["state"] != "loaded":
            states.append(json.loads(follow.stdout.readline()))
        assert states[0]["state"] == "loading"
        done = [s["bytes_done"] for s in states]
        assert done == sorted(done) and states[-1]["bytes_done"] == states[-1]["bytes_total"] > 0
        server.cli("unload", model)
        assert json.loads(follow.stdout.readline())["state"] == "unloaded"
    finally:
        follow.kill()
        follow.wait()


def test_unload_respects_leases_unless_forced(server, model_root):
    model = str(model_root / "opt-small")
    holder = subprocess.Popen([str(COMPANION), "attach", model, "--hold", "30", "--json",
                               "--namespace", server.namespace, "--runtime-dir",
                               str(server.runtime_dir)], stdout=subprocess.PIPE, text=True)
    try:
        json.loads(holder.stdout.readline())
        out, code = server.cli_json("unload", model, check=False)
        assert code == 1 and out["error"]["code"] == "MODEL_IN_USE"
        out, code = server.cli_json("unload", model, "--force")
        assert out["state"] == "unloaded"
        assert server.cli_json("ls")[0] == []
        # The holder's mapping stays valid; a new request loads a fresh copy.
        assert holder.poll() is None
        server.cli("load", model)
    finally:
        holder.kill()
        holder.wait()


def test_killed_server_leaves_a_stale_record_that_is_cleaned(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    files = sorted(p.name for p in runtime_dir.iterdir())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".sock") for f in files)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    assert sorted(p.name for p in runtime_dir.iterdir()) == files  # nothing cleaned it yet
    r = subprocess.run([str(COMPANION), "health", "--json", "--runtime-dir", str(runtime_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "UNAVAILABLE"
    assert list(runtime_dir.iterdir()) == []  # the client removed the dead server's record
    # A new server registers and is found.
    s2 = Server(runtime_dir, [model_root])
    try:
        health, code = s2.cli_json("health")
        assert code == 0 and health["server"]["instance_id"] == s2.instance
    finally:
        assert s2.stop() == 0


def test_stale_record_is_ignored_by_a_new_server(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    s2 = Server(runtime_dir, [model_root])
    try:
        health, _ = s2.cli_json("health")
        assert health["server"]["instance_id"] == s2.instance
        names = {p.name.split(".")[0] for p in runtime_dir.iterdir()}
        assert names == {s2.instance}
    finally:
        assert s2.stop() == 0


def test_clean_shutdown_removes_the_record(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    assert s.stop() == 0
    assert list(runtime_dir.iterdir()) == []


def test_several_models_and_namespaces(runtime_dir, model_root, tmp_path):
    a = Server(runtime_dir, [model_root], namespace="team-a")
    b = Server(runtime_dir, [model_root], namespace="team-b")
    try:
        other = write_opt_like(model_root / "opt-other", hidden=64, layers=2, vocab=256,
                               positions=16, seed=7)
        a.cli("load", str(model_root / "opt-small"))
        a.cli("load", str(other))
        assert len(a.cli_json("ls")[0]) == 2
        assert b.cli_json("ls")[0] == []
        assert a.cli_json("health")[0]["server"]["instance_id"] == a.instance
        assert b.cli_json("health")[0]["server"]["instance_id"] == b.instance
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
