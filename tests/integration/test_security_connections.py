"""Who may connect and what one connection may cost the server: descriptors smuggled on requests,
replies nobody reads, partial frames, connection caps, descriptor exhaustion, the socket's mode
and the peer policy. Real server processes, real sockets; every wait is bounded."""
import array
import contextlib
import json
import os
import pathlib
import socket
import stat
import struct
import subprocess
import time

import pytest

from harness import COMPANION, FAULT_CLIENT, TSAN_BUILD, Server, SessionClient, wait_until

FRAME_MAGIC = 0x314D5043
MIB = 1 << 20


def frame_header(size, fds=0, flags=0):
    return struct.pack("<IIHH", FRAME_MAGIC, size, fds, flags)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits for room in the listen backlog
    s.settimeout(timeout)
    return s


def first_answer(socket_path, run=subprocess.run):
    """What the server sends a new connection before any request (the fault client's report)."""
    r = run([FAULT_CLIENT, "--socket", socket_path, "--mode", "first-answer", "--timeout", "2"])
    assert r.stdout, (r.returncode, r.stderr)
    return json.loads(r.stdout)


def read_until_closed(s, timeout=5.0):
    """Everything the server sends until it closes; None when it keeps the connection open."""
    s.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk
    return None


def health(server, timeout=20):
    return server.cli_json("health", timeout=timeout)[0]


def health_if_served(server):
    """The health reply, or None while the server refuses or cannot take the connection."""
    r = server.cli("health", "--json", check=False, timeout=20)
    assert r.stdout, (r.returncode, r.stderr)
    return json.loads(r.stdout) if r.returncode == 0 else None


@contextlib.contextmanager
def running(*args, **kwargs):
    s = Server(*args, **kwargs)
    try:
        yield s
    finally:
        code = s.stop()
        assert code == 0, f"server exited with {code}:\n{s.log_text()[-4000:]}"


def test_descriptors_on_requests_are_closed_and_the_connection_dropped(runtime_dir, model_root):
    with running(runtime_dir, [model_root]) as server:
        health(server)
        before = fd_count(server.pid)
        null = os.open("/dev/null", os.O_RDONLY)
        sockets = []
        try:
            for i in range(40):
                s = connect(server.socket)
                sockets.append(s)
                # Half without any frame, half on a frame header that announces no descriptors.
                data = b"\0" if i % 2 == 0 else frame_header(100, fds=0)
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [null] * 200))])
            for s in sockets:
                assert read_until_closed(s) is not None, "connection was not dropped"
            health(server)  # every connection above has been read by now
            held = fd_count(server.pid)
            assert held <= before + 1, f"the server holds {held} descriptors, {before} before"
        finally:
            os.close(null)
            for s in sockets:
                s.close()
        assert health(server)["refused"]["descriptors"] >= 40
        assert server.log_text().count("closing connection") <= 2  # rate-limited


