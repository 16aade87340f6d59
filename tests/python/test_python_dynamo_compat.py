"""The seed prototype's API runs unchanged: create_model_client, wait_for_model_ready,
get_model_parameters, reconstruct_parameter."""
import asyncio
import types

import pytest
import torch
from safetensors.torch import load_file

import companion
from companion.dynamo_compat import RebuildInfo, spec_from_config


def seed_example(runtime, vllm_config, **kwargs):
    """The client part of the seed prototype's documented example, verbatim but for collecting
    results."""
    from companion import create_model_client

    shapes = {}
    tensors = {}

    async def my_worker(runtime):
        client = await create_model_client(runtime, vllm_config, namespace="companion", **kwargs)

        # Wait for model to be ready
        success, info = await client.wait_for_model_ready()
        if success:
            # Get model parameters
            parameters = await client.get_model_parameters()

            # Reconstruct tensors
            for name, rebuild_info in parameters.items():
                tensor = client.reconstruct_parameter(rebuild_info)
                print(f"Parameter {name}: shape={tensor.shape}")
                shapes[name] = tuple(tensor.shape)
                tensors[name] = tensor
        client.close()
        return success, info

    success, info = asyncio.run(my_worker(runtime))
    return success, info, shapes, tensors


def check_tensors(tensors, checkpoint):
    expected = load_file(str(checkpoint / "model.safetensors"))
    assert sorted(tensors) == sorted(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name])


def test_seed_flow_with_a_spec(server, model_root):
    spec = companion.ModelSpec(str(model_root / "opt-bf16"))
    success, info, shapes, tensors = seed_example(None, spec, runtime_dir=server.runtime_dir)
    assert success and info["state"] == "loaded" and info["tensors"] == 36
    assert shapes["model.decoder.embed_tokens.weight"] == (256, 64)
    check_tensors(tensors, model_root / "opt-bf16")  # tensors outlive the closed client


def test_seed_flow_with_a_vllm_shaped_config(server, model_root):
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(model=str(model_root / "opt-f32"), dtype="auto"),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    runtime = object()  # Dynamo's DistributedRuntime: accepted, unused
    success, info, shapes, tensors = seed_example(runtime, vllm_config,
                                                  runtime_dir=server.runtime_dir)
    assert success, info
    check_tensors(tensors, model_root / "opt-f32")


def test_vllm_config_dtype_and_rank():
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(model="org/name", dtype=torch.float16,
                                           revision="v1"),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=2, rank=1))
    assert spec_from_config(config) == companion.ModelSpec("org/name", revision="v1",
                                                           dtype="fp16", tp_size=2, tp_rank=1)
    assert spec_from_config("org/name") == companion.ModelSpec("org/name")
    bare = types.SimpleNamespace(model="org/name", dtype=torch.bfloat16)
    assert spec_from_config(bare).dtype == "bf16"
    with pytest.raises(TypeError):
        spec_from_config(object())


def test_failures_are_reported_not_raised(server, model_root):
    missing = companion.ModelSpec(str(model_root / "absent"))
    success, info, shapes, _ = seed_example(None, missing, runtime_dir=server.runtime_dir)
    assert not success and not shapes
    assert info["error"]["code"] == "NOT_FOUND" and "absent" in info["error"]["message"]


def test_sync_client(server, model_root):
    source = str(model_root / "opt-f32")
    with companion.create_model_client_sync(None, source,
                                            runtime_dir=server.runtime_dir) as client:
        assert isinstance(client, companion.ModelClient)
        success, info = client.wait_for_model_ready(initial_timeout=10, loading_timeout=60)
        assert success and info["source"] == source
        parameters = client.get_model_parameters()
        info = parameters["model.decoder.layers.1.fc1.weight"]
        assert isinstance(info, RebuildInfo)
        assert (info.dtype, info.shape, info.strides, info.device) == \
            ("F32", (256, 64), (64, 1), "cpu")
        tensor = client.reconstruct_parameter(info)
        assert tensor.data_ptr() == client.model[info.name].data_ptr
        assert client.get_status().loaded
    # The connection is closed; the RebuildInfo and tensors still hold the mapping.
    assert torch.equal(client.reconstruct_parameter(info), tensor)


def test_default_device_is_host_without_cuda():
    from companion.dynamo_compat import default_device

    assert default_device() == "host"  # torch here has no initialised CUDA
