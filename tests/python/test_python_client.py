"""companion.connect / Client: information, load and unload, leases, status streams."""
import threading
import time

import pytest

import companion
from harness import Server, wait_until


def test_connect_server_info_and_health(server, client):
    info = client.server_info()
    assert info["instance_id"] == server.instance and info["namespace"] == "companion"
    assert info["component"] == "model_server_host" and info["device"] == "host"
    assert info["socket_path"] == server.socket and info["pid"] == server.pid
    health = client.health()
    assert health["state"] == "serving" and health["server"]["instance_id"] == server.instance
    for field in ("uptime_ms", "models_loaded", "models_total", "clients", "leases", "slab_bytes"):
        assert isinstance(health[field], int)
    assert companion.library_version() == info["version"]


def test_connect_options(server):
    # socket_path skips discovery; device spellings of the host.
    with companion.connect(socket_path=server.socket) as c:
        assert c.server_info()["instance_id"] == server.instance
    for device in ("host", "cpu", None):
        with companion.connect(device=device, runtime_dir=server.runtime_dir) as c:
            assert c.health()["state"] == "serving"
    with pytest.raises(companion.Unavailable):
        companion.connect(namespace="elsewhere", runtime_dir=server.runtime_dir,
                          discovery_timeout=0.2)


def test_closed_client(server):
    c = companion.connect(runtime_dir=server.runtime_dir)
    with c:
        assert not c.closed
    assert c.closed
    c.close()  # idempotent
    with pytest.raises(companion.InvalidArgument, match="closed"):
        c.health()


def test_load_status_list_unload(client, model_root):
    source = str(model_root / "opt-f32")
    spec = companion.ModelSpec(source, dtype="bf16", tag="t1")
    assert client.status(spec).state == companion.ModelState.READY
    status = client.load(spec, wait=True, timeout=60)
    assert status.loaded and status.state == "loaded" and status.tensors == 36
    assert status.key == f"source={source};dtype=BF16;tp=0/1;tag=t1"
    assert status.bytes_done == status.bytes_total > 0 and status.progress == 1.0
    assert status.backend == "host" and status.slab_bytes >= status.bytes_total // 2  # f32 -> bf16
    assert status.raw["id"] == status.id and status.to_dict() == status.raw
    assert status in client.list()
    assert client.status(spec) == status
    # The same spec spelt with a torch dtype is the same model.
    torch = pytest.importorskip("torch")
    assert client.load(companion.ModelSpec(source, dtype=torch.bfloat16, tag="t1")).id == status.id
    # unload by spec, by short id, by key
    assert client.unload(spec).state == "unloaded"
    again = client.load(spec)
    assert client.unload(again.id).state == "unloaded"
    again = client.load(spec)
    assert client.unload(again.key).state == "unloaded"
    assert all(m.id != status.id for m in client.list())


def test_load_without_wait_then_wait_for_model_ready(client, model_root):
    spec = companion.ModelSpec(model_root / "opt-big", tag="nowait")
    started = client.load(spec, wait=False)
    assert started.state in ("loading", "loaded")
    ready = client.wait_for_model_ready(spec, initial_timeout=10, loading_timeout=60)
    assert ready.loaded and ready.id == started.id
    client.unload(spec)


def test_wait_for_model_ready_raises_the_load_error(client, model_root):
    with pytest.raises(companion.NotFound):
        client.wait_for_model_ready(str(model_root / "nope"), 5, 5)


def test_unload_respects_leases_unless_forced(client, model_root):
    spec = companion.ModelSpec(str(model_root / "opt-f32"), tag="leased")
    model = client.get_model_parameters(spec)
    assert client.status(spec).leases == 1
    with pytest.raises(companion.ModelInUse):
        client.unload(spec)
    name = "model.decoder.embed_tokens.weight"
    before = model[name].numpy().copy()
    assert client.unload(spec, force=True).state == "unloaded"
    # The mapping stays valid for its holder.
    assert (model[name].numpy() == before).all()
    model.release()


def test_status_stream_yields_loading_then_loaded(server, client, model_root):
    spec = companion.ModelSpec(str(model_root / "opt-big"), tag="stream")
    with client.status_stream(spec, timeout=30) as stream:
        first = next(stream)
        assert first.state == "ready"
        with companion.connect(runtime_dir=server.runtime_dir) as other:
            other.load(spec, wait=False)
            states = []
            for status in stream:
                states.append(status)
                if status.state == "loaded":
                    break
        assert states[0].state == "loading" and states[-1].state == "loaded"
        assert all(s.state == "loading" for s in states[:-1])
        done = [s.bytes_done for s in states]
        assert done == sorted(done) and states[-1].bytes_done == states[-1].bytes_total > 0
        client.unload(spec)
        assert stream.next(timeout=10).state == "unloaded"
        with pytest.raises(companion.Timeout):
            stream.next(timeout=0.05)
    assert stream.closed
    assert list(stream) == []  # a closed stream ends iteration


def test_status_stream_of_every_model(client, model_root):
    spec = companion.ModelSpec(str(model_root / "opt-f32"), tag="all")
    with client.status_stream() as stream:  # every model; those held now come first
        client.load(spec)
        seen = []
        while not seen or seen[-1].state != "loaded" or seen[-1].source != spec.source:
            seen.append(stream.next(timeout=10))
    client.unload(spec)


def test_client_is_shared_between_threads(client, model_root):
    spec = companion.ModelSpec(str(model_root / "opt-f32"), tag="threads")
    results, failures = [], []

    def work():
        try:
            with client.get_model_parameters(spec) as m:
                results.append(len(m))
        except Exception as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and results == [36] * 8
    assert wait_until(lambda: client.status(spec).leases == 0)
    client.unload(spec)


def test_server_going_away(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    c = companion.connect(runtime_dir=runtime_dir)
    model = c.get_model_parameters(str(model_root / "opt-f32"))
    weights = model["model.decoder.final_layer_norm.weight"].numpy().copy()
    assert s.stop() == 0
    with pytest.raises((companion.ConnectionClosed, companion.IoError, companion.Unavailable)):
        c.health()
    # Host mappings stay readable after the server is gone.
    assert (model["model.decoder.final_layer_norm.weight"].numpy() == weights).all()
    c.close()


def test_close_while_a_call_is_in_flight(client, model_root):
    """close() from another thread waits for the call in flight instead of freeing under it."""
    stream = client.status_stream(str(model_root / "opt-f32"))
    assert stream.next(timeout=10).source == str(model_root / "opt-f32")  # the current state
    outcome = []

    def blocked():
        try:
            stream.next(timeout=0.5)  # nothing changes: times out
        except companion.Timeout:
            outcome.append("timeout")

    worker = threading.Thread(target=blocked)
    worker.start()
    wait_until(lambda: stream._handle._users == 1, timeout=5, interval=0.005)
    stream.close()  # returns at once; the native close happens when next() returns
    assert stream.closed
    worker.join()
    assert outcome == ["timeout"]
    with pytest.raises(companion.InvalidArgument, match="closed"):
        stream.next(timeout=0)


def test_a_client_outlives_idle_closes_of_its_connection(tmp_path, model_root):
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    s = Server(rt, [model_root], extra=["--idle-timeout", "0.3"])
    try:
        with companion.connect(runtime_dir=rt) as c:
            c.load(str(model_root / "opt-f32"))
            for _ in range(3):
                time.sleep(0.8)  # the server closes the idle connection meanwhile
                assert [m.state for m in c.list()] == [companion.ModelState.LOADED]
            assert c.health()["refused"]["idle_timeout"] >= 3
    finally:
        assert s.stop() == 0, s.log_text()
