"""Who a client trusts: the runtime directory, its records and lock files, the sockets they name,
the process serving them, and etcd (TLS, client certificates, user/password authentication).
Real servers, a second local user, a real etcd."""
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time

import pytest

from checkpoints import write_opt_like
from harness import COMPANION, ETCD, PYTHON_LIBRARY, REPO, Server, free_port, wait_until

# Every client command here must end well within this: a hang is a failure, not a slow pass.
BOUNDED_S = 20


def run_cli(*args, env=None, timeout=BOUNDED_S):
    started = time.monotonic()
    r = subprocess.run([str(COMPANION), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r, time.monotonic() - started


def write_record(directory, instance, socket_path, pid, ns="companion"):
    record = {"instance_id": instance, "namespace": ns, "component": "model_server_host",
              "socket_path": str(socket_path), "pid": pid, "hostname": socket.gethostname(),
              "device": "host", "device_ordinal": -1, "started_at_ms": 1,
              "version": "0.1.0", "backends": ["host"], "default_backend": "host"}
    path = pathlib.Path(directory) / f"{instance}.json"
    path.write_text(json.dumps(record))
    return path


def hold_lock(directory, instance):
    """Holds <instance>.lock as a live server would (released when the file object closes)."""
    f = open(pathlib.Path(directory) / f"{instance}.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


# ---- finding 7 (client side): nothing in the runtime directory blocks a client --------------

def test_fifo_record_and_fifo_lock_do_not_block_client_commands(server):
    d = server.runtime_dir
    os.mkfifo(d / "planted.json")
    write_record(d, "fifolock", d / "fifolock.sock", os.getpid())
    os.mkfifo(d / "fifolock.lock")
    for command in ("ls", "health"):
        r, took = run_cli(command, "--runtime-dir", d)
        assert r.returncode == 0, r.stderr
        assert took < 10, f"{command} took {took:.1f} s"
    # Skipped, and left where they are.
    assert stat.S_ISFIFO(os.lstat(d / "planted.json").st_mode)
    assert stat.S_ISFIFO(os.lstat(d / "fifolock.lock").st_mode)


def test_socket_that_never_accepts_costs_a_bounded_connect(runtime_dir):
    # A listener with a full backlog: a blocking connect() to it would wait for ever.
    path = runtime_dir / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):  # more than the backlog takes
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        write_record(runtime_dir, "stuck", path, os.getpid())
        with hold_lock(runtime_dir, "stuck"):
            r, took = run_cli("health", "--runtime-dir", runtime_dir, "--instance", "stuck")
        assert r.returncode != 0
        assert "not accepted within 5000 ms" in r.stderr, r.stderr
        assert took < 15, f"health took {took:.1f} s"
    finally:
        for s in fillers:
            s.close()
        listener.close()


# ---- finding 10: the runtime directory ------------------------------------------------------

def test_world_writable_runtime_dir_is_refused_by_server_and_ignored_by_clients(
        runtime_dir, model_root):
    runtime_dir.chmod(0o777)
    r = subprocess.run([str(COMPANION), "serve", "--device", "host", "--runtime-dir",
                        str(runtime_dir), "--model-root", str(model_root)],
                       capture_output=True, text=True, timeout=BOUNDED_S)
    assert r.returncode != 0
    assert "companion serving" not in r.stdout
    message = r.stderr
    assert str(runtime_dir) in message and "mode 0777" in message, message
    assert "owner uid 0" in message and "chmod o-w" in message, message

    # A server that started while the directory was safe; then the directory is opened up.
    runtime_dir.chmod(0o700)
    s = Server(runtime_dir, [model_root])
    try:
        assert run_cli("ls", "--runtime-dir", runtime_dir)[0].returncode == 0
        runtime_dir.chmod(0o777)
        r, _ = run_cli("ls", "--runtime-dir", runtime_dir)
        assert r.returncode != 0
        assert "writable by every user" in r.stderr, r.stderr
    finally:
        runtime_dir.chmod(0o700)
        s.stop()


def test_runtime_dir_is_1770_whatever_the_umask(tmp_path, model_root):
    fresh = tmp_path / "made-by-server"
    old = os.umask(0)
    try:
        s = Server(fresh, [model_root])
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o1770
    finally:
        s.stop()


def test_group_members_cannot_hide_the_server(shared_tmp, model_root, other_user):
    """With --socket-group the group may enter the runtime directory, but its sticky bit keeps
    members from renaming or removing the server's record and socket."""
    fresh = shared_tmp / "rt"
    s = Server(fresh, [model_root], extra=["--socket-group", str(other_user.gid)])
    try:
        record = fresh / f"{s.instance}.json"
        for victim in (record, pathlib.Path(s.socket)):
            r = other_user.run(["mv", victim, str(victim) + ".moved"])
            assert r.returncode != 0 and victim.exists(), (victim, r.stderr)
        assert s.cli("health").returncode == 0
    finally:
        assert s.stop() == 0, s.log_text()


# ---- finding 10: records and servers planted by another user ---------------------------------

PLANT = """
import fcntl, shutil, sys
record, into = sys.argv[1], sys.argv[2]
shutil.copy(record, into)
lock = open(into[:-len(".json")] + ".lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)  # held like a live server's, until stdin closes
print("planted", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def planted(other_user, shared_tmp):
    """The other user's real server, with its record planted (and its lock held) in a directory
    root's clients read: owned by root, mode 0770, group the other user's (as --socket-group
    would make it for a server that serves that group)."""
    binary = shared_tmp / "companion"
    shutil.copy(COMPANION, binary)
    binary.chmod(0o755)
    models = shared_tmp / "models"
    write_opt_like(models / "bait", hidden=64, layers=1, vocab=128, dtype="float32")
    for p in [models, *models.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    own = shared_tmp / "other-runtime"
    own.mkdir(mode=0o700)
    os.chown(own, other_user.uid, other_user.gid)
    runtime = shared_tmp / "runtime"
    runtime.mkdir()
    os.chown(runtime, 0, other_user.gid)
    runtime.chmod(0o770)
    server = other_user.popen([binary, "serve", "--device", "host", "--runtime-dir", own,
                               "--model-root", models, "--no-keep"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    planter = None
    try:
        line = server.stdout.readline()
        assert "companion serving" in line, server.stderr.read() if server.poll() else line
        instance = line.split(" instance ")[1].split()[0]
        planter = other_user.popen(["/usr/bin/python3", "-c", PLANT, own / f"{instance}.json",
                                    runtime / f"{instance}.json"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert planter.stdout.readline().strip() == "planted"
        yield runtime, models / "bait", instance
    finally:
        for proc in (planter, server):
            if proc is None:
                continue
            if proc is planter:
                proc.stdin.close()
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_clients_refuse_a_server_planted_by_another_user(planted):
    runtime, model, instance = planted
    record = runtime / f"{instance}.json"
    assert record.exists() and record.stat().st_uid != 0

    r, _ = run_cli("attach", model, "--runtime-dir", runtime, "--json")
    assert r.returncode != 0, f"root attached the other user's weights:\n{r.stdout}"
    assert "not a trusted owner" in r.stderr, r.stderr

    script = ("import sys, companion\n"
              "try:\n"
              "    with companion.connect(runtime_dir=sys.argv[1]) as c:\n"
              "        c.get_model_parameters(sys.argv[2])\n"
              "    print('ATTACHED')\n"
              "except companion.Error as e:\n"
              "    print('REFUSED', e)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"),
               COMPANION_LIBRARY=str(PYTHON_LIBRARY))
    py = subprocess.run([sys.executable, "-c", script, str(runtime), str(model)], env=env,
                        capture_output=True, text=True, timeout=BOUNDED_S)
    assert "REFUSED" in py.stdout and "ATTACHED" not in py.stdout, py.stdout + py.stderr

    # Trusting that user explicitly is the way to use its server.
    trusted = dict(os.environ, COMPANION_TRUST_UID=str(record.stat().st_uid))
    r, _ = run_cli("attach", model, "--runtime-dir", runtime, "--json", env=trusted)
    assert r.returncode == 0, r.stderr


def test_record_whose_pid_is_not_the_servers_is_refused(server):
    d = server.runtime_dir
    # Names the real server's socket (owned by root, like the record) but another pid.
    write_record(d, "impostor", server.socket, os.getpid())
    with hold_lock(d, "impostor"):
        r, _ = run_cli("health", "--runtime-dir", d, "--instance", "impostor")
    assert r.returncode != 0
    assert "not permitted" in r.stderr, r.stderr
    assert f"claims uid 0 pid {os.getpid()}" in r.stderr, r.stderr
    assert f"served by pid {server.pid} uid 0" in r.stderr, r.stderr
    # The real record still works.
    assert server.cli("health").returncode == 0


# ---- finding 10: etcd over TLS, and with authentication --------------------------------------

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)


def make_cert(directory, ca, name, server):
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else
                   "extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem",
            cwd=directory)


class TlsEtcd:
    """etcd serving clients over TLS only, requiring a client certificate signed by its CA."""

    def __init__(self, directory):
        self.dir = directory
        make_ca(directory, "ca")
        make_cert(directory, "ca", "server", server=True)
        make_cert(directory, "ca", "client", server=False)
        port, peer = free_port(), free_port()
        self.endpoint = f"https://127.0.0.1:{port}"
        self.url = f"etcds://127.0.0.1:{port}"
        self.log = open(directory / "etcd.log", "w")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "tls", "--data-dir", str(directory / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
             "--cert-file", str(directory / "server.pem"),
             "--key-file", str(directory / "server.key"),
             "--trusted-ca-file", str(directory / "ca.pem"), "--client-cert-auth",
             "--log-level", "warn"], stdout=self.log, stderr=self.log)
        if not wait_until(self.healthy, timeout=20, interval=0.1):
            self.stop()
            raise RuntimeError((directory / "etcd.log").read_text()[-3000:])

    def healthy(self):
        import urllib.request
        context = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        context.load_cert_chain(str(self.dir / "client.pem"), str(self.dir / "client.key"))
        try:
            req = urllib.request.Request(self.endpoint + "/v3/kv/range", data=b'{"key":"AA=="}')
            with urllib.request.urlopen(req, timeout=1, context=context):
                return True
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def tls_etcd(tmp_path):
    if not os.access(ETCD, os.X_OK) or shutil.which("openssl") is None:
        pytest.skip("needs etcd and openssl")
    d = tmp_path / "tls"
    d.mkdir()
    e = TlsEtcd(d)
    yield e
    e.stop()


def registered(server):
    return "registered in etcd at " in server.log_text()


def test_etcd_over_tls_with_client_certificates(tls_etcd, runtime_dir, model_root, tmp_path):
    d = tls_etcd.dir
    tls = ["--registry-ca", d / "ca.pem", "--registry-cert", d / "client.pem",
           "--registry-key", d / "client.key"]
    s = Server(runtime_dir, [model_root], extra=["--registry", tls_etcd.url, *map(str, tls)])
    # A second CA, which did not sign etcd's certificate.
    other = tmp_path / "other-ca"
    other.mkdir()
    make_ca(other, "ca")
    wrong = Server(runtime_dir, [model_root],
                   extra=["--registry", tls_etcd.url, "--registry-ca", str(other / "ca.pem")])
    try:
        assert wait_until(lambda: registered(s), timeout=10), s.log_text()
        empty = tmp_path / "no-local-records"
        empty.mkdir(mode=0o700)
        env = dict(os.environ, COMPANION_REGISTRY_CA=str(d / "ca.pem"),
                   COMPANION_REGISTRY_CERT=str(d / "client.pem"),
                   COMPANION_REGISTRY_KEY=str(d / "client.key"))
        r, _ = run_cli("attach", model_root / "opt-small", "--registry", tls_etcd.url,
                       "--runtime-dir", empty, "--instance", s.instance, "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["server"]["instance_id"] == s.instance

        # Wrong CA: the server says why it is not registered, and serves local clients.
        assert not registered(wrong)
        assert "TLS" in wrong.log_text(), wrong.log_text()
        assert wrong.cli("health").returncode == 0
        # No client certificate: refused by etcd, a typed error naming TLS.
        no_cert = dict(os.environ, COMPANION_REGISTRY_CA=str(d / "ca.pem"))
        r, _ = run_cli("ls", "--registry", tls_etcd.url, "--runtime-dir", empty, env=no_cert)
        assert r.returncode != 0
        assert "not reached" in r.stderr and "TLS" in r.stderr, r.stderr
    finally:
        s.stop()
        wrong.stop()


def enable_auth(etcd, password):
    etcd.request("/v3/auth/user/add", {"name": "root", "password": password})
    etcd.request("/v3/auth/role/add", {"name": "root"})
    etcd.request("/v3/auth/user/grant", {"user": "root", "role": "root"})
    etcd.request("/v3/auth/enable", {})


def test_etcd_with_user_and_password(etcd, runtime_dir, model_root, tmp_path):
    password = tmp_path / "etcd-password"
    password.write_text("s3cret-for-test\n")
    password.chmod(0o600)
    enable_auth(etcd, "s3cret-for-test")
    bad = tmp_path / "bad-password"
    bad.write_text("wrong\n")
    auth = ["--registry-user", "root", "--registry-password-file", str(password)]
    s = Server(runtime_dir, [model_root], extra=["--registry", etcd.url, *auth])
    refused = Server(runtime_dir, [model_root],
                     extra=["--registry", etcd.url, "--registry-user", "root",
                            "--registry-password-file", str(bad)])
    try:
        assert wait_until(lambda: registered(s), timeout=10), s.log_text()
        empty = tmp_path / "no-local-records"
        empty.mkdir(mode=0o700)
        env = dict(os.environ, COMPANION_REGISTRY_USER="root",
                   COMPANION_REGISTRY_PASSWORD_FILE=str(password))
        r, _ = run_cli("attach", model_root / "opt-small", "--registry", etcd.url,
                       "--runtime-dir", empty, "--instance", s.instance, "--json", env=env)
        assert r.returncode == 0, r.stderr

        assert not registered(refused)
        assert "etcd refused user 'root'" in refused.log_text(), refused.log_text()
        assert refused.cli("health").returncode == 0
        bad_env = dict(env, COMPANION_REGISTRY_PASSWORD_FILE=str(bad))
        r, _ = run_cli("ls", "--registry", etcd.url, "--runtime-dir", empty, env=bad_env)
        assert r.returncode != 0
        assert "etcd refused user 'root'" in r.stderr, r.stderr
        # Without credentials etcd answers nothing either.
        r, _ = run_cli("ls", "--registry", etcd.url, "--runtime-dir", empty)
        assert r.returncode != 0
    finally:
        s.stop()
        refused.stop()


def children(pid):
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_server_in_another_pid_namespace_is_checked_by_uid(runtime_dir, model_root):
    """A server in a container sees its own pid and writes it in its record: the client sees
    another. The pid cannot be compared then; the uid still is."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    # A shell is the namespace's init (pid 1, which ignores SIGTERM), the server its child.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
                             '"$@" & wait', "sh", str(COMPANION), "serve", "--device", "host",
                             "--runtime-dir", str(runtime_dir), "--model-root", str(model_root),
                             "--no-keep"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "companion serving" in line, line
        instance = line.split(" instance ")[1].split()[0]
        (shell,) = children(proc.pid)
        (server_pid,) = children(shell)
        record_pid = json.loads((runtime_dir / f"{instance}.json").read_text())["pid"]
        assert record_pid != server_pid  # its own view
        r, _ = run_cli("health", "--runtime-dir", runtime_dir, "--instance", instance)
        assert r.returncode == 0, r.stderr
        os.kill(server_pid, signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child: the namespace goes with it
            proc.wait()
