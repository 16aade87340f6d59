"""The etcd registry with a real etcd: registration and watch, lease expiry after kill -9, etcd
restarts, several instances per device with model-aware choice, round robin and failover."""
import json
import signal
import subprocess
import threading
import time

import pytest

from checkpoints import tensor_crcs, write_opt_like
from harness import COMPANION, Etcd, Server, SessionClient, wait_until

TTL = 2  # seconds: short, so lease expiry is quick to observe


@pytest.fixture
def servers(runtime_dir, model_root, etcd):
    """Starts servers announcing themselves in the test's etcd; stops them at the end."""
    started = []

    def start(*extra, registry=None):
        s = Server(runtime_dir, [model_root],
                   extra=["--registry", registry or etcd.url, "--registry-ttl", str(TTL),
                          *extra])
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def empty_dir(tmp_path):
    """A local registry with nothing in it: clients given it can only find servers in etcd."""
    d = tmp_path / "no-local-records"
    d.mkdir(mode=0o700)
    return d


def key_of(server):
    return f"/services/{server.namespace}/model_server_host/{server.instance}"


def client_cli(*args, registry, runtime_dir, check=True, timeout=60):
    cmd = [str(COMPANION), args[0], "--registry", registry, "--runtime-dir", str(runtime_dir),
           *args[1:]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def file_crcs(model):
    return {name: crc for name, (_, _, crc) in tensor_crcs(model).items()}


def test_server_registers_with_a_lease_and_leaves_on_stop(etcd, servers, empty_dir):
    a = servers()
    records = etcd.records()
    assert list(records) == [key_of(a)]
    value, lease = records[key_of(a)]
    record = json.loads(value)
    assert record["instance_id"] == a.instance and record["socket_path"] == a.socket
    assert record["namespace"] == "companion" and record["pid"] == a.pid
    assert lease != 0, "the record must be bound to a lease"
    ttl = etcd.request("/v3/lease/timetolive", {"ID": str(lease)})
    assert 0 < int(ttl["TTL"]) <= TTL

    r = client_cli("health", "--json", registry=etcd.url, runtime_dir=empty_dir)
    health = json.loads(r.stdout)
    assert health["server"]["instance_id"] == a.instance
    assert health["registry"] == etcd.url and health["registered"] is True

    assert a.stop() == 0
    # Revoked on the way out, not left to expire.
    assert etcd.records() == {}


def test_client_watch_follows_instances_on_this_host_only(etcd, servers, empty_dir):
    a = servers()
    client = SessionClient("--registry", etcd.url, "--runtime-dir", empty_dir)
    try:
        assert client.hello["ok"] and client.hello["instance"] == a.instance
        assert client("instances")["instances"] == [a.instance]

        b = servers()
        assert wait_until(lambda: client("instances")["instances"] == [a.instance, b.instance],
                          timeout=5)

        # Another host's instance, another namespace, a record that is not one: none is a
        # candidate here.
        other = json.loads(etcd.records()[key_of(a)][0])
        other.update(instance_id="elsewhere1", hostname="some-other-host")
        etcd.put("/services/companion/model_server_host/elsewhere1", json.dumps(other))
        other.update(instance_id="otherns1", namespace="other", hostname=json.loads(
            etcd.records()[key_of(a)][0])["hostname"])
        etcd.put("/services/companion/model_server_host/otherns1", json.dumps(other))
        etcd.put("/services/companion/model_server_host/garbage", "{not json")
        time.sleep(0.5)
        assert client("instances")["instances"] == [a.instance, b.instance]

        # kill -9: the lease lapses and the watch reports the deletion within the TTL.
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        killed = time.monotonic()
        assert wait_until(lambda: client("instances")["instances"] == [a.instance],
                          timeout=TTL + 3, interval=0.1)
        assert time.monotonic() - killed <= TTL + 1.5
    finally:
        assert client.close() == 0


def test_dead_instance_is_skipped_at_once_and_expires_within_ttl(etcd, servers, empty_dir,
                                                                  model_root):
    a = servers()
    b = servers()
    model = str(model_root / "opt-small")
    a.cli("load", model)  # model-aware choice sends every client to a
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    killed = time.monotonic()
    assert key_of(a) in etcd.records(), "the key lives until its lease lapses"

    # Clients do not wait for the TTL: the dead socket refuses them and they take b.
    r = client_cli("attach", model, "--json", "--verify", registry=etcd.url,
                   runtime_dir=empty_dir)
    attached = json.loads(r.stdout)
    assert attached["server"]["instance_id"] == b.instance
    crcs = file_crcs(model)
    assert {t["name"]: t["crc32"] for t in attached["tensors"]} == crcs

    # health --all reports the dead instance while its record lasts, and fails.
    if key_of(a) in etcd.records():
        r = client_cli("health", "--all", "--json", registry=etcd.url, runtime_dir=empty_dir,
                       check=False)
        report = {e["instance_id"]: e for e in json.loads(r.stdout)}
        if a.instance in report:
            assert r.returncode == 1 and report[a.instance]["serving"] is False
            assert report[b.instance]["serving"] is True

    assert wait_until(lambda: key_of(a) not in etcd.records(), timeout=TTL + 3, interval=0.1)
    assert time.monotonic() - killed <= TTL + 1.5
    r = client_cli("health", "--all", "--json", registry=etcd.url, runtime_dir=empty_dir)
    assert [e["instance_id"] for e in json.loads(r.stdout)] == [b.instance]


def test_etcd_restart_server_keeps_serving_and_registers_again(etcd, servers, runtime_dir,
                                                               empty_dir, model_root):
    a = servers()
    model = str(model_root / "opt-small")
    watcher = SessionClient("--registry", etcd.url, "--runtime-dir", empty_dir)
    try:
        etcd.stop(signal.SIGKILL)

        # The server goes on serving: local clients attach; health says it is not registered.
        assert wait_until(lambda: a.cli_json("health")[0]["registered"] is False, timeout=TTL + 3)
        health, code = a.cli_json("health")
        assert code == 0 and health["state"] == "serving" and health["registry_error"]
        r = client_cli("attach", model, "--json", registry=etcd.url, runtime_dir=runtime_dir)
        assert json.loads(r.stdout)["server"]["instance_id"] == a.instance  # local fallback
        # A client that saw the instance in etcd before keeps using what it last saw.
        got = watcher(f"attach {model}")
        assert got["ok"] and got["instance"] == a.instance

        # etcd returns without its data: the server registers again under a new lease.
        etcd.start(fresh=True)
        assert wait_until(lambda: key_of(a) in etcd.records(), timeout=TTL + 5, interval=0.1)
        assert wait_until(lambda: a.cli_json("health")[0]["registered"] is True, timeout=5)
        assert wait_until(lambda: watcher("instances")["instances"] == [a.instance], timeout=5)

        # etcd restarts with its data: the record survives (the lease is renewed) or is
        # written again; either way it is there.
        etcd.stop(signal.SIGTERM)
        etcd.start()
        assert wait_until(lambda: key_of(a) in etcd.records(), timeout=TTL + 5, interval=0.1)
        b = servers()
        assert wait_until(
            lambda: watcher("instances")["instances"] == [a.instance, b.instance], timeout=10)
        assert "registered in etcd" in a.log_text()
    finally:
        assert watcher.close() == 0


def test_server_started_before_etcd_registers_when_it_appears(tmp_path, runtime_dir,
                                                             model_root):
    etcd = Etcd(tmp_path / "late-etcd", start=False)
    s = Server(runtime_dir, [model_root],
               extra=["--registry", etcd.url, "--registry-ttl", str(TTL)])
    try:
        health, code = s.cli_json("health")
        assert code == 0 and health["registered"] is False
        assert "not registered" in s.log_text()
        etcd.start()
        try:
            assert wait_until(lambda: key_of(s) in etcd.records(), timeout=TTL + 5,
                              interval=0.1)
            assert s.cli_json("health")[0]["registered"] is True
        finally:
            etcd.stop(signal.SIGKILL)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("registry", ["etcd", "local"])
def test_model_aware_choice_then_round_robin(registry, etcd, servers, runtime_dir, empty_dir,
                                             model_root):
    url = etcd.url if registry == "etcd" else "local"
    a = servers(registry=url)
    b = servers(registry=url)
    for name in ("rr-one", "rr-two"):
        if not (model_root / name).exists():
            write_opt_like(model_root / name, hidden=64, layers=1, vocab=128, dtype="float16")
    held = str(model_root / "opt-small")
    # b holds the model: every client is sent there, whichever instance round robin is on.
    b.cli("load", held)
    lookup_dir = empty_dir if registry == "etcd" else runtime_dir
    for _ in range(4):
        client = SessionClient("--registry", url, "--runtime-dir", lookup_dir)
        try:
            got = client(f"attach {held}")
            assert got["ok"] and got["instance"] == b.instance
        finally:
            assert client.close() == 0
    assert a.cli_json("ls")[0] == [], a.cli_json("ls")[0]

    # Models no instance holds go round robin: two in a row land on different instances, and
    # later requests for each follow it.
    client = SessionClient("--registry", url, "--runtime-dir", lookup_dir)
    try:
        one = client(f"load {model_root / 'rr-one'}")
        two = client(f"load {model_root / 'rr-two'}")
        assert one["ok"] and two["ok"] and one["instance"] != two["instance"]
        for _ in range(3):
            assert client(f"attach {model_root / 'rr-one'}")["instance"] == one["instance"]
            assert client(f"attach {model_root / 'rr-two'}")["instance"] == two["instance"]
            assert client(f"status {model_root / 'rr-two'}") == {
                "ok": True, "instance": two["instance"], "state": "loaded"}
    finally:
        assert client.close() == 0


def test_client_follows_a_model_that_moved_instead_of_loading_it_again(servers, runtime_dir,
                                                                       model_root):
    a = servers(registry="local")
    b = servers(registry="local")
    model = str(model_root / "opt-small")
    b.cli("load", model)
    client = SessionClient("--registry", "local", "--runtime-dir", runtime_dir)
    try:
        assert client(f"attach {model}")["instance"] == b.instance
        client("release 0")
        # The model moves: b drops it, a loads it. The client served by b before must not make
        # b load it again.
        b.cli("unload", model, "--force")
        a.cli("load", model)
        got = client(f"attach {model}")
        assert got["ok"] and got["instance"] == a.instance, got
        assert b.cli_json("ls")[0] == [] or all(m["state"] != "loaded"
                                                for m in b.cli_json("ls")[0])
        assert b.log_text().count(" info: loaded ") == 1, "b loaded the model a second time"
    finally:
        assert client.close() == 0


def test_failover_while_clients_attach(etcd, servers, empty_dir, model_root):
    a = servers()
    b = servers()
    model = str(model_root / "opt-small")
    crcs = file_crcs(model)
    clients = [SessionClient("--registry", etcd.url, "--runtime-dir", empty_dir)
               for _ in range(3)]
    try:
        first = [c(f"attach {model}") for c in clients]
        assert all(f["ok"] for f in first)
        holder = first[0]["instance"]
        assert all(f["instance"] == holder for f in first), "model-aware: one instance serves"
        dead, alive = (a, b) if holder == a.instance else (b, a)

        # Fresh clients keep attaching while the holder is killed.
        results, stop = [], threading.Event()

        def attach_loop():
            while not stop.is_set():
                r = client_cli("attach", model, "--json", registry=etcd.url,
                               runtime_dir=empty_dir, check=False)
                results.append((r.returncode, r.stdout, r.stderr))

        loop = threading.Thread(target=attach_loop)
        loop.start()
        time.sleep(0.3)
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        time.sleep(TTL + 1.0)
        stop.set()
        loop.join()
        assert results and all(code == 0 for code, _, _ in results), results
        served_by = [json.loads(out)["server"]["instance_id"] for _, out, _ in results]
        assert served_by[-1] == alive.instance

        for c in clients:
            # Weights mapped from the dead instance are still there, byte for byte.
            before = c("verify")
            assert before["ok"] and before["models"][0]["sums"] == crcs
            # The next request fails over to the live instance.
            again = c(f"attach {model}")
            assert again["ok"] and again["instance"] == alive.instance, again
            after = c("verify")
            assert [m["sums"] for m in after["models"]] == [crcs, crcs]
    finally:
        for c in clients:
            assert c.close() == 0


def test_bad_registry_is_a_clear_error(runtime_dir, model_root):
    r = subprocess.run([str(COMPANION), "health", "--registry", "zookeeper://x:1",
                        "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
    assert r.returncode == 1 and "etcd://host:port" in r.stderr
    r = subprocess.run([str(COMPANION), "serve", "--registry", "etcd://nohost",
                        "--runtime-dir", str(runtime_dir)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "host:port" in r.stderr
