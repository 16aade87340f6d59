"""What the server reads, tried as a hostile local user would: a symlink swapped while models
load never serves bytes from outside the model roots; a FIFO where a checkpoint file belongs gets
a typed error at once and stops no one; paths outside the roots answer alike whether they exist
or not; a header of millions of tensors is refused before it is parsed."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import zlib

import pytest

from checkpoints import write_opt_like
from harness import ASAN_BUILD, TSAN_BUILD, Server

INSIDE_BYTE = 0x11
OUTSIDE_BYTE = 0x77


def write_filled(path, fill, nbytes=1 << 16):
    """One U8 tensor "w" of nbytes bytes, every one `fill`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes],
                               "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([fill]) * nbytes)


def error_of(server, *args, timeout=30):
    out, code = server.cli_json(*args, check=False, timeout=timeout)
    assert code == 1, out
    return out["error"]["code"], out["error"]["message"]


def peak_rss_kb(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# Flips `link` between two targets as fast as it can, each flip atomic (rename over the link),
# until killed or `seconds` have passed.
FLIPPER = """
import os, sys, time
link, a, b, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tmp = link + ".flip"
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for target in (a, b):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)
"""


def test_a_symlink_swapped_during_loads_never_serves_outside_bytes(tmp_path, runtime_dir):
    root = tmp_path / "models"
    outside = tmp_path / "outside"
    write_filled(root / "inside.safetensors", INSIDE_BYTE)
    write_filled(outside / "secret.safetensors", OUTSIDE_BYTE)  # same header, other bytes
    inside_crc = zlib.crc32(bytes([INSIDE_BYTE]) * (1 << 16))
    outside_crc = zlib.crc32(bytes([OUTSIDE_BYTE]) * (1 << 16))
    model = root / "m"
    model.mkdir()
    link = model / "model.safetensors"
    link.symlink_to("../inside.safetensors")

    # Every attach loads a variant of its own: allow more than the race can make in its time.
    server = Server(runtime_dir, [root], extra=["--max-variants-per-source", "1300",
                                                "--max-models", "1300"])
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(link), "../inside.safetensors",
                                str(outside / "secret.safetensors"), "60"])
    served = leaked = refused = 0
    try:
        # Each attach is a client process loading a copy of its own (distinct tags) and reporting
        # the CRC-32 of the bytes it was served.
        deadline = time.monotonic() + 15
        for i in range(1250):
            if time.monotonic() > deadline or leaked:
                break
            out, code = server.cli_json("attach", str(model), "--tag", f"race-{i}", "--verify",
                                        check=False)
            if code != 0:
                assert out["error"]["code"] in ("NOT_PERMITTED", "BAD_CHECKPOINT",
                                                "NOT_FOUND"), out
                refused += 1  # the swap was seen: refused, which is fine
                continue
            crc = out["tensors"][0]["crc32"]
            assert crc in (inside_crc, outside_crc), out
            served += 1
            leaked += int(crc == outside_crc)
    finally:
        flipper.kill()
        flipper.wait()
        code = server.stop()
    print(f"race: {served} served, {refused} refused, {leaked} leaked")
    assert leaked == 0, f"{leaked} of {served} loads served bytes from outside the model root"
    assert served >= 5, f"only {served} loads served ({refused} refused): the race was not tried"
    assert code == 0, server.log_text()


