"""Fixtures for the tests with a real vLLM engine (CPU build, host backend). They run under the
vLLM venv's Python (scripts/test.sh; scripts/setup-vllm.sh makes the venv): a real `companion
serve`, the package installed with pip as a user installs it (its `vllm.general_plugins` entry
point included), and engines started as separate processes (tests/vllm/engine.py)."""
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import time

import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "integration"))

from harness import COMPANION  # noqa: E402

LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                       REPO / "build" / "src" / "capi" / "libcompanion.so"))
os.environ["COMPANION_LIBRARY"] = str(LIBRARY)
sys.path.insert(0, str(REPO / "python"))
ENGINE = pathlib.Path(__file__).resolve().parent / "engine.py"
# Engine start and generation on 2 cores take about a minute.
ENGINE_TIMEOUT = float(os.environ.get("COMPANION_VLLM_TIMEOUT", "600"))


def pytest_configure(config):
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise pytest.UsageError(
            f"tests/vllm need vLLM: run them with the vLLM venv's Python "
            f"(scripts/setup-vllm.sh), not {sys.executable}")
    missing = [p for p in (COMPANION, LIBRARY) if not p.exists()]
    if missing:
        raise pytest.UsageError(f"{', '.join(map(str, missing))} missing: build first")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """The package installed with pip (`pip install --target`), from a clean copy of python/:
    its dist-info carries the entry point that vLLM's plugin loader finds."""
    src = tmp_path_factory.mktemp("package-src")
    shutil.copy(REPO / "python" / "pyproject.toml", src)
    shutil.copy(REPO / "python" / "README.md", src)
    shutil.copytree(REPO / "python" / "companion", src / "companion",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so*"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
                   check=True)
    entry = next(site.glob("companion-*.dist-info")) / "entry_points.txt"
    assert "companion.vllm:register" in entry.read_text()
    return site


@pytest.fixture(scope="session")
def opt_checkpoint(tmp_path_factory):
    """A random OPT checkpoint (bf16, 195 MiB: big enough that sharing shows in memory)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=1024, num_hidden_layers=4, ffn_dim=4096,
                       num_attention_heads=16, vocab_size=50272, max_position_embeddings=512,
                       word_embed_proj_dim=1024)
    OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "opt", safe_serialization=True)
    return root / "opt"


class Engine:
    """tests/vllm/engine.py in its own process group (vLLM starts engine-core and worker
    processes under it)."""

    def __init__(self, site, runtime_dir, model, load_format="companion", extra=None,
                 hold=False, dtype="bfloat16", log=None):
        env = dict(os.environ, PYTHONPATH=str(site), COMPANION_LIBRARY=str(LIBRARY),
                   COMPANION_RUNTIME_DIR=str(runtime_dir), PYTHONUNBUFFERED="1")
        args = [sys.executable, str(ENGINE), "--model", str(model), "--load-format", load_format,
                "--dtype", dtype]
        if extra is not None:
            args += ["--extra", json.dumps(extra)]
        if hold:
            args.append("--hold")
        self.log_path = pathlib.Path(log)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, start_new_session=True)
        self.lines = []

    def result(self, timeout=ENGINE_TIMEOUT):
        """The next RESULT the engine prints (its other output is kept for failures)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise AssertionError(f"engine gave no result (exit {self.proc.poll()}):\n"
                             + self.output()[-6000:])

    def output(self):
        if not self.log.closed:
            self.log.flush()
        return "".join(self.lines) + self.log_path.read_text(errors="replace")

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout=120):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        rest = self.proc.stdout.read()
        self.lines.append(rest)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()


@pytest.fixture
def engines():
    started = []

    def start(*args, **kwargs):
        engine = Engine(*args, **kwargs)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.kill()
