"""Publish benchmark: a Llama-3-8B-shaped model (291 tensors, 16.06 GB bf16 at the default 32
layers; the shapes of run_attach_bench.py's write_llama3_8b_like) published from tensors already
on the GPU to a committed generation (begin_publish + copy_ + commit, and client.publish), and a
reader's attach of it in another process (get_model_parameters + a torch tensor for every entry)
next to the attach of the same weights loaded by the server from a checkpoint.

Each repeat publishes a new generation of one key; the previous one is released first, so the
server frees it once the new one is committed (at most two copies on the GPU besides the
source). Prints a table; writes publish_bench_<backend>.json to $OUT (or --out).

    python3 bench/publish_bench.py [--backend cuda-vmm|cuda-ipc] [--device 0] [--repeats 10]
                                   [--layers 32] [--attach-iterations 50] [--no-checkpoint]

Needs torch with CUDA (or --device host: CPU tensors, host backend, for a smoke run), safetensors
for the checkpoint comparison, and the binaries of $COMPANION_BUILD_DIR (default build/)."""
import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "python"))
from harness import BUILD, Server  # noqa: E402

LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       BUILD / "src" / "capi" / "libcompanion.so"))
os.environ["COMPANION_LIBRARY"] = str(LIBRARY)


def llama_shapes(layers=32, hidden=4096, intermediate=14336, kv=1024, vocab=128256):
    """Llama-3-8B's tensor names and shapes (at the defaults: 291 tensors)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values_s):
    ms = [1000.0 * x for x in values_s]
    return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "min_ms": min(ms),
            "max_ms": max(ms), "n": len(ms), "all_ms": ms}


def size_text(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def gpu_name(device):
    if device == "host":
        return "host (CPU)"
    r = subprocess.run(["nvidia-smi", "-i", str(device), "--query-gpu=name,driver_version",
                        "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() \
        else "unknown"


# A reader in a fresh process: attaches `target` (a published key, or a checkpoint path the
# server has loaded) `iterations` times after `warmup` attaches; each attach is timed from the
# request to a torch tensor for every entry, then released (not timed).
READER = textwrap.dedent("""
    import gc, json, sys, time
    import torch
    import companion

    runtime_dir, device, kind, target, iterations, warmup = sys.argv[1:7]
    if device != "host":
        torch.cuda.set_device(int(device))
    client = companion.connect(device=device if device == "host" else int(device),
                               runtime_dir=runtime_dir)
    spec = target if kind == "key" else companion.ModelSpec.of(target)
    times, tensors, generation = [], 0, 0
    for i in range(int(warmup) + int(iterations)):
        t0 = time.perf_counter()
        mapped = client.get_model_parameters(spec)
        state = mapped.state_dict()
        elapsed = time.perf_counter() - t0
        tensors = len(state)
        generation = int(getattr(mapped.status, "generation", 0) or 0)
        del state
        mapped.release()
        gc.collect()
        if i >= int(warmup):
            times.append(elapsed)
    print(json.dumps({"times_s": times, "tensors": tensors, "generation": generation}))
