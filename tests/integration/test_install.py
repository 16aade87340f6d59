"""`cmake --install` of the build, used as the README's Install section says: its C program built
with pkg-config and the README's C++ example built by a CMake project with
find_package(Companion), both from the installed tree alone (no header, library or flag of the
source or build tree), then run against a real server."""
import os
import re
import subprocess

import pytest
from safetensors import safe_open

from harness import ASAN_BUILD, BUILD, REPO, TSAN_BUILD
from test_readme_examples import code_blocks, readme_section

# A sanitizer build's library needs the sanitizer runtime loaded before it, by a program built
# with the same flags: installing is for the Release build.
pytestmark = pytest.mark.skipif(ASAN_BUILD or TSAN_BUILD,
                                reason="installs the Release build, not a sanitizer build")

TENSOR = "model.decoder.embed_tokens.weight"


def project_version():
    cache = (BUILD / "CMakeCache.txt").read_text()
    return re.search(r"^CMAKE_PROJECT_VERSION:STATIC=(.*)$", cache, flags=re.M).group(1)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("prefix")
    run(["cmake", "--install", str(BUILD), "--prefix", str(prefix)], env=os.environ)
    return prefix


def run(cmd, env, cwd=None, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def user_env(**extra):
    """A user's environment: no search path points into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH",
                        "LIBRARY_PATH", "PKG_CONFIG_PATH", "CMAKE_PREFIX_PATH")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def loaded_library(program, env):
    """The path ldd resolves libcompanion.so.0 to for program."""
    out = run(["ldd", str(program)], env=env)
    found = re.search(r"^\s*libcompanion\.so\.0 => (\S+)", out, flags=re.M)
    assert found, out
    return os.path.realpath(found.group(1))


def section_blocks(language):
    return code_blocks(readme_section("## Install"), language)


def test_install_puts_the_files_in_place(prefix):
    lib = prefix / "lib"
    version = project_version()
    assert (prefix / "bin" / "companion").is_file()
    assert os.readlink(lib / "libcompanion.so") == "libcompanion.so.0"
    assert os.readlink(lib / "libcompanion.so.0") == f"libcompanion.so.{version}"
    headers = sorted(p.name for p in (prefix / "include" / "companion").iterdir())
    assert headers == sorted(p.name for p in (REPO / "include" / "companion").iterdir())
    package = sorted(p.name for p in (lib / "cmake" / "Companion").iterdir())
    # CompanionTargets-<build type>.cmake: where the library is for that build type.
    assert len(package) == 4 and re.fullmatch(r"CompanionTargets-\w+\.cmake", package[2]), package
    assert package[:2] + package[3:] == [
        "CompanionConfig.cmake", "CompanionConfigVersion.cmake", "CompanionTargets.cmake"]
    # Nothing but the exported library: no test, tool or static library.
    assert sorted(p.name for p in lib.iterdir()) == [
        "cmake", "libcompanion.so", "libcompanion.so.0", f"libcompanion.so.{version}", "pkgconfig"]
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == ["companion"]
    targets = (lib / "cmake" / "Companion" / "CompanionTargets.cmake").read_text()
    assert "INTERFACE_LINK_LIBRARIES" not in targets, "a private dependency leaks to users"
    for text in [targets, (lib / "pkgconfig" / "companion.pc").read_text()]:
        assert str(REPO) not in text


def test_c_program_built_with_pkg_config(prefix, server, model_root, tmp_path):
    [source] = section_blocks("c")
    (tmp_path / "first.c").write_text(source)
    env = user_env(PKG_CONFIG_PATH=prefix / "lib" / "pkgconfig")
    flags = run(["pkg-config", "--cflags", "--libs", "companion"], env=env).split()
    assert flags == [f"-I{prefix}/include", f"-L{prefix}/lib", "-lcompanion"], flags
    # As the README builds it, with strict C11 and warnings as errors on top.
    run(["cc", "-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "first.c", *flags, "-o",
         "first"], env=env, cwd=tmp_path)
    run_env = user_env(LD_LIBRARY_PATH=prefix / "lib", COMPANION_RUNTIME_DIR=server.runtime_dir)
    library = str(prefix / "lib" / f"libcompanion.so.{project_version()}")
    assert loaded_library(tmp_path / "first", run_env) == library
    out = run([str(tmp_path / "first"), str(model_root / "opt-small")], env=run_env)
    with safe_open(str(model_root / "opt-small" / "model.safetensors"), "np") as f:
        first = float(f.get_tensor(TENSOR).flat[0])
    assert out == f"libcompanion {project_version()}: {TENSOR} [4096, 256] starts with {first:g}\n"


def test_cpp_program_built_with_find_package(prefix, server, model_root, tmp_path):
    project = tmp_path / "example"
    project.mkdir()
    [cmake_lists] = section_blocks("cmake")
    (project / "CMakeLists.txt").write_text(cmake_lists)
    [example] = code_blocks(readme_section("## C++ client API"), "cpp")
    (project / "example.cpp").write_text(example)
    env = user_env()
    # As the README builds it, with warnings as errors on top, in the installed headers too (not
    # -isystem, which would hide theirs).
    run(["cmake", "-S", ".", "-B", "build", "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}",
         "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Wpedantic -Werror",
         "-DCMAKE_NO_SYSTEM_FROM_IMPORTED=ON"], env=env, cwd=project)
    run(["cmake", "--build", "build"], env=env, cwd=project)
    build_rules = (project / "build" / "build.ninja").read_text()
    assert f"-I{prefix}/include" in build_rules
    assert str(REPO) not in build_rules, "the consumer used the checkout"
    # CMake gives the program an rpath to the library: no LD_LIBRARY_PATH needed.
    program = project / "build" / "example"
    library = str(prefix / "lib" / f"libcompanion.so.{project_version()}")
    assert loaded_library(program, env) == library
    out = run([str(program), str(model_root / "opt-small")],
              env=user_env(COMPANION_RUNTIME_DIR=server.runtime_dir))
    assert re.fullmatch(r"BF16 \[4096, 256\] at 0x[0-9a-f]+ \(host\)\n", out), out
