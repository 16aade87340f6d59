"""companion.transformers.from_pretrained on the host backend: bit-exact logits against
transformers' own from_pretrained, zero-copy weights, tied heads, the route taken, the lease's
lifetime, and one publisher for many processes on the published route."""
import gc
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import transformers

import companion
import companion.transformers as ct
from tiny_models import ARCHITECTURES, INPUT_IDS, reference_logits, route_of, write_checkpoint

IDS = torch.tensor(INPUT_IDS)
REPO = pathlib.Path(__file__).resolve().parents[2]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def backing_inodes(tensors):
    """The inodes of the files mapped at the tensors' addresses (/proc/self/maps), checking
    that each is a shared read-only mapping: a private copy would be anonymous memory."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end, fields[1], int(fields[4])))
    inodes = set()
    for tensor in tensors:
        address = tensor.data_ptr()
        found = [m for m in maps if m[0] <= address < m[1]]
        assert found, f"{address:#x} is not mapped"
        start, end, perms, inode = found[0]
        assert perms.startswith("r-") and perms.endswith("s") and inode, (perms, inode)
        assert address + tensor.numel() * tensor.element_size() <= end
        inodes.add(inode)
    return inodes


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_bit_exact_zero_copy_and_tied(name, hf_root, client, caplog):
    path = hf_root / name
    caplog.set_level(logging.INFO, logger="companion")
    model = ct.from_pretrained(path, client=client)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()

    assert type(model) is type(reference)
    assert not model.training
    assert model.companion_route == route_of(name)
    assert any(f"{route_of(name)}" in r.getMessage() for r in caplog.records), caplog.text
    assert torch.equal(logits(model), logits(reference))

    # Every buffer, non-persistent ones included (rotary inv_freq...), as transformers computes
    # it; nothing left on meta.
    ours = dict(model.named_buffers())
    assert ours.keys() == dict(reference.named_buffers()).keys()
    for key, buffer in reference.named_buffers():
        assert ours[key].dtype == buffer.dtype and torch.equal(ours[key], buffer), key
    assert not any(t.is_meta for t in model.parameters())

    # Zero-copy: every parameter is memory of the server's mapping, as client.state_dict (the
    # checkpoint) or client.attach (the published key) maps it.
    # Zero-copy: every parameter lies in a shared read-only mapping of the model's lease, whose
    # memory (memfd inode) is the one client.state_dict / client.attach map for the checkpoint
    # or the published key.
    mapped = model.companion_weights
    assert isinstance(mapped, companion.MappedModel) and mapped.mapped_bytes > 0
    inodes = backing_inodes(model.parameters())
    assert inodes <= set(mapped.info["segment_inodes"])
    if route_of(name) == "checkpoint":
        other = client.get_model_parameters(str(path))
    else:
        other = client.attach(ct.published_key(str(path), torch.float32))
    assert inodes <= backing_inodes(t.torch() for t in other.tensors().values())

    tied = reference.config.get_text_config().tie_word_embeddings
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert (reference.get_output_embeddings().weight
            is reference.get_input_embeddings().weight) == tied
    if name in ("qwen2", "gpt2", "opt"):
        assert tied  # the architectures chosen to cover tied heads


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_dtype_cast_matches_transformers(name, hf_root, client):
    """float32 checkpoints asked for in bfloat16: the checkpoint route lets the server cast,
    the published route publishes what transformers casts; both equal transformers'."""
    path = hf_root / name
    model = ct.from_pretrained(path, client=client, dtype=torch.bfloat16)
    assert model.companion_route == route_of(name)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(model), reference_logits(path, IDS, dtype=torch.bfloat16))


