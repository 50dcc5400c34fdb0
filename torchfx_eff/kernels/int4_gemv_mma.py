"""int4 GEMV on tensor cores (Gluon, mma.sync m16n8k16; sm80 on, bf16 or fp16 x, group 64): weight_only_matmul's
path for a few rows where it applies (`applicable`).

The CUDA-core GEMV (_gemv_int4) runs ~4.5 SASS instructions a weight, which bounds it near 0.6 of the H100's copy
bandwidth. Here a warp takes 16-row tiles of channels times one group of K: an int32 word pair becomes 8 registers
of two 16-bit floats 128 + q (fp16: 1024 + q) with one PRMT and one LOP3 each, the MMA's first operand as loaded
(no shared memory), and one MMA sums 256 weights. x fills the MMA's 8 columns (rows past M repeat row M - 1, not
stored); an MMA of ones beside it gives each group's sum of x, so w = s * (128 + q) - (136 s - z) applies once per
(channel, group) in fp32, as in _gemv_int4. Sm90, counted offline: ~2.1-2.3 instructions a weight (~3.0 with a
folded norm).

A program takes 16 * RM channels; its warps take NW * GS consecutive groups at a time (GS a warp, in registers),
each loaded one trip ahead. The words keep int4_weight_only's layout: word j's nibble i is the group's K
i * 8 + j, and the tile's K order is that order (see _decode_tile). A folded RMSNorm (one row) multiplies x by
its weight in the MMA's operand and sums x^2 with one more MMA (x's registers read as a first operand); the
generated epilogues (codegen) run on the output tile.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
import triton.language as tl

from .. import codegen

from .registry import autotuned

GROUP_SIZE = 64
PART = gl.constexpr(GROUP_SIZE // 8)  # words of a channel's group
MAX_ROWS = 8  # the MMA's columns
# Output register c of the decode holds nibble NIBBLES[c] of both words of a pair (PRMT moves byte c % 4 of each to
# bytes 0 and 2; LOP3 keeps a nibble of each under the float's exponent, after a 4-bit shift for the high ones).
NIBBLES = (0, 2, 4, 6, 1, 3, 5, 7)


def _decode_asm(magic: int) -> str:
    body = []
    for c in range(4):
        sel = c | (c << 4) | ((4 + c) << 8) | ((4 + c) << 12)
        body.append(f"prmt.b32 t, $8, $9, {sel:#x}; lop3.b32 ${c}, t, 0x000F000F, {magic:#x}, 0xEA; "
                    f"shr.u32 t, t, 4; lop3.b32 ${4 + c}, t, 0x000F000F, {magic:#x}, 0xEA;")
    return "{ .reg .b32 t; " + " ".join(body) + " }"


_DECODE_BF16 = gl.constexpr(_decode_asm(0x43004300))  # 128.0 in each bf16 half: ulp 1
_DECODE_FP16 = gl.constexpr(_decode_asm(0x64006400))  # 1024.0 in each fp16 half: ulp 1
_DECODE_CONSTRAINTS = gl.constexpr("=r," * 8 + "r,r")  # 8 outputs of two halves; a word pair in


@gluon.constexpr_function
def _word_layout(VK, RM, NW):
    """[VK, 16 * RM, PART] words: registers hold a word pair (j0), row 8, the RM tiles and the groups past the warps;
    lanes the quad's pairs (j1 j2) and rows 1 2 4 (the MMA's first-operand layout, after _decode_tile)."""
    reg = [[0, 0, 1], [0, 8, 0]] + [[0, 16 << i, 0] for i in range(RM.bit_length() - 1)]
    reg += [[NW << i, 0, 0] for i in range((VK // NW).bit_length() - 1)]
    lane = [[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    warp = [[1 << i, 0, 0] for i in range(NW.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [VK, 16 * RM, PART.value])


@gluon.jit
def _decode_tile(words, LA: gl.constexpr, FP16: gl.constexpr):
    """[VK, BN, PART] words -> [VK, BN, 64] 16-bit floats OFFSET + q at the group's K order (k = 8 * nibble + j), in
    the MMA's first-operand layout LA with no data movement."""
    VK: gl.constexpr = words.shape[0]
    BN: gl.constexpr = words.shape[1]
    if FP16:
        o = gl.inline_asm_elementwise(_DECODE_FP16, _DECODE_CONSTRAINTS, [words], dtype=(gl.float16,) * 8,
                                      is_pure=True, pack=2)
    else:
        o = gl.inline_asm_elementwise(_DECODE_BF16, _DECODE_CONSTRAINTS, [words], dtype=(gl.bfloat16,) * 8,
                                      is_pure=True, pack=2)
    # join appends its index last: nibble bits n0, n1, n2 from the innermost join out (NIBBLES: o[c] holds nibble
    # NIBBLES[c])
    t = gl.join(gl.join(gl.join(o[0], o[4]), gl.join(o[1], o[5])), gl.join(gl.join(o[2], o[6]), gl.join(o[3], o[7])))
    t = gl.reshape(t, [VK, BN, 2, 2, 2, 2, 2, 2])  # j2 j1 j0 n0 n1 n2
    t = gl.permute(t, [0, 1, 7, 6, 5, 2, 3, 4])  # n2 n1 n0 j2 j1 j0
    return gl.convert_layout(gl.reshape(t, [VK, BN, 8 * PART]), LA, assert_trivial=True)


