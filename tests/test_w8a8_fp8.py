"""Activation-quantized linears: per-row quantization, SmoothQuant's smoothing (w8a8_smooth) and fp8, each against
an fp64 reference; the calibration API; the backend end to end on CPU. The fp8 GEMMs run here through Triton's
interpreter and torch._scaled_mm's CPU kernel; GPU runs are in test_gpu.py."""
import pytest
import torch
from helpers import (
    BIG,
    compiled,
    linear_modules,
    make_model,
    matched,
    sites,
    sqnr_ref,
)

import torchfx_eff
from torchfx_eff.calibration import (
    ACTIVATION_STATS,
    MIN_EXAMPLE_ROWS,
    SAMPLE_ROWS,
    Activations,
    site_activations,
)
from torchfx_eff.kernels import w8a8_smooth
from torchfx_eff.kernels.fp8 import E4M3, fp8_linear, fp8_scaled_mm_linear
from torchfx_eff.kernels.quant_gemm import QMAX, quantize_rows, scaled_mm
from torchfx_eff.kernels.w8a8_smooth import (
    pack,
    smoothing_factors,
    w8a8_linear,
    w8a8_linear_triton,
)
from torchfx_eff.passes.sites import LinearSite

U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff


@pytest.fixture(autouse=True)
def _no_calibration_left_over():
    ACTIVATION_STATS.clear()
    yield
    ACTIVATION_STATS.clear()


def _outlier_activations(M, K, seed=0, channels=(3, 11), gain=60.0):
    """Gaussian activations with a few channels far louder than the rest, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    x[:, list(channels)] *= gain
    return x


def _dequant(q, scales):
    return q.double() * scales.double()[:, None]


@pytest.mark.parametrize("qdtype", [torch.int8, E4M3])
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (64, 100)])
def test_quantize_rows_error_bound_and_range(qdtype, shape):
    t = _outlier_activations(*shape)
    t[0, :] = 0.0  # an all-zero row
    q, s = quantize_rows(t, qdtype)
    assert q.dtype == qdtype and q.shape == t.shape and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    scaled = t / s.double()[:, None]  # the exact value each code stands for
    err = (q.double() - scaled).abs()
    if qdtype == torch.int8:
        assert bool((err <= 0.5 + 1e-5).all())  # round to nearest (a hair for the fp32 division)
    else:  # e4m3: 3 mantissa bits (half a unit: 2^-4 relative); subnormal steps of 2^-9 below 2^-6
        assert bool((err <= torch.maximum(scaled.abs() * 2.0 ** -4, torch.full_like(scaled, 2.0 ** -10)) * (1 + 1e-5)).all())
    # each nonzero row's max |t| lands on the format's largest value: the whole range is used
    assert torch.equal(q[1:].double().abs().amax(dim=1), torch.full((shape[0] - 1,), QMAX[qdtype], dtype=torch.float64))
    assert bool((q[0].double() == 0).all())


def test_smoothing_is_exact_in_fp64_and_balances_the_ranges():
    x = _outlier_activations(32, 64)
    w = torch.randn(40, 64, dtype=torch.float64)
    w[:, 5] = 0.0  # a channel no output reads: left alone
    s = smoothing_factors(x.abs().amax(dim=0), w).double()
    assert s[5] == 1.0
    smoothed = (x / s) @ (w * s).T
    exact = x @ w.T
    # equal up to fp64 rounding: two roundings per product (x / s, w * s), K - 1 per sum, on either side
    assert bool(((smoothed - exact).abs() <= 2 * (64 + 2) * 2.0 ** -53 * (x.abs() @ w.abs().T)).all())
    # alpha = 1/2: each live channel's activation range and weight range meet in the middle
    live = torch.arange(64) != 5
    ax, aw = (x / s).abs().amax(dim=0), (w * s).abs().amax(dim=0)
    torch.testing.assert_close(ax[live], aw[live], rtol=1e-5, atol=0)
    torch.testing.assert_close(ax[live], (x.abs().amax(0) * w.abs().amax(0)).sqrt()[live], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(x.abs().amax(dim=0), w, alpha=1.5)


def _w8a8_bound(x, q, scales, inv_s, dtype):
    """|out - x W^T| for W = q * scales / s: each operand is off by at most half its step in the smoothed
    coordinates (x / s quantized per row, W * s per channel), plus the output's rounding."""
    xs = x.double() * inv_s.double()
    _, row_scales = quantize_rows(xs, torch.int8)
    ws = _dequant(q, scales)
    step_x, step_w = row_scales.double()[:, None], scales.double()[None, :]
    K = x.shape[-1]
    bound = step_w / 2 * xs.abs().sum(1, keepdim=True) + step_x / 2 * ws.abs().sum(1)[None, :] + K * step_x * step_w / 4
    return bound * (1 + 1e-5) + 4 * U[dtype] * (xs.abs() @ ws.abs().T)


