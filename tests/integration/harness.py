"""Running real `companion` server and client processes in tests (host and GPU suites)."""
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("COMPANION_BUILD_DIR", REPO / "build"))
COMPANION = BUILD / "src" / "cli" / "companion"
FAULT_CLIENT = BUILD / "tests" / "tools" / "companion-fault-client"


class Server:
    """A `companion serve` process in its own runtime directory (host backend by default)."""

    def __init__(self, runtime_dir, model_roots, namespace="companion", extra=(), env=None,
                 device="host"):
        self.runtime_dir = pathlib.Path(runtime_dir)
        self.namespace = namespace
        self.log_path = self.runtime_dir.parent / f"server-{uuid.uuid4().hex[:8]}.log"
        self.device = device
        args = [str(COMPANION), "serve", "--device", device, "--namespace", namespace,
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

    def command(self, *args):
        """A `companion` client command line aimed at this server."""
        return [str(COMPANION), *args[:1], "--namespace", self.namespace, "--device", self.device,
                "--runtime-dir", str(self.runtime_dir), *args[1:]]

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


def wait_until(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
