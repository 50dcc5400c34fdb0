"""Shared by the activation-quantized linears (fp8, w8a8_smooth): symmetric per-row quantization in ATen ops
(Inductor fuses it into one pass over the activations) and a Triton GEMM over 8-bit operands whose epilogue
dequantizes with a row scale x a column scale, adds the bias and applies a generated epilogue (codegen.epilogue):

    out[m, n] = epilogue((sum_k a[m, k] b[n, k]) * sa[m] * sb[n] + bias[n])

a and b are both int8 (int32 accumulator) or both float8_e4m3fn (fp32 accumulator, promoted every K block
on Hopper rather than left to the tensor core's narrower accumulator). Registers no candidate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import codegen
from .registry import autotuned

INTERPRETING = triton.knobs.runtime.interpret
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_rows(t: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (qdtype [R, C], fp32 scales [R]) with t ~= q * scale[:, None], each row's max |t| mapped to
    the format's largest value. Used for weights (rows = output channels) and activations (rows = tokens)."""
    if qdtype not in QMAX:
        raise ValueError(f"qdtype={qdtype}; choose one of {tuple(QMAX)}")
    qmax = QMAX[qdtype]
    t = t.float()
    scales = (t.abs().amax(dim=-1) / qmax).clamp(min=1e-12)  # an all-zero row keeps a finite scale
    scaled = (t / scales[:, None]).clamp(-qmax, qmax)  # amax / (amax / qmax) may land a hair above qmax
    if qdtype == torch.int8:
        scaled = scaled.round()  # the int8 cast truncates; the fp8 cast rounds to nearest even itself
    return scaled.to(qdtype), scales


@triton.jit
def _scaled_mm(A, B, SA, SB, Bias, Out, E, M, N, K, stride_am, stride_bn, stride_om, stride_em, M_BUCKET,
               HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ACC: tl.constexpr, EPILOGUE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row blocks in a row read each column block of B while it is still in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows and columns past the edge wrap around (in bounds, no load masks); their results are never stored
    a_ptrs = A + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major as 8-bit MMAs want
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a, b = tl.load(a_ptrs), tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(SA + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(SB + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    EPILOGUE(out, offs_m, offs_n, M, N, Out, stride_om, E, stride_em)


def _hopper_configs():
    """Decode-sized row blocks (weight streaming) and square tiles (compute); 8-bit operands take deep K blocks."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(16, 64, 256, 4, 4), (16, 128, 128, 4, 5), (32, 64, 256, 4, 4),
                                     (64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
                                     (64, 256, 128, 8, 4), (128, 64, 128, 4, 4)]]


def _prune(configs, named_args, **kwargs):
    """Row blocks no taller than the M bucket needs (a decode GEMM gains nothing from 128-row tiles)."""
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["M_BUCKET"])]
    return keep or configs[:1]


_scaled_mm_tuned = autotuned(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_scaled_mm),
                             _hopper_configs(), ["M_BUCKET", "N", "K", "HAS_BIAS"], _prune)
INTERPRETER_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}  # small, or masks go untested


def scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, block: dict | None = None, epilogue: str = "",
              operand: torch.Tensor | None = None) -> torch.Tensor:
    """(a @ b.T) * sa[:, None] * sb[None, :] (+ bias), then the epilogue (codegen.epilogue's spec, reading operand
    [M, N_out]), for 8-bit a [M, K], b [N, K]. `block` fixes the tile (BLOCK_M/N/K, GROUP_M) instead of autotuning
    (always so under the interpreter)."""
    (M, K), N = a.shape, b.shape[0]
    if a.dtype != b.dtype or a.dtype not in QMAX:
        raise ValueError(f"scaled_mm takes int8 or float8_e4m3fn operands of one dtype, got {a.dtype} and {b.dtype}")
    if b.shape[1] != K or a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError(f"scaled_mm needs a [M, K] and b [N, K] with unit K stride, got {a.shape}/{a.stride()} "
                         f"and {b.shape}/{b.stride()}")
    out = torch.empty(M, codegen.out_features(epilogue, N), dtype=out_dtype, device=a.device)
    e, stride_em = codegen.operand_arg(epilogue, operand, out, out.shape)
    if M == 0 or N == 0:
        return out
    acc = tl.int32 if a.dtype == torch.int8 else tl.float32
    args = (a, b, sa.contiguous(), sb.contiguous(), bias if bias is not None else sb, out, e, M, N, K,
            a.stride(0), b.stride(0), out.stride(0), stride_em, triton.next_power_of_2(M))
    flags = {"HAS_BIAS": bias is not None, "ACC": acc, "EPILOGUE": codegen.epilogue(epilogue)}
    if block is None and not INTERPRETING:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _scaled_mm_tuned[grid](*args, **flags)
    else:
        block = block or INTERPRETER_BLOCK
        grid = (triton.cdiv(M, block["BLOCK_M"]) * triton.cdiv(N, block["BLOCK_N"]),)
        _scaled_mm[grid](*args, **flags, EVEN_K=K % block["BLOCK_K"] == 0, **block)
    return out


def scaled_linear(x: torch.Tensor, xq: torch.Tensor, row_scales: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None, epilogue: str = "", operand: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The GEMM as x [..., K]'s linear, x quantized to xq [M, K] with row_scales: output [..., N_out] in out_dtype
    (x's by default), the epilogue reading operand [..., N_out]."""
    rows = None if operand is None else operand.reshape(xq.shape[0], -1)
    out = torch.ops.torchfx_eff.scaled_mm.default(xq, q, row_scales, scales, bias, out_dtype or x.dtype, epilogue, rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.library.custom_op("torchfx_eff::scaled_mm", mutates_args=())
def scaled_mm_op(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, epilogue: str = "", operand: torch.Tensor | None = None) -> torch.Tensor:
    return scaled_mm(a, b, sa, sb, bias, out_dtype, epilogue=epilogue, operand=operand)


@scaled_mm_op.register_fake
def _(a, b, sa, sb, bias, out_dtype, epilogue="", operand=None):
    return a.new_empty(a.shape[0], codegen.out_features(epilogue, b.shape[0]), dtype=out_dtype)
