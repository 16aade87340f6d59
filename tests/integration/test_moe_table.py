"""MoE-scale tensor tables (protocol 1.2): a 100,000-tensor model attaches through the C++ client
(the CLI), the C ABI (the Python package) and a publication, each reading the table the server
sealed into one memfd; a client of protocol 1.1 still gets the tensors inline, and a clear error
beyond the inline limit."""
import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest

from harness import COMPANION, FAULT_CLIENT, PYTHON_LIBRARY, REPO, Server

sys.path.insert(0, str(REPO / "bench"))
from moe_checkpoint import moe_shapes, write_moe_checkpoint, write_safetensors  # noqa: E402



def expected_crcs(directory):
    """name -> CRC-32 of the tensor's bytes, read from every safetensors file in directory."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            out[name] = zlib.crc32(data[8 + n + begin:8 + n + end])
    return out


@pytest.fixture(scope="module")
def moe_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    write_moe_checkpoint(root / "moe-100k", 100_000)
    # Just past the inline limit (200,000): in three files with an index.
    write_moe_checkpoint(root / "moe-200k", 200_001, per_file=100_001)
    return root


@pytest.fixture
def moe_server(runtime_dir, moe_root):
    s = Server(runtime_dir, [moe_root])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def attach_json(server, model, *extra):
    r = subprocess.run([str(COMPANION), "attach", str(model), "--namespace", server.namespace,
                        "--runtime-dir", str(server.runtime_dir), "--json", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_100k_tensor_model_attaches_in_cpp_with_every_tensor_right(moe_server, moe_root):
    model = moe_root / "moe-100k"
    moe_server.cli("load", str(model), timeout=300)
    out = attach_json(moe_server, model, "--verify")
    assert len(out["tensors"]) == 100_000
    expected = expected_crcs(model)
    shapes = moe_shapes(100_000)
    for t in out["tensors"]:
        assert t["crc32"] == expected[t["name"]], t["name"]
        assert tuple(t["shape"]) == shapes[t["name"]]
    assert [t["name"] for t in out["tensors"]] == list(shapes)  # the checkpoint's order


PYTHON_READER = textwrap.dedent("""
    import json, sys, zlib
    import numpy
    import companion
    client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
    model = client.get_model_parameters(companion.ModelSpec(sys.argv[3]))
    tensors = model.tensors()
    names = list(tensors)
    picks = [names[0], names[len(names) // 2], names[-1]]
    print(json.dumps({"count": len(names),
                      "picked": {n: zlib.crc32(tensors[n].numpy(view_dtype=numpy.uint16).tobytes()) for n in picks},
                      "shape": list(tensors[names[-1]].shape)}))
""")


def test_a_100k_tensor_model_attaches_through_the_c_abi(moe_server, moe_root):
    model = moe_root / "moe-100k"
    moe_server.cli("load", str(model), timeout=300)
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), COMPANION_LIBRARY=str(PYTHON_LIBRARY))
    r = subprocess.run([sys.executable, "-c", PYTHON_READER, moe_server.namespace,
                        str(moe_server.runtime_dir), str(model)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = expected_crcs(model)
    assert out["count"] == 100_000
    assert out["shape"] == [8, 64]
    for name, crc in out["picked"].items():
        assert crc == expected[name], name


def test_past_the_inline_limit_new_clients_attach_and_old_ones_are_told_why(moe_server,
                                                                            moe_root):
    model = moe_root / "moe-200k"
    moe_server.cli("load", str(model), timeout=300)
    out = attach_json(moe_server, model)
    assert len(out["tensors"]) == 200_001
    r = subprocess.run([str(FAULT_CLIENT), "--socket", moe_server.socket, "--mode", "old-minor",
                        "--model", str(model), "--timeout", "60"],
                       capture_output=True, text=True, timeout=120)
    old = json.loads(r.stdout)
    assert old["answer"] == "error" and old["code"] == "LIMIT_EXCEEDED", old
    assert "200001 tensors" in old["message"] and "protocol 1.1" in old["message"], old
    assert "200000" in old["message"]


def test_a_client_of_protocol_1_1_still_gets_the_tensors_inline(moe_server, moe_root, tmp_path):
    model = moe_root / "small"
    if not model.exists():
        write_safetensors(model / "model.safetensors", moe_shapes(1000))
    moe_server.cli("load", str(model))
    r = subprocess.run([str(FAULT_CLIENT), "--socket", moe_server.socket, "--mode", "old-minor",
                        "--model", str(model)], capture_output=True, text=True, timeout=60)
    old = json.loads(r.stdout)
    assert old["answer"] == "Parameters", old
    assert old["tensors"] == 1000 and old["table_fd_index"] == -1
    assert old["last"] == list(moe_shapes(1000))[-1]
    assert old["fds"] == 1  # the one segment, no table
    # A client of 1.2 gets the segment and the table.
    assert len(attach_json(moe_server, model)["tensors"]) == 1000


PUBLISHER = textwrap.dedent("""
    import sys, zlib
    import numpy as np
    import companion
    client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
    count = int(sys.argv[4])
    tensors = {f"experts.{i}.w": np.full((4, 8), i % 251, dtype=np.uint8) for i in range(count)}
    model = client.publish(sys.argv[3], tensors)
    view = model.tensors()
    assert len(view) == count
    assert view[f"experts.{count - 1}.w"].numpy()[0, 0] == (count - 1) % 251
    print("committed", model.status.generation, flush=True)
""")


def test_a_publication_of_many_tensors_uses_the_table(moe_server):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), COMPANION_LIBRARY=str(PYTHON_LIBRARY))
    r = subprocess.run([sys.executable, "-c", PUBLISHER, moe_server.namespace,
                        str(moe_server.runtime_dir), "engine/experts", "20000"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["committed", "1"]
    out = attach_json(moe_server, "engine/experts", "--published", "--verify")
    assert len(out["tensors"]) == 20_000
    crcs = {t["name"]: t["crc32"] for t in out["tensors"]}
    for i in (0, 250, 19_999):
        assert crcs[f"experts.{i}.w"] == zlib.crc32(bytes([i % 251]) * 32)
