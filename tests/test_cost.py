"""Cost formulas over symbolic sizes, checked against rooflines computed by hand, and the chooser."""
import pytest
import sympy
import torch
from helpers import compiled, sites

import torchfx_eff
from torchfx_eff import Config, cost, passes
from torchfx_eff.cost import MARGIN, DeviceSpec, devices, formulas


def _sites_of(module, *inputs, dynamic=True):
    """LinearSite/AttentionSite objects built by the real matchers from a real Dynamo graph."""
    found = []

    def backend(gm, example_inputs):
        info = passes.GraphInfo(torch.fx.GraphModule(gm, gm.graph), list(example_inputs))
        passes.normalize(info)
        for match in passes.MATCHERS.values():
            found.extend(s for s in match(info) if not isinstance(s, passes.Miss))
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=backend, dynamic=dynamic, fullgraph=True)(*inputs)
    return found


class LinearAndAttention(torch.nn.Module):
    def __init__(self, k=32, n=64, dtype=torch.bfloat16):
        super().__init__()
        self.lin = torch.nn.Linear(k, n, bias=False).to(dtype)

    def forward(self, x, q, kv):
        return self.lin(x), torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True)


# Round numbers, so the hand computation below is easy to follow.
HAND = DeviceSpec(
    "hand", "cpu", flops={"float32": 1e11, "bfloat16": 2e11, "float16": 2e11}, bandwidth=1e11, launch_s=1e-5,
    efficiency={"dense_bfloat16": (0.5, 0.25), "dense_float32": (1.0, 0.5), "int8pack": (0.25, 0.5),
                "elementwise": (1.0, 1.0), "sdpa_cpu": (0.5, 1.0)},
)


@pytest.fixture(scope="module")
def dyn_sites():
    torch._dynamo.reset()
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    q, kv = torch.randn(2, 4, 6, 16, dtype=torch.bfloat16), torch.randn(2, 4, 9, 16, dtype=torch.bfloat16)
    found = _sites_of(LinearAndAttention(), x, q, kv)
    torch._dynamo.reset()
    lin = next(s for s in found if s.kind == "linear")
    att = next(s for s in found if s.kind == "attention")
    return lin, att


def _dense_bf16_by_hand(M, N, K, spec=HAND):
    compute = 2 * M * N * K / (spec.flops["bfloat16"] * 0.5)
    memory = (N * K + M * K + M * N) * 2 / (spec.bandwidth * 0.25)
    return max(compute, memory) + spec.launch_s


def test_linear_site_has_symbolic_rows(dyn_sites):
    lin, _ = dyn_sites
    assert isinstance(lin.dims["M"], sympy.Expr) and lin.dims["M"].free_symbols, lin.dims
    assert (lin.dims["N"], lin.dims["K"]) == (64, 32)  # parameters stay static
    assert (lin.size("M"), lin.size("N"), lin.size("K")) == (15, 64, 32)  # 3*5 rows at the example input


def test_linear_dense_formula_is_the_roofline(dyn_sites):
    lin, _ = dyn_sites
    expr = formulas.linear_dense(lin, HAND)
    assert expr.free_symbols and expr.free_symbols <= set(lin.hints)
    assert expr.has(sympy.Max)
    assert float(expr.xreplace(lin.hints)) == pytest.approx(_dense_bf16_by_hand(15, 64, 32), rel=1e-12)
    # the same expression holds at other sizes: substitute other values for the row symbols
    for rows in [(1, 1), (7, 100), (64, 4096)]:
        other = dict(zip(sorted(lin.hints, key=str), rows))
        M = int(lin.dims["M"].xreplace(other))
        assert float(expr.xreplace(other)) == pytest.approx(_dense_bf16_by_hand(M, 64, 32), rel=1e-12)