def test_legacy_names_without_base_model_prefix(hf_root, client):
    """GPT-2 checkpoints of the original release name tensors without "transformer.":
    transformers adds the base_model_prefix; so does the checkpoint route."""
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(hf_root, "gpt2", seed=7, path=hf_root / "gpt2-legacy")
    state = load_file(path / "model.safetensors")
    save_file({k[len("transformer."):]: v for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    model = ct.from_pretrained(path, client=client)
    assert model.companion_route == "checkpoint"
    assert torch.equal(logits(model), reference_logits(path, IDS))
    assert backing_inodes(model.parameters()) <= set(model.companion_weights.info["segment_inodes"])


def test_lease_lives_with_the_model(hf_root, client):
    path = hf_root / "opt"
    model = ct.from_pretrained(path, client=client)
    status = client.status(str(path))
    before = status.leases
    assert before >= 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert client.status(str(path)).leases == before - 1


def test_checkpoint_route_weights_are_the_checkpoints(hf_root, client):
    """Every persistent tensor the model holds is, value for value, the checkpoint's."""
    from safetensors.torch import load_file

    path = hf_root / "llama"
    model = ct.from_pretrained(path, client=client)
    stored = load_file(path / "model.safetensors")
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for key, value in stored.items():
        assert torch.equal(state[key], value), key


def test_checkpoint_not_one_to_one_takes_the_published_route(hf_root, client, caplog):
    """A tensor transformers would drop (not in the model) means the checkpoint does not map
    1:1: the published route, with transformers' own result."""
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(hf_root, "llama", seed=9, path=hf_root / "llama-extra")
    state = load_file(path / "model.safetensors")
    state["model.extra_projection.weight"] = torch.ones(4, 4)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    caplog.set_level(logging.INFO, logger="companion")
    model = ct.from_pretrained(path, client=client)
    assert model.companion_route == "published"
    assert "model.extra_projection.weight" in caplog.text
    assert torch.equal(logits(model), reference_logits(path, IDS))


def test_published_key_is_bounded():
    key = ct.published_key("/models/" + "x" * 2000, torch.bfloat16)
    assert len(key.encode("utf-8")) <= 1024 and key.endswith(":bfloat16")
    assert ct.published_key("/models/llama", torch.float16) == \
        "transformers:/models/llama:float16"


def test_only_local_code(hf_root, client):
    with pytest.raises(ValueError, match="trust_remote_code"):
        ct.from_pretrained(hf_root / "llama", client=client, trust_remote_code=True)


WORKER = textwrap.dedent("""
    import json, logging, sys
    import torch
    import companion, companion.transformers as ct
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("companion")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    path, runtime_dir, instance, dtype, out = sys.argv[1:6]
    client = companion.connect(runtime_dir=runtime_dir, instance_id=instance)
    model = ct.from_pretrained(path, client=client, dtype=getattr(torch, dtype))
    with torch.no_grad():
        logits = model(torch.tensor(json.loads(sys.argv[6]))).logits
    torch.save(logits, out + ".pt")
    built = any("to publish it" in r for r in records)
    with open(out + ".json", "w") as f:
        json.dump({"route": model.companion_route, "built": built, "records": records}, f)
""")


def run_workers(count, path, server, dtype, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"), OMP_NUM_THREADS="1")
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for i in range(count):
        out = tmp_path / f"worker-{i}"
        procs.append((out, subprocess.Popen(
            [sys.executable, str(script), str(path), str(server.runtime_dir), server.instance,
             dtype, str(out), json.dumps(INPUT_IDS)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, proc in procs:
        text, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, text
        results.append((json.loads(pathlib.Path(str(out) + ".json").read_text()),
                        torch.load(str(out) + ".pt")))
    return results


def test_published_moe_one_builder_for_many_processes(hf_root, server, client, tmp_path):
    """Two processes start together on a MoE model nobody has published in float16: exactly
    one loads it with transformers and publishes; the other attaches. Then a third process
    attaches without loading. The server holds one generation, and every process's logits
    equal transformers' own."""
    path = hf_root / "mixtral"
    key = ct.published_key(str(path), torch.float16)
    with pytest.raises(companion.NotFound):
        client.attach(key, wait=False)

    first = run_workers(2, path, server, "float16", tmp_path / "a")
    assert sorted(r["built"] for r, _ in first) == [False, True], [r for r, _ in first]
    later = run_workers(1, path, server, "float16", tmp_path / "b")
    assert later[0][0]["built"] is False

    expected = reference_logits(path, IDS, dtype=torch.float16)
    for report, result in first + later:
        assert report["route"] == "published"
        assert torch.equal(result, expected)

    status = client.attach(key).status
    assert status.published and status.generation == 1
    assert [g.generation for g in status.generations] == [1]
    assert status.fingerprint["transformers"] == transformers.__version__
    assert status.fingerprint["dtype"] == "float16"
