"""Load throughput on a GPU machine, one card, one run: the ceilings (pinned H2D, the disk's best
raw O_DIRECT read, page-cache reads with several threads), then Companion (its loader called
directly by bench/load_bench, and end to end through a server: `companion load`) and
safetensors.torch.load_file(device="cuda:0") on the same Llama-3-8B-shaped checkpoint (16 GB
bf16), cold (caches dropped) and warm (page cache), each in a fresh process. Then each rank of a
tensor-parallel TP=2 shard of the same checkpoint, warm, through the loader and the server, timed
against the whole model's warm load of the same run. Prints a table (GB/s, ratios vs safetensors
and vs the ceilings; seconds and the ratio to the whole model for the shards); writes
load_bench.json to $OUT (or --out).

--device host runs the CPU-side parts on a small OPT-125m-shaped checkpoint (no GPU, no torch
CUDA): a smoke test of the script itself, not a measurement.
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import BUILD, Server  # noqa: E402

LOAD_BENCH = BUILD / "bench" / "load_bench"

SAFETENSORS_LOAD = r"""
import json, sys, time
import torch
from safetensors.torch import load_file
files, device = sys.argv[1:-1], sys.argv[-1]
if device.startswith("cuda"):
    torch.zeros(1, device=device)  # CUDA initialised before the clock starts
    torch.cuda.synchronize()
start = time.perf_counter()
tensors = {}
for f in files:
    tensors.update(load_file(f, device=device))
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
size = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"measure": "safetensors", "device": device, "tensors": len(tensors),
                  "bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9}))
