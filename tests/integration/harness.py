"""Running real `companion` server and client processes in tests (host and GPU suites)."""
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("COMPANION_BUILD_DIR", REPO / "build"))
COMPANION = BUILD / "src" / "cli" / "companion"
FAULT_CLIENT = BUILD / "tests" / "tools" / "companion-fault-client"
# Sanitizer builds (build-asan/, build-tsan/ as scripts/setup.sh names them): their memory and
# address-space figures are the sanitizer's, not the server's.
ASAN_BUILD = "asan" in BUILD.name
TSAN_BUILD = "tsan" in BUILD.name
# The Python package loads libcompanion.so into the interpreter, which is not built with the
# sanitizers: tests that use the package take the Release build's library whatever BUILD is.
PYTHON_LIBRARY = REPO / "build" / "src" / "capi" / "libcompanion.so"


class Server:
    """A `companion serve` process in its own runtime directory (host backend by default)."""

    def __init__(self, runtime_dir, model_roots, namespace="companion", extra=(), env=None,
                 device="host", launcher=(), preexec_fn=None, keep=False, pass_fds=()):
        """launcher: a command that execs the server's command line given after it (the
        server's pid stays the process's); preexec_fn: as for subprocess.Popen. keep: run with
        a keeper (restart without reload); tests run without one (--no-keep) unless they are
        about it, so that no test's memory outlives it. pass_fds: as for subprocess.Popen."""
        self.runtime_dir = pathlib.Path(runtime_dir)
        self.namespace = namespace
        self.log_path = self.runtime_dir.parent / f"server-{uuid.uuid4().hex[:8]}.log"
        self.device = device
        args = [*launcher, str(COMPANION), "serve", "--device", device, "--namespace", namespace,
                "--runtime-dir", str(self.runtime_dir), "--log-level", "info"]
        for root in model_roots:
            args += ["--model-root", str(root)]
        if not keep:
            args.append("--no-keep")
        args += list(extra)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=preexec_fn, pass_fds=pass_fds)
        line = self.proc.stdout.readline()
        if "companion serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.socket = line.split(" socket ")[1].strip()
        self.instance = line.split(" instance ")[1].split()[0]

    @property
    def pid(self):
        return self.proc.pid

    def command(self, *args):
        """A `companion` client command line aimed at this server (this instance, even when
        others share its runtime directory)."""
        return [str(COMPANION), *args[:1], "--namespace", self.namespace, "--device", self.device,
                "--runtime-dir", str(self.runtime_dir), "--instance", self.instance, *args[1:]]

    def cli(self, *args, check=True, timeout=60, env=None):
        """Runs a `companion` client command against this server; returns CompletedProcess."""
        cmd = self.command(*args)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def cli_json(self, *args, check=True, timeout=60):
        r = self.cli(*args, "--json", check=check, timeout=timeout)
        return json.loads(r.stdout), r.returncode

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text()

    def keeper_pid(self):
        """The pid of the keeper this server opened its session with (from its log), or None."""
        for line in self.log_text().splitlines():
            if " info: keeper " in line and " holds committed models" in line:
                return int(line.split(" info: keeper ")[1].split()[0])
        return None

    def rss_kb(self):
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not stop on SIGTERM")
        self.log.close()
        return self.proc.returncode


def alive(pid):
    """Whether process pid runs (a zombie is gone for our purposes: its descriptors are closed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


SESSION_CLIENT = BUILD / "tests" / "tools" / "companion-session-client"
ETCD = os.environ.get("COMPANION_ETCD", "/usr/bin/etcd")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """A real etcd (Debian's etcd-server) on loopback ports of its own, with its data in
    data_dir. stop() and start() restart it on the same ports, with or without its data."""

    def __init__(self, data_dir, start=True):
        self.data_dir = pathlib.Path(data_dir)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.url = f"etcd://127.0.0.1:{self.client_port}"
        self.proc = None
        self.log_path = self.data_dir.parent / f"etcd-{self.client_port}.log"
        self.log = None
        if start:
            self.start()

    def start(self, fresh=False):
        import shutil
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--log-level", "warn"],
            stdout=self.log, stderr=self.log)
        if not wait_until(self.healthy, timeout=20, interval=0.1):
            self.proc.kill()
            raise RuntimeError(f"etcd did not start:\n{self.log_path.read_text()[-3000:]}")

    def healthy(self):
        try:
            self.request("/v3/kv/range", {"key": _b64("/health-probe")}, timeout=1)
            return True
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        if self.log:
            self.log.close()

    def request(self, path, body, timeout=5):
        import urllib.request
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def records(self, prefix="/services/"):
        """{key: (value, lease)} of every key under prefix."""
        import base64
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        reply = self.request("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return {base64.b64decode(kv["key"]).decode():
                (base64.b64decode(kv.get("value", "")).decode(), int(kv.get("lease", 0)))
                for kv in reply.get("kvs", [])}

    def put(self, key, value):
        self.request("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})


@pytest.fixture
def runtime_dir(tmp_path):
    """A local registry directory of the test's own (conftests import this fixture)."""
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def etcd(tmp_path):
    """A real etcd for one test (conftests import this fixture); skips where etcd is missing."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"no etcd at {ETCD} (Debian's etcd-server; or set COMPANION_ETCD)")
    e = Etcd(tmp_path / "etcd-data")
    yield e
    e.stop(signal.SIGKILL)


OTHER_USER = "companion-test-other"


class OtherUser:
    """A second local account, for tests of who may connect. run() starts a command as it."""

    def __init__(self, name):
        import pwd
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid

    def command(self, args):
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--reset-env", "--", *[str(a) for a in args]]

    def run(self, args, timeout=60, env=None, **kwargs):
        return subprocess.run(self.command(args), capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)

    def popen(self, args, **kwargs):
        return subprocess.Popen(self.command(args), **kwargs)


@pytest.fixture(scope="session")
def other_user():
    """A second local user (created once as root; the tests need root to switch to it)."""
    import pwd
    if os.geteuid() != 0:
        pytest.skip("tests of a second local user run as root")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        OTHER_USER], check=True, capture_output=True)
    return OtherUser(OTHER_USER)


@pytest.fixture
def shared_tmp(tmp_path):
    """A directory that a second user can reach (pytest's own tmp_path is 0700 root)."""
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="companion-shared-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _b64(text):
    import base64
    return base64.b64encode(text.encode()).decode()


class SessionClient:
    """companion-session-client: one long-lived Client, one command at a time."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([str(SESSION_CLIENT), *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(self.proc.stdout.readline())

    def __call__(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"session client died on {command!r} ({self.proc.wait()})")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("session client did not quit")
        return self.proc.returncode
