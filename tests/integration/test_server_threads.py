"""The event loop never waits on the filesystem: a request whose spec resolves slowly (a stalled
mount, stood in for by the test builds' COMPANION_TEST_SLOW_RESOLVE hook) holds up only its own
connection; other clients are answered at once."""
import os
import subprocess
import time

from checkpoints import write_opt_like
from harness import Server

STALL_S = 4.0


def test_a_stalled_resolve_does_not_hold_up_other_clients(runtime_dir, tmp_path):
    root = tmp_path / "models"
    write_opt_like(root / "fast", hidden=64, layers=1, vocab=256, dtype="float32")
    write_opt_like(root / "slow-mount-model", hidden=64, layers=1, vocab=256, dtype="float32")
    env = dict(os.environ, COMPANION_TEST_SLOW_RESOLVE=f"slow-mount-model:{int(STALL_S * 1000)}")
    server = Server(runtime_dir, [root], env=env)
    try:
        server.cli("load", str(root / "fast"))  # loaded before the stall begins
        stalled = subprocess.Popen(server.command("load", str(root / "slow-mount-model")),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # its request is at the server, resolving
        assert stalled.poll() is None
        for args in (("health",), ("attach", str(root / "fast")), ("ls",)):
            start = time.monotonic()
            server.cli(*args, timeout=30)
            took = time.monotonic() - start
            assert took < STALL_S / 2, f"{args} took {took:.2f} s behind a stalled resolve"
        assert stalled.poll() is None, "the stall ended early: the test proves nothing"
        out, err = stalled.communicate(timeout=60)
        assert stalled.returncode == 0, err
        listed = {m["source"] for m in server.cli_json("ls")[0]}
        assert str(root / "slow-mount-model") in listed and str(root / "fast") in listed, listed
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