"""


def log(msg):
    print(msg, flush=True)


def run_json(cmd, label=None, timeout=900, all_lines=False):
    """Runs a command printing JSON lines; returns the last (or all), or {"error": ...}."""
    label = label or " ".join(str(c) for c in cmd[1:] if not str(c).startswith("/"))
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        out = {"error": (r.stderr or r.stdout)[-2000:].strip(), "cmd": " ".join(map(str, cmd))}
    else:
        out = [json.loads(ln) for ln in lines]
    shown = out if isinstance(out, list) else [out]
    log(f"  {time.time() - t:6.1f} s  {label}: "
        + (", ".join(f"{m['gbps']:.2f}" for m in shown) + " GB/s" if "gbps" in shown[0]
           else f"ERROR {shown[0]['error'][-300:]}"))
    if isinstance(out, list) and not all_lines:
        return out[-1]
    return out


class Cache:
    """Drops the page cache (all of it as root; else just the checkpoint's pages)."""

    def __init__(self, files):
        self.files = [str(f) for f in files]
        self.method = None

    def drop(self):
        r = subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            self.method = "drop_caches"
            return
        if self.method is None:
            log("  cannot write /proc/sys/vm/drop_caches (" + r.stderr.strip() +
                "): evicting the checkpoint with posix_fadvise(DONTNEED) instead")
        self.method = "posix_fadvise(DONTNEED)"
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def gpu_name():
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"


def server_load(server, model, size, reps, spec=()):
    """`companion load [spec]` timed from the client (process start to loaded), then unloaded."""
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        server.cli("load", str(model), *spec, timeout=1800)
        seconds = time.perf_counter() - t
        server.cli("unload", str(model), *spec, "--force", timeout=600)
        # The server's own "loaded ... in X s" (open, plan, allocate, load, seal).
        found = re.findall(r"loaded .*? in ([0-9.]+) s", server.log_text())
        m = {"measure": "server", "bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9,
             "server_seconds": float(found[-1]) if found else None}
        log(f"  {seconds:6.2f} s  companion load {' '.join(spec)}: {m['gbps']:.2f} GB/s "
            f"(server side {m['server_seconds']} s)")
        if best is None or m["gbps"] > best["gbps"]:
            best = m
    return best


def best_of(results):
    ok = [r for r in results if "gbps" in r]
    return max(ok, key=lambda r: r["gbps"]) if ok else results[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None, help="reuses the checkpoint written there")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="0", help="GPU ordinal, or host (smoke test)")
    parser.add_argument("--backend", default="cuda-vmm")
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1),
                        help="parallel readers of the ceiling measurements")
    parser.add_argument("--reps", type=int, default=2, help="warm repetitions of Companion")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-safetensors", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-tp", action="store_true", help="no TP=2 shard loads")
    args = parser.parse_args()
    gpu = args.device != "host"
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="companion-load-bench-"))
    models = work / "models"
    if gpu:
        from run_attach_bench import write_llama3_8b_like
        model, name, writer = models / "llama-3-8b", "Llama-3-8B shape, bf16", write_llama3_8b_like
    else:
        from checkpoints import write_opt_like
        model, name = models / "opt-125m", "OPT-125m shape, fp16 (host smoke test)"
        writer = lambda d: write_opt_like(d, dtype="float16")  # noqa: E731
    files = sorted(model.glob("*.safetensors"))
    if not files:
        t = time.time()
        writer(model)
        files = sorted(model.glob("*.safetensors"))
        log(f"wrote the {name} checkpoint in {time.time() - t:.1f} s")
    size = sum(f.stat().st_size for f in files)
    cache = Cache(files)
    card = gpu_name() if gpu else "host"
    log(f"{name}: {size / 1e9:.2f} GB in {len(files)} file(s) under {model}; {card}; "
        f"{os.cpu_count()} cores")
    big = max(files, key=lambda f: f.stat().st_size)  # the ceilings read the biggest file
    dev = ["--device", args.device] + (["--backend", args.backend] if gpu else [])
    res = {"card": card, "cores": os.cpu_count(), "model": name, "bytes": size,
           "files": len(files), "threads": args.threads, "ceilings": {}, "cold": {}, "warm": {}}
    ceil, cold, warm = res["ceilings"], res["cold"], res["warm"]

    log("ceilings")
    if gpu:
        ceil["h2d_pinned"] = run_json([LOAD_BENCH, "h2d", "--device", args.device])
    if not args.skip_cold:
        for threads in sorted({1, args.threads}):
            cache.drop()
            ceil[f"disk_direct_{threads}"] = run_json(
                [LOAD_BENCH, "read", "--file", big, "--direct", "--threads", threads])
        cache.drop()
        ceil["disk_buffered_cold"] = run_json(
            [LOAD_BENCH, "read", "--file", big, "--threads", args.threads])
    run_json([LOAD_BENCH, "read", "--file", big, "--threads", args.threads])  # fills the cache
    ceil["page_cache"] = best_of([run_json(
        [LOAD_BENCH, "read", "--file", big, "--threads", args.threads]) for _ in range(2)])

    safetensors_device = f"cuda:{args.device}" if gpu else "cpu"
    safetensors_cmd = [sys.executable, "-c", SAFETENSORS_LOAD, *files, safetensors_device]
    loader_cmd = [LOAD_BENCH, "loader", "--dir", model, *dev]

    server = None
    extra = ["--backend", args.backend] if gpu else []
    if not args.skip_server:
        runtime = work / "runtime"
        runtime.mkdir(exist_ok=True)
        server = Server(runtime, [models], device=args.device, extra=extra)
    try:
        if not args.skip_cold:
            log("cold (caches dropped before each)")
            for direct in ("on", "off", "auto"):
                cache.drop()
                cold[f"companion_direct_{direct}"] = run_json(loader_cmd + ["--direct", direct])
            if server:
                cache.drop()
                cold["companion_server"] = server_load(server, model, size, 1)
            if not args.skip_safetensors:
                cache.drop()
                cold["safetensors"] = run_json(safetensors_cmd, "safetensors load_file")
        log("warm (page cache)")
        run_json([LOAD_BENCH, "read", "--file", big, "--threads", args.threads])
        # Each run a fresh process: the first load pins its staging buffers, the second (same
        # process, like a server's later loads) reuses them.
        runs = [run_json(loader_cmd + ["--direct", "off", "--repeat", 2], all_lines=True)
                for _ in range(args.reps)]
        warm["companion"] = best_of([r[0] if isinstance(r, list) else r for r in runs])
        warm["companion_again"] = best_of([r[-1] if isinstance(r, list) else r for r in runs])
        warm["companion_direct_on"] = run_json(loader_cmd + ["--direct", "on"])
        # Like for like with the buffered row it is compared with: the best first load of as
        # many fresh processes.
        warm["companion_direct_auto"] = best_of(
            [run_json(loader_cmd + ["--direct", "auto"]) for _ in range(args.reps)])
        if server:
            warm["companion_server"] = server_load(server, model, size, args.reps)
            # A fresh server's first load (its staging pinned at start, in the background: it
            # gets the time an engine's start would give it, until its log says so).
            (work / "runtime-fresh").mkdir(exist_ok=True)
            fresh = Server(work / "runtime-fresh", [models], device=args.device, extra=extra)
            try:
                deadline = time.time() + 30
                while gpu and "staging buffers" not in fresh.log_text() and time.time() < deadline:
                    time.sleep(0.05)
                warm["companion_server_first"] = server_load(fresh, model, size, 1)
            finally:
                fresh.stop()
        if not args.skip_safetensors:
            warm["safetensors"] = run_json(safetensors_cmd, "safetensors load_file")
        if not args.skip_tp:
            log("warm, tensor-parallel TP=2 shards (each rank alone)")
            run_json([LOAD_BENCH, "read", "--file", big, "--threads", args.threads])
            for rank in (0, 1):
                spec = ["--tp-size", "2", "--tp-rank", str(rank)]
                runs = [run_json(loader_cmd + ["--direct", "off", "--repeat", 2, *spec],
                                 all_lines=True) for _ in range(args.reps)]
                first = best_of([r[0] if isinstance(r, list) else r for r in runs])
                warm[f"tp2_rank{rank}"] = first
                warm[f"tp2_rank{rank}_again"] = best_of(
                    [r[-1] if isinstance(r, list) else r for r in runs])
                if server:
                    warm[f"tp2_rank{rank}_server"] = server_load(
                        server, model, first.get("bytes", size), args.reps, spec)
    finally:
        if server:
            server.stop()
    res["cache_drop"] = cache.method

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load_bench.json").write_text(json.dumps(res, indent=2))
    report(res)


