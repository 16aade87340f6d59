"""Restart without reload on the GPU (cuda-vmm): kill -9 of a server with a model loaded, a new
server adopts the model from the keeper's shareable fds, with one copy in GPU memory throughout
(torch.cuda.mem_get_info), and serves it to a new client with the checkpoint's bytes. Prints the
time from the new server's start to the first attach. cuda-ipc memory cannot outlive its
process: such a server runs without a keeper."""
import os
import signal
import time

from checkpoints import tensor_wsums
from harness import Server, alive, wait_until


def checksums(report):
    return {t["name"]: (t["dtype"], t["shape"], t["wsum64"]) for t in report["tensors"]}


def test_kill_9_restart_adopts_the_model_with_one_copy_on_the_gpu(runtime_dir, gpu_model_root):
    import torch
    torch.cuda.init()

    def free():
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info(0)[0]

    model = gpu_model_root / "opt-1g"
    model_bytes = (model / "model.safetensors").stat().st_size
    expected = tensor_wsums(model)
    gib = 2**30
    free_start = free()
    first = Server(runtime_dir, [gpu_model_root], device="0", keep=True,
                   extra=["--backend", "cuda-vmm"])
    keeper = first.keeper_pid()
    assert keeper and alive(keeper), first.log_text()
    held_before = len(os.listdir(f"/proc/{keeper}/fd"))
    first.cli("load", str(model), timeout=300)
    # Handed to the keeper after the load (digests first, on the server's keeper thread): the
    # segment's fd and the table's memfd arrive together.
    assert wait_until(lambda: len(os.listdir(f"/proc/{keeper}/fd")) >= held_before + 2,
                      timeout=60), first.log_text()
    free_loaded = free()
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait()
    first.log.close()
    # The server's context is gone; the model is not: the keeper's fds hold it.
    wait_until(lambda: free() > free_loaded, timeout=10)
    free_killed = free()
    assert free_start - free_killed > 0.9 * model_bytes, (free_start, free_killed, model_bytes)

    started = time.monotonic()
    second = Server(runtime_dir, [gpu_model_root], device="0", keep=True,
                    extra=["--backend", "cuda-vmm"])
    try:
        serving = time.monotonic()
        report, _ = second.cli_json("attach", str(model), "--verify", "--show", "100000",
                                    timeout=300)
        attached = time.monotonic()
        log = second.log_text()
        assert "adopted 1 models" in log and "loading " not in log, log
        assert checksums(report) == expected
        free_restarted = free()
        adopted_line = [line for line in log.splitlines() if "adopted 1 models" in line][0]
        print(f"cuda-vmm, model {model_bytes / gib:.2f} GiB: new server serving "
              f"{(serving - started) * 1000:.0f} ms after its start, first attach done "
              f"{(attached - started) * 1000:.0f} ms after it ({adopted_line.split('info: ')[1]}); "
              f"GPU free {free_start / gib:.2f} GiB at start, {free_loaded / gib:.2f} loaded, "
              f"{free_killed / gib:.2f} after kill -9, {free_restarted / gib:.2f} restarted")
        # One copy: a server and its model take what they took before the kill (the new
        # server's context in place of the old one's), never the model a second time.
        assert abs(free_restarted - free_loaded) < 0.5 * model_bytes, (free_loaded,
                                                                      free_restarted)
        second.cli("unload", str(model))
    finally:
        assert second.stop() == 0
    # Unloaded and stopped: the keeper let go and left, and the memory is back.
    assert wait_until(lambda: not alive(keeper), timeout=30)
    assert wait_until(lambda: free() > free_start - 0.1 * model_bytes, timeout=30), \
        (free(), free_start)


def test_a_cuda_ipc_server_runs_without_a_keeper(runtime_dir, gpu_model_root):
    s = Server(runtime_dir, [gpu_model_root], device="0", keep=True,
               extra=["--backend", "cuda-ipc"])
    try:
        assert "cuda-ipc memory cannot outlive this process" in s.log_text()
        assert s.keeper_pid() is None
    finally:
        assert s.stop() == 0
    assert not list(runtime_dir.glob("keeper-*.sock"))
