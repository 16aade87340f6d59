"""Publishing engine-shaped weights on a real GPU, for both GPU backends (cuda-vmm, cuda-ipc).

- A process loads a small random Llama checkpoint with transformers (bf16, on the GPU), fuses
  q/k/v and quantizes its Linear weights to int8 (tests/support/engine_shaped.py), and publishes
  the result with ``companion.torch.publish_module``; another process builds the same
  architecture on the meta device, post-processes it the same way, ``attach_module``s the
  published tensors, and gets A's logits bit for bit, zero-copy (every weight inside the mapped
  tensors, no allocation in the reader, none in the server).
- A writer killed (SIGKILL) mid-publish: its slab is freed (server slab bytes and the GPU's
  memory use back to where they were); a process blocked in ``attach_or_publish`` behind it
  takes over and commits, another waiter attaches what it committed.
- Generations: a reader holding generation 1 keeps computing the same logits while generation 2
  is published; a new reader gets generation 2 and other logits; generation 1 is gone once its
  reader releases it.

Needs torch with CUDA and transformers; the library comes from $COMPANION_LIBRARY, else
$COMPANION_BUILD_DIR/src/capi/libcompanion.so."""
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness import BUILD, Server, wait_until
from gpu_memory import gpu_memory_used_mib

REPO = pathlib.Path(__file__).resolve().parents[2]
PYTHON_PACKAGE = REPO / "python"
SUPPORT = REPO / "tests" / "support"
LIBRARY = pathlib.Path(os.path.abspath(os.environ.get("COMPANION_LIBRARY") or
                                      BUILD / "src" / "capi" / "libcompanion.so"))
BACKENDS = ["cuda-vmm", "cuda-ipc"]
# Bitwise-reproducible kernels in every process.
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# A small Llama: GQA (4 query heads, 2 key/value heads of 64), tied embeddings.
LLAMA_CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                    max_position_embeddings=128, tie_word_embeddings=True)
INPUT_IDS = [[1, 15, 200, 999, 4, 87, 512, 33, 7, 650, 2, 3, 301, 45, 900, 11],
             [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 500, 501, 502, 503, 504, 998]]
# The killed-writer tests: 8 bf16 tensors of 128 MiB (1 GiB), big enough to see in the GPU's
# memory use next to a CUDA context.
BIG_TABLE = [[f"layer.{i}.weight", [8192, 8192]] for i in range(8)]
BIG_TABLE_BYTES = 8 * 8192 * 8192 * 2

if str(PYTHON_PACKAGE) not in sys.path:
    sys.path.insert(0, str(PYTHON_PACKAGE))


def child_env():
    env = dict(os.environ, COMPANION_LIBRARY=str(LIBRARY), PYTHONUNBUFFERED="1",
               **DETERMINISTIC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_PACKAGE), str(SUPPORT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                               else []))
    return env


