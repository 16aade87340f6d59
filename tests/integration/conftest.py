"""Fixtures for end-to-end tests: real server processes, real sockets, real safetensors files."""
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid

import pytest

from checkpoints import write_opt_like

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("COMPANION_BUILD_DIR", REPO / "build"))
COMPANION = BUILD / "src" / "cli" / "companion"
FAULT_CLIENT = BUILD / "tests" / "tools" / "companion-fault-client"


def pytest_configure(config):
    if not COMPANION.exists():
        raise pytest.UsageError(f"{COMPANION} is missing: build first (scripts/setup.sh)")


class Server:
    """A `companion serve` process on the host backend, in its own runtime directory."""

    def __init__(self, runtime_dir, model_roots, namespace="companion", extra=(), env=None):
        self.runtime_dir = pathlib.Path(runtime_dir)
        self.namespace = namespace
        self.log_path = self.runtime_dir.parent / f"server-{uuid.uuid4().hex[:8]}.log"
        args = [str(COMPANION), "serve", "--device", "host", "--namespace", namespace,
                "--runtime-dir", str(self.runtime_dir), "--log-level", "info"]
        for root in model_roots:
            args += ["--model-root", str(root)]
        args += list(extra)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        if "companion serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.socket = line.split(" socket ")[1].strip()
        self.instance = line.split(" instance ")[1].split()[0]

    @property
    def pid(self):
        return self.proc.pid

    def cli(self, *args, check=True, timeout=60):
        """Runs a `companion` client command against this server; returns CompletedProcess."""
        cmd = [str(COMPANION), *args[:1], "--namespace", self.namespace,
               "--runtime-dir", str(self.runtime_dir), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def cli_json(self, *args, check=True, timeout=60):
        r = self.cli(*args, "--json", check=check, timeout=timeout)
        return json.loads(r.stdout), r.returncode

    def log_text(self):
        self.log.flush()
        return self.log_path.read_text()

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


@pytest.fixture
def runtime_dir(tmp_path):
    d = tmp_path / "runtime"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """A model root shared by the session's servers, with an OPT-like checkpoint."""
    root = tmp_path_factory.mktemp("models")
    write_opt_like(root / "opt-small", hidden=256, layers=4, vocab=4096, dtype="float32")
    return root


@pytest.fixture
def server(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