def test_roofline_max_switches_from_memory_to_compute_and_launch_is_additive(dyn_sites):
    lin, _ = dyn_sites
    N, K = 64, 32
    expr = formulas.linear_dense(lin, HAND)
    sym = sorted(lin.hints, key=str)
    at = lambda M: float(expr.xreplace({sym[0]: M, sym[1]: 1}))
    mem = lambda M: (N * K + M * K + M * N) * 2 / (HAND.bandwidth * 0.25)
    comp = lambda M: 2 * M * N * K / (HAND.flops["bfloat16"] * 0.5)
    # this spec's crossover: memory-bound for small M, compute-bound for large M
    assert mem(1) > comp(1) and comp(10**6) > mem(10**6)
    assert at(1) - HAND.launch_s == pytest.approx(mem(1), rel=1e-12)
    assert at(10**6) - HAND.launch_s == pytest.approx(comp(10**6), rel=1e-12)
    # no launch cost: only the Max term is left
    no_launch = DeviceSpec("h", "cpu", HAND.flops, HAND.bandwidth, 0.0, HAND.efficiency)
    e0 = formulas.linear_dense(lin, no_launch)
    assert float(e0.xreplace({sym[0]: 1, sym[1]: 1})) == pytest.approx(mem(1), rel=1e-12)


def test_int8_formula_by_hand_bf16_and_fp32(dyn_sites):
    lin, _ = dyn_sites
    M, N, K = 15, 64, 32
    by_hand = max(2 * M * N * K / (2e11 * 0.25), (N * K + 2 * N + 2 * (M * K + M * N)) / (1e11 * 0.5)) + 1e-5
    expr = formulas.linear_int8_weight_only(lin, HAND)
    assert expr.free_symbols
    assert float(expr.xreplace(lin.hints)) == pytest.approx(by_hand, rel=1e-12)
    # fp32 activations pay two casts (read fp32 + write bf16, and back), each its own launch
    torch._dynamo.reset()
    lin32 = next(s for s in _sites_of(LinearAndAttention(dtype=torch.float32), torch.randn(3, 5, 32),
                                      torch.randn(2, 4, 6, 16), torch.randn(2, 4, 9, 16)) if s.kind == "linear")
    casts = max(0.0, (M * K + M * N) * (4 + 2) / (1e11 * 1.0)) + 2 * 1e-5
    assert float(formulas.linear_int8_weight_only(lin32, HAND).xreplace(lin32.hints)) == pytest.approx(by_hand + casts, rel=1e-12)
    dense32 = max(2 * M * N * K / (1e11 * 1.0), (N * K + M * K + M * N) * 4 / (1e11 * 0.5)) + 1e-5
    assert float(formulas.linear_dense(lin32, HAND).xreplace(lin32.hints)) == pytest.approx(dense32, rel=1e-12)


def test_attention_formula_by_hand(dyn_sites):
    _, att = dyn_sites
    assert att.is_causal and att.mask is None
    B, H, Hkv, Lq, Lk, D = 2, 4, 4, 6, 9, 16
    assert {k: att.size(k) for k in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv")} == {"B": B, "H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D, "Dv": D}
    expr = formulas.attention("sdpa_cpu")(att, HAND)
    assert expr.free_symbols
    flops = 2 * B * H * Lq * Lk * (D + D) / 2  # causal: half the scores
    nbytes = (B * H * Lq * 2 * D + B * Hkv * Lk * 2 * D) * 2
    by_hand = max(flops / (2e11 * 0.5), nbytes / (1e11 * 1.0)) + 1e-5
    assert float(expr.xreplace(att.hints)) == pytest.approx(by_hand, rel=1e-12)


INT8 = Config(linear=("int8_weight_only",))  # the chooser tests follow int8 against the original


def _spec_int8_ratio(site, ratio):
    """A memory-bound spec (no launch cost, huge FLOP/s) where int8's estimate is `ratio` x the original's."""
    M, N, K = (site.size(d) for d in "MNK")
    dense_bytes, int8_bytes = (N * K + M * K + M * N) * 2, N * K + 2 * N + 2 * (M * K + M * N)
    bw = 1e11
    e8 = int8_bytes / (ratio * dense_bytes)  # int8_bytes/(bw*e8) == ratio * dense_bytes/bw
    return DeviceSpec(f"ratio{ratio}", "cpu", {"float32": 1e30, "bfloat16": 1e30, "float16": 1e30}, bw, 0.0,
                      {"dense_bfloat16": (1.0, 1.0), "int8pack": (1.0, e8)})


def _names(ranked):
    return [impl.name for impl, _ in ranked]


@pytest.mark.parametrize("ratio,expected", [(0.5, ["int8_weight_only", "original"]), (0.9, ["int8_weight_only", "original"]),
                                            (0.97, ["original"]), (1.0, ["original"]), (2.0, ["original"])])