@pytest.mark.parametrize("caps,held_fds", [
    (["--max-queued-fds", "16", "--max-queued-replies", "64"], 16),  # this connection's cap
    (["--max-queued-fds-total", "8"], 8),  # the server's: later replies are refused
], ids=["per-connection", "server-wide"])
def test_unread_parameter_replies_stay_under_the_caps(runtime_dir, model_root, caps, held_fds):
    with running(runtime_dir, [model_root], extra=caps) as server:
        model = str(model_root / "opt-small")
        server.cli("load", model)
        before = fd_count(server.pid)
        client = subprocess.Popen([str(FAULT_CLIENT), "--socket", server.socket, "--mode",
                                   "unread-parameters", "--model", model, "--seconds", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = client.stdout.readline()  # printed once the server stops taking requests
            report = json.loads(line)
            assert report["stalled"], report
            held = fd_count(server.pid)
            assert held <= before + 1 + held_fds, (held, before, report)
            h = health(server)
            if held_fds == 8:
                assert h["refused"]["queued_fds"] >= 1, h
        finally:
            client.kill()
            client.wait()
        assert wait_until(lambda: health(server)["leases"] == 0, timeout=10)
        assert wait_until(lambda: fd_count(server.pid) <= before, timeout=10)


def unread_parameters(server, model):
    """A client asking for parameters again and again without reading; its report once the
    server stops taking its requests."""
    client = subprocess.Popen([str(FAULT_CLIENT), "--socket", server.socket, "--mode",
                               "unread-parameters", "--model", model, "--seconds", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return client, json.loads(client.stdout.readline())


def test_unread_reply_bytes_pause_the_connection(runtime_dir, model_root):
    """Only the byte cap applies here: the server stops reading a client whose unread replies
    reach --max-queued-bytes, so the memory it holds for it stays near that."""
    no_count_caps = ["--max-queued-replies", "1000000", "--max-queued-fds", "1000000",
                     "--max-queued-fds-total", "1000000", "--max-leases-per-connection",
                     "1000000", "--max-queued-bytes", str(MIB)]
    # Under AddressSanitizer, freed memory waits in its quarantine (256 MB by default) before
    # reuse, so RSS would count every reply ever freed: measure with the quarantine off.
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") +
               ":quarantine_size_mb=0")
    with running(runtime_dir, [model_root], extra=no_count_caps, env=env) as server:
        model = str(model_root / "opt-small")
        server.cli("load", model)
        rss_before = server.rss_kb()
        client, report = unread_parameters(server, model)
        try:
            assert report["stalled"], report
            grown_kib = server.rss_kb() - rss_before
            assert grown_kib < 16 * 1024, (grown_kib, report)
        finally:
            client.kill()
            client.wait()


def test_leases_per_connection_are_bounded(runtime_dir, model_root):
    with running(runtime_dir, [model_root],
                 extra=["--max-leases-per-connection", "50", "--max-queued-replies", "1000000",
                        "--max-queued-fds", "1000000"]) as server:
        model = str(model_root / "opt-small")
        server.cli("load", model)
        client, report = unread_parameters(server, model)
        try:
            h = health(server)
            assert h["leases"] == 50, (h, report)
            assert h["refused"]["leases"] >= 1, h
        finally:
            client.kill()
            client.wait()
        assert wait_until(lambda: health(server)["leases"] == 0, timeout=10)


def test_a_client_that_catches_up_gets_every_reply(runtime_dir, model_root):
    """Backpressure pauses a connection; reading its replies resumes it, nothing is lost."""
    with running(runtime_dir, [model_root], extra=["--max-queued-replies", "4"]) as server:
        r = run_here([FAULT_CLIENT, "--socket", server.socket, "--mode", "pipelined",
                      "--timeout", "20"])
        report = json.loads(r.stdout)
        assert report["answered"] == report["requests"], report
        assert report["sent_before_reading"] < report["requests"], report  # it was paused


def test_partial_frames_have_a_server_wide_budget(runtime_dir, model_root):
    """30 connections each sending 64 MiB - 1 bytes of a 64 MiB frame."""
    with running(runtime_dir, [model_root]) as server:
        health(server)
        rss_before = server.rss_kb()
        chunk = b"\xab" * MIB
        sockets, dropped = [], 0
        try:
            for _ in range(30):
                s = connect(server.socket, timeout=10)
                sockets.append(s)
                try:
                    s.sendall(frame_header(64 * MIB))
                    for _ in range(63):
                        s.sendall(chunk)
                    s.sendall(chunk[:-1])
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    dropped += 1
            rss_during = server.rss_kb()
            h = health(server)
        finally:
            for s in sockets:
                s.close()
        print(f"RSS {rss_before // 1024} MiB before, {rss_during // 1024} MiB with 30 partial "
              f"64 MiB frames; {dropped} connections dropped")
        assert dropped >= 26 and h["refused"]["pending_frame_bytes"] >= 26, (dropped, h)
        if not TSAN_BUILD:  # ThreadSanitizer's allocator makes every allocated page resident
            assert rss_during - rss_before < 320 * 1024, (rss_before, rss_during)


def test_barely_started_frames_cost_little_and_expire(runtime_dir, model_root):
    with running(runtime_dir, [model_root], extra=["--frame-timeout", "1"]) as server:
        health(server)
        rss_before = server.rss_kb()
        sockets = []
        try:
            for _ in range(200):
                s = connect(server.socket)
                s.sendall(frame_header(1000)[:6])
                sockets.append(s)
            wait_until(lambda: health(server)["clients"] >= 201, timeout=10)
            rss_during = server.rss_kb()
            started = time.monotonic()
            for s in sockets:
                assert read_until_closed(s, timeout=10) is not None
            elapsed = time.monotonic() - started
        finally:
            for s in sockets:
                s.close()
        print(f"RSS {rss_before} KiB before, {rss_during} KiB with 200 connections of 6 bytes; "
              f"all dropped {elapsed:.1f} s later")
        assert rss_during - rss_before < 8 * 1024, (rss_before, rss_during)
        assert health(server)["refused"]["frame_timeout"] >= 200


def test_idle_connections_are_closed(runtime_dir, model_root):
    with running(runtime_dir, [model_root], extra=["--idle-timeout", "0.5"]) as server:
        s = connect(server.socket)
        try:
            assert read_until_closed(s, timeout=5) == b""  # closed quietly
        finally:
            s.close()
        assert health(server)["refused"]["idle_timeout"] >= 1


def test_long_lived_clients_reconnect_after_an_idle_close(runtime_dir, model_root):
    with running(runtime_dir, [model_root], extra=["--idle-timeout", "0.3"]) as server:
        model = str(model_root / "opt-small")
        client = SessionClient("--runtime-dir", runtime_dir)
        try:
            assert client(f"load {model}")["ok"]
            for _ in range(3):
                time.sleep(0.8)  # the server closes the pooled connection meanwhile
                out = client(f"status {model}")
                assert out["ok"] and out["state"] == "loaded", out
            assert client(f"attach {model}")["ok"]
        finally:
            assert client.close() == 0
        assert health(server)["refused"]["idle_timeout"] >= 3


def test_connections_holding_leases_are_not_idle(runtime_dir, model_root):
    with running(runtime_dir, [model_root], extra=["--idle-timeout", "0.3"]) as server:
        model = str(model_root / "opt-small")
        server.cli("load", model)
        # Holds a lease (and nothing else) for several idle timeouts, then checks the mapping.
        server.cli("attach", model, "--hold", "1.5", "--reverify", timeout=60)
        assert health(server)["refused"]["idle_timeout"] == 0


def run_here(args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


def test_connection_caps(runtime_dir, model_root, other_user, shared_tmp):
    sock_path = shared_tmp / "companion.sock"
    with running(runtime_dir, [model_root],
                 extra=["--socket", str(sock_path), "--max-connections", "6",
                        "--max-connections-per-uid", "4", "--allow-uid", str(other_user.uid)]
                 ) as server:
        os.chmod(sock_path, 0o666)  # let the other user reach it; the peer policy admits it
        held = [connect(server.socket) for _ in range(4)]
        try:
            answer = first_answer(server.socket, run_here)
            assert (answer["answer"], answer.get("code"), answer.get("then")) == (
                "error", "LIMIT_EXCEEDED", "closed"), answer
            assert "--max-connections-per-uid" in answer["message"]
            r = server.cli("health", check=False)
            assert r.returncode != 0 and "--max-connections-per-uid" in r.stderr, r.stderr
            # Another uid still gets in, up to the total.
            held_other = [other_user.popen(["/usr/bin/python3", "-c", HOLD_CONNECTION,
                                            str(sock_path)], stdout=subprocess.PIPE, text=True)
                          for _ in range(2)]
            try:
                for p in held_other:
                    assert p.stdout.readline().strip() == "connected"
                answer = first_answer(server.socket, other_user.run)
                assert (answer["answer"], answer.get("code")) == ("error", "LIMIT_EXCEEDED"), answer
                assert "--max-connections)" in answer["message"]
            finally:
                for p in held_other:
                    p.kill()
                    p.wait()
        finally:
            for s in held:
                s.close()
        h = wait_until(lambda: health_if_served(server))
        assert h["refused"]["connections_per_uid"] >= 2 and h["refused"]["connections"] >= 1, h


# Connects, says so, and holds the connection until killed (run as the other user).
HOLD_CONNECTION = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected', flush=True)\n"
    "time.sleep(60)\n")


def test_descriptor_exhaustion_backs_off(runtime_dir, model_root):
    with running(runtime_dir, [model_root]) as server:
        health(server)
        subprocess.run(["prlimit", f"--pid={server.pid}", "--nofile=64:64"], check=True)
        log_before = len(server.log_text())
        sockets = []
        try:
            for _ in range(100):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(server.socket)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                sockets.append(s)
            time.sleep(0.5)  # let it reach the limit
            cpu_before = cpu_seconds(server.pid)
            # Keep knocking for 2 s: new connections, closed at once.
            deadline = time.monotonic() + 2
            attempts = 0
            while time.monotonic() < deadline and attempts < 20000:
                attempts += 1
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as knock:
                    knock.setblocking(False)
                    try:
                        knock.connect(server.socket)
                    except (BlockingIOError, ConnectionRefusedError):
                        time.sleep(0.001)
            cpu_used = cpu_seconds(server.pid) - cpu_before
            log_growth = len(server.log_text()) - log_before
        finally:
            for s in sockets:
                s.close()
        print(f"at the descriptor limit: {cpu_used:.2f} s CPU in 2 s, log grew {log_growth} "
              "bytes")
        assert cpu_used < 0.5, cpu_used
        assert log_growth < 4096, server.log_text()[-2000:]
        h = wait_until(lambda: health_if_served(server), timeout=15)
        assert h and h["refused"]["descriptors_exhausted"] >= 1, h


def test_socket_mode_ignores_the_umask(runtime_dir, model_root, other_user, shared_tmp):
    old = os.umask(0)
    try:
        with running(runtime_dir, [model_root]) as server:
            mode = stat.S_IMODE(os.stat(server.socket).st_mode)
            assert mode == 0o600, oct(mode)
        with running(runtime_dir, [model_root],
                     extra=["--socket", str(shared_tmp / "grp.sock"), "--socket-group",
                            str(other_user.gid)]) as server:
            st = os.stat(server.socket)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == other_user.gid
            # Members of the socket's group may connect.
            r = other_user.run([COMPANION, "health", "--socket", server.socket, "--json"])
            assert r.returncode == 0, r.stderr
    finally:
        os.umask(old)


def test_other_users_are_refused_unless_allowed(runtime_dir, model_root, other_user, shared_tmp):
    sock_path = shared_tmp / "companion.sock"
    model = str(model_root / "opt-small")
    old = os.umask(0)
    try:
        with running(runtime_dir, [model_root], extra=["--socket", str(sock_path)]) as server:
            server.cli("load", model)
            os.chmod(sock_path, 0o666)  # even when the file lets it in, the policy does not
            answer = first_answer(sock_path, other_user.run)
            assert (answer["answer"], answer.get("code")) == ("error", "NOT_PERMITTED"), answer
            r = other_user.run([COMPANION, "unload", model, "--force", "--socket", sock_path])
            assert r.returncode != 0 and "not permitted" in r.stderr, (r.returncode, r.stderr)
            assert any(m["state"] == "loaded" for m in server.cli_json("ls")[0])
            assert health(server)["refused"]["peer_not_permitted"] >= 1
        for allow in (["--allow-uid", str(other_user.uid)], ["--allow-gid", str(other_user.gid)]):
            with running(runtime_dir, [model_root], extra=["--socket", str(sock_path), *allow]
                         ) as server:
                os.chmod(sock_path, 0o666)
                r = other_user.run([COMPANION, "health", "--socket", sock_path, "--json"])
                assert r.returncode == 0, (allow, r.stderr)
                assert json.loads(r.stdout)["state"] == "serving"
    finally:
        os.umask(old)
