"""Restart without reload: a server's committed models stay in memory with its keeper when it
stops (SIGTERM) or dies (kill -9), and the next server on the device adopts them, checked by
digest, without reading a file. Real processes: servers, the keeper they start, CLI clients and
a Python writer."""
import json
import os
import signal
import subprocess

import pytest
from checkpoints import tensor_crcs, write_opt_like
from harness import Server, alive, wait_until
from test_publish import run_writer


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    write_opt_like(root / "opt-a", hidden=64, layers=2, vocab=512, dtype="float32", seed=1)
    write_opt_like(root / "opt-b", hidden=64, layers=2, vocab=512, dtype="float32", seed=2)
    return root


def start(runtime_dir, models, *extra, env=None):
    return Server(runtime_dir, [models], keep=True, extra=list(extra), env=env)


def memfds(pid):
    """The memfds a process holds (slab segments and tensor tables)."""
    fd_dir = f"/proc/{pid}/fd"
    out = []
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:"):
            out.append(target)
    return out


def keepers_of(runtime_dir):
    """Keeper processes whose socket is in runtime_dir."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"keeper" in args and any(a.startswith(str(runtime_dir).encode()) for a in args):
            if alive(int(pid)):
                out.append(int(pid))
    return out


def keeper_log(runtime_dir):
    [log] = list(runtime_dir.glob("keeper-*.log"))
    return log.read_text()


def hide_checkpoint(model_dir):
    """The model's file moves away: a server that tried to load it would fail (its directory
    stays, so that the spec still resolves to the same key)."""
    (model_dir / "model.safetensors").rename(model_dir.parent / (model_dir.name + ".moved"))


def attach(server, model, *extra):
    out, _ = server.cli_json("attach", str(model), "--verify", "--show", "100000", *extra)
    return out


def crcs(out):
    return {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in out["tensors"]}


def wait_kept(keeper, count):
    """The keeper holds `count` generations (each one segment and a table here)."""
    assert wait_until(lambda: len(memfds(keeper)) == 2 * count), memfds(keeper)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restarted_server_serves_kept_models_without_reading_them(runtime_dir, models, how):
    expected = tensor_crcs(models / "opt-a")
    first = start(runtime_dir, models)
    first.cli("load", str(models / "opt-a"))
    writer = run_writer(first, "engine/fused", "commit")
    assert writer.stdout.readline().split() == ["committed", "1"]
    writer.wait(timeout=30)
    published = [m for m in first.cli_json("ls")[0] if m["published"]][0]
    keeper = first.keeper_pid()
    assert keeper and alive(keeper)
    wait_kept(keeper, 2)

    getattr(first.proc, "terminate" if how == "SIGTERM" else "kill")()
    first.proc.wait(timeout=20)
    assert alive(keeper), "the keeper went with its server"
    hide_checkpoint(models / "opt-a")

    second = start(runtime_dir, models)
    try:
        assert second.keeper_pid() == keeper
        log = second.log_text()
        assert "adopted 2 models" in log and "0 dropped" in log, log
        assert "loading " not in log  # no load started: nothing read from the files
        listed = {m["key"]: m for m in second.cli_json("ls")[0]}
        loaded = [m for m in listed.values() if not m["published"]][0]
        assert loaded["state"] == "loaded" and loaded["generation"] == 1
        assert "adopted after a restart" in loaded["message"]
        again = listed["engine/fused"]
        assert again["generation"] == published["generation"]
        assert again["fingerprint"] == published["fingerprint"] == {"engine": "test",
                                                                     "dtype": "f32"}
        assert again["generations"][0]["digests"] == published["generations"][0]["digests"]

        # A new client attaches the same memory, and its bytes are the checkpoint's.
        out = attach(second, models / "opt-a")
        assert crcs(out) == expected
        pub, _ = second.cli_json("attach", "engine/fused", "--published", "--verify",
                                 "--fingerprint", "engine=test", "--fingerprint", "dtype=f32")
        assert pub["model"]["generation"] == 1
        # The memory is the keeper's, not a copy: the keeper still holds the same memfds.
        assert len(memfds(keeper)) == 4
    finally:
        assert second.stop() == 0
    # Stopped again: still kept, for a third server.
    assert alive(keeper)
    third = start(runtime_dir, models)
    try:
        assert "adopted 2 models" in third.log_text()
    finally:
        third.cli("unload", str(models / "opt-a"))
        third.cli("unload", "engine/fused")
        assert third.stop() == 0
    # Nothing held and no server: the keeper leaves at once.
    assert wait_until(lambda: not alive(keeper)), keeper_log(runtime_dir)


def test_a_client_attached_before_kill_keeps_reading_its_tensors(runtime_dir, models):
    first = start(runtime_dir, models)
    first.cli("load", str(models / "opt-a"))
    client = subprocess.Popen(first.command("attach", str(models / "opt-a"), "--json", "--verify",
                                            "--reverify", "--hold", "2"),
                              stdout=subprocess.PIPE, text=True)
    before = json.loads(client.stdout.readline())
    first.proc.kill()
    first.proc.wait(timeout=20)
    second = start(runtime_dir, models)
    try:
        assert json.loads(client.stdout.readline()) == {"reverified": True}
        assert client.wait(timeout=30) == 0
        # And what the new server serves is what the old client read.
        assert crcs(attach(second, models / "opt-a")) == crcs(before)
        second.cli("unload", str(models / "opt-a"))
    finally:
        assert second.stop() == 0


def test_the_keepers_descriptors_follow_loads_and_unloads(runtime_dir, models):
    server = start(runtime_dir, models)
    try:
        keeper = server.keeper_pid()
        baseline = len(os.listdir(f"/proc/{keeper}/fd"))
        assert memfds(keeper) == []
        server.cli("load", str(models / "opt-a"))
        server.cli("load", str(models / "opt-b"))
        wait_kept(keeper, 2)
        server.cli("unload", str(models / "opt-a"))
        wait_kept(keeper, 1)
        server.cli("unload", str(models / "opt-b"))
        wait_kept(keeper, 0)
        assert len(os.listdir(f"/proc/{keeper}/fd")) == baseline
    finally:
        assert server.stop() == 0


def test_an_offloaded_model_leaves_the_keeper_and_a_woken_one_comes_back(runtime_dir, models):
    """The host tier and the keeper together: an offload frees the device memory in the keeper
    too (it lets go of the slab's handles), a wake hands the new slab to it, and a restart then
    adopts the woken model."""
    expected = tensor_crcs(models / "opt-a")
    server = start(runtime_dir, models, "--host-budget", "64MiB")
    keeper = server.keeper_pid()
    server.cli("load", str(models / "opt-a"))
    wait_kept(keeper, 1)
    server.cli("offload", str(models / "opt-a"))
    wait_kept(keeper, 0)
    assert crcs(attach(server, models / "opt-a")) == expected  # woken by the attach
    wait_kept(keeper, 1)
    server.proc.kill()
    server.proc.wait(timeout=20)
    hide_checkpoint(models / "opt-a")
    second = start(runtime_dir, models)
    try:
        assert "adopted 1 models" in second.log_text(), second.log_text()
        assert crcs(attach(second, models / "opt-a")) == expected
        second.cli("unload", str(models / "opt-a"))
    finally:
        assert second.stop() == 0


def test_a_keeper_whose_server_never_comes_back_frees_everything(runtime_dir, models):
    server = start(runtime_dir, models, "--keep-for", "1")
    server.cli("load", str(models / "opt-a"))
    keeper = server.keeper_pid()
    wait_kept(keeper, 1)
    server.proc.kill()
    server.proc.wait(timeout=20)
    assert wait_until(lambda: not alive(keeper), timeout=30), keeper_log(runtime_dir)
    log = keeper_log(runtime_dir)
    assert "no server came back within 1 s" in log
    assert "freeing 1 generations (2 descriptors)" in log


def test_no_keep_frees_memory_on_exit_and_releases_an_earlier_keeper(runtime_dir, models):
    first = start(runtime_dir, models)
    first.cli("load", str(models / "opt-a"))
    keeper = first.keeper_pid()
    wait_kept(keeper, 1)
    assert first.stop() == 0
    assert alive(keeper)
    # A server without a keeper: the earlier keeper frees what it held, nothing is adopted.
    second = Server(runtime_dir, [models])
    try:
        assert wait_until(lambda: not alive(keeper)), keeper_log(runtime_dir)
        assert "adopted" not in second.log_text() and second.keeper_pid() is None
        assert second.cli_json("ls")[0] == []
        second.cli("load", str(models / "opt-a"))
    finally:
        assert second.stop() == 0
    # ... and it started none: nothing outlives it.
    assert keepers_of(runtime_dir) == []
    assert not list(runtime_dir.glob("keeper-*.sock"))


def test_a_kept_model_whose_digest_does_not_match_is_dropped(runtime_dir, models):
    first = start(runtime_dir, models)
    first.cli("load", str(models / "opt-a"))
    first.cli("load", str(models / "opt-b"))
    keeper = first.keeper_pid()
    wait_kept(keeper, 2)
    first.proc.kill()
    first.proc.wait(timeout=20)
    env = dict(os.environ, COMPANION_TEST_CORRUPT_KEPT_DIGEST="opt-b")
    second = start(runtime_dir, models, env=env)
    try:
        log = second.log_text()
        assert "digest mismatch" in log and "opt-b" in log.split("digest mismatch")[1], log
        assert "adopted 1 models" in log and "1 dropped" in log
        listed = second.cli_json("ls")[0]
        assert [m["source"] for m in listed] == [str(models / "opt-a")]
        # The keeper let go of the dropped one.
        wait_kept(keeper, 1)
        # opt-b is loaded from its files again when asked for, not served from the keeper.
        second.cli("load", str(models / "opt-b"))
        assert "loading " + str(models / "opt-b") in second.log_text()
    finally:
        assert second.stop() == 0
    os.kill(keeper, signal.SIGTERM)
    assert wait_until(lambda: not alive(keeper))
