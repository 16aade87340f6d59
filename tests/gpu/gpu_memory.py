"""The GPU's memory as nvidia-smi counts it (the whole device, every process), by GPU UUID."""
import subprocess


def gpu_memory_mib(uuid):
    """(used, free) MiB of the GPU with this UUID."""
    r = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.used,memory.free",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True,
                       check=True)
    for line in r.stdout.splitlines():
        u, used, free = [x.strip() for x in line.split(",")]
        if u == uuid:
            return int(used), int(free)
    raise KeyError(uuid)


def gpu_memory_used_mib(uuid):
    return gpu_memory_mib(uuid)[0]
