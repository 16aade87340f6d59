"""Several processes share one base model on the GPU through companion.transformers and each
runs its own LoRA adapter on top with peft: each one's logits equal peft on a private copy of
the base, the server holds one copy, and attaching does not cost a process the base's size in
GPU memory (a private copy does). Needs torch with CUDA, transformers >= 5 and peft."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from harness import BUILD, Server

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       BUILD / "src" / "capi" / "libcompanion.so"))
PROCESSES = 3
INPUT_IDS = [[1, 306, 4658, 278, 6593, 310, 2834, 338, 31999, 7, 8, 9],
             [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]

WORKER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import companion, companion.transformers as ct

    base, adapter, runtime_dir, instance, work, index, count = sys.argv[1:8]
    index, count = int(index), int(count)
    ids = torch.tensor(json.loads(sys.argv[8]), device="cuda:0")

    def barrier(name):
        open(os.path.join(work, f"{name}-{index}"), "w").close()
        while sum(os.path.exists(os.path.join(work, f"{name}-{i}")) for i in range(count)) \\
                < count:
            time.sleep(0.05)

    def free():
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info(0)[0]

    # The CUDA context, cuBLAS' workspace and the kernels a Llama forward pass loads, before
    # anyone measures: a small random Llama with a LoRA adapter runs once.
    import peft, transformers
    warm = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2)
    warm = transformers.LlamaForCausalLM(warm).to("cuda:0", torch.bfloat16).eval()
    warm = peft.get_peft_model(warm, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj",
                                                                          "down_proj"]))
    with torch.no_grad():
        warm(ids % 64)
    del warm
    barrier("context")
    # One process measures at a time, so that no other process's allocations show.
    with open(os.path.join(work, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = free()
        client = companion.connect(device=0, runtime_dir=runtime_dir, instance_id=instance)
        model = ct.from_pretrained(base, device=0, client=client)
        shared = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            ours = shared(ids).logits
        shared_drop = before - free()
        fcntl.flock(lock, fcntl.LOCK_UN)
    barrier("attached")
    while not os.path.exists(os.path.join(work, "go")):  # the test checks the server
        time.sleep(0.05)
    with open(os.path.join(work, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = free()
        private = AutoModelForCausalLM.from_pretrained(base, device_map="cuda:0").eval()
        reference = PeftModel.from_pretrained(private, adapter).eval()
        with torch.no_grad():
            theirs = reference(ids).logits
        private_drop = before - free()
        fcntl.flock(lock, fcntl.LOCK_UN)
    # PEFT injects its lora_A / lora_B parameters into the base model; every other parameter
    # must still be the lease's memory.
    base_ptrs = {p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    torch.save(ours.cpu(), os.path.join(work, f"logits-{index}.pt"))
    with open(os.path.join(work, f"report-{index}.json"), "w") as f:
        json.dump({"route": model.companion_route, "equal": torch.equal(ours, theirs),
                   "max_diff": (ours.float() - theirs.float()).abs().max().item(),
                   "shared_drop": shared_drop, "private_drop": private_drop,
                   "base_in_lease": base_ptrs <= {t.data_ptr for t in
                                                  model.companion_weights.tensors().values()},
                   "lora_modules": sum("lora_A" in n for n, _ in shared.named_modules())}, f)
""")


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} missing: set COMPANION_LIBRARY or build target companion_capi")
    os.environ["COMPANION_LIBRARY"] = str(LIBRARY)
    return torch


@pytest.fixture(scope="module")
def base_and_adapters(torch_cuda, tmp_path_factory):
    """A Llama-shaped base of about 300 MB in bfloat16 (big enough that a private copy shows in
    the GPU's free memory) and one random LoRA adapter per process, written by peft."""
    import peft
    import transformers

    torch = torch_cuda
    root = tmp_path_factory.mktemp("peft-models")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=8, num_attention_heads=16,
                                      num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    adapters = []
    for index in range(PROCESSES):
        torch.manual_seed(100 + index)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False)  # random B: the adapter changes logits
        peft.get_peft_model(model, lora).save_pretrained(root / f"adapter-{index}")
        adapters.append(root / f"adapter-{index}")
    return root / "base", adapters, sum(p.numel() * 2 for p in base.parameters())


@pytest.mark.parametrize("backend", ["cuda-vmm", "cuda-ipc"])
def test_processes_share_one_base_with_their_own_adapters(backend, torch_cuda, base_and_adapters,
                                                          tmp_path):
    import companion

    torch = torch_cuda
    base, adapters, base_bytes = base_and_adapters
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    server = Server(rt, [base.parent], device="0", extra=["--backend", backend])
    try:
        client = companion.connect(device=0, runtime_dir=rt, instance_id=server.instance)
        client.load(str(base))  # loaded before anyone measures: the server's copy is the one
        work = tmp_path / "work"
        work.mkdir()
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"), PYTHONUNBUFFERED="1",
                   COMPANION_LIBRARY=str(LIBRARY))
        started = time.monotonic()
        procs = [subprocess.Popen(
            [sys.executable, str(script), str(base), str(adapters[i]), str(rt), server.instance,
             str(work), str(i), str(PROCESSES), json.dumps(INPUT_IDS)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(PROCESSES)]
        try:
            deadline = time.monotonic() + 240
            while not all((work / f"attached-{i}").exists() for i in range(PROCESSES)):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                assert not failed, failed[0].communicate()[0]
                assert time.monotonic() < deadline, "workers did not attach"
                time.sleep(0.1)
            # Every process holds the base now: the server still has one copy of it.
            models = [m for m in client.list() if m.slab_bytes]
            assert len(models) == 1, models
            status = models[0]
            assert status.source == str(base) and status.leases >= PROCESSES, status
            assert base_bytes <= status.slab_bytes < 1.1 * base_bytes, (status.slab_bytes,
                                                                         base_bytes)
            (work / "go").touch()
            outputs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out
        reports = [json.loads((work / f"report-{i}.json").read_text())
                   for i in range(PROCESSES)]
        logits = [torch.load(work / f"logits-{i}.pt") for i in range(PROCESSES)]
        for i, report in enumerate(reports):
            print(f"{backend} process {i}: {report} ({time.monotonic() - started:.1f} s)")
            assert report["route"] == "checkpoint"
            assert report["base_in_lease"] and report["lora_modules"] > 0
            assert report["equal"], report
            # Attaching costs a process far less than the base; its private copy costs the
            # base (which shows that the measurement sees a copy).
            assert report["shared_drop"] < base_bytes / 4, (report, base_bytes)
            assert report["private_drop"] >= 0.9 * base_bytes, (report, base_bytes)
        # Each process ran its own adapter.
        assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])
    finally:
        code = server.stop()
        assert code == 0, f"server exited with {code}:\n{server.log_text()}"
