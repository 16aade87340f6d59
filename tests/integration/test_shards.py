"""Tensor-parallel shards from a real server: each rank's tensors equal torch's slices of the
checkpoint (crc32 through `companion attach --verify`), and a TP=2 shard reads about half the
bytes. Presets for Llama (config.json), OPT and GPT-2 (fused q,k,v split part by part), rules
passed on the command line, and the errors. Row-split tensors big enough for O_DIRECT, read
through the page cache (only the rank's bytes, gathered) and past it (whole aligned ranges)."""
import json
import os
import pathlib
import subprocess
import zlib

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import opt_like_state_dict
from harness import COMPANION, Server

HIDDEN, KV, FFN, VOCAB = 64, 32, 128, 256


def rand_state_dict(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(*shape, generator=g) * 0.02).to(dtype)
            for name, shape in shapes.items()}


def llama_shapes(layers=2, hidden=HIDDEN, kv=KV, ffn=FFN, vocab=VOCAB):
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_split(name):
    """The split dimension the Llama preset uses (None: replicated)."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                      "up_proj.weight", "embed_tokens.weight", "lm_head.weight")):
        return 0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return 1
    return None


def opt_split(name):
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias",
                      "k_proj.bias", "v_proj.bias", "fc1.weight", "fc1.bias",
                      "embed_tokens.weight", "lm_head.weight")):
        return 0
    if name.endswith(("out_proj.weight", "fc2.weight")):
        return 1
    return None


def gpt2_state_dict(seed=7):
    shapes = {"wte.weight": (VOCAB, HIDDEN), "wpe.weight": (32, HIDDEN),
              "ln_f.weight": (HIDDEN,), "ln_f.bias": (HIDDEN,)}
    for i in range(2):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (HIDDEN,),
            p + "attn.c_attn.weight": (HIDDEN, 3 * HIDDEN),  # Conv1D: [in, out], q|k|v
            p + "attn.c_attn.bias": (3 * HIDDEN,),
            p + "attn.c_proj.weight": (HIDDEN, HIDDEN),
            p + "attn.c_proj.bias": (HIDDEN,),
            p + "mlp.c_fc.weight": (HIDDEN, FFN),
            p + "mlp.c_fc.bias": (FFN,),
            p + "mlp.c_proj.weight": (FFN, HIDDEN),
            p + "mlp.c_proj.bias": (HIDDEN,),
        })
    return rand_state_dict(shapes, torch.float32, seed)


def gpt2_slice(name, t, tp, rank):
    """GPT-2's shard, from torch: c_attn splits q, k and v separately and concatenates them."""
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        dim = t.dim() - 1
        q, k, v = t.split(HIDDEN, dim=dim)
        return torch.cat([torch.chunk(x, tp, dim)[rank] for x in (q, k, v)], dim=dim)
    if name.endswith("mlp.c_fc.weight"):
        return torch.chunk(t, tp, 1)[rank]
    if name.endswith(("mlp.c_fc.bias", "attn.c_proj.weight", "mlp.c_proj.weight", "wte.weight")):
        return torch.chunk(t, tp, 0)[rank]
    return t


def raw(t):
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def expected(sd, slicer, tp, rank, cast=None):
    out = {}
    for name, t in sd.items():
        if cast is not None:
            t = t.to(cast)
        s = slicer(name, t, tp, rank)
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[s.dtype]
        out[name] = (dtype, list(s.shape), zlib.crc32(raw(s)))
    return out


def by_dim(split_of):
    def slicer(name, t, tp, rank):
        dim = split_of(name)
        return t if dim is None or (dim == 1 and t.dim() < 2) else torch.chunk(t, tp, dim)[rank]
    return slicer


