"""Triton matmuls over weight-only quantized linears, shared by `int4_weight_only` and `int8_weight_only`: x in its
own dtype times weights decoded in registers, fp32 accumulation. Up to GEMV_MAX_ROWS rows: a GEMV, one program per
(row, block of output channels), products summed in registers. More rows: a GEMM that decodes the weight tile to
x's dtype for tl.dot. From DEQUANTIZE_MIN_ROWS rows on, the weights are decoded once into x's dtype and cuBLAS
multiplies: the decode pass costs ~3 bytes a weight, while the tl.dot GEMM, decoding every tile for every row
block on CUDA cores, reaches only 0.2-0.5x of cuBLAS there.

K is cut into chunks of 2 * HALF values whose weights come as two halves that meet two contiguous halves of x:
- int8: [N, K] int8 with one scale per channel; a chunk is 2 * HALF bytes of a channel, its first and second
  halves unscaled (the channel scale multiplies the accumulator once, at the end);
- int4: a chunk is one quantization group in int4_weight_only's layout: HALF bytes whose low nibbles hold the
  group's first half and high nibbles its second half, decoded with the group's scale and zero.
A step of either kernel takes several chunks at once: the GEMV so that each thread has a few 16-byte loads in
flight (a decode GEMV is latency-bound otherwise), the GEMM so that each tl.dot sums 64 K values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import codegen
from ..cost import devices, formulas
from .registry import needs_dtype

INTERPRETING = triton.knobs.runtime.interpret  # kernels run on CPU tensors through Triton's interpreter
INTERPRETER_SLOWDOWN = 1e4  # the cost of an interpreted kernel, relative to its GPU roofline
# The GEMV decodes the weights again for each row: on the H100 it beats the GEMM at 1 and 2 rows, not at 4.
GEMV_MAX_ROWS = 2
DEQUANTIZE_MIN_ROWS = 64  # H100: the tl.dot GEMM is ~0.8x cuBLAS at 16 rows, 0.2-0.5x at 128
GROUP_SIZES = (32, 64, 128)  # int4 groups: chunks of 16..64 bytes a channel
INT8_HALF = 64  # int8 chunks of 128 bytes a channel
GEMM_DOT_K = 64  # K values of each tl.dot in the GEMM
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _small_int_to_float(v, OFFSET: tl.constexpr):
    """Integers v + OFFSET in [0, 2^23) to fp32 without a conversion instruction (a few a clock on an SM): 2^23 + u
    holds u in its mantissa, so OR-ing u into 2^23's bits and subtracting 2^23 is exact."""
    u = (v.to(tl.int32) + OFFSET) | 0x4B000000
    return u.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _weight_halves(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS: tl.constexpr, HALF: tl.constexpr):
    """Weights of channels n at K values chunk * 2 * HALF + h and + HALF (n, chunk and h broadcast together, h in
    [0, HALF)), as fp32: int4 decoded with the chunk's scale and zero, int8 unscaled."""
    n_ok = n < N
    if BITS == 4:
        ok = n_ok & (chunk < tl.cdiv(K, 2 * HALF))
        b = tl.load(W + n * stride_wn + chunk * HALF + h, mask=ok, other=0)
        s = tl.load(S + n * stride_sn + chunk, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Z + n * stride_sn + chunk, mask=ok, other=0.0).to(tl.float32) - 8.0 * s  # code 0's value
        return _small_int_to_float(b & 15, 0) * s + z, _small_int_to_float(b >> 4, 0) * s + z
    k = chunk * 2 * HALF + h
    ptrs = W + n * stride_wn + k
    first = tl.load(ptrs, mask=n_ok & (k < K), other=0)
    second = tl.load(ptrs + HALF, mask=n_ok & (k + HALF < K), other=0)
    return _small_int_to_float(first, 128), _small_int_to_float(second, 128)


@triton.jit
def _x_halves(X, m, chunk, h, M, K, stride_xm, stride_xk, HALF: tl.constexpr):
    """Rows m of x at the chunks' two halves, in x's dtype (zero beyond M and K: int4's padding meets zeros)."""
    k = chunk * 2 * HALF + h
    ptrs = X + m * stride_xm + k * stride_xk
    return (tl.load(ptrs, mask=(m < M) & (k < K), other=0.0),
            tl.load(ptrs + HALF * stride_xk, mask=(m < M) & (k + HALF < K), other=0.0))