@pytest.fixture
def fifo_models(tmp_path):
    """Checkpoints with a FIFO where a file belongs, and a good model beside them."""
    root = tmp_path / "fifo-models"
    write_filled(root / "good" / "model.safetensors", INSIDE_BYTE)
    write_filled(root / "fifo-index" / "a.safetensors", INSIDE_BYTE)
    write_filled(root / "fifo-shard" / "a.safetensors", INSIDE_BYTE)
    write_filled(root / "fifo-indexed-shard" / "a.safetensors", INSIDE_BYTE)
    (root / "fifo-indexed-shard" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    write_opt_like(root / "fifo-config", hidden=16, layers=1, vocab=32, positions=8)
    fifos = [root / "fifo-index" / "model.safetensors.index.json",
             root / "fifo-shard" / "b.safetensors",
             root / "fifo-indexed-shard" / "b.safetensors",
             root / "fifo-config" / "config.json",
             root / "fifo-file.safetensors"]
    for fifo in fifos:
        os.mkfifo(fifo)
    yield root
    # Should a reader still be blocked on one (the bug this guards against), let it go.
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_fifos_get_typed_errors_at_once_and_stop_no_one(fifo_models, runtime_dir):
    root = fifo_models
    server = Server(runtime_dir, [root], extra=["--load-threads", "2"])
    try:
        cases = [("fifo-index", ()), ("fifo-shard", ()), ("fifo-indexed-shard", ()),
                 ("fifo-file.safetensors", ()),
                 ("fifo-config", ("--tp-size", "2", "--tp-rank", "0"))]
        for name, extra in cases:
            start = time.monotonic()
            code, message = error_of(server, "load", str(root / name), *extra, timeout=20)
            elapsed = time.monotonic() - start
            assert code == "BAD_CHECKPOINT", (name, code, message)
            assert "regular file" in message or "neither" in message, (name, message)
            assert elapsed < 10, (name, elapsed)
        # Both load workers are free: other models load.
        out, code = server.cli_json("load", str(root / "good"), timeout=20)
        assert code == 0 and out["state"] == "loaded", out
        for name, extra in cases:
            out, code = server.cli_json("unload", str(root / name), *extra, "--force",
                                        check=False, timeout=20)
            assert code in (0, 1), out
        health, code = server.cli_json("health", timeout=20)
        assert code == 0 and health["state"] == "serving", health
    finally:
        start = time.monotonic()
        code = server.stop()
    assert code == 0, server.log_text()
    assert time.monotonic() - start < 20


def test_paths_outside_the_roots_answer_alike_whether_they_exist_or_not(tmp_path, runtime_dir):
    root = tmp_path / "models"
    write_filled(root / "good" / "model.safetensors", INSIDE_BYTE)
    outside = tmp_path / "outside"
    write_filled(outside / "m" / "model.safetensors", OUTSIDE_BYTE)
    (root / "to-file").symlink_to(outside / "m" / "model.safetensors")
    (root / "to-nothing").symlink_to(outside / "m" / "absent.safetensors")
    (root / "to-dir").symlink_to(outside / "m")
    (root / "to-no-dir").symlink_to(outside / "absent")
    server = Server(runtime_dir, [root])
    try:
        probes = [outside / "m" / "model.safetensors", outside / "m" / "absent.safetensors",
                  outside / "m", outside / "absent", outside / "absent" / "deeper",
                  pathlib.Path("/etc/shadow"), pathlib.Path("/etc/no-such-file"),
                  root / "to-file", root / "to-nothing", root / "to-dir", root / "to-no-dir"]
        answers = set()
        for path in probes:
            code, message = error_of(server, "load", str(path))
            assert code == "NOT_PERMITTED", (path, code, message)
            answers.add(message.replace(str(path), "PATH"))
        assert len(answers) == 1, answers  # the same words whatever lies there
        assert error_of(server, "load", str(root / "absent"))[0] == "NOT_FOUND"
        assert server.cli_json("load", str(root / "good"))[1] == 0
    finally:
        code = server.stop()
    assert code == 0, server.log_text()


def write_many_tensor_header(path, tensors):
    """A checkpoint whose header lists `tensors` empty U8 tensors (valid, no data at all)."""
    entry = '"t%07d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    header = ("{" + ",".join(entry % i for i in range(tensors)) + "}").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return len(header)


def test_a_header_of_millions_of_tensors_is_refused_at_the_limit(tmp_path, runtime_dir):
    root = tmp_path / "models"
    header_bytes = write_many_tensor_header(root / "many" / "model.safetensors", 1_500_000)
    assert 80 << 20 < header_bytes < 100 << 20
    write_filled(root / "good" / "model.safetensors", INSIDE_BYTE)
    # The default (4M, the table's limit) would take it: 1M tensors are a real MoE checkpoint.
    server = Server(runtime_dir, [root], extra=["--max-tensors", "1000000"])
    try:
        assert server.cli_json("load", str(root / "good"))[1] == 0
        before_kb = peak_rss_kb(server.pid)
        start = time.monotonic()
        code, message = error_of(server, "load", str(root / "many"), timeout=60)
        elapsed = time.monotonic() - start
        grown_mb = (peak_rss_kb(server.pid) - before_kb) / 1024
        print(f"1.5M-tensor header ({header_bytes >> 20} MiB): refused in {elapsed:.2f} s, "
              f"peak RSS +{grown_mb:.0f} MB")
        assert code == "LIMIT_EXCEEDED", (code, message)
        assert "--max-tensors" in message and "1000000" in message, message
        # Refused at the first entry past the limit: what it costs is bounded by what a
        # checkpoint of --max-tensors entries costs to open (the header, the entries read).
        # The sanitizers' allocators keep freed memory resident (ThreadSanitizer every page,
        # AddressSanitizer its 256 MiB quarantine): measured in the plain build only.
        if not (TSAN_BUILD or ASAN_BUILD):
            assert grown_mb < 300, grown_mb
        # Sanitizers: ThreadSanitizer ~10x slower, AddressSanitizer ~3x (entries up to the
        # limit are parsed, a million here).
        assert elapsed < (30 if TSAN_BUILD or ASAN_BUILD else 5), elapsed
        assert server.cli_json("load", str(root / "good"), "--tag", "after")[1] == 0
    finally:
        code = server.stop()
    assert code == 0, server.log_text()

    # A lower header limit refuses it before reading the header at all.
    server = Server(runtime_dir, [root], extra=["--max-header-bytes", str(1 << 20),
                                                "--max-tensors", "1000"])
    try:
        before_kb = peak_rss_kb(server.pid)
        code, message = error_of(server, "load", str(root / "many"), timeout=60)
        assert code == "LIMIT_EXCEEDED" and "--max-header-bytes" in message, message
        assert (peak_rss_kb(server.pid) - before_kb) / 1024 < 50
        write_many_tensor_header(root / "some" / "model.safetensors", 1001)
        code, message = error_of(server, "load", str(root / "some"))
        assert code == "LIMIT_EXCEEDED" and "--max-tensors" in message, message
        write_many_tensor_header(root / "fewer" / "model.safetensors", 1000)
        assert server.cli_json("load", str(root / "fewer"))[1] == 0
        # An index naming more tensors than the limit is refused before it is parsed.
        write_filled(root / "indexed" / "a.safetensors", INSIDE_BYTE)
        (root / "indexed" / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {f"t{i}": "a.safetensors" for i in range(1001)}}))
        code, message = error_of(server, "load", str(root / "indexed"))
        assert code == "LIMIT_EXCEEDED" and "--max-tensors" in message, message
    finally:
        code = server.stop()
    assert code == 0, server.log_text()


