"""Python attach benchmark: what a Python user waits for to get a model's tensors, on the host
backend, for a Llama-3-8B-shaped table (291 tensors, shapes scaled down: mapping cost does not
depend on the bytes) and a 100,000-tensor table (raw MoE experts).

For each table and each package under test, a fresh process connects, warms up once, then per
repeat times:
- get_model_parameters: ``client.get_model_parameters(spec)`` (request, mapping, the table);
- tensors(): ``model.tensors()`` on that model (every companion.Tensor);
- state_dict: ``client.state_dict(spec)`` end to end (get_model_parameters + every torch tensor).
Each repeat ends with a full garbage collection, so each step starts with cold caches, as an
attach in a real process does. Then, as bench/attach_bench times the C++ attach (attach after
attach, each released before the next, nothing in between):
- state_dict, back to back: ``client.state_dict(spec)`` in a loop, no collection in between.

"before" is the package at a git revision (default main: ``git archive`` of python/companion),
"after" this tree's; both use the same libcompanion.so ($COMPANION_BUILD_DIR, default build/).
Prints a table (p50 / p90 in ms); --json writes the numbers. --profile N also profiles each
step of the "after" package (cProfile, after the timed repeats) and prints its N most expensive
functions (own time) per step and table.

    python3 bench/python_attach_bench.py [--tables 291,100000] [--repeats 30]
                                         [--before-ref main | --before-ref none] [--json FILE]
                                         [--profile N]
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "bench"))
import publish_bench  # noqa: E402
from moe_checkpoint import moe_shapes, write_safetensors  # noqa: E402


def llama_shapes():
    """Llama-3-8B's tensor names (291), shapes scaled down: mapping costs do not depend on bytes."""
    return publish_bench.llama_shapes(hidden=64, intermediate=224, kv=16, vocab=1024)


WORKER = r"""
import gc, json, sys, time
sys.path.insert(0, sys.argv[1])
import companion, torch
runtime_dir, source, repeats, profile = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
device = sys.argv[6]
spec = companion.ModelSpec(source)
c = companion.connect(runtime_dir=runtime_dir, device=device if device == "host" else int(device))
c.state_dict(spec)  # warm: the load, the imports, torch's first tensor
gc.collect()
out = {"get_model_parameters": [], "tensors()": [], "state_dict": [], "count": 0,
       "package": companion.__file__}
gc.disable()  # the collector's pauses would land in whichever step triggers them
for _ in range(repeats):
    t0 = time.perf_counter()
    m = c.get_model_parameters(spec)
    t1 = time.perf_counter()
    ts = m.tensors()
    t2 = time.perf_counter()
    out["count"] = len(ts)
    del ts
    m.release()
    del m
    t3 = time.perf_counter()
    sd = c.state_dict(spec)
    t4 = time.perf_counter()
    del sd
    gc.collect()
    out["get_model_parameters"].append(t1 - t0)
    out["tensors()"].append(t2 - t1)
    out["state_dict"].append(t4 - t3)
# As bench/attach_bench times the C++ attach: attach after attach, each released (by reference
# count: a mapping holds no reference cycle) before the next, nothing else in between.
out["state_dict, back to back"] = []
for _ in range(repeats):
    t0 = time.perf_counter()
    sd = c.state_dict(spec)
    t1 = time.perf_counter()
    del sd
    out["state_dict, back to back"].append(t1 - t0)
gc.enable()
if profile:
    import cProfile, io, pstats

    def profiled(step, setup, run):
        profiler = cProfile.Profile()
        for _ in range(repeats):
            arg = setup()
            profiler.enable()
            result = run(arg)
            profiler.disable()
            del result, arg
            gc.collect()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile)
        sys.stderr.write(f"--- {step}, {repeats} runs ---\n{text.getvalue()}")

    profiled("get_model_parameters", lambda: None, lambda _: c.get_model_parameters(spec))
    profiled("tensors()", lambda: c.get_model_parameters(spec), lambda m: m.tensors())
    profiled("state_dict", lambda: None, lambda _: c.state_dict(spec))
print(json.dumps(out))
"""


