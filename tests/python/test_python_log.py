"""The library's log reaches logging.getLogger("companion"), never stderr by itself, and the
library filters by the level it was given. The message is a real one: discovery skipping a
registry record that is not a regular file (logged once per record path, so each test plants its
own)."""
import logging
import inspect
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import companion

PYTHON_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "python")

def discover_past_a_planted_record():
    """Plants a record that is a directory in a fresh runtime directory and looks for a server
    there (none): returns the record's path."""
    runtime = tempfile.mkdtemp()
    record = os.path.join(runtime, "planted.json")
    os.mkdir(record)
    try:
        companion.connect(runtime_dir=runtime, registry="local")
    except companion.Unavailable:
        pass
    else:
        raise AssertionError("a server in an empty runtime directory")
    finally:
        shutil.rmtree(runtime)
    return record


def warnings_about(caplog, record):
    return [r for r in caplog.records
            if r.name == "companion" and "ignoring registry record " + record in r.getMessage()]


@pytest.fixture
def library_level():
    """Puts the library's level back to the logger's after the test."""
    yield
    companion.set_log_level()


def test_a_library_warning_is_a_logging_record(caplog, library_level):
    caplog.set_level(logging.WARNING, logger="companion")
    companion.set_log_level()
    record = discover_past_a_planted_record()
    found = warnings_about(caplog, record)
    assert len(found) == 1, caplog.text
    assert found[0].levelno == logging.WARNING
    assert "is not a regular file" in found[0].getMessage()


def test_the_library_filters_below_its_level(caplog, library_level):
    caplog.set_level(logging.DEBUG, logger="companion")
    companion.set_log_level(logging.ERROR)  # the logger would take the warning: the library not
    assert warnings_about(caplog, discover_past_a_planted_record()) == []
    companion.set_log_level("warning")
    assert len(warnings_about(caplog, discover_past_a_planted_record())) == 1
    with pytest.raises(ValueError):
        companion.set_log_level("loud")


def run_python(code):
    """Runs code in a fresh interpreter, after the package's import and
    discover_past_a_planted_record's definition."""
    prelude = (f"import os, shutil, sys, tempfile\nsys.path.insert(0, {PYTHON_DIR!r})\n"
               "import companion\n" + inspect.getsource(discover_past_a_planted_record))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_nothing_reaches_stderr_unless_logging_is_configured():
    r = run_python("""
        print(discover_past_a_planted_record())
    """)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    r = run_python("""
        import logging
        logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
        print(discover_past_a_planted_record())
    """)
    assert r.returncode == 0, r.stderr
    record = r.stdout.strip()
    assert r.stderr.startswith(f"companion WARNING ignoring registry record {record}: "), r.stderr


def test_the_level_is_the_loggers_when_the_library_loads():
    r = run_python("""
        import logging
        logging.basicConfig(format="%(levelname)s %(message)s")
        logger = logging.getLogger("companion")
        logger.setLevel(logging.ERROR)
        companion.load_library()        # takes ERROR
        logger.setLevel(logging.WARNING)
        print(discover_past_a_planted_record())  # not passed on by the library
        companion.set_log_level()       # takes WARNING
        print(discover_past_a_planted_record())
    """)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.split()
    assert first not in r.stderr, r.stderr
    assert f"WARNING ignoring registry record {second}: " in r.stderr, r.stderr


def test_readme_example_as_printed(tmp_path):
    readme = (pathlib.Path(PYTHON_DIR).parent / "README.md").read_text()
    start = readme.index("\n### Logging\n")
    section = readme[start:readme.index("\n## ", start)]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1
    example = tmp_path / "log_example.py"
    example.write_text(blocks[0])
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    stray = runtime / "stray.json"
    stray.mkdir()
    env = dict(os.environ, COMPANION_RUNTIME_DIR=str(runtime),
               PYTHONPATH=os.path.abspath(PYTHON_DIR))
    env.pop("COMPANION_REGISTRY", None)
    r = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"companion WARNING: ignoring registry record {stray}: {stray} is not a "
                        "regular file\n"), r.stderr
    assert r.stdout.startswith("no server: unavailable: no live companion server"), r.stdout
