"""Which client mappings are read-only, end to end, as docs/architecture.md ("Memory backends and
slab layout") and the README ("Read-only memory") say: a cuda-vmm client's mapping refuses writes
and reports "read_only": true; a legacy cuda-ipc mapping cannot be made read-only, reports
"read_only": false (the attach report, its text line, and the model info of the C ABI and the
Python package), and a write through it reaches every other client. The driver-level reasons
(the access flags cuPointerGetAttribute reports, cuMemSetAccess refusing an IPC mapping) are
checked by cuda_selftest (test_cuda_selftest.py)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

from checkpoints import tensor_wsums
from harness import BUILD

REPO = pathlib.Path(__file__).resolve().parents[2]
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                      BUILD / "src" / "capi" / "libcompanion.so"))

# Maps the model with the Python package (C ABI underneath) and prints its info's "read_only".
PYTHON_ATTACH = textwrap.dedent("""
    import json, sys
    import companion
    client = companion.connect(device=0, runtime_dir=sys.argv[2])
    model = client.get_model_parameters(companion.ModelSpec(sys.argv[1]))
    print(json.dumps({"read_only": model.info["read_only"], "backend": model.status.backend}))
""")


def test_clients_report_the_mapping_access(gpu_server, gpu_model_root):
    s = gpu_server
    model = gpu_model_root / "opt-1g"
    read_only = s.backend == "cuda-vmm"
    report = json.loads(s.cli("attach", str(model), "--json", timeout=300).stdout)
    assert report["model"]["backend"] == s.backend
    assert report["read_only"] is read_only

    text = s.cli("attach", str(model), timeout=300).stdout
    assert ("mapped read-only" in text) is read_only, text
    assert ("mapped read-write" in text) is not read_only, text

    env = dict(os.environ, COMPANION_LIBRARY=str(LIBRARY), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", PYTHON_ATTACH, str(model), str(s.runtime_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"read_only": read_only,
                                                       "backend": s.backend}


def test_a_write_reaches_other_clients_only_on_cuda_ipc(gpu_server, gpu_model_root):
    s = gpu_server
    model = gpu_model_root / "opt-1g"
    # A reader verifies its mapping, holds it while a second client tries to write one word of
    # the first tensor, then verifies again.
    reader = subprocess.Popen(s.command("attach", str(model), "--json", "--verify", "--hold", "20",
                                        "--reverify"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(reader.stdout.readline())
        assert {t["name"]: (t["dtype"], t["shape"], t["wsum64"]) for t in first["tensors"]} == \
            tensor_wsums(model)
        writer = json.loads(s.cli("attach", str(model), "--json", "--try-write",
                                  timeout=300).stdout)
        second = json.loads(reader.stdout.readline())
        reader.wait(timeout=60)
    finally:
        reader.kill()
        reader.wait()
    if s.backend == "cuda-vmm":
        assert writer["write_refused"] is True
        assert second == {"reverified": True}, reader.stderr.read()
    else:
        # cuIpcOpenMemHandle maps read-write and nothing can restrict it: the write lands in the
        # one copy every client shares.
        assert writer["write_refused"] is False
        assert second == {"reverified": False}