def report(res):
    def g(m):
        return m.get("gbps") if isinstance(m, dict) else None

    def fmt(v, unit=""):
        return f"{v:.2f}{unit}" if v else "-"

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    ceil, cold, warm = res["ceilings"], res["cold"], res["warm"]
    disk = [g(m) for k, m in ceil.items() if k.startswith("disk_direct") and g(m)]
    disk_best = max(disk) if disk else None
    h2d, page = g(ceil.get("h2d_pinned", {})), g(ceil.get("page_cache", {}))
    warm_ceiling = min(v for v in (h2d, page) if v) if (h2d or page) else None
    log(f"\nLoad throughput, {res['model']} ({res['bytes'] / 1e9:.2f} GB), {res['card']}, "
        f"{res['cores']} cores; cold = {res.get('cache_drop') or 'not measured'}")
    log("Ceilings (GB/s): pinned H2D " + fmt(h2d) + "; disk O_DIRECT " + ", ".join(
        f"{k.split('_')[-1]} thread(s) {fmt(g(m))}" for k, m in ceil.items()
        if k.startswith("disk_direct")) + f" (best {fmt(disk_best)}); cold buffered "
        f"{fmt(g(ceil.get('disk_buffered_cold', {})))}; page cache {res['threads']} threads "
        f"{fmt(page)}")
    st_warm, st_cold = g(warm.get("safetensors", {})), g(cold.get("safetensors", {}))
    rows = [("Companion loader (load_bench)", warm.get("companion"), cold.get("companion_direct_off")),
            ("  same process, 2nd load", warm.get("companion_again"), None),
            ("Companion loader, O_DIRECT", warm.get("companion_direct_on"),
             cold.get("companion_direct_on")),
            ("Companion loader, auto (default)", warm.get("companion_direct_auto"),
             cold.get("companion_direct_auto")),
            ("Companion server (companion load)", warm.get("companion_server"),
             cold.get("companion_server")),
            ("  a fresh server's first load", warm.get("companion_server_first"), None),
            ("safetensors load_file(cuda)", warm.get("safetensors"), cold.get("safetensors"))]
    log(f"{'':36} {'warm GB/s':>9} {'vs st':>7} {'vs ceil':>8} | {'cold GB/s':>9} {'vs st':>7} "
        f"{'vs disk':>8}")
    for label, w, c in rows:
        log(f"{label:36} {fmt(g(w or {})):>9} {ratio(g(w or {}), st_warm):>7} "
            f"{ratio(g(w or {}), warm_ceiling):>8} | {fmt(g(c or {})):>9} "
            f"{ratio(g(c or {}), st_cold):>7} {ratio(g(c or {}), disk_best):>8}")
    for label, m in [("warm", warm.get("companion")), ("warm, 2nd load", warm.get("companion_again")),
                     ("cold O_DIRECT", cold.get("companion_direct_on")),
                     ("cold buffered", cold.get("companion_direct_off"))]:
        if isinstance(m, dict) and "stats" in m:
            s = m["stats"]
            log(f"  {label}: {s['reader_threads']} readers, {s['work_items']} items of "
                f"{m['chunk_bytes'] >> 20} MiB, staging {s['staging_buffers']}/"
                f"{s['staging_buffers_max']} buffers ({s.get('staging_buffers_reused', 0)} reused, "
                f"peak {s['staging_buffers_peak']}, {s['staging_alloc_seconds'] * 1e3:.0f} ms to "
                f"allocate), slab allocation {m['alloc_seconds'] * 1e3:.0f} ms")
    best_cold = max([v for v in (g(cold.get("companion_direct_on") or {}),
                                 g(cold.get("companion_direct_off") or {})) if v] or [0]) or None
    warm_all = ", ".join(f"{label} {fmt(g(warm.get(k) or {}))} GB/s "
                         f"({ratio(g(warm.get(k) or {}), st_warm)})"
                         for label, k in [("loader", "companion"), ("2nd load", "companion_again"),
                                          ("server", "companion_server"),
                                          ("fresh server's 1st", "companion_server_first")])
    log(f"Goals: warm >= 30 GB/s and >= 6x safetensors: {warm_all}; "
        f"cold >= 0.9x the disk's best raw read: {ratio(best_cold, disk_best)}")
    tp_report(warm)
    best_warm = max([v for v in (g(warm.get("companion") or {}),
                                 g(warm.get("companion_direct_on") or {})) if v] or [0]) or None
    log(f"auto vs the faster of buffered and O_DIRECT: warm "
        f"{ratio(g(warm.get('companion_direct_auto') or {}), best_warm)}, cold "
        f"{ratio(g(cold.get('companion_direct_auto') or {}), best_cold)}")

