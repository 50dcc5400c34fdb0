"""Triton matmuls over packed low-bit linear weights, shared by the `ternary`, `sparse24` and `ternary_sparse24`
candidates. One GEMV (few rows: products summed in registers) and one tl.dot GEMM serve every format. Ternary
formats take int8 x and accumulate in int32; 2:4 float values take x in their dtype and accumulate in fp32.
Both kernels walk K in groups of 4 weights and read each stored byte once: the GEMV multiplies a dense ternary
byte's 4 codes with 4 stride-4 slices of x, and a 2:4 group's 2 kept weights with the x entries gathered at
their positions; the GEMM builds, per position j in the group, the tile of weights at j and runs one dot each.

Storage, one row per output channel n of the [N, K] weight, K padded with zeros to a multiple of 8:
- a 2-bit field i of a row sits in byte i // 4 at bits 2 * (i % 4) and up (first field in the low bits);
- ternary: code w + 1 (w in {-1, 0, 1}) as one 2-bit field per weight: [N, K / 4] uint8;
- 2:4: every group of 4 weights along K keeps 2, in slots 2g and 2g + 1 (lower position first): values [N, K / 2]
  (floats, or ternary codes as 2-bit fields [N, K / 8]) and each slot's position 0..3 in its group as 2-bit
  fields [N, K / 8]. The cuSPARSELt path for float 2:4 at many rows lives in sparse24.py.

Measured once on the H100 (bf16, CUDA graphs, kernel alone): the decoding bounds them. Ternary GEMV 11.7 us at
4096^2 (cuBLAS 10.6) and 38 us at 8192^2 (cuBLAS 48); the 2:4 GEMVs ~3x slower than cuBLAS; GEMMs far slower
(M=64, 4096^2: ternary 179 us, 2:4 ~320 us, cuBLAS 9 us). devices._HOPPER_EFFICIENCY carries these figures.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import autotuned, needs_dtype

INTERPRETING = triton.knobs.runtime.interpret  # kernels run on CPU tensors through Triton's interpreter
INTERPRETER_SLOWDOWN = 1e4  # the cost of an interpreted kernel, relative to its GPU roofline
GEMV_MAX_ROWS = 8  # up to this many rows the GEMV (it decodes the weights again for each row), above the GEMM
K_ALIGN = 8  # K is padded to this: whole bytes of 2-bit fields for the kept half of 2:4 groups


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def pack2(fields: torch.Tensor) -> torch.Tensor:
    """[N, L] values in 0..3 (L a multiple of 4) -> [N, L / 4] uint8, 4 fields a byte, first in the low bits."""
    f = fields.to(torch.uint8).reshape(fields.shape[0], -1, 4)
    return (f[..., 0] | f[..., 1] << 2 | f[..., 2] << 4 | f[..., 3] << 6).contiguous()


def unpack2(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack2: [N, L / 4] uint8 -> [N, L] uint8 in 0..3."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 3).reshape(packed.shape[0], -1)


@triton.jit
def _field2(P, stride, field, offs_n, mask):
    """2-bit fields `field` [BLOCK_G] of rows offs_n [BLOCK_N]: an int32 [BLOCK_N, BLOCK_G] tile."""
    byte = tl.load(P + offs_n[:, None] * stride + (field // 4)[None, :], mask=mask, other=0)
    return (byte.to(tl.int32) >> ((field % 4) * 2)[None, :]) & 3


@triton.jit
def _kept24(W, IDX, stride_w, stride_i, offs_n, offs_g, mask, TERNARY: tl.constexpr):
    """The 2:4 unpack: groups offs_g's two kept weights (int8 when TERNARY, else as stored) and their positions
    0..3 in the group, four [BLOCK_N, BLOCK_G] tiles."""
    slot = 2 * offs_g
    if TERNARY:
        v0 = (_field2(W, stride_w, slot, offs_n, mask) - 1).to(tl.int8)
        v1 = (_field2(W, stride_w, slot + 1, offs_n, mask) - 1).to(tl.int8)
    else:
        v0 = tl.load(W + offs_n[:, None] * stride_w + slot[None, :], mask=mask, other=0.0)
        v1 = tl.load(W + offs_n[:, None] * stride_w + slot[None, :] + 1, mask=mask, other=0.0)
    return v0, v1, _field2(IDX, stride_i, slot, offs_n, mask), _field2(IDX, stride_i, slot + 1, offs_n, mask)


@triton.jit
def _ternary(byte, j):
    """Weight j of each byte's group of 4 (2-bit code w + 1)."""
    return ((byte >> (2 * j)) & 3) - 1