def test_chooser_ranks_faster_candidate_first_and_keeps_original_within_margin(dyn_sites, ratio, expected):
    lin, _ = dyn_sites
    spec = _spec_int8_ratio(lin, ratio)
    cands = cost.candidates(lin, spec, INT8)
    recs = {rec.name: rec for _, rec in cands}
    assert recs["int8_weight_only"].estimate_us == pytest.approx(ratio * recs["original"].estimate_us, rel=1e-9)
    assert recs["int8_weight_only"].applicable and recs["original"].applicable
    assert (ratio < MARGIN) == (expected[0] != "original")
    assert _names(cost.ranked(cands)) == expected


def test_chooser_keeps_original_on_exact_tie(dyn_sites):
    lin, _ = dyn_sites
    # launch-dominated: every candidate costs exactly one launch
    tie = DeviceSpec("tie", "cpu", {"float32": 1e40, "bfloat16": 1e40, "float16": 1e40}, 1e40, 1e-3,
                     {"int8pack": (1.0, 1.0)})
    cands = cost.candidates(lin, tie, INT8)
    est = {rec.name: rec.estimate_us for _, rec in cands}
    assert est["int8_weight_only"] == pytest.approx(est["original"]) == pytest.approx(1e3)
    assert _names(cost.ranked(cands)) == ["original"]


def test_chooser_refusals(dyn_sites):
    lin, _ = dyn_sites
    spec = _spec_int8_ratio(lin, 0.5)
    for config, needle in [(Config(accuracy="lossless", linear=INT8.linear), "needs accuracy='balanced' or looser"),
                           (Config(linear=("original",)), "not in Config.linear")]:
        cands = cost.candidates(lin, spec, config)
        rec = next(r for _, r in cands if r.name == "int8_weight_only")
        assert not rec.applicable and needle in rec.reason
        assert rec.estimate_us is not None  # still estimated, for the report
        assert _names(cost.ranked(cands)) == ["original"]


def test_measured_time_overrides_estimate(dyn_sites):
    lin, _ = dyn_sites
    cands = cost.candidates(lin, _spec_int8_ratio(lin, 0.5), INT8)
    recs = {rec.name: rec for _, rec in cands}
    recs["int8_weight_only"].measured_us = 10.0
    recs["original"].measured_us = 5.0  # measured: the original is faster after all
    assert _names(cost.ranked(cands)) == ["original"]
    recs["original"].measured_us = 20.0
    assert _names(cost.ranked(cands)) == ["int8_weight_only", "original"]


def _one_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256).to(torch.bfloat16), torch.randn(1, 256, dtype=torch.bfloat16)


def test_backend_follows_the_cost_model(spec_named):
    model, x = _one_linear()
    fast = spec_named("test_int8_fast", DeviceSpec("fast", "cpu", {"float32": 1e30, "bfloat16": 1e30}, 1e11, 0.0,
                                                   {"dense_bfloat16": (1.0, 0.5), "int8pack": (1.0, 1.0)}))
    tie = spec_named("test_tie", DeviceSpec("tie", "cpu", {"float32": 1e40, "bfloat16": 1e40}, 1e40, 1e-3, {}))
    with torch.no_grad():
        ref = model(x)
        out_fast = compiled(model, device=fast)(x)
        [rec] = sites("linear")
        assert rec.status == "rewritten" and rec.chosen == "int8_weight_only"
        assert not torch.equal(out_fast, ref)  # the int8 kernel really runs
        torch._dynamo.reset()
        torchfx_eff.reset()
        out_tie = compiled(model, device=tie)(x)
        [rec] = sites("linear")
    assert rec.status == "kept" and rec.chosen == "original"
    assert "not beaten" in rec.reason
    assert torch.equal(out_tie, ref)