@gluon.jit
def _weight_inputs(w_ptrs, s_ptrs, z_ptrs):
    return gl.load(w_ptrs), gl.load(s_ptrs).to(gl.float32), gl.load(z_ptrs).to(gl.float32)


@gluon.jit
def _x_inputs(x_ptrs, g_ptrs, NORM: gl.constexpr):
    """x [VK, 64, 8] as the MMA's second operand; with NORM also the norm weight [VK, 64] at those K (else x)."""
    x = gl.load(x_ptrs)
    return x, gl.load(g_ptrs) if NORM else x


@gluon.jit
def _x_as_rows(x, LA: gl.constexpr):
    """x [VK, 64, 8] (the second operand's registers) as a first operand [VK, 16, 64] whose row r is x's column
    r % 8: the same registers (rows g and g + 8 of the first operand sit where column g of the second does)."""
    VK: gl.constexpr = x.shape[0]
    G: gl.constexpr = x.shape[1]
    t = gl.permute(x, [0, 2, 1])
    t = gl.permute(gl.join(t, t), [0, 3, 1, 2])
    return gl.convert_layout(gl.reshape(t, [VK, 16, G]), LA, assert_trivial=True)


@gluon.jit
def _group_step(acc, sq, words, s, z, x, g, ones, zero, zero_tile, LA: gl.constexpr, L4: gl.constexpr,
                FP16: gl.constexpr, NORM: gl.constexpr):
    """acc [VK, RM, 16, 8] after one group a warp; with NORM, x times the norm weight g, and sq [VK, 16, 8] plus
    the group's sum of x^2 (one row of x: every entry is that sum)."""
    VK: gl.constexpr = acc.shape[0]
    RM: gl.constexpr = acc.shape[1]
    if NORM:
        sq = mma_v2(_x_as_rows(x, LA), x, sq)
        x = x * g[:, :, None]
    d = gl.reshape(mma_v2(_decode_tile(words, LA, FP16), x, zero), [VK, RM, 16, 8])
    xs = gl.convert_layout(mma_v2(ones, x, zero_tile), gl.SliceLayout(1, L4), assert_trivial=True)
    acc += s[:, :, :, None] * d
    acc -= ((1032.0 if FP16 else 136.0) * s - z)[:, :, :, None] * gl.expand_dims(xs, 1)
    return acc, sq


