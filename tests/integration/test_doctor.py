"""`companion doctor` against real servers, runtime directories and etcd: one line per check,
exit 1 when a check failed, --json for scripts."""
import json
import os
import signal
import subprocess

from harness import COMPANION, Server, free_port


def doctor(runtime_dir, *args, env=None):
    """Runs `companion doctor` on runtime_dir; returns (exit code, stdout)."""
    cmd = [str(COMPANION), "doctor", "--runtime-dir", str(runtime_dir), *args]
    e = dict(os.environ)
    e.pop("COMPANION_REGISTRY", None)
    e.update(env or {})
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=e)
    return r.returncode, r.stdout


def doctor_json(runtime_dir, *args):
    code, out = doctor(runtime_dir, "--json", *args)
    return code, json.loads(out)


def checks_of(report, group):
    return [c for c in report["checks"] if c["group"] == group]


def test_healthy_host_server_passes_with_its_memory_budget(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root], extra=["--memory-budget", "64MiB"])
    try:
        code, out = doctor(runtime_dir)
        assert code == 0, out
        assert f"\u2714 runtime directory: {runtime_dir}: owner uid {os.getuid()}" in out, out
        assert f"\u2714 server companion/host {s.instance}: pid {s.pid}, serving" in out, out
        assert f"\u2714 memory {s.instance}: 0 B used of a 64.0 MiB budget" in out, out
        assert "\u2718" not in out, out
        # A CPU host: the driver is skipped, not failed; etcd is skipped without a registry.
        code, report = doctor_json(runtime_dir)
        assert code == 0 and report["ok"] is True, report
        for c in report["checks"]:
            assert set(c) == {"group", "name", "status", "detail", "hint"}, c
            assert c["status"] in ("ok", "skipped"), c
        groups = [c["group"] for c in report["checks"]]
        assert groups[:2] == ["driver", "GPUs"] and groups[-1] == "registry", groups
        servers = checks_of(report, "servers")
        assert [c["status"] for c in servers] == ["ok", "ok"], servers
        assert "64.0 MiB budget" in servers[1]["detail"], servers
        assert checks_of(report, "runtime directory")[0]["status"] == "ok"
        assert checks_of(report, "registry")[0]["status"] == "skipped"
    finally:
        assert s.stop() == 0


def test_world_writable_runtime_directory_fails(runtime_dir, model_root):
    os.chmod(runtime_dir, 0o777)
    code, out = doctor(runtime_dir)
    assert code == 1, out
    assert "\u2718 runtime directory:" in out and "writable" in out, out
    code, report = doctor_json(runtime_dir)
    assert code == 1 and report["ok"] is False
    (rd,) = checks_of(report, "runtime directory")
    assert rd["status"] == "failed" and rd["hint"], rd


def test_dead_server_record_is_reported(runtime_dir, model_root):
    s = Server(runtime_dir, [model_root])
    pid, instance = s.pid, s.instance
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    s.log.close()
    assert (runtime_dir / f"{instance}.json").exists()
    code, out = doctor(runtime_dir)
    assert code == 1, out
    assert f"\u2718 server companion/host {instance}: dead (pid {pid})" in out, out
    # Reported once: the record is gone now.
    code, out = doctor(runtime_dir)
    assert code == 0 and instance not in out, out


def test_etcd_reachable(runtime_dir, etcd):
    code, out = doctor(runtime_dir, "--registry", etcd.url)
    assert code == 0, out
    assert f"\u2714 etcd {etcd.url}: reachable" in out, out
    # The environment variable names it too.
    code, out = doctor(runtime_dir, env={"COMPANION_REGISTRY": etcd.url})
    assert code == 0 and f"\u2714 etcd {etcd.url}: reachable" in out, out


def test_unreachable_etcd_fails(runtime_dir):
    url = f"etcd://127.0.0.1:{free_port()}"  # nothing listens there
    code, report = doctor_json(runtime_dir, "--registry", url)
    assert code == 1, report
    (reg,) = checks_of(report, "registry")
    assert reg["status"] == "failed" and reg["name"] == f"etcd {url}", reg
    assert reg["detail"].startswith("unreachable"), reg
