"""README.md's C++ example, compiled as the README prints it and run against a real server, and
python/README.md kept equal to the README's "Python quick start" section. (The README's Python
examples need torch 2 and transformers: tests/torch2/test_readme_examples.py runs them.)"""
import os
import re
import shlex
import subprocess
import sys

from harness import BUILD, REPO, Server

README = REPO / "README.md"


def readme_section(heading):
    """The README's section under this `## ` heading, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n") + 1
    end = text.find("\n## ", start)
    return text[start:] if end < 0 else text[start:end + 1]


def code_blocks(section, language):
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.S | re.M)


def ninja_variable(block_start, name):
    """A variable of the build.ninja statement that starts with block_start."""
    text = (BUILD / "build.ninja").read_text()
    block = text[text.index(block_start):].split("\n\n", 1)[0]
    return re.search(rf"^  {name} = (.*)$", block, flags=re.M).group(1)


def build_cpp_example(source, output):
    """Compiles source as a program of the client library's users: the public include directory
    and C++20 (what the README asks of them), the build's compile flags (sanitizers included)
    and the libraries a client links, as CMake links companion-session-client."""
    tool = "tests/tools/CMakeFiles/companion-session-client.dir"
    compile_flags = ninja_variable(f"build {tool}/session_client.cpp.o:", "FLAGS")
    link_flags = ninja_variable("build tests/tools/companion-session-client:", "FLAGS")
    libraries = ninja_variable("build tests/tools/companion-session-client:", "LINK_LIBRARIES")
    cmd = ["c++", *shlex.split(compile_flags), f"-I{REPO / 'include'}", str(source), "-o",
           str(output), *shlex.split(link_flags), *shlex.split(libraries), "-lpthread"]
    r = subprocess.run(cmd, cwd=BUILD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stderr}"


def test_cpp_example_as_printed(server, model_root, tmp_path):
    blocks = code_blocks(readme_section("## C++ client API"), "cpp")
    assert len(blocks) == 1
    source = tmp_path / "example.cpp"
    source.write_text(blocks[0])
    program = tmp_path / "example"
    build_cpp_example(source, program)
    env = dict(os.environ, COMPANION_RUNTIME_DIR=str(server.runtime_dir))
    r = subprocess.run([str(program)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and r.stderr.startswith("usage: "), (r.returncode, r.stderr)
    r = subprocess.run([str(program), str(model_root / "opt-small")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"BF16 \[4096, 256\] at 0x[0-9a-f]+ \(host\)\n", r.stdout), r.stdout


def test_python_readme_is_the_quick_start_section():
    """python/README.md (the package's description) is a short header, then the README's
    "Python quick start" section word for word."""
    section = readme_section("## Python quick start")
    package_readme = (REPO / "python" / "README.md").read_text()
    at = package_readme.find("\n## Python quick start\n")
    assert at >= 0, "python/README.md lacks the Python quick start section"
    header = package_readme[:at + 1]
    assert len(header.splitlines()) <= 6 and "## " not in header, header
    assert package_readme[at + 1:].rstrip("\n") == section.rstrip("\n"), \
        "python/README.md drifted from README.md's Python quick start: copy the section again"


def test_example_checkpoints_command_writes_what_the_cli_examples_show(tmp_path, runtime_dir):
    """scripts/make-example-checkpoints.sh, then the CLI quick start's loads: the models, sizes
    and the broken checkpoint's error that the README prints."""
    models, hub = tmp_path / "docs-models", tmp_path / "docs-hf"
    script = REPO / "scripts" / "make-example-checkpoints.sh"
    r = subprocess.run([str(script), str(models), str(hub)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stderr
    server = Server(runtime_dir, [models], extra=["--hf-cache", str(hub)])
    try:
        shown = {}
        for model in ("opt-tiny", "opt-sharded", "acme/tiny-lm"):
            source = model if "/" in model else str(models / model)
            status = server.cli_json("load", source)[0]
            shown[model] = (status["state"], status["tensors"], status["bytes_total"])
        assert shown == {"opt-tiny": ("loaded", 36, 5519360),
                         "opt-sharded": ("loaded", 36, 1088512),
                         "acme/tiny-lm": ("loaded", 20, 296832)}
        broken, code = server.cli_json("load", str(models / "broken"), check=False)
        assert code == 1 and broken["error"]["code"] == "BAD_CHECKPOINT"
        assert "is past the end of the data section" in broken["error"]["message"]
        # Running it again rewrites the examples in place.
        r = subprocess.run([str(script), str(models), str(hub)], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PYTHON=sys.executable))
        assert r.returncode == 0, r.stderr
    finally:
        assert server.stop() == 0