def percentile(values, q):
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def machine():
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu or platform.processor()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", default="291,100000", help="tensor counts, comma separated")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--before-ref", default="main",
                    help="git revision of the 'before' package, or 'none'")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--device", default="host",
                    help="the server's device: host, or a GPU ordinal (then --llama is timed)")
    ap.add_argument("--llama", default=None,
                    help="an existing Llama-3-8B-shaped checkpoint directory to time as the "
                         "291-tensor table (e.g. the GPU attach benchmark's 16 GB one)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the 'after' package's steps, print the N costliest functions")
    args = ap.parse_args()

    from harness import BUILD, Server

    library = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                           BUILD / "src" / "capi" / "libcompanion.so"))
    env = dict(os.environ, COMPANION_LIBRARY=str(library))
    with tempfile.TemporaryDirectory(prefix="pybench-") as tmp:
        tmp = pathlib.Path(tmp)
        packages = []
        if args.before_ref != "none":
            before = tmp / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before_ref,
                                      "python/companion"], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
            packages.append((f"before ({args.before_ref})", str(before / "python")))
        packages.append(("after", str(REPO / "python")))

        tables = [int(x) for x in args.tables.split(",") if x]
        sources = {}
        for count in tables:
            if count == 291 and args.llama:
                sources[count] = str(pathlib.Path(args.llama).resolve())
                continue
            shapes = llama_shapes() if count == 291 else moe_shapes(count)
            path = tmp / "models" / f"t{count}" / "model.safetensors"
            write_safetensors(path, shapes)
            sources[count] = str(path.parent)
        rt = tmp / "rt"
        rt.mkdir(mode=0o700)
        roots = [tmp / "models"] + ([pathlib.Path(args.llama).resolve().parent]
                                    if args.llama else [])
        server = Server(rt, roots, device=args.device)
        results = {}
        profiles = []
        try:
            for count in tables:
                # Fewer repeats of the slow cases keep a run within minutes.
                repeats = args.repeats if count <= 10_000 else max(5, args.repeats // 3)
                for label, path in packages:
                    profile = args.profile if label == "after" else 0
                    r = subprocess.run([sys.executable, "-c", WORKER, path, str(rt),
                                        sources[count], str(repeats), str(profile), args.device],
                                       capture_output=True, text=True, env=env, timeout=1800)
                    if r.returncode != 0:
                        raise SystemExit(f"{label}, {count} tensors failed:\n{r.stderr}")
                    if profile:
                        profiles.append(f"=== {count} tensors, {label} ===\n{r.stderr}")
                    data = json.loads(r.stdout.strip().splitlines()[-1])
                    if data["count"] != count:
                        raise SystemExit(f"{label}: {data['count']} tensors, expected {count}")
                    results[(count, label)] = data
                    sys.stderr.write(f"  {count} tensors, {label}: done\n")
        finally:
            server.stop()

    print(f"Python attach, device {args.device}: {machine()}")
    print(f"library {library}; repeats per case: {args.repeats} (100k-scale: fewer)")
    header = f"{'tensors':>8} {'step':<26}"
    for label, _ in packages:
        header += f" {label + ' p50':>18} {'p90':>8}"
    if len(packages) == 2:
        header += f" {'speed-up (p50)':>15}"
    print(header)
    summary = {}
    for count in tables:
        for step in ("get_model_parameters", "tensors()", "state_dict",
                     "state_dict, back to back"):
            line = f"{count:>8} {step:<26}"
            p50s = []
            for label, _ in packages:
                ms = [1000 * x for x in results[(count, label)][step]]
                p50, p90 = percentile(ms, 50), percentile(ms, 90)
                p50s.append(p50)
                summary[f"{count}/{step}/{label}"] = {"p50_ms": p50, "p90_ms": p90, "all_ms": ms}
                line += f" {p50:>15.3f} ms {p90:>8.3f}"
            if len(p50s) == 2:
                line += f" {p50s[0] / p50s[1]:>14.1f}x"
            print(line)
    for text in profiles:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": summary}, f, indent=1)


if __name__ == "__main__":
    start = time.time()
    main()
    sys.stderr.write(f"({time.time() - start:.0f} s)\n")
