"""Fault injection with real server processes (host backend): the server killed with SIGKILL at
each load stage, failures injected at each stage (out of memory at allocation and mid-load, a
read error in the middle of a file), and etcd frozen for 60 s. What is checked: nothing is left
behind (the victim model's memfds, counted over every process; shared memory; the server's
descriptors and memory), a client of another model keeps its bytes, errors say what happened,
and the server goes on serving.

Faults come from COMPANION_TEST_FAULT (src/common/fault_point.hpp), set for the server only; one
test makes a real shortage instead (a checkpoint past the machine's memory, in a namespace whose
/proc/meminfo overstates it)."""
import json
import os
import pathlib
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from checkpoints import tensor_crcs, write_opt_like
from harness import (ASAN_BUILD, PYTHON_LIBRARY, REPO, TSAN_BUILD, Server, SessionClient,
                     wait_until)

STAGES = ["open", "allocate", "read", "copy", "seal", "export"]
VICTIM = "opt-victim"
# Shared memory may rise this much over the baseline (other processes of the machine) for a while;
# the victim (~60 MiB) is well past it. The victim's memfds are counted exactly besides.
SHMEM_TOLERANCE_KB = 24 * 1024
# The server's private memory may grow this much across a failed load (allocator caches; under
# AddressSanitizer its quarantine keeps freed buffers, up to 256 MiB).
ANON_TOLERANCE_KB = (300 if ASAN_BUILD or TSAN_BUILD else 8) * 1024


@pytest.fixture(scope="module")
def fault_root(tmp_path_factory):
    """A victim (~60 MiB, float32, 68 tensors: many read items) and a small bystander model."""
    root = tmp_path_factory.mktemp("fault-models")
    write_opt_like(root / VICTIM, hidden=512, layers=4, vocab=4096, dtype="float32", seed=3)
    write_opt_like(root / "opt-bystander", hidden=64, layers=2, vocab=256, positions=16, seed=4)
    write_opt_like(root / "opt-third", hidden=64, layers=2, vocab=256, positions=16, seed=5)
    return root


def meminfo_kb(field):
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memfds_named(label):
    """How many descriptors and mappings of memfds whose name starts with companion:LABEL exist
    in every process of the machine (a memfd lives as long as one of either does)."""
    needle = f"memfd:companion:{label}:"
    count = 0
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    if needle in os.readlink(fd):
                        count += 1
                except OSError:
                    pass
            count += (proc / "maps").read_text().count(needle)
        except OSError:  # gone, or not ours to read
            pass
    return count


def status_kb(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid):
    """The server's descriptors once the connections of CLI commands that just ended are closed
    (the count stops going down)."""
    count = fd_count(pid)
    for _ in range(50):
        time.sleep(0.1)
        now = fd_count(pid)
        if now == count:
            return now
        count = now
    return count


def fd_listing(pid, baseline):
    return "\n".join([f"baseline {baseline}:"] + [os.readlink(f"/proc/{pid}/fd/{fd}")
                                                    for fd in os.listdir(f"/proc/{pid}/fd")])


def file_crcs(model):
    return {name: crc for name, (_, _, crc) in tensor_crcs(model).items()}


def session_for(server):
    return SessionClient("--socket", server.socket, "--device", "host")


def model_id(server, model):
    """The short id the server gives the model (the label of its memfds)."""
    return server.cli_json("status", str(model))[0]["id"]


def attach_and_check(session, model):
    got = session(f"attach {model}")
    assert got["ok"], got
    return check_sums(session, model)


def check_sums(session, model):
    """Every mapping the session holds of `model` still reads the file's bytes."""
    got = session("verify")
    assert got["ok"], got
    sums = [m["sums"] for m in got["models"] if m["source"] == str(model)]
    assert sums and all(s == file_crcs(model) for s in sums)
    return sums


