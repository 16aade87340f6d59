"""Two instances on one GPU announced in a real etcd: clients are sent to the instance that holds
the model, and when it is killed they fail over to the other one, while the weights they mapped
from the dead instance stay valid on the GPU (checksums computed by the GPU on the mappings)."""
import signal
import time

import pytest

from checkpoints import tensor_wsums
from harness import Server, SessionClient, wait_until


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_failover_keeps_mapped_weights_on_the_gpu(backend, etcd, runtime_dir, tmp_path,
                                                   gpu_model_root, gpu):
    model = gpu_model_root / "opt-1g"
    expected = {name: wsum for name, (_, _, wsum) in tensor_wsums(model).items()}
    servers = [Server(runtime_dir, [gpu_model_root], device=gpu["uuid"],
                      extra=["--backend", backend, "--registry", etcd.url,
                             "--registry-ttl", "2"]) for _ in range(2)]
    empty = tmp_path / "no-local-records"
    empty.mkdir(mode=0o700)
    clients = []
    try:
        # Clients name the GPU by ordinal; servers by UUID: matched by UUID.
        clients = [SessionClient("--registry", etcd.url, "--runtime-dir", empty, "--device", "0")
                   for _ in range(2)]
        first = [c(f"attach {model}") for c in clients]
        assert all(f["ok"] for f in first), first
        holder = first[0]["instance"]
        assert all(f["instance"] == holder for f in first)
        dead = next(s for s in servers if s.instance == holder)
        alive = next(s for s in servers if s.instance != holder)
        for c in clients:
            assert c("verify")["models"][0]["sums"] == expected

        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        killed = time.monotonic()
        for c in clients:
            kept = c("verify")
            assert kept["ok"] and kept["models"][0]["sums"] == expected, \
                f"{backend}: weights mapped from the killed instance changed"
            t0 = time.monotonic()
            again = c(f"attach {model}")
            print(f"{backend}: failover attach took {1000 * (time.monotonic() - t0):.1f} ms "
                  f"(includes the surviving instance loading the model if it had not)")
            assert again["ok"] and again["instance"] == alive.instance, again
            both = c("verify")
            assert [m["sums"] for m in both["models"]] == [expected, expected]
        assert wait_until(lambda: not any(k.endswith(dead.instance) for k in etcd.records()),
                          timeout=6, interval=0.1)
        print(f"{backend}: the killed instance left etcd "
              f"{time.monotonic() - killed:.2f} s after SIGKILL (TTL 2 s)")
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop()
