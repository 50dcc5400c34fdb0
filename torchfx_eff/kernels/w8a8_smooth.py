"""`w8a8_smooth`: SmoothQuant. int8 weights per output channel, int8 activations per row (token, at run time),
int32 accumulation.

Activations have outlier channels that a per-token int8 scale cannot resolve next to the quiet ones. Smoothing
moves range from activations to weights by an exact reparametrization: with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)    (per input channel j; alpha = ALPHA)

x @ W^T = (x / s) @ (W * s)^T. W * s is quantized once at pack time; x / s is one multiply that Inductor fuses
into the activation-quantization pass (folding it into a preceding LayerNorm/RMSNorm weight would save even
that, and is not done). max|X_j| comes from torchfx_eff.calibrate_activations when the weight was calibrated,
otherwise from the site's example input at compile time when it has enough rows (MIN_EXAMPLE_ROWS), otherwise
there is no smoothing (plain per-token int8). Smoothing is exact in any case and the quantization is dynamic, so
statistics that miss a channel's range never clip; they cost accuracy, which the gate sees only on its example.

Kernels: on CPU, ATen's `_int_mm` (int32 result) with the dequantization in ATen ops; on CUDA, the Triton GEMM
of quant_gemm.py with the dequantization in its epilogue.
"""
from __future__ import annotations

import torch

from ..calibration import ACTIVATION_STATS
from ..cost import formulas
from .quant_gemm import quantize_rows, scaled_linear
from .registry import Implementation, Replacement, needs_dtype, pack_fused, register

ALPHA = 0.5  # migration strength: 0 leaves activations as they are, 1 moves all their range into the weights
# Factors fitted to a few tokens can misfit the others badly (one decode token's statistics: 21 dB where plain
# per-token int8 gives 37, on an MLP's second linear; 16 tokens: 35 dB), and the gate, which runs on that same
# example, cannot see it. Fewer example rows than this: no smoothing, unless the weight was calibrated.
MIN_EXAMPLE_ROWS = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def smoothing_factors(act_absmax: torch.Tensor, weight_nk: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """fp32 [K] s with x @ W^T = (x / s) @ (W * s)^T; 1 where a channel's activations or weights are all zero."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is not allowed; use a number in [0, 1]")
    ax = act_absmax.float().to(weight_nk.device)
    aw = weight_nk.detach().float().abs().amax(dim=0)
    s = ax.clamp(min=1e-5).pow(alpha) / aw.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((ax > 0) & (aw > 0), s, torch.ones_like(s))


def pack(weight_nk: torch.Tensor, act_absmax: torch.Tensor, alpha: float = ALPHA):
    """(int8 [N, K] of W * s, fp32 channel scales [N], fp32 1 / s [K])."""
    s = smoothing_factors(act_absmax, weight_nk, alpha)
    q, scales = quantize_rows(weight_nk.detach().float() * s, torch.int8)
    return q, scales, 1.0 / s


def _smoothed_rows(x: torch.Tensor, inv_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x.reshape(-1, x.shape[-1]) * inv_s, torch.int8)


def _finish(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out.reshape(*x.shape[:-1], out.shape[-1])


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, inv_s: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) with W ~= q * scales[:, None] / s: ATen's _int_mm, dequantized in fp32 (CPU path)."""
    xq, row_scales = _smoothed_rows(x, inv_s)
    out = torch._int_mm(xq, q.t()).float() * row_scales[:, None] * scales
    if bias is not None:
        out = out + bias.float()
    return _finish(out.to(x.dtype), x)


def w8a8_linear_triton(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, inv_s: torch.Tensor,
                       bias: torch.Tensor | None, epilogue: str = "", operand: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same, through the Triton int8 GEMM with the dequantization, the bias and the epilogue in its store (CUDA
    path)."""
    return scaled_linear(x, *_smoothed_rows(x, inv_s), q, scales, bias, epilogue, operand, out_dtype)


def activation_absmax(site) -> tuple[torch.Tensor, str]:
    """(max |x| per input channel, where it comes from): calibration if the weight has it, else the example input
    if it has MIN_EXAMPLE_ROWS rows, else zeros ("plain": no smoothing, which zero statistics mean)."""
    calibrated = ACTIVATION_STATS.absmax(site.weight)
    if calibrated is not None:
        return calibrated, f"calibrated{ACTIVATION_STATS.generation}"
    x = site.x if isinstance(site.x, torch.Tensor) else site.inputs.get(site.x)  # a real tensor stands for itself
    if x is None:
        raise ValueError("w8a8_smooth has no activation statistics for this weight: run "
                         "torchfx_eff.calibrate_activations(model, batches), or compile through the backend, "
                         "which captures the example input")
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] < MIN_EXAMPLE_ROWS:
        return rows.new_zeros(rows.shape[1], dtype=torch.float32), "plain"
    return rows.abs().amax(dim=0).float(), "example"


def _applicable(site, spec) -> str | None:
    if site.device.type == "cuda":
        if torch.cuda.get_device_capability(site.device) < (8, 0):
            return "the Triton int8 GEMM needs int8 tensor cores (compute capability >= 8.0)"
    elif site.device.type != "cpu":
        return f"needs a cpu or cuda tensor, site is on {site.device.type}"
    if not site.weight.is_floating_point():
        return f"weight dtype {site.weight.dtype} is not floating point"
    return needs_dtype(site, DTYPES)


def _replace(site) -> Replacement:
    absmax, source = activation_absmax(site)
    K = site.size("K")
    if absmax.shape != (K,):
        raise ValueError(f"activation statistics have shape {tuple(absmax.shape)}, the site's K is {K}")
    # one packing per statistics source: graphs compiled from example inputs share the first one's factors; the
    # epilogue (CUDA only) pairs q's and scales' channels, never inv_s's input channels
    (q, scales, inv_s), bias, epilogue = pack_fused(site, f"w8a8_smooth_{site.weight_layout}_a{ALPHA}_{source}",
                                                    lambda: pack(site.weight_nk(), absmax), channel_tensors=2)
    op = w8a8_linear_triton if _on_cuda(site) else w8a8_linear
    return Replacement(op, (site.x, q, scales, inv_s, bias, *epilogue), weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes + inv_s.nbytes),
                       sources={site.weight_name: site.weight})


def _on_cuda(site) -> bool:
    return site.device.type == "cuda"


register(Implementation("w8a8_smooth", "linear", _applicable, formulas.linear_w8a8, _replace, accuracy="balanced",
                        fuses=_on_cuda))
