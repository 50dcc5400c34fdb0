"""Cost formulas: sympy expressions in seconds over a site's symbolic sizes (rooflines)."""
from __future__ import annotations

import sympy
import torch

from .devices import DeviceSpec


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def roofline(flops, nbytes, spec: DeviceSpec, dtype: torch.dtype, kernel: str, launches: int = 1) -> sympy.Expr:
    """max(compute time, memory time) at the kernel's efficiency, plus launch overhead."""
    flop_eff, bw_eff = spec.eff(kernel)
    return sympy.Max(flops / (spec.matmul_flops(dtype) * flop_eff), nbytes / (spec.bandwidth * bw_eff)) + launches * spec.launch_s


def linear_dense(site, spec: DeviceSpec) -> sympy.Expr:
    """The unchanged matmul: weights and activations in the site's dtype."""
    M, N, K = (site.dims[d] for d in "MNK")
    b = itemsize(site.dtype)
    return roofline(2 * M * N * K, (N * K + M * K + M * N) * b, spec, site.dtype, f"dense_{dtype_name(site.dtype)}")


def linear_int8_weight_only(site, spec: DeviceSpec) -> sympy.Expr:
    """int8 weights + per-channel bf16 scales; activations cast to bf16 when they are not bf16 already."""
    M, N, K = (site.dims[d] for d in "MNK")
    cost = roofline(2 * M * N * K, N * K + 2 * N + 2 * (M * K + M * N), spec, torch.bfloat16, "int8pack")
    if site.dtype != torch.bfloat16:  # a cast in and a cast out, each read + write
        cost += roofline(0, (M * K + M * N) * (itemsize(site.dtype) + 2), spec, site.dtype, "elementwise", launches=2)
    return cost


def attention(kernel: str):
    """SDPA through `kernel`: 4·B·H·Lq·Lk·D FLOPs (half when causal), q/k/v/out (and mask) read once."""

    def cost(site, spec: DeviceSpec) -> sympy.Expr:
        B, H, Hkv, Lq, Lk, D, Dv = (site.dims[d] for d in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv"))
        flops = 2 * B * H * Lq * Lk * (D + Dv) * (sympy.Rational(1, 2) if site.is_causal else 1)
        nbytes = (B * H * Lq * (D + Dv) + B * Hkv * Lk * (D + Dv)) * itemsize(site.dtype)
        if site.masked:
            nbytes += B * H * Lq * Lk * itemsize(site.dtype)  # at most one mask element per score
        return roofline(flops, nbytes, spec, site.dtype, kernel)

    cost.__name__ = f"attention_{kernel}"
    return cost


def repeat_kv(site, spec: DeviceSpec) -> sympy.Expr:
    """What the original pays for GQA by repeating K/V heads: the expanded copy written, and read at H heads."""
    B, H, Lk, D, Dv = (site.dims[d] for d in ("B", "H", "Lk", "D", "Dv"))
    return roofline(0, 2 * B * H * Lk * (D + Dv) * itemsize(site.dtype), spec, site.dtype, "elementwise", launches=2)


def attention_unfused(site, spec: DeviceSpec) -> sympy.Expr:
    """Eager attention: two matmuls, and the score matrix written and read by each op between them
    (scale, mask, softmax in fp32, cast): about seven passes and six launches; a softcap's divide, tanh and
    multiply are three more read + write passes."""
    B, H, Lq, Lk, D, Dv = (site.dims[d] for d in ("B", "H", "Lq", "Lk", "D", "Dv"))
    b = itemsize(site.dtype)
    matmuls = roofline(2 * B * H * Lq * Lk * (D + Dv), (B * H * (Lq + Lk) * (D + Dv)) * b, spec, site.dtype,
                       f"dense_{dtype_name(site.dtype)}", launches=2)
    scores = B * H * Lq * Lk
    passes = roofline(0, scores * (6 * b + 8 + (b if site.masked else 0)), spec, site.dtype, "elementwise",
                      launches=4)
    if site.softcap is not None:
        passes += roofline(0, scores * 6 * b, spec, site.dtype, "elementwise", launches=3)
    return matmuls + passes


def evaluate(expr: sympy.Expr, hints: dict) -> float:
    return float(expr.xreplace(hints))
