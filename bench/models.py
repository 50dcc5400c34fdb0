"""Random-init models the GPU suites share (nothing can be downloaded on the device machines)."""
from __future__ import annotations

import torch


def llama(layers: int, kv_heads: int, max_positions: int, seed: int = 0):
    """A 1.1B-class Llama (hidden 2048, MLP 5632, 32 heads, vocab 32000) in bf16 on the GPU; the same seed gives the
    same weights in every process, so runs in separate processes can compare tokens."""
    import transformers as T

    config = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                           num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=max_positions,
                           attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return T.LlamaForCausalLM(config).to(torch.bfloat16).eval()
