"""The memory budget through a real server: `serve --memory-budget` admits loads within it, evicts
the least recently used model that no client holds when a load needs room, refuses with
OUT_OF_MEMORY (naming what is resident and leased) when every model is held, and
`--idle-evict` evicts models that no client held for that long. `ls` shows last use and the
eviction order; `health` counts evictions."""
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from safetensors.numpy import save_file

from harness import COMPANION, PYTHON_LIBRARY, Server, wait_until

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
os.environ.setdefault("COMPANION_LIBRARY", str(PYTHON_LIBRARY))
import companion  # noqa: E402
from companion import errors  # noqa: E402

MIB = 1 << 20


@pytest.fixture(scope="module")
def budget_models(tmp_path_factory):
    """Three checkpoints of one 1 MiB tensor each: a, b and c."""
    root = tmp_path_factory.mktemp("budget-models")
    for seed, name in enumerate("abc"):
        (root / name).mkdir()
        rng = np.random.default_rng(seed)
        save_file({"w": rng.standard_normal((256, 1024)).astype(np.float32)},
                  str(root / name / "model.safetensors"))
    return root


@pytest.fixture
def serve(runtime_dir, budget_models):
    servers = []

    def start(*extra):
        s = Server(runtime_dir, [budget_models], extra=["--memory-reserve", "0", *extra])
        servers.append(s)
        return s

    yield start
    for s in servers:
        code = s.stop()
        assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def listed(server):
    """ls --json as {source directory name: status}."""
    models, code = server.cli_json("ls")
    assert code == 0
    return {pathlib.Path(m["source"]).name: m for m in models}


def test_budget_evicts_least_recently_used_and_refuses_when_all_are_leased(serve, budget_models):
    # Room for two of the three models.
    server = serve("--memory-budget", "2560KiB")
    health, _ = server.cli_json("health")
    assert health["memory_budget"] == 2560 * 1024 and health["evictions"] == 0
    server.cli("load", str(budget_models / "a"))
    server.cli("load", str(budget_models / "b"))
    with companion.connect(socket_path=server.socket) as client:
        # a is used after b was loaded: b is the least recently used.
        with client.get_model_parameters(companion.ModelSpec(str(budget_models / "a"))):
            assert listed(server)["a"]["eviction_rank"] == 0  # leased: never evicted
        models = listed(server)
        assert (models["b"]["eviction_rank"], models["a"]["eviction_rank"]) == (1, 2)
        assert models["a"]["last_used_ms"] >= models["b"]["last_used_ms"] > 0
        table = server.cli("ls").stdout
        assert "LAST USE" in table and "EVICT" in table, table

        # c needs room: b goes, a stays.
        server.cli("load", str(budget_models / "c"))
        models = listed(server)
        assert sorted(models) == ["a", "c"]
        assert all(m["state"] == "loaded" for m in models.values())
        health, _ = server.cli_json("health")
        assert health["evictions"] == 1
        assert health["slab_bytes"] <= 2560 * 1024
        assert "evicted" in server.log_text()

        # Every resident model leased: b is refused at once, and says why.
        with client.get_model_parameters(companion.ModelSpec(str(budget_models / "a"))), \
                client.get_model_parameters(companion.ModelSpec(str(budget_models / "c"))):
            with pytest.raises(errors.OutOfMemory) as refused:
                client.load(companion.ModelSpec(str(budget_models / "b")), timeout=30)
            message = str(refused.value)
            assert "--memory-budget" in message and "1 lease(s)" in message, message
            for name in ("a", "c"):
                assert str(budget_models / name) in message, message
            r = server.cli("load", str(budget_models / "b"), "--json", check=False)
            assert r.returncode != 0
            assert json.loads(r.stdout)["error"]["code"] == "OUT_OF_MEMORY"
            assert sorted(listed(server)) == ["a", "b", "c"]  # b listed as failed
            assert listed(server)["b"]["state"] == "error"
        # Released (c first, then a): b loads, evicting c, the least recently used.
        server.cli("load", str(budget_models / "b"))
        models = listed(server)
        assert models["b"]["state"] == "loaded" and "c" not in models
        assert models["a"]["state"] == "loaded"
        # An evicted model is served again as usual (evicting a now).
        with client.get_model_parameters(companion.ModelSpec(str(budget_models / "c"))) as model:
            assert model["w"].shape == (256, 1024)
        assert sorted(listed(server)) == ["b", "c"]
    health, _ = server.cli_json("health")
    assert health["evictions"] == 3
    assert "evictions" in server.cli("health").stdout


def test_idle_models_are_evicted_and_held_ones_stay(serve, budget_models):
    server = serve("--idle-evict", "1")
    with companion.connect(socket_path=server.socket) as client:
        with client.get_model_parameters(companion.ModelSpec(str(budget_models / "b"))):
            # a, loaded after b was leased, is evicted once idle; b, held all along, stays.
            server.cli("load", str(budget_models / "a"))
            assert wait_until(lambda: "a" not in listed(server), timeout=30), listed(server)
            assert listed(server)["b"]["state"] == "loaded"
        # Released, b goes too.
        assert wait_until(lambda: not listed(server), timeout=30), listed(server)
    health, _ = server.cli_json("health")
    assert health["evictions"] == 2
    assert "--idle-evict" in server.log_text()


