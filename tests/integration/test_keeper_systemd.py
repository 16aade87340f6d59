"""Restart without reload under systemd: a server run with a file-descriptor store keeps each
committed generation's descriptors there (sd_notify FDSTORE=1 with the descriptors), the next
server takes them back from LISTEN_FDS / LISTEN_FDNAMES, and unloading removes them
(FDSTOREREMOVE=1). A server says READY=1 once it serves and STOPPING=1 when it stops. systemd's side is played by the test, through the same interface: a datagram
socket named by NOTIFY_SOCKET, and descriptors passed from 3 on to a process whose pid
LISTEN_PID names. Real processes and sockets."""
import fcntl
import os
import socket
import sys
import tempfile

import pytest
from checkpoints import tensor_crcs, write_opt_like
from harness import Server
from test_keeper import attach, crcs, hide_checkpoint
from test_publish import run_writer

# Execs the command line given after it with the descriptors TEST_PASS_FDS names (in that order)
# at 3, 4, ... and LISTEN_PID set to its own pid, which the exec keeps: what systemd does.
SYSTEMD_EXEC = """
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("TEST_PASS_FDS").split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""


class FakeSystemd:
    """systemd's notification socket and file-descriptor store."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sdnotify-")  # short: a socket path's limit
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(30)
        self.store = {}  # FDNAME -> descriptor

    def env(self, fdstore_max=64):
        env = dict(os.environ, NOTIFY_SOCKET=self.path)
        if fdstore_max is not None:
            env["FDSTORE"] = str(fdstore_max)
        return env

    def receive(self):
        """The next notification: its fields, and the descriptors that came with it (stored as
        systemd would, or removed)."""
        data, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        if fields.get("FDSTORE") == "1":
            assert len(fds) == 1, fields
            assert fields["FDNAME"] not in self.store
            self.store[fields["FDNAME"]] = fds[0]
        elif fields.get("FDSTOREREMOVE") == "1":
            os.close(self.store.pop(fields["FDNAME"]))
        else:
            for fd in fds:
                os.close(fd)
        return fields

    def drain(self):
        """Every notification already sent (their senders have exited)."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.receive())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(30)
        return out

    def receive_until_stored(self, name):
        while name not in self.store:
            self.receive()

    def start(self, runtime_dir, models, *extra, env=None):
        """A server started the way systemd starts one, given the store."""
        names = list(self.store)
        env = dict(env or self.env(), TEST_PASS_FDS=",".join(str(self.store[n]) for n in names),
                   LISTEN_FDNAMES=":".join(names))
        return Server(runtime_dir, [models], keep=True, extra=list(extra), env=env,
                      launcher=[sys.executable, "-c", SYSTEMD_EXEC],
                      pass_fds=list(self.store.values()))

    def close(self):
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    write_opt_like(root / "opt-a", hidden=64, layers=2, vocab=512, dtype="float32", seed=1)
    return root


@pytest.fixture
def systemd():
    s = FakeSystemd()
    yield s
    s.close()


def inodes_of(pid):
    """The (device, inode) of every memfd a process holds."""
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
                st = os.stat(f"/proc/{pid}/fd/{name}")
                out.add((st.st_dev, st.st_ino))
        except FileNotFoundError:
            continue
    return out


def identity(fd):
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_server_under_systemd_keeps_models_in_its_fd_store(runtime_dir, models, systemd, how):
    expected = tensor_crcs(models / "opt-a")
    first = Server(runtime_dir, [models], keep=True, env=systemd.env())  # --keep auto
    try:
        assert "systemd's file-descriptor store holds committed models" in first.log_text()
        assert first.keeper_pid() is None  # no keeper process started
        first.cli("load", str(models / "opt-a"))
        systemd.receive_until_stored("companion.1.catalog")
        # One segment (host memory, a small model), the table and the catalog, named apart.
        assert sorted(systemd.store) == ["companion.1.catalog", "companion.1.s0",
                                         "companion.1.table"]
        # The segment and the table are the server's own memfds, not copies.
        held = inodes_of(first.pid)
        assert identity(systemd.store["companion.1.s0"]) in held
        assert identity(systemd.store["companion.1.table"]) in held
        # The catalog is a memfd sealed against any change.
        catalog = systemd.store["companion.1.catalog"]
        seals = fcntl.fcntl(catalog, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        assert os.pread(catalog, 1 << 16, 0).find(str(models / "opt-a").encode()) >= 0
        # A publication is kept as well.
        writer = run_writer(first, "engine/fused", "commit")
        assert writer.stdout.readline().split() == ["committed", "1"]
        writer.wait(timeout=30)
        systemd.receive_until_stored("companion.2.catalog")
        published = [m for m in first.cli_json("ls")[0] if m["published"]][0]
    finally:
        getattr(first.proc, "terminate" if how == "SIGTERM" else "kill")()
        first.proc.wait(timeout=20)
    # Stopping or dying, the server removed nothing from the store (stopping, it said so).
    assert systemd.drain() == ([{"STOPPING": "1", "STATUS": "stopping"}] if how == "SIGTERM"
                               else [])
    assert len(systemd.store) == 6
    hide_checkpoint(models / "opt-a")

    second = systemd.start(runtime_dir, models)
    try:
        log = second.log_text()
        assert "adopted 2 models" in log and "0 dropped" in log, log
        assert "from systemd's file-descriptor store" in log
        assert "loading " not in log  # nothing read from the files
        listed = {m["key"]: m for m in second.cli_json("ls")[0]}
        loaded = [m for m in listed.values() if not m["published"]][0]
        assert loaded["state"] == "loaded" and "adopted after a restart" in loaded["message"]
        assert crcs(attach(second, models / "opt-a")) == expected
        again = listed["engine/fused"]
        assert again["generation"] == published["generation"]
        assert again["generations"][0]["digests"] == published["generations"][0]["digests"]
        second.cli("unload", "engine/fused")
        while any(name.startswith("companion.2.") for name in systemd.store):
            assert "FDSTORE" not in systemd.receive()
        # The memory served is the one systemd holds.
        assert identity(systemd.store["companion.1.s0"]) in inodes_of(second.pid)

        second.cli("unload", str(models / "opt-a"))
        removed = []
        while systemd.store:
            fields = systemd.receive()
            assert "FDSTORE" not in fields, fields  # an adopted generation is stored already
            removed.append(fields["FDNAME"])
        assert sorted(removed) == ["companion.1.catalog", "companion.1.s0", "companion.1.table"]
    finally:
        assert second.stop() == 0


def test_a_server_under_systemd_says_when_it_serves_and_when_it_stops(runtime_dir, models,
                                                                      systemd):
    # Type=notify: systemd waits for READY=1 before `systemctl start` returns and units ordered
    # after this one start; STOPPING=1 and STATUS= show in `systemctl status`.
    server = Server(runtime_dir, [models], env=systemd.env(fdstore_max=None))  # --no-keep
    try:
        ready = systemd.receive()
        assert ready == {"READY": "1", "STATUS": "serving companion/model_server_host instance "
                         f"{server.instance} on {server.socket}"}
        server.cli("health")  # ready means serving
    finally:
        assert server.stop() == 0
    assert systemd.drain() == [{"STOPPING": "1", "STATUS": "stopping"}]


def test_an_incomplete_generation_in_the_store_is_removed_not_adopted(runtime_dir, models,
                                                                      systemd):
    first = Server(runtime_dir, [models], keep=True, env=systemd.env())
    try:
        first.cli("load", str(models / "opt-a"))
        systemd.receive_until_stored("companion.1.catalog")
    finally:
        first.proc.kill()
        first.proc.wait(timeout=20)
    # As if the server had died before storing its catalog.
    os.close(systemd.store.pop("companion.1.catalog"))

    second = systemd.start(runtime_dir, models)
    try:
        assert systemd.receive() == {"FDSTOREREMOVE": "1", "FDNAME": "companion.1.s0"}
        assert systemd.receive() == {"FDSTOREREMOVE": "1", "FDNAME": "companion.1.table"}
        assert systemd.store == {}
        assert "generation 1 is not usable (no catalog)" in second.log_text()
        assert second.cli_json("ls")[0] == []
    finally:
        assert second.stop() == 0


def test_keep_no_removes_what_systemd_passed(runtime_dir, models, systemd):
    first = Server(runtime_dir, [models], keep=True, env=systemd.env())
    try:
        first.cli("load", str(models / "opt-a"))
        systemd.receive_until_stored("companion.1.catalog")
    finally:
        first.proc.kill()
        first.proc.wait(timeout=20)
    second = systemd.start(runtime_dir, models, "--keep", "no")
    try:
        while systemd.store:
            assert systemd.receive()["FDSTOREREMOVE"] == "1"
        assert "removed 1 generations from systemd's file-descriptor store" in second.log_text()
        assert second.cli_json("ls")[0] == []
    finally:
        assert second.stop() == 0


def test_keep_keeper_ignores_the_fd_store(runtime_dir, models, systemd):
    server = Server(runtime_dir, [models], keep=True, env=systemd.env(), extra=["--keep", "keeper"])
    try:
        assert server.keeper_pid() is not None
        assert "systemd's file-descriptor store" not in server.log_text()
    finally:
        assert server.stop() == 0
