"""int8 weight-only MoE experts: each expert's [N, K] weight per output channel in int8 with bf16 scales, as
`int8_weight_only` packs a linear's, stacked [E, N, K].

One op computes the grouped product: rows offs[e-1]:offs[e] of x times expert e's weight (rows from offs[-1] on are
zero). CUDA (and Triton's interpreter) runs one Triton kernel that reads offs on the device, so a decode step
replays from a CUDA graph: a program per (expert, channel block) walks its expert's rows, and an expert no row picks
reads no weights. CPU runs ATen's `_weight_int8pack_mm` once per expert that has rows, with bf16 activations.
A batched product (bmm over [E, T, K]) is the grouped one with T rows an expert.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cost import formulas
from . import weight_only_triton as wt
from .int8_weight_only import quantize_per_channel
from .registry import Implementation, Replacement, autotuned, pack_once, register


@triton.jit
def _experts_int8(X, W, S, Offs, Out, N, K, stride_xm, stride_we, stride_wn, stride_se, stride_om, ROWS,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert e = program axis 0, BLOCK_N channels (axis 1): its rows BLOCK_M at a time, K BLOCK_K at a time, int8
    weights converted to x's dtype for tl.dot (exact: |q| <= 127), the channel scales applied once at the end. ROWS
    (x's rows, bucketed) only keys the tuning."""
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(Offs + e - 1, mask=e > 0, other=0)
    end = tl.load(Offs + e)
    scale = tl.load(S + e * stride_se + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m < end)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = tl.load(w_ptrs + offs_k[:, None], mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=0)
            if IEEE:  # fp32 stays fp32 (no TF32)
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], (acc * scale[None, :]).to(Out.dtype.element_ty),
                 mask=(offs_m < end)[:, None] & (offs_n < N)[None, :])


_experts_int8_tuned = autotuned(_experts_int8, [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [(16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (16, 32, 512, 4, 3), (64, 64, 128, 4, 3),
                          (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]], ["N", "K", "ROWS"])


def _triton(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    (S, K), (E, N, _) = x.shape, q.shape
    out = x.new_zeros(S, N)
    if S == 0 or N == 0:
        return out
    x = x.contiguous()
    blocks = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64} if wt.INTERPRETING else {}
    grid = lambda meta: (E, triton.cdiv(N, meta["BLOCK_N"]))
    args = (x, q, scales, offs, out, N, K, x.stride(0), q.stride(0), q.stride(1), scales.stride(0), out.stride(0),
            min(triton.next_power_of_2(S), 4096))
    _experts_int8_tuned[grid](*args, IEEE=x.dtype == torch.float32, **blocks)
    return out


def _aten(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out, x16, start = x.new_zeros(x.shape[0], q.shape[1]), x.to(torch.bfloat16), 0
    for e, end in enumerate(offs.tolist()):  # one sync, then a call per expert that has rows
        if end > start:
            out[start:end] = torch.ops.aten._weight_int8pack_mm(x16[start:end].contiguous(), q[e], scales[e])
        start = end
    return out


@torch.library.custom_op("torchfx_eff::experts_int8_mm", mutates_args=())
def experts_int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor,
                    triton_kernel: bool) -> torch.Tensor:
    """x [S, K] rows sorted by expert, q [E, N, K] int8, scales [E, N] bf16, offs [E] the cumulative row counts
    (int32): out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ (q[e] * scales[e][:, None]).T, rows from offs[-1] zero."""
    if x.dim() != 2 or q.dim() != 3 or x.shape[1] != q.shape[2] or offs.shape != (q.shape[0],):
        raise ValueError(f"experts_int8_mm: x [S, K], q [E, N, K] and offs [E], got {tuple(x.shape)}, "
                         f"{tuple(q.shape)} and {tuple(offs.shape)}")
    return (_triton if triton_kernel else _aten)(x, q, scales, offs.to(torch.int32))


@experts_int8_mm.register_fake
def _(x, q, scales, offs, triton_kernel):
    return x.new_empty(x.shape[0], q.shape[1])


def batched_experts_int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, triton_kernel: bool) -> torch.Tensor:
    """bmm(x [E, T, K], experts' weights) as the grouped product with T rows an expert (ATen ops Inductor traces)."""
    E, T, K = x.shape
    offs = torch.arange(1, E + 1, dtype=torch.int32, device=x.device) * T
    return experts_int8_mm(x.reshape(E * T, K), q, scales, offs, triton_kernel).reshape(E, T, q.shape[1])


def _aten_refusal(site) -> str | None:
    K = site.size("K")
    return f"K={K} is not a multiple of 16, which ATen's CPU int8pack_mm needs" if K % 16 else None


def applicable(site, spec) -> str | None:
    return wt.applicable(site, _aten_refusal(site))


def _triton_cost(site, spec):
    return wt.triton_cost(formulas.experts_int8_weight_only(site, spec, "int8_experts"), spec)


def _aten_cost(site, spec):
    return formulas.experts_int8_weight_only(site, spec, "int8pack")


def _on_triton(site) -> bool:
    return wt.uses_triton(site, _aten_refusal(site), _aten_cost, _triton_cost)


def _cost(site, spec):
    return (_triton_cost if _on_triton(site) else _aten_cost)(site, spec)


def replace(site) -> Replacement:
    def pack():
        E, N, K = site.weight_enk().shape
        q, scales = quantize_per_channel(site.weight_enk().reshape(E * N, K))
        return q.reshape(E, N, K), scales.reshape(E, N)

    q, scales = pack_once(site.weight, f"int8_experts_{site.weight_layout}", pack)
    triton_kernel = _on_triton(site)
    if site.offs is None:
        op, args = batched_experts_int8_mm, (site.x, q, scales, triton_kernel)
    else:
        op, args = torch.ops.torchfx_eff.experts_int8_mm.default, (site.x, q, scales, site.offs, triton_kernel)
    return Replacement(op, args, weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes),
                       sources={site.weight_name: site.weight})


register(Implementation("int8_weight_only", "experts", applicable, _cost, replace, accuracy="balanced", weight_bits=8))
