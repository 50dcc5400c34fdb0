"""int4 weight-only: quantization error bounds, the packed layout, the Triton kernels (interpreter: fp32/fp16) and
ATen's CPU kernel against fp64 products of the dequantized weights, the cost formula by hand, and the backend end
to end on both paths."""
import itertools
import math
import types

import pytest
import sympy
import torch
from helpers import (
    WEIGHT_ONLY_PATHS,
    LinearStack,
    compiled,
    compiles_for_sm90,
    force_weight_only_path,
    sites,
    sqnr_ref,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import torchfx_eff
from torchfx_eff import calibration
from torchfx_eff.calibration import ACTIVATION_STATS
from torchfx_eff.cost import DeviceSpec, formulas
from torchfx_eff.kernels import int4_weight_only, weight_only_triton
from torchfx_eff.kernels.int4_weight_only import (
    GROUP_SIZES,
    int4_weight_only_linear,
    pack_for_cpu,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from torchfx_eff.kernels.weight_only_triton import aligned_rows, weight_only_matmul

U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16


def dequantize(codes, scales, zeros, group_size, K):
    """The fp64 weights the codes stand for, (q - 8) * scale + zero per group, cut back to K columns."""
    N = codes.shape[0]
    w = (codes.double().reshape(N, -1, group_size) - 8) * scales.double()[..., None] + zeros.double()[..., None]
    return w.reshape(N, -1)[:, :K]


def _weights(n, k, dtype):
    w = torch.randn(n, k, dtype=torch.float64)
    w[0] = 0.0  # an all-zero channel
    w[1] = 0.3  # a constant channel
    w[2] = 100 + 0.01 * w[2]  # far from zero relative to its spread: the bf16 zero's rounding exceeds half a step
    w[3] *= 1e-6  # a tiny channel
    w[4, 5] = 40.0  # an outlier dominating its group
    return w.to(dtype)


def _groups(t, group_size):
    """[N, K] -> fp64 [N, G, group_size], K padded by repeating each channel's last value (as quantize_int4 does)."""
    t = t.double()
    return torch.nn.functional.pad(t, (0, -t.shape[1] % group_size), mode="replicate").reshape(t.shape[0], -1, group_size)


def _group_error(w, codes, scales, zeros, group_size, importance=None):
    """fp64 squared error per group, weighted per input channel (the padding weighs nothing)."""
    K = w.shape[1]
    imp = torch.ones(K, dtype=torch.float64) if importance is None else importance.double()
    imp = torch.nn.functional.pad(imp, (0, -K % group_size)).reshape(-1, group_size)
    deq = _groups(dequantize(codes, scales, zeros, group_size, codes.shape[1]), group_size)
    return (imp * (deq - _groups(w, group_size)).square()).sum(-1)


def _min_max(w, group_size):
    """The plain quantizer, in fp64: 15 steps span each group's [min, max] (the step rounded up to bf16), zero =
    the value of code 8 in bf16, codes rounded to nearest."""
    g = _groups(w, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    step = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny)
    scales = step.to(torch.bfloat16)
    scales = torch.where(scales.double() < step, torch.nextafter(scales, scales.new_tensor(float("inf"))), scales)
    zeros = (lo + 8 * scales.double()).to(torch.bfloat16)
    codes = ((g - zeros.double()[..., None]) / scales.double()[..., None] + 8).round().clamp(0, 15)
    return codes.to(torch.uint8).reshape(w.shape[0], -1), scales, zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("K", [128, 100])  # 100: padded to the group
def test_codes_are_the_nearest_on_their_groups_grid(K, group_size, dtype):
    N = 24
    w = _weights(N, K, dtype)
    codes, scales, zeros = quantize_int4(w, group_size)
    Kp = -(-K // group_size) * group_size
    assert codes.shape == (N, Kp) and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (N, Kp // group_size) and scales.dtype == zeros.dtype == torch.bfloat16
    assert bool((scales > 0).all())
    deq = dequantize(codes, scales, zeros, group_size, K)
    per_group = lambda t: t.double().repeat_interleave(group_size, dim=1)[:, :K]
    s, z = per_group(scales), per_group(zeros)
    # no code of the grid (q - 8) * s + z is nearer (up to fp32 rounding of the division)
    grid = (torch.arange(16, dtype=torch.float64)[:, None, None] - 8) * s + z
    nearest = (grid - w.double()).abs().amin(0)
    err = (w.double() - deq).abs()
    assert bool((err <= nearest + 1e-6 * s + 1e-30).all()), ((err - nearest) / s).max()
    assert torch.equal(deq[0], torch.zeros(K, dtype=torch.float64))  # an all-zero channel is exact
    assert bool(((deq[1] - w[1].double()).abs() <= U_BF16 * 0.3).all())  # a constant one within its zero's rounding


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed", "special"])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "importance"])
def test_search_never_loses_to_min_max_rounding(kind, group_size, weighted):
    """Per group, the searched (scale, zero) have at most the (weighted) squared error of min/max rounding (fp64
    reference above), and on real-valued groups clearly less."""
    g = torch.Generator().manual_seed(1)
    N, K = 64, 200
    w = {"gaussian": lambda: torch.randn(N, K, generator=g),
         "heavy-tailed": lambda: torch.distributions.StudentT(2.0).sample((N, K)),  # outliers in most groups
         "special": lambda: _weights(N, K, torch.float32)}[kind]()
    importance = torch.rand(K, generator=g).square() * 10 if weighted else None
    err = _group_error(w, *quantize_int4(w, group_size, importance), group_size, importance)
    ref = _group_error(w, *_min_max(w, group_size), group_size, importance)
    assert bool((err <= ref * (1 + 1e-6) + 1e-30).all()), (err / ref).max()
    if kind != "special":
        gain_db = 10 * torch.log10(ref.sum() / err.sum()).item()
        assert gain_db >= {"gaussian": 0.5, "heavy-tailed": 1.5}[kind], gain_db  # measured: 0.7-1.6, 1.7-3.3


def test_importance_steers_the_error_to_quiet_channels():
    """A few loud input channels (as LLM activations have): weighing the error by the activations' mean square
    lowers the error of the output, E|x (W - W')^T|^2, against the same search unweighted."""
    g = torch.Generator().manual_seed(2)
    N, K = 128, 256
    w = torch.randn(N, K, generator=g)
    x = torch.randn(512, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:8]] *= 30
    importance = x.square().mean(0)
    out_err = lambda q: (x.double() @ (w.double() - dequantize(*q, 64, K)).T).square().sum().item()
    plain, weighted = out_err(quantize_int4(w, 64)), out_err(quantize_int4(w, 64, importance))
    assert 10 * math.log10(plain / weighted) >= 1.0, (plain, weighted)
    assert weighted < plain < out_err(_min_max(w, 64))


def _correlated_inputs(rows, K, generator):
    """Calibration-like activations: channels mixed by a random matrix (so X^T X is far from diagonal), a few loud."""
    mix = torch.randn(K, K, generator=generator) / K ** 0.5 + torch.eye(K)
    x = torch.randn(rows, K, generator=generator) @ mix
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_gptq_beats_rounding_on_the_same_grid(group_size):
    """Given X^T X, GPTQ keeps the groups' grids of the searched rounding and lowers the output's error
    ||X W^T - X Q^T|| (fp64) on held-out rows of the same distribution; codes stay in range. K = 200 is no
    multiple of any group."""
    g = torch.Generator().manual_seed(3)
    N, K = 96, 200
    w = torch.randn(N, K, generator=g)
    x = _correlated_inputs(4096, K, g)
    calib, held_out = x[:2048], x[2048:].double()
    hessian = calib.T @ calib / len(calib)
    rounded = quantize_int4(w, group_size, hessian.diagonal())
    codes, scales, zeros = quantize_int4(w, group_size, hessian.diagonal(), hessian)
    assert codes.dtype == torch.uint8 and codes.shape == rounded[0].shape and int(codes.max()) <= 15
    assert torch.equal(scales, rounded[1]) and torch.equal(zeros, rounded[2])
    out_err = lambda q: (held_out @ (w.double() - dequantize(*q, group_size, K)).T).square().sum().item()
    gain_db = 10 * math.log10(out_err(rounded) / out_err((codes, scales, zeros)))
    assert gain_db >= 1.5, gain_db  # measured: 2.3 (g32), 2.7 (g64), 3.2 (g128)


def test_gptq_leaves_dead_channels_to_plain_rounding():
    """Channels calibration never saw (zero rows and columns of X^T X) are rounded to nearest, as without GPTQ:
    no error spreads onto them, none from them; the others are still GPTQ's and finite."""
    g = torch.Generator().manual_seed(4)
    N, K = 32, 128
    w = torch.randn(N, K, generator=g)
    x = _correlated_inputs(1024, K, g)
    dead = torch.tensor([5, 64, 127])
    x[:, dead] = 0
    hessian = x.T @ x / len(x)
    rounded = quantize_int4(w, 64, hessian.diagonal())
    codes, scales, zeros = quantize_int4(w, 64, hessian.diagonal(), hessian)
    assert torch.equal(codes[:, dead], rounded[0][:, dead])
    assert not torch.equal(codes, rounded[0]) and bool(dequantize(codes, scales, zeros, 64, K).isfinite().all())


def test_gptq_of_a_hessian_never_calibrated_is_plain_rounding():
    """An all-zero X^T X (every channel dead) gives the result without one, exactly."""
    w = torch.randn(16, 100)
    importance = torch.rand(100) + 0.1
    plain = quantize_int4(w, 32, importance)
    for a, b in zip(quantize_int4(w, 32, importance, torch.zeros(100, 100)), plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [torch.ones(5), torch.zeros(64), torch.full((64,), -1.0), torch.full((64,), math.nan)])
def test_bad_importance_raises(bad):
    with pytest.raises(ValueError, match="importance must be"):
        quantize_int4(torch.randn(16, 64), 32, bad)


def test_pack_unpack_round_trip_and_layout():
    g = 32
    codes = torch.randint(0, 16, (3, 4 * g), dtype=torch.uint8)
    packed = pack_int4(codes, g)
    assert packed.shape == (3, 4 * g // 8) and packed.dtype == torch.int32
    for n in range(3):  # the documented layout, nibble by nibble
        for group in range(4):
            for j in range(g // 8):
                word = int(packed[n, group * g // 8 + j]) & 0xFFFFFFFF
                assert [word >> (4 * i) & 15 for i in range(8)] == [int(codes[n, group * g + i * g // 8 + j]) for i in range(8)]
    assert torch.equal(unpack_int4(packed, g), codes)
    for group_size in GROUP_SIZES:
        raw = torch.randint(-2 ** 31, 2 ** 31, (5, 3 * group_size // 8), dtype=torch.int32)
        assert torch.equal(pack_int4(unpack_int4(raw, group_size), group_size), raw)


@pytest.mark.parametrize("bad", [16, 48, 256, 0, "64", None])
def test_bad_group_size_raises(bad):
    with pytest.raises(ValueError, match=r"group_size=.* choose one of \(32, 64, 128\)"):
        quantize_int4(torch.randn(16, 64), bad)
    with pytest.raises(ValueError, match=r"group_size=.* choose one of \(32, 64, 128\)"):
        weight_only_matmul(torch.randn(2, 64), torch.zeros(16, 8, dtype=torch.int32), torch.ones(16, 1),
                           torch.zeros(16, 1), None, 4, bad)


def test_bad_bits_raise():
    with pytest.raises(ValueError, match=r"bits=3 .* choose 4 or 8"):
        weight_only_matmul(torch.randn(2, 64), torch.zeros(16, 32, dtype=torch.uint8), torch.ones(16, 1), None, None, 3, 64)


def _reference(x, deq, bias):
    ref = x.double() @ deq.T
    scale = x.double().abs() @ deq.abs().T  # sum_k |x_k w_nk|: what rounding errors scale with
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    return ref, scale


TRITON_TOL = {torch.float32: 2.0 ** -16, torch.float16: 2.0 ** -9}  # of sum |x w|: fp32 sums; fp16 out (and tile)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel,M", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("N,K,group_size,with_bias", [(40, 100, 32, True), (130, 256, 64, False), (48, 200, 128, True)])
def test_triton_kernels_match_fp64_reference(kernel, M, N, K, group_size, with_bias, dtype, monkeypatch):
    force_weight_only_path(monkeypatch, kernel)
    codes, scales, zeros = quantize_int4(torch.randn(N, K), group_size)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    out = weight_only_matmul(x, pack_int4(codes, group_size), aligned_rows(scales), aligned_rows(zeros), bias, 4,
                             group_size)  # scales and zeros as the replacement packs them: rows padded, K gives G
    assert out.shape == (M, N) and out.dtype == dtype
    ref, scale = _reference(x, dequantize(codes, scales, zeros, group_size, K), bias)
    err = (out.double() - ref).abs()
    assert bool((err <= TRITON_TOL[dtype] * scale).all()), (err / scale).max()


def test_gemm_k_splits_cover_k_and_apply_only_to_few_tiles():
    """Every step in exactly one split, none empty. int4: the splits' fp32 sums (written, read) at most 1/4 of the
    weight bytes, a split only where the 16 x 32 tiles do not fill the GPU twice; int8: a split only where its 128 x
    64 tiles fill less than half the SMs, each split at least 8 steps. At an H100's 132 SMs, as measured best: 16
    rows of 8192 x 2048 split, of 4096 x 14336 whole; int8 128 rows of 8192 x 2048 in 8."""
    for M, N, K, (bits, part), sms in itertools.product((3, 5, 16, 33, 63, 128, 511), (1000, 2048, 14336),
                                                         (100, 2000, 8192), ((4, 4), (4, 8), (4, 16), (8, 64)), (4, 132)):
        splits, per_split = weight_only_triton.gemm_splits(M, N, K, bits, part, sms)
        steps = weight_only_triton.gemm_steps(K, bits, part)
        assert splits >= 1 and (splits - 1) * per_split < steps <= splits * per_split
        if splits > 1 and bits == 4:
            assert 8 * splits * M * N <= N * K * bits / 8 / 4
            assert math.ceil(M / 16) * math.ceil(N / 32) < 2 * sms
        if splits > 1 and bits == 8:
            assert 2 * math.ceil(M / 128) * math.ceil(N / 64) <= sms and per_split >= 8
    for bits, part in ((4, 8), (8, 64)):
        assert weight_only_triton.gemm_splits(16, 2048, 8192, bits, part, 132)[0] > 1
        assert weight_only_triton.gemm_splits(16, 14336, 4096, bits, part, 132)[0] == 1
    assert weight_only_triton.gemm_splits(128, 2048, 8192, 8, 64, 132)[0] == 8


def test_triton_kernel_keeps_leading_dims_and_reads_strided_input():
    codes, scales, zeros = quantize_int4(torch.randn(24, 64), 32)
    packed = pack_int4(codes, 32)
    x = torch.randn(5, 2, 64).transpose(0, 1)  # [2, 5, 64], not contiguous
    out = weight_only_matmul(x, packed, scales, zeros, None, 4, 32)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, weight_only_matmul(x.contiguous(), packed, scales, zeros, None, 4, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("N,K,group_size,with_bias", [(48, 100, 32, True), (64, 256, 64, False), (32, 384, 128, True)])
def test_aten_cpu_kernel_matches_fp64_reference(M, N, K, group_size, with_bias, dtype):
    """bf16 activations (fp32 ones rounded to bf16 first), fp32 sums, a bf16 result, then the bias in x's dtype:
    each element within a few bf16 roundings of sum |x w| + |b|."""
    codes, scales, zeros = quantize_int4(torch.randn(N, K), group_size)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    out = int4_weight_only_linear(x, *pack_for_cpu(codes, scales, zeros), group_size, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    ref, scale = _reference(x, dequantize(codes, scales, zeros, group_size, K), bias)
    err = (out.double() - ref).abs()
    assert bool((err <= 3 * U_BF16 * scale).all()), (err / scale).max()


def test_fake_tensor_shapes():
    with FakeTensorMode():
        x = torch.empty(3, 7, 100, dtype=torch.bfloat16)
        out = torch.ops.torchfx_eff.weight_only_mm(x, torch.empty(48, 64, dtype=torch.uint8), torch.empty(48, 4),
                                                   torch.empty(48, 4), None, 4, 32)
        assert out.shape == (3, 7, 48) and out.dtype == torch.bfloat16
        out = int4_weight_only_linear(torch.empty(5, 100), torch.empty(48, 64, dtype=torch.uint8),
                                      torch.empty(4, 48, 2, dtype=torch.bfloat16), 32, None)
        assert out.shape == (5, 48) and out.dtype == torch.float32


def test_cpu_kernel_under_torch_compile_matches_eager_call():
    codes, scales, zeros = quantize_int4(torch.randn(32, 100), 32)
    packed, sz = pack_for_cpu(codes, scales, zeros)

    def f(x):
        return int4_weight_only_linear(x, packed, sz, 32, None) * 2

    cf = torch.compile(f, fullgraph=True, backend="eager", dynamic=True)
    for shape in [(2, 3, 100), (4, 3, 100)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        assert torch.equal(cf(x), f(x))


HAND = DeviceSpec("hand", "cpu", flops={"float32": 1e11, "bfloat16": 2e11, "float16": 2e11}, bandwidth=1e11,
                  launch_s=1e-5, efficiency={"int4pack": (0.25, 0.5), "int4_gemv": (0.1, 0.8), "int4_gemm": (0.5, 0.4),
                                             "elementwise": (1.0, 1.0), "dense_bfloat16": (0.5, 0.25),
                                             "dense_float32": (0.5, 0.25)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cost_formula_by_hand(dtype):
    m = sympy.Symbol("m", positive=True, integer=True)
    site = types.SimpleNamespace(dims={"M": m, "N": sympy.Integer(64), "K": sympy.Integer(100)}, dtype=dtype)
    N, K, Kp, b = 64, 100, 128, dtype.itemsize
    weights = N * Kp / 2 + 4 * N * Kp / 64
    for M in (3, 40, 100):
        aten = max(2 * M * N * Kp / (2e11 * 0.25), (weights + 2 * (M * Kp + M * N)) / (1e11 * 0.5)) + 1e-5
        if dtype != torch.bfloat16:
            aten += (M * K + M * N) * (b + 2) / 1e11 + 2e-5
        rate = 2e11 if dtype == torch.bfloat16 else 1e11
        if M < 64:  # GEMV up to 16 rows, GEMM below 64
            f_eff, b_eff = HAND.efficiency["int4_gemv" if M <= 16 else "int4_gemm"]
            triton = max(2 * M * N * K / (rate * f_eff), (weights + (M * K + M * N) * b) / (1e11 * b_eff)) + 1e-5
        else:  # weights decoded in one pass, then the dense matmul
            decode = (weights + N * K * b) / 1e11 + 1e-5
            triton = decode + max(2 * M * N * K / (rate * 0.5), (N * K + M * K + M * N) * b / (1e11 * 0.25)) + 1e-5
        for expr, by_hand in [(formulas.linear_int4_weight_only(site, HAND, 64), aten),
                              (formulas.linear_int4_weight_only(site, HAND, 64, (16, 64)), triton)]:
            assert float(expr.xreplace({m: M})) == pytest.approx(by_hand, rel=1e-12)


def _spy(monkeypatch, module, name):
    """Count the calls of module.name (looked up at call time by the rewritten graph or the custom op)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_backend_rewrites_to_aten_int4_on_cpu(monkeypatch):
    aten = _spy(monkeypatch, int4_weight_only, "int4_weight_only_linear")
    triton = _spy(monkeypatch, weight_only_triton, "weight_only_matmul")
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear=("int4_weight_only",), accuracy="aggressive")(x)
    linear = sites("linear")
    assert len(linear) == 2
    for s in linear:
        assert (s.status, s.chosen) == ("rewritten", "int4_weight_only"), s.reason
        assert s.sqnr_db >= 20.0  # the balanced budget
        N, K = s.hints["N"], s.hints["K"]
        assert s.weight_bytes == (N * K * 2, N * K // 2 + 4 * N * K // 64)
    assert len(aten) == 2 * 3 and not triton  # the gate's run, the graph check's and the model's, per site
    assert sqnr_ref(ref, out) >= 20.0


@pytest.mark.parametrize("calibrated", [True, False])
def test_rewrite_quantizes_with_calibrated_statistics(calibrated, monkeypatch):
    """Calibrated: each site's quantizer gets its input's mean x^2 and X^T X / rows over the calibration rows
    (computed here by hooks); not calibrated, with a one-row example: neither. Group 32 takes the same path."""
    model = LinearStack().to(torch.bfloat16)
    batches = [torch.randn(4, 256, dtype=torch.bfloat16), torch.randn(2, 3, 256, dtype=torch.bfloat16)]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m.weight, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for m in (model.up, model.down)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    ACTIVATION_STATS.clear()
    if calibrated:
        torchfx_eff.calibrate_activations(model, batches, progress=False)
    real, got = int4_weight_only.quantize_int4, []
    monkeypatch.setattr(int4_weight_only, "quantize_int4",
                        lambda w, g, imp=None, h=None: got.append((w.shape[1], imp, h)) or real(w, g, imp, h))
    try:
        with torch.no_grad():
            compiled(model, linear=("int4_weight_only_g32",), accuracy="aggressive")(torch.randn(1, 256, dtype=torch.bfloat16))
    finally:
        ACTIVATION_STATS.clear()
    assert [s.chosen for s in sites("linear")] == ["int4_weight_only_g32"] * 2
    assert sorted(k for k, _, _ in got) == [256, 512]
    for K, importance, hessian in got:
        if not calibrated:
            assert importance is None and hessian is None
            continue
        rows = torch.cat(next(v for w, v in seen.items() if w.shape[1] == K)).double()
        torch.testing.assert_close(importance, rows.square().mean(0).float())
        torch.testing.assert_close(hessian, (rows.T @ rows / len(rows)).float())


def test_calibration_keeps_one_hessian_per_input(monkeypatch):
    """Linears that read one tensor (as Q/K/V do) share one X^T X sum, over every batch and each modality's rows;
    past MAX_HESSIAN_K none is kept."""
    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.out = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            return self.out(self.q(x) * self.k(x))

    model = Siblings()
    batches = [torch.randn(2, 8, 32), torch.randn(5, 32)]
    ACTIVATION_STATS.clear()
    try:
        torchfx_eff.calibrate_activations(model, batches[:1], modality="text", progress=False)
        torchfx_eff.calibrate_activations(model, batches[1:], modality="image", progress=False)
        grams = lambda w: [c.gram for c in ACTIVATION_STATS._channels(w)]
        assert all(a is b for a, b in zip(grams(model.q.weight), grams(model.k.weight), strict=True))
        assert not any(a is b for a, b in zip(grams(model.q.weight), grams(model.out.weight)))
        rows = torch.cat([b.reshape(-1, 32) for b in batches]).double()
        torch.testing.assert_close(ACTIVATION_STATS.hessian(model.k.weight), (rows.T @ rows / len(rows)).float())
        monkeypatch.setattr(calibration, "MAX_HESSIAN_K", 16)
        ACTIVATION_STATS.clear()
        torchfx_eff.calibrate_activations(model, batches, progress=False)
        assert ACTIVATION_STATS.hessian(model.q.weight) is None
        assert ACTIVATION_STATS.mean_square(model.q.weight) is not None
    finally:
        ACTIVATION_STATS.clear()


INT4 = ("int4_weight_only", "int4_weight_only_g32", "int4_weight_only_g128")


def test_int4_needs_aggressive_accuracy():
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(model, linear=INT4)(x)
    for s in sites("linear"):
        for name in INT4:
            cand = next(c for c in s.candidates if c.name == name)
            assert not cand.applicable and "needs accuracy='aggressive'" in cand.reason
    torch._dynamo.reset()
    torchfx_eff.reset()
    with torch.no_grad():
        compiled(model, linear=("int4_weight_only_g128",), accuracy="aggressive")(x)
    assert all(s.chosen == "int4_weight_only_g128" for s in sites("linear")), [s.reason for s in sites("linear")]


class HiddenAndLogits(torch.nn.Module):
    """An inner linear whose value the graph returns beside the logits, and an output linear (the LM head) whose
    value reaches the output through a reshape and a cast."""

    def __init__(self, k=256, n=512):
        super().__init__()
        self.inner = torch.nn.Linear(k, n)
        self.head = torch.nn.Linear(n, k)

    def forward(self, x):
        hidden = self.inner(x)
        return hidden, self.head(torch.nn.functional.gelu(hidden)).reshape(-1, self.head.out_features).float()


class SoftCappedLogits(HiddenAndLogits):
    """The head's logits soft-capped before the output (/ cap, tanh, * cap), as Gemma 2 does."""

    def forward(self, x):
        return torch.tanh(self.head(self.inner(x)) / 30.0) * 30.0


@pytest.mark.parametrize("fallback", [("int8_weight_only",), ()], ids=["int8", "none"])
def test_output_linear_keeps_8bit_weights(fallback):
    """Sub-8-bit candidates refuse the graph's output linear, which takes the next candidate (int8, or bf16 when no
    other is allowed), and the report says why; the inner linear, though one of the graph's outputs, is quantized."""
    model = HiddenAndLogits().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(model, linear=INT4 + fallback, accuracy="aggressive", output_linear_8bit=True)(x)
    inner, head = sorted(sites("linear"), key=lambda s: s.hints["K"])
    assert inner.status == "rewritten" and inner.chosen in INT4, inner.reason
    assert head.chosen == (fallback[0] if fallback else "original"), head.reason
    for c in head.candidates:
        if c.name in INT4:
            assert not c.applicable and c.reason.startswith("the graph's output linear keeps >= 8-bit weights"), c
    assert "the graph's output linear keeps >= 8-bit weights" in torchfx_eff.last_report().to_json()
    if not fallback:  # the text table says why the head kept its weights
        assert f"{', '.join(INT4)}: the graph's output linear keeps" in str(torchfx_eff.last_report())
    torch._dynamo.reset()
    torchfx_eff.reset()
    with torch.no_grad():
        compiled(model, linear=INT4 + fallback, accuracy="aggressive", output_linear_8bit=False)(x)
    assert all(s.chosen in INT4 for s in sites("linear")), sites("linear")


def test_soft_capped_head_is_the_output_linear():
    """Elementwise maps of the head's value alone (a logit soft-cap) keep it the graph's output linear."""
    model = SoftCappedLogits().to(torch.bfloat16)
    with torch.no_grad():
        compiled(model, linear=INT4 + ("int8_weight_only",), accuracy="aggressive", output_linear_8bit=True)(
            torch.randn(1, 256, dtype=torch.bfloat16))
    inner, head = sorted(sites("linear"), key=lambda s: s.hints["K"])
    assert inner.chosen in INT4 and head.chosen == "int8_weight_only", (inner, head)


def test_site_that_fails_the_gate_at_g64_takes_g32_before_bf16(monkeypatch):
    """The gate falls back per site through the ranked candidates: with both groupings allowed, a g64 packing that
    misses the budget leaves the site to g32 (ranked after it: more scale bytes), not to the original."""
    import dataclasses

    from torchfx_eff.kernels import Replacement, registry

    real = registry._REGISTRY["linear"]["int4_weight_only"]

    def noisy(site):  # a g64 whose output is far off: SQNR ~0 dB
        rep = real.replace(site)
        return Replacement(lambda *a: rep.op(*a) * -1, rep.args, rep.kwargs, rep.weight_bytes, rep.sources)

    monkeypatch.setitem(registry._REGISTRY["linear"], "int4_weight_only", dataclasses.replace(real, replace=noisy))
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear=("int4_weight_only", "int4_weight_only_g32"), accuracy="aggressive")(x)
    linear = sites("linear")
    assert len(linear) == 2
    for s in linear:
        est = {c.name: c.estimate_us for c in s.candidates}
        assert est["int4_weight_only"] <= est["int4_weight_only_g32"]  # g64 ranks first (ties keep registry order)
        assert (s.status, s.chosen) == ("rewritten", "int4_weight_only_g32"), s.reason
        assert "int4_weight_only failed the gate" in s.reason, s.reason
    assert sqnr_ref(ref, out) >= 20.0


@pytest.mark.parametrize("rows", [1, 24], ids=["gemv", "gemm"])
def test_backend_runs_the_triton_kernels_through_the_interpreter(rows, monkeypatch):
    """Costed as if interpreted kernels ran at GPU speed, the Triton path wins on CPU (fp32: the interpreter's
    bf16 is wrong)."""
    monkeypatch.setattr(weight_only_triton, "INTERPRETER_SLOWDOWN", 1e-3)
    aten = _spy(monkeypatch, int4_weight_only, "int4_weight_only_linear")
    triton = _spy(monkeypatch, weight_only_triton, "weight_only_matmul")
    model = LinearStack(k=128, n=96)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear=("int4_weight_only",), accuracy="aggressive")(x)
    assert all((s.status, s.chosen) == ("rewritten", "int4_weight_only") for s in sites("linear")), sites("linear")
    assert len(triton) == 2 * 3 and not aten  # the gate's run, the graph check's and the model's, per site
    assert sqnr_ref(ref, out) >= 20.0


def test_cpu_site_that_aten_refuses_needs_the_interpreter(monkeypatch):
    model = LinearStack(k=64, n=40).to(torch.bfloat16)  # up: N=40, not a multiple of 16
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(weight_only_triton, "INTERPRETING", False)
    with torch.no_grad():
        compiled(model, linear=("int4_weight_only",), accuracy="aggressive")(x)
    up = next(s for s in sites("linear") if s.hints["N"] == 40)
    int4 = next(c for c in up.candidates if c.name == "int4_weight_only")
    assert not int4.applicable and "N=40 is not a multiple of 16" in int4.reason
    down = next(s for s in sites("linear") if s.hints["N"] == 64)
    assert next(c for c in down.candidates if c.name == "int4_weight_only").applicable


TUNED_CONFIGS_FOR_SM90 = r"""
import itertools
import multiprocessing
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchfx_eff import codegen
from torchfx_eff.kernels import weight_only_triton as wt

types = {**dict.fromkeys(["M", "N", "K", "M_BUCKET", "steps_per_split", "splits"]
                         + [n for n in wt._gemm.arg_names if n.startswith("stride")], "i32"),
         "X": "*bf16", "S": "*bf16", "Z": "*bf16", "B": "*bf16", "Out": "*bf16", "E": "*bf16", "G": "*bf16",
         "Part": "*fp32", "inv_k": "fp32", "eps": "fp32"}


def divisible(fn, N, K, bits):  # as a launch specializes: pointers, and the sizes and strides that are multiples
    # of 16 (scale rows come padded by aligned_rows; x's unit stride is the constant 1)
    values = {"N": N, "K": K, "stride_xm": K, "stride_wn": K * bits // 32 if bits == 4 else K, "stride_sn": 16,
              "stride_om": N, "stride_em": N}
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if types.get(n, "").startswith("*") or values.get(n, 1) % 16 == 0}


def compile_one(i):
    tuned, config, weight, N, K, bits, constexprs = jobs[i]
    fn = tuned.fn if isinstance(tuned, triton.runtime.Autotuner) else tuned  # an autotuner's kernel, or a plain one
    given = {k: v for k, v in {**constexprs, "stride_xk": 1, **config.kwargs}.items() if k in fn.arg_names}
    signature = {n: "constexpr" if n in given else {**types, "W": weight}[n] for n in fn.arg_names}
    attrs = {k: v for k, v in divisible(fn, N, K, bits).items() if fn.arg_names[k[0]] not in given}
    try:
        triton.compile(ASTSource(fn, signature, given, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as e:
        return f"{fn.__name__} bits={bits} PART={constexprs.get('PART')} N={N} K={K} {config}: {str(e).splitlines()[0]}"


jobs = []
for (bits, group_size, weight), (N, K) in itertools.product(
        [(4, 32, "*i32"), (4, 64, "*i32"), (4, 128, "*i32"), (8, 0, "*i8")], [(4096, 4096), (1000, 2000)]):
    part = wt._parts(bits, group_size)[1]
    common = {"PART": part, "HAS_BIAS": False, "EPILOGUE": codegen.epilogue(""), "NORM": False}
    if bits == 4:
        gemm, tuned = {**common, "CHUNKS": wt.gemm_chunks(part)}, wt._gemm_tuned
    else:
        gemm, tuned = {k: v for k, v in common.items() if k != "PART"}, wt._mma_gemm_tuned
    kernels = [(tuned, {**gemm, "SPLIT": False}), (tuned, {**gemm, "NORM": True, "SPLIT": True})]
    kernels.append((wt._gemv_int4_tuned, {**common, "NORM": True, "ASM": True, "PDL": True}) if bits == 4 else
                   (wt._gemv_tuned, {**common, "NORM": True, "BITS": 8, "PDL": True}))
    jobs += [(tuned, config, weight, N, K, bits, given) for tuned, given in kernels for config in tuned.configs]
    split_sum = {"HAS_BIAS": True, "EPILOGUE": codegen.epilogue(""), "NORM": True, "BITS": bits}
    jobs.append((wt._split_sum, triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}), weight, N, K, bits,
                 split_sum))
with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:  # the jobs' kernels are inherited, not pickled
    failed = [why for why in pool.map(compile_one, range(len(jobs)), chunksize=1) if why]
if failed:
    raise SystemExit("\n".join(failed))
print("compiled")
"""


def test_every_gemm_and_gemv_config_compiles_for_hopper_at_every_group_size(cache_dir):
    """The autotuner compiles all its configs and a compiler error in one fails the call: each GEMM and GEMV config,
    at each group's dot length, must compile for sm90, for aligned and unaligned shapes (g32's dots of 16 K values
    did not at BLOCK_N >= 128; Triton 3.6 failed g32 at unaligned scale rows, hence aligned_rows)."""
    compiles_for_sm90(TUNED_CONFIGS_FOR_SM90)
