"""Publishing from Python (host backend): publish -> attach in another process, fingerprints,
begin_publish (meta tensors, (dtype, shape) entries, abort, commit), a writer killed mid-publish,
concurrent attach_or_publish, and generations (a reader keeps its generation while a new one is
published; pinning; freeing)."""
import gc
import json
import signal
import time

import numpy as np
import pytest
import torch

import companion
from companion.publish import plan_table
from harness import wait_until
from publish_support import REPO, digest_of, digests, read_line, run_child, start_child

FP = {"engine": "test-engine", "version": "1.2", "dtype": "mixed", "tp": "1/1"}


def _model_named(client, key):
    for status in client.list():
        if status.key == key:
            return status
    return None


def _unload_when_free(client, key):
    """Unloads a published key once every lease of it is returned (releases are asynchronous)."""
    gc.collect()
    assert wait_until(lambda: all(g.leases == 0 for g in _model_named(client, key).generations)
                      and _model_named(client, key).leases == 0), _model_named(client, key)
    return client.unload(key)


def _slab(client):
    return int(client.health()["slab_bytes"])


def _settle_slab(client, expected, timeout=10.0):
    """Waits until the server's slab bytes equal ``expected``; returns the last value."""
    gc.collect()
    wait_until(lambda: _slab(client) == expected, timeout=timeout)
    return _slab(client)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layers.0.qkv.weight": torch.randint(-127, 127, (48, 16), dtype=torch.int8, generator=g),
        "layers.0.qkv.scale": torch.rand(48, generator=g, dtype=torch.float32),
        "norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "positions": torch.arange(10, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "numpy.f16": rng.standard_normal((3, 5)).astype(np.float16),
        "numpy.u16": rng.integers(0, 60000, (7,), dtype=np.uint16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(6, 4, generator=g).t(),  # non-contiguous source
    }


# ---- no server needed: argument checking and JSON -----------------------------------------------

def test_fingerprints_are_dicts_of_strings(client):
    for bad, pattern in [(["engine"], "dict of str"), ({"tp": 1}, r"fingerprint\['tp'\]"),
                         ({1: "x"}, "field names must be str"),
                         ({"engine": None}, r"fingerprint\['engine'\]")]:
        with pytest.raises(TypeError, match=pattern):
            client.publish("fp-types", {"a": np.zeros(2, np.float32)}, fingerprint=bad)
        with pytest.raises(TypeError, match=pattern):
            client.attach("fp-types", fingerprint=bad)
        with pytest.raises(TypeError, match=pattern):
            client.attach_or_publish("fp-types", bad, lambda: {})
        with pytest.raises(TypeError, match=pattern):
            client.begin_publish("fp-types", {"a": ("F32", (2,))}, fingerprint=bad)
    with pytest.raises(TypeError, match="generation must be an int"):
        client.get_model_parameters("some-key", 2.5)
    with pytest.raises(TypeError, match="apply to keys"):
        client.get_model_parameters(companion.ModelSpec("/x"), generation=1)


def test_every_c_function_has_a_prototype():
    import re

    from companion import _lib

    header = (REPO / "include" / "companion" / "companion.h").read_text()
    declared = set(re.findall(r"COMPANION_API[^;]*?\b(companion_\w+)\s*\(", header))
    known = set(_lib._PROTOTYPES) | set(_lib._OPTIONAL_PROTOTYPES)
    assert declared - known == set()
    assert {"companion_publish_claim", "companion_client_attach"} <= declared


