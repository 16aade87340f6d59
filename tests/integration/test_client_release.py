"""A release never waits behind another thread's load on the same client: in one Python process,
thread A asks for a model whose load the server holds (a fault point pauses it), and the main
thread drops a model it holds and lists, through the same pooled connection."""
import json
import os
import subprocess
import sys
import textwrap

from checkpoints import write_opt_like
from harness import PYTHON_LIBRARY, REPO, Server

SCRIPT = textwrap.dedent("""
    import gc, json, sys, threading, time
    import companion
    client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
    held = client.get_model_parameters(companion.ModelSpec(sys.argv[3]))
    def wait_for_paused_load():
        try:
            client.get_model_parameters(companion.ModelSpec(sys.argv[4]), timeout=20)
        except Exception:
            pass
    a = threading.Thread(target=wait_for_paused_load, daemon=True)
    a.start()
    time.sleep(1.0)  # A waits for its reply (and reads for the connection)
    start = time.monotonic()
    del held
    gc.collect()
    released = time.monotonic() - start
    print(json.dumps({"release_s": released, "a_waiting": a.is_alive()}), flush=True)
    import os
    os._exit(0)
""")


def test_release_does_not_wait_behind_a_paused_load(runtime_dir, tmp_path):
    root = tmp_path / "models"
    write_opt_like(root / "opt-held", hidden=64, layers=2, vocab=256, positions=16, seed=1)
    write_opt_like(root / "opt-paused", hidden=64, layers=2, vocab=256, positions=16, seed=2)
    env = {**os.environ, "COMPANION_TEST_FAULT": "pause-at=read,path=opt-paused"}
    server = Server(runtime_dir, [root], env=env)
    try:
        client_env = dict(os.environ, PYTHONPATH=str(REPO / "python"),
                          COMPANION_LIBRARY=str(PYTHON_LIBRARY))
        r = subprocess.run([sys.executable, "-c", SCRIPT, server.namespace,
                            str(server.runtime_dir), str(root / "opt-held"),
                            str(root / "opt-paused")],
                           capture_output=True, text=True, env=client_env, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["a_waiting"], out  # the load was still paused while the model was released
        assert out["release_s"] < 1.0, out
        # The lease is gone on the server.
        listed = {m["source"]: m for m in server.cli_json("ls")[0]}
        assert listed[str(root / "opt-held")]["leases"] == 0, listed
    finally:
        server.stop()
