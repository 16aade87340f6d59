"""Many clients attaching one loaded model at the same instant (a benchmark, not a test).

N client processes start, connect and get ready (one untimed attach first, so that each has its
CUDA context, imported libraries and warm code), wait on one start barrier, then each times one
attach: the request until every tensor
is usable (Python: ``client.state_dict(model)``, torch tensors made; C++: ``attach_bench
--iterations 1``). Prints per-kind p50 / p90 / p99 / max over the N processes; JSON to $OUT.

    python3 bench/concurrent_attach_bench.py --device 0 --clients 64 [--shape llama-3-8b]
    python3 bench/concurrent_attach_bench.py --device host --clients 16 --shape opt-125m
"""
import argparse
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "python"))
from checkpoints import write_opt_like  # noqa: E402
from harness import BUILD, Server  # noqa: E402

ATTACH_BENCH = BUILD / "bench" / "attach_bench"


def python_client(barrier, results, index, runtime_dir, device, model):
    os.environ.setdefault("COMPANION_LIBRARY", str(BUILD / "src" / "capi" / "libcompanion.so"))
    import companion
    import torch

    if device != "host":
        torch.cuda.init()
        torch.empty(1, device=f"cuda:{device}")  # the CUDA context, before the clock starts
    client = companion.connect(device=device if device == "host" else int(device),
                               runtime_dir=runtime_dir)
    warm = client.state_dict(model)  # one attach first: the driver's and the package's state
    del warm
    barrier.wait()
    start = time.perf_counter()
    state = client.state_dict(model)
    elapsed = time.perf_counter() - start
    results.put((index, elapsed * 1e3, len(state)))
    del state
    client.close()


def percentiles(values):
    values = sorted(values)

    def at(q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    return {"p50": statistics.median(values), "p90": at(0.9), "p99": at(0.99), "max": values[-1],
            "n": len(values)}


def run_python(args, runtime, model):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.clients)
    results = ctx.Queue()
    procs = [ctx.Process(target=python_client,
                         args=(barrier, results, i, str(runtime), args.device, str(model)))
             for i in range(args.clients)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return [ms for _, ms, _ in out]


def run_cpp(args, runtime, model):
    """attach_bench processes: each connects, then waits for a go line on stdin."""
    env = dict(os.environ)
    procs = [subprocess.Popen([str(ATTACH_BENCH), "--device", args.device, "--runtime-dir",
                               str(runtime), "--model", str(model), "--iterations", "1",
                               "--warmup", "1", "--wait-for-go"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(args.clients)]
    for p in procs:  # each says "ready" after one untimed attach (CUDA context and all)
        line = p.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"attach_bench did not get ready: {line!r}")
    for p in procs:
        p.stdin.write("go\n")
    for p in procs:
        p.stdin.flush()
    values = []
    for p in procs:
        result = json.loads(p.stdout.readline())
        values.append(result["p50_ms"])
        p.wait()
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="0", help="GPU ordinal, or host")
    parser.add_argument("--backend", default="cuda-vmm")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--shape", default="llama-3-8b", choices=["opt-125m", "llama-3-8b"])
    parser.add_argument("--kinds", default="cpp,python")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="companion-concurrent-"))
    model = work / "models" / args.shape
    if not model.exists():
        if args.shape == "llama-3-8b":
            from run_attach_bench import write_llama3_8b_like
            write_llama3_8b_like(model)
        else:
            write_opt_like(model, dtype="float16")
    runtime = work / "runtime"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    extra = [] if args.device == "host" else ["--backend", args.backend]
    server = Server(runtime, [work / "models"], device=args.device,
                    extra=extra + ["--max-connections-per-uid", str(max(256, 4 * args.clients))])
    try:
        server.cli("load", str(model), timeout=900)
        res = {"device": args.device, "backend": args.backend if args.device != "host" else "host",
               "clients": args.clients, "shape": args.shape, "kinds": {}}
        for kind in args.kinds.split(","):
            values = run_python(args, runtime, model) if kind == "python" else \
                run_cpp(args, runtime, model)
            res["kinds"][kind] = percentiles(values)
    finally:
        server.stop()
    print(f"\n{args.clients} clients attaching {args.shape} at once, device {args.device} "
          f"({res['backend']}), ms from request to every tensor usable:")
    print(f"{'client':8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for kind, p in res["kinds"].items():
        print(f"{kind:8} {p['p50']:8.2f} {p['p90']:8.2f} {p['p99']:8.2f} {p['max']:8.2f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrent_attach_bench.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
