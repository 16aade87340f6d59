"""The vLLM loader's decisions that need no engine: the key and fingerprint an engine computes
from its configuration (vLLM's own EngineArgs -> VllmConfig, no weights loaded), what makes an
engine refuse to share, and the extra-config options."""
import shutil

import pytest

RANKS = dict(tp_size=1, tp_rank=0, pp_size=1, pp_rank=0, dp_size=1, dp_rank=0)


def _config(path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), skip_tokenizer_init=True, enforce_eager=True,
                      max_model_len=256, **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def identities(opt_checkpoint, tmp_path_factory):
    import companion.vllm as cv

    copy = tmp_path_factory.mktemp("copy") / "opt"
    shutil.copytree(opt_checkpoint, copy)
    out = {}
    for name, path, kwargs in (("bf16", opt_checkpoint, {"dtype": "bfloat16"}),
                               ("copy", copy, {"dtype": "bfloat16"}),
                               ("f32", opt_checkpoint, {"dtype": "float32"}),
                               ("offload", opt_checkpoint, {"dtype": "bfloat16",
                                                            "cpu_offload_gb": 1})):
        config = _config(path, **kwargs)
        out[name] = (config, cv.weight_identity(config, config.model_config, ranks=RANKS))
    return out


def test_fingerprint_names_what_changes_the_weights(identities, opt_checkpoint):
    (_, (key, fp)), (_, (key_copy, fp_copy)) = identities["bf16"], identities["copy"]
    assert key == f"vllm:{opt_checkpoint}:tp0of1-pp0of1-dp0of1"
    # The same files elsewhere are the same weights (content hash, config without its path).
    assert fp_copy == fp
    assert key_copy != key
    _, (_, fp32) = identities["f32"]
    assert [f for f in fp if fp[f] != fp32[f]] == ["dtype"]
    for field in ("checkpoint", "architecture", "quant_config_hash", "config_hash",
                  "kernel_config_hash", "tp", "pp", "dp", "ep", "vllm", "torch", "device",
                  "capability"):
        assert fp[field] != "" or field in ("capability",), field
    assert fp["architecture"] == "OPTForCausalLM" and fp["tp"] == "0/1"


def test_parallel_rank_is_part_of_the_key(identities):
    import companion.vllm as cv

    config, _ = identities["bf16"]
    ranks = dict(RANKS, tp_size=2, tp_rank=1)
    key, fp = cv.weight_identity(config, config.model_config, ranks=ranks)
    assert key.endswith(":tp1of2-pp0of1-dp0of1") and fp["tp"] == "1/2"
    key, _ = cv.weight_identity(config, config.model_config, key_prefix="team/llama", ranks=RANKS)
    assert key == "team/llama:tp0of1-pp0of1-dp0of1"


def test_features_that_move_weights_are_not_shared(identities):
    import companion.vllm as cv

    config, _ = identities["bf16"]
    assert cv.unsupported_reason(config, config.model_config) is None
    config, _ = identities["offload"]
    assert "offloading" in cv.unsupported_reason(config, config.model_config)


def test_extra_config_is_checked():
    from vllm.config.load import LoadConfig

    import companion.vllm as cv

    loader = cv.CompanionModelLoader(LoadConfig(load_format="companion"))
    assert (loader.mode, loader.fallback, loader.timeout) == ("attach_or_publish", True, None)
    loader = cv.CompanionModelLoader(LoadConfig(
        load_format="companion",
        model_loader_extra_config={"mode": "attach", "fallback": "false", "timeout": 5,
                                   "namespace": "ns", "key": "k"}))
    assert (loader.mode, loader.fallback, loader.timeout, loader.key_prefix) == \
        ("attach", False, 5.0, "k")
    assert loader.connect_options == {"namespace": "ns"}
    with pytest.raises(ValueError, match="unknown"):
        cv.CompanionModelLoader(LoadConfig(load_format="companion",
                                           model_loader_extra_config={"sockt_path": "x"}))
    with pytest.raises(ValueError, match="mode"):
        cv.CompanionModelLoader(LoadConfig(load_format="companion",
                                           model_loader_extra_config={"mode": "copy"}))
