"""fp8 linears: e4m3 weights with per-output-channel scales (packed once), activations quantized to e4m3 per row
(token) at run time, fp32 accumulation, output in the activation dtype, bias added.

Two candidates, one quantization: `fp8` runs the Triton GEMM of quant_gemm.py (dequantization and bias in its
epilogue), `fp8_scaled_mm` runs ATen's `torch._scaled_mm` with row-wise scales (cuBLASLt / CUTLASS). Only a
GPU with fp8 tensor cores makes either worth it; elsewhere they are refused (torch._scaled_mm also runs on CPU,
and Triton's interpreter runs the fp8 GEMM, which is how the tests check the math without a GPU).
"""
from __future__ import annotations

import torch

from ..cost import formulas
from .quant_gemm import quantize_rows, scaled_linear
from .registry import Implementation, Replacement, needs_dtype, pack_fused, register

E4M3 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x.reshape(-1, x.shape[-1]), E4M3)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, epilogue: str = "",
               operand: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ (q * scales[:, None]).T (+ bias), x quantized to e4m3 per row, then the epilogue; the Triton GEMM."""
    return scaled_linear(x, *_rows(x), q, scales, bias, epilogue, operand, out_dtype)


def fp8_scaled_mm_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same through torch._scaled_mm, which adds the bias in its epilogue, except for fp32 output (CUDA
    refuses that): then it is one elementwise pass that Inductor fuses."""
    xq, row_scales = _rows(x)
    fused_bias = bias if x.dtype != torch.float32 else None
    out = torch._scaled_mm(xq, q.t(), bias=fused_bias, scale_a=row_scales[:, None], scale_b=scales[None, :], out_dtype=x.dtype)
    if bias is not None and fused_bias is None:
        out = out + bias
    return out.reshape(*x.shape[:-1], q.shape[0])


def _needs_fp8_gpu(site, capability: tuple[int, int] = (8, 9)) -> str | None:
    need = f"fp8 needs a CUDA device with compute capability >= {capability[0]}.{capability[1]}"
    if site.device.type != "cuda":
        return f"{need}, site is on {site.device.type}"
    have = torch.cuda.get_device_capability(site.device)
    if have < capability:
        return f"{need}, {torch.cuda.get_device_name(site.device)} is {have[0]}.{have[1]}"
    return None


def _common(site) -> str | None:
    if not site.weight.is_floating_point():
        return f"weight dtype {site.weight.dtype} is not floating point"
    return needs_dtype(site, DTYPES)


def _triton_applicable(site, spec) -> str | None:
    return _needs_fp8_gpu(site) or _common(site)


def _scaled_mm_applicable(site, spec) -> str | None:
    # row-wise scaled fp8 GEMMs are CUTLASS kernels built for Hopper and newer
    if reason := _needs_fp8_gpu(site, (9, 0)) or _common(site):
        return reason
    N, K = site.size("N"), site.size("K")
    if N % 16 or K % 16:
        return f"N={N} and K={K} must be multiples of 16 for torch._scaled_mm"
    return None


def _replacement(op):
    def replace(site) -> Replacement:  # only the Triton GEMM (fp8_linear) fuses epilogues
        (q, scales), bias, epilogue = pack_fused(site, f"fp8_e4m3_rows_{site.weight_layout}",
                                                 lambda: quantize_rows(site.weight_nk(), E4M3))
        return Replacement(op, (site.x, q, scales, bias, *epilogue), weight_bytes=(site.weight.nbytes, q.nbytes + scales.nbytes),
                           sources={site.weight_name: site.weight})

    return replace


register(Implementation("fp8", "linear", _triton_applicable,
                        lambda site, spec: formulas.linear_fp8(site, spec, "fp8_triton") + spec.custom_op_s,
                        _replacement(fp8_linear), accuracy="balanced", weight_bits=8, fuses=lambda site: True))
register(Implementation("fp8_scaled_mm", "linear", _scaled_mm_applicable, formulas.linear_fp8,
                        _replacement(fp8_scaled_mm_linear), accuracy="balanced", weight_bits=8))
