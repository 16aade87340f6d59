"""Tiny random checkpoints of real transformers architectures, written with transformers' own
``save_pretrained`` (shared by the CPU suite in tests/torch2 and the GPU suite in tests/gpu)."""
import pathlib
from typing import Any, Callable, Dict, Tuple

# name -> (config class, config arguments, route companion.transformers must take). Each is
# small enough to write and run in a fraction of a second on a CPU, but keeps the parts that
# matter: grouped-query attention, rotary embeddings (non-persistent inv_freq), learned
# positions, tied and untied heads, biases, and MoE experts that transformers 5 fuses at load.
ARCHITECTURES: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128),
              "checkpoint"),
    "mistral": ("MistralConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      sliding_window=8), "checkpoint"),
    # Tied head: lm_head.weight is the embedding (save_pretrained stores it once).
    "qwen2": ("Qwen2Config", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=True), "checkpoint"),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                bos_token_id=0, eos_token_id=0), "checkpoint"),
    "opt": ("OPTConfig", dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128,
                              word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
                              pad_token_id=1), "checkpoint"),
    # Per-expert w1/w2/w3 in the checkpoint, one 3-D gate_up_proj/down_proj per layer in the
    # model: not 1:1, so the published route.
    "mixtral": ("MixtralConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      num_local_experts=4, num_experts_per_tok=2), "published"),
}

# A fixed batch of token ids inside every vocabulary above.
INPUT_IDS = [[0, 17, 42, 99, 3, 250, 7, 128, 64, 5, 11, 200],
             [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]]


def write_checkpoint(root: pathlib.Path, name: str, seed: int = 0, dtype: Any = None,
                     **overrides: Any) -> pathlib.Path:
    """Writes ARCHITECTURES[name] with random weights (torch seed ``seed``) under root/name (or
    the ``path`` override) with ``save_pretrained`` and returns the directory."""
    import torch
    import transformers

    config_class, arguments, _ = ARCHITECTURES[name]
    path = pathlib.Path(overrides.pop("path", root / name))
    config = getattr(transformers, config_class)(**{**arguments, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    # Random norms and biases too (their default init is ones / zeros): a mix-up between two
    # of them must change the logits.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def route_of(name: str) -> str:
    return ARCHITECTURES[name][2]


def reference_logits(path: Any, input_ids: Any, **kwargs: Any) -> Any:
    """Logits of the model loaded the usual way (a private copy)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids.to(model.device)).logits


BuildFn = Callable[..., pathlib.Path]
