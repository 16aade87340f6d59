"""Attach benchmark on a GPU machine: Companion vs torch.multiprocessing CUDA IPC, same card,
same run, for an OPT-125m-shaped checkpoint (196 tensors), a Llama-3-8B-shaped one (291
tensors, 16 GB bf16) and raw-MoE checkpoints of 100,000 and 1,000,000 tensors (1 KiB experts; the
1M one in four files with an index). Prints a table; writes attach_bench_<backend>.json to $OUT
(or --out). `--device host` runs it without a GPU (host backend, no torch IPC, the Llama row with
its names and shapes scaled down: attach costs do not depend on bytes)."""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from checkpoints import write_opt_like  # noqa: E402
from harness import BUILD, Server  # noqa: E402
sys.path.insert(0, str(REPO / "bench"))
from moe_checkpoint import write_moe_checkpoint, write_safetensors  # noqa: E402


def write_llama3_8b_like(directory):
    """Llama-3-8B's tensor names and shapes (291 tensors, bf16), random values made on the GPU."""
    import torch
    from safetensors.torch import save_file
    hidden, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 1024
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    g = torch.Generator(device="cuda").manual_seed(0)
    sd = {n: (torch.randn(s, generator=g, device="cuda", dtype=torch.float32) * 0.02)
          .to(torch.bfloat16).cpu() for n, s in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def write_llama3_8b_names(directory):
    """Llama-3-8B's 291 tensor names, shapes scaled down (for --device host)."""
    import publish_bench
    shapes = publish_bench.llama_shapes(hidden=64, intermediate=224, kv=16, vocab=1024)
    write_safetensors(directory / "model.safetensors", shapes)
    return directory


def checkpoint_files(path):
    return sorted(path.glob("*.safetensors"))


def gpu_name():
    if not pathlib.Path("/dev/nvidiactl").exists():
        return "host (" + os.uname().machine + ", " + str(os.cpu_count()) + " CPUs)"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 else "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--torch-iterations", type=int, default=50)
    parser.add_argument("--backend", default=None, help="default: cuda-vmm (host on --device host)")
    parser.add_argument("--device", default="0", help="the server's device: a GPU ordinal or host")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip-opt", action="store_true")
    parser.add_argument("--moe", default="100000,1000000",
                        help="raw-MoE checkpoints to add, by tensor count (comma-separated; '' none)")
    parser.add_argument("--moe-iterations", type=int, default=20)
    args = parser.parse_args()
    host = args.device == "host"
    backend = args.backend or ("host" if host else "cuda-vmm")
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="companion-bench-"))
    models = {}
    if not args.skip_opt:
        models["opt-125m"] = work / "models" / "opt-125m"
    if not args.skip_llama:
        models["llama-3-8b"] = work / "models" / ("llama-3-8b-names" if host else "llama-3-8b")
    writers = {"opt-125m": lambda d: write_opt_like(d, dtype="float16"),
               "llama-3-8b": write_llama3_8b_names if host else write_llama3_8b_like}
    iterations = {}
    for count in (int(c) for c in args.moe.split(",") if c.strip()):
        name = f"moe-{count // 1000}k" if count < 1_000_000 else f"moe-{count // 1_000_000}M"
        models[name] = work / "models" / f"moe-{count}"
        writers[name] = lambda d, n=count: write_moe_checkpoint(d, n)
        iterations[name] = args.moe_iterations
    for name, path in models.items():
        if not checkpoint_files(path):  # --work reuses earlier checkpoints
            t = time.time()
            writers[name](path)
            print(f"wrote {name}-shaped checkpoint in {time.time() - t:.1f} s", flush=True)

    runtime = work / "runtime"
    runtime.mkdir(exist_ok=True)
    server = Server(runtime, [work / "models"], device=args.device,
                    extra=[] if host else ["--backend", backend])
    results = {"card": gpu_name(), "backend": backend, "models": {}}
    try:
        for name, path in models.items():
            size = sum(f.stat().st_size for f in checkpoint_files(path))
            t = time.time()
            server.cli("load", str(path), timeout=1800)
            load_s = time.time() - t
            rss_kb = server.rss_kb()
            r = subprocess.run([str(BUILD / "bench" / "attach_bench"), "--device", args.device,
                                "--runtime-dir", str(runtime), "--model", str(path),
                                "--iterations", str(iterations.get(name, args.iterations)),
                                "--breakdown"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                ours = {"error": (r.stdout + r.stderr)[-2000:]}
            else:
                lines = r.stdout.strip().splitlines()
                ours = json.loads(lines[0])
                if len(lines) > 1:
                    ours.update(json.loads(lines[1]))
            torch_ipc = {"error": "no GPU"}
            if not host and not name.startswith("moe-"):
                r = subprocess.run([sys.executable, str(REPO / "bench" / "torch_ipc_attach.py"),
                                    str(path / "model.safetensors"), "--iterations",
                                    str(args.torch_iterations)], capture_output=True, text=True)
                torch_ipc = (json.loads(r.stdout) if r.returncode == 0
                             else {"error": r.stderr[-2000:]})
            results["models"][name] = {"bytes": size, "load_s": load_s,
                                       "server_rss_kb_after_load": rss_kb, "companion": ours,
                                       "torch_ipc": torch_ipc}
            print(json.dumps({name: results["models"][name]}), flush=True)
    finally:
        server.stop()

    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / f"attach_bench_{backend}.json").write_text(
        json.dumps(results, indent=2))
    print(f"\nAttach latency, request to every tensor usable ({results['card']}, "
          f"{backend}, warm)")
    print(f"{'model':<12} {'tensors':>9} {'size':>9} {'load':>8} {'companion p50':>14} {'p99':>8} "
          f"{'torch IPC p50':>14} {'p99':>8} {'speedup p50':>12}")
    for name, m in results["models"].items():
        c, t = m["companion"], m["torch_ipc"]
        if "error" in c:
            print(f"{name:<12} failed: {c['error'][-300:]}")
            continue
        tp50 = t.get("p50_ms", float("nan"))
        tp99 = t.get("p99_ms", float("nan"))
        print(f"{name:<12} {c['tensors']:>9} {m['bytes'] / 1e9:>7.2f}GB {m['load_s']:>7.2f}s "
              f"{c['p50_ms']:>12.3f}ms {c['p99_ms']:>6.3f}ms {tp50:>12.2f}ms {tp99:>6.2f}ms "
              f"{tp50 / c['p50_ms']:>11.1f}x")
    for name, m in results["models"].items():
        if "breakdown_ms" in m["companion"]:
            print(f"{name} phases (median ms): " + ", ".join(
                f"{k} {v:.3f}" for k, v in m["companion"]["breakdown_ms"].items()))


if __name__ == "__main__":
    main()
