"""scripts/setup.sh says what it does: a line per step, apt's output in a log that a failure
names. Run on a copy of the script with stand-ins for dpkg-query, apt-get and sudo, so that
nothing is installed."""
import os
import shutil
import subprocess

from harness import REPO

STUBS = {
    # Every package counts as missing.
    "dpkg-query": "#!/bin/sh\nexit 1\n",
    "apt-get": """#!/bin/sh
case "$1" in
  update) echo "Hit:1 http://deb.debian.org/debian bookworm InRelease"; exit 0 ;;
  *) echo "E: Unable to locate package frobnicate-dev" >&2; exit 100 ;;
esac
""",
    "sudo": "#!/bin/sh\nexec \"$@\"\n",
}


def test_setup_announces_steps_and_names_its_log_on_failure(tmp_path):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", tree / "scripts" / "setup.sh")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], capture_output=True,
                       text=True, timeout=60, env=env)
    log = tree / "build" / "setup.log"
    assert r.returncode == 1, r.stdout + r.stderr
    steps = [line for line in r.stdout.splitlines() if line.startswith("setup: ")]
    assert steps[0].startswith("setup: apt-get update"), r.stdout
    assert steps[1].startswith("setup: apt-get install: "), r.stdout
    # apt's own output is in the log, not on the terminal, until a step fails: then its last
    # lines and the log's path.
    assert "Hit:1" not in r.stdout + r.stderr
    assert "Hit:1" in log.read_text() and "frobnicate-dev" in log.read_text()
    assert "setup: failed: " in r.stderr and "apt-get install" in r.stderr
    assert "E: Unable to locate package frobnicate-dev" in r.stderr
    assert f"setup: the whole output is in {log}" in r.stderr
