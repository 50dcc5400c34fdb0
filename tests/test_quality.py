"""The perplexity measure of the quality bench, on tiny random models; the fixture text when its package is there."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, VOCAB, make_model

from torchfx_eff.text import perplexity, prose


def _reference(model, ids: torch.Tensor, window: int) -> float:
    """Whole windows in one forward each (no cache), log-softmax in fp64."""
    nll = []
    with torch.no_grad():
        for w in ids[: len(ids) // window * window].view(-1, window):
            logp = model(input_ids=w[None]).logits[0, :-1].double().log_softmax(-1)
            nll.append(-logp.gather(-1, w[1:, None])[:, 0])
    return math.exp(torch.cat(nll).mean().item())


def test_uniform_logits_give_the_vocab_size():
    model = make_model("llama", SMALL).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: each token has probability 1 / VOCAB
    ppl, n = perplexity(model, model.config, torch.randint(0, VOCAB, (40,)), window=16)
    assert ppl == pytest.approx(VOCAB, rel=1e-6)
    assert n == 2 * 15  # two whole windows, the first token of each unpredicted; the 8-token tail left out


def test_matches_a_direct_fp64_computation():
    model = make_model("llama", SMALL).eval()
    ids = torch.randint(0, VOCAB, (50,))
    ppl, n = perplexity(model, model.config, ids, window=24)
    assert n == 2 * 23
    assert ppl == pytest.approx(_reference(model, ids, 24), rel=1e-5)
    assert 1 < ppl < 10 * VOCAB  # a random model is close to uniform, not degenerate


@pytest.mark.parametrize("window", [1, 51, 8.0])
def test_bad_window_is_refused(window):
    model = make_model("llama", SMALL).eval()
    with pytest.raises(ValueError, match="window="):
        perplexity(model, model.config, torch.zeros(50, dtype=torch.long), window=window)


def test_ids_must_be_1d():
    model = make_model("llama", SMALL).eval()
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, model.config, torch.zeros(1, 50, dtype=torch.long), window=16)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="the fixture's package (gensim) is not installed")
def test_prose_is_the_pinned_lee_corpus():
    text = prose()
    assert text.startswith("Hundreds of people have been forced to vacate their homes")
    assert text.count("\n\n") == 299  # 300 articles


def _bench_quality():
    path = Path(__file__).parent.parent / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("calibrate", [0, 1, 3])
def test_bench_calibration_windows_follow_the_measured_ones(calibrate):
    tokens = torch.arange(100)
    ids, calibration = _bench_quality().split(tokens, calibrate, window=10, windows=4)
    assert ids.tolist() == list(range(40))
    assert calibration.shape == (calibrate, 10)
    assert calibration.flatten().tolist() == list(range(40, 40 + 10 * calibrate))
    assert not set(ids.tolist()) & set(calibration.flatten().tolist())


@pytest.mark.parametrize("length,calibrate", [(100, 7), (65, 3), (30, 0), (100, -1)])
def test_bench_refuses_more_calibration_than_the_text_holds(length, calibrate):
    with pytest.raises(ValueError, match="--calibrate"):
        _bench_quality().split(torch.arange(length), calibrate, window=10, windows=4)


@pytest.mark.parametrize("mode", ["ternary", "sparse24", "ternary_sparse24", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bench_emulation_of_gpu_only_modes_equals_their_kernels(mode, dtype):
    """The quality bench measures ternary, 2:4 and fp8 on CPU through an ATen emulation: it must compute what the
    Triton kernel (interpreted here) computes, from the same packing. K = 42 pads the packed rows."""
    from torchfx_eff.kernels import fp8, quant_gemm, sparse24, ternary

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 42).to(dtype), torch.randn(48).to(dtype)
    x = torch.randn(5, 42).to(dtype)
    forward, nbytes = _bench_quality().emulated_linear(mode, weight, bias)
    if mode == "fp8":
        packed = quant_gemm.quantize_rows(weight, fp8.E4M3)
        kernel = fp8.fp8_linear(x, *packed, bias)
    elif mode == "sparse24":
        packed = sparse24.compress_24(weight, sparse24.keep_24(weight))
        kernel = sparse24.sparse24_linear(x, *packed, None, bias)
    elif mode == "ternary":
        codes, scale = ternary.ternary_quantize(weight)
        packed = (ternary.pack_ternary(codes), scale)
        kernel = ternary.int8_ternary_linear(x, packed[0], None, scale, bias)
    else:
        packed = sparse24.ternary_sparse24_pack(weight)
        kernel = ternary.int8_ternary_linear(x, *packed, bias)
    assert nbytes == sum(t.nbytes for t in packed)
    torch.testing.assert_close(forward(x), kernel, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
    assert (forward(x) - F.linear(x, weight, bias)).abs().max() > 0.1  # lossy: not the original linear


def _calibrated_llama(ternary_layers):
    """A tiny Llama whose linears ternary_layers(model) names hold ternary weights (+-0.02, as a BitNet checkpoint
    stores them), calibrated on 24 of 48 token ids; (model, ids, its perplexity over windows of 24)."""
    import torchfx_eff
    from torchfx_eff.calibration import ACTIVATION_STATS

    torch.manual_seed(0)
    model = make_model("llama", SMALL).eval()
    with torch.no_grad():
        for m in ternary_layers(model):
            m.weight.copy_(torch.randn_like(m.weight).sign() * 0.02)
    ids = torch.randint(0, VOCAB, (48,))
    ACTIVATION_STATS.clear()
    torchfx_eff.calibrate_activations(model, [ids[None, :24]], progress=False)
    return model, ids, perplexity(model, model.config, ids, 24)[0]


def test_bench_emulation_gates_each_linear_and_restores_the_model():
    """emulate() swaps only linears that keep the budget on their calibration rows: a ternary layer (weights
    +-0.02, as a BitNet checkpoint stores them) passes 'balanced', random ones (~6 dB) do not, and the head keeps
    bf16. It measures, then leaves the model as it was."""
    from torchfx_eff.calibration import ACTIVATION_STATS

    model, ids, base = _calibrated_llama(lambda model: [model.model.layers[0].mlp.down_proj])
    quality = _bench_quality()
    row = quality.emulate(model, ids, "ternary", base, "balanced", window=24)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert row["sites"] == {"rewritten": 1, "kept": linears - 1}, row
    assert row["not_rewritten"] == {"the output linear keeps >= 8-bit weights (Config.output_linear_8bit)": 1,
                                    "SQNR below the 'balanced' budget of 20 dB": linears - 2}
    assert row["min_site_sqnr_db"] > 30  # int8 activations' rounding alone
    assert row["weight_bytes"][1] < row["weight_bytes"][0] / 6
    assert row["value"] != base and row["value"] == pytest.approx(base, rel=0.01)
    ungated = quality.emulate(model, ids, "ternary", base, "balanced", window=24, gate=False)
    assert ungated["sites"] == {"rewritten": linears - 1, "kept": 1} and ungated["value"] not in (None, base)
    assert ungated["site_sqnr_db_min_median_max"] == row["site_sqnr_db_min_median_max"]  # the same measurements
    ACTIVATION_STATS.clear()
    assert perplexity(model, model.config, ids, 24)[0] == base  # every forward restored


def test_bench_emulation_reverts_the_lowest_sqnr_linears_where_the_logits_miss_the_budget(monkeypatch):
    """emulate() given an example runs the graph check as the backend does: ternary layers (+-0.02 weights) pass
    'balanced' one by one; where their errors together put the logits below the budget, the linears of lowest
    SQNR go back to bf16 until the logits meet it."""
    from torchfx_eff.calibration import ACTIVATION_STATS

    model, ids, base = _calibrated_llama(lambda model: [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                                                        and m is not model.get_output_embeddings()])
    quality = _bench_quality()
    example = ids[None, 24:]
    unchecked = quality.emulate(model, ids, "ternary", base, "balanced", window=24)
    everything = quality.emulate(model, ids, "ternary", base, "balanced", window=24, example=example)["graph_check"]
    n = unchecked["sites"]["rewritten"]
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1 and everything["reverted"] == 0
    budget = everything["logits_sqnr_db_all_swapped"] + 3  # met by the bf16 model alone, not with all swapped
    monkeypatch.setattr(quality, "graph_budget_db", lambda *a: budget)
    row = quality.emulate(model, ids, "ternary", base, "balanced", window=24, example=example)
    check = row["graph_check"]
    assert 0 < check["reverted"] < n and check["logits_sqnr_db"] >= budget > check["logits_sqnr_db_all_swapped"]
    assert row["sites"]["rewritten"] == n - check["reverted"]
    assert row["not_rewritten"]["reverted by the graph check"] == check["reverted"]
    assert row["min_site_sqnr_db"] >= unchecked["min_site_sqnr_db"]  # the lowest went back
    assert row["value"] not in (None, unchecked["value"])
    ACTIVATION_STATS.clear()


@pytest.mark.parametrize("mode", ["int8_weight_only", "int4_weight_only"])
def test_bench_emulation_of_weight_only_modes_equals_the_aten_kernels(mode):
    """cpu_graph_budget swaps linears for an emulation of int8 and int4 (round to nearest): bf16 products of the
    decoded weights, which must be what ATen's CPU kernel computes from the same packing, to bf16 rounding."""
    from helpers import sqnr_ref

    from torchfx_eff.kernels import int4_weight_only as int4, int8_weight_only as int8

    torch.manual_seed(0)
    weight, bias = torch.randn(48, 128, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    forward, nbytes = _bench_quality().emulated_linear(mode, weight, bias)
    if mode == "int8_weight_only":
        packed = int8.quantize_per_channel(weight.float())
        kernel = int8.int8_weight_only_linear(x, *packed, bias)
    else:
        packed = int4.quantize_int4(weight, 64)
        kernel = int4.int4_weight_only_linear(x, *int4.pack_for_cpu(*packed), 64, bias)
    assert nbytes == sum(t.nbytes for t in packed)
    assert sqnr_ref(kernel, forward(x)) > 40  # bf16 rounding of the sums
    lossy = {"int8_weight_only": 45, "int4_weight_only": 25}[mode]  # the codes' rounding: not the original linear
    assert sqnr_ref(torch.nn.functional.linear(x.double(), weight.double(), bias.double()), forward(x)) < lossy
