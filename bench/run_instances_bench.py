"""What choosing among several instances costs an attach: the same OPT-125m-shaped model (196
tensors) attached 200 times from a client pinned to the instance that holds it (one candidate,
no probes) and from a client that chooses among two instances (a model-aware probe of each per
request), through the local registry and through etcd. Prints a table; JSON to $OUT (or --out).

  python3 bench/run_instances_bench.py [--device host|0] [--backend cuda-vmm]
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from checkpoints import write_opt_like  # noqa: E402
from harness import BUILD, ETCD, Etcd, Server  # noqa: E402

ATTACH_BENCH = BUILD / "bench" / "attach_bench"


def attach(model, runtime_dir, device, iterations, *extra):
    r = subprocess.run([str(ATTACH_BENCH), "--model", str(model), "--device", device,
                        "--runtime-dir", str(runtime_dir), "--iterations", str(iterations),
                        *extra], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.splitlines()[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="host")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="companion-instances-bench."))
    model = write_opt_like(work / "models" / "opt-125m", dtype="float16")
    runtime = work / "runtime"
    runtime.mkdir(mode=0o700)
    etcd = Etcd(work / "etcd") if os.access(ETCD, os.X_OK) else None
    extra = ["--backend", args.backend] if args.backend else []
    if etcd:
        extra += ["--registry", etcd.url]
    servers = [Server(runtime, [work / "models"], device=args.device, extra=extra)
               for _ in range(2)]
    rows = []
    try:
        holder = servers[0]
        holder.cli("load", str(model), timeout=300)
        cases = [("1 candidate (pinned, local registry)", ["--instance", holder.instance]),
                 ("2 candidates (model-aware, local registry)", ["--registry", "local"])]
        if etcd:
            cases.append(("2 candidates (model-aware, etcd)", ["--registry", etcd.url]))
        for name, flags in cases:
            r = attach(model, runtime, args.device, args.iterations, *flags)
            r["case"] = name
            rows.append(r)
    finally:
        for s in servers:
            s.stop()
        if etcd:
            etcd.stop(signal.SIGKILL)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "instances_bench.json").write_text(json.dumps(rows, indent=2))
    print(f"| device {args.device} | candidates seen | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} ({r['backend']}, {r['tensors']} tensors) | {r['instances']} | "
              f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")


if __name__ == "__main__":
    main()
