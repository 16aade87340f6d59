"""An inference-engine stand-in for the failover demo: it maps a model from whichever Companion
instance holds it, then keeps asking for it (as a restarted worker would) and re-reads the
weights it mapped first. When the instance that served it dies, the next request fails over to
another live instance, and the first mapping still reads the same bytes.

  failover_engine.py --registry etcd://127.0.0.1:2379 --model DIR [--device host] [--rounds N]
"""
import argparse
import sys
import time
import zlib

import companion


def checksum(model):
    """CRC-32 over every tensor's bytes (host), or a float64 sum computed by torch (GPU)."""
    tensors = [model[name] for name in sorted(model)]
    if all(t.device == "cpu" for t in tensors):
        crc = 0
        for t in tensors:
            crc = zlib.crc32(t.numpy().tobytes(), crc)
        return f"crc32 {crc:08x}"
    return f"sum {sum(float(t.torch().double().sum()) for t in tensors):.6e}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="host")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--interval", type=float, default=0.5)
    a = p.parse_args()

    client = companion.connect(device=a.device, registry=a.registry, discovery_timeout=10)
    ids = [i["instance_id"] for i in client.instances()]
    print(f"engine: live instances {', '.join(ids)}", flush=True)
    first = client.get_model_parameters(a.model)
    served = client.server_info()
    reference = checksum(first)
    print(f"engine: mapped {len(first)} tensors from instance {served['instance_id']} "
          f"(pid {served['pid']}): {reference}", flush=True)
    failures = 0
    for n in range(1, a.rounds + 1):
        time.sleep(a.interval)
        t0 = time.perf_counter()
        again = client.get_model_parameters(a.model)
        ms = (time.perf_counter() - t0) * 1000
        info = client.server_info()
        now_first, now_again = checksum(first), checksum(again)
        ok = now_first == reference and now_again == reference
        failures += not ok
        print(f"engine: round {n:2d}: served by {info['instance_id']} (pid {info['pid']}) "
              f"in {ms:6.1f} ms; first mapping {now_first}, new one {now_again} "
              f"{'ok' if ok else 'MISMATCH'}", flush=True)
        again.release()
    first.release()
    client.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
