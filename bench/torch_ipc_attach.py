"""Baseline for the attach benchmark: the same state dict shared through torch.multiprocessing's
CUDA IPC (one legacy handle per tensor, pickled). A producer holds the model on the GPU; the
consumer times request → every tensor rebuilt. Prints one JSON line."""
import argparse
import json
import time

import torch
import torch.multiprocessing as mp


def producer(path, requests, replies, ready):
    from safetensors.torch import load_file
    state_dict = load_file(path, device="cuda:0")
    torch.cuda.synchronize()
    ready.set()
    while requests.get() is not None:
        replies.put(state_dict)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    requests, replies, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
    p = ctx.Process(target=producer, args=(args.checkpoint, requests, replies, ready))
    p.start()
    ready.wait()
    torch.cuda.init()
    times = []
    tensors = 0
    for i in range(args.warmup + args.iterations):
        t0 = time.perf_counter()
        requests.put(1)
        state_dict = replies.get()
        for t in state_dict.values():  # every tensor usable
            t.data_ptr()
        t1 = time.perf_counter()
        tensors = len(state_dict)
        del state_dict
        if i >= args.warmup:
            times.append((t1 - t0) * 1000)
    requests.put(None)
    p.join()
    times.sort()
    print(json.dumps({"tensors": tensors, "iterations": args.iterations,
                      "p50_ms": times[len(times) // 2],
                      "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
                      "min_ms": times[0], "max_ms": times[-1]}))


if __name__ == "__main__":
    main()
