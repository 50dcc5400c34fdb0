"""Weight-only MoE experts: each expert's [N, K] weight packed as the linear candidates pack one, stacked.
- int8_weight_only: int8 per output channel with bf16 scales, [E, N, K];
- int4_weight_only: int4 codes in groups of 64 along K with a bf16 scale and zero per group (int4_weight_only's
  quantizer, uncalibrated), two codes a byte (even k in the low nibble), [E, N, Kp / 2] with scales and zeros
  [E, N, Kp / 64]; ATen's CPU layouts for the CPU path.

One op computes the grouped product: rows offs[e-1]:offs[e] of x times expert e's weight (rows from offs[-1] on are
zero). CUDA (and Triton's interpreter) runs one Triton kernel that reads offs on the device, so a decode step
replays from a CUDA graph: a program per (expert, channel block) walks its expert's rows, and an expert no row picks
reads no weights. CPU runs ATen's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` once per expert that has
rows, with bf16 activations. A batched product (bmm over [E, T, K]) is the grouped one with T rows an expert; a
gathered one (each row's expert matrix indexed out) sorts its rows by expert first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..cost import formulas
from . import weight_only_triton as wt
from .int4_weight_only import pack_for_cpu, quantize_int4
from .int8_weight_only import quantize_per_channel
from .registry import Implementation, Replacement, autotuned, pack_once, register


@triton.jit
def _experts(X, W, S, Z, Offs, Out, N, K, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_om, ROWS,
             BITS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert e = program axis 0, BLOCK_N channels (axis 1): its rows BLOCK_M at a time, K BLOCK_K at a time. int8
    weights go to x's dtype as they are (exact: |q| <= 127) and the channel scales apply once at the end; int4 ones
    likewise, a group at a time, with the group's scale and zero applied after its dots. ROWS (x's rows, bucketed)
    only keys the tuning."""
    SUB_K: tl.constexpr = min(BLOCK_K, GROUP)  # within one group, so its scale and zero are one per channel
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    start = tl.load(Offs + e - 1, mask=e > 0, other=0)
    end = tl.load(Offs + e)
    w_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn
    g_off = e * stride_se + offs_n * stride_sn  # int4's groups
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        x_ptrs = X + offs_m[:, None] * stride_xm
        m_ok = (offs_m < end)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if BITS == 8:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptrs + offs_k[None, :], mask=m_ok & (offs_k < K)[None, :], other=0.0)
                w = tl.load(w_ptrs + offs_k[:, None], mask=(offs_k < K)[:, None] & n_ok[None, :], other=0).to(x.dtype)
                acc = _dot(x, w, acc, IEEE)
            else:
                for sub in tl.static_range(BLOCK_K // SUB_K):
                    acc = _int4_group_dot(acc, x_ptrs, w_ptrs, S + g_off, Z + g_off, m_ok, n_ok, k0 + sub * SUB_K, K,
                                          GROUP, IEEE, SUB_K)
        if BITS == 8:
            acc *= tl.load(S + e * stride_se + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=m_ok & n_ok[None, :])


@triton.jit
def _int4_group_dot(acc, x_ptrs, w_ptrs, s_ptrs, z_ptrs, m_ok, n_ok, k0, K, GROUP: tl.constexpr, IEEE: tl.constexpr,
                    SUB_K: tl.constexpr):
    """acc + x[:, k0:k0 + SUB_K] @ W's dequantized rows there, all in one group: the codes q (0..15, exact in x's
    dtype) go into the dots as they are, the even and odd k in one dot each, then (q - 8) * s + z applies once a
    channel: s * (x @ q) + (z - 8 s) * sum(x)."""
    k = k0 + 2 * tl.arange(0, SUB_K // 2)  # the even k; a byte holds k and k + 1
    byte = tl.load(w_ptrs + (k // 2)[:, None], mask=(k < K)[:, None] & n_ok[None, :], other=0)
    x_even = tl.load(x_ptrs + k[None, :], mask=m_ok & (k < K)[None, :], other=0.0)
    x_odd = tl.load(x_ptrs + k[None, :] + 1, mask=m_ok & (k + 1 < K)[None, :], other=0.0)
    xq = _dot(x_even, (byte & 15).to(x_even.dtype), tl.zeros(acc.shape, tl.float32), IEEE)
    xq = _dot(x_odd, (byte >> 4).to(x_odd.dtype), xq, IEEE)
    g_ok = n_ok & (k0 < K)
    s = tl.load(s_ptrs + k0 // GROUP, mask=g_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptrs + k0 // GROUP, mask=g_ok, other=0.0).to(tl.float32)
    x_sum = tl.sum(x_even.to(tl.float32), 1) + tl.sum(x_odd.to(tl.float32), 1)
    return acc + xq * s[None, :] + x_sum[:, None] * (z - 8.0 * s)[None, :]


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 stays fp32 (no TF32)
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w, acc)


_experts_tuned = autotuned(_experts, [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [(16, 64, 256, 4, 3), (16, 128, 128, 4, 3), (16, 32, 512, 4, 3), (64, 64, 128, 4, 3),
                          (64, 128, 64, 4, 4), (128, 128, 64, 8, 3)]], ["N", "K", "ROWS", "BITS"])


def _triton(x, w, scales, zeros, offs, bits: int, group_size: int) -> torch.Tensor:
    (S, K), (E, N) = x.shape, w.shape[:2]
    out = x.new_zeros(S, N)
    if S == 0 or N == 0:
        return out
    x = x.contiguous()
    blocks = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64} if wt.INTERPRETING else {}
    grid = lambda meta: (E, triton.cdiv(N, meta["BLOCK_N"]))
    args = (x, w, scales, scales if zeros is None else zeros, offs, out, N, K, x.stride(0), w.stride(0), w.stride(1),
            scales.stride(0), scales.stride(1) if scales.dim() == 3 else 0, out.stride(0),
            min(triton.next_power_of_2(S), 4096))
    _experts_tuned[grid](*args, BITS=bits, GROUP=max(group_size, 1), IEEE=x.dtype == torch.float32, **blocks)
    return out


def _aten(x, w, scales, offs, bits: int, group_size: int) -> torch.Tensor:
    out, x16, start = x.new_zeros(x.shape[0], w.shape[1]), x.to(torch.bfloat16), 0
    if bits == 4 and (pad := scales.shape[1] * group_size - x.shape[1]):
        x16 = F.pad(x16, (0, pad))
    for e, end in enumerate(offs.tolist()):  # one sync, then a call per expert that has rows
        if end > start:
            rows = x16[start:end].contiguous()
            out[start:end] = (torch.ops.aten._weight_int8pack_mm(rows, w[e], scales[e]) if bits == 8 else
                              torch.ops.aten._weight_int4pack_mm_for_cpu(rows, w[e], group_size, scales[e]))
        start = end
    return out


@torch.library.custom_op("torchfx_eff::experts_weight_only_mm", mutates_args=())
def experts_weight_only_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           offs: torch.Tensor, bits: int, group_size: int, triton_kernel: bool) -> torch.Tensor:
    """x [S, K] rows sorted by expert, w [E, N, ...] an experts candidate's packed weights (module docstring), offs
    [E] the cumulative row counts: out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ W[e].T, rows from offs[-1] zero."""
    if x.dim() != 2 or w.dim() != 3 or offs.shape != (w.shape[0],) or bits not in (4, 8):
        raise ValueError(f"experts_weight_only_mm: x [S, K], w [E, N, ...], offs [E] and bits 4 or 8, got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(offs.shape)} and {bits}")
    if bits == 8 and x.shape[1] != w.shape[2]:
        raise ValueError(f"experts_weight_only_mm: x has K={x.shape[1]}, the int8 weights {w.shape[2]}")
    if not triton_kernel and (why := _aten_refusal(bits, x.shape[1], w.shape[1])):  # ATen would crash
        raise ValueError(f"experts_weight_only_mm: {why}")
    offs = offs.to(torch.int32)
    if triton_kernel:
        return _triton(x, w, scales, zeros, offs, bits, group_size)
    return _aten(x, w, scales, offs, bits, group_size)


@experts_weight_only_mm.register_fake
def _(x, w, scales, zeros, offs, bits, group_size, triton_kernel):
    return x.new_empty(x.shape[0], w.shape[1])


def batched_experts_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int, triton_kernel: bool) -> torch.Tensor:
    """bmm(x [E, T, K], experts' weights) as the grouped product with T rows an expert (ATen ops Inductor traces)."""
    E, T, K = x.shape
    offs = torch.arange(1, E + 1, dtype=torch.int32, device=x.device) * T
    out = experts_weight_only_mm(x.reshape(E * T, K), w, scales, zeros, offs, bits, group_size, triton_kernel)
    return out.reshape(E, T, w.shape[1])


def gathered_experts_mm(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bits: int, group_size: int, triton_kernel: bool,
                        transposed_out: bool) -> torch.Tensor:
    """Row s of x [S, K] times expert ids[s]'s weight, as a gathered bmm's value ([S, N, 1], or [S, 1, N] when
    transposed_out): the rows sorted by expert, the grouped product, then back in order (ATen ops Inductor traces)."""
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(w.shape[0], dtype=torch.int32, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    out = experts_weight_only_mm(x[order], w, scales, zeros, counts.cumsum(0, dtype=torch.int32), bits, group_size,
                                 triton_kernel)
    out = torch.empty_like(out).index_copy_(0, order, out)
    return out.unsqueeze(1) if transposed_out else out.unsqueeze(-1)


def _pack(site, bits: int, group_size: int, triton_kernel: bool) -> tuple:
    """(weights, scales, zeros or None) of the site's stack for the path it takes."""
    E, N, K = site.weight_enk().shape
    rows = site.weight_enk().reshape(E * N, K)
    if bits == 8:
        q, scales = quantize_per_channel(rows)
        return q.reshape(E, N, K), scales.reshape(E, N), None
    codes, scales, zeros = quantize_int4(rows, group_size)
    if triton_kernel:
        packed = (codes[:, 0::2] | codes[:, 1::2] << 4).reshape(E, N, -1)
        return packed.contiguous(), scales.reshape(E, N, -1), zeros.reshape(E, N, -1)
    per_expert = [pack_for_cpu(c, s, z) for c, s, z in zip(*(t.reshape(E, N, -1) for t in (codes, scales, zeros)))]
    return torch.stack([p for p, _ in per_expert]), torch.stack([sz for _, sz in per_expert]), None


def _aten_refusal(bits: int, K: int, N: int) -> str | None:
    if bits == 8 and K % 16:
        return f"K={K} is not a multiple of 16, which ATen's CPU int8pack_mm needs"
    return f"N={N} is not a multiple of 16, which ATen's CPU int4pack_mm needs" if bits == 4 and N % 16 else None


def _implementation(name: str, bits: int, group_size: int, accuracy: str) -> Implementation:
    aten = "int8pack" if bits == 8 else "int4pack"

    aten_refusal = lambda site: _aten_refusal(bits, site.size("K"), site.size("N"))

    def triton_cost(site, spec):
        return wt.triton_cost(formulas.experts_weight_only(site, spec, bits, group_size, f"int{bits}_experts"), spec)

    def aten_cost(site, spec):
        return formulas.experts_weight_only(site, spec, bits, group_size, aten)

    def on_triton(site) -> bool:
        return wt.uses_triton(site, aten_refusal(site), aten_cost, triton_cost)

    def replace(site) -> Replacement:
        triton_kernel = on_triton(site)
        packed = pack_once(site.weight, f"{name}_experts_{'triton' if triton_kernel else 'aten'}_{site.weight_layout}",
                           lambda: _pack(site, bits, group_size, triton_kernel))
        flags = (bits, group_size, triton_kernel)
        if site.ids is not None:
            op, args = gathered_experts_mm, (site.x, site.ids, *packed, *flags, site.transposed_out)
        elif site.offs is None:
            op, args = batched_experts_mm, (site.x, *packed, *flags)
        else:
            op, args = torch.ops.torchfx_eff.experts_weight_only_mm.default, (site.x, *packed, site.offs, *flags)
        return Replacement(op, args, weight_bytes=(site.weight.nbytes, sum(t.nbytes for t in packed if t is not None)),
                           sources={site.weight_name: site.weight})

    return Implementation(name, "experts", lambda site, spec: wt.applicable(site, aten_refusal(site)),
                          lambda site, spec: (triton_cost if on_triton(site) else aten_cost)(site, spec), replace,
                          accuracy=accuracy, weight_bits=bits)


register(_implementation("int8_weight_only", 8, 0, "balanced"))
# the linear's tier: int4 g64's error compounds over layers (int4_weight_only.py)
register(_implementation("int4_weight_only", 4, 64, "aggressive"))
