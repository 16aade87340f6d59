"""Many clients attaching one loaded model at the same instant (a benchmark, not a test).

N client processes start, connect and get ready (one untimed attach first, so that each has its
CUDA context, imported libraries and warm code), then all start at one CLOCK_MONOTONIC instant
(each sleeps until it: no barrier wake-up chain) and each times one attach: the request until
every tensor is usable (Python: ``client.get_model_parameters(model)`` then ``.state_dict()``,
torch tensors made; C++: ``attach_bench --iterations 1``). Prints per-kind p50 / p90 / p99 / max
over the N processes, and per phase: the request (GetParameters round trip: the server's queue
and work) and the rest (import + map of the segments, views; Python: the torch tensors); JSON to
$OUT. ``--profile`` (with one Python client) prints cProfile's top entries of its timed attach.

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


START_DELAY_NS = 200_000_000  # from "all ready" to the common start instant


def sleep_until(t_ns):
    while True:
        left = t_ns - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if left <= 0:
            return
        time.sleep(left / 1e9)


def python_client(ready, go, results, index, runtime_dir, device, model, profile):
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
    ready.put(index)
    go.wait()
    sleep_until(go_at(go))
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    mm = client.get_model_parameters(model)
    mapped = time.perf_counter()
    state = mm.state_dict()
    done = time.perf_counter()
    if profiler is not None:
        import io
        import pstats
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
    results.put((index, {"total_ms": (done - start) * 1e3, "request_ms": (mapped - start) * 1e3,
                         "map_ms": (done - mapped) * 1e3}, len(state)))
    del state, mm
    client.close()


def go_at(go):
    return int(go.target.value)


def percentiles(values):
    values = sorted(values)

    def at(q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    return {"p50": statistics.median(values), "p90": at(0.9), "p99": at(0.99), "max": values[-1],
            "n": len(values)}


class _Go:
    """An event with the start instant (CLOCK_MONOTONIC ns) it carries."""

    def __init__(self, ctx):
        self.event = ctx.Event()
        self.target = ctx.Value("q", 0)

    def wait(self):
        self.event.wait()

    def set_at(self, t_ns):
        self.target.value = t_ns
        self.event.set()


def run_python(args, runtime, model):
    """Phases per process: request_ms is get_model_parameters (request, import, map, table),
    map_ms the torch tensors (state_dict of the mapped model)."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), _Go(ctx)
    procs = [ctx.Process(target=python_client,
                         args=(ready, go, results, i, str(runtime), args.device, str(model),
                               args.profile))
             for i in range(args.clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    go.set_at(time.clock_gettime_ns(time.CLOCK_MONOTONIC) + START_DELAY_NS)
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return [phases for _, phases, _ in out]


def run_cpp(args, runtime, model):
    """attach_bench processes: each connects, then waits for a go line on stdin."""
    env = dict(os.environ)
    procs = [subprocess.Popen([str(ATTACH_BENCH), "--device", args.device, "--runtime-dir",
                               str(runtime), "--model", str(model), "--iterations", "1",
                               "--warmup", "1", "--wait-for-go", "--breakdown"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(args.clients)]
    for p in procs:  # each says "ready" after one untimed attach (CUDA context and all)
        line = p.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"attach_bench did not get ready: {line!r}")
    start = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + START_DELAY_NS
    for p in procs:
        p.stdin.write(f"go {start}\n")
        p.stdin.flush()
    values = []
    for p in procs:  # --breakdown: one line of phases with absolute times per timed attach
        result = json.loads(p.stdout.readline())
        result["late_start_ms"] = (result["start_ns"] - start) / 1e6
        values.append(result)
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
    parser.add_argument("--profile", action="store_true",
                        help="cProfile of each Python client's timed attach, to stderr")
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
            runs = run_python(args, runtime, model) if kind == "python" else \
                run_cpp(args, runtime, model)
            res["kinds"][kind] = {phase: percentiles([r[phase] for r in runs])
                                  for phase in ("total_ms", "request_ms", "map_ms",
                                                "late_start_ms") if phase in runs[0]}
    finally:
        server.stop()
    print(f"\n{args.clients} clients attaching {args.shape} at once, device {args.device} "
          f"({res['backend']}), ms from request to every tensor usable:")
    print("(request: GetParameters round trip [Python: get_model_parameters]; map: import, map,"
          " views [Python: state_dict of the mapping]; late start: how late a process began)")
    print(f"{'client':8} {'phase':12} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for kind, phases in res["kinds"].items():
        for phase, p in phases.items():
            print(f"{kind:8} {phase[:-3]:12} {p['p50']:8.2f} {p['p90']:8.2f} {p['p99']:8.2f} "
                  f"{p['max']:8.2f}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrent_attach_bench.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
