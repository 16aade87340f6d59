"""The wheel of scripts/build-wheel.sh: it carries libcompanion.so, is tagged for the platform,
and, installed into a clean venv, works with no COMPANION_LIBRARY and no checkout in reach."""
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest
from safetensors import safe_open

from harness import PYTHON_LIBRARY, REPO, Server
from test_readme_examples import code_blocks, readme_section

TENSOR = "model.decoder.embed_tokens.weight"
# The Release build, whatever COMPANION_BUILD_DIR is: the interpreter loading the library is not
# built with the sanitizers (see harness.PYTHON_LIBRARY).
RELEASE_BUILD = PYTHON_LIBRARY.parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([str(REPO / "scripts" / "build-wheel.sh"), "--build-dir",
                        str(RELEASE_BUILD), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("companion-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_library_and_a_platform_tag(wheel):
    _, _, python, abi, platform = wheel.stem.split("-")
    assert (python, abi) == ("py3", "none") and platform.startswith("linux_"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        wheel_metadata = z.read("companion-0.1.0.dist-info/WHEEL").decode()
        bundled = z.read("companion/_native/libcompanion.so")
    assert "Root-Is-Purelib: false" in wheel_metadata, wheel_metadata
    assert bundled == PYTHON_LIBRARY.resolve().read_bytes()
    assert not any(n.startswith("companion/libcompanion.so") for n in names), names
    # The README's commands name the wheel the script makes.
    commands = "\n".join(code_blocks(readme_section("## Python quick start"), ""))
    assert "scripts/build-wheel.sh" in commands and f"dist/{wheel.name}" in commands, commands


def test_installed_wheel_attaches_with_no_environment_variable(wheel, tmp_path, runtime_dir,
                                                               model_root):
    venv = tmp_path / "venv"  # a clean venv: no system site-packages, no checkout on its path
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    # pip from this interpreter installs into the venv (--prefix): no network, no index.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-index", "--disable-pip-version-check", "--prefix", str(venv),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with safe_open(str(model_root / "opt-small" / "model.safetensors"), "np") as f:
        expected = [float(x) for x in f.get_tensor(TENSOR).reshape(-1)[:4]]
    server = Server(runtime_dir, [model_root])
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("COMPANION_LIBRARY", "PYTHONPATH", "LD_LIBRARY_PATH", "PYTHONHOME")}
        env["COMPANION_RUNTIME_DIR"] = str(runtime_dir)
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        code = textwrap.dedent(f"""
            import ctypes, struct, sys
            import companion
            assert not any(p.startswith({str(REPO)!r}) for p in sys.path if p), sys.path
            with companion.connect() as client:
                weights = client.get_model_parameters(
                    companion.ModelSpec({str(model_root / "opt-small")!r}, dtype="fp32"))
                w = weights[{TENSOR!r}]
                print(companion.__file__)
                print(companion.library_path())
                print(w.dtype_name, list(w.shape))
                print(list(struct.unpack("4f", ctypes.string_at(w.data_ptr, 16))))
        """)
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           timeout=120, env=env, cwd=str(outside))
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        assert server.stop() == 0, server.log_text()
    package_file, library, dtype_shape, values = r.stdout.splitlines()
    package = pathlib.Path(package_file).parent
    assert package.is_relative_to(venv), package_file
    assert library == str(package / "_native" / "libcompanion.so"), library
    assert dtype_shape == "F32 [4096, 256]", dtype_shape
    assert eval(values) == pytest.approx(expected), (values, expected)