def test_roots_keep_meaning_what_they_were_at_start(tmp_path, runtime_dir):
    """Whoever can write a root's parent cannot move the root after the server started: not by
    putting a symlink in its place, nor by creating a Hugging Face cache that was missing."""
    parent = tmp_path / "parent"
    root = parent / "models"
    write_filled(root / "good" / "model.safetensors", INSIDE_BYTE)
    outside = tmp_path / "outside"
    write_filled(outside / "secret" / "model.safetensors", OUTSIDE_BYTE)
    write_filled(outside / "hub" / "secret" / "model.safetensors", OUTSIDE_BYTE)
    missing_cache = parent / "hf"
    server = Server(runtime_dir, [root], extra=["--hf-cache", str(missing_cache)])
    try:
        assert server.cli_json("load", str(root / "good"))[1] == 0
        # The root's path now leads elsewhere, and the HF cache appears, pointing outside.
        (parent / "models").rename(parent / "models.orig")
        (parent / "models").symlink_to(outside)
        missing_cache.symlink_to(outside / "hub")
        for probe in (root / "secret", missing_cache / "secret", outside / "secret"):
            code, message = error_of(server, "load", str(probe))
            assert code == "NOT_PERMITTED", (probe, code, message)
    finally:
        code = server.stop()
    assert code == 0, server.log_text()


def test_hf_refs_are_not_followed_out_of_the_cache(tmp_path, runtime_dir):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--leak"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    secret = tmp_path / "credentials"
    secret.write_text("API_TOKEN=sk-live-1234/abcd\n")
    (repo / "refs" / "main").symlink_to(secret)
    server = Server(runtime_dir, [], extra=["--hf-cache", str(cache)])
    try:
        code, message = error_of(server, "load", "acme/leak")
        assert code in ("NOT_FOUND", "BAD_CHECKPOINT"), (code, message)
        assert "sk-live" not in message and "API_TOKEN" not in message, message
    finally:
        code = server.stop()
    assert code == 0, server.log_text()


def test_a_shape_of_millions_of_numbers_is_refused_before_it_is_parsed(tmp_path, runtime_dir):
    root = tmp_path / "models"
    dims = ",".join(["1"] * 10_000_000)  # 20 MB of one shape; a rank is at most 16
    header = ('{"t":{"dtype":"U8","shape":[' + dims + '],"data_offsets":[0,1]}}').encode()
    path = root / "wide" / "model.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    server = Server(runtime_dir, [root])
    try:
        before_kb = peak_rss_kb(server.pid)
        start = time.monotonic()
        code, message = error_of(server, "load", str(root / "wide"), timeout=60)
        elapsed = time.monotonic() - start
        grown_mb = (peak_rss_kb(server.pid) - before_kb) / 1024
        print(f"a 10M-number shape ({len(header) >> 20} MiB header): refused in {elapsed:.2f} s, "
              f"peak RSS +{grown_mb:.0f} MB")
        assert code == "BAD_CHECKPOINT" and "more than 16 elements" in message, (code, message)
        # The header itself is read (20 MB); no document of its numbers is built.
        assert grown_mb < 100, grown_mb
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
