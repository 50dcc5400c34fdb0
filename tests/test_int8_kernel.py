"""The int8 weight-only kernels: quantization error bound, ATen's CPU op and the Triton kernels (interpreter:
fp32/fp16) against an fp64 reference, the fake kernel, and the backend end to end on the Triton path."""
import pytest
import torch
from helpers import WEIGHT_ONLY_PATHS, LinearStack, compiled, force_weight_only_path, sites, sqnr_ref
from torch._subclasses.fake_tensor import FakeTensorMode

import torchfx_eff
from torchfx_eff.kernels import int8_weight_only, weight_only_triton
from torchfx_eff.kernels.int8_weight_only import (
    int8_weight_only_linear,
    quantize_per_channel,
)
from torchfx_eff.kernels.weight_only_triton import weight_only_matmul

OP = int8_weight_only_linear
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


def _weights(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    w[0] = 0.0  # an all-zero channel
    w[1, 3] = 50.0  # one outlier dominating its channel
    w[2] *= 1e-6  # a tiny channel
    # a channel whose exact scale amax/127 sits just below a bf16 rounding midpoint, so the bf16 scale rounds
    # down and amax/scale exceeds 127: the clamp must still keep the error within half a step
    w[3] = 0.5 * w[3] / w[3].abs().max()
    w[3, 0] = 127 * (1 + 2 ** -8 - 2 ** -20)
    return w.to(dtype)


def _dequant(q, s):
    return q.double() * s.double()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 16), (64, 48), (33, 512)])
