"""Bad requests get typed errors; the server keeps serving everyone else."""
import json
import os
import struct
import subprocess

import pytest

from checkpoints import write_opt_like
from harness import COMPANION, FAULT_CLIENT


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    good = write_opt_like(root / "good", hidden=32, layers=1, vocab=64, positions=8)
    data = (good / "model.safetensors").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
    header = json.dumps({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (root / "unknown-dtype").mkdir()
    (root / "unknown-dtype" / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\0\0")
    (root / "not-json").mkdir()
    (root / "not-json" / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"hello")
    (root / "empty").mkdir()
    return root


def error_of(server, *args):
    out, code = server.cli_json(*args, check=False)
    assert code == 1, out
    return out["error"]["code"], out["error"]["message"]


def assert_still_serving(server, model_root):
    health, code = server.cli_json("health")
    assert code == 0 and health["state"] == "serving"
    r = subprocess.run([str(COMPANION), "attach", str(model_root / "opt-small"), "--namespace",
                        server.namespace, "--runtime-dir", str(server.runtime_dir), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def picky_server(runtime_dir, model_root, bad_models):
    from harness import Server
    s = Server(runtime_dir, [model_root, bad_models])
    yield s
    assert s.stop() == 0, s.log_text()


def test_typed_errors(picky_server, model_root, bad_models, tmp_path):
    s = picky_server
    assert error_of(s, "load", str(bad_models / "missing"))[0] == "NOT_FOUND"
    assert error_of(s, "load", str(bad_models / "empty"))[0] == "NOT_FOUND"
    code, msg = error_of(s, "load", str(bad_models / "truncated"))
    assert code == "BAD_CHECKPOINT", msg
    code, msg = error_of(s, "load", str(bad_models / "unknown-dtype"))
    assert code == "UNKNOWN_DTYPE" and "Q7" in msg
    assert error_of(s, "load", str(bad_models / "not-json"))[0] == "BAD_CHECKPOINT"
    outside = write_opt_like(tmp_path / "elsewhere", hidden=8, layers=1, vocab=8, positions=4)
    assert error_of(s, "load", str(outside))[0] == "NOT_PERMITTED"
    # A symlink inside a root that leads outside is outside.
    os.symlink(outside, bad_models / "sneaky")
    try:
        assert error_of(s, "load", str(bad_models / "sneaky"))[0] == "NOT_PERMITTED"
    finally:
        os.unlink(bad_models / "sneaky")
    assert error_of(s, "load", str(model_root / "opt-small"), "--dtype", "int8")[0] == \
        "UNKNOWN_DTYPE"
    assert error_of(s, "load", str(model_root / "opt-small"), "--dtype", "fp13")[0] == \
        "UNKNOWN_DTYPE"
    assert error_of(s, "unload", "0123456789ab")[0] == "NOT_FOUND"
    # The errored models are listed with their errors; the server still serves.
    states = {m["source"]: m for m in s.cli_json("ls")[0]}
    assert states[str(bad_models / "truncated")]["state"] == "error"
    assert_still_serving(s, model_root)


@pytest.mark.parametrize("mode,expected", [
    ("garbage", "PROTOCOL_ERROR"),
    ("bad-magic", "PROTOCOL_ERROR"),
    ("bad-flags", "PROTOCOL_ERROR"),
    ("oversized", "PROTOCOL_ERROR"),
    ("truncated", None),
    ("no-hello", "PROTOCOL_ERROR"),
    ("bad-version", "VERSION_MISMATCH"),
    ("malformed-body", "PROTOCOL_ERROR"),
    ("with-fds", "PROTOCOL_ERROR"),
])
def test_malformed_input_never_hurts_the_server(server, model_root, mode, expected):
    r = subprocess.run([str(FAULT_CLIENT), "--socket", server.socket, "--mode", mode],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if expected:
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        assert expected in json.dumps(answer), answer
    assert_still_serving(server, model_root)


@pytest.mark.parametrize("mode", ["die-mid-request", "die-holding-lease"])
def test_client_killed_mid_request(server, model_root, mode):
    from harness import wait_until
    r = subprocess.run([str(FAULT_CLIENT), "--socket", server.socket, "--mode", mode, "--model",
                        str(model_root / "opt-small")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert_still_serving(server, model_root)
    assert wait_until(lambda: server.cli_json("health")[0]["leases"] == 0)


def test_slow_reader_does_not_block_others(server, model_root):
    p = subprocess.Popen([str(FAULT_CLIENT), "--socket", server.socket, "--mode", "slow-reader",
                          "--seconds", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(3):
            assert_still_serving(server, model_root)
    finally:
        p.kill()
        p.wait()
