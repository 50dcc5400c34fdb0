"""`ternary`: BitNet b1.58 weights applied after training (accuracy="aggressive"; the numerics gate judges each site).

Weights: per output channel, scale = mean |W| over K (absmean), W_t = clamp(round(W / scale), -1, 1), packed
2 bits a weight (packed_linear.py gives the layout). Activations: int8, per row (token) absmax, quantized at
run time by ATen ops that Inductor fuses. The Triton kernel accumulates int8 x ternary in int32 and returns
acc * row scale * channel scale (+ bias). There is no fast CPU kernel: off CUDA only the interpreter runs it.
Meant for BitNet checkpoints stored in float (their latent weights quantize to exactly what they were trained
with); other models lose about 6-8 dB a site (Gaussian weights: 5.8 dB), so the 8 dB gate mostly refuses them.
"""
from __future__ import annotations

import torch

from ..cost import formulas
from . import quant_gemm
from .packed_linear import (
    GEMV_MAX_ROWS,
    pack2,
    padded_k,
    triton_applicable,
    triton_cost,
)
from .registry import Implementation, Replacement, pack_once, register

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # activations are quantized to int8 whatever they are


def ternary_quantize(weight_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K] in {-1, 0, 1}, fp32 absmean scales [N]) with W ~= W_t * scale[:, None]."""
    w = weight_nk.detach().float()
    scale = w.abs().mean(dim=1).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-1, 1).to(torch.int8), scale


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in {-1, 0, 1} -> uint8 [N, padded K / 4], 2-bit codes w + 1 (padding codes weigh 0)."""
    fields = torch.nn.functional.pad(codes + 1, (0, padded_k(codes.shape[1]) - codes.shape[1]), value=1)
    return pack2(fields)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 scales [M]): per-row absmax, x ~= q * scale[:, None]."""
    return quant_gemm.quantize_rows(x2, torch.int8)


def int8_ternary_linear(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None, w_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (dense(w) * w_scale[:, None]).T (+ bias) with x quantized to int8 per row; idx: w is the kept
    half of 2:4 groups (ternary_sparse24). ATen quantization, then one custom-op kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(x2)
    out = torch.ops.torchfx_eff.packed_mm.default(xq, xs, w, idx, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_scale.shape[0])


def _applicable(site, spec) -> str | None:
    return triton_applicable(site, DTYPES, "ternary weights")


def _cost(site, spec):
    return triton_cost(formulas.linear_ternary(site, spec, GEMV_MAX_ROWS), spec)


def _replace(site) -> Replacement:
    def pack():
        codes, scale = ternary_quantize(site.weight_nk())
        return pack_ternary(codes), scale

    packed, scale = pack_once(site.weight, f"ternary_{site.weight_layout}", pack)
    return Replacement(int8_ternary_linear, (site.x, packed, None, scale, site.bias),
                       weight_bytes=(site.weight.nbytes, packed.nbytes + scale.nbytes),
                       sources={site.weight_name: site.weight})


register(Implementation("ternary", "linear", _applicable, _cost, _replace, accuracy="aggressive",
                        weight_bits=2))
