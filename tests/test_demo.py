"""The demo's decoding loop and comparison, on a tiny random Llama (the real model is the demo's own job)."""
import torch
from helpers import BIG, make_model

import torchfx_eff
from torchfx_eff.demo import common_prefix, compare, greedy


def test_greedy_loop_with_static_cache_equals_generate():
    model = make_model("llama", BIG, torch.float32)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 7:].tolist()
    tokens, seconds = greedy(model, model, ids, 6, max_cache_len=16)
    assert tokens == expected and seconds > 0


def test_compare_runs_each_mode_and_reports_the_rewrites():
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5))
    results = compare(model, ids, 6, config=torchfx_eff.Config(inner="eager"), repeats=1, modes=("eager", "torchfx_eff"))
    assert len(results["eager"]["tokens"]) == len(results["torchfx_eff"]["tokens"]) == 6
    assert results["torchfx_eff"]["tok_per_s"] > 0
    summary = results["report"].summary()
    assert summary["linear"].get("rewritten", 0) > 0  # the decode graph's linears went int8
    assert 0 <= common_prefix(results["torchfx_eff"]["tokens"], results["eager"]["tokens"]) <= 6


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([5], [6]) == 0
