"""Packaging and import: pip-installable offline, importable without the library, torch or
numpy; the library is looked up where the docs say."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import companion

REPO = pathlib.Path(__file__).resolve().parents[2]
LIBRARY = pathlib.Path(os.environ["COMPANION_LIBRARY"])  # set by conftest.py


def run_python(code, env=None, cwd=None):
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=full_env, cwd=cwd)


def test_pip_install_into_a_target_and_import(tmp_path):
    target = tmp_path / "site"
    # The package is ctypes only: no compiler, no network (--no-build-isolation uses the
    # setuptools already installed).
    source = tmp_path / "src"
    shutil.copytree(REPO / "python", source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "libcompanion.so*"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(target),
                        str(source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "companion" / "py.typed").exists()
    r = run_python(f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import companion
        assert companion.__file__.startswith({str(target)!r}), companion.__file__
        print(companion.library_version(), companion.library_path())
    """, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == str(LIBRARY)


def test_import_needs_no_library_torch_or_numpy(tmp_path):
    r = run_python(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'python')!r})
        import companion, companion.dynamo_compat, companion.dlpack
        assert "torch" not in sys.modules and "numpy" not in sys.modules, "heavy import"
        spec = companion.ModelSpec("org/name", dtype="auto")
        try:
            companion.connect()
        except companion.LibraryNotFound as e:
            assert isinstance(e, companion.Error)
            print("LibraryNotFound:", e)
        else:
            raise AssertionError("connect worked without a library")
    """, env={"COMPANION_LIBRARY": str(tmp_path / "nowhere" / "libcompanion.so")})
    assert r.returncode == 0, r.stderr
    assert "LibraryNotFound" in r.stdout and str(tmp_path / "nowhere") in r.stdout


def test_library_beside_the_package(tmp_path):
    package = tmp_path / "companion"
    shutil.copytree(REPO / "python" / "companion", package,
                    ignore=shutil.ignore_patterns("__pycache__", "libcompanion.so*"))
    shutil.copy(LIBRARY, package / "libcompanion.so")
    env = {"COMPANION_LIBRARY": ""}
    r = run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import companion
        print(companion.library_path())
    """, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(package / "libcompanion.so")
    os.unlink(package / "libcompanion.so")
    r = run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import companion
        try:
            companion.library_path()
        except companion.LibraryNotFound as e:
            print(e)
    """, env=env)
    assert r.returncode == 0, r.stderr
    assert str(package) in r.stdout and "find_library" in r.stdout


def test_library_of_the_source_tree_build(tmp_path):
    """Imported from a checkout's python/, the package finds that checkout's build/ (what
    scripts/setup.sh builds); an installed copy beside a build/ directory does not."""
    tree = tmp_path / "checkout"
    shutil.copytree(REPO / "python", tree / "python", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "libcompanion.so*"))
    (tree / "include" / "companion").mkdir(parents=True)
    shutil.copy(REPO / "include" / "companion" / "companion.h", tree / "include" / "companion")
    built = tree / "build" / "src" / "capi" / "libcompanion.so"
    built.parent.mkdir(parents=True)
    shutil.copy(LIBRARY, built)
    code = f"""
        import sys
        sys.path.insert(0, {str(tree / 'python')!r})
        import companion
        try:
            print(companion.library_path())
        except companion.LibraryNotFound as e:
            print("LibraryNotFound:", e)
    """
    r = run_python(code, env={"COMPANION_LIBRARY": ""}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(built)
    # Without the tree's header it is not a checkout: the build beside it is not used.
    os.unlink(tree / "include" / "companion" / "companion.h")
    r = run_python(code, env={"COMPANION_LIBRARY": ""}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("LibraryNotFound:") and str(built) not in r.stdout, r.stdout


def test_library_in_use():
    assert companion.library_path() == str(LIBRARY)


def test_the_checkout_build_wins_over_a_bundled_copy(tmp_path):
    """companion/_native/libcompanion.so (a wheel's copy, python/setup.py) is used when nothing
    else is; in a checkout, that checkout's fresh build/ comes first, so a stale copy never
    shadows it."""
    tree = tmp_path / "checkout"
    shutil.copytree(REPO / "python", tree / "python", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "libcompanion.so*"))
    (tree / "include" / "companion").mkdir(parents=True)
    shutil.copy(REPO / "include" / "companion" / "companion.h", tree / "include" / "companion")
    bundled = tree / "python" / "companion" / "_native" / "libcompanion.so"
    bundled.parent.mkdir()
    shutil.copy(LIBRARY, bundled)
    code = f"""
        import sys
        sys.path.insert(0, {str(tree / 'python')!r})
        import companion
        print(companion.library_path())
    """
    r = run_python(code, env={"COMPANION_LIBRARY": ""}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(bundled)
    built = tree / "build" / "src" / "capi" / "libcompanion.so"
    built.parent.mkdir(parents=True)
    shutil.copy(LIBRARY, built)
    r = run_python(code, env={"COMPANION_LIBRARY": ""}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(built)
