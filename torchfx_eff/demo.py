"""The main job: greedy decoding of the real SmolLM2-135M-Instruct with eager, Inductor and torchfx_eff."""
from __future__ import annotations

import time

import torch
from transformers import StaticCache

from . import backend, last_report, reset
from .config import Config

PROMPT = "Write a short Python function that checks whether a number is prime."


@torch.no_grad()
def greedy(forward, model, input_ids: torch.Tensor, new_tokens: int, max_cache_len: int) -> tuple[list[int], float]:
    """Greedy tokens from `forward` (the model, maybe compiled) and the seconds spent decoding after prefill.

    A static KV cache keeps every decode step the same shape: one prefill graph and one decode graph.
    """
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    prompt_len = input_ids.shape[1]
    logits = forward(input_ids=input_ids, past_key_values=cache, cache_position=torch.arange(prompt_len),
                     logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    tokens, start = [token.item()], time.perf_counter()
    for position in range(prompt_len, prompt_len + new_tokens - 1):
        logits = forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([position]),
                         logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
    return tokens, time.perf_counter() - start


MODES = ("eager", "inductor", "torchfx_eff")


def compare(model, input_ids: torch.Tensor, new_tokens: int, config: Config | None = None, repeats: int = 2,
            modes: tuple[str, ...] = MODES) -> dict:
    """Decode tokens/s and tokens for each mode; each mode runs once to compile, then `repeats` timed runs."""
    make = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(model),
        "torchfx_eff": lambda: torch.compile(model, backend=backend(config or Config())),
    }
    max_cache_len = input_ids.shape[1] + new_tokens
    results = {}
    for name in modes:
        torch._dynamo.reset()
        if name == "torchfx_eff":
            reset()
        forward = make[name]()
        start = time.perf_counter()
        greedy(forward, model, input_ids, 3, max_cache_len)  # compiles the prefill and the decode graph
        warmup_s = time.perf_counter() - start
        runs = [greedy(forward, model, input_ids, new_tokens, max_cache_len) for _ in range(repeats)]
        tokens, best = runs[0][0], min(s for _, s in runs)
        results[name] = {"tokens": tokens, "tok_per_s": (new_tokens - 1) / best, "compile_s": warmup_s}
    results["report"] = last_report()
    return results


def common_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many tokens agree before the first difference (greedy decoding never re-converges by position)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def main(new_tokens: int = 48) -> dict:
    from .models import chat_prompt, load_smollm2

    torch.manual_seed(0)
    model, tok = load_smollm2(torch.bfloat16)
    ids = chat_prompt(tok, PROMPT)
    print(f"SmolLM2-135M-Instruct (bf16, CPU, {torch.get_num_threads()} threads); prompt of {ids.shape[1]} tokens, "
          f"{new_tokens} greedy tokens per mode")
    results = compare(model, ids, new_tokens)
    print("\nRewrite report (torchfx_eff):")
    print(results["report"])
    eager, inductor = results["eager"]["tokens"], results["inductor"]["tokens"]
    print(f"\n{'mode':<12} {'decode tok/s':>12} {'vs inductor':>12} {'compile s':>10} "
          f"{'prefix = eager':>15} {'prefix = inductor':>18}")
    for name in ("eager", "inductor", "torchfx_eff"):
        r = results[name]
        same = [f"{common_prefix(r['tokens'], ref)}/{len(ref)}" for ref in (eager, inductor)]
        print(f"{name:<12} {r['tok_per_s']:>12.1f} {r['tok_per_s'] / results['inductor']['tok_per_s']:>11.2f}x "
              f"{r['compile_s']:>10.1f} {same[0]:>15} {same[1]:>18}")
    print("\ntorchfx_eff output:", repr(tok.decode(results["torchfx_eff"]["tokens"], skip_special_tokens=True)))
    return results