def test_table_planning_declares_tied_tensors_once():
    base = torch.randn(4, 4)
    view = base.view(16)
    table = plan_table([("a", base), ("tied", base), ("same_memory", base.view(4, 4)),
                        ("other_shape", view), ("transposed", base.t()),
                        ("copy", base.clone()), ("empty1", torch.zeros(0)),
                        ("empty2", torch.zeros(0)), ("np", np.zeros((2, 3), np.uint16))])
    aliases = {e.name: e.alias_of for e in table}
    assert aliases == {"a": None, "tied": "a", "same_memory": "a", "other_shape": None,
                       "transposed": None, "copy": None, "empty1": None, "empty2": None,
                       "np": None}
    assert table[-1].dtype == companion.DType.U16 and table[-1].shape == (2, 3)
    meta = torch.empty(3, 2, dtype=torch.float16, device="meta")
    specs = plan_table([("m", meta), ("m2", meta), ("s", ("bf16", [5])),
                        ("s2", (torch.int8, (2, 2))), ("s3", (np.float32, 7)),
                        ("s4", ("F32", (7,), "s3"))], allow_specs=True, allow_meta=True)
    assert [(e.name, e.dtype.name, e.shape, e.alias_of) for e in specs] == [
        ("m", "F16", (3, 2), None), ("m2", "F16", (3, 2), "m"), ("s", "BF16", (5,), None),
        ("s2", "I8", (2, 2), None), ("s3", "F32", (7,), None), ("s4", "F32", (7,), "s3")]
    with pytest.raises(ValueError, match="meta tensor"):
        plan_table([("m", meta)])
    with pytest.raises(ValueError, match="not an earlier entry"):
        plan_table([("x", ("F32", (2,), "y"))], allow_specs=True)
    with pytest.raises(ValueError, match="differ"):
        plan_table([("x", ("F32", (2,))), ("y", ("F16", (2,), "x"))], allow_specs=True)
    with pytest.raises(TypeError):
        plan_table([("c", torch.zeros(2, dtype=torch.complex64))])


def test_model_status_reads_generations():
    doc = {"id": "abc", "key": "my/key", "source": "", "state": "loaded", "published": True,
           "generation": 2, "fingerprint": {"engine": "e"},
           "generations": [
               {"generation": 1, "leases": 1, "slab_bytes": 4096, "digests": ["wsum64:00"],
                "fingerprint": {"engine": "e"}, "created_at_ms": 5, "current": False},
               {"generation": 2, "leases": 0, "slab_bytes": 8192, "digests": ["wsum64:01"],
                "fingerprint": {"engine": "e"}, "created_at_ms": 6, "current": True}]}
    status = companion.ModelStatus.from_json(doc)
    assert status.published and status.generation == 2 and status.fingerprint == {"engine": "e"}
    assert [g.generation for g in status.generations] == [1, 2]
    assert status.generations[0] == companion.GenerationInfo(1, 1, 4096, ("wsum64:00",),
                                                             {"engine": "e"}, 5, False)
    assert status.generation_info(2).current and status.generation_info(3) is None
    old = companion.ModelStatus.from_json({"id": "x", "key": "k", "state": "loaded"})
    assert not old.published and old.generation == 0 and old.generations == ()


# ---- with the server --------------------------------------------------------------------------

def test_publish_then_attach_in_another_process(server, client):
    key = "tests/publish-attach"
    baseline = _slab(client)
    tensors = _tensors()
    model = client.publish(key, tensors, fingerprint=FP)
    assert sorted(model) == sorted(tensors)
    mine = {name: digest_of(t) for name, t in tensors.items()}
    assert digests(model) == mine
    assert model["norm.weight"].dtype == companion.DType.BF16
    assert model["transposed"].shape == (4, 6) and model["transposed"].is_contiguous()
    assert torch.equal(model["transposed"].torch(), tensors["transposed"])
    assert np.array_equal(model["numpy.u16"].numpy(), tensors["numpy.u16"])
    assert model.status.key == key

    # Another process attaches it by key (and through get_model_parameters / state_dict).
    r = run_child(server.runtime_dir, f"""
        from publish_support import digests
        m = client.get_model_parameters({key!r}, fingerprint={FP!r})
        print(json.dumps(digests(m)))
        print(sorted(client.attach({key!r})) == sorted(m))
    """)
    lines = r.stdout.splitlines()
    assert json.loads(lines[0]) == mine
    assert lines[1] == "True"

    status = _model_named(client, key)
    assert status is not None and status.published and status.generation == 1
    assert status.fingerprint == FP and status.tensors == len(tensors)
    assert status.slab_bytes == _slab(client) - baseline > 0
    [gen] = status.generations
    assert gen.generation == 1 and gen.current and gen.fingerprint == FP
    assert gen.digests and all(d.startswith("wsum64:") for d in gen.digests)
    assert gen.slab_bytes == status.slab_bytes
    # The child's lease went with it; ours stays.
    assert wait_until(lambda: _model_named(client, key).generations[0].leases == 1)
    assert gen.created_at_ms > 1.6e12
    # `companion ls --json` shows the same.
    listed, code = server.cli_json("ls")
    [doc] = [d for d in listed if d["key"] == key]
    assert code == 0 and doc["published"] is True and doc["generation"] == 1
    assert doc["fingerprint"] == FP and doc["generations"][0]["digests"] == list(gen.digests)

    # Unload by key once no lease is left: the memory goes back.
    with pytest.raises(companion.ModelInUse):
        client.unload(key)
    model.release()
    del model
    assert _unload_when_free(client, key).state == "unloaded"
    assert _model_named(client, key) is None
    assert _settle_slab(client, baseline) == baseline


