"""The `companion` command as a newcomer meets it: options before the subcommand, the variant
column of `ls`, the progress bar on a terminal, a device name that names nothing, and what
`attach` says about shared memory."""
import json
import os
import pty
import subprocess

from harness import COMPANION


def terminal_lines(data):
    """The lines a terminal shows for these bytes: '\\r' returns to the start of the line and
    what follows overwrites it, character by character."""
    lines, line, col = [], [], 0
    for ch in data.decode():
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line))
    return lines


def run_on_terminal(cmd, timeout=60):
    """Runs cmd with stderr on a pseudo-terminal (stdout discarded); returns (exit code, the
    bytes the terminal received)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    return proc.wait(timeout=timeout), received


def test_connection_options_before_the_subcommand(server, model_root):
    model = str(model_root / "opt-small")
    before = [str(COMPANION), "--namespace", server.namespace, "--runtime-dir",
              str(server.runtime_dir), "--instance", server.instance]
    r = subprocess.run(before + ["load", model], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(before + ["--json", "ls"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [m["source"] for m in json.loads(r.stdout)] == [model]
    # After the subcommand, as before; its own spelling wins over the one before it.
    r = subprocess.run([str(COMPANION), "--runtime-dir", "/nonexistent", "ls", "--runtime-dir",
                        str(server.runtime_dir), "--instance", server.instance, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 1


def test_serve_takes_its_options_before_the_subcommand_and_refuses_client_ones(tmp_path):
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    r = subprocess.run([str(COMPANION), "--instance", "abc", "serve", "--runtime-dir", str(rt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--instance is an option of the client commands" in r.stderr
    proc = subprocess.Popen([str(COMPANION), "--runtime-dir", str(rt), "--namespace", "early",
                             "serve", "--device", "host"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("companion serving early/model_server_host"), line
        assert f"socket {rt}/" in line
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_ls_shows_which_variant_each_model_is(server, model_root):
    model = str(model_root / "opt-small")
    server.cli("load", model)
    server.cli("load", model, "--dtype", "bf16")
    server.cli("load", model, "--tp-size", "2", "--tp-rank", "1", "--tag", "canary")
    server.cli("load", model, "--tp-size", "2", "--tp-rank", "0",
               "--shard-rules", "*fc1.weight=row")
    out = server.cli("ls").stdout.splitlines()
    header = out[0].split()
    assert header[header.index("SOURCE") + 1] == "VARIANT"
    column = out[0].index("VARIANT")
    variants = sorted(line[column:].strip() for line in out[1:])
    assert variants == sorted(["stored", "BF16", "stored tp=1/2 tag=canary",
                               "stored tp=0/2 rules=*fc1.weight=row"]), out


def test_progress_bar_on_a_terminal_leaves_no_stray_character(server, model_root):
    code, received = run_on_terminal(server.command("load", str(model_root / "opt-small")))
    assert code == 0, received
    assert b"\r" in received, f"no bar drawn: {received!r}"
    lines = terminal_lines(received)
    # One bar line, ending as its last drawing ends; the shorter "loaded" drawn over "loading"
    # must not leave the end of the longer one behind.
    assert len(lines) == 1, lines
    last_drawing = received.decode().rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
    assert last_drawing.startswith("loaded ["), received
    assert lines[0].rstrip() == last_drawing, (lines[0], last_drawing)
    # Already loaded: the final state alone, on one line.
    code, received = run_on_terminal(server.command("load", str(model_root / "opt-small")))
    assert code == 0 and terminal_lines(received)[0].startswith("loaded ["), received
    assert len(terminal_lines(received)) == 1, received


def test_device_that_names_no_device_is_an_invalid_argument(server, tmp_path):
    r = subprocess.run([str(COMPANION), "ls", "--device", "banana", "--runtime-dir",
                        str(server.runtime_dir), "--json"],
                       capture_output=True, text=True, timeout=30)
    error = json.loads(r.stdout)["error"]
    assert r.returncode == 1 and error["code"] == "INVALID_ARGUMENT", r.stdout
    assert "'banana' is not a GPU ordinal" in error["message"]
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    r = subprocess.run([str(COMPANION), "serve", "--device", "banana", "--runtime-dir", str(rt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "'banana' is not a GPU ordinal" in r.stderr and "CUDA driver" not in r.stderr, r.stderr


def test_attach_says_what_is_resident(server, model_root):
    model = str(model_root / "opt-small")
    plain = server.cli("attach", model).stdout
    assert "shared 0 B" not in plain
    assert "not read yet" in plain, plain
    verified = server.cli("attach", model, "--verify").stdout
    line = next(x for x in verified.splitlines() if "shared memfd inode" in x)
    # "of it 8.2 MiB shared pages it read": every tensor was read, so some are resident.
    read = line.split(" of it ")[1].split(" shared pages")[0]
    assert read != "0 B" and read.split()[1] in ("KiB", "MiB"), line