@triton.jit
def _store(acc, XS, WS, B, Out, offs_m, offs_n, M, N, stride_om, TERNARY: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] to real units (int8 x ternary: row scale x channel scale), + bias, to Out."""
    m_ok, n_ok = offs_m < M, offs_n < N
    out = acc.to(tl.float32)
    if TERNARY:
        out = out * tl.load(XS + offs_m, mask=m_ok, other=0.0)[:, None] * tl.load(WS + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv(X, XS, W, IDX, WS, B, Out, M, N, K, stride_xm, stride_w, stride_i, stride_om,
          SPARSE: tl.constexpr, TERNARY: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Row m (program axis 0, the fastest: the rows of one channel block run together and share its weights
    in L2) times BLOCK_N channels (axis 1), BLOCK_G groups of 4 weights along K at a time. Weights are read
    once, as stored; 2:4 gathers the x entries at the kept positions, dense ternary takes each byte's 4 codes
    against 4 stride-4 slices of x."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = X + m * stride_xm
    acc = tl.zeros([BLOCK_N], ACC)
    for g0 in range(0, tl.cdiv(K, 4), BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask = (offs_n < N)[:, None] & (4 * offs_g < K)[None, :]
        if SPARSE:
            v0, v1, i0, i1 = _kept24(W, IDX, stride_w, stride_i, offs_n, offs_g, mask, TERNARY)
            k0, k1 = 4 * offs_g[None, :] + i0, 4 * offs_g[None, :] + i1
            x0 = tl.load(x_row + k0, mask=mask & (k0 < K), other=0).to(ACC)
            x1 = tl.load(x_row + k1, mask=mask & (k1 < K), other=0).to(ACC)
            acc += tl.sum(v0.to(ACC) * x0 + v1.to(ACC) * x1, 1)
        else:
            byte = tl.load(W + offs_n[:, None] * stride_w + offs_g[None, :], mask=mask, other=0).to(tl.int32)
            for j in tl.static_range(4):
                xj = tl.load(x_row + 4 * offs_g + j, mask=4 * offs_g + j < K, other=0).to(ACC)
                acc += tl.sum(_ternary(byte, j) * xj[None, :], 1)
    _store(acc[None, :], XS, WS, B, Out, m + tl.zeros([1], tl.int32), offs_n, M, N, stride_om, TERNARY, HAS_BIAS)


@triton.jit
def _gemm(X, XS, W, IDX, WS, B, Out, M, N, K, stride_xm, stride_w, stride_i, stride_om, M_BUCKET,
          SPARSE: tl.constexpr, TERNARY: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """BLOCK_M x BLOCK_N outputs; each step decodes BLOCK_G groups of 4 weights once and runs 4 dots, one per
    position j in the group, against the stride-4 slice of x at that position."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for g0 in range(0, tl.cdiv(K, 4), BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask = (offs_n < N)[:, None] & (4 * offs_g < K)[None, :]
        if SPARSE:
            v0, v1, i0, i1 = _kept24(W, IDX, stride_w, stride_i, offs_n, offs_g, mask, TERNARY)
            zero = tl.zeros_like(v0)
        else:
            byte = tl.load(W + offs_n[:, None] * stride_w + offs_g[None, :], mask=mask, other=0).to(tl.int32)
        for j in tl.static_range(4):
            k = 4 * offs_g + j
            xj = tl.load(X + offs_m[:, None] * stride_xm + k[None, :], mask=(offs_m < M)[:, None] & (k < K)[None, :], other=0)
            if SPARSE:
                wj = tl.trans(tl.where(i0 == j, v0, tl.where(i1 == j, v1, zero)))
            else:
                wj = tl.trans(_ternary(byte, j).to(tl.int8))
            if IEEE:  # fp32 stays fp32 (no TF32)
                acc = tl.dot(xj, wj, acc, input_precision="ieee", out_dtype=ACC)
            else:
                acc = tl.dot(xj, wj, acc, out_dtype=ACC)
    _store(acc, XS, WS, B, Out, offs_m, offs_n, M, N, stride_om, TERNARY, HAS_BIAS)


