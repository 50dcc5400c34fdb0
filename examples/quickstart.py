"""Compile a small random-init Llama with torchfx_eff and read the rewrite report.

    python examples/quickstart.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torchfx_eff

config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=8192)
model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
token = torch.randint(0, config.vocab_size, (1, 1))

compiled = torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager")))
with torch.no_grad():
    expected, actual = model(token).logits, compiled(token).logits

report = torchfx_eff.last_report()
print(report)
print(report.summary())
print(f"max |logits - eager logits| = {(actual.float() - expected.float()).abs().max():.3g}, "
      f"same argmax: {bool((actual.argmax(-1) == expected.argmax(-1)).all())}")
