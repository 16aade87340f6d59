"""What one client can make the store hold, and what `ls` shows: load floods are bounded, loads
are admitted against the memory there is, keys fit the wire, and output stays valid whatever the
names in paths, tags and checkpoint headers."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from harness import PYTHON_LIBRARY, Server

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python"))
os.environ.setdefault("COMPANION_LIBRARY", str(PYTHON_LIBRARY))
import companion  # noqa: E402
from companion import errors  # noqa: E402

# The sparse checkpoint's tensors: 4 x 25 GB by default, far past this machine's memory (a
# smaller size can be set to check an old build inside a memory-limited cgroup).
SPARSE_TENSOR_BYTES = int(os.environ.get("COMPANION_TEST_SPARSE_TENSOR_BYTES", 25 * 10**9))


def write_tiny(directory, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((16, 16)).astype(np.float32)},
              str(directory / "model.safetensors"))
    return directory


def write_raw_safetensors(path, header_json_bytes, data_bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_json_bytes)) + header_json_bytes)
        f.truncate(8 + len(header_json_bytes) + data_bytes)  # sparse: no disk used


@pytest.fixture(scope="module")
def store_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-models")
    write_tiny(root / "tiny")
    write_tiny(root / "other", seed=1)
    (root / "bad").mkdir()
    (root / "bad" / "model.safetensors").write_bytes(b"garbage")
    # 4 tensors of SPARSE_TENSOR_BYTES each; the file is a hole.
    header = {f"t{i}": {"dtype": "U8", "shape": [SPARSE_TENSOR_BYTES],
                        "data_offsets": [i * SPARSE_TENSOR_BYTES, (i + 1) * SPARSE_TENSOR_BYTES]}
              for i in range(4)}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    write_raw_safetensors(root / "sparse" / "model.safetensors", raw, 4 * SPARSE_TENSOR_BYTES)
    # A tensor name with a terminal escape (JSON-escaped) and a byte that is not UTF-8: the load
    # fails with the header's bytes in its message.
    bad_name = b'{"\\u001b]0;pwned\\u0007\\u001b[2J\xff\xfename":{"dtype":"Q7","shape":[2],' \
               b'"data_offsets":[0,2]}}'
    write_raw_safetensors(root / "escape-tensor" / "model.safetensors", bad_name, 2)
    # A directory whose name clears the screen when printed raw.
    esc_dir = pathlib.Path(os.fsdecode(bytes(root) + b"/esc\x1b[2J\x1b]0;title\x07dir"))
    write_tiny(esc_dir, seed=2)
    return root, esc_dir


@pytest.fixture
def serve(runtime_dir, store_models):
    servers = []

    def start(*extra):
        s = Server(runtime_dir, [store_models[0]], extra=list(extra))
        servers.append(s)
        return s

    yield start
    for s in servers:
        code = s.stop()
        assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def client_of(server):
    return companion.connect(socket_path=server.socket)


def run_bytes(server, *args):
    """A client command; stdout and stderr as bytes (they may be anything the server sent)."""
    r = subprocess.run(server.command(*args), capture_output=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def ls_json(server):
    code, out, err = run_bytes(server, "ls", "--json")
    assert code == 0, (out, err)
    return json.loads(out.decode("utf-8"))  # strict: must be valid UTF-8 JSON


def assert_printable(data):
    assert b"\x1b" not in data and b"\x07" not in data, data
    data.decode("utf-8")  # valid UTF-8


def test_tag_flood_is_bounded_by_variants_per_source(serve, store_models):
    root = store_models[0]
    server = serve("--max-variants-per-source", "8")
    accepted, refused = 0, 0
    with client_of(server) as client:
        for i in range(300):
            try:
                client.load(companion.ModelSpec(str(root / "tiny"), tag=f"flood-{i}"),
                            wait=False)
                accepted += 1
            except errors.LimitExceeded as e:
                assert "--max-variants-per-source 8" in str(e)
                refused += 1
        assert (accepted, refused) == (8, 292)
        # Other sources still load; ls works for everyone throughout.
        assert client.load(companion.ModelSpec(str(root / "other")), timeout=30).loaded
    listed = ls_json(server)
    assert len(listed) == 9
    assert server.rss_kb() < 500 * 1024


def test_model_count_is_bounded(serve, store_models):
    root = store_models[0]
    server = serve("--max-models", "2")
    with client_of(server) as client:
        client.load(companion.ModelSpec(str(root / "tiny")), timeout=30)
        client.load(companion.ModelSpec(str(root / "other")), timeout=30)
        with pytest.raises(errors.LimitExceeded, match="--max-models 2"):
            client.load(companion.ModelSpec(str(root / "tiny"), tag="third"), timeout=30)
        # Asking for the tensors (which loads first) is refused the same way, at once.
        with pytest.raises(errors.LimitExceeded, match="--max-models 2"):
            client.get_model_parameters(companion.ModelSpec(str(root / "tiny"), tag="third"))
        # Models already held are still served.
        with client.get_model_parameters(companion.ModelSpec(str(root / "tiny"))) as model:
            assert len(model) == 1
    code, out, _ = run_bytes(server, "load", str(root / "tiny"), "--tag", "fourth", "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "LIMIT_EXCEEDED"
    assert len(ls_json(server)) == 2


def test_error_flood_expires_and_is_bounded(serve, store_models):
    root = store_models[0]
    server = serve("--error-ttl", "1", "--max-error-entries", "32")
    with client_of(server) as client:
        for i in range(300):
            try:
                client.load(companion.ModelSpec(str(root / "bad"), tag=f"err-{i}"), wait=False)
            except errors.LimitExceeded:
                pass  # while 64 of them still wait to fail (--max-variants-per-source)
        # Every load of the flood has failed by now (or soon): at most 32 are kept meanwhile.
        deadline = time.monotonic() + 30
        listed = ls_json(server)
        while any(m["state"] == "loading" for m in listed) and time.monotonic() < deadline:
            time.sleep(0.1)
            listed = ls_json(server)
        assert len(listed) <= 32, len(listed)
        assert all(m["state"] == "error" for m in listed)
        # After the TTL nothing of the flood is listed.
        deadline = time.monotonic() + 15
        while ls_json(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ls_json(server) == []
        # The server still loads good models.
        assert client.load(companion.ModelSpec(str(root / "tiny")), timeout=30).loaded


def test_sparse_100gb_checkpoint_is_refused_and_the_server_keeps_serving(serve, store_models):
    root = store_models[0]
    server = serve()
    code, out, err = run_bytes(server, "load", str(root / "sparse"), "--json")
    assert code == 1, (out, err)
    error = json.loads(out)["error"]
    assert error["code"] == "OUT_OF_MEMORY", error
    assert "needs" in error["message"] and "available" in error["message"], error
    health, code = server.cli_json("health")
    assert code == 0 and health["state"] == "serving"
    assert health["slab_bytes"] == 0
    with client_of(server) as client:
        assert client.load(companion.ModelSpec(str(root / "tiny")), timeout=30).loaded
    listed = {m["source"]: m for m in ls_json(server)}
    assert listed[str(root / "sparse")]["error"]["code"] == "OUT_OF_MEMORY"
    assert server.rss_kb() < 500 * 1024


def test_keys_past_the_wire_limit_are_refused(serve, store_models):
    root = store_models[0]
    server = serve()
    # Shard rules escape ('%' -> "%25") to three times their size inside the key.
    code, out, _ = run_bytes(server, "load", str(root / "tiny"), "--tp-size", "2",
                             "--shard-rules", "%" * 3000 + "=column", "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "INVALID_ARGUMENT", out
    code, out, _ = run_bytes(server, "load", str(root / "tiny"), "--tag", "t" * 9000, "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "INVALID_ARGUMENT", out
    assert ls_json(server) == []
    code, out, err = run_bytes(server, "ls")
    assert code == 0, err


def test_invalid_utf8_tag_is_refused(serve, store_models):
    root = store_models[0]
    server = serve()
    cmd = server.command("load", str(root / "tiny"), "--json")
    cmd += [b"--tag", b"bad\xff\xfetag"]
    r = subprocess.run(cmd, capture_output=True, timeout=60)
    assert r.returncode == 1, r
    error = json.loads(r.stdout)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "UTF-8" in error["message"], error
    assert ls_json(server) == []


def test_escapes_and_invalid_utf8_from_files_print_safely(serve, store_models):
    root, esc_dir = store_models
    server = serve()
    code, out, err = run_bytes(server, "load", str(root / "escape-tensor"))
    assert code == 1
    assert_printable(err)
    code, out, err = run_bytes(server, "load", os.fsencode(esc_dir).decode("utf-8"))
    assert code == 0, err
    assert_printable(out)

    code, out, err = run_bytes(server, "ls")
    assert code == 0, err
    assert_printable(out)
    assert b"\\x1b[2J" in out  # shown, escaped
    listed = ls_json(server)
    assert len(listed) == 2
    failed = [m for m in listed if m["state"] == "error"][0]
    assert "\ufffd" in failed["error"]["message"]  # the byte that is not UTF-8, replaced
    assert "pwned" in failed["error"]["message"]
    with client_of(server) as client:  # the C ABI's JSON, through the Python package
        assert len(client.list()) == 2
    code, out, err = run_bytes(server, "status", os.fsencode(esc_dir).decode("utf-8"))
    assert code == 0, err
    assert_printable(out)
    # The server's own log names those paths too: escaped, one line per message.
    log = pathlib.Path(server.log_path).read_bytes()
    assert b"\x1b" not in log and b"\\x1b[2J" in log, log[-2000:]


def test_stuck_load_does_not_block_unload_or_shutdown(runtime_dir, tmp_path):
    # A FIFO as the index: opening it blocks until a writer comes, which none does. (Where the
    # checkpoint's files are refused unless regular, the load fails at once instead; unload and
    # shutdown must be prompt either way.)
    root = tmp_path / "models"
    stuck = root / "stuck"
    stuck.mkdir(parents=True)
    os.mkfifo(stuck / "model.safetensors.index.json")
    write_tiny(root / "tiny")
    server = Server(runtime_dir, [root], extra=["--load-threads", "1", "--shutdown-timeout", "1"])
    try:
        with client_of(server) as client:
            client.load(companion.ModelSpec(str(stuck)), wait=False)
            time.sleep(0.3)  # let the worker reach the open (a fast refusal is fine too)
            start = time.monotonic()
            code, out, err = run_bytes(server, "unload", str(stuck), "--force", "--json")
            assert time.monotonic() - start < 5, (out, err)
            assert code in (0, 1), (out, err)  # unloaded, or already failed and gone
    finally:
        start = time.monotonic()
        server.proc.send_signal(15)
        try:
            code = server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            code = "hung"
        elapsed = time.monotonic() - start
    assert code == 0, f"server exit {code} after {elapsed:.1f} s:\n{server.log_text()}"
    assert elapsed < 8