def test_attach_without_wait_and_unknown_keys(client):
    with pytest.raises(companion.NotFound):
        client.attach("tests/never-published", wait=False)
    with pytest.raises(companion.NotFound):
        client.get_model_parameters("tests/never-published-or-a-path")


def test_fingerprint_mismatch_names_the_fields(server, client):
    key = "tests/fingerprint"
    model = client.publish(key, {"w": np.arange(12, dtype=np.float32)}, fingerprint=FP)
    other = dict(FP, dtype="fp8", tp="2/4")
    with pytest.raises(companion.FingerprintMismatch) as info:
        client.attach(key, fingerprint=other)
    text = str(info.value)
    assert "dtype" in text and "tp" in text and "engine" not in text, text
    built = []
    with pytest.raises(companion.FingerprintMismatch, match="dtype"):
        client.attach_or_publish(key, other, lambda: built.append(1) or {})
    assert built == []
    # The right one (also through get_model_parameters) attaches.
    same = client.get_model_parameters(key, fingerprint=dict(FP))
    assert np.array_equal(same["w"].numpy(), np.arange(12, dtype=np.float32))
    assert client.attach(key).status.fingerprint == FP  # no fingerprint: not checked
    state = client.state_dict(key, fingerprint=FP)
    assert torch.equal(state["w"], torch.arange(12, dtype=torch.float32))
    del state
    # In another process too.
    r = run_child(server.runtime_dir, f"""
        try:
            client.attach({key!r}, fingerprint={other!r})
        except companion.FingerprintMismatch as e:
            print("mismatch", e.code_name, str(e))
    """)
    assert r.stdout.startswith("mismatch FINGERPRINT_MISMATCH") and "dtype" in r.stdout
    del model, same
    _unload_when_free(client, key)