@gluon.jit
def _wait_for_inputs(PDL: gl.constexpr):
    """Under programmatic dependent launch: what comes before (weights) overlaps the previous kernel's tail."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@gluon.jit
def _gemv_int4_mma(X, W, S, Z, B, Out, E, Gn, M, N, K, stride_xm, stride_om, stride_em, inv_k, eps,
                   stride_wn: gl.constexpr, stride_sn: gl.constexpr, HAS_BIAS: gl.constexpr, EPILOGUE: gl.constexpr,
                   NORM: gl.constexpr, PDL: gl.constexpr, FP16: gl.constexpr, RM: gl.constexpr, GS: gl.constexpr):
    """Out[:M, n0:n0 + 16 RM] (program axis 0) = x @ W^T (+ bias) through the generated EPILOGUE; M <= 8 (NORM:
    1, x RMS-normalized with weight Gn first), N a multiple of 16 RM, K of 2 * VK * GROUP_SIZE."""
    NW: gl.constexpr = gl.num_warps()
    VK: gl.constexpr = NW * GS
    BN: gl.constexpr = 16 * RM
    G: gl.constexpr = 8 * PART
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1], instr_shape=[1, 16, 8])
    LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    LX: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    LW: gl.constexpr = _word_layout(VK, RM, NW)
    n0 = gl.program_id(0) * BN
    w_i = gl.arange(0, VK, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW)))
    w_n = gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW)))
    w_j = gl.arange(0, PART, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
    w_ptrs = W + n0 * stride_wn + w_n[None, :, None] * stride_wn + w_j[None, None, :] + w_i[:, None, None] * PART
    x_i = gl.arange(0, VK, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
    x_k = gl.max_contiguous(gl.multiple_of(gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX))), 2), 2)
    x_m = gl.minimum(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX))), M - 1)
    x_ptrs = X + x_m[None, None, :] * stride_xm + x_k[None, :, None] + x_i[:, None, None] * G
    g_ptrs = Gn + x_k[None, :] + x_i[:, None] * G
    ones = gl.full([VK, 16, G], 1.0, X.dtype.element_ty, LA)
    zero = gl.zeros([VK, BN, 8], gl.float32, mma)
    zero_tile = gl.zeros([VK, 16, 8], gl.float32, mma)
    acc = gl.reshape(zero, [VK, RM, 16, 8])
    sq = zero_tile
    L4: gl.constexpr = acc.type.layout
    LS: gl.constexpr = gl.SliceLayout(3, L4)
    s_i = gl.arange(0, VK, layout=gl.SliceLayout(1, gl.SliceLayout(2, LS)))
    s_r = gl.arange(0, RM, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS)))
    s_n = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS)))
    s_off = n0 * stride_sn + (s_r[None, :, None] * 16 + s_n[None, None, :]) * stride_sn + s_i[:, None, None]
    s_ptrs, z_ptrs = S + s_off, Z + s_off
    trips = K // (G * VK)
    # two trips a loop iteration, each trip's inputs loaded a trip ahead: only one set of registers is carried
    wa, sa, za = _weight_inputs(w_ptrs, s_ptrs, z_ptrs)
    _wait_for_inputs(PDL)
    xa, ga = _x_inputs(x_ptrs, g_ptrs, NORM)
    for t in range(0, trips - 2, 2):
        wb, sb, zb = _weight_inputs(w_ptrs + (t + 1) * (VK * PART), s_ptrs + (t + 1) * VK, z_ptrs + (t + 1) * VK)
        xb, gb = _x_inputs(x_ptrs + (t + 1) * (VK * G), g_ptrs + (t + 1) * (VK * G), NORM)
        acc, sq = _group_step(acc, sq, wa, sa, za, xa, ga, ones, zero, zero_tile, LA, L4, FP16, NORM)
        wa, sa, za = _weight_inputs(w_ptrs + (t + 2) * (VK * PART), s_ptrs + (t + 2) * VK, z_ptrs + (t + 2) * VK)
        xa, ga = _x_inputs(x_ptrs + (t + 2) * (VK * G), g_ptrs + (t + 2) * (VK * G), NORM)
        acc, sq = _group_step(acc, sq, wb, sb, zb, xb, gb, ones, zero, zero_tile, LA, L4, FP16, NORM)
    wb, sb, zb = _weight_inputs(w_ptrs + (trips - 1) * (VK * PART), s_ptrs + (trips - 1) * VK,
                                z_ptrs + (trips - 1) * VK)
    xb, gb = _x_inputs(x_ptrs + (trips - 1) * (VK * G), g_ptrs + (trips - 1) * (VK * G), NORM)
    acc, sq = _group_step(acc, sq, wa, sa, za, xa, ga, ones, zero, zero_tile, LA, L4, FP16, NORM)
    acc, sq = _group_step(acc, sq, wb, sb, zb, xb, gb, ones, zero, zero_tile, LA, L4, FP16, NORM)
    acc = gl.sum(acc, axis=0)  # [RM, 16, 8]
    if NORM:  # 1 / rms on the output rows
        LR: gl.constexpr = acc.type.layout
        rms = gl.convert_layout(gl.sum(sq, axis=0), gl.SliceLayout(0, LR))
        acc *= gl.expand_dims(gl.rsqrt(rms * inv_k + eps), 0)
    # [8 rows of x, BN channels], adjacent channels in a thread's registers (the glu_ epilogues pair them)
    OL: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [1, NW], [1, 0])
    out = gl.convert_layout(gl.permute(gl.reshape(acc, [BN, 8]), [1, 0]), OL)
    offs_m = gl.arange(0, 8, layout=gl.SliceLayout(1, OL))
    offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, OL))
    if HAS_BIAS:
        out += gl.load(B + offs_n).to(gl.float32)[None, :]
    EPILOGUE(out, offs_m, offs_n, M, N, Out, stride_om, E, stride_em)


def _fits(c, N, K) -> bool:
    return N % (16 * c.kwargs["RM"]) == 0 and (K // GROUP_SIZE) % (2 * c.num_warps * c.kwargs["GS"]) == 0


CONFIGS = [triton.Config({"RM": rm, "GS": gs}, num_warps=nw)
           for nw, rm, gs in [(8, 2, 1), (8, 1, 2), (8, 2, 2), (4, 2, 2), (16, 2, 1), (8, 1, 4), (4, 2, 1)]]
_gemv_tuned = autotuned(_gemv_int4_mma, CONFIGS, ["N", "K", "HAS_BIAS", "NORM", "FP16"],
                        lambda configs, named_args, **kw: [c for c in configs if _fits(c, named_args["N"],
                                                                                      named_args["K"])])


def applicable(x2: torch.Tensor, weight: torch.Tensor, group_size: int, epilogue: str, norm_weight) -> bool:
    """x2 [M, K] rows times weight [N, K / 8] int32: CUDA sm80 on, bf16/fp16 x with unit K stride, group 64, M <= 8
    (1 with a folded norm), and shapes some config tiles."""
    M, K = x2.shape
    return (x2.is_cuda and not triton.knobs.runtime.interpret and torch.version.hip is None
            and torch.cuda.get_device_capability(x2.device) >= (8, 0) and x2.dtype in (torch.bfloat16, torch.float16)
            and x2.stride(1) == 1 and group_size == GROUP_SIZE and 1 <= M <= (1 if norm_weight is not None else MAX_ROWS)
            and (norm_weight is None or (norm_weight.dtype == x2.dtype and norm_weight.stride(0) == 1))
            and K == 8 * weight.shape[1] and weight.stride(1) == 1 and any(_fits(c, weight.shape[0], K) for c in CONFIGS))


def gemv(x2, weight, scales, zeros, bias, out, epilogue: str, e, stride_em: int, norm_weight, inv_k: float, eps: float,
         pdl: bool) -> torch.Tensor:
    """out [M, N] = x2 @ W^T (+ bias) through the epilogue (codegen's spec; its operand e), where applicable();
    scales and zeros [N, >= K / 64] with unit column stride; norm_weight [K] folds rms_norm(x2) in (inv_k: 1 / the
    unpadded K). pdl: launched under programmatic dependent launch."""
    M, K = x2.shape
    N = weight.shape[0]
    grid = lambda meta: (N // (16 * meta["RM"]),)
    _gemv_tuned[grid](x2, weight, scales, zeros, out if bias is None else bias, out, e,
                      x2 if norm_weight is None else norm_weight, M, N, K, x2.stride(0), out.stride(0), stride_em,
                      inv_k, eps, stride_wn=weight.stride(0), stride_sn=scales.stride(0), HAS_BIAS=bias is not None,
                      EPILOGUE=codegen.epilogue(epilogue), NORM=norm_weight is not None, PDL=pdl,
                      FP16=x2.dtype == torch.float16, **({"launch_pdl": True} if pdl else {}))
    return out