def cli_popen(server, *args):
    return subprocess.Popen(server.command(*args, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fault_env(spec):
    return {**os.environ, "COMPANION_TEST_FAULT": spec}


@pytest.mark.parametrize("stage", STAGES)
def test_server_killed_at_each_load_stage_leaks_nothing_and_hurts_no_other_client(
        stage, runtime_dir, fault_root):
    victim, bystander = fault_root / VICTIM, fault_root / "opt-bystander"
    # copy: mid-load, with about half of the victim's items in its memfds.
    point = "copy@30" if stage == "copy" else stage
    server = Server(runtime_dir, [fault_root], env=fault_env(f"pause-at={point},path={VICTIM}"))
    session = None
    pending = None
    try:
        session = session_for(server)
        attach_and_check(session, bystander)
        label = model_id(server, victim)
        assert memfds_named(label) == 0
        shmem_before = meminfo_kb("Shmem")

        if stage == "export":  # loads, then stops when a client asks for a lease
            server.cli("load", str(victim))
            pending = cli_popen(server, "attach", str(victim))
        else:
            pending = cli_popen(server, "load", str(victim))
        assert wait_until(lambda: f"paused at {stage} " in server.log_text(), timeout=30), \
            server.log_text()
        if stage in ("copy", "seal", "export"):
            # The victim's memory exists and the count sees it: it must go with the server.
            assert memfds_named(label) > 0
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)

        # The waiting client gets an error, not a hang.
        out, err = pending.communicate(timeout=30)
        assert pending.returncode != 0
        assert json.loads(out)["error"]["code"] in ("CONNECTION_CLOSED", "UNAVAILABLE"), out
        # The bystander's client still reads its model's bytes, without the server.
        check_sums(session, bystander)
        # Nothing of the victim is left anywhere, and shared memory is back.
        assert wait_until(lambda: memfds_named(label) == 0, timeout=10)
        assert wait_until(lambda: meminfo_kb("Shmem") <= shmem_before + SHMEM_TOLERANCE_KB,
                          timeout=20), (meminfo_kb("Shmem"), shmem_before)
    finally:
        if pending and pending.poll() is None:
            pending.kill()
            pending.wait()
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.log.close()

    # A new server in the same runtime directory serves the model.
    restarted = Server(runtime_dir, [fault_root])
    try:
        fresh = session_for(restarted)
        try:
            attach_and_check(fresh, victim)
        finally:
            assert fresh.close() == 0
        check_sums(session, bystander)
    finally:
        assert session.close() == 0
        assert restarted.stop() == 0


# (fault spec for the victim's load, the code its client gets, words of the message)
FAILURES = {
    "open-io-error": ("fail-at=open:IO_ERROR", "IO_ERROR", "open"),
    "oom-at-allocation": ("fail-at=allocate:OUT_OF_MEMORY", "OUT_OF_MEMORY", "allocate"),
    # The 30th of the ~80 items read (a tensor, or 4 MiB of one): in the middle of the file.
    "read-error-mid-file": ("fail-at=read@30:IO_ERROR", "IO_ERROR", "read"),
    "oom-mid-load": ("fail-at=copy@30:OUT_OF_MEMORY", "OUT_OF_MEMORY", "copy"),
    "seal-error": ("fail-at=seal:INTERNAL", "INTERNAL", "seal"),
}


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_failed_load_is_a_clear_error_and_returns_every_resource(name, runtime_dir, fault_root):
    spec, code, stage = FAILURES[name]
    victim, bystander = fault_root / VICTIM, fault_root / "opt-bystander"
    server = Server(runtime_dir, [fault_root], env=fault_env(f"{spec},path={VICTIM}"))
    session = session_for(server)
    try:
        attach_and_check(session, bystander)
        label = model_id(server, victim)
        # Baselines once the server has served a load and holds a client.
        fds_before = settled_fd_count(server.pid)
        anon_before = status_kb(server.pid, "RssAnon")
        mapped_shmem_before = status_kb(server.pid, "RssShmem")
        shmem_before = meminfo_kb("Shmem")
        slab_before = server.cli_json("health")[0]["slab_bytes"]

        out, rc = server.cli_json("load", str(victim), check=False)
        assert rc != 0 and out["error"]["code"] == code, out
        message = out["error"]["message"]
        assert message.startswith(f"{stage} ") and str(victim) in message, message
        listed = {m["source"]: m for m in server.cli_json("ls")[0]}
        assert listed[str(victim)]["state"] == "error"
        assert listed[str(victim)]["error"]["code"] == code

        # Everything the load took is given back.
        assert wait_until(lambda: memfds_named(label) == 0, timeout=10)
        assert wait_until(lambda: fd_count(server.pid) == fds_before, timeout=10), \
            fd_listing(server.pid, fds_before)
        # The slab's pages (mapped while loading) and the readers' buffers.
        assert status_kb(server.pid, "RssShmem") <= mapped_shmem_before + 1024
        anon = status_kb(server.pid, "RssAnon")
        print(f"{name}: server RssAnon {anon_before} -> {anon} kB")
        assert anon <= anon_before + ANON_TOLERANCE_KB, (anon, anon_before)
        assert wait_until(lambda: meminfo_kb("Shmem") <= shmem_before + SHMEM_TOLERANCE_KB,
                          timeout=20), (meminfo_kb("Shmem"), shmem_before)
        assert server.cli_json("health")[0]["slab_bytes"] == slab_before

        # The server goes on serving: the bystander's client still reads, a new model loads, and
        # the victim loads when asked again (the fault fires once).
        check_sums(session, bystander)
        attach_and_check(session, fault_root / "opt-third")
        attach_and_check(session, victim)
    finally:
        assert session.close() == 0
        assert server.stop() == 0


@pytest.mark.parametrize("spec", ["fail-at=allocate@2:OUT_OF_MEMORY", "fail-at=seal@2:INTERNAL"])
def test_failed_reload_keeps_the_served_generation_and_frees_its_own(spec, runtime_dir,
                                                                     fault_root):
    """The second hit is the reload's (the first load made the first)."""
    victim = fault_root / VICTIM
    server = Server(runtime_dir, [fault_root], env=fault_env(f"{spec},path={VICTIM}"))
    session = session_for(server)
    try:
        server.cli("load", str(victim))
        attach_and_check(session, victim)
        label = model_id(server, victim)
        memfds_before = memfds_named(label)
        fds_before = settled_fd_count(server.pid)
        shmem_before = meminfo_kb("Shmem")

        out, rc = server.cli_json("reload", str(victim), "--force", check=False)
        code = spec.rsplit(":", 1)[1]
        stage = spec.split("=")[1].split("@")[0]
        assert rc != 0 and out["error"]["code"] == code, out
        assert out["error"]["message"].startswith(f"reload failed: {stage} "), out
        [entry] = [m for m in server.cli_json("ls")[0] if m["source"] == str(victim)]
        assert entry["state"] == "loaded" and entry["reload_error"]["code"] == code, entry
        assert [g["generation"] for g in entry["generations"]] == [1], entry
        # The failed generation's memory and descriptors are gone.
        assert wait_until(lambda: memfds_named(label) == memfds_before, timeout=10), \
            (memfds_named(label), memfds_before)
        assert wait_until(lambda: fd_count(server.pid) == fds_before, timeout=10), \
            fd_listing(server.pid, fds_before)
        assert wait_until(lambda: meminfo_kb("Shmem") <= shmem_before + SHMEM_TOLERANCE_KB,
                          timeout=20), (meminfo_kb("Shmem"), shmem_before)
        # The reader of generation 1 is untouched; a new reader gets generation 1 too.
        check_sums(session, victim)
        attach_and_check(session, victim)
    finally:
        assert session.close() == 0
        assert server.stop() == 0


def test_failed_export_refuses_one_lease_and_counts_none(runtime_dir, fault_root):
    victim = fault_root / VICTIM
    server = Server(runtime_dir, [fault_root],
                    env=fault_env(f"fail-at=export:OUT_OF_MEMORY,path={VICTIM}"))
    session = session_for(server)
    try:
        server.cli("load", str(victim))
        fds_before = settled_fd_count(server.pid)
        got = session(f"attach {victim}")
        assert not got["ok"] and got["code"] == "OUT_OF_MEMORY", got
        assert got["message"].startswith("export ") and "COMPANION_TEST_FAULT" in got["message"]
        assert server.cli_json("health")[0]["leases"] == 0
        assert wait_until(lambda: fd_count(server.pid) == fds_before, timeout=10), \
            fd_listing(server.pid, fds_before)
        # The model stays loaded, and the next lease is granted.
        attach_and_check(session, victim)
        assert server.cli_json("health")[0]["leases"] == 1
    finally:
        assert session.close() == 0
        assert server.stop() == 0


def test_bad_fault_spec_stops_the_server_at_start(runtime_dir, fault_root):
    with pytest.raises(RuntimeError, match="unknown stage 'reed'"):
        Server(runtime_dir, [fault_root], env=fault_env("fail-at=reed:IO_ERROR"))


def host_memory_bytes():
    """RAM + swap of the machine, as the kernel counts them for overcommit."""
    return (meminfo_kb("MemTotal") + meminfo_kb("SwapTotal")) * 1024


def write_sparse_safetensors(path, total_bytes, tensors=4):
    """A checkpoint of `tensors` U8 tensors that add up to about total_bytes, written as a header
    and a hole: it costs no disk and reads as zeros."""
    each = -(-total_bytes // tensors)
    header = {f"t{i}": {"dtype": "U8", "shape": [each], "data_offsets": [i * each, (i + 1) * each]}
              for i in range(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + tensors * each)


def overstated_memory_launcher(directory, factor):
    """A launcher for Server: the server runs in its own user and mount namespaces, where
    /proc/meminfo shows `factor` times the machine's RAM + swap as total, free and available,
    and no cgroup limit is visible (an empty /sys/fs/cgroup). The store admits loads against
    those figures, as in a container that shows more memory than the host has to give; the
    kernel still has only the real memory. None where unprivileged namespaces are not allowed."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        return None
    claimed_kb = factor * host_memory_bytes() // 1024
    lines = []
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("MemTotal", "MemFree", "MemAvailable"):
            line = f"{key}:{claimed_kb:>16} kB"
        lines.append(line)
    fake = directory / "meminfo"
    fake.write_text("\n".join(lines) + "\n")
    script = (f"mount --bind {fake} /proc/meminfo && mount -t tmpfs none /sys/fs/cgroup"
              ' && exec "$@"')
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


def server_memfds(pid):
    """The server's descriptors open on memfds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                count += 1
        except OSError:
            pass
    return count


def test_checkpoint_past_the_machine_memory_fails_at_once_and_the_server_keeps_serving(
        runtime_dir, fault_root, tmp_path):
    """A real shortage, no fault injected: a sparse checkpoint of twice the machine's RAM + swap
    that the store admits (its /proc/meminfo claims four times the machine). The host backend
    refuses the slab before it takes a page: OUT_OF_MEMORY in seconds, with the sizes; nothing
    is left behind; the server serves another model to another client. Without that refusal the
    loader would write the zeros into memfd pages until the OOM killer ended the server: to keep
    an old build from doing that to the machine, the server's address space is limited to RAM +
    swap here, which makes such a build fail its mapping of the slab (a different message)
    instead. AddressSanitizer builds reserve terabytes of address space: no limit there."""
    launcher = overstated_memory_launcher(tmp_path, factor=4)
    if launcher is None:
        pytest.skip("unprivileged user and mount namespaces are not allowed here")
    huge = tmp_path / "models" / "past-memory"
    write_sparse_safetensors(huge / "model.safetensors", 2 * host_memory_bytes())
    bystander = fault_root / "opt-bystander"
    limit = None
    if not (ASAN_BUILD or TSAN_BUILD):  # both reserve terabytes of address space up front
        limit = host_memory_bytes()

    def limit_address_space():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    server = Server(runtime_dir, [fault_root, huge.parent], launcher=launcher,
                    preexec_fn=limit_address_space)
    session = session_for(server)
    try:
        memfds_before = server_memfds(server.pid)
        fds_before = settled_fd_count(server.pid)
        start = time.monotonic()
        out, rc = server.cli_json("load", str(huge), check=False, timeout=60)
        elapsed = time.monotonic() - start
        print(f"load past memory refused in {elapsed:.2f} s: {out}")
        assert server.proc.poll() is None, server.log_text()
        assert rc != 0 and out["error"]["code"] == "OUT_OF_MEMORY", out
        message = out["error"]["message"]
        # The backend's refusal (the store admitted the load): the slab, RAM, swap, MemAvailable.
        assert "host slab of" in message and "RAM" in message and "MemAvailable" in message, \
            message
        assert elapsed < 20, elapsed

        # Nothing of the load is left: no memfd, no descriptor.
        assert server_memfds(server.pid) == memfds_before
        assert wait_until(lambda: fd_count(server.pid) == fds_before, timeout=10), \
            fd_listing(server.pid, fds_before)
        health, code = server.cli_json("health")
        assert code == 0 and health["state"] == "serving" and health["slab_bytes"] == 0, health

        # A publication of the same size goes through the same allocation: refused the same way.
        start = time.monotonic()
        code, message = publish_declared(server, "past-memory", 2 * host_memory_bytes())
        assert (code, time.monotonic() - start < 20) == ("OUT_OF_MEMORY", True), message
        assert "host slab of" in message and "MemAvailable" in message, message
        assert server.proc.poll() is None, server.log_text()
        assert server_memfds(server.pid) == memfds_before

        # Another client gets another model.
        attach_and_check(session, bystander)
    finally:
        assert session.close() == 0
        assert server.stop() == 0


DECLARER = textwrap.dedent("""
    import json, sys
    import companion
    from companion import errors
    client = companion.connect(namespace=sys.argv[1], runtime_dir=sys.argv[2])
    each = -(-int(sys.argv[4]) // 4)
    try:
        client.begin_publish(sys.argv[3], {f"t{i}": ("uint8", (each,)) for i in range(4)})
        print(json.dumps(["OK", ""]))
    except errors.Error as e:
        print(json.dumps([e.code_name, e.message]))
""")


def publish_declared(server, key, total_bytes):
    """A writer process declares a publication of total_bytes (4 uint8 tensors, never written):
    (the error's code name, its message), or ("OK", "")."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), COMPANION_LIBRARY=str(PYTHON_LIBRARY))
    r = subprocess.run([sys.executable, "-c", DECLARER, server.namespace, str(server.runtime_dir),
                        key, str(total_bytes)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return tuple(json.loads(r.stdout))


ETCD_TTL = 2  # seconds
PARTITION_S = 60


def test_etcd_frozen_for_a_minute_server_serves_and_registers_again(etcd, runtime_dir,
                                                                    fault_root):
    """etcd stopped with SIGSTOP (connections hang, unlike a dead etcd that refuses them) for
    60 s: local clients are served all along, health reports the lost registration, and once
    etcd runs again the server is registered again. Slow by nature (the partition), and kept in
    the suite on purpose."""
    bystander, third = fault_root / "opt-bystander", fault_root / "opt-third"
    server = Server(runtime_dir, [fault_root],
                    extra=["--registry", etcd.url, "--registry-ttl", str(ETCD_TTL)])
    key = f"/services/{server.namespace}/model_server_host/{server.instance}"
    session = session_for(server)
    frozen = False
    try:
        assert wait_until(lambda: key in etcd.records(), timeout=10)
        attach_and_check(session, bystander)
        etcd.proc.send_signal(signal.SIGSTOP)
        frozen = True
        start = time.monotonic()
        saw_unregistered = False
        loaded_third = False
        while time.monotonic() - start < PARTITION_S:
            # Every request of a local client is answered, and quickly.
            t0 = time.monotonic()
            health, code = server.cli_json("health", timeout=10)
            assert code == 0 and health["state"] == "serving"
            if health["registered"] is False:
                assert health["registry_error"]
                saw_unregistered = True
            check_sums(session, bystander)
            if not loaded_third:
                attach_and_check(session, third)
                loaded_third = True
            assert time.monotonic() - t0 < 5
            assert server.proc.poll() is None
            time.sleep(2)
        assert saw_unregistered, "health never reported the registration lost"
        etcd.proc.send_signal(signal.SIGCONT)
        frozen = False
        assert wait_until(lambda: key in etcd.records(), timeout=ETCD_TTL + 15, interval=0.2)
        assert wait_until(lambda: server.cli_json("health")[0]["registered"] is True, timeout=10)
        check_sums(session, bystander)
        assert server.proc.poll() is None
    finally:
        if frozen:
            etcd.proc.send_signal(signal.SIGCONT)
        assert session.close() == 0
        assert server.stop() == 0