def test_quantize_per_channel_error_is_at_most_half_a_step(dtype, shape):
    w = _weights(*shape, dtype)
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.bfloat16 and s.shape == (shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert bool((s > 0).all())
    w64, s64 = w.double(), s.double()
    err = (w64 - _dequant(q, s)).abs()
    # |w - q*s| <= s/2 per channel (a hair of slack for the fp32 division inside quantize_per_channel)
    assert bool((err <= s64[:, None] * 0.5 * (1 + 1e-6) + 1e-30).all()), (err / s64[:, None]).max()
    # the scale is the channel's max |w| / 127 rounded to bf16: the full int8 range is used
    amax = w64.abs().amax(dim=1)
    nonzero = amax > 0
    assert bool(((s64 - amax / 127).abs() <= U_BF16 * amax / 127)[nonzero].all())
    assert bool((q.abs().amax(dim=1)[nonzero] >= 126).all())
    assert bool((q[~nonzero] == 0).all())


def test_quantize_does_not_modify_or_alias_the_weight():
    w = _weights(16, 32, torch.float32)
    before = w.clone()
    q, _ = quantize_per_channel(w)
    assert torch.equal(w, before)
    assert q.data_ptr() != w.data_ptr()


def _reference(x, q, s, bias):
    ref = x.double() @ _dequant(q, s).T
    return ref if bias is None else ref + bias.double()


def _check_against_reference(out, x, q, s, bias):
    """The kernel rounds the activations to bf16 (unless they are bf16 already), accumulates in fp32,
    rounds the product to bf16, and adds the bias in the activation dtype: each element's error is within a
    few bf16 roundings of sum_k |x_k||w_nk| + |b_n|. The whole output is also within 2% of its max |ref|."""
    ref = _reference(x, q, s, bias)
    err = (out.double() - ref).abs()
    scale = x.double().abs() @ _dequant(q, s).abs().T
    if bias is not None:
        scale = scale + bias.double().abs()
    assert bool((err <= 3 * U_BF16 * scale + 1e-6).all()), (err / scale).max()
    assert float(err.max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("K", [16, 48, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_matches_fp64_reference(M, K, dtype, with_bias):
    torch.manual_seed(K * 1000 + M)
    N = 40
    q, s = quantize_per_channel(torch.randn(N, K))
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    out = OP(x, q, s, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    _check_against_reference(out, x, q, s, bias)


def test_op_3d_input_keeps_leading_dims():
    torch.manual_seed(0)
    q, s = quantize_per_channel(torch.randn(24, 48))
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    bias = torch.randn(24, dtype=torch.bfloat16)
    out = OP(x, q, s, bias)
    assert out.shape == (2, 5, 24) and out.dtype == torch.bfloat16
    _check_against_reference(out.reshape(10, 24), x.reshape(10, 48), q, s, bias)
    # a non-contiguous activation (a transposed view) gives the same rows
    xt = x.transpose(0, 1)
    assert torch.equal(OP(xt, q, s, bias), out.transpose(0, 1))


def test_op_with_weight_quantized_from_kn_layout():
    torch.manual_seed(0)
    w_kn = torch.randn(64, 32, dtype=torch.bfloat16)  # Conv1D stores [in=K, out=N]
    q, s = quantize_per_channel(w_kn.t())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = OP(x, q, s, None)
    _check_against_reference(out, x, q, s, None)


def test_fake_kernel_shapes_under_fake_tensor_mode():
    with FakeTensorMode():
        x = torch.empty(3, 7, 48, dtype=torch.bfloat16)
        q = torch.empty(24, 48, dtype=torch.int8)
        s = torch.empty(24, dtype=torch.bfloat16)
        b = torch.empty(24, dtype=torch.bfloat16)
        out = OP(x, q, s, b)
        assert out.shape == (3, 7, 24) and out.dtype == torch.bfloat16
        out32 = OP(torch.empty(5, 48), q, s, None)
        assert out32.shape == (5, 24) and out32.dtype == torch.float32


@pytest.mark.parametrize("dynamic", [False, True])
def test_op_under_torch_compile_matches_eager_call(dynamic):
    torch.manual_seed(0)
    q, s = quantize_per_channel(torch.randn(24, 48))
    bias = torch.randn(24)

    def f(x):
        return OP(x, q, s, bias) * 2

    cf = torch.compile(f, fullgraph=True, backend="eager", dynamic=dynamic)
    for shape in [(2, 3, 48), (4, 3, 48)]:
        x = torch.randn(*shape)
        out = cf(x)
        assert out.shape == (*shape[:-1], 24)
        assert torch.equal(out, f(x))


TRITON_TOL = {torch.float32: 2.0 ** -16, torch.float16: 2.0 ** -9}  # of sum |x w|: fp32 sums; fp16 out (and tile)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel,M", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("N,K,with_bias", [(40, 100, True), (130, 256, False), (48, 300, True)])
def test_triton_kernels_match_fp64_reference(kernel, M, N, K, with_bias, dtype, monkeypatch):
    force_weight_only_path(monkeypatch, kernel)
    q, s = quantize_per_channel(torch.randn(N, K))
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    out = weight_only_matmul(x, q, s, None, bias, 8, 0)
    assert out.shape == (M, N) and out.dtype == dtype
    scale = x.double().abs() @ _dequant(q, s).abs().T + (0 if bias is None else bias.double().abs())
    err = (out.double() - _reference(x, q, s, bias)).abs()
    assert bool((err <= TRITON_TOL[dtype] * scale).all()), (err / scale).max()


def _spy(monkeypatch, module, name):
    """Count the calls of module.name (looked up at call time by the rewritten graph or the custom op)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("rows", [1, 24], ids=["gemv", "gemm"])
def test_backend_runs_the_triton_kernels_through_the_interpreter(rows, monkeypatch):
    """Costed as if interpreted kernels ran at GPU speed, the Triton path wins on CPU (fp32: the interpreter's
    bf16 is wrong), on the same int8 weights and scales as ATen's."""
    monkeypatch.setattr(weight_only_triton, "INTERPRETER_SLOWDOWN", 1e-3)
    aten = _spy(monkeypatch, int8_weight_only, "int8_weight_only_linear")
    triton = _spy(monkeypatch, weight_only_triton, "weight_only_matmul")
    model = LinearStack(k=128, n=96)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear=("int8_weight_only",))(x)
    for s in sites("linear"):
        assert (s.status, s.chosen) == ("rewritten", "int8_weight_only"), s.reason
        N, K = s.hints["N"], s.hints["K"]
        assert s.weight_bytes == (N * K * 4, N * K + 2 * N)
    assert len(triton) == 2 * 3 and not aten  # the gate's run, the graph check's and the model's, per site
    assert sqnr_ref(ref, out) >= 30.0


def test_k_that_aten_refuses_takes_the_interpreter_or_is_refused(monkeypatch):
    model = LinearStack(k=40, n=64).to(torch.bfloat16)  # up: K=40, not a multiple of 16
    x = torch.randn(1, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(model, linear=("int8_weight_only",))(x)
    up = next(s for s in sites("linear") if s.hints["K"] == 40)
    int8 = next(c for c in up.candidates if c.name == "int8_weight_only")
    assert int8.applicable and up.status == "kept"  # interpreted: applicable, never fast enough
    torch._dynamo.reset()
    torchfx_eff.reset()
    monkeypatch.setattr(weight_only_triton, "INTERPRETING", False)
    with torch.no_grad():
        compiled(model, linear=("int8_weight_only",))(x)
    up = next(s for s in sites("linear") if s.hints["K"] == 40)
    int8 = next(c for c in up.candidates if c.name == "int8_weight_only")
    assert not int8.applicable and "K=40 is not a multiple of 16" in int8.reason