@triton.jit
def _store(acc, S, B, Out, E, offs_m, offs_n, M, N, stride_om, stride_em, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
           EPILOGUE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] times int8's channel scales, + bias, through the generated EPILOGUE to Out."""
    n_ok = offs_n < N
    if BITS == 8:
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    EPILOGUE(acc, offs_m, offs_n, M, N, Out, stride_om, E, stride_em)


@triton.jit
def _gemv(X, W, S, Z, B, Out, E, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_em,
          BITS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
          STEP_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row m (program axis 0, the fastest: the rows of one channel block run together and share its weights in L2)
    times BLOCK_N channels, STEP_BYTES of each channel a step. Products accumulate element by element and are
    summed over K once, at the end."""
    CHUNKS: tl.constexpr = STEP_BYTES // (HALF * BITS // 4)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h = offs_n[:, None, None], tl.arange(0, HALF)[None, None, :]
    acc = tl.zeros([BLOCK_N, CHUNKS, HALF], tl.float32)
    for step in range(tl.cdiv(K, 2 * HALF * CHUNKS)):
        chunk = step * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
        wa, wb = _weight_halves(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS, HALF)
        xa, xb = _x_halves(X, m, chunk, h, M, K, stride_xm, stride_xk, HALF)
        acc += wa * xa.to(tl.float32) + wb * xb.to(tl.float32)
    out = tl.sum(tl.sum(acc, 2), 1)[None, :]
    _store(out, S, B, Out, E, m + tl.zeros([1], tl.int32), offs_n, M, N, stride_om, stride_em, BITS, HAS_BIAS, EPILOGUE)


@triton.jit
def _dot_chunks(acc, x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """acc + x @ w^T over chunks laid side by side: x [BLOCK_M, CHUNKS, HALF], w [BLOCK_N, CHUNKS, HALF]."""
    x2 = tl.reshape(x, [BLOCK_M, WIDTH])
    return tl.dot(x2, tl.trans(tl.reshape(w.to(x.dtype), [BLOCK_N, WIDTH])), acc)


@triton.jit
def _gemm(X, W, S, Z, B, Out, E, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_em, M_BUCKET,
          BITS: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, CHUNKS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row blocks on program axis 0 (the fastest): the row blocks of one channel block share its weights in L2.
    A step's chunks lie side by side along the dot's K, in the same order for x and the weights. fp32 x multiplies
    as TF32 on the GPU, far below int4/int8 rounding."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m, n, h = offs_m[:, None, None], offs_n[:, None, None], tl.arange(0, HALF)[None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(tl.cdiv(K, 2 * HALF * CHUNKS)):
        chunk = step * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
        wa, wb = _weight_halves(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS, HALF)
        xa, xb = _x_halves(X, m, chunk, h, M, K, stride_xm, stride_xk, HALF)
        acc = _dot_chunks(acc, xa, wa, BLOCK_M, BLOCK_N, CHUNKS * HALF)
        acc = _dot_chunks(acc, xb, wb, BLOCK_M, BLOCK_N, CHUNKS * HALF)
    _store(acc, S, B, Out, E, offs_m, offs_n, M, N, stride_om, stride_em, BITS, HAS_BIAS, EPILOGUE)


@triton.jit
def _dequantize(W, S, Z, Out, N, K, stride_wn, stride_sn, stride_on,
                BITS: tl.constexpr, HALF: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weights of BLOCK_N channels times CHUNKS chunks, decoded (and scaled) into Out [N, K] in its dtype."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]
    chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
    h = tl.arange(0, HALF)[None, None, :]
    wa, wb = _weight_halves(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS, HALF)
    if BITS == 8:
        s = tl.load(S + n * stride_sn, mask=n < N, other=0.0).to(tl.float32)
        wa, wb = wa * s, wb * s
    k = chunk * 2 * HALF + h
    ptrs = Out + n * stride_on + k
    tl.store(ptrs, wa.to(Out.dtype.element_ty), mask=(n < N) & (k < K))
    tl.store(ptrs + HALF, wb.to(Out.dtype.element_ty), mask=(n < N) & (k + HALF < K))


@triton.jit
def _epilogue_pass(Y, Out, E, M, N, stride_ym, stride_om, stride_em, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The epilogue of a product computed elsewhere (cuBLAS on the decoded weights): Y's tiles through EPILOGUE."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(Y + offs_m[:, None] * stride_ym + offs_n[None, :], mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
                other=0.0)
    EPILOGUE(y.to(tl.float32), offs_m, offs_n, M, N, Out, stride_om, E, stride_em)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               K: int, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weights in `dtype`, decoded in one pass (weight_only_matmul's layouts)."""
    N, half = weight.shape[0], group_size // 2 if bits == 4 else INT8_HALF
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    block_n, chunks = (64, 1) if INTERPRETING else (16, max(1, 128 // half))  # ~256 values of a channel a program
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, 2 * half * chunks))
    _dequantize[grid](weight, scales, scales if zeros is None else zeros, out, N, K, weight.stride(0),
                      scales.stride(0), out.stride(0), BITS=bits, HALF=half, CHUNKS=chunks, BLOCK_N=block_n)
    return out


def _prune_gemv(configs, named_args, **kwargs):
    """Accumulators of 1 to 64 fp32 registers a thread (fewer elements than threads would replicate work), blocks
    no wider than N, and at most 65535 of them (the grid's second axis)."""
    N, half = named_args["N"], kwargs["HALF"]
    regs = lambda c: c.kwargs["BLOCK_N"] * c.kwargs["STEP_BYTES"] * 4 // kwargs["BITS"] / (32 * c.num_warps)
    keep = [c for c in configs if 1 <= regs(c) <= 64 and c.kwargs["STEP_BYTES"] >= half * kwargs["BITS"] // 4
            and c.kwargs["BLOCK_N"] <= max(4, triton.next_power_of_2(N)) and triton.cdiv(N, c.kwargs["BLOCK_N"]) <= 65535]
    return keep or configs[-1:]


def _prune_gemm(configs, named_args, **kwargs):
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["M_BUCKET"])]
    return keep or configs[:1]


