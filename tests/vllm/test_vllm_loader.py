"""`--load-format companion` with a real vLLM engine (CPU build, host backend): engine A loads
and publishes, engine B attaches; tokens equal a plain vLLM run; B maps the weights instead of
holding them; B keeps generating after A exits; and the fallbacks."""
import json

import numpy as np
import pytest

import companion  # from python/ (conftest)
from harness import Server

MiB = 2**20


def _table(rows):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths))
                     for row in rows)


@pytest.fixture
def server(tmp_path, opt_checkpoint):
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    s = Server(rt, [opt_checkpoint.parent])
    yield s
    assert s.stop() == 0, s.log_text()


def test_engines_share_published_weights(tmp_path, server, plugin_site, opt_checkpoint,
                                         engines):
    rt = server.runtime_dir
    plain = engines(plugin_site, rt, opt_checkpoint, load_format="auto",
                    log=tmp_path / "plain.log")
    p = plain.result()
    assert plain.wait() == 0, plain.output()[-4000:]

    a = engines(plugin_site, rt, opt_checkpoint, hold=True, log=tmp_path / "a.log")
    ra = a.result()
    b = engines(plugin_site, rt, opt_checkpoint, hold=True, log=tmp_path / "b.log")
    rb = b.result()

    # Greedy tokens: the default loader, the publisher and the attached engine agree.
    assert ra["tokens"] == p["tokens"]
    assert rb["tokens"] == p["tokens"]
    if p["packed_linear_weights"]:
        # vLLM's CPU backend packed the linear weights into oneDNN/AMX memory (CPUs with
        # AVX-512 BF16 or AMX): nothing shareable is left, and the plugin must say so and load
        # as vLLM would instead of publishing a model without its linear weights.
        for r in (ra, rb):
            assert r["report"]["route"] == "fallback", r["report"]
            assert "NotShareable" in r["report"]["reason"], r["report"]
            assert "packed" in r["report"]["reason"], r["report"]
            assert r["report"]["tensors"] == 0, r["report"]
        for proc in (a, b):
            proc.send("exit")
            assert proc.wait() == 0, proc.output()[-4000:]
        pytest.skip(f"vLLM packed {p['packed_linear_weights']} linear weights into private "
                    "kernel memory on this CPU: checked the typed fallback, not the sharing")
    model_bytes = p["model_bytes"]
    assert model_bytes > 150 * MiB
    # A loaded from disk and published; B attached what A published, loading nothing.
    assert p["report"] is None
    assert ra["report"]["route"] == "published", ra["report"]
    assert rb["report"]["route"] == "attached", rb["report"]
    assert ra["report"]["key"] == rb["report"]["key"]
    assert rb["report"]["generation"] == ra["report"]["generation"] == 1
    # Every parameter of both engines lies in the server's memory (only small buffers, which
    # vLLM writes in place, are private).
    for r in (ra, rb):
        assert r["model_bytes_in_shared_memory"] >= model_bytes - 1 * MiB, r
        assert r["report"]["used_shared_bytes"] >= model_bytes - 1 * MiB, r["report"]
    # Each engine's own (anonymous) memory is smaller than the plain engine's by about the
    # model's size: B never had a copy, and A gave its own back after publishing.
    for r in (ra, rb):
        assert r["anon"] <= p["anon"] - 0.8 * model_bytes, (r["anon"], p["anon"], model_bytes)
    # What vLLM's memory profiler is told is held outside the engine.
    assert rb["external_weight_memory"] >= model_bytes
    assert p["external_weight_memory"] == 0

    rows = [("engine", "load format", "route", "weights ready (s)", "engine start (s)",
             "own memory MiB", "model MiB in shared memory", "tokens = plain")]
    for name, r in (("plain", p), ("A", ra), ("B", rb)):
        report = r["report"] or {}
        rows.append((name, "auto" if r is p else "companion", report.get("route", "-"),
                     f"{report['seconds']:.3f}" if report else "-",
                     f"{r['engine_seconds']:.1f}", f"{r['anon'] / MiB:.0f}",
                     f"{r['model_bytes_in_shared_memory'] / MiB:.1f}", r["tokens"] == p["tokens"]))
    print("\n" + _table(rows))

    # A exits; B keeps its lease and goes on generating the same tokens.
    a.send("exit")
    assert a.wait() == 0, a.output()[-4000:]
    status = json.loads(server.cli("status", "--published", ra["report"]["key"], "--json").stdout)
    assert status["leases"] == 1, status
    b.send("generate")
    again = b.result()
    assert again["tokens"] == p["tokens"]
    b.send("exit")
    assert b.wait() == 0, b.output()[-4000:]


def test_fingerprint_mismatch_falls_back_and_no_server_fails_typed(tmp_path, server, plugin_site,
                                                                   opt_checkpoint, engines):
    rt = server.runtime_dir
    # Another engine's weights under the key this engine computes, with another fingerprint.
    key = f"vllm:{opt_checkpoint}:tp0of1-pp0of1-dp0of1"
    with companion.connect(runtime_dir=rt) as client:
        client.publish(key, {"w": np.zeros(4, np.float32)}, fingerprint={"dtype": "torch.float16"})

    other = engines(plugin_site, rt, opt_checkpoint, log=tmp_path / "other.log")
    r2 = other.result()
    assert other.wait() == 0
    assert r2["report"]["route"] == "fallback", r2["report"]
    assert "FingerprintMismatch" in r2["report"]["reason"]
    assert "dtype" in r2["report"]["reason"]
    assert r2["model_bytes_in_shared_memory"] == 0
    warnings = [line for line in other.output().splitlines()
                if "WARNING" in line and "companion: cannot share weights" in line]
    assert len(warnings) == 1, warnings

    # No server and fallback off: the engine fails with the typed error.
    empty = tmp_path / "empty-rt"
    empty.mkdir(mode=0o700)
    strict = engines(plugin_site, empty, opt_checkpoint, extra={"fallback": False},
                     log=tmp_path / "strict.log")
    assert strict.wait(timeout=600) != 0
    assert "Unavailable" in strict.output(), strict.output()[-4000:]
