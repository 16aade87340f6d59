"""companion.torch.publish_module / attach_module: tied weights published once and restored tied;
an engine-shaped model (fused qkv, int8 weights with per-channel scales, a non-persistent rotary
buffer, a tied lm_head) published by one process and run by another from a meta-device module,
with bit-identical logits."""
import gc

import pytest
import torch

import companion
from companion.publish import module_tensors
from companion.torch import attach_module, attach_or_publish_module, module_state, publish_module
from harness import wait_until
from publish_support import build_engine, engine_classes, engine_ids, read_line, start_child


def _model_named(client, key):
    for status in client.list():
        if status.key == key:
            return status
    return None


def _unload_when_free(client, key):
    """Unloads a published key once every lease of it is returned (releases are asynchronous)."""
    gc.collect()
    assert wait_until(lambda: _model_named(client, key).leases == 0), _model_named(client, key)
    return client.unload(key)


class Tied(torch.nn.Module):
    def __init__(self, device=None, tie=True):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 64, device=device)  # 64 KiB of f32
        self.proj = torch.nn.Linear(64, 64, device=device)
        self.head = torch.nn.Linear(64, 256, bias=False, device=device)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("table", torch.zeros(8, device=device), persistent=False)

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.embed(ids))) + self.table.sum())


@pytest.fixture
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tied_weights_are_published_once_and_restored_tied(client):
    torch.manual_seed(0)
    module = Tied()
    with torch.no_grad():
        module.table.copy_(torch.arange(8.0))
    sizes = {name: t.numel() * t.element_size() for name, t in module_tensors(module)}
    assert set(sizes) == {"embed.weight", "proj.weight", "proj.bias", "head.weight", "table"}
    unique = sum(sizes.values()) - sizes["head.weight"]

    mapped = publish_module(client, "tests/tied", module, fingerprint={"engine": "tied"})
    assert mapped["head.weight"].data_ptr == mapped["embed.weight"].data_ptr
    tied_slab = _model_named(client, "tests/tied").slab_bytes
    assert unique <= tied_slab < unique + sizes["head.weight"]
    # The same weights untied take the tied tensor's bytes once more.
    untied = Tied(tie=False)
    untied.load_state_dict(module.state_dict())
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    publish_module(client, "tests/untied", untied).release()
    assert _model_named(client, "tests/untied").slab_bytes >= tied_slab + sizes["head.weight"] \
        - 4096

    # Attached into a meta module: the tie is one Parameter object again, the non-persistent
    # buffer comes along, the outputs are the publisher's.
    meta = Tied(device="meta")
    result = attach_module(meta, client.attach("tests/tied"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert meta.head.weight is meta.embed.weight
    assert isinstance(meta.head.weight, torch.nn.Parameter)
    assert not meta.head.weight.requires_grad
    assert torch.equal(meta.table, torch.arange(8.0))
    # An untied module gets the tie from the published aliases.
    loose = Tied(device="meta", tie=False)
    attach_module(loose, mapped)
    assert loose.head.weight is loose.embed.weight
    ids = torch.tensor([[1, 2, 3, 255]])
    with torch.no_grad():
        assert torch.equal(meta(ids), module(ids))
        assert torch.equal(loose(ids), module(ids))
    del mapped, meta, loose, result
    gc.collect()
    for key in ("tests/tied", "tests/untied"):
        _unload_when_free(client, key)


def test_attach_module_is_strict(client):
    module = Tied()
    mapped = publish_module(client, "tests/strict", module)
    target = Tied(device="meta")
    target.extra = torch.nn.Linear(2, 2, device="meta")
    del target.table
    target.register_buffer("other", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(RuntimeError) as info:
        attach_module(target, mapped)
    text = str(info.value)
    assert '"extra.weight"' in text and '"extra.bias"' in text and '"other"' in text
    assert 'Unexpected key(s) in state_dict: "table"' in text
    assert target.embed.weight.is_meta  # nothing changed
    result = attach_module(target, mapped, strict=False)
    assert result.missing_keys == ["extra.bias", "extra.weight", "other"]
    assert result.unexpected_keys == ["table"]
    assert not target.embed.weight.is_meta and target.extra.weight.is_meta
    wrong = Tied(device="meta")
    wrong.proj = torch.nn.Linear(64, 64, device="meta", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtype mismatch for proj.weight"):
        attach_module(wrong, mapped)
    del mapped, target, wrong, info  # the traceback holds the attach's frames
    _unload_when_free(client, "tests/strict")


def test_module_state_and_publish_of_a_state_dict(client):
    module = build_engine(seed=3)
    state = module_state(module)
    assert "inv_freq" in state and "inv_freq" not in module.state_dict()
    assert state["lm_head.weight"] is state["embed.weight"]
    # A state_dict(keep_vars=True) publishes too (no non-persistent buffers in it).
    mapped = client.publish("tests/state-dict", module.state_dict(keep_vars=True))
    assert "inv_freq" not in mapped
    assert mapped["lm_head.weight"].data_ptr == mapped["embed.weight"].data_ptr
    assert mapped["layers.0.attn.qkv.weight"].dtype == companion.DType.I8
    assert torch.equal(mapped["layers.1.up.scale"].torch(), module.layers[1].up.scale)
    del mapped
    _unload_when_free(client, "tests/state-dict")


PUBLISHER = """
    import torch
    torch.set_num_threads(1)
    from publish_support import build_engine, engine_ids
    from companion.torch import publish_module
    engine = build_engine(seed=SEED)
    with torch.no_grad():
        logits = engine(engine_ids())
    torch.save(logits, LOGITS)
    mapped = publish_module(client, KEY, engine, fingerprint=FP)
    print("published", mapped.status.generation, flush=True)
    sys.stdin.readline()
"""


def _code(code, **values):
    import textwrap

    return "".join(f"{k} = {v!r}\n" for k, v in values.items()) + textwrap.dedent(code)


def test_engine_shaped_model_runs_bit_identical_in_another_process(server, client, tmp_path,
                                                                   single_thread):
    key = "tests/engine"
    fp = {"engine": "tiny-engine", "quant": "int8-per-channel", "tp": "1/1"}
    logits_path = tmp_path / "logits.pt"
    publisher = start_child(server.runtime_dir, _code(PUBLISHER, KEY=key, FP=fp, SEED=11,
                                                      LOGITS=str(logits_path)))
    try:
        assert read_line(publisher, "published").split()[1] == "1"
        expected = torch.load(str(logits_path))

        classes = engine_classes()
        engine = classes["EngineModel"](device="meta")
        assert engine.lm_head.weight is engine.embed.weight and engine.inv_freq.is_meta
        mapped = client.get_model_parameters(key, fingerprint=fp)
        attach_module(engine, mapped)
        engine.eval()
        assert engine.lm_head.weight is engine.embed.weight
        qkv = engine.layers[0].attn.qkv
        assert qkv.weight.dtype == torch.int8 and tuple(qkv.weight.shape) == (96, 32)
        assert qkv.weight.data_ptr() == mapped["layers.0.attn.qkv.weight"].data_ptr
        assert not engine.inv_freq.is_meta and engine.inv_freq[0].item() == 1.0
        for name, tensor in list(engine.named_parameters()) + list(engine.named_buffers()):
            assert not tensor.is_meta and not tensor.requires_grad, name
        with torch.no_grad():
            logits = engine(engine_ids())
        assert logits.shape == expected.shape == (2, 8, 128)
        assert torch.equal(logits, expected)
        # The same in-process build differs from a differently seeded one (the test can fail).
        with torch.no_grad():
            assert not torch.equal(build_engine(seed=12)(engine_ids()), expected)
    finally:
        publisher.stdin.close()
        publisher.wait(timeout=30)
    del engine, mapped, qkv, tensor
    _unload_when_free(client, key)


def test_attach_or_publish_a_module(client):
    key = "tests/attach-or-publish-module"
    fp = {"engine": "tiny-engine"}
    builds = []

    def build():
        builds.append(1)
        return build_engine(seed=5)

    classes = engine_classes()
    first = classes["EngineModel"](device="meta")
    mapped = attach_or_publish_module(client, key, fp, build, first)
    second = classes["EngineModel"](device="meta")
    again = attach_or_publish_module(client, key, fp, build, second)
    assert builds == [1]
    assert second.embed.weight.data_ptr() != 0
    assert "inv_freq" in mapped and "inv_freq" in again
    ids = engine_ids()
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))
        assert torch.equal(first(ids), build_engine(seed=5)(ids))
    del first, second, mapped, again
    _unload_when_free(client, key)