def _tuned(kernel, configs, key, prune):
    return kernel if INTERPRETING else triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_KEY = ["N", "K", "BITS", "HALF", "HAS_BIAS"]
# GEMV: small blocks of few warps, many programs in flight (a decode matrix is a few MB); long steps keep several
# 16-byte loads a thread in flight. The H100's best at M=1 (sweep over 96 configs, 6 shapes): int8 2 or 4 channels
# of 512-1024 bytes a step, int4 4 channels of 256 bytes.
_gemv_tuned = _tuned(_gemv, [triton.Config({"BLOCK_N": n, "STEP_BYTES": b}, num_warps=w)
                             for n, w, b in [(2, 1, 512), (2, 1, 1024), (2, 2, 1024), (4, 1, 256), (4, 2, 256), (4, 4, 512),
                                             (8, 1, 256), (8, 4, 1024), (16, 2, 256), (16, 4, 256), (32, 4, 256), (64, 8, 256)]],
                     _KEY, _prune_gemv)
_gemm_tuned = _tuned(_gemm, [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                             for m, n, w, s in [(16, 32, 4, 4), (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
                                                (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]],
                     _KEY + ["M_BUCKET"], _prune_gemm)


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, bits: int, group_size: int, epilogue: str = "",
                       operand: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias), then the epilogue (codegen.epilogue's spec, reading operand), in out_dtype (x's by
    default). bits=8: weight [N, K] int8, W = weight * scales[:, None]. bits=4: weight [N, Kp / 2] uint8 in
    int4_weight_only's layout, scales and zeros [N, Kp / group_size], W = (q - 8) * scale + zero in each group. The
    GEMV runs for at most GEMV_MAX_ROWS rows, the GEMM above, cuBLAS on the decoded weights from DEQUANTIZE_MIN_ROWS
    rows (and the epilogue in a pass of its own there)."""
    if bits not in (4, 8):
        raise ValueError(f"weight_only_matmul: bits={bits!r} is not allowed; choose 4 or 8")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"weight_only_matmul: group_size={group_size!r} is not allowed; choose one of {GROUP_SIZES}")
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M, shape = x2.shape[0], (*x.shape[:-1], codegen.out_features(epilogue, N))
    out = torch.empty(M, shape[-1], dtype=out_dtype or x.dtype, device=x.device)
    e, stride_em = codegen.operand_arg(epilogue, operand, out, shape)
    store = codegen.epilogue(epilogue)
    if M >= DEQUANTIZE_MIN_ROWS:
        y = F.linear(x2, dequantize(weight, scales, zeros, bits, group_size, K, x.dtype), bias)
        if not epilogue and y.dtype == out.dtype:
            return y.reshape(shape)
        _epilogue_pass[(triton.cdiv(M, 32), triton.cdiv(N, 64))](y, out, e, M, N, y.stride(0), out.stride(0), stride_em,
                                                                EPILOGUE=store, BLOCK_M=32, BLOCK_N=64)
        return out.reshape(shape)
    if M and N:
        half = group_size // 2 if bits == 4 else INT8_HALF
        args = (x2, weight, scales, scales if zeros is None else zeros, out if bias is None else bias, out, e, M, N, K,
                *x2.stride(), weight.stride(0), scales.stride(0), out.stride(0), stride_em)
        flags = {"BITS": bits, "HALF": half, "HAS_BIAS": bias is not None, "EPILOGUE": store}
        if M <= GEMV_MAX_ROWS:
            block = {"BLOCK_N": 64, "STEP_BYTES": 256} if INTERPRETING else {}
            _gemv_tuned[lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))](*args, **flags, **block)
        else:
            block = {"BLOCK_M": 32, "BLOCK_N": 64} if INTERPRETING else {}
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
            _gemm_tuned[grid](*args, min(triton.next_power_of_2(M), 4096), **flags,
                              CHUNKS=max(1, GEMM_DOT_K // half), **block)
    return out.reshape(shape)


@torch.library.custom_op("torchfx_eff::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, group_size: int, epilogue: str = "",
                   operand: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return weight_only_matmul(x, weight, scales, zeros, bias, bits, group_size, epilogue, operand, out_dtype)


@weight_only_mm.register_fake
def _(x, weight, scales, zeros, bias, bits, group_size, epilogue="", operand=None, out_dtype=None):
    return x.new_empty(*x.shape[:-1], codegen.out_features(epilogue, weight.shape[0]), dtype=out_dtype or x.dtype)


def applicable(site, aten_refusal: str | None) -> str | None:
    """cuda: the Triton kernels. cpu: ATen's kernel, or Triton's interpreter where ATen refuses the site."""
    if not site.weight.is_floating_point():
        return f"weight dtype {site.weight.dtype} is not floating point"
    if reason := needs_dtype(site, DTYPES):
        return reason
    if site.device.type not in ("cuda", "cpu"):
        return f"needs a cuda or cpu tensor, site is on {site.device.type}"
    return aten_refusal if site.device.type == "cpu" and not INTERPRETING else None


def triton_cost(roofline_cost, spec):
    """The kernel's roofline plus the custom op's Python dispatch; off CUDA it runs interpreted, thousands of times
    slower, so the cost model never picks it there on its own."""
    cost = roofline_cost + spec.custom_op_s
    return cost if spec.type == "cuda" else cost * INTERPRETER_SLOWDOWN


def epilogue_rows(site):
    """Where the Triton path applies an epilogue in its kernels' store: below DEQUANTIZE_MIN_ROWS (from there cuBLAS
    multiplies and a pass of its own applies it)."""
    return site.dims["M"] < DEQUANTIZE_MIN_ROWS


def uses_triton(site, aten_refusal: str | None, aten_cost, interpreted_cost) -> bool:
    """The path a site takes: Triton on cuda; on cpu ATen's kernel, unless only the interpreter takes the site or
    it is estimated faster there (which tests arrange by shrinking INTERPRETER_SLOWDOWN). Costed with the spec of
    the site's own device: replace() decides it too, and sees no other."""
    if site.device.type != "cpu":
        return True
    if not INTERPRETING:
        return False
    if aten_refusal is not None:
        return True
    spec = devices.detect(site.device)
    return formulas.evaluate(interpreted_cost(site, spec), site.hints) < formulas.evaluate(aten_cost(site, spec), site.hints)
