"""`serve --metrics`: a real server's Prometheus endpoint, scraped over HTTP and read with the
Prometheus client library's own parser. The counters follow what clients do (loads, failed loads,
attaches and their errors, offload and wake, evictions), the gauges follow the state (models by
state, bytes per tier, leases, clients), a bad or taken address is refused at start, and hostile
HTTP clients neither crash the server nor stop it serving its Unix-socket clients."""
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file

from harness import COMPANION, PYTHON_LIBRARY, Server, wait_until

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
os.environ.setdefault("COMPANION_LIBRARY", str(PYTHON_LIBRARY))
import companion  # noqa: E402

MIB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """a and b: one 1 MiB float32 tensor each; broken: a header that promises more than the file."""
    root = tmp_path_factory.mktemp("metrics-models")
    for seed, name in enumerate("ab"):
        (root / name).mkdir()
        rng = np.random.default_rng(seed)
        save_file({"w": rng.standard_normal((256, 1024)).astype(np.float32)},
                  str(root / name / "model.safetensors"))
    (root / "broken").mkdir()
    data = (root / "a" / "model.safetensors").read_bytes()
    (root / "broken" / "model.safetensors").write_bytes(data[:len(data) // 2])
    return root


def metrics_url(server):
    match = re.search(r"metrics on (http://\S+/metrics)", server.log_text())
    assert match, server.log_text()
    return match.group(1)


def scrape(url, timeout=10):
    """{(name, ((label, value), ...)): value} of every sample, after checking the response is the
    text format and that every family has HELP and TYPE."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram"), family
        for s in family.samples:
            # Prometheus attaches job and instance to every series it scrapes: a label of the
            # same name here would be renamed exported_job, exported_instance.
            assert not {"job", "instance"} & s.labels.keys(), s
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            # Prometheus conventions: counters end in _total, byte and time values say so.
            assert (kind == "counter") == name.endswith("_total"), line
    return samples, families


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def serve(runtime_dir, models):
    servers = []

    def start(*extra):
        s = Server(runtime_dir, [models], extra=["--metrics", "0", "--memory-reserve", "0", *extra])
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.stop() == 0, s.log_text()


def test_counters_and_gauges_follow_what_clients_do(serve, models):
    server = serve("--host-budget", "64MiB", "--memory-budget", "1536KiB")  # room for one model
    url = metrics_url(server)
    samples, families = scrape(url)
    for name in ("companion_build_info", "companion_models", "companion_resident_bytes",
                 "companion_memory_budget_bytes", "companion_leases", "companion_clients",
                 "companion_loads", "companion_load_bytes", "companion_load_duration_seconds",
                 "companion_load_errors", "companion_attaches", "companion_attach_duration_seconds",
                 "companion_attach_errors", "companion_evictions", "companion_refusals",
                 "companion_registry_registered", "companion_start_time_seconds"):
        # The parser names a counter family without its _total.
        assert name in families, name
    assert families["companion_load_duration_seconds"].type == "histogram"
    [build] = families["companion_build_info"].samples
    assert build.value == 1 and build.labels["device"] == "host"
    assert build.labels["instance_id"] == server.instance and build.labels["protocol"] == "1.3"
    assert value(samples, "companion_memory_budget_bytes") == 1536 * 1024
    assert value(samples, "companion_loads_total", kind="load") == 0
    assert value(samples, "companion_registry_registered", registry="local") == 1
    assert abs(value(samples, "companion_start_time_seconds") - time.time()) < 60

    # A load: counted with its bytes and duration; the model is loaded and resident.
    loaded, _ = server.cli_json("load", str(models / "a"))
    samples, _ = scrape(url)
    assert value(samples, "companion_loads_total", kind="load") == 1
    assert value(samples, "companion_load_bytes_total", kind="load") == loaded["bytes_total"]
    assert value(samples, "companion_load_duration_seconds_count", kind="load") == 1
    assert value(samples, "companion_load_duration_seconds_bucket", kind="load", le="+Inf") == 1
    assert value(samples, "companion_models", state="loaded") == 1
    assert value(samples, "companion_resident_bytes", tier="device") == loaded["slab_bytes"]

    # A client holding the model: a lease, a client, an attach with its latency.
    with companion.connect(socket_path=server.socket) as client:
        with client.get_model_parameters(companion.ModelSpec(str(models / "a"))):
            samples, _ = scrape(url)
            assert value(samples, "companion_leases") == 1
            assert value(samples, "companion_clients") >= 1
            assert value(samples, "companion_attaches_total") == 1
            assert value(samples, "companion_attach_duration_seconds_count") == 1
            assert 0 < value(samples, "companion_attach_duration_seconds_sum") < 10
    # Every attach is counted by the time its client holds the lease, however soon it scrapes.
    with companion.connect(socket_path=server.socket) as client:
        for i in range(2, 22):
            with client.get_model_parameters(companion.ModelSpec(str(models / "a"))):
                samples, _ = scrape(url)
                assert value(samples, "companion_attaches_total") == i
    # The client releases without waiting for the server's answer.
    assert wait_until(lambda: value(scrape(url)[0], "companion_leases") == 0)

    # Failed attach and failed load: counted by error code.
    with companion.connect(socket_path=server.socket) as client:
        with pytest.raises(companion.errors.Error) as e:
            client.get_model_parameters(companion.ModelSpec(str(models / "missing")))
        assert e.value.code_name == "NOT_FOUND"
    out, code = server.cli_json("load", str(models / "broken"), check=False)
    assert code != 0
    samples, families = scrape(url)
    attach_errors = {s.labels["code"]: s.value for s in families["companion_attach_errors"].samples}
    assert attach_errors == {"NOT_FOUND": 1}, attach_errors
    assert value(samples, "companion_load_errors_total", kind="load", code="BAD_CHECKPOINT") == 1
    assert value(samples, "companion_models", state="error") == 1

    # b does not fit beside a: a (idle) is evicted to the host tier, then woken by an attach
    # (b is evicted in turn).
    server.cli("load", str(models / "b"))
    samples, _ = scrape(url)
    assert value(samples, "companion_evictions_total") == 1
    assert value(samples, "companion_models", state="offloaded") == 1
    assert value(samples, "companion_resident_bytes", tier="host") == loaded["slab_bytes"]
    server.cli("attach", str(models / "a"))
    samples, _ = scrape(url)
    assert value(samples, "companion_loads_total", kind="wake") == 1
    assert value(samples, "companion_load_bytes_total", kind="wake") == loaded["slab_bytes"]
    assert value(samples, "companion_loads_total", kind="load") == 2  # a, then b
    assert value(samples, "companion_evictions_total") == 2
    # Every attach so far that got a lease (the clients', the CLI's) is in the histogram.
    assert value(samples, "companion_attaches_total") == 22
    assert value(samples, "companion_attach_duration_seconds_count") == 22


def test_a_bad_or_taken_address_is_refused_at_start(runtime_dir, models):
    for bad in ("abc", "host.example:9464", "70000", "[::1]"):
        r = subprocess.run([str(COMPANION), "serve", "--runtime-dir", str(runtime_dir),
                            "--no-keep", "--metrics", bad], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0 and "--metrics" in r.stderr, (bad, r.stderr)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([str(COMPANION), "serve", "--runtime-dir", str(runtime_dir),
                            "--no-keep", "--metrics", f"127.0.0.1:{port}"], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0 and "in use" in r.stderr, r.stderr
    finally:
        taken.close()


def test_a_host_without_libmicrohttpd_refuses_metrics_only(runtime_dir, models):
    """The library is loaded when --metrics asks for it: a host without it runs the server, and
    refuses --metrics with what to install."""
    env = dict(os.environ, COMPANION_MICROHTTPD_LIBRARY="/nonexistent/libmicrohttpd.so.12")
    r = subprocess.run([str(COMPANION), "serve", "--runtime-dir", str(runtime_dir), "--no-keep",
                        "--metrics", "0"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0, r.stderr
    assert "libmicrohttpd" in r.stderr and "apt-get install libmicrohttpd12" in r.stderr, r.stderr
    server = Server(runtime_dir, [models], env=env)
    try:
        assert server.cli_json("health")[0]["state"] == "serving"
    finally:
        assert server.stop() == 0


def test_hostile_http_clients_do_not_stop_the_server(serve, models):
    server = serve()
    url = metrics_url(server)
    host, port = re.match(r"http://([^:]+):(\d+)/", url).groups()
    server.cli("load", str(models / "a"))

    def raw(payload, read=True):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(payload)
        if not read:
            return s
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
        s.close()
        return data

    # Not HTTP, a huge header, a request body, other paths and methods: answered or closed.
    assert raw(b"\x00\xff garbage\r\n\r\n")[:12] in (b"", b"HTTP/1.1 400", b"HTTP/1.0 400")
    big = raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert not big.startswith(b"HTTP/1.1 200"), big[:80]
    assert raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")\
        .startswith(b"HTTP/1.1 405")
    assert raw(b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
    assert e.value.code == 404
    head = raw(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"companion_" not in head

    # Connections that send half a request and hold on: the endpoint's bound takes them, the
    # Unix-socket clients are served all along.
    held = [raw(b"GET /metr", read=False) for _ in range(40)]
    try:
        health, code = server.cli_json("health")
        assert code == 0 and health["models_loaded"] == 1
        out, code = server.cli_json("attach", str(models / "a"))
        assert code == 0
    finally:
        for s in held:
            s.close()
    # Once they are gone, scrapes are answered again.
    wait_until(lambda: _scrapes(url), timeout=15)
    samples, _ = scrape(url)
    assert value(samples, "companion_models", state="loaded") == 1
    assert server.proc.poll() is None


def _scrapes(url):
    try:
        scrape(url)
        return True
    except (OSError, urllib.error.URLError):
        return False


def test_clients_that_trickle_a_request_do_not_hold_the_endpoint(serve):
    """Connections from several addresses (more than the endpoint takes at once) that send a
    request a byte every two seconds, which the idle timeout alone never ends: each is closed
    when it has not sent a whole request in 10 s, and a scrape waiting behind them is answered."""
    server = serve()
    url = metrics_url(server)
    host, port = re.match(r"http://([^:]+):(\d+)/", url).groups()
    held = []
    for address in range(2, 7):
        for _ in range(4):
            s = socket.socket()
            s.bind((f"127.0.0.{address}", 0))
            s.connect((host, int(port)))
            s.sendall(b"GET /metr")
            held.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.wait(2):
            for s in held:
                try:
                    s.send(b"i")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(1)
        start = time.monotonic()
        samples, _ = scrape(url, timeout=25)
        assert time.monotonic() - start < 20
        assert value(samples, "companion_clients") == 0
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