def test_measured_cpu_spec_is_sane_and_cached_on_disk(tmp_path, monkeypatch):
    """The real microbenchmark (the rest of the suite uses a pinned spec, see conftest.py)."""
    import math

    from torchfx_eff.cost import devices

    monkeypatch.setenv("TORCHFX_EFF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "_cpu_spec", None)
    spec = devices.measured_cpu()
    assert spec.type == "cpu" and spec.name.startswith("cpu:")
    numbers = [spec.bandwidth, spec.launch_s, *spec.flops.values(), *(x for v in spec.efficiency.values() for x in v)]
    assert all(math.isfinite(x) and x > 0 for x in numbers), spec
    assert {"float32", "bfloat16"} <= set(spec.flops)
    assert {"dense_bfloat16", "int8pack", "sdpa_cpu"} <= set(spec.efficiency)
    assert 1e-9 < spec.launch_s < 1e-3 and 1e8 < spec.bandwidth < 1e13  # a copy, a dispatch on any real CPU
    assert (tmp_path / "devices.json").exists()
    # a new process (no in-memory spec) reads it back from disk instead of measuring again
    monkeypatch.setattr(devices, "_cpu_spec", None)
    monkeypatch.setattr(devices, "_measure_cpu", lambda: pytest.fail("measured again despite the disk cache"))
    assert devices.measured_cpu() == spec
    assert cost.detect(torch.device("cpu")) == spec


@pytest.mark.parametrize("spec_name", ["h100", "cpu"])
def test_original_attention_is_not_estimated_below_the_kernels_it_dispatches_to(spec_name):
    torch._dynamo.reset()
    # compute-bound: a long causal prefill, head dim 64
    q = torch.randn(1, 8, 1024, 64, dtype=torch.bfloat16)
    [att] = [s for s in _sites_of(LinearAndAttention(), torch.randn(2, 32, dtype=torch.bfloat16), q, q, dynamic=False)
             if s.kind == "attention"]
    spec = cost.SPECS[spec_name]()
    est = {rec.name: rec.estimate_us for _, rec in cost.candidates(att, spec, Config())}
    # PyTorch's default SDPA dispatch runs one of these kernels, so it cannot be cheaper than the cheapest of them
    # (the pinned candidates also pay the custom op's Python dispatch, which the original call does not)
    dispatched = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient") if spec.type == "cuda" else ("sdpa_cpu",)
    assert est["original"] >= (min(est[n] for n in dispatched) - spec.custom_op_s * 1e6) * 0.999, est


def test_custom_op_dispatch_is_charged_to_pinned_sdpa_candidates(spec_named):
    """Eager attention: fused SDPA wins while the custom op's Python dispatch is cheap, and loses once it is not."""
    import dataclasses

    class Eager(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    cheap = devices.measured_cpu()
    for name, custom_op_s, status in [("cheap_dispatch", 0.0, "rewritten"), ("slow_dispatch", 1.0, "kept")]:
        torch._dynamo.reset()
        torchfx_eff.reset()
        spec = spec_named(name, dataclasses.replace(cheap, custom_op_s=custom_op_s))
        with torch.no_grad():
            compiled(Eager(), device=spec)(q, k, v)
        [s] = sites("attention")
        est = {c.name: c.estimate_us for c in s.candidates}
        assert s.status == status, s.reason
        assert est["sdpa_cpu"] >= custom_op_s * 1e6


def test_no_custom_op_dispatch_is_charged_when_inductor_replays_cuda_graphs(spec_named):
    """Under a cudagraph mode (reduce-overhead), or Config.cuda_graphs="on" (the caller's own capture), the graph is
    replayed without Python: pinned candidates lose the dispatch term; under plain Inductor they pay it."""
    import dataclasses

    q = torch.randn(1, 2, 8, 16)
    spec = spec_named("slow_dispatch", dataclasses.replace(devices.measured_cpu(), custom_op_s=1.0))
    est = {}
    for inner, cuda_graphs in [("inductor", "auto"), ("reduce-overhead", "auto"), ("inductor", "on"),
                               ("reduce-overhead", "off")]:
        torch._dynamo.reset()
        torchfx_eff.reset()
        with torch.no_grad():
            compiled(torch.nn.functional.scaled_dot_product_attention, device=spec, inner=inner,
                     cuda_graphs=cuda_graphs)(q, q, q)
        [s] = sites("attention")
        est[inner, cuda_graphs] = {c.name: c.estimate_us for c in s.candidates}["sdpa_cpu"]
    replayed = est["reduce-overhead", "auto"]
    assert est["inductor", "auto"] - replayed == pytest.approx(1e6)
    assert est["inductor", "on"] == pytest.approx(replayed)  # the caller's own graphs
    assert est["reduce-overhead", "off"] == pytest.approx(est["inductor", "auto"])
