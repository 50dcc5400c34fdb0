"""Triton matmuls over weight-only quantized linears, shared by `int4_weight_only` and `int8_weight_only`: x in its
own dtype times weights decoded in registers, fp32 accumulation. Up to GEMV_MAX_ROWS rows: a GEMV, one program per
(row, block of output channels), products summed in registers. More rows: a GEMM, its K split over programs where
its tiles alone would leave the GPU latency-bound (gemm_splits; _split_sum adds the splits in order). From
DEQUANTIZE_MIN_ROWS[bits] rows on, the weights are decoded once into x's dtype and cuBLAS multiplies (the decode
pass costs ~3 bytes a weight).

The GEMMs differ by bits: int8's (_mma_gemm) takes W x^T, the weight tile converted in registers as the MMA's first
operand, so channels fill the MMA's 64-row side at any row count (H100, L2-cold: 1.1-1.5x cuBLAS bf16 at 16 rows,
0.8-1.2x at 128, where decode-then-cuBLAS ran 0.4-0.56x); int4's (_gemm) decodes the weight tile to x's dtype for
tl.dot with x as the first operand (the same swap ran it 10-15% slower, int4's decode being the longer).

K is cut into chunks whose weights come as PARTS parts of PART contiguous K values each, meeting PARTS contiguous
runs of x (the GEMV, int4's GEMM and the decode pass):
- int8: [N, K] int8 with one scale per channel; a chunk is 2 * INT8_HALF bytes of a channel, in two parts (the
  channel scale multiplies the accumulator once, at the end);
- int4: a chunk is one quantization group in int4_weight_only's layout: G / 8 int32 words whose nibble i holds the
  group's i-th eighth, decoded with the group's scale and zero.
A step takes several chunks at once: the GEMV so that each thread has a few 16-byte loads in flight (a decode GEMV
is latency-bound otherwise), int4's GEMM so that each tl.dot sums INT4_DOT_K K values.

The int4 GEMV has a kernel of its own (_gemv_int4): a nibble becomes the fp32 128 + q with one shift and one LOP3
(moved under 128.0's exponent, whose ulp is 1/65536), products sum per group unscaled, and each group's scale and
zero apply once per channel: w = s * (128 + q) - (136 s - z). It runs ~5 SASS instructions a weight where the
shared GEMV ran ~10-12 (sm90, counted from the compiled loop).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import codegen
from ..cost import devices, formulas
from .registry import autotuned, needs_dtype, sm_count

INTERPRETING = triton.knobs.runtime.interpret  # kernels run on CPU tensors through Triton's interpreter
INTERPRETER_SLOWDOWN = 1e4  # the cost of an interpreted kernel, relative to its GPU roofline
PTX = not INTERPRETING and torch.version.hip is None  # inline PTX compiles for NVIDIA GPUs only
# The GEMV decodes the weights again for each row: on the H100 it beats the GEMM at 1 and 2 rows, not at 4.
GEMV_MAX_ROWS = 2
# From these rows (by bits) the weights are decoded once for cuBLAS. H100, L2-cold: at 128 rows int4's GEMM ran
# 0.15-0.35x cuBLAS bf16, the decode pass 0.4-0.6x; int8's MMA GEMM and the decode pass tie at 512 rows
# (0.55-0.77x against 0.61-0.68x), at 1024 the decode pass leads (0.75-0.78x against 0.56-0.73x).
DEQUANTIZE_MIN_ROWS = {4: 64, 8: 512}
GROUP_SIZES = (32, 64, 128)  # int4 groups: chunks of 16..64 bytes a channel
INT4_PARTS = 8  # nibbles of an int32 word: a group's eighths
INT8_HALF = 64  # int8 chunks of 128 bytes a channel, in two parts
INT8_GEMM_K = tl.constexpr(128)  # K values of a step of int8's GEMM (_mma_gemm): a 128-byte line of each channel
# int4, by a group's eighth (PART words). H100, M=16, g64: dots of 16 K values ran 1.03-1.16x the byte layout's GEMM
# time, of 32 1.4x, of 64 1.8x (the decoded eighths of a longer step spill). g32's eighths of 4 words need dots of 64:
# at 16 or 32, Triton's sm90 pipeliner rejects the word tile's shared layout at BLOCK_N >= 128 (Triton 3.6 and 3.7)
INT4_DOT_K = {4: 64, 8: 16, 16: 16}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _small_int_to_float(v, OFFSET: tl.constexpr):
    """Integers v + OFFSET in [0, 2^23) to fp32 without a conversion instruction (a few a clock on an SM): 2^23 + u
    holds u in its mantissa, so OR-ing u into 2^23's bits and subtracting 2^23 is exact."""
    u = (v.to(tl.int32) + OFFSET) | 0x4B000000
    return u.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _code(w, i: tl.constexpr, s, z):
    """Nibble i of words w as a weight: code * s + z (z: code 0's value)."""
    return _small_int_to_float((w >> (4 * i)) & 15, 0) * s + z


