"""int8 weight-only linear: per-output-channel symmetric int8 weights, bf16 activations.

CPU runs ATen's `_weight_int8pack_mm`; it is ~10x slower with fp32 activations, so other dtypes are cast to
bf16 around it (the cost formula charges the casts, the numerics gate judges the rounding).
"""
from __future__ import annotations

import torch

from ..cost import formulas
from .registry import Implementation, Replacement, needs_device, needs_dtype, pack_once, register


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


def applicable(site, spec) -> str | None:
    K = site.size("K")
    if reason := needs_device(site, "cpu") or needs_dtype(site, (torch.bfloat16, torch.float32, torch.float16)):
        return reason
    if K % 16:
        return f"K={K} is not a multiple of 16, which ATen's CPU int8pack_mm needs"
    if not site.weight.is_floating_point():
        return f"weight dtype {site.weight.dtype} is not floating point"
    return None


def replace(site) -> Replacement:
    q, scales = pack_once(site.weight, f"int8_per_channel_{site.weight_layout}",
                          lambda: quantize_per_channel(site.weight_nk()))
    return Replacement(int8_weight_only_linear, (site.x, q, scales, site.bias),
                       weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes), sources={site.weight_name: site.weight})


register(Implementation("int8_weight_only", "linear", applicable, formulas.linear_int8_weight_only, replace,
                        accuracy="balanced"))