def write(directory, sd, config=None):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def shard_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-models")
    sds = {
        "llama": rand_state_dict(llama_shapes(), torch.float32, 11),
        "opt": opt_like_state_dict(hidden=HIDDEN, layers=2, vocab=VOCAB, positions=34,
                                   dtype="float16", seed=12),
        "gpt2": gpt2_state_dict(),
    }
    sds["opt"]["lm_head.weight"] = sds["opt"]["model.decoder.embed_tokens.weight"].clone()
    write(root / "llama", sds["llama"],
          {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    # down_proj 576 KiB, o_proj 288 KiB: each rank's rows span ranges that O_DIRECT reads
    # (≥ 64 KiB); rows of 1.5 KiB and 768 bytes, at offsets shifted by a 6-byte tensor.
    sds["llama-wide"] = rand_state_dict(
        {"model.a_odd_bias": (3,),
         **llama_shapes(layers=1, hidden=384, kv=128, ffn=768, vocab=128)}, torch.float16, 13)
    write(root / "llama-wide", sds["llama-wide"],
          {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    write(root / "opt", sds["opt"], {"architectures": ["OPTForCausalLM"], "model_type": "opt"})
    write(root / "opt-noconfig", sds["opt"])  # the preset guessed from tensor names
    write(root / "gpt2", sds["gpt2"], {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    write(root / "unknown", {"encoder.w": torch.arange(48, dtype=torch.float32).reshape(6, 8),
                             "encoder.b": torch.arange(6, dtype=torch.float32)})
    write(root / "odd", {"model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8),
                         "model.layers.0.mlp.gate_proj.weight": torch.zeros(10, 8)},
          {"architectures": ["LlamaForCausalLM"]})
    return root, sds


@pytest.fixture
def shard_server(runtime_dir, shard_models):
    s = Server(runtime_dir, [shard_models[0]])
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}:\n{s.log_text()}"


def attach(server, model, *extra):
    cmd = [str(COMPANION), "attach", str(model), "--namespace", server.namespace,
           "--runtime-dir", str(server.runtime_dir), "--json", "--verify", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def seen(report):
    return {t["name"]: (t["dtype"], t["shape"], t["crc32"]) for t in report["tensors"]}


def tp(size, rank):
    return ["--tp-size", str(size), "--tp-rank", str(rank)]


def test_llama_tp2_shards_equal_torch_slices_and_read_half(shard_server, shard_models):
    root, sds = shard_models
    model = root / "llama"
    whole = attach(shard_server, model)
    assert seen(whole) == expected(sds["llama"], by_dim(llama_split), 1, 0)
    whole_bytes = whole["model"]["bytes_total"]
    assert whole_bytes == sum(t.numel() * 4 for t in sds["llama"].values())

    shard_bytes = []
    for rank in (0, 1):
        r = attach(shard_server, model, *tp(2, rank))
        assert seen(r) == expected(sds["llama"], by_dim(llama_split), 2, rank)
        q = next(t for t in r["tensors"] if t["name"] == "model.layers.1.self_attn.q_proj.weight")
        assert q["shape"] == [HIDDEN // 2, HIDDEN]
        status, _ = shard_server.cli_json("status", str(model), *tp(2, rank))
        assert status["state"] == "loaded" and status["bytes_done"] == status["bytes_total"]
        assert "tp=%d/2" % rank in status["key"]
        shard_bytes.append(status["bytes_total"])
    for b in shard_bytes:
        assert 0.5 < b / whole_bytes < 0.52, (b, whole_bytes)  # norms are replicated
    norms = sum(t.numel() * 4 for n, t in sds["llama"].items() if "norm" in n)
    assert sum(shard_bytes) == whole_bytes + norms
    # Three models: the whole one and two shards, each its own key and slab.
    listed = shard_server.cli_json("ls")[0]
    assert len(listed) == 3 and len({m["key"] for m in listed}) == 3

    # TP=4 with a cast: torch's conversion, then its slices.
    for rank in range(4):
        r = attach(shard_server, model, *tp(4, rank), "--dtype", "bf16")
        assert seen(r) == expected(sds["llama"], by_dim(llama_split), 4, rank, torch.bfloat16)

    # Unload names a shard by its spec: only that one goes.
    shard_server.cli("unload", str(model), *tp(2, 1))
    keys = [m["key"] for m in shard_server.cli_json("ls")[0]]
    assert not any("tp=1/2" in k for k in keys) and any("tp=0/2" in k for k in keys)


@pytest.mark.parametrize("name", ["opt", "opt-noconfig"])
def evict(directory):
    """Drops the checkpoint's pages from the page cache (where the file system lets them go)."""
    for f in pathlib.Path(directory).glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("direct_io", ["off", "on", "auto-cold"])
def test_row_shards_through_the_cache_and_past_it(runtime_dir, shard_models, direct_io):
    """off: the rank's rows gathered from the page cache; on, and auto with the file evicted:
    O_DIRECT reads of whole ranges, the other ranks' columns dropped. The same bytes either way,
    cast or not."""
    root, sds = shard_models
    model = root / "llama-wide"
    server = Server(runtime_dir, [root],
                    extra=["--direct-io", "auto" if direct_io == "auto-cold" else direct_io])
    try:
        for cast in (None, torch.float32):
            for rank in (0, 1):
                if direct_io == "auto-cold":
                    evict(model)
                extra = ["--dtype", "f32"] if cast is not None else []
                r = attach(server, model, *tp(2, rank), *extra)
                assert seen(r) == expected(sds["llama-wide"], by_dim(llama_split), 2, rank, cast)
                down = next(t for t in r["tensors"]
                            if t["name"] == "model.layers.0.mlp.down_proj.weight")
                assert down["shape"] == [384, 384]
    finally:
        code = server.stop()
    assert code == 0, f"server exited with {code}:\n{server.log_text()}"


@pytest.mark.parametrize("name", ["opt", "opt-noconfig"])
def test_opt_preset(shard_server, shard_models, name):
    root, sds = shard_models
    for size in (2, 4):
        for rank in range(size):
            r = attach(shard_server, root / name, *tp(size, rank))
            assert seen(r) == expected(sds["opt"], by_dim(opt_split), size, rank)
    out_proj = next(t for t in r["tensors"]
                    if t["name"] == "model.decoder.layers.0.self_attn.out_proj.weight")
    assert out_proj["shape"] == [HIDDEN, HIDDEN // 4]


def test_gpt2_fused_qkv_split_part_by_part(shard_server, shard_models):
    root, sds = shard_models
    for rank in (0, 1):
        r = attach(shard_server, root / "gpt2", *tp(2, rank))
        assert seen(r) == expected(sds["gpt2"], gpt2_slice, 2, rank)
    # A plain dim-1 split of c_attn would be wrong: rank 0 would get all of q and half of k.
    w = sds["gpt2"]["h.0.attn.c_attn.weight"]
    got = next(t for t in r["tensors"] if t["name"] == "h.0.attn.c_attn.weight")
    assert got["crc32"] != zlib.crc32(raw(torch.chunk(w, 2, 1)[1]))
    assert got["shape"] == [HIDDEN, 3 * HIDDEN // 2]


def test_rules_on_the_command_line(shard_server, shard_models):
    root, sds = shard_models
    model = root / "unknown"
    s = shard_server
    out, code = s.cli_json("load", str(model), *tp(2, 0), check=False)
    assert code == 1 and out["error"]["code"] == "INVALID_ARGUMENT", out
    assert "--shard-rules" in out["error"]["message"]

    w = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    b = torch.arange(6, dtype=torch.float32)
    r = attach(s, model, *tp(2, 1), "--shard-rules", "encoder.w=row")
    assert seen(r) == {"encoder.w": ("F32", [6, 4], zlib.crc32(raw(torch.chunk(w, 2, 1)[1]))),
                       "encoder.b": ("F32", [6], zlib.crc32(raw(b)))}
    r = attach(s, model, *tp(2, 1), "--shard-rules", "encoder.*=column")
    assert seen(r) == {"encoder.w": ("F32", [3, 8], zlib.crc32(raw(torch.chunk(w, 2, 0)[1]))),
                       "encoder.b": ("F32", [3], zlib.crc32(raw(torch.chunk(b, 2, 0)[1])))}
    # Different rules, different models; the same rules spelled differently, the same model.
    attach(s, model, *tp(2, 1), "--shard-rules", " encoder.* = COLUMN ;")
    listed = [m for m in s.cli_json("ls")[0] if m["state"] == "loaded"]
    assert len(listed) == 2, listed
    assert any("rules=encoder.*=column" in m["key"] for m in listed)

    # Spec rules come before the preset.
    llama = sds["llama"]
    r = attach(s, root / "llama", *tp(2, 0), "--shard-rules", "*.mlp.down_proj.weight=replicated")
    down = "model.layers.0.mlp.down_proj.weight"
    assert seen(r)[down] == ("F32", [HIDDEN, FFN], zlib.crc32(raw(llama[down])))

    # Bad rules, bad ranks, dimensions that do not divide: INVALID_ARGUMENT.
    for bad in ("encoder.w", "encoder.w=diagonal", "=row", "x=column-packed(0)"):
        out, code = s.cli_json("load", str(model), *tp(2, 0), "--shard-rules", bad, check=False)
        assert code == 1 and out["error"]["code"] == "INVALID_ARGUMENT", (bad, out)
    out, code = s.cli_json("load", str(model), *tp(2, 2), check=False)
    assert code == 1 and out["error"]["code"] == "INVALID_ARGUMENT", out
    out, code = s.cli_json("load", str(root / "odd"), *tp(4, 0), check=False)
    assert code == 1 and out["error"]["code"] == "INVALID_ARGUMENT", out
    assert "gate_proj.weight" in out["error"]["message"] and "10" in out["error"]["message"]
    health, code = s.cli_json("health")
    assert code == 0 and health["state"] == "serving"