class Child:
    """A Python process running one of the scripts below: JSON reports on stdout (one a line,
    read by a thread so that waits have a deadline), stderr to a log file, stdin kept open (the
    scripts that hold something wait for a line or EOF there before exiting)."""

    def __init__(self, tmp_path, name, code, *args):
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *[str(a) for a in args]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=child_env())
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self, tail=6000):
        self._log.flush()
        return self.log_path.read_text()[-tail:]

    def report(self, timeout):
        """The next JSON line the process prints (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no report within {timeout} s; stderr:\n"
                                     f"{self.stderr()}") from None
            if line is None:
                raise AssertionError(f"{self.name} exited ({self.proc.wait()}) without a "
                                     f"report; stderr:\n{self.stderr()}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def finish(self, timeout=60):
        """Closes stdin (the script's signal to exit) and waits; returns the exit status."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def run_child(tmp_path, name, code, *args, timeout=300):
    """Runs a script to its end; returns its (last) report. Fails on a non-zero exit."""
    child = Child(tmp_path, name, code, *args)
    try:
        report = child.report(timeout)
        code_ = child.finish(timeout=60)
        assert code_ == 0, f"{name} exited {code_}:\n{child.stderr()}"
        return report
    finally:
        child.kill()


def empty_root(tmp_path):
    """A model root with nothing in it, for servers that only hold published models."""
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    return root


def _field(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def find_status(client, key):
    """The ModelStatus of a published key in client.list(), or None."""
    for status in client.list():
        if status.key == key or status.source == key:
            return status
    return None


def generation_numbers(status):
    if status is None:
        return []
    return [int(_field(g, "generation", _field(g, "number", 0)))
            for g in (_field(status, "generations") or [])]


# ---- scripts run in other processes -------------------------------------------------------------

PREAMBLE = textwrap.dedent("""
    import gc, json, os, sys, time
    import torch
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    torch.cuda.set_device(0)
    import companion

    def say(**fields):
        print(json.dumps(fields), flush=True)

    def generation_of(mapped):
        try:
            return int(getattr(mapped.status, "generation", 0) or 0)
        except Exception:
            return 0

    def listed(client, key):
        for status in client.list():
            if status.key == key or status.source == key:
                gens = []
                for g in (getattr(status, "generations", None) or []):
                    get = g.get if isinstance(g, dict) else lambda n, d=None: getattr(g, n, d)
                    gens.append({"generation": int(get("generation", get("number", 0)) or 0),
                                 "leases": int(get("leases", 0) or 0),
                                 "slab_bytes": int(get("slab_bytes", 0) or 0),
                                 "current": bool(get("current", False))})
                return {"published": bool(getattr(status, "published", False)),
                        "generation": int(getattr(status, "generation", 0) or 0),
                        "fingerprint": dict(getattr(status, "fingerprint", None) or {}),
                        "slab_bytes": int(status.slab_bytes), "generations": gens}
        return None
""")

LLAMA_PREAMBLE = PREAMBLE + textwrap.dedent("""
    import transformers
    from engine_shaped import fingerprint, named_tensors, postprocess, tensor_table

    MAJOR = int(transformers.__version__.split(".")[0])
    DTYPE_ARG = {"dtype": torch.bfloat16} if MAJOR >= 5 else {"torch_dtype": torch.bfloat16}

    def table_json(module):
        return {n: [kind, dtype, list(shape)] for n, (kind, dtype, shape)
                in tensor_table(module).items()}
""")

# Process A: the engine. Loads the checkpoint the usual way, post-processes it, computes the
# logits, publishes every parameter and buffer, and checks what was published.
WRITER = LLAMA_PREAMBLE + textwrap.dedent("""
    from companion.torch import publish_module

    path, runtime_dir, key, out, ids_json = sys.argv[1:6]
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, attn_implementation="eager", **DTYPE_ARG).cuda().eval()
    postprocess(model)
    ids = torch.tensor(json.loads(ids_json), device="cuda:0")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save(logits.cpu(), out)
    fp = fingerprint(torch.bfloat16, transformers=transformers.__version__)

    client = companion.connect(device=0, runtime_dir=runtime_dir)
    t0 = time.perf_counter()
    mapped = publish_module(client, key, model, fingerprint=fp)
    publish_ms = 1000 * (time.perf_counter() - t0)
    # What was published is this model's tensors, byte for byte, on this GPU.
    differing, absent = [], []
    for name, _, tensor in named_tensors(model):
        if name not in mapped:
            absent.append(name)
        elif not torch.equal(mapped[name].torch(), tensor):
            differing.append(name)
    tied_once = ("lm_head.weight" not in mapped or "model.embed_tokens.weight" not in mapped or
                 mapped["lm_head.weight"].data_ptr == mapped["model.embed_tokens.weight"].data_ptr)
    unique = {}
    for _, _, tensor in named_tensors(model):
        unique[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    report = dict(
        fingerprint=fp, table=table_json(model), published=sorted(mapped.keys()),
        differing=differing, absent=absent, tied_once=tied_once,
        devices=sorted({t.device for t in mapped.values()}),
        generation=generation_of(mapped), listed=listed(client, key),
        backend=mapped.status.backend, unique_bytes=sum(unique.values()),
        slab_bytes=client.health()["slab_bytes"], publish_ms=publish_ms,
        logits_shape=list(logits.shape), logits_dtype=str(logits.dtype))
    # The writer keeps no lease: the published generation outlives it.
    mapped.release()
    client.close()
    say(**report)
""")

# Process B: a reader. Builds the architecture on the meta device, post-processes it the same
# way, attaches the published tensors (fingerprint checked) and runs. mode "once": reports and
# exits; "loop:STOPFILE": reports, then computes the logits again and again until STOPFILE
# exists, reports whether they ever changed, releases everything, reports, waits for stdin.
READER = LLAMA_PREAMBLE + textwrap.dedent("""
    from companion.torch import attach_module

    path, runtime_dir, key, out, fp_json, ids_json, mode = sys.argv[1:8]
    fp = json.loads(fp_json)
    config = transformers.LlamaConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(
            config, attn_implementation="eager", **DTYPE_ARG)
    model.tie_weights()  # lm_head.weight is embed_tokens.weight (tie_word_embeddings)
    postprocess(model)
    model.eval()
    table = table_json(model)

    client = companion.connect(device=0, runtime_dir=runtime_dir)
    # A fingerprint differing in one field is refused, and the error names the field.
    try:
        client.get_model_parameters(key, fingerprint=dict(fp, quant="fp8-e4m3"))
        mismatch = None
    except companion.FingerprintMismatch as e:
        mismatch = str(e)

    slab_before = client.health()["slab_bytes"]
    allocated_before = torch.cuda.memory_allocated()
    mapped = client.get_model_parameters(key, fingerprint=fp)
    attach_module(model, mapped)
    allocated_after = torch.cuda.memory_allocated()
    slab_after = client.health()["slab_bytes"]

    ranges = sorted((t.data_ptr, t.data_ptr + t.nbytes) for t in mapped.values())
    def inside(ptr):
        return any(lo <= ptr < hi for lo, hi in ranges)
    attached = list(named_tensors(model))
    report = dict(
        table=table, mismatch=mismatch, generation=generation_of(mapped),
        listed=listed(client, key), backend=mapped.status.backend,
        meta=[n for n, _, t in attached if t.is_meta],
        not_mapped=[n for n, _, t in attached if t.numel() and not inside(t.data_ptr())],
        devices=sorted({str(t.device) for _, _, t in attached}),
        tied=model.lm_head.weight is model.model.embed_tokens.weight,
        allocated=[allocated_before, allocated_after], slab_bytes=[slab_before, slab_after],
        mapped_bytes=mapped.mapped_bytes)
    del attached

    ids = torch.tensor(json.loads(ids_json), device="cuda:0")
    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits
    first = logits()
    torch.save(first.cpu(), out)
    if not mode.startswith("loop:"):
        say(**report)
        sys.exit(0)

    stop = mode[len("loop:"):]
    say(state="holding", **report)
    iterations = changed = 0
    deadline = time.monotonic() + 600
    while True:
        stopping = os.path.exists(stop)
        now = logits()
        iterations += 1
        changed += 0 if torch.equal(now, first) else 1
        if stopping or time.monotonic() > deadline:
            break
    say(iterations=iterations, changed=changed, stopped=stopping)

    # Release: the mapping lives as long as any tensor made from it.
    del model, mapped, now, first
    gc.collect()
    torch.cuda.synchronize()
    lingering = 0
    try:
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.is_cuda and inside(obj.data_ptr()):
                lingering += 1
    except Exception:
        lingering = -1
    say(released=True, lingering=lingering)
    sys.stdin.readline()
""")

# A writer that claims a key, declares BIG_TABLE, writes half of it, and then hangs (to be
# killed).
HALF_WRITER = PREAMBLE + textwrap.dedent("""
    runtime_dir, key, table_json, fp_json = sys.argv[1:5]
    spec = json.loads(table_json)
    client = companion.connect(device=0, runtime_dir=runtime_dir)
    table = {name: torch.empty(shape, dtype=torch.bfloat16, device="meta") for name, shape in spec}
    publication = client.begin_publish(key, table, fingerprint=json.loads(fp_json))
    written = []
    for i, (name, _) in enumerate(spec[: len(spec) // 2]):
        publication.tensors[name].fill_(float(i + 1))
        written.append(name)
    torch.cuda.synchronize()
    say(generation=int(getattr(publication, "generation", 0) or 0), written=written,
        devices=sorted({str(t.device) for t in publication.tensors.values()}),
        names=sorted(publication.tensors))
    time.sleep(3600)
""")

# attach_or_publish of BIG_TABLE: tensor i filled with 100 + i when this process builds. Reports
# before calling, then what it got.
WAITER = PREAMBLE + textwrap.dedent("""
    runtime_dir, key, table_json, fp_json, builds = sys.argv[1:6]
    spec = json.loads(table_json)
    client = companion.connect(device=0, runtime_dir=runtime_dir)
    built = []

    def build():
        built.append(os.getpid())
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\\n")
        return {name: torch.full(shape, float(100 + i), dtype=torch.bfloat16, device="cuda:0")
                for i, (name, shape) in enumerate(spec)}

    say(calling=os.getpid())
    t0 = time.monotonic()
    mapped = client.attach_or_publish(key, json.loads(fp_json), build)
    waited_s = time.monotonic() - t0
    values = {}
    for name, _ in spec:
        t = mapped[name].torch()
        values[name] = [float(t.min()), float(t.max())]
    say(pid=os.getpid(), built=bool(built), generation=generation_of(mapped), values=values,
        waited_s=waited_s, listed=listed(client, key))
    mapped.release()
""")


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    if not LIBRARY.exists():
        pytest.skip(f"{LIBRARY} missing: set COMPANION_LIBRARY or build target companion_capi")
    os.environ["COMPANION_LIBRARY"] = str(LIBRARY)
    os.environ.update(DETERMINISTIC_ENV)
    return torch


@pytest.fixture(scope="module")
def llama_checkpoints(torch_cuda, tmp_path_factory):
    """Two random Llama checkpoints of LLAMA_CONFIG (seeds 0 and 1), fp32, save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch = torch_cuda
    root = tmp_path_factory.mktemp("publish-models")
    paths = []
    for seed, name in enumerate(["llama-a", "llama-b"]):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(**LLAMA_CONFIG)
        model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
        path = root / name
        model.save_pretrained(str(path))
        assert list(path.glob("*.safetensors")), list(path.iterdir())
        paths.append(path)
    return root, paths


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_shaped_llama_published_by_one_process_runs_zero_copy_in_another(
        torch_cuda, llama_checkpoints, runtime_dir, tmp_path, backend):
    import companion

    torch = torch_cuda
    root, (path, _) = llama_checkpoints
    key = "engine-shaped/llama-tiny"
    server = Server(runtime_dir, [root], device="0", extra=["--backend", backend])
    client = None
    try:
        a = run_child(tmp_path, "writer", WRITER, path, runtime_dir, key, tmp_path / "a.pt",
                      json.dumps(INPUT_IDS))
        client = companion.connect(device=0, runtime_dir=runtime_dir)
        slab_published = client.health()["slab_bytes"]
        b = run_child(tmp_path, "reader", READER, path, runtime_dir, key, tmp_path / "b.pt",
                      json.dumps(a["fingerprint"]), json.dumps(INPUT_IDS), "once")
        status = find_status(client, key)
        slab_after = client.health()["slab_bytes"]
    finally:
        if client is not None:
            client.close()
        assert server.stop() == 0, server.log_text()

    print(f"{backend}: published {len(a['published'])} tensors ({a['unique_bytes']} bytes) in "
          f"{a['publish_ms']:.1f} ms; server slab bytes {a['slab_bytes']}")
    # A published its post-processed model exactly, on the GPU, ties once.
    # (A tied lm_head may be published as an alias entry or not listed at all; either way once.)
    assert a["differing"] == [] and set(a["absent"]) <= {"lm_head.weight"}, a
    assert a["tied_once"], a
    assert a["devices"] == ["cuda:0"] and a["backend"] == backend, a
    assert a["table"]["model.layers.0.self_attn.qkv_proj.weight"] == \
        ["parameter", "torch.int8", [512, 256]], a["table"]
    assert a["listed"] is not None and a["listed"]["published"], a["listed"]
    assert a["listed"]["fingerprint"] == a["fingerprint"], a["listed"]
    assert a["slab_bytes"] >= a["unique_bytes"], a

    # B rebuilt the same tensor table on meta and attached it zero-copy.
    assert b["table"] == a["table"], sorted(set(map(str, b["table"].items())) ^
                                            set(map(str, a["table"].items())))
    assert b["mismatch"] is not None and "quant" in b["mismatch"], b["mismatch"]
    assert b["meta"] == [] and b["not_mapped"] == [], b
    assert b["devices"] == ["cuda:0"] and b["tied"] and b["backend"] == backend, b
    assert b["allocated"][1] == b["allocated"][0], f"the reader allocated {b['allocated']}"
    assert b["slab_bytes"][1] == b["slab_bytes"][0], f"the server allocated {b['slab_bytes']}"
    assert slab_after == slab_published == b["slab_bytes"][0], \
        (slab_published, b["slab_bytes"], slab_after)
    assert len(generation_numbers(status)) == 1, status
    assert [g["leases"] >= 1 for g in b["listed"]["generations"]] == [True], b["listed"]
    if a["generation"] and b["generation"]:
        assert b["generation"] == a["generation"], (a["generation"], b["generation"])

    expected = torch.load(str(tmp_path / "a.pt"))
    got = torch.load(str(tmp_path / "b.pt"))
    assert expected.dtype == got.dtype == torch.bfloat16, (expected.dtype, got.dtype)
    assert got.shape == expected.shape == (2, 16, LLAMA_CONFIG["vocab_size"])
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_writer_killed_mid_publish_frees_its_memory(torch_cuda, runtime_dir, tmp_path, gpu,
                                                      backend):
    import companion

    key = "engine-shaped/killed-writer"
    fp = {"engine": "test", "dtype": "bfloat16"}
    server = Server(runtime_dir, [empty_root(tmp_path)], device="0",
                    extra=["--backend", backend])
    client = writer = None
    try:
        client = companion.connect(device=0, runtime_dir=runtime_dir)
        slab_before = client.health()["slab_bytes"]
        used_before = gpu_memory_used_mib(gpu["uuid"])
        writer = Child(tmp_path, "half-writer", HALF_WRITER, runtime_dir, key,
                       json.dumps(BIG_TABLE), json.dumps(fp))
        w = writer.report(180)
        assert w["devices"] == ["cuda:0"] and w["names"] == sorted(n for n, _ in BIG_TABLE), w
        slab_writing = client.health()["slab_bytes"]
        used_writing = gpu_memory_used_mib(gpu["uuid"])
        assert slab_writing - slab_before >= BIG_TABLE_BYTES, (slab_before, slab_writing)
        assert used_writing - used_before >= BIG_TABLE_BYTES / 2**20, (used_before, used_writing)

        writer.kill()
        freed = wait_until(lambda: client.health()["slab_bytes"] == slab_before, timeout=30,
                           interval=0.2)
        assert freed, (slab_before, client.health()["slab_bytes"])
        # The writer's CUDA context is gone too: the GPU is back where it was (a margin for
        # the driver's bookkeeping, far below the 1 GiB slab).
        back = wait_until(lambda: gpu_memory_used_mib(gpu["uuid"]) - used_before < 256,
                          timeout=30, interval=0.5)
        used_after = gpu_memory_used_mib(gpu["uuid"])
        assert back, (used_before, used_writing, used_after)
        status = find_status(client, key)
        assert status is None or not _field(status, "generation"), status
        print(f"{backend}: slab bytes {slab_before} -> {slab_writing} (writing) -> "
              f"{client.health()['slab_bytes']} (writer killed); GPU memory used "
              f"{used_before} -> {used_writing} -> {used_after} MiB")
    finally:
        if writer is not None:
            writer.kill()
        if client is not None:
            client.close()
        assert server.stop() == 0, server.log_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_waiter_takes_over_from_a_killed_writer(torch_cuda, runtime_dir, tmp_path, backend):
    import companion

    key = "engine-shaped/take-over"
    fp = {"engine": "test", "dtype": "bfloat16"}
    builds = tmp_path / "builds"
    server = Server(runtime_dir, [empty_root(tmp_path)], device="0",
                    extra=["--backend", backend])
    client = writer = None
    waiters = []
    try:
        client = companion.connect(device=0, runtime_dir=runtime_dir)
        slab_before = client.health()["slab_bytes"]
        writer = Child(tmp_path, "half-writer", HALF_WRITER, runtime_dir, key,
                       json.dumps(BIG_TABLE), json.dumps(fp))
        writer.report(180)
        waiters = [Child(tmp_path, f"waiter-{i}", WAITER, runtime_dir, key,
                         json.dumps(BIG_TABLE), json.dumps(fp), builds) for i in range(2)]
        for w in waiters:
            w.report(120)  # about to call attach_or_publish
        time.sleep(2.0)
        # Blocked behind the live writer: nobody built, nobody returned.
        assert [w.proc.poll() for w in waiters] == [None, None], [w.stderr() for w in waiters]
        assert not builds.exists(), builds.read_text()

        killed = time.monotonic()
        writer.kill()
        reports = [w.report(300) for w in waiters]
        took_s = time.monotonic() - killed
        for w in waiters:
            assert w.finish(60) == 0, w.stderr()
        status = find_status(client, key)
        slab_after = client.health()["slab_bytes"]
    finally:
        for child in [writer, *waiters]:
            if child is not None:
                child.kill()
        if client is not None:
            client.close()
        assert server.stop() == 0, server.log_text()

    builders = builds.read_text().split()
    assert len(builders) == 1, builders
    assert sorted(r["built"] for r in reports) == [False, True], reports
    assert str(next(r["pid"] for r in reports if r["built"])) == builders[0], (reports, builders)
    expected = {name: [100.0 + i, 100.0 + i] for i, (name, _) in enumerate(BIG_TABLE)}
    for r in reports:
        assert r["values"] == expected, r
    generations = {r["generation"] for r in reports}
    assert len(generations) == 1, reports
    # One generation committed, the killed writer's slab freed: the server holds one copy.
    assert status is not None and _field(status, "published"), status
    assert generation_numbers(status) and len(generation_numbers(status)) == 1, status
    assert 0 < slab_after - slab_before < 2 * BIG_TABLE_BYTES, (slab_before, slab_after)
    assert slab_after - slab_before == status.slab_bytes, (slab_before, slab_after, status)
    print(f"{backend}: a waiter took over {took_s:.2f} s after the writer's SIGKILL (build + "
          f"publish of {BIG_TABLE_BYTES // 2**20} MiB included)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reader_keeps_its_generation_while_the_next_is_published(
        torch_cuda, llama_checkpoints, runtime_dir, tmp_path, backend):
    import companion

    torch = torch_cuda
    root, (path_a, path_b) = llama_checkpoints
    key = "engine-shaped/llama-generations"
    ids = json.dumps(INPUT_IDS)
    stop = tmp_path / "stop"
    server = Server(runtime_dir, [root], device="0", extra=["--backend", backend])
    client = first_reader = None
    try:
        client = companion.connect(device=0, runtime_dir=runtime_dir)
        a = run_child(tmp_path, "writer-1", WRITER, path_a, runtime_dir, key,
                      tmp_path / "writer1.pt", ids)
        fp = json.dumps(a["fingerprint"])
        g1 = a["generation"] or a["listed"]["generation"]
        first_reader = Child(tmp_path, "reader-1", READER, path_a, runtime_dir, key,
                             tmp_path / "reader1.pt", fp, ids, f"loop:{stop}")
        held = first_reader.report(300)
        assert held["state"] == "holding" and held["not_mapped"] == [], held
        assert (held["generation"] or held["listed"]["generation"]) == g1, (held, g1)

        b = run_child(tmp_path, "writer-2", WRITER, path_b, runtime_dir, key,
                      tmp_path / "writer2.pt", ids)
        g2 = b["generation"] or b["listed"]["generation"]
        assert g2 != g1, (g1, g2)
        both = find_status(client, key)
        assert sorted(generation_numbers(both)) == sorted([g1, g2]), both
        assert _field(both, "generation") == g2, both
        # While reader 1 holds generation 1, it can still be asked for by number.
        pinned = client.get_model_parameters(key, generation=g1)
        pinned_generation = _field(pinned.status, "generation", 0)
        pinned.release()
        assert pinned_generation in (0, g1), pinned_generation

        second = run_child(tmp_path, "reader-2", READER, path_a, runtime_dir, key,
                           tmp_path / "reader2.pt", fp, ids, "once")
        assert (second["generation"] or second["listed"]["generation"]) == g2, second
        assert second["not_mapped"] == [] and second["meta"] == [], second

        stop.touch()
        loop = first_reader.report(300)
        released = first_reader.report(60)
        gone = wait_until(lambda: g1 not in generation_numbers(find_status(client, key)),
                          timeout=30, interval=0.2)
        remaining = find_status(client, key)
        refused = None
        try:
            client.get_model_parameters(key, generation=g1).release()
        except companion.Error as e:
            refused = e
        assert first_reader.finish(60) == 0, first_reader.stderr()
    finally:
        if first_reader is not None:
            first_reader.kill()
        if client is not None:
            client.close()
        assert server.stop() == 0, server.log_text()

    print(f"{backend}: reader 1 computed {loop['iterations']} times on generation {g1} while "
          f"generation {g2} was published and read")
    assert loop["stopped"] and loop["iterations"] >= 2, loop
    assert loop["changed"] == 0, f"reader 1's logits changed {loop['changed']} times"
    assert gone, (f"generation {g1} still listed after its reader released it "
                  f"({released['lingering']} tensors of it still alive there): {remaining}")
    assert generation_numbers(remaining) == [g2], remaining
    assert refused is not None, f"generation {g1} could still be attached after it was freed"

    logits = {name: torch.load(str(tmp_path / f"{name}.pt"))
              for name in ["writer1", "writer2", "reader1", "reader2"]}
    assert torch.equal(logits["reader1"], logits["writer1"])
    assert torch.equal(logits["reader2"], logits["writer2"])
    assert not torch.equal(logits["reader1"], logits["reader2"])