_KEY = ["N", "K", "SPARSE", "TERNARY"]
_gemv_tuned = autotuned(_gemv, [triton.Config({"BLOCK_N": n, "BLOCK_G": g}, num_warps=w) for n, g, w in
                                [(16, 64, 4), (32, 32, 4), (32, 64, 4), (64, 32, 4), (16, 128, 4), (64, 64, 8)]], _KEY)
_gemm_tuned = autotuned(_gemm, [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_G": g}, num_warps=w, num_stages=s)
                                for m, n, g, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                                      (128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (64, 64, 64, 4, 4)]],
                        _KEY + ["M_BUCKET"])


def packed_mm(x: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, idx: torch.Tensor | None,
              w_scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ dense(w)^T (+ bias) -> [M, N] in out_dtype. int8 x: ternary w (2-bit codes, or the kept half's
    codes when idx is given), out = acc * x_scale[m] * w_scale[n]. Float x: w holds floats, 2:4 values with idx."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"packed_mm takes 2-D x and w, got {x.dim()}-D and {w.dim()}-D")
    ternary = x.dtype == torch.int8
    if ternary and (x_scale is None or w_scale is None):
        raise ValueError("packed_mm: int8 x needs x_scale and w_scale")
    (M, K), N = x.shape, w.shape[0]
    x = x.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    tensors = [t if t is not None else w for t in (x_scale, w, idx, w_scale, bias)]  # unused pointers: any tensor
    args = (x, *tensors[:5], out, M, N, K, x.stride(0), w.stride(0), tensors[2].stride(0), out.stride(0))
    flags = {"SPARSE": idx is not None, "TERNARY": ternary, "HAS_BIAS": bias is not None,
             "ACC": tl.int32 if ternary else tl.float32}
    if M <= GEMV_MAX_ROWS:
        blocks = {"BLOCK_N": 64, "BLOCK_G": 32} if INTERPRETING else {}
        _gemv_tuned[lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))](*args, **flags, **blocks)
    else:
        blocks = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_G": 16} if INTERPRETING else {}
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
        _gemm_tuned[grid](*args, min(triton.next_power_of_2(M), 4096), **flags, IEEE=x.dtype == torch.float32, **blocks)
    return out


@torch.library.custom_op("torchfx_eff::packed_mm", mutates_args=())
def packed_mm_op(x: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, idx: torch.Tensor | None,
                 w_scale: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return packed_mm(x, x_scale, w, idx, w_scale, bias, out_dtype)


@packed_mm_op.register_fake
def _(x, x_scale, w, idx, w_scale, bias, out_dtype):
    return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype)


def triton_applicable(site, dtypes: tuple[torch.dtype, ...], what: str) -> str | None:
    """Device, dtype and weight checks shared by the packed-weight candidates."""
    if site.device.type != "cuda" and not INTERPRETING:
        return (f"needs a cuda tensor (or TRITON_INTERPRET=1): there is no fast CPU kernel for {what}, "
                f"site is on {site.device.type}")
    if not site.weight.is_floating_point():
        return f"weight dtype {site.weight.dtype} is not floating point"
    return needs_dtype(site, dtypes)


def triton_cost(roofline_cost, spec):
    """The kernel's roofline plus the custom op's Python dispatch; off CUDA it runs interpreted, thousands of
    times slower, so the cost model never picks it there on its own."""
    cost = roofline_cost + spec.custom_op_s
    return cost if spec.type == "cuda" else cost * INTERPRETER_SLOWDOWN
