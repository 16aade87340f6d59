"""README's "Logging" C example, compiled as printed against libcompanion.so (the build's C flags,
sanitizers included) and run where a stray registry record makes the library warn: the warning
reaches the program's handler. (tests/python/test_python_log.py runs the Python example.)"""
import os
import re
import shlex
import subprocess

from harness import BUILD, REPO


def logging_section():
    text = (REPO / "README.md").read_text()
    start = text.index("\n### Logging\n")
    return text[start:text.index("\n## ", start)]


def ninja_variable(block_start, name):
    """A variable of the build.ninja statement that starts with block_start."""
    text = (BUILD / "build.ninja").read_text()
    block = text[text.index(block_start):].split("\n\n", 1)[0]
    return re.search(rf"^  {name} = (.*)$", block, flags=re.M).group(1)


def test_c_example_as_printed(tmp_path):
    blocks = re.findall(r"^```c\n(.*?)^```$", logging_section(), flags=re.S | re.M)
    assert len(blocks) == 1
    source = tmp_path / "log_example.c"
    source.write_text(blocks[0])
    program = tmp_path / "log_example"
    # As CMake builds capi_c_check: a C11 program that links libcompanion.so alone.
    compile_flags = ninja_variable("build tests/CMakeFiles/capi_c_check.dir/", "FLAGS")
    link_flags = ninja_variable("build tests/capi_c_check:", "FLAGS")
    libraries = ninja_variable("build tests/capi_c_check:", "LINK_LIBRARIES")
    cmd = ["cc", *shlex.split(compile_flags), f"-I{REPO / 'include'}", str(source), "-o",
           str(program), *shlex.split(link_flags), *shlex.split(libraries)]
    r = subprocess.run(cmd, cwd=BUILD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stderr}"

    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    (runtime / "stray.json").mkdir()
    env = dict(os.environ, COMPANION_RUNTIME_DIR=str(runtime))
    env.pop("COMPANION_REGISTRY", None)
    r = subprocess.run([str(program)], capture_output=True, text=True, timeout=60, env=env)
    stray = runtime / "stray.json"
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        f"engine: libcompanion warn: ignoring registry record {stray}: {stray} is not a regular "
        "file",
        f"engine: no live companion server for device host in namespace 'companion' (local "
        f"registry {runtime})"], r.stderr
