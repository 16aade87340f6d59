"""Many client processes attach one model zero-copy from a real server."""
import json
import pathlib
import subprocess

from checkpoints import tensor_crcs, write_opt_like, write_sharded, opt_like_state_dict
from harness import COMPANION, wait_until


def meminfo_kb(field):
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def attach_cmd(server, model, *extra):
    return [str(COMPANION), "attach", str(model), "--namespace", server.namespace,
            "--runtime-dir", str(server.runtime_dir), "--json", "--verify", *extra]


def test_eight_clients_share_one_load_and_one_copy(server, model_root):
    # Big enough (~110 MB) that a per-client copy, or one in the server, dwarfs allocator and
    # sanitizer noise.
    model = model_root / "opt-medium"
    if not model.exists():
        write_opt_like(model, hidden=512, layers=8, vocab=4096, dtype="float32", seed=1)
    expected = tensor_crcs(model)
    model_bytes = sum((model / "model.safetensors").stat().st_size for _ in [0])
    shmem_before = meminfo_kb("Shmem")
    rss_before = server.rss_kb()

    # Eight first requests at once: one load, one copy.
    procs = [subprocess.Popen(attach_cmd(server, model, "--hold", "2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    # While they hold their mappings, shared memory holds the model once.
    def all_attached():
        return server.cli_json("ls")[0] and server.cli_json("ls")[0][0]["leases"] == 8
    assert wait_until(all_attached, timeout=30), server.cli("ls").stdout
    shmem_growth_kb = meminfo_kb("Shmem") - shmem_before
    assert shmem_growth_kb < 1.5 * model_bytes / 1024, (shmem_growth_kb, model_bytes)
    assert server.rss_kb() - rss_before < 0.25 * model_bytes / 1024

    reports = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reports.append(json.loads(out))

    inodes = {tuple(r["segment_inodes"]) for r in reports}
    assert len(inodes) == 1, "clients must map the same memfd"
    for r in reports:
        seen = {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in r["tensors"]}
        assert seen == expected
        assert r["model"]["state"] == "loaded"
        assert r["read_only"] is True
    assert len({r["lease_id"] for r in reports}) == 8
    assert server.log_text().count("info: loading ") == 1, server.log_text()
    # Leases go when the clients exit.
    assert wait_until(lambda: server.cli_json("ls")[0][0]["leases"] == 0)


def test_attach_of_loaded_model_is_fast_and_repeatable(server, model_root):
    model = model_root / "opt-small"
    server.cli("load", str(model))
    for _ in range(3):
        out = subprocess.run(attach_cmd(server, model), capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        assert r["attach_ms"] < 1000
        assert len(r["tensors"]) == 4 + 4 * 16


def test_sharded_checkpoint_and_dtype_cast(server, model_root, tmp_path):
    import torch
    sd = opt_like_state_dict(hidden=64, layers=2, vocab=512, positions=66, dtype="float32", seed=3)
    sharded = write_sharded(model_root / "sharded", sd, shards=3)
    out = subprocess.run(attach_cmd(server, sharded), capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in r["tensors"]} == \
        tensor_crcs(sharded)

    # Cast on load: bytes equal torch's own conversion.
    out = subprocess.run(attach_cmd(server, sharded, "--dtype", "bf16"), capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout)
    import zlib
    for t in r["tensors"]:
        ref = sd[t["name"]].to(torch.bfloat16).contiguous()
        assert t["dtype"] == "BF16"
        assert t["crc32"] == zlib.crc32(ref.view(torch.int16).numpy().tobytes()), t["name"]
    listed = server.cli_json("ls")[0]
    assert len(listed) == 2  # stored and bf16 are two models


def test_hugging_face_id_resolves_in_local_cache(runtime_dir, tmp_path):
    from harness import Server
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-opt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    write_opt_like(blobs / "tmp", hidden=32, layers=1, vocab=128, positions=10, dtype="float16")
    (blobs / "tmp" / "model.safetensors").rename(blobs / "f00dblob")
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00dblob")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    s = Server(runtime_dir, [], extra=["--hf-cache", str(cache)])
    try:
        out = subprocess.run(attach_cmd(s, "acme/tiny-opt"), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)
        assert {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in r["tensors"]} == \
            tensor_crcs(blobs / "f00dblob")
        missing = s.cli_json("load", "acme/not-there", check=False)
        assert missing[1] == 1 and missing[0]["error"]["code"] == "NOT_FOUND"
    finally:
        assert s.stop() == 0