@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("K", [16, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_is_within_its_quantization_bound_of_fp64(M, K, dtype):
    x = _outlier_activations(M, K, seed=M * K, channels=(1, 9)).to(dtype)
    w = torch.randn(40, K, dtype=torch.float64) * 0.1
    bias = torch.randn(40).to(dtype)
    q, scales, inv_s = pack(w, x.double().abs().amax(dim=0))
    out = w8a8_linear(x, q, scales, inv_s, bias)
    assert out.shape == (M, 40) and out.dtype == dtype
    exact = x.double() @ w.T + bias.double()
    err = (out.double() - exact).abs()
    assert bool((err <= _w8a8_bound(x, q, scales, inv_s, dtype) + 2 * U[dtype] * exact.abs()).all())
    # leading dims are kept
    assert w8a8_linear(x.reshape(1, M, K), q, scales, inv_s, None).shape == (1, M, 40)


@pytest.mark.parametrize("qdtype", [torch.int8, E4M3])
@pytest.mark.parametrize("M, N, K", [(1, 40, 48), (7, 33, 100), (64, 64, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triton_scaled_mm_matches_fp64_of_its_operands(qdtype, M, N, K, out_dtype):
    """Interpreted Triton: edge tiles in M and N, a K tail (blocks of 64), int32 and fp32 accumulators."""
    a, sa = quantize_rows(torch.randn(M, K), qdtype)
    b, sb = quantize_rows(torch.randn(N, K), qdtype)
    bias = torch.randn(N)
    out = scaled_mm(a, b, sa, sb, bias, out_dtype)
    ref = _dequant(a, sa) @ _dequant(b, sb).T + bias.double()
    scale = _dequant(a, sa).abs() @ _dequant(b, sb).abs().T + bias.double().abs()
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert bool(((out.double() - ref).abs() <= 4 * U[out_dtype] * scale + 8 * 2.0 ** -24 * scale).all())
    with pytest.raises(ValueError, match="operands"):
        scaled_mm(a.float(), b.float(), sa, sb, None, out_dtype)


@pytest.mark.parametrize("M", [1, 7, 64])
def test_w8a8_triton_path_agrees_with_the_int_mm_path(M):
    x = _outlier_activations(M, 96, seed=M).float()
    q, scales, inv_s = pack(torch.randn(72, 96), x.abs().amax(dim=0))
    bias = torch.randn(72)
    # both accumulate exactly in int32 and dequantize in the same fp32 order
    torch.testing.assert_close(w8a8_linear_triton(x, q, scales, inv_s, bias), w8a8_linear(x, q, scales, inv_s, bias),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("op", [fp8_linear, fp8_scaled_mm_linear], ids=["triton", "scaled_mm"])
def test_fp8_linears_match_fp64_of_the_quantized_operands(M, dtype, op):
    """fp32 output takes the other bias path of torch._scaled_mm (added after it)."""
    torch.manual_seed(M)
    K, N = 96, 48
    x = torch.randn(2, M, K, dtype=dtype)
    q, scales = quantize_rows(torch.randn(N, K), E4M3)
    bias = torch.randn(N, dtype=dtype)
    out = op(x, q, scales, bias)
    assert out.shape == (2, M, N) and out.dtype == dtype
    xq, row_scales = quantize_rows(x.reshape(-1, K), E4M3)
    ref = _dequant(xq, row_scales) @ _dequant(q, scales).T + bias.double()
    scale = _dequant(xq, row_scales).abs() @ _dequant(q, scales).abs().T + bias.double().abs()
    # fp32 accumulation, then the output's rounding
    assert bool(((out.reshape(-1, N).double() - ref).abs() <= (2 * U[dtype] + (K + 2) * 2.0 ** -24) * scale).all())
    # against the unquantized product: e4m3 rounds each operand by at most 2^-4 relative
    assert sqnr_ref(x.double() @ _dequant(q, scales).T + bias.double(), out) >= 20.0


def _sqnr_w8a8(x, w, absmax):
    q, scales, inv_s = pack(w, absmax)
    return sqnr_ref(x.double() @ w.double().T, w8a8_linear(x, q, scales, inv_s, None))


def test_smoothing_raises_sqnr_on_activations_with_outlier_channels():
    x = _outlier_activations(64, 256, channels=(7, 30, 100, 200), gain=80.0).float()
    w = torch.randn(128, 256) * 0.05
    smoothed = _sqnr_w8a8(x, w, x.abs().amax(dim=0))
    plain = _sqnr_w8a8(x, w, torch.zeros(256))  # no statistics: s = 1 everywhere, plain per-token int8
    assert smoothed >= plain + 6.0, (smoothed, plain)
    assert smoothed >= 30.0


def _input_absmax_by_hooks(model, ids):
    """max |input| per channel of every Linear/Conv1D, by forward pre-hooks (independent of the package)."""
    seen = {}

    def hook(module, args):
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
        seen[module.weight] = torch.maximum(seen[module.weight], x) if module.weight in seen else x

    handles = [m.register_forward_pre_hook(hook) for m in linear_modules(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibration_records_every_linear_per_modality(family):
    model = make_model(family)
    text, image = torch.randint(0, 64, (2, 8)), torch.randint(64, 128, (1, 8))
    torchfx_eff.calibrate_activations(model, [{"input_ids": text[:1]}, text[1:]], modality="text", progress=False)
    report = torchfx_eff.calibrate_activations(model, [(image,)], modality=lambda batch: "image", progress=False)
    first, second, expected_image = (_input_absmax_by_hooks(model, ids) for ids in (text[:1], text[1:], image))
    expected = {w: torch.maximum(first[w], second[w]) for w in first}
    weights = {m.weight for m in linear_modules(model)}
    assert len(report.linears) == len({id(w) for w in weights})  # tied weights count once
    for w in weights:
        per = ACTIVATION_STATS.by_modality(w)
        assert set(per) == {"text", "image"}
        torch.testing.assert_close(per["text"], expected[w], rtol=0, atol=0)
        torch.testing.assert_close(per["image"], expected_image[w], rtol=0, atol=0)
        torch.testing.assert_close(ACTIVATION_STATS.absmax(w), torch.maximum(expected[w], expected_image[w]), rtol=0, atol=0)
    text_report = str(report)
    assert "text:" in text_report and "image:" in text_report and f"{len(report.linears)} linears" in text_report
    with pytest.raises(ValueError, match="modality"):
        torchfx_eff.calibrate_activations(model, [text], modality=3, progress=False)


def test_rewrite_smooths_with_calibrated_statistics(monkeypatch):
    """Calibrated on other inputs than the compile's example, so the statistics each packing used tell their source;
    fused siblings (Q/K/V, gate/up: one concatenated weight) take their members' statistics."""
    model = make_model("llama", BIG, torch.float32)
    batches = [torch.randint(0, 128, (1, 6)), torch.randint(0, 128, (2, 5))]
    torchfx_eff.calibrate_activations(model, batches, progress=False)
    first, second = (_input_absmax_by_hooks(model, ids) for ids in batches)
    calibrated = [torch.maximum(first[w], second[w]) for w in first]
    real_search, packed = w8a8_smooth.search_pack, []
    monkeypatch.setattr(w8a8_smooth, "search_pack", lambda w, acts: packed.append(acts.absmax) or real_search(w, acts))
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model, linear=("w8a8_smooth",))(ids).logits
    rewritten = sites("linear", "rewritten")
    assert rewritten and len(packed) == len(rewritten)
    for absmax in packed:
        assert any(c.shape == absmax.shape and torch.equal(c, absmax) for c in calibrated)
    assert sqnr_ref(ref, out) >= 20.0


def test_backend_rewrites_w8a8_sites_on_cpu_within_the_balanced_budget(monkeypatch):
    import dataclasses

    from torchfx_eff.kernels import registry

    impl = registry._REGISTRY["linear"]["w8a8_smooth"]  # estimated fastest, to drive the rewrite on tiny shapes
    monkeypatch.setitem(registry._REGISTRY["linear"], "w8a8_smooth",
                        dataclasses.replace(impl, cost=lambda site, spec: impl.cost(site, spec) / 100))
    model = make_model("llama", BIG, torch.float32)
    ids = torch.randint(0, 128, (1, MIN_EXAMPLE_ROWS))
    real, sources = w8a8_smooth.site_activations, []
    monkeypatch.setattr(w8a8_smooth, "site_activations", lambda site: sources.append(real(site).source) or real(site))
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model, linear=("w8a8_smooth",))(ids).logits
    linear = matched("linear")
    rewritten = [s for s in linear if s.status == "rewritten"]
    assert rewritten, torchfx_eff.last_report()
    assert all(s.chosen == "w8a8_smooth" and s.sqnr_db >= 20.0 for s in rewritten)
    assert all(s.weight_bytes[1] < s.weight_bytes[0] / 3 for s in rewritten)  # int8 + scales against fp32
    assert sqnr_ref(ref, out) >= 20.0
    assert sources and set(sources) == {"example"}  # nothing was calibrated; the example has enough rows


def test_w8a8_under_inductor_on_cpu_matches_the_eager_replacement():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval()
    x = _outlier_activations(4, 256).float()
    with torch.no_grad():
        eager = compiled(model, linear=("w8a8_smooth",))(x)
        torch._dynamo.reset()
        inductor = compiled(model, linear=("w8a8_smooth",), inner="inductor")(x)
        ref = model(x)
    assert [s.chosen for s in sites("linear", "rewritten")] == ["w8a8_smooth"] * 4  # two compiles, two sites each
    torch.testing.assert_close(inductor, eager, rtol=1e-4, atol=1e-4)
    assert sqnr_ref(ref, inductor) >= 25.0


def test_fp8_is_refused_on_cpu_with_the_reason():
    model = torch.nn.Linear(256, 512).to(torch.bfloat16)
    with torch.no_grad():
        compiled(model, linear=("fp8", "fp8_scaled_mm"))(torch.randn(1, 256, dtype=torch.bfloat16))
    [s] = sites("linear")
    assert s.status == "kept"
    cands = {c.name: c for c in s.candidates}
    assert not cands["fp8"].applicable and not cands["fp8_scaled_mm"].applicable
    assert cands["fp8"].reason.startswith("fp8 needs a CUDA device with compute capability >= 8.9")
    assert cands["fp8_scaled_mm"].reason.startswith("fp8 needs a CUDA device with compute capability >= 9.0")
    assert "site is on cpu" in cands["fp8"].reason


def test_statistics_come_from_calibration_or_an_example_with_enough_rows():
    w = torch.nn.Parameter(torch.randn(32, 64))

    def site(rows):
        return LinearSite(node=None, op="linear", location="", dtype=torch.float32, device=torch.device("cpu"),
                          dims={}, x=None if rows is None else torch.randn(rows, 64), weight=w, weight_name="w")

    with pytest.raises(ValueError, match="calibrate_activations"):
        site_activations(site(None))
    few, enough = site(MIN_EXAMPLE_ROWS - 1), site(MIN_EXAMPLE_ROWS)
    assert site_activations(few) is None  # no statistics: w8a8_smooth packs without smoothing
    acts = site_activations(enough)
    assert acts.source == "example" and torch.equal(acts.absmax, enough.x.abs().amax(dim=0))
    torch.testing.assert_close(acts.mean_square, enough.x.double().square().mean(dim=0).float())
    assert torch.equal(acts.sample.sort(dim=0).values, enough.x.sort(dim=0).values)  # every row, in some order
    torchfx_eff.calibrate_activations(torch.nn.Linear(64, 32), [torch.randn(3, 64)], progress=False)  # another weight
    assert site_activations(few) is None
    ACTIVATION_STATS.record(w, torch.full((2, 64), 3.0), "text")
    acts = site_activations(few)
    assert acts.source.startswith("calibrated") and torch.equal(acts.absmax, torch.full((64,), 3.0))
    assert torch.equal(acts.mean_square, torch.full((64,), 9.0)) and torch.equal(acts.sample, torch.full((2, 64), 3.0))


def test_calibration_keeps_a_uniform_sample_of_rows_and_pools_mean_squares():
    """Rows from every batch reach the sample, each an actual input row; past SAMPLE_ROWS it stays that size.
    The mean square pools every row of every modality."""
    w = torch.nn.Parameter(torch.randn(8, 16))
    batches = [torch.full((100, 16), float(b)) + torch.arange(16) / 100 for b in range(10)]  # row b: batch b
    for b in batches[:5]:
        ACTIVATION_STATS.record(w, b, "text")
    for b in batches[5:]:
        ACTIVATION_STATS.record(w, b[None], "image")  # leading dims flatten
    sample = ACTIVATION_STATS.sample(w)
    assert sample.shape == (2 * SAMPLE_ROWS, 16)  # each modality's sample is full
    seen = sample[:, 0].round().long()
    assert set(seen.tolist()) == set(range(10))  # every batch is represented
    assert bool(((seen[:SAMPLE_ROWS] < 5) & (seen[SAMPLE_ROWS:] >= 5)).all())  # text first, then image
    assert max(torch.bincount(seen).tolist()) <= 60  # ~26 a batch: uniform, neither the first nor the last rows
    expected = torch.cat(batches).double().square().mean(dim=0).float()
    torch.testing.assert_close(ACTIVATION_STATS.mean_square(w), expected)


def test_row_error_is_the_int_mm_paths_relative_error_per_row():
    x = _outlier_activations(24, 96).float()
    x[3] = 0.0  # a row with no output: no error
    w = torch.randn(40, 96) * 0.05
    q, scales, inv_s = pack(w, x.abs().amax(dim=0), 0.7)
    out, ref = w8a8_linear(x, q, scales, inv_s, None).double(), x.double() @ w.double().T
    per_row = (out - ref).square().sum(-1) / ref.square().sum(-1).clamp(min=1e-300)
    assert w8a8_smooth.row_error(x, ref.float(), w, inv_s) == pytest.approx(per_row.mean().item(), rel=1e-4)


@pytest.mark.parametrize("N", [128, 1024])  # 1024: ranked on SEARCH_CHANNELS of them
def test_alpha_search_takes_the_alpha_with_the_least_row_error_and_it_carries_to_new_rows(N):
    """Chosen on sample rows, the alpha beats SmoothQuant's default 1/2 on other rows of the same distribution.
    Channels of log-normal scales, and a few channels massive on one token in 20 (as attention sinks make them):
    their max |x| overstates a typical token's, and a weaker migration pays (on i.i.d. outlier channels, 1/2 wins)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g) * torch.exp(1.5 * torch.randn(256, generator=g))
    x[::20, :4] *= 100
    sample, held_out = x[:128], x[128:]
    w = torch.randn(N, 256, generator=g) * 0.05
    acts = Activations(x.abs().amax(dim=0), x.square().mean(dim=0), sample, "test", None)

    def error(rows, alpha):  # over every channel
        return w8a8_smooth.row_error(rows, rows @ w.T, w, 1 / smoothing_factors(acts.absmax, w, alpha))

    errors = {alpha: error(sample, alpha) for alpha in w8a8_smooth.ALPHAS}
    best = min(errors, key=errors.get)
    assert best != 0.5 and errors[best] < errors[0.5]
    chosen = w8a8_smooth.search_pack(w, acts)
    assert all(torch.equal(c, b) for c, b in zip(chosen, pack(w, acts.absmax, best)))
    assert error(held_out, best) < error(held_out, 0.5)


@pytest.mark.parametrize("name", ["fp8_scaled_mm", "fp8", "w8a8_smooth"])
def test_hopper_estimates_of_a_weight_bound_gemv_follow_the_halved_weight_bytes(name):
    """M=1, 8192 x 8192 bf16 on an H100 (replayed from a CUDA graph: no Python dispatch) is weight-bound: one byte
    a weight instead of two costs clearly less, though not half (a quantization pass and launch before it)."""
    import dataclasses

    import sympy

    from torchfx_eff.cost import SPECS, formulas

    site = LinearSite(node=None, op="linear", location="", dtype=torch.bfloat16, device=torch.device("cuda"),
                      dims={"M": sympy.Integer(1), "N": sympy.Integer(8192), "K": sympy.Integer(8192)}, weight=None)
    spec = dataclasses.replace(SPECS["h100"](), custom_op_s=0.0)
    dense = float(formulas.linear_dense(site, spec))
    quantized = {"fp8_scaled_mm": lambda: formulas.linear_fp8(site, spec), "fp8": lambda: formulas.linear_fp8(site, spec, "fp8_triton"),
                 "w8a8_smooth": lambda: formulas.linear_w8a8(site, spec)}[name]()
    assert 0.5 * dense < float(quantized) < 0.75 * dense
