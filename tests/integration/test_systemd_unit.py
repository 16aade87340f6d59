"""packaging/systemd/companion@.service, the unit template operators install: systemd-analyze
verify accepts it as instances (ordinal, UUID, host) without a single warning, the same check
refuses a broken unit, and the server runs with the unit's ExecStart= exactly as written (its
flags, the runtime directory's mode, READY=1), so the unit cannot drift from the CLI."""
import os
import shlex
import shutil
import signal
import subprocess

import pytest
from harness import COMPANION, REPO
from test_keeper_systemd import FakeSystemd

UNIT = REPO / "packaging" / "systemd" / "companion@.service"
INSTALLED = "/usr/local/bin/companion"  # the unit's ExecStart= binary (cmake --install's prefix)


def unit_text():
    """The unit, its binary swapped for this build's (verify checks that it exists)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    return text.replace(INSTALLED, str(COMPANION.resolve()))  # systemd wants an absolute path


def service_settings(text):
    """{key: [values]} of the [Service] section (comments and other sections left out)."""
    settings, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def verify(directory, text, instance="0"):
    """systemd-analyze verify on an instance of the template text: (exit code, what it said).
    It needs no running systemd; it exits 0 on unknown keys and bad values, which it only
    prints, so both count."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package "
                    "(scripts/setup.sh does)")
    (directory / "companion@.service").write_text(text)
    r = subprocess.run([analyze, "verify", f"./companion@{instance}.service"], cwd=directory,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


@pytest.mark.parametrize("instance", ["0", "host", "GPU-3b1c7f2e-8a7d-4e47-9a55-0d2d3c1f6a11"])
def test_the_unit_verifies_without_a_warning(tmp_path, instance):
    assert verify(tmp_path, unit_text(), instance) == (0, "")


@pytest.mark.parametrize("change, said", [
    (("FileDescriptorStoreMax=8192", "FileDescriptorStoreMx=8192"),
     "Unknown key 'FileDescriptorStoreMx'"),
    (("Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart specifier"),
    (("Type=notify", "Type=notifying"), "Failed to parse service type"),
    ((str(COMPANION.resolve()), "/nonexistent/companion"), "is not executable"),
])
def test_the_check_refuses_a_broken_unit(tmp_path, change, said):
    text = unit_text()
    assert change[0] in text
    code, output = verify(tmp_path, text.replace(change[0], change[1], 1))
    assert code != 0 or output, "a broken unit passed the check"
    assert said in output


def test_the_server_runs_with_the_units_exec_start(tmp_path):
    settings = service_settings(unit_text())
    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    # What systemd substitutes: the instance (the host backend here) and the environment file's
    # COMPANION_SERVE_ARGS (as docs/deploy.md's example fills it); RuntimeDirectory= is the
    # --runtime-dir, created with RuntimeDirectoryMode=, which the server must accept.
    (runtime_name,) = settings["RuntimeDirectory"]
    runtime = tmp_path / "run" / runtime_name
    assert f"/run/{runtime_name}" in argv
    runtime.parent.mkdir()
    runtime.mkdir(mode=int(settings["RuntimeDirectoryMode"][0], 8))
    os.chmod(runtime, int(settings["RuntimeDirectoryMode"][0], 8))
    models = tmp_path / "models"
    models.mkdir()
    serve_args = ["--model-root", str(models), "--log-level", "info"]
    argv = [str(runtime) if a == f"/run/{runtime_name}" else a.replace("%i", "host")
            for a in argv if a != "$COMPANION_SERVE_ARGS"] + serve_args
    assert settings["Type"] == ["notify"] and int(settings["FileDescriptorStoreMax"][0]) > 0
    assert "--keep" in argv and argv[argv.index("--keep") + 1] == "systemd"

    systemd = FakeSystemd()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=systemd.env(fdstore_max=settings["FileDescriptorStoreMax"][0]))
    try:
        line = proc.stdout.readline()
        assert "companion serving companion/model_server_host" in line, (
            line, (tmp_path / "server.log").read_text())
        assert systemd.receive()["READY"] == "1"
        text = (tmp_path / "server.log").read_text()
        assert "systemd's file-descriptor store holds committed models" in text, text
        health = subprocess.run([str(COMPANION), "health", "--runtime-dir", str(runtime)],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        log.close()
        systemd.close()
    assert code == 0
