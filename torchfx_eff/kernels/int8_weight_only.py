"""int8 weight-only linear: per-output-channel symmetric int8 weights with bf16 scales.

CPU runs ATen's `_weight_int8pack_mm`; it is ~10x slower with fp32 activations, so other dtypes are cast to
bf16 around it (the cost formula charges the casts, the numerics gate judges the rounding). CUDA runs the Triton
kernels of weight_only_triton.py on the same int8 weights and scales (ATen's CUDA int8pack_mm reaches only
~150 GB/s), with activations in their own dtype.
"""
from __future__ import annotations

import torch

from ..cost import formulas
from . import weight_only_triton as wt
from .registry import Implementation, Replacement, pack_fused, pack_once, register


def quantize_per_channel(weight_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], bf16 scales [N]) with w ~= q * scale[:, None]."""
    w = weight_nk.detach().float()
    # Round the scale to bf16 first so quantization uses exactly the scale the kernel will multiply by.
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales  # a [K, N] weight arrives transposed; the kernel reads rows


def int8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T (+ bias) through ATen's int8 weight-only matmul.

    Plain ATen ops rather than a custom op: Inductor traces into it, calls the kernel from C++ and fuses the
    casts; an opaque custom op would cost ~15 us of Python dispatch per call, a sizeable share of a decode step.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm.default(x2.contiguous(), weight, scales)
    out = out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _aten_refusal(site) -> str | None:
    K = site.size("K")
    return f"K={K} is not a multiple of 16, which ATen's CPU int8pack_mm needs" if K % 16 else None


def applicable(site, spec) -> str | None:
    return wt.applicable(site, _aten_refusal(site))


def _triton_cost(site, spec):
    N, K = site.dims["N"], site.dims["K"]
    return wt.triton_cost(formulas.linear_weight_only_triton(site, spec, 8, N * K + 2 * N, wt.GEMV_MAX_ROWS, wt.DEQUANTIZE_MIN_ROWS[8]), spec)


def _on_triton(site) -> bool:
    return wt.uses_triton(site, _aten_refusal(site), formulas.linear_int8_weight_only, _triton_cost)


def _cost(site, spec):
    return (_triton_cost if _on_triton(site) else formulas.linear_int8_weight_only)(site, spec)


def replace(site) -> Replacement:
    packing, pack = f"int8_per_channel_{site.weight_layout}", lambda: quantize_per_channel(site.weight_nk())
    if _on_triton(site):
        (q, scales), bias, epilogue = pack_fused(site, packing, pack)
        op, args = torch.ops.torchfx_eff.weight_only_mm.default, (site.x, q, scales, None, bias, 8, 0, *epilogue)
    else:
        q, scales = pack_once(site.weight, packing, pack)
        op, args = int8_weight_only_linear, (site.x, q, scales, site.bias)
    return Replacement(op, args, weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes),
                       sources={site.weight_name: site.weight})


register(Implementation("int8_weight_only", "linear", applicable, _cost, replace, accuracy="balanced", weight_bits=8,
                        fuses=lambda site: _on_triton(site) and wt.epilogue_rows(site, 8)))
