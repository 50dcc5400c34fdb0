"""`w8a8_smooth`: SmoothQuant. int8 weights per output channel, int8 activations per row (token, at run time),
int32 accumulation.

Activations have outlier channels that a per-token int8 scale cannot resolve next to the quiet ones. Smoothing
moves range from activations to weights by an exact reparametrization: with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)    (per input channel j)

x @ W^T = (x / s) @ (W * s)^T. W * s is quantized once at pack time; x / s is one multiply that Inductor fuses
into the activation-quantization pass (folding it into a preceding LayerNorm/RMSNorm weight would save even
that, and is not done). The statistics (calibration.site_activations) come from torchfx_eff.calibrate_activations
when the weight was calibrated, otherwise from the site's example input at compile time when it has enough rows,
otherwise there is no smoothing (plain per-token int8). The migration strength alpha is chosen per site from ALPHAS
by the error on the statistics' sample rows (SmoothQuant's alpha search: the best alpha differs between models and
between a model's layers). Smoothing is exact in any case and the quantization is dynamic, so statistics that miss
a channel's range never clip; they cost accuracy, which the gate sees only on its example.

SmolLM2-135M (bench cpu_quality): +1.30% perplexity calibrated on 4096 held-out tokens, 421 of 422 sites within
the 20 dB gate (uncalibrated, its decode graphs' one-row examples give no statistics: plain per-token int8, +2.47%).

Kernels: on CPU, ATen's `_int_mm` (int32 result) with the dequantization in ATen ops; on CUDA, the Triton GEMM
of quant_gemm.py with the dequantization in its epilogue.
"""
from __future__ import annotations

import torch

from ..calibration import Activations, site_activations
from ..cost import formulas
from .quant_gemm import quantize_rows, scaled_linear
from .registry import Implementation, Replacement, needs_dtype, pack_fused, register

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # migration strengths tried: 0 leaves activations as they are, 1 moves
# all their range into the weights; SmolLM2's sites choose mostly 0.5-0.9
SEARCH_CHANNELS = 512
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def smoothing_factors(act_absmax: torch.Tensor, weight_nk: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """fp32 [K] s with x @ W^T = (x / s) @ (W * s)^T; 1 where a channel's activations or weights are all zero."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is not allowed; use a number in [0, 1]")
    ax = act_absmax.float().to(weight_nk.device)
    aw = weight_nk.detach().float().abs().amax(dim=0)
    s = ax.clamp(min=1e-5).pow(alpha) / aw.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((ax > 0) & (aw > 0), s, torch.ones_like(s))


def pack(weight_nk: torch.Tensor, act_absmax: torch.Tensor, alpha: float = 0.5):
    """(int8 [N, K] of W * s, fp32 channel scales [N], fp32 1 / s [K])."""
    s = smoothing_factors(act_absmax, weight_nk, alpha)
    q, scales = quantize_rows(weight_nk.detach().float() * s, torch.int8)
    return q, scales, 1.0 / s


def row_error(x: torch.Tensor, ref: torch.Tensor, weight_nk: torch.Tensor, inv_s: torch.Tensor) -> float:
    """Mean over x's rows of |out - ref|^2 / |ref|^2, ref = x @ W^T, out = the w8a8 product with W * s quantized
    per channel and x / s per row (in fp32, as _int_mm's int32 sums up to K = 1040). Relative per row, as the
    per-token quantization is: a plain SQNR over the rows would be decided by the few loudest tokens."""
    q, scales = quantize_rows(weight_nk.float() / inv_s, torch.int8)
    xq, row_scales = quantize_rows(x.float() * inv_s, torch.int8)
    out = (xq.float() @ q.float().T) * row_scales[:, None] * scales
    return float(((out - ref).square().sum(-1) / ref.square().sum(-1).clamp(min=1e-30)).mean())


def search_pack(weight_nk: torch.Tensor, acts: Activations):
    """pack() at the alpha of ALPHAS with the least row_error on the statistics' sample rows, ranked on up to
    SEARCH_CHANNELS output channels (the error is a mean over channels; the whole weight for every alpha took 7 s
    for 4096 x 4096)."""
    w = weight_nk.detach().float()
    x = acts.sample.to(w.device).float()
    channels = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:SEARCH_CHANNELS]
    sub = w[channels.to(w.device)]
    ref = x @ sub.T
    col_absmax = w.abs().amax(dim=0, keepdim=True)  # all smoothing_factors reads of the weight

    def error(alpha):
        return row_error(x, ref, sub, 1.0 / smoothing_factors(acts.absmax, col_absmax, alpha))

    return pack(w, acts.absmax, min(ALPHAS, key=error))


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
    acts = site_activations(site)
    K = site.size("K")
    if acts is not None and acts.absmax.shape != (K,):
        raise ValueError(f"activation statistics have shape {tuple(acts.absmax.shape)}, the site's K is {K}")
    # one packing per statistics source: graphs compiled from example inputs share the first one's factors; the
    # epilogue (CUDA only) pairs q's and scales' channels, never inv_s's input channels
    source = "plain" if acts is None else acts.source
    (q, scales, inv_s), bias, epilogue = pack_fused(
        site, f"w8a8_smooth_{site.weight_layout}_{source}", channel_tensors=2,
        pack=lambda: pack(site.weight_nk(), torch.zeros(K)) if acts is None else search_pack(site.weight_nk(), acts))
    op = w8a8_linear_triton if _on_cuda(site) else w8a8_linear
    return Replacement(op, (site.x, q, scales, inv_s, bias, *epilogue), weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes + inv_s.nbytes),
                       sources={site.weight_name: site.weight})


def _on_cuda(site) -> bool:
    return site.device.type == "cuda"


register(Implementation("w8a8_smooth", "linear", _applicable, formulas.linear_w8a8, _replace, accuracy="balanced", weight_bits=8,
                        fuses=_on_cuda))