@pytest.mark.parametrize("flag,value", [("--memory-budget", "0"), ("--memory-budget", "101%"),
                                        ("--memory-budget", "8GB"), ("--idle-evict", "-1")])
def test_bad_settings_stop_the_server_at_start(runtime_dir, budget_models, flag, value):
    r = subprocess.run([str(COMPANION), "serve", "--device", "host", "--runtime-dir",
                        str(runtime_dir), "--model-root", str(budget_models), "--no-keep",
                        flag, value],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and flag in r.stderr, (r.returncode, r.stderr)


def test_an_evicted_model_leaves_the_keeper_too(runtime_dir, budget_models):
    """With a keeper (restart without reload), eviction frees the model's memory there as well,
    and a restarted server adopts only what was resident."""
    from test_keeper import wait_kept
    server = Server(runtime_dir, [budget_models], keep=True,
                    extra=["--memory-reserve", "0", "--memory-budget", "1536KiB"])
    try:
        keeper = server.keeper_pid()
        server.cli("load", str(budget_models / "a"))
        wait_kept(keeper, 1)
        server.cli("load", str(budget_models / "b"))  # room for one: a is evicted
        assert sorted(listed(server)) == ["b"]
        wait_kept(keeper, 1)
    finally:
        assert server.stop() == 0, server.log_text()
    server = Server(runtime_dir, [budget_models], keep=True,
                    extra=["--memory-reserve", "0", "--memory-budget", "1536KiB"])
    try:
        models = listed(server)
        assert sorted(models) == ["b"] and models["b"]["eviction_rank"] == 1, models
        server.cli("load", str(budget_models / "a"))  # evicts the adopted b
        assert sorted(listed(server)) == ["a"]
        health, _ = server.cli_json("health")
        assert health["evictions"] == 1
    finally:
        server.cli("unload", str(budget_models / "a"), check=False)
        assert server.stop() == 0, server.log_text()


def test_a_model_with_a_parked_attach_is_not_evicted_before_its_lease(runtime_dir, tmp_path):
    """The race: an attach parked on a load, the load done, and another load's admission
    evicting the model before the server granted the parked attach its lease (which then got
    NOT_READY). Made deterministic with fault points: one load worker; race-a's load waits
    before its seal until race-b's load is queued behind it, and the event loop waits before
    granting race-a's attach until race-b's admission is over."""
    root = tmp_path / "models"
    for seed, name in enumerate(("race-a", "race-b")):
        (root / name).mkdir(parents=True)
        rng = np.random.default_rng(seed)
        save_file({"w": rng.standard_normal((256, 1024)).astype(np.float32)},
                  str(root / name / "model.safetensors"))
    gates = tmp_path / "gates"
    gates.mkdir()
    fault = (f"wait-at=seal,path=race-a,until={gates / 'sealed'};"
             f"wait-at=grant,path=race-a,until={gates / 'granted'}")
    server = Server(runtime_dir, [root], env={**os.environ, "COMPANION_TEST_FAULT": fault},
                    extra=["--memory-reserve", "0", "--memory-budget", "1536KiB",  # room for one
                           "--load-threads", "1"])
    attached = {}

    def attach():
        # GetParameters straight away (not a Load first, as `companion attach` does): it parks.
        try:
            with companion.connect(socket_path=server.socket) as client:
                with client.get_model_parameters(companion.ModelSpec(str(root / "race-a")),
                                                 timeout=60) as model:
                    attached["shape"] = model["w"].shape
        except errors.Error as e:
            attached["error"] = e

    attacher = threading.Thread(target=attach)
    attacher.start()
    try:
        assert wait_until(lambda: "waiting at seal" in server.log_text(), timeout=30), \
            server.log_text()
        server.cli("load", str(root / "race-b"), "--no-wait")  # queued behind race-a's load
        (gates / "sealed").touch()
        # race-a is loaded and its attach about to be granted; race-b's admission runs now.
        assert wait_until(lambda: "waiting at grant" in server.log_text() and
                          ("evicted" in server.log_text() or
                           "race-b failed" in server.log_text()), timeout=30), server.log_text()
        (gates / "granted").touch()
        attacher.join(timeout=60)
        assert attached == {"shape": (256, 1024)}, (attached, server.log_text())
        # race-b could not have race-a's memory: it was refused, naming what held it.
        log = server.log_text()
        assert "evicted" not in log, log
        [b] = [m for m in server.cli_json("ls")[0] if m["source"].endswith("race-b")]
        assert b["state"] == "error" and b["error"]["code"] == "OUT_OF_MEMORY", b
        assert "a client is waiting for it" in b["error"]["message"], b
    finally:
        for gate in ("sealed", "granted"):
            (gates / gate).touch()
        attacher.join(timeout=60)
        assert server.stop() == 0, server.log_text()