def tp_report(warm):
    """Seconds of each TP=2 rank's warm load and their ratio to the whole model's, like for like
    (a fresh process's first load, its second, the server)."""
    def sec(m):
        return m.get("seconds") if isinstance(m, dict) else None

    pairs = [("loader", "companion", ""), ("2nd load", "companion_again", "_again"),
             ("server", "companion_server", "_server")]
    if not any(sec(warm.get(f"tp2_rank{r}{suffix}")) for r in (0, 1) for _, _, suffix in pairs):
        return
    log(f"{'TP=2 shard, warm (s; x whole)':36} " + " ".join(f"{label:>16}" for label, _, _ in pairs))
    log(f"{'  whole model':36} " + " ".join(
        f"{sec(warm.get(whole)) or 0:16.3f}" if sec(warm.get(whole)) else f"{'-':>16}"
        for _, whole, _ in pairs))
    worst = None
    for rank in (0, 1):
        cells = []
        for _, whole, suffix in pairs:
            s, w = sec(warm.get(f"tp2_rank{rank}{suffix}")), sec(warm.get(whole))
            if s and w:
                worst = max(worst or 0, s / w)
                cells.append(f"{s:7.3f} ({s / w:.2f}x)")
            else:
                cells.append("-")
        log(f"{f'  TP=2 rank {rank} (warm)':36} " + " ".join(f"{c:>16}" for c in cells))
    log(f"Goal: each rank <= 0.55x the whole model's time: worst {worst:.2f}x" if worst else
        "Goal: each rank <= 0.55x the whole model's time: not measured")


if __name__ == "__main__":
    main()
