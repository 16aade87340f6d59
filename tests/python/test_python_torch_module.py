"""companion.torch.load_into_module: an nn.Module built on the meta device runs on the shared
weights, with the same outputs as the module loaded the usual way."""
import pytest
import torch
from safetensors.torch import save_model

import companion
from companion.torch import load_into_module


class Tiny(torch.nn.Module):
    """Embedding, MLP, norm, a head tied to the embedding, a persistent and a non-persistent
    buffer."""

    def __init__(self, device=None, dtype=None, vocab=50, hidden=16):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed = torch.nn.Embedding(vocab, hidden, **kw)
        self.block = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden, **kw),
                                         torch.nn.GELU(),
                                         torch.nn.Linear(2 * hidden, hidden, **kw))
        self.norm = torch.nn.LayerNorm(hidden, **kw)
        self.head = torch.nn.Linear(hidden, vocab, bias=False, **kw)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.full((hidden,), 0.5, **kw))
        self.register_buffer("calls", torch.zeros((), **kw), persistent=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.block(h)) * self.scale
        return self.head(h)


@pytest.fixture(scope="module")
def tiny_checkpoint(model_root):
    torch.manual_seed(0)
    reference = Tiny()
    with torch.no_grad():
        reference.scale.uniform_(0.5, 1.5)
        reference.norm.weight.uniform_(0.5, 1.5)
    path = model_root / "tiny"
    path.mkdir(exist_ok=True)
    save_model(reference, str(path / "model.safetensors"))  # drops the tied alias
    return path, reference.eval()


def test_meta_module_matches_the_normally_loaded_one(client, tiny_checkpoint):
    path, reference = tiny_checkpoint
    model = client.get_model_parameters(str(path))
    module = Tiny(device="meta")
    assert module.head.weight is module.embed.weight
    result = load_into_module(module, model)
    assert result.missing_keys == [] and result.unexpected_keys == []
    module.eval()
    # Zero-copy: the parameters are the mapped memory; the tie survives.
    for name, param in module.named_parameters():
        assert not param.requires_grad and not param.is_meta, name
    key = "embed.weight" if "embed.weight" in model else "head.weight"
    assert module.embed.weight.data_ptr() == model[key].data_ptr
    assert module.head.weight is module.embed.weight
    assert module.scale.data_ptr() == model["scale"].data_ptr
    assert module.calls.is_meta  # non-persistent buffers are left alone
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 49]])
    with torch.no_grad():
        assert torch.equal(module(ids), reference(ids))


def test_state_dict_input_and_missing_unexpected_keys(client, tiny_checkpoint):
    path, reference = tiny_checkpoint
    state = client.state_dict(str(path))
    module = Tiny(device="meta")
    module.extra = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(RuntimeError, match='Missing key.*"extra.weight"'):
        load_into_module(module, state)
    assert module.embed.weight.is_meta  # a strict failure changes nothing
    state["stray"] = torch.zeros(1)
    result = load_into_module(module, state, strict=False)
    assert result.missing_keys == ["extra.bias", "extra.weight"]
    assert result.unexpected_keys == ["stray"]
    assert not module.embed.weight.is_meta and module.extra.weight.is_meta
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_into_module(Tiny(device="meta"), state)


def test_shape_and_dtype_mismatches_are_refused(client, tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = client.get_model_parameters(str(path))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_into_module(Tiny(device="meta", vocab=51), model)
    with pytest.raises(RuntimeError, match="dtype mismatch.*ModelSpec"):
        load_into_module(Tiny(device="meta", dtype=torch.bfloat16), model)
    # The server casts; then the bf16 module loads.
    cast = client.get_model_parameters(companion.ModelSpec(str(path), dtype=torch.bfloat16))
    module = Tiny(device="meta", dtype=torch.bfloat16)
    load_into_module(module, cast)
    assert module.embed.weight.dtype == torch.bfloat16
