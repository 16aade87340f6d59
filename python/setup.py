"""Bundles libcompanion.so into the package (companion/_native/) when a CMake build of it
exists, so that an installed package needs no COMPANION_LIBRARY. Everything else is in
pyproject.toml.

The library is taken from ``$COMPANION_BUILD_DIR/src/capi/libcompanion.so`` or, without that
variable, from the checkout's ``build/src/capi/libcompanion.so`` (beside this directory, what
scripts/setup.sh builds). Found, it makes the wheel platform-specific (py3-none-linux_x86_64 and
the like: ctypes, so any Python 3, but one machine architecture). Not found, the package is pure
Python, as before, and looks for the library at run time (companion/_lib.py).
"""
import os
import pathlib
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 carries bdist_wheel; older ones use the wheel package's
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

HERE = pathlib.Path(__file__).resolve().parent
BUNDLED = pathlib.Path("companion") / "_native" / "libcompanion.so"


def built_library():
    """The CMake-built library to bundle, or None."""
    build_dir = os.environ.get("COMPANION_BUILD_DIR")
    root = pathlib.Path(build_dir) if build_dir else HERE.parent / "build"
    path = root / "src" / "capi" / "libcompanion.so"
    return path if path.is_file() else None


LIBRARY = built_library()


class BuildPyWithLibrary(build_py):
    """build_py, then a copy of the library's file (symlinks followed: one file,
    libcompanion.so) into the build tree; the source tree is left as it was."""

    def run(self):
        super().run()
        target = pathlib.Path(self.build_lib) / BUNDLED
        if LIBRARY is None:
            if target.exists():  # a build tree reused (python/build/): no stale copy
                target.unlink()
            print("companion: no libcompanion.so found (set COMPANION_BUILD_DIR or build "
                  f"{HERE.parent / 'build'}): the package will look for it at run time",
                  file=sys.stderr)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LIBRARY, target)
        os.chmod(target, 0o755)


class WheelTaggedForThePlatform(bdist_wheel):
    """py3-none-<platform> when the library is bundled: any Python 3 (ctypes, no extension
    module), only this platform's architecture."""

    def finalize_options(self):
        super().finalize_options()
        if LIBRARY is not None:
            self.root_is_pure = False

    def get_tag(self):
        python, abi, platform = super().get_tag()
        if LIBRARY is not None:
            python, abi = "py3", "none"
        return python, abi, platform


class DistributionWithLibrary(Distribution):
    """Installed into platlib (not purelib) when it carries a native library."""

    def has_ext_modules(self):
        return LIBRARY is not None


setup(distclass=DistributionWithLibrary,
      cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": WheelTaggedForThePlatform})
