"""One real vLLM engine (``vllm.LLM``, CPU build) for the Companion engine tests and the demo.

    VENV/bin/python engine.py --model DIR [--load-format companion] [--extra JSON] [--hold]

Generates greedily from fixed token-id prompts and prints one ``RESULT {json}`` line: the tokens,
and from inside vLLM's worker process (where the model lives) the Companion loader's report, the
worker's memory (``/proc/self/smaps_rollup``), how many of the model's tensor bytes lie in
Companion's shared memory, and what ``get_external_weight_memory`` reports. With ``--hold`` it
then reads commands from stdin: ``generate`` (generate again and print another RESULT) and
``exit``.
"""
import argparse
import json
import os
import sys
import time

PROMPTS = [[2, 100, 200, 300, 400], [2, 7, 1000, 31, 5, 9000]]


def worker_report(worker):
    """Runs in vLLM's worker process (collective_rpc)."""
    from vllm.model_executor.model_loader import get_model_loader
    import torch

    model = worker.model_runner.get_model()
    report = getattr(model, "companion_report", None)
    memory = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                memory[parts[0].rstrip(":")] = int(parts[1]) * 1024
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "memfd:companion:" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.numel():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    in_shared = sum(size for ptr, size in storages.items()
                    if any(lo <= ptr < hi for lo, hi in spans))
    external = get_model_loader(worker.load_config).get_external_weight_memory(
        worker.vllm_config)
    return {
        "pid": os.getpid(),
        "report": None if report is None else dict(vars(report)),
        "uss": memory.get("Private_Clean", 0) + memory.get("Private_Dirty", 0),
        # Anonymous memory is the process's own; shared weights live in memfd (shmem) pages,
        # which count as "private" while only one process maps them.
        "anon": memory.get("Anonymous", 0),
        "rss": memory.get("Rss", 0),
        "shmem": memory.get("Shared_Clean", 0) + memory.get("Shared_Dirty", 0),
        "model_bytes": sum(storages.values()),
        # Linear layers whose weight vLLM's CPU backend moved into kernel-private memory
        # (oneDNN or AMX packing, on CPUs that have the instructions), leaving an empty
        # parameter: those weights cannot be shared.
        "packed_linear_weights": sum(
            1 for _, module in model.named_modules()
            if hasattr(module, "cpu_linear") and isinstance(getattr(module, "weight", None),
                                                            torch.Tensor)
            and module.weight.numel() == 0),
        "model_bytes_in_shared_memory": in_shared,
        "external_weight_memory": external,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--extra", default=None, help="--model-loader-extra-config (JSON)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    # The report is gathered by a function sent to the worker (cloudpickle).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    kwargs = {}
    if args.extra:
        kwargs["model_loader_extra_config"] = json.loads(args.extra)
    # A fixed KV cache: vLLM CPU otherwise sizes it to what the weights leave of its budget.
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True,
              max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=256 * 2**20, seed=0,
              load_format=args.load_format, **kwargs)
    engine_seconds = time.perf_counter() - started
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, detokenize=False)

    def result():
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                               use_tqdm=False)
        info = llm.collective_rpc(worker_report)[0]
        info["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
        info["engine_seconds"] = engine_seconds
        print("RESULT " + json.dumps(info), flush=True)

    result()
    if args.hold:
        for line in sys.stdin:
            command = line.strip()
            if command == "generate":
                result()
            elif command == "exit":
                break


if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
    main()
