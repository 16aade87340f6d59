"""README.md's Python quick start, run as printed: its two examples (each by the interpreter the
README names for it) and the seed-API snippet, against a real host server serving the checkpoints
that scripts/make-example-checkpoints.sh writes. Only the directories differ from the README's:
the checkpoints' (/tmp/docs-models) and the registry's ($COMPANION_RUNTIME_DIR)."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from harness import Server

REPO = pathlib.Path(__file__).resolve().parents[2]
SETUP_VENV_PYTHON = REPO / ".venv" / "bin" / "python"  # scripts/setup.sh's, Debian's torch
TREE_LIBRARY = REPO / "build" / "src" / "capi" / "libcompanion.so"


def quick_start_blocks():
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Python quick start\n")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    """The CLI quick start's server: host memory, the example checkpoints as its model root."""
    sys.path.insert(0, str(REPO / "scripts" / "lib"))
    import make_example_checkpoints  # what scripts/make-example-checkpoints.sh runs

    root = tmp_path_factory.mktemp("docs")
    models = root / "docs-models"
    make_example_checkpoints.write_models(models)
    rt = root / "docs-rt"
    rt.mkdir(mode=0o700)
    s = Server(rt, [models])
    yield s, models
    assert s.stop() == 0, s.log_text()


def run_example(code, python, docs_server, tmp_path):
    """Runs code as the README says: `PYTHONPATH=python <python> file.py` from the checkout, with
    $COMPANION_RUNTIME_DIR naming the server's registry."""
    server, models = docs_server
    script = tmp_path / "example.py"
    script.write_text(code.replace("/tmp/docs-models", str(models)))
    env = dict(os.environ, PYTHONPATH="python", COMPANION_RUNTIME_DIR=str(server.runtime_dir))
    # The package finds the checkout's build/ itself; only another build directory is named.
    if pathlib.Path(env.get("COMPANION_LIBRARY", TREE_LIBRARY)).resolve() == TREE_LIBRARY:
        env.pop("COMPANION_LIBRARY", None)
    r = subprocess.run([str(python), str(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{python}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def expected_output(code):
    """What the README's comments say the example's print() calls show (first alternative)."""
    said = [line.split("# ", 1)[1] for line in code.splitlines()
            if line.lstrip().startswith("print(") and "# " in line]
    return [re.sub(r" \([^()]*\)$", "", s) for s in said]


def test_readme_has_the_examples_this_test_runs():
    blocks = quick_start_blocks()
    assert [b.splitlines()[0] for b in blocks[:2]] == [
        "# first.py: a model's weights, mapped zero-copy",
        "# second.py: a whole transformers model on the shared weights (built on the meta device,"]
    assert "create_model_client(runtime, vllm_config" in blocks[2]


def test_first_example(docs_server, tmp_path):
    code = quick_start_blocks()[0]
    assert run_example(code, sys.executable, docs_server, tmp_path).splitlines() == \
        expected_output(code) == ["BF16 (4096, 256) cpu"]
    # The README says setup.sh's venv (Debian's torch 1.13) runs it too.
    if not SETUP_VENV_PYTHON.exists():
        pytest.skip(f"{SETUP_VENV_PYTHON} missing: scripts/setup.sh makes it")
    assert run_example(code, SETUP_VENV_PYTHON, docs_server, tmp_path).splitlines() == \
        expected_output(code)


def test_second_example(docs_server, tmp_path):
    code = quick_start_blocks()[1]
    assert run_example(code, sys.executable, docs_server, tmp_path).splitlines() == \
        expected_output(code) == ["OPTForCausalLM checkpoint"]


def test_seed_api_snippet(docs_server, tmp_path):
    """The seed's client code, in an async function as the README says, with a source string
    for vllm_config (the README allows one) and no Dynamo runtime (it is ignored)."""
    snippet = quick_start_blocks()[2]
    code = ("import asyncio\n\n"
            "async def main(runtime, vllm_config):\n" + textwrap.indent(snippet, "    ") +
            "    print(success, len(parameters), tuple(tensor.shape))\n\n"
            "asyncio.run(main(None, '/tmp/docs-models/opt-tiny'))\n")
    out = run_example(code, sys.executable, docs_server, tmp_path)
    assert out.split()[:2] == ["True", "36"], out