def test_begin_publish_meta_specs_abort_and_commit(client):
    key = "tests/begin"
    baseline = _slab(client)
    meta = torch.empty(8, 4, dtype=torch.float16, device="meta")
    table = {"w": meta, "w_tied": meta, "q": ("int8", (3, 5)), "s": (np.float32, [5]),
             "b": (torch.bfloat16, (2,))}

    # Abort frees the slab; commit afterwards is refused.
    pub = client.begin_publish(key, table, fingerprint={"engine": "e"})
    assert isinstance(pub, companion.Publication) and pub.key == key and pub.generation == 1
    assert pub.tensors["w"] is pub.tensors["w_tied"]
    assert pub.tensors["w"].dtype == torch.float16 and tuple(pub.tensors["w"].shape) == (8, 4)
    assert pub.tensors["q"].dtype == torch.int8 and tuple(pub.tensors["s"].shape) == (5,)
    assert pub.tensors["b"].dtype == torch.bfloat16
    pub.tensors["q"].fill_(7)
    assert _slab(client) > baseline
    with pytest.raises(companion.ModelInUse):  # the key is claimed
        client.begin_publish(key, table)
    pub.abort()
    assert pub.aborted and pub.tensors == {}
    assert _settle_slab(client, baseline) == baseline
    with pytest.raises(companion.InvalidArgument, match="aborted"):
        pub.commit()
    pub.abort()  # idempotent

    # A context manager left through an exception aborts too.
    with pytest.raises(ZeroDivisionError):
        with client.begin_publish(key, table) as failing:
            failing.tensors["q"].fill_(1)
            1 / 0
    assert failing.aborted
    assert _settle_slab(client, baseline) == baseline
    # So does dropping an uncommitted publication.
    dropped = client.begin_publish(key, table)
    assert _slab(client) > baseline
    del dropped
    assert _settle_slab(client, baseline) == baseline
    assert _model_named(client, key) is None or _model_named(client, key).generation == 0

    # Written and committed: attachers see what was written; the writable tensors stay valid.
    with client.begin_publish(key, table) as pub:
        generation = pub.generation
        assert generation >= 1
        w = pub.tensors["w"]
        w.copy_(torch.arange(32, dtype=torch.float16).view(8, 4))
        pub.tensors["q"].copy_(torch.arange(15, dtype=torch.int8).view(3, 5))
        pub.tensors["s"].fill_(0.25)
        pub.tensors["b"].copy_(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
        model = pub.commit()
    assert pub.committed and pub.model is model
    with pytest.raises(companion.InvalidArgument, match="committed"):
        pub.commit()
    pub.abort()  # no-op after commit
    other = client.attach(key)
    assert torch.equal(other["w"].torch(), torch.arange(32, dtype=torch.float16).view(8, 4))
    assert other["w_tied"].data_ptr == other["w"].data_ptr
    assert torch.equal(other["q"].torch(), torch.arange(15, dtype=torch.int8).view(3, 5))
    assert torch.equal(other["b"].torch(), torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert other.status.generation == generation and other.status.fingerprint == {}
    # The writable tensor outlives the publication, the model and the other attach.
    del pub, model, other
    gc.collect()
    assert w.sum().item() == sum(range(32))
    assert wait_until(lambda: _model_named(client, key).generations[0].leases == 1)  # w's
    del w
    _unload_when_free(client, key)
    assert _settle_slab(client, baseline) == baseline


def test_abort_waits_for_the_tensors_handed_out(client):
    """Memory safety first: an aborted publication whose writable tensor is still referenced
    keeps its mapping (and the key) until that tensor is gone."""
    key = "tests/abort-held"
    baseline = _slab(client)
    pub = client.begin_publish(key, {"x": ("F32", (4096,))})
    x = pub.tensors["x"]
    x.fill_(3.0)
    pub.abort()
    assert float(x.sum()) == 3.0 * 4096  # still mapped
    with pytest.raises(companion.ModelInUse):
        client.begin_publish(key, {"x": ("F32", (4,))})
    assert _slab(client) > baseline
    del x
    assert _settle_slab(client, baseline) == baseline
    with client.begin_publish(key, {"x": ("F32", (4,))}) as again:
        again.tensors["x"].fill_(1.0)
        model = again.commit()
    assert "tests/abort-held" in repr(model) and float(model["x"].torch().sum()) == 4.0
    del model, again
    _unload_when_free(client, key)


def test_numpy_only_publication(client):
    key = "tests/numpy"
    pub = client.begin_publish(key, {"a": ("u16", (4,)), "b": ("F64", (2, 2))})
    raw = pub._raw["a"]
    assert isinstance(raw, companion.WritableTensor) and raw.numpy().flags.writeable
    np.copyto(raw.numpy(), np.array([1, 2, 3, 65535], np.uint16))
    pub.tensors["b"].copy_(torch.eye(2, dtype=torch.float64))
    model = pub.commit()
    assert model["a"].numpy().tolist() == [1, 2, 3, 65535]
    assert not model["a"].numpy().flags.writeable
    assert np.array_equal(model["b"].numpy(), np.eye(2))
    del model, pub, raw
    _unload_when_free(client, key)


WRITER = """
    pub = client.begin_publish(KEY, {"big": ("F32", (512, 1024)), "small": ("I32", (16,))},
                               fingerprint=FP)
    pub.tensors["big"][:256].fill_(1.0)   # partly written
    print("declared", pub.generation, flush=True)
    sys.stdin.readline()                  # until killed
"""

WAITER = """
    import numpy as np  # not torch: children start faster
    def build():
        with open(MARKER, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(BUILD_SECONDS)
        return {"big": np.full((512, 1024), 2.0, np.float32),
                "small": np.arange(16, dtype=np.int32)}
    print("waiting", flush=True)
    m = client.attach_or_publish(KEY, FP, build, timeout=60)
    from publish_support import digests
    print("got", m.status.generation, json.dumps(digests(m)), flush=True)
"""


def _child_code(code, **values):
    return "".join(f"{name} = {value!r}\n" for name, value in values.items()) + \
        __import__("textwrap").dedent(code)


def test_writer_killed_mid_publish(server, client, tmp_path):
    key = "tests/killed-writer"
    fp = {"engine": "kill"}
    baseline = _slab(client)

    # Killed with nobody waiting: the slab goes back.
    writer = start_child(server.runtime_dir, _child_code(WRITER, KEY=key, FP=fp))
    assert read_line(writer, "declared").split()[1] == "1"
    assert _slab(client) >= baseline + 512 * 1024 * 4
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert _settle_slab(client, baseline) == baseline

    # Killed while another process waits in attach_or_publish: the waiter becomes the writer,
    # the next caller attaches.
    marker = tmp_path / "builds"
    writer = start_child(server.runtime_dir, _child_code(WRITER, KEY=key, FP=fp))
    read_line(writer, "declared")
    waiter = start_child(server.runtime_dir, _child_code(WAITER, KEY=key, FP=fp,
                                                         MARKER=str(marker), BUILD_SECONDS=0))
    read_line(waiter, "waiting")
    time.sleep(0.5)
    assert waiter.poll() is None and not marker.exists()  # blocked on the server
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    line = read_line(waiter, "got")
    assert waiter.wait(timeout=30) == 0
    generation = int(line.split()[1])
    assert generation >= 1
    built = json.loads(line.split(" ", 2)[2])
    assert marker.read_text().count("\n") == 1
    expected = {"big": digest_of(torch.full((512, 1024), 2.0)),
                "small": digest_of(torch.arange(16, dtype=torch.int32))}
    assert built == expected
    later = start_child(server.runtime_dir, _child_code(WAITER, KEY=key, FP=fp,
                                                        MARKER=str(marker), BUILD_SECONDS=0))
    read_line(later, "waiting")
    line = read_line(later, "got")
    assert int(line.split()[1]) == generation
    assert json.loads(line.split(" ", 2)[2]) == expected
    assert later.wait(timeout=30) == 0
    assert marker.read_text().count("\n") == 1  # attached, not built
    status = _model_named(client, key)
    assert status.generation == generation and len(status.generations) == 1
    assert _settle_slab(client, baseline + status.slab_bytes) == baseline + status.slab_bytes
    _unload_when_free(client, key)
    assert _settle_slab(client, baseline) == baseline


def test_concurrent_attach_or_publish_builds_once(server, client, tmp_path):
    key = "tests/concurrent"
    fp = {"engine": "many"}
    marker = tmp_path / "builds"
    go = tmp_path / "go"
    body = _child_code("""
        import numpy
        print("ready", flush=True)
        while not os.path.exists(GO):
            time.sleep(0.005)
    """, GO=str(go)) + _child_code(WAITER, KEY=key, FP=fp, MARKER=str(marker),
                                   BUILD_SECONDS=1.0)
    children = [start_child(server.runtime_dir, body) for _ in range(4)]
    for child in children:
        read_line(child, "ready")
    go.write_text("go")
    results = []
    for child in children:
        read_line(child, "waiting")
        results.append(read_line(child, "got"))
        assert child.wait(timeout=60) == 0
    assert marker.read_text().count("\n") == 1, marker.read_text()
    assert len({r.split(" ", 2)[2] for r in results}) == 1
    assert {r.split()[1] for r in results} == {"1"}
    status = _model_named(client, key)
    assert status.generation == 1 and len(status.generations) == 1
    _unload_when_free(client, key)


READER = """
    import torch
    m = client.attach(KEY)
    w = m["w"].torch()
    print("attached", m.status.generation, flush=True)
    for line in sys.stdin:
        if line.strip() == "release":
            del w
            m.release()
            del m
            import gc; gc.collect()
            print("released", flush=True)
            continue
        print("sum", float((w * 2).sum()), float(w[0, 0]), flush=True)
"""


def test_generation_swap(server, client):
    key = "tests/generations"
    first = {"w": torch.full((256, 64), 1.0)}
    second = {"w": torch.full((256, 64), 3.0)}
    published = client.publish(key, first)
    published.release()
    reader = start_child(server.runtime_dir, _child_code(READER, KEY=key))
    assert read_line(reader, "attached").split()[1] == "1"

    def compute():
        reader.stdin.write("go\n")
        return read_line(reader, "sum")

    before = compute()
    assert before == f"sum {256 * 64 * 2.0} 1.0"
    gen2 = client.publish(key, second)
    assert gen2.status.generation == 2
    for _ in range(3):
        assert compute() == before  # the reader keeps generation 1
    fresh = client.attach(key)
    assert fresh.status.generation == 2 and float(fresh["w"].torch()[0, 0]) == 3.0
    status = _model_named(client, key)
    assert status.generation == 2
    assert [(g.generation, g.current) for g in status.generations] == [(1, False), (2, True)]
    assert wait_until(lambda: _model_named(client, key).generation_info(1).leases == 1)
    # Pinning generation 1 works while it lives.
    pinned = client.get_model_parameters(key, generation=1)
    assert float(pinned["w"].torch()[0, 0]) == 1.0
    pinned.release()
    del pinned
    gc.collect()
    # The reader lets go: generation 1 is freed, pinning it now is refused.
    reader.stdin.write("release\n")
    read_line(reader, "released")
    assert wait_until(lambda: _model_named(client, key).generation_info(1) is None)
    assert [g.generation for g in _model_named(client, key).generations] == [2]
    with pytest.raises(companion.NotFound):
        client.attach(key, generation=1)
    reader.stdin.close()
    assert reader.wait(timeout=30) == 0
    del gen2, fresh
    _unload_when_free(client, key)


def test_status_stream_of_a_key(client):
    key = "tests/stream"
    with client.status_stream(key=key, timeout=10) as stream:
        first = stream.next()  # the current state: nothing published yet
        assert first.key == key and first.published and first.generation == 0
        model = client.publish(key, {"w": np.ones(8, np.float32)})
        seen = []
        while True:
            status = stream.next()
            seen.append(status)
            if status.generation == 1:
                break
        assert status.key == key and status.published and status.loaded
        assert all(s.state == "loading" for s in seen[:-1])
        again = client.publish(key, {"w": np.zeros(8, np.float32)})
        while status.generation != 2:
            status = stream.next()
        assert [g.generation for g in status.generations] == [1, 2]
    with pytest.raises(TypeError):
        client.status_stream("x", key=key)
    del model, again
    _unload_when_free(client, key)



def test_reload_makes_a_new_generation_of_a_checkpoint(client, model_root):
    spec = companion.ModelSpec(model_root / "opt-f32", tag="reload")
    loaded = client.load(spec)
    old = client.get_model_parameters(spec)
    weight = old["model.decoder.embed_tokens.weight"].torch()
    expected = weight.clone()
    unchanged = client.reload(loaded.id)
    assert unchanged.generation == loaded.generation and "unchanged" in unchanged.raw["message"]
    forced = client.reload(loaded.key, force=True, timeout=60)
    assert forced.loaded and forced.generation == loaded.generation + 1
    assert [(g.generation, g.current) for g in forced.generations] == [
        (loaded.generation, False), (forced.generation, True)]
    assert forced.generation_info(loaded.generation).leases == 1  # old's
    new = client.get_model_parameters(spec)
    assert new.status.generation == forced.generation
    assert new["model.decoder.embed_tokens.weight"].data_ptr != weight.data_ptr()
    assert torch.equal(weight, expected) and torch.equal(new.state_dict()[
        "model.decoder.embed_tokens.weight"], expected)
    del old, weight
    gc.collect()
    assert wait_until(lambda: [g.generation for g in client.status(spec).generations]
                      == [forced.generation])
    with pytest.raises(companion.NotFound):
        client.reload("tests/no-such-model")
    del new
    gc.collect()
    wait_until(lambda: client.status(spec).leases == 0)
    client.unload(spec)


def test_checkpoints_pin_generations_and_have_an_empty_fingerprint(client, model_root):
    source = str(model_root / "opt-bf16")
    current = client.get_model_parameters(source)
    assert not current.status.published and current.spec == companion.ModelSpec(source)
    assert client.get_model_parameters(source, generation=current.status.generation).status \
        .generation == current.status.generation
    with pytest.raises(companion.NotFound, match="no generation"):
        client.get_model_parameters(source, generation=current.status.generation + 5)
    with pytest.raises(companion.FingerprintMismatch, match="engine"):
        client.get_model_parameters(source, fingerprint={"engine": "x"})
    assert client.get_model_parameters(source, fingerprint={}).status.generation == \
        current.status.generation


def test_writes_after_commit_fault(server):
    """The writable mapping is remapped read-only in place at commit: a write through a tensor
    kept from before kills the writer with SIGSEGV, and the published bytes are intact."""
    key = "tests/write-after-commit"
    r = run_child(server.runtime_dir, f"""
        pub = client.begin_publish({key!r}, {{"w": ("F32", (1024,))}})
        w = pub.tensors["w"]
        w.fill_(1.0)
        model = pub.commit()
        print("committed", float(w.sum()), flush=True)
        w.add_(1.0)
        print("wrote", flush=True)
    """, check=False)
    assert "committed 1024.0" in r.stdout and "wrote" not in r.stdout
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)
    with companion.connect(runtime_dir=server.runtime_dir) as c:
        model = c.attach(key)
        assert float(model["w"].torch().sum()) == 1024.0
        del model
        _unload_when_free(c, key)


def test_attach_waits_for_a_first_generation_being_published(server, client):
    key = "tests/attach-waits"
    writer = start_child(server.runtime_dir, _child_code("""
        pub = client.begin_publish(KEY, {"w": ("I32", (8,))})
        pub.tensors["w"].copy_(__import__("torch").arange(8, dtype=__import__("torch").int32))
        print("declared", flush=True)
        sys.stdin.readline()
        model = pub.commit()
        print("committed", flush=True)
        sys.stdin.readline()
    """, KEY=key))
    try:
        read_line(writer, "declared")
        with pytest.raises(companion.NotReady):
            client.attach(key, wait=False)
        with pytest.raises(companion.Timeout):
            client.attach(key, timeout=0.3)
        # Another writer waits for the key (CLAIM_WAIT) or is refused at once (CLAIM_NOW).
        with pytest.raises(companion.ModelInUse):
            client.begin_publish(key, {"w": ("I32", (8,))})
        with pytest.raises(companion.Timeout):
            client.begin_publish(key, {"w": ("I32", (8,))}, wait=True, timeout=0.3)
        results = []
        import threading

        waiter = threading.Thread(target=lambda: results.append(client.attach(key, timeout=30)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # waiting on the server
        writer.stdin.write("commit\n")
        read_line(writer, "committed")
        waiter.join(30)
        [model] = results
        assert model["w"].numpy().tolist() == list(range(8))
        # A third generation while the first is leased and the second current is refused.
        second = client.publish(key, {"w": np.zeros(8, np.int32)})
        with pytest.raises(companion.LimitExceeded):
            client.publish(key, {"w": np.ones(8, np.int32)})
        results.clear()
        del model, second
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
    _unload_when_free(client, key)


def test_a_key_published_under_a_checkpoints_path_never_stands_in_for_it(client, model_root):
    """Any admitted client may publish under any name: a name the server finds as a checkpoint
    means the checkpoint, and the key published under it is reached only by attach()."""
    source = str(model_root / "opt-f32")
    real = client.get_model_parameters(source)
    name = "model.decoder.embed_tokens.weight"
    fake = {name: np.full(real[name].shape, 7.0, dtype=np.float32)}
    published = client.publish(source, fake)
    try:
        again = client.get_model_parameters(source)
        assert not again.status.published
        assert torch.equal(again[name].torch(), real[name].torch())
        assert client.attach(source)[name].torch()[0, 0].item() == 7.0
    finally:
        del published
        gc.collect()
        wait_until(lambda: any(m.published and m.leases == 0 for m in client.list()))
        for m in client.list():
            if m.published and m.key == source:
                client.unload(m.id, force=True)
