"""The Python client over the etcd registry: instances, model-aware choice, and failover with
mapped weights that stay valid after their server died."""
import signal
import zlib

import pytest

import companion
from harness import Server, wait_until


@pytest.fixture
def two_servers(runtime_dir, model_root, etcd):
    servers = [Server(runtime_dir, [model_root], extra=["--registry", etcd.url,
                                                         "--registry-ttl", "2"])
               for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def crcs(model):
    return {name: zlib.crc32(t.numpy().tobytes()) for name, t in model.items()}


def test_instances_choice_and_failover(two_servers, etcd, tmp_path, model_root):
    empty = tmp_path / "no-local-records"
    empty.mkdir(mode=0o700)
    source = str(model_root / "opt-f32")
    with companion.connect(registry=etcd.url, runtime_dir=empty) as client:
        ids = {s.instance for s in two_servers}
        assert {i["instance_id"] for i in client.instances()} == ids
        first = client.get_model_parameters(source)
        holder = client.server_info()["instance_id"]
        expected = crcs(first)
        # Model-aware: later requests go where the model is.
        for _ in range(3):
            client.get_model_parameters(source).release()
            assert client.server_info()["instance_id"] == holder
        dead = next(s for s in two_servers if s.instance == holder)
        alive = next(s for s in two_servers if s.instance != holder)

        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        assert crcs(first) == expected, "mapped weights outlive their server"
        second = client.get_model_parameters(source)
        assert client.server_info()["instance_id"] == alive.instance
        assert crcs(second) == expected
        assert client.health()["server"]["instance_id"] == alive.instance
        assert wait_until(lambda: [i["instance_id"] for i in client.instances()]
                          == [alive.instance], timeout=5)
        first.release()
        second.release()


def test_instance_id_and_registry_options(two_servers, etcd, tmp_path):
    a, b = two_servers
    with companion.connect(registry=etcd.url, instance_id=b.instance,
                           runtime_dir=tmp_path) as client:
        assert client.server_info()["instance_id"] == b.instance
        assert [i["instance_id"] for i in client.instances()] == [b.instance]
        health = client.health()
        assert health["registry"] == etcd.url and health["registered"] is True
    with pytest.raises(companion.Unavailable):
        companion.connect(registry=etcd.url, instance_id="0000000000000000", runtime_dir=tmp_path)
    with pytest.raises(companion.InvalidArgument, match="etcd://"):
        companion.connect(registry="redis://x:1")
