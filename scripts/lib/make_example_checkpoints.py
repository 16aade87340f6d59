"""Writes the example checkpoints that README.md's examples use, with random values and the
reference safetensors library (nothing is downloaded):

  MODELS/opt-tiny      OPT shapes (2 layers, hidden 256, vocab 4096), fp16, with an OPT
                       config.json: transformers builds it (36 tensors, 5.3 MiB)
  MODELS/opt-sharded   a smaller OPT spread over 3 files and an index (36 tensors, 1.0 MiB)
  MODELS/broken        a checkpoint whose last tensor is cut short (its load fails)
  HF_CACHE/models--acme--tiny-lm   a Hugging Face hub cache entry for "acme/tiny-lm" (20 tensors)

Usage: make_example_checkpoints.py MODELS HF_CACHE (scripts/make-example-checkpoints.sh). Running
it again rewrites these four and leaves anything else in the directories alone.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "integration"))
from checkpoints import opt_like_state_dict, write_opt_like, write_sharded  # noqa: E402

# OPT shapes as transformers' OPTConfig names them; learned positions have 2 extra rows.
OPT_TINY = dict(hidden=256, layers=2, vocab=4096, positions=512, ffn=1024)
OPT_SHARDED = dict(hidden=128, layers=2, vocab=1024, positions=128, ffn=512)
TINY_LM = dict(hidden=64, layers=1, vocab=1024, positions=512, ffn=256)
BROKEN = dict(hidden=32, layers=1, vocab=512, positions=256, ffn=128)
# The commit the example hub cache's refs/main names (any 40 hex digits do).
TINY_LM_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def opt_config(hidden, layers, vocab, positions, ffn, dtype):
    """An OPT config.json (as transformers writes it) for these shapes."""
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "vocab_size": vocab,
        "max_position_embeddings": positions - 2,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": dtype,
    }


def write_models(models: pathlib.Path):
    tiny = write_opt_like(models / "opt-tiny", dtype="float16", **OPT_TINY)
    (tiny / "config.json").write_text(json.dumps(opt_config(**OPT_TINY, dtype="float16"),
                                                 indent=2))
    write_sharded(models / "opt-sharded", opt_like_state_dict(dtype="float16", seed=1,
                                                              **OPT_SHARDED))
    broken = write_opt_like(models / "broken", dtype="float16", seed=2, **BROKEN)
    # The header still promises every tensor; the data section ends 64 bytes early.
    path = broken / "model.safetensors"
    os.truncate(path, path.stat().st_size - 64)


def write_hub_cache(cache: pathlib.Path):
    """models--acme--tiny-lm as huggingface_hub lays it out: blobs, a snapshot of links to them,
    and refs/main naming the snapshot."""
    repo = cache / "models--acme--tiny-lm"
    snapshot = repo / "snapshots" / TINY_LM_COMMIT
    write_opt_like(snapshot, dtype="float16", seed=3, **TINY_LM)
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / "model-safetensors"
    os.replace(snapshot / "model.safetensors", blob)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "model.safetensors")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(TINY_LM_COMMIT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=pathlib.Path, help="directory for the checkpoints")
    parser.add_argument("hf_cache", type=pathlib.Path, help="directory for the hub cache")
    args = parser.parse_args()
    # Running it again writes the examples afresh; nothing else in the directories is touched.
    for old in [args.models / n for n in ("opt-tiny", "opt-sharded", "broken")] + \
            [args.hf_cache / "models--acme--tiny-lm"]:
        shutil.rmtree(old, ignore_errors=True)
    write_models(args.models)
    write_hub_cache(args.hf_cache)
    for name in ("opt-tiny", "opt-sharded", "broken"):
        print(f"wrote {args.models / name}")
    print(f"wrote {args.hf_cache / 'models--acme--tiny-lm'} (the hub cache entry of acme/tiny-lm)")


if __name__ == "__main__":
    main()