""")


def reader_attach(runtime, device, kind, target, iterations, warmup):
    env = dict(os.environ, COMPANION_LIBRARY=str(LIBRARY), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", READER, str(runtime), str(device), kind,
                        str(target), str(iterations), str(warmup)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stdout + r.stderr)[-3000:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    result = summary(out["times_s"])
    result.update(tensors=out["tensors"], generation=out["generation"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda-vmm",
                        help="cuda-vmm (default) or cuda-ipc; host with --device host")
    parser.add_argument("--device", default="0", help="GPU ordinal (default 0), or host")
    parser.add_argument("--repeats", type=int, default=10, help="timed publishes (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed publishes first")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--kv", type=int, default=1024, help="k/v projection rows")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--attach-iterations", type=int, default=50)
    parser.add_argument("--attach-warmup", type=int, default=5)
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="skip writing a checkpoint of the same tensors and attaching it")
    parser.add_argument("--work", default=None, help="directory for the runtime and checkpoint")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--key", default="bench/llama-3-8b-shape")
    args = parser.parse_args()
    if args.device == "host":
        args.backend = "host"

    import torch
    import companion

    on_gpu = args.device != "host"
    if on_gpu:
        torch.cuda.set_device(int(args.device))
        tdev = torch.device("cuda", int(args.device))
    else:
        tdev = torch.device("cpu")

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.kv, args.vocab)
    t = time.time()
    gen = torch.Generator(device=tdev).manual_seed(0)
    src = {n: (torch.randn(s, generator=gen, device=tdev, dtype=torch.float32) * 0.02)
           .to(torch.bfloat16) for n, s in shapes.items()}
    sync()
    total_bytes = sum(x.numel() * x.element_size() for x in src.values())
    print(f"made {len(src)} bf16 tensors, {size_text(total_bytes)}, on {tdev} in "
          f"{time.time() - t:.1f} s", flush=True)

    # The copy's ceiling: the same per-tensor copies into one scratch buffer.
    scratch = torch.empty(max(x.numel() for x in src.values()), dtype=torch.bfloat16,
                          device=tdev)
    ceiling = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for x in src.values():
            scratch[:x.numel()].view(x.shape).copy_(x)
        sync()
        ceiling.append(time.perf_counter() - t0)
    del scratch

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="companion-publish-bench-"))
    runtime = work / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    models = work / "models"
    models.mkdir(exist_ok=True)
    server = Server(runtime, [models], device=args.device, extra=["--backend", args.backend])
    results = {"card": gpu_name(args.device), "backend": args.backend, "device": args.device,
               "layers": args.layers, "tensors": len(src), "bytes": total_bytes,
               "repeats": args.repeats, "warmup": args.warmup,
               "copy_ceiling": summary(ceiling)}
    fp = {"engine": "publish_bench", "dtype": "bfloat16", "layers": str(args.layers)}
    try:
        client = companion.connect(device=int(args.device) if on_gpu else "host",
                                   runtime_dir=runtime)
        phases = {"begin_publish": [], "copy": [], "commit": [], "total": []}
        slab_bytes, generations = [], []
        mapped = None
        for i in range(args.warmup + args.repeats):
            if mapped is not None:
                mapped.release()  # the previous generation goes once this one is committed
                mapped = None
            gc.collect()
            sync()
            t0 = time.perf_counter()
            publication = client.begin_publish(args.key, src, fingerprint=fp)
            t1 = time.perf_counter()
            dst = publication.tensors
            for name, x in src.items():
                dst[name].copy_(x)
            sync()
            t2 = time.perf_counter()
            mapped = publication.commit()
            t3 = time.perf_counter()
            del dst, publication
            generations.append(int(getattr(mapped.status, "generation", 0) or 0))
            slab_bytes.append(client.health()["slab_bytes"])
            if i >= args.warmup:
                for k, v in (("begin_publish", t1 - t0), ("copy", t2 - t1),
                             ("commit", t3 - t2), ("total", t3 - t0)):
                    phases[k].append(v)
            print(f"publish {i + 1}/{args.warmup + args.repeats}: {1000 * (t3 - t0):.1f} ms "
                  f"(begin {1000 * (t1 - t0):.1f}, copy {1000 * (t2 - t1):.1f}, commit "
                  f"{1000 * (t3 - t2):.1f}); generation {generations[-1]}, server slab bytes "
                  f"{size_text(slab_bytes[-1])}", flush=True)
        results["publish"] = {k: summary(v) for k, v in phases.items()}
        results["generations"] = generations
        results["slab_bytes"] = slab_bytes

        # client.publish: the same in one call (claim, declare, copy, commit).
        one_call = []
        for i in range(args.warmup + args.repeats):
            if mapped is not None:
                mapped.release()
                mapped = None
            gc.collect()
            sync()
            t0 = time.perf_counter()
            mapped = client.publish(args.key, src, fingerprint=fp)
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                one_call.append(elapsed)
        results["publish_one_call"] = summary(one_call)
        current = int(getattr(mapped.status, "generation", 0) or 0)
        mapped.release()
        mapped = None
        gc.collect()

        print("attaching the published key from another process...", flush=True)
        results["attach_published"] = reader_attach(runtime, args.device, "key", args.key,
                                                    args.attach_iterations, args.attach_warmup)
        results["attach_published"]["current_generation"] = current

        if not args.no_checkpoint:
            from safetensors.torch import save_file
            path = models / "llama-shape"
            path.mkdir(exist_ok=True)
            t = time.time()
            save_file({n: x.cpu() for n, x in src.items()}, str(path / "model.safetensors"),
                      metadata={"format": "pt"})
            print(f"wrote the checkpoint in {time.time() - t:.1f} s", flush=True)
            t = time.time()
            server.cli("load", str(path), timeout=1800)
            results["checkpoint_load_s"] = time.time() - t
            results["attach_checkpoint"] = reader_attach(
                runtime, args.device, "checkpoint", path, args.attach_iterations,
                args.attach_warmup)
        client.close()
    finally:
        server.stop()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"publish_bench_{args.backend}.json").write_text(json.dumps(results, indent=2))
    print_table(results, args)


def print_table(results, args):
    gb = results["bytes"] / 1e9
    print(f"\nPublish, tensors on the {'GPU' if args.device != 'host' else 'host'} -> committed "
          f"generation ({results['card']}; {results['backend']})")
    print(f"model: Llama-3-8B shape, {results['layers']} layers, {results['tensors']} tensors, "
          f"{size_text(results['bytes'])} bf16; {results['repeats']} repeats after "
          f"{results['warmup']} warm-up")
    print(f"{'step':<44} {'p50 ms':>9} {'p90 ms':>9} {'GB/s at p50':>12}")
    rows = [("begin_publish (claim, declare, map writable)", results["publish"]["begin_publish"]),
            ("copy_ of every tensor into the slab", results["publish"]["copy"]),
            ("commit (digest, seal, remap read-only)", results["publish"]["commit"]),
            ("total: begin_publish .. commit", results["publish"]["total"]),
            ("client.publish (one call)", results["publish_one_call"]),
            ("the same copies into a scratch buffer", results["copy_ceiling"])]
    for label, s in rows:
        rate = gb / (s["p50_ms"] / 1000) if s["p50_ms"] > 0 else float("nan")
        print(f"{label:<44} {s['p50_ms']:>9.2f} {s['p90_ms']:>9.2f} {rate:>12.1f}")
    print(f"\nAttach in another process: request -> a torch tensor for every entry "
          f"({args.attach_iterations} attaches after {args.attach_warmup} warm-ups)")
    print(f"{'source':<44} {'p50 ms':>9} {'p90 ms':>9} {'tensors':>8}")
    for label, key in (("published key", "attach_published"),
                       ("checkpoint loaded by the server", "attach_checkpoint")):
        s = results.get(key)
        if s is None:
            continue
        if "error" in s:
            print(f"{label:<44} failed: {s['error'][-300:]}")
            continue
        print(f"{label:<44} {s['p50_ms']:>9.3f} {s['p90_ms']:>9.3f} {s['tensors']:>8}")
    if "checkpoint_load_s" in results:
        print(f"(the server loaded the checkpoint in {results['checkpoint_load_s']:.1f} s)")


if __name__ == "__main__":
    main()