@triton.jit
def _weight_parts(W, S, Z, n, chunk, j, N, K, stride_wn, stride_sn, BITS: tl.constexpr, PART: tl.constexpr):
    """The chunk's weights of channels n as a tuple of parts, part p at K values (chunk * PARTS + p) * PART + j
    (n, chunk and j broadcast together, j in [0, PART)), as fp32: int4 decoded with the group's scale and zero,
    int8 unscaled."""
    n_ok = n < N
    if BITS == 4:
        ok = n_ok & (chunk < tl.cdiv(K, 8 * PART))
        w = tl.load(W + n * stride_wn + chunk * PART + j, mask=ok, other=0)  # the group's words j
        s = tl.load(S + n * stride_sn + chunk, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Z + n * stride_sn + chunk, mask=ok, other=0.0).to(tl.float32) - 8.0 * s  # code 0's value
        return (_code(w, 0, s, z), _code(w, 1, s, z), _code(w, 2, s, z), _code(w, 3, s, z),
                _code(w, 4, s, z), _code(w, 5, s, z), _code(w, 6, s, z), _code(w, 7, s, z))
    else:  # compiled Triton needs one return per static branch
        k = chunk * 2 * PART + j
        ptrs = W + n * stride_wn + k
        first = tl.load(ptrs, mask=n_ok & (k < K), other=0)
        second = tl.load(ptrs + PART, mask=n_ok & (k + PART < K), other=0)
        return _small_int_to_float(first, 128), _small_int_to_float(second, 128)


@triton.jit
def _x_part(X, m, chunk, j, p, M, K, stride_xm, stride_xk, PARTS: tl.constexpr, PART: tl.constexpr):
    """Rows m of x at the chunks' part p, in x's dtype (zero beyond M and K: int4's padding meets zeros)."""
    k = (chunk * PARTS + p) * PART + j
    return tl.load(X + m * stride_xm + k * stride_xk, mask=(m < M) & (k < K), other=0.0)


@triton.jit
def _normed(x, sq, G, k, K, NORM: tl.constexpr):
    """A folded RMSNorm's input side: x (fp32, at K positions k) times the norm's weight there, and the running
    squares of x (before the weight). Its 1 / rms multiplies the output rows (_rms)."""
    if NORM:
        sq += x * x
        x = x * tl.load(G + k, mask=k < K, other=0.0).to(tl.float32)
    return x, sq


@triton.jit
def _rms(sq_rows, inv_k, eps, NORM: tl.constexpr):
    """1 / sqrt(mean square + eps) of rows whose squares sum to sq_rows (1 without a norm)."""
    return tl.rsqrt(sq_rows * inv_k + eps) if NORM else 1.0


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
def _int8_step(acc, sq, wa, wb, X, G, m, chunk, h, M, K, stride_xm, stride_xk, NORM: tl.constexpr, PART: tl.constexpr):
    """acc and sq after one step of _gemv over its decoded weight parts (_weight_parts) and x."""
    xa, sq = _normed(_x_part(X, m, chunk, h, 0, M, K, stride_xm, stride_xk, 2, PART).to(tl.float32), sq, G,
                     chunk * 2 * PART + h, K, NORM)
    xb, sq = _normed(_x_part(X, m, chunk, h, 1, M, K, stride_xm, stride_xk, 2, PART).to(tl.float32), sq, G,
                     (chunk * 2 + 1) * PART + h, K, NORM)
    return acc + wa * xa + wb * xb, sq


@triton.jit
def _gemv(X, W, S, Z, B, Out, E, G, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_em, inv_k,
          eps, BITS: tl.constexpr, PART: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
          NORM: tl.constexpr, PDL: tl.constexpr, STEP_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    """int8: row m (program axis 0, the fastest: the rows of one channel block run together and share its weights
    in L2) times BLOCK_N channels, STEP_BYTES of each channel a step. Products accumulate element by element and
    are summed over K once, at the end. The first step is peeled: its weights load before the wait for x."""
    CHUNKS: tl.constexpr = STEP_BYTES // (2 * PART)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n, h = offs_n[:, None, None], tl.arange(0, PART)[None, None, :]
    chunk = tl.arange(0, CHUNKS)[None, :, None]
    wa, wb = _weight_parts(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS, PART)
    _wait_for_inputs(PDL)
    acc, sq = _int8_step(tl.zeros([BLOCK_N, CHUNKS, PART], tl.float32), tl.zeros([1, CHUNKS, PART], tl.float32), wa,
                         wb, X, G, m, chunk, h, M, K, stride_xm, stride_xk, NORM, PART)
    for step in range(1, tl.cdiv(K, 2 * PART * CHUNKS)):
        chunk = step * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
        wa, wb = _weight_parts(W, S, Z, n, chunk, h, N, K, stride_wn, stride_sn, BITS, PART)
        acc, sq = _int8_step(acc, sq, wa, wb, X, G, m, chunk, h, M, K, stride_xm, stride_xk, NORM, PART)
    out = tl.sum(tl.sum(acc, 2), 1)[None, :] * _rms(tl.sum(sq), inv_k, eps, NORM)
    _store(out, S, B, Out, E, m + tl.zeros([1], tl.int32), offs_n, M, N, stride_om, stride_em, BITS, HAS_BIAS, EPILOGUE)


# One shift and one LOP3 a nibble: nibble i of $8 moved to bits 16..19 and OR-ed under 128.0's exponent. ptxas
# does not merge Triton's separate AND and OR (two immediates) into one LOP3; this keeps the decode at two int ops.
_DECODE_ASM = tl.constexpr("{ .reg .b32 t; " + " ".join(
    f"{shift} lop3.b32 ${i}, t, 0xF0000, 0x43000000, 0xEA;" for i, shift in enumerate(
        ["shl.b32 t, $8, 16;", "shl.b32 t, $8, 12;", "shl.b32 t, $8, 8;", "shl.b32 t, $8, 4;", "mov.b32 t, $8;",
         "shr.u32 t, $8, 4;", "shr.u32 t, $8, 8;", "shr.u32 t, $8, 12;"])) + " }")


@triton.jit
def _plus_128(t, ASM: tl.constexpr):
    """Bits 16..19 of t under 128.0's exponent: 128 + that nibble, in fp32 (the inline PTX has already done this)."""
    return (t if ASM else (t & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _nibbles_plus_128(w, ASM: tl.constexpr):
    """The 8 nibbles of int32 words w as fp32 128 + q (nibble i: bits 4i..4i+3). ASM: inline PTX (NVIDIA); else
    the same bits from Triton ops (the interpreter, ROCm)."""
    if ASM:
        v = tl.inline_asm_elementwise(_DECODE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.int32,) * 8,
                                      is_pure=True, pack=1)
    else:
        v = (w << 16, w << 12, w << 8, w << 4, w, w >> 4, w >> 8, w >> 12)
    return (_plus_128(v[0], ASM), _plus_128(v[1], ASM), _plus_128(v[2], ASM), _plus_128(v[3], ASM),
            _plus_128(v[4], ASM), _plus_128(v[5], ASM), _plus_128(v[6], ASM), _plus_128(v[7], ASM))


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch (launch_pdl), let the next kernel start and wait for the previous one's
    results: what comes before this call (constant weights) overlaps the previous kernel's tail, what comes after
    (x, epilogue operands, stores) sees its writes. A no-op in a plain launch."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _int4_step_inputs(W, S, Z, w_ptrs, s_off, g, step, n_groups, GROUPS: tl.constexpr, PART: tl.constexpr):
    """A step's weight words [GROUPS, BLOCK_N, PART] and group scales and zeros [GROUPS, BLOCK_N] (fp32)."""
    ok = step * GROUPS + g < n_groups
    words = tl.load(w_ptrs + step * GROUPS * PART, mask=ok[:, None, None], other=0)
    s = tl.load(S + s_off + step * GROUPS, mask=ok[:, None], other=0.0).to(tl.float32)
    z = tl.load(Z + s_off + step * GROUPS, mask=ok[:, None], other=0.0).to(tl.float32)
    return words, s, z


@triton.jit
def _int4_step(acc, sq, words, s, z, x_ptrs, G, k_in_step, g, step, n_groups, K, stride_xk, NORM: tl.constexpr,
               ASM: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, PART: tl.constexpr):
    """acc and sq after one step of _gemv_int4 over its weights (_int4_step_inputs) and x."""
    ok = step * GROUPS + g < n_groups
    v = _nibbles_plus_128(words, ASM)
    d = tl.zeros([GROUPS, BLOCK_N, PART], tl.float32)
    xs = tl.zeros([GROUPS, PART], tl.float32)
    xq = tl.zeros([GROUPS, PART], tl.float32)  # a step's squares, summed like xs (a carried tile forces layouts)
    for i in tl.static_range(8):
        x = tl.load(x_ptrs + (step * GROUPS * 8 + i) * PART * stride_xk, mask=ok[:, None], other=0.0)
        x, xq = _normed(x.to(tl.float32), xq, G, k_in_step + (step * GROUPS * 8 + i) * PART, K, NORM)
        d += v[i] * x[:, None, :]
        xs += x
    return acc + s * tl.sum(d, 2) - (136.0 * s - z) * tl.sum(xs, 1)[:, None], sq + tl.sum(xq, 1)


@triton.jit
def _gemv_int4(X, W, S, Z, B, Out, E, G, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_em,
               inv_k, eps, PART: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, NORM: tl.constexpr,
               ASM: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, STEP_BYTES: tl.constexpr):
    """int4, K a multiple of the group (8 * PART): row m (program axis 0) times BLOCK_N channels, STEP_BYTES of each
    a step. Each group's products sum unscaled over 128 + q; then w = s * (128 + q) - (136 s - z) applies once per
    (channel, group). Channels past N read channel N - 1 (no masks in the loop) and are not stored. The first step's
    weights load before the wait for x (_wait_for_inputs), and each step's arithmetic runs on weights loaded a step
    earlier, the next step's loads in flight meanwhile (H100, L2-cold, M = 1: the best config ran 1.5-9.5% faster
    than with each step waiting on its own loads; 14336 x 4096 18.1 -> 17.3 us, 8192 x 2048 8.0 -> 7.2). Tiles are [GROUPS, BLOCK_N, PART]: Triton spreads
    threads over the groups, so a thread holds several channels at the same K and converts each x value once for
    them (ordered [BLOCK_N, GROUPS, PART], threads spread over channels: 25-50% more sm90 instructions a weight)."""
    GROUPS: tl.constexpr = STEP_BYTES // (4 * PART)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(offs_n, N - 1)
    g, j = tl.arange(0, GROUPS), tl.arange(0, PART)
    w_ptrs = W + g[:, None, None] * PART + n[None, :, None] * stride_wn + j[None, None, :]
    k_in_step = g[:, None] * 8 * PART + j[None, :]
    x_ptrs = X + m * stride_xm + k_in_step * stride_xk
    s_off = g[:, None] + n[None, :] * stride_sn
    n_groups = K // (8 * PART)
    words, s, z = _int4_step_inputs(W, S, Z, w_ptrs, s_off, g, 0, n_groups, GROUPS, PART)
    _wait_for_inputs(PDL)
    acc, sq = tl.zeros([GROUPS, BLOCK_N], tl.float32), tl.zeros([GROUPS], tl.float32)
    for step in range(0, tl.cdiv(n_groups, GROUPS)):
        next_words, next_s, next_z = _int4_step_inputs(W, S, Z, w_ptrs, s_off, g, step + 1, n_groups, GROUPS, PART)
        acc, sq = _int4_step(acc, sq, words, s, z, x_ptrs, G, k_in_step, g, step, n_groups, K, stride_xk, NORM, ASM,
                             BLOCK_N, GROUPS, PART)
        words, s, z = next_words, next_s, next_z
    out = tl.sum(acc, 0)[None, :] * _rms(tl.sum(sq), inv_k, eps, NORM)
    _store(out, S, B, Out, E, m + tl.zeros([1], tl.int32), offs_n, M, N, stride_om, stride_em, 4, HAS_BIAS, EPILOGUE)


@triton.jit
def _dot_chunks(acc, x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """acc + x @ w^T over chunks laid side by side: x [BLOCK_M, CHUNKS, PART], w [BLOCK_N, CHUNKS, PART]."""
    x2 = tl.reshape(x, [BLOCK_M, WIDTH])
    return tl.dot(x2, tl.trans(tl.reshape(w.to(x.dtype), [BLOCK_N, WIDTH])), acc)


@triton.jit
def _gemm(X, W, S, Z, B, Out, E, G, Part, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om, stride_em,
          inv_k, eps, steps_per_split, M_BUCKET, PART: tl.constexpr, HAS_BIAS: tl.constexpr,
          EPILOGUE: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr, CHUNKS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int4. Row blocks on program axis 0 (the fastest): the row blocks of one channel block share its weights in
    L2. A step's chunks lie side by side along each part's dot K, in the same order for x and the weights. fp32 x
    multiplies as TF32 on the GPU, far below int4 rounding. SPLIT: program axis 2 takes steps_per_split steps
    of K and writes its fp32 sums (and with NORM its rows' squares, from channel block 0) to Part for _split_sum."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m, n, j = offs_m[:, None, None], offs_n[:, None, None], tl.arange(0, PART)[None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sq = tl.zeros([BLOCK_M, CHUNKS, PART], tl.float32)
    first = tl.program_id(2) * steps_per_split
    for step in range(first, tl.minimum(first + steps_per_split, tl.cdiv(K, 8 * PART * CHUNKS))):
        chunk = step * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
        w = _weight_parts(W, S, Z, n, chunk, j, N, K, stride_wn, stride_sn, 4, PART)
        for p in tl.static_range(8):
            x = _x_part(X, m, chunk, j, p, M, K, stride_xm, stride_xk, 8, PART)
            if NORM:  # the weight-scaled x rounds to x's dtype for the dot, as the norm's output does
                xn, sq = _normed(x.to(tl.float32), sq, G, (chunk * 8 + p) * PART + j, K, NORM)
                x = xn.to(x.dtype)
            acc = _dot_chunks(acc, x, w[p], BLOCK_M, BLOCK_N, CHUNKS * PART)
    _finish(acc, tl.sum(tl.sum(sq, 2), 1), S, B, Out, E, Part, offs_m, offs_n, M, N, stride_om, stride_em, inv_k, eps,
            4, HAS_BIAS, EPILOGUE, NORM, SPLIT)


@triton.jit
def _finish(acc, sq_rows, S, B, Out, E, Part, offs_m, offs_n, M, N, stride_om, stride_em, inv_k, eps, BITS: tl.constexpr,
            HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, NORM: tl.constexpr, SPLIT: tl.constexpr):
    """A GEMM program's sums acc [BLOCK_M, BLOCK_N] and its rows' squares: SPLIT, its split's fp32 sums (and, from
    channel block 0, the squares) to Part for _split_sum; else through _store."""
    if SPLIT:
        row = N + (1 if NORM else 0)
        part = Part + tl.program_id(2) * M * row
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(part + offs_m[:, None] * row + offs_n[None, :], acc, mask=ok)
        if NORM:
            tl.store(part + offs_m * row + N, sq_rows, mask=(offs_m < M) & (tl.program_id(1) == 0))
    else:
        if NORM:
            acc = acc * _rms(sq_rows, inv_k, eps, NORM)[:, None]
        _store(acc, S, B, Out, E, offs_m, offs_n, M, N, stride_om, stride_em, BITS, HAS_BIAS, EPILOGUE)


@triton.jit
def _mma_gemm(X, W, S, Z, B, Out, E, G, Part, M, N, K, stride_xm, stride_xk, stride_wn, stride_sn, stride_om,
              stride_em, inv_k, eps, steps_per_split, M_BUCKET, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
              NORM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              STAGES: tl.constexpr):
    """int8 as W x^T: the weight tile [BLOCK_N, INT8_GEMM_K], converted to x's dtype in registers, is the MMA's first
    operand (sm90's wgmma reads that one from registers; the second comes through shared memory), x^T [INT8_GEMM_K,
    BLOCK_M] its second, so that channels fill the MMA's 64-row side however few the rows (int8 values are exact in
    bf16, fp16 and TF32). Program axes as _gemm's; channels and rows past N and M read the last one and are not
    stored (the loop masks only K)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, INT8_GEMM_K)
    w_ptrs = W + tl.minimum(offs_n, N - 1)[:, None] * stride_wn + k[None, :]
    x_ptrs = X + tl.minimum(offs_m, M - 1)[None, :] * stride_xm + k[:, None] * stride_xk
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    sq = tl.zeros([BLOCK_M], tl.float32)
    first = tl.program_id(2) * steps_per_split
    for step in tl.range(first, tl.minimum(first + steps_per_split, tl.cdiv(K, INT8_GEMM_K)), num_stages=STAGES):
        k_ok = step * INT8_GEMM_K + k < K
        w = tl.load(w_ptrs + step * INT8_GEMM_K, mask=k_ok[None, :], other=0)
        x = tl.load(x_ptrs + step * INT8_GEMM_K * stride_xk, mask=k_ok[:, None], other=0.0)
        if NORM:  # the weight-scaled x rounds to x's dtype for the dot, as the norm's output does
            xn, squares = _normed(x.to(tl.float32), tl.zeros_like(sq)[None, :], G, step * INT8_GEMM_K + k[:, None], K,
                                  NORM)
            x, sq = xn.to(x.dtype), sq + tl.sum(squares, 0)  # summed each step: a [K, BLOCK_M] tile spills
        acc = tl.dot(w.to(x.dtype), x, acc)
    _finish(tl.trans(acc), sq, S, B, Out, E, Part, offs_m, offs_n, M, N, stride_om, stride_em, inv_k, eps, 8,
            HAS_BIAS, EPILOGUE, NORM, SPLIT)


@triton.jit
def _split_sum(Part, S, B, Out, E, M, N, splits, stride_om, stride_em, inv_k, eps, BITS: tl.constexpr,
               HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """A split GEMM's output: its K splits' sums (and squares) added in split order, then stored as _gemm would."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sq = tl.zeros([BLOCK_M], tl.float32)
    row = N + (1 if NORM else 0)
    for z in range(splits):
        part = Part + (z * M + offs_m) * row
        acc += tl.load(part[:, None] + offs_n[None, :], mask=ok, other=0.0)
        if NORM:
            sq += tl.load(part + N, mask=offs_m < M, other=0.0)
    if NORM:
        acc = acc * _rms(sq, inv_k, eps, NORM)[:, None]
    _store(acc, S, B, Out, E, offs_m, offs_n, M, N, stride_om, stride_em, BITS, HAS_BIAS, EPILOGUE)


@triton.jit
def _in_k_order(w, BITS: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """_weight_parts' parts [BLOCK_N, CHUNKS, PART] as one [BLOCK_N, WIDTH] tile in K order. Stored from this layout,
    each thread writes 16 contiguous bytes beside its neighbours': stores of the parts one by one write half
    sectors, which took 2.5x as long on the H100 (bound by L2 write requests)."""
    if BITS == 4:  # joined pairs nest as (p, p + 4), (p, p + 2), (p, p + 1): index 4u + 2v + w' holds part 4u + 2v + w'
        t = tl.join(tl.join(tl.join(w[0], w[4]), tl.join(w[2], w[6])), tl.join(tl.join(w[1], w[5]), tl.join(w[3], w[7])))
        t = tl.reshape(t, [BLOCK_N, WIDTH // (8 * w[0].shape[2]), w[0].shape[2], 8])
    else:
        t = tl.join(w[0], w[1])
    return tl.reshape(tl.permute(t, (0, 1, 3, 2)), [BLOCK_N, WIDTH])


@triton.jit
def _dequantize(W, S, Z, Out, N, K, stride_wn, stride_sn, stride_on,
                BITS: tl.constexpr, PART: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weights of BLOCK_N channels times CHUNKS chunks, decoded (and scaled) into Out [N, K] in its dtype."""
    WIDTH: tl.constexpr = CHUNKS * PART * (8 if BITS == 4 else 2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_n[:, None, None]
    chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)[None, :, None]
    w = _in_k_order(_weight_parts(W, S, Z, n, chunk, tl.arange(0, PART)[None, None, :], N, K, stride_wn, stride_sn,
                                  BITS, PART), BITS, BLOCK_N, WIDTH)
    if BITS == 8:
        w = w * tl.load(S + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    k = tl.program_id(1) * WIDTH + tl.arange(0, WIDTH)
    tl.store(Out + offs_n[:, None] * stride_on + k[None, :], w.to(Out.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (k < K)[None, :])


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
    N, (parts, part) = weight.shape[0], _parts(bits, group_size)
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    block_n, chunks = (64, 1) if INTERPRETING else (16, max(1, 256 // (parts * part)))  # ~256 values of a channel a program
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, parts * part * chunks))
    _dequantize[grid](weight, scales, scales if zeros is None else zeros, out, N, K, weight.stride(0),
                      scales.stride(0), out.stride(0), BITS=bits, PART=part, CHUNKS=chunks, BLOCK_N=block_n)
    return out


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, G] group scales or zeros with zero columns appended to a row length of a multiple of 16: 32-byte aligned
    rows, which Triton 3.6's sm90 GEMM needs at group 32 (unaligned ones failed its dot-operand pass: H100, K=2000).
    The kernels read G columns, as K gives them."""
    return F.pad(t, (0, -t.shape[1] % 16))


def gemm_chunks(part: int) -> int:
    """Chunks (groups) a step of int4's GEMM takes: one tl.dot of INT4_DOT_K[part] K values per eighth."""
    return max(1, INT4_DOT_K[part] // part)


def _parts(bits: int, group_size: int) -> tuple[int, int]:
    """(PARTS, PART) of a chunk: int4's group in eighths (the nibbles of a word), int8's 128 bytes in halves."""
    return (INT4_PARTS, group_size // INT4_PARTS) if bits == 4 else (2, INT8_HALF)


def _prune_gemv(configs, named_args, **kwargs):
    """Accumulators of 1 to 64 fp32 registers a thread (fewer elements than threads would replicate work), blocks
    no wider than N, and at most 65535 of them (the grid's second axis)."""
    N, part = named_args["N"], kwargs["PART"]
    regs = lambda c: c.kwargs["BLOCK_N"] * c.kwargs["STEP_BYTES"] / (32 * c.num_warps)
    keep = [c for c in configs if 1 <= regs(c) <= 64 and c.kwargs["STEP_BYTES"] >= 2 * part
            and c.kwargs["BLOCK_N"] <= max(4, triton.next_power_of_2(N)) and triton.cdiv(N, c.kwargs["BLOCK_N"]) <= 65535]
    return keep or configs[-1:]


def _prune_gemv_int4(configs, named_args, **kwargs):
    """Steps no longer than a channel's whole K (the rest would be masked work), and blocks no wider than N."""
    channel_bytes, N = named_args["K"] // 2, named_args["N"]
    keep = [c for c in configs if c.kwargs["STEP_BYTES"] <= max(4 * kwargs["PART"], triton.next_power_of_2(channel_bytes))
            and c.kwargs["BLOCK_N"] <= max(2, triton.next_power_of_2(N)) and triton.cdiv(N, c.kwargs["BLOCK_N"]) <= 65535]
    return keep or configs[:1]


def _prune_gemm(configs, named_args, **kwargs):
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["M_BUCKET"])]
    return keep or configs[:1]


_KEY = ["N", "K", "BITS", "PART", "HAS_BIAS"]
# GEMV: small blocks of few warps, many programs in flight (a decode matrix is a few MB); long steps keep several
# 16-byte loads a thread in flight. The H100's best at M=1 (sweep over 96 configs, 6 shapes): int8 2 or 4 channels
# of 512-1024 bytes a step. 2048-byte steps (as int4's) added since, for the 2048-wide shapes: at K x N 8192 x 2048
# the best config ran 0.46 of copy bandwidth, its 1024 programs too few to keep enough bytes in flight. 4 channels
# of 1024 bytes on 4 warps, added last, led at four of the five bench shapes in a later sweep (H100, L2-cold):
# K x N 4096 x 14336 23.4 us (0.84 of 3.0 TB/s), 14336 x 4096 24.8 (0.79), where the tuner had picked 25.1 and 27.1.
# One channel of 1024 bytes on one warp (and of 2048 on two), added after a sweep of 80 configs (H100, 2026-12-07,
# scratch tile_ab): 23.2 us at 14336 x 4096 (0.84 of copy) where the list's best took 24.9; no better elsewhere.
_gemv_tuned = autotuned(_gemv, [triton.Config({"BLOCK_N": n, "STEP_BYTES": b}, num_warps=w) for n, w, b in
                                [(2, 1, 512), (2, 1, 1024), (2, 2, 1024), (4, 1, 256), (4, 2, 256), (4, 4, 512),
                                 (8, 1, 256), (8, 4, 1024), (16, 2, 256), (16, 4, 256), (32, 4, 256), (64, 8, 256),
                                 (2, 2, 2048), (4, 4, 2048), (4, 4, 1024), (1, 1, 1024), (1, 2, 2048)]],
                        _KEY, _prune_gemv)
# int4 GEMV: the H100's ten best at M=1 over 34 configs and 8 shapes (g64, 2048..14336 wide): 2-16 channels, 16-32
# groups (512-1024 bytes of a channel) a step; longer steps won everywhere (more bytes in flight). Steps are given
# in bytes of a channel so that other group sizes keep them.
# The three 2048-byte steps, added after the sweep (they apply from K = 4096), ran fastest at 5632 x 2048 since.
# Software-pipelined loops (tl.range num_stages: cp.async steps ahead into shared memory) ran slower L2-cold at every
# shape timed on the H100. Loading x a step ahead too (beside the weights) ran 3.5% faster at 14336 x 4096 only.
_gemv_int4_tuned = autotuned(_gemv_int4, [triton.Config({"BLOCK_N": n, "STEP_BYTES": b}, num_warps=w) for n, b, w in
                                          [(8, 1024, 4), (4, 1024, 4), (4, 1024, 2), (8, 1024, 2), (16, 1024, 4),
                                           (4, 1024, 1), (8, 512, 4), (8, 512, 2), (2, 1024, 4), (4, 512, 1),
                                           (8, 2048, 4), (4, 2048, 4), (16, 2048, 8)]],
                             ["N", "K", "PART", "HAS_BIAS"], _prune_gemv_int4)
# Few rows, few channels: at M = 16 and N = 2048 the 32- and 64-wide blocks fill 64 and 32 of the H100's 132 SMs
# (0.31x cuBLAS bf16 at 8192x2048); 16-wide blocks of one or two warps fill 128.
_gemm_tuned = autotuned(_gemm, [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                for m, n, w, s in [(16, 16, 1, 4), (16, 16, 2, 4), (16, 32, 2, 4),
                                                   (16, 32, 4, 4), (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
                                                   (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]],
                        ["N", "K", "PART", "HAS_BIAS", "M_BUCKET", "steps_per_split"], _prune_gemm)
# int8's GEMM: 64 or 128 channels (the MMA's rows) by 16..128 rows. Picked from a first H100 sweep (5 shapes, K x N
# 2048..14336; fixed K steps of 128 and 64): 64 x 16 at 16 rows, 64 x 64..128 and 128 x 128 at 128 (128 x 256 led
# only at 4096 rows, where decode-then-cuBLAS runs instead).
_mma_gemm_tuned = autotuned(_mma_gemm, [triton.Config({"BLOCK_N": n, "BLOCK_M": m, "STAGES": st}, num_warps=w)
                                        for n, m, w, st in [(64, 16, 4, 4), (128, 16, 4, 4), (64, 32, 4, 4),
                                                            (64, 64, 4, 5), (64, 128, 4, 4), (128, 64, 4, 4),
                                                            (128, 128, 8, 3)]],
                            ["N", "K", "HAS_BIAS", "M_BUCKET", "steps_per_split"], _prune_gemm)


@functools.cache
def programmatic_launch(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol, sm90 on): a kernel starts during the previous one's tail."""
    return PTX and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32, then in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, bits: int, group_size: int, epilogue: str = "",
                       operand: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias), then the epilogue (codegen.epilogue's spec, reading operand), in out_dtype (x's by
    default). bits=8: weight [N, K] int8, W = weight * scales[:, None]. bits=4: weight [N, Kp / 8] int32 in
    int4_weight_only's layout, scales and zeros [N, Kp / group_size] through aligned_rows, W = (q - 8) * scale + zero
    in each group. The GEMV runs for at most GEMV_MAX_ROWS rows, the GEMM above, cuBLAS on the decoded weights from
    DEQUANTIZE_MIN_ROWS rows (and the epilogue in a pass of its own there). With norm_weight [K], x is first
    RMS-normalized: rms_norm(x, norm_weight, norm_eps); the GEMV and GEMM fold it in (x times the weight in the K
    loop, the sum of squares beside it, 1 / rms on the output rows), the cuBLAS path computes it in a pass of its
    own."""
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
    if M >= DEQUANTIZE_MIN_ROWS[bits]:
        x2 = x2 if norm_weight is None else rms_norm(x2, norm_weight, norm_eps)
        y = F.linear(x2, dequantize(weight, scales, zeros, bits, group_size, K, x.dtype), bias)
        if not epilogue and y.dtype == out.dtype:
            return y.reshape(shape)
        _epilogue_pass[(triton.cdiv(M, 32), triton.cdiv(N, 64))](y, out, e, M, N, y.stride(0), out.stride(0), stride_em,
                                                                EPILOGUE=store, BLOCK_M=32, BLOCK_N=64)
        return out.reshape(shape)
    if M and N:
        parts, part = _parts(bits, group_size)
        norm, inv_k = (out if norm_weight is None else norm_weight), 1.0 / K
        if bits == 4 and M <= GEMV_MAX_ROWS and K % group_size:  # the GEMV reads whole groups
            x2, norm = F.pad(x2, (0, -K % group_size)), norm if norm_weight is None else F.pad(norm, (0, -K % group_size))
            K = K - K % group_size + group_size
        args = (x2, weight, scales, scales if zeros is None else zeros, out if bias is None else bias, out, e, norm, M, N,
                K, *x2.stride(), weight.stride(0), scales.stride(0), out.stride(0), stride_em, inv_k, norm_eps)
        flags = {"PART": part, "HAS_BIAS": bias is not None, "EPILOGUE": store, "NORM": norm_weight is not None}
        gemv_grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))
        pdl = {"PDL": True, "launch_pdl": True} if programmatic_launch(x.device) else {"PDL": False}
        if M <= GEMV_MAX_ROWS and bits == 4:
            block = {"BLOCK_N": 16, "STEP_BYTES": 4 * part} if INTERPRETING else {}
            _gemv_int4_tuned[gemv_grid](*args, **flags, ASM=PTX, **pdl, **block)
        elif M <= GEMV_MAX_ROWS:
            block = {"BLOCK_N": 64, "STEP_BYTES": 256} if INTERPRETING else {}
            _gemv_tuned[gemv_grid](*args, BITS=bits, **flags, **pdl, **block)
        else:
            _split_gemm(args, bits, flags, x.device)
    return out.reshape(shape)


def gemm_steps(K: int, bits: int, part: int) -> int:
    """Steps of the GEMM's K loop."""
    return triton.cdiv(K, 8 * part * gemm_chunks(part) if bits == 4 else INT8_GEMM_K.value)


def gemm_splits(M: int, N: int, K: int, bits: int, part: int, sms: int) -> tuple[int, int]:
    """(K splits, steps a split) for the GEMM.
    int4: a program's step is ~1 KB of weights, so where the tiles (counted at 16 x 32) do not fill the GPU twice,
    K is split until ~8 programs an SM hide DRAM latency; the splits' fp32 sums move at most 1/4 of the weights'
    bytes. H100, M = 4/16, L2-cold: K x N = 8192 x 2048 42.6/47.0 -> 19.7/21.1 us; 14336 x 4096 M = 16 111.7 ->
    53.0; at 4096 x 14336 (448 tiles) three splits ran 5-12% faster.
    int8 (_mma_gemm): where its tiles (counted at 128 rows x 64 channels) fill less than half the SMs, K is split
    toward two programs an SM, a split at least 8 steps. H100, L2-cold, the best of 1/2/4/8 splits at 16 and 128
    rows: 4 or 8 at 32-64 tiles (8192 x 2048 M = 128: 32.1 -> 18.7 us with 8), 1 at 128-224."""
    steps = gemm_steps(K, bits, part)
    if bits == 8:
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 64)
        splits = 1 if 2 * tiles > sms else max(1, min(triton.cdiv(2 * sms, tiles), steps // 8))
        per_split = triton.cdiv(steps, splits)
        return triton.cdiv(steps, per_split), per_split
    tiles = triton.cdiv(M, 16) * triton.cdiv(N, 32)
    if tiles >= 2 * sms:
        return 1, steps
    splits = max(1, min(steps, triton.cdiv(8 * sms, tiles), K // (64 * triton.next_power_of_2(M))))
    per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, per_split), per_split


def _split_gemm(args, bits, flags, device):
    """The GEMM, its K split over program axis 2 where gemm_splits says so (then _split_sum adds the splits)."""
    x2, weight, scales, zeros, bias, out, e, norm, M, N, K, *strides, stride_om, stride_em, inv_k, eps = args
    splits, per_split = gemm_splits(M, N, K, bits, flags["PART"], sm_count(device))
    sums = torch.empty(splits, M, N + flags["NORM"], dtype=torch.float32, device=device) if splits > 1 else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), splits)
    common = (*args[:8], sums, *args[8:], per_split, min(triton.next_power_of_2(M), 4096))
    if bits == 4:
        block = {"BLOCK_M": 32, "BLOCK_N": 64} if INTERPRETING else {}
        _gemm_tuned[grid](*common, **flags, SPLIT=splits > 1, CHUNKS=gemm_chunks(flags["PART"]), **block)
    else:
        block = {"BLOCK_M": 32, "BLOCK_N": 64, "STAGES": 1} if INTERPRETING else {}
        _mma_gemm_tuned[grid](*common, **{k: v for k, v in flags.items() if k != "PART"}, SPLIT=splits > 1, **block)
    if splits > 1:
        _split_sum[(triton.cdiv(M, 16), triton.cdiv(N, 64))](
            sums, scales, bias, out, e, M, N, splits, stride_om, stride_em, inv_k, eps, BITS=bits,
            HAS_BIAS=flags["HAS_BIAS"], EPILOGUE=flags["EPILOGUE"], NORM=flags["NORM"], BLOCK_M=16, BLOCK_N=64)


@torch.library.custom_op("torchfx_eff::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, group_size: int, epilogue: str = "",
                   operand: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0) -> torch.Tensor:
    return weight_only_matmul(x, weight, scales, zeros, bias, bits, group_size, epilogue, operand, out_dtype,
                              norm_weight, norm_eps)


@weight_only_mm.register_fake
def _(x, weight, scales, zeros, bias, bits, group_size, epilogue="", operand=None, out_dtype=None, norm_weight=None,
      norm_eps=0.0):
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


def epilogue_rows(site, bits: int):
    """Where the Triton path applies an epilogue in its kernels' store: below DEQUANTIZE_MIN_ROWS[bits] (from there
    cuBLAS multiplies and a pass of its own applies it)."""
    return site.dims["M"] < DEQUANTIZE_MIN_ROWS[bits]


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
