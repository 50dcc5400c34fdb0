"""2:4 sparse linears applied after training (accuracy="aggressive"; the numerics gate judges each site).

`sparse24`: every group of 4 weights along K keeps its 2 largest |w|. Few rows (<= GEMV_MAX_ROWS): the Triton
GEMV over the compressed weights (half the values + 2-bit indices, 9/16 of the bytes; no sparse MMA). More rows:
cuSPARSELt's sparse tensor cores (torch._cslt_sparse_mm) where it takes the shape (CUDA, fp16/bf16, N and K
multiples of 16: torch's SparseSemiStructuredTensorCUSPARSELT constraints), else the Triton GEMM. One custom op
chooses at run time from the row count, so both formats are kept (about 9/8 of the dense weight's bytes).
Other sites and devices are refused (CPU: only under the interpreter).

`ternary_sparse24` (Sparse-BitNet): ternary weights first (ternary.py), then the 2:4 mask chosen by the original
|w|; the kept half stored as 2-bit codes + 2-bit indices (2 bits a weight: the bytes of dense ternary, so the
gain over it would need sparse int8 MMA, which this kernel does not use). int8 activations as in `ternary`.
The scale is the dense row's absmean (Sparse-BitNet's quant-then-mask), about half the kept weights' size: after
training without it a site stays under ~7 dB (6 dB for exactly ternary 2:4 weights) and fails the 8 dB gate.
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from ..cost import formulas
from .packed_linear import (
    GEMV_MAX_ROWS,
    pack2,
    packed_mm,
    padded_k,
    triton_applicable,
    triton_cost,
    unpack2,
)
from .registry import Implementation, Replacement, pack_once, register
from .ternary import DTYPES as TERNARY_DTYPES
from .ternary import int8_ternary_linear, ternary_quantize

CUSPARSELT_ALIGN = 16  # cuSPARSELt's min and multiple for both sparse dims at fp16/bf16 (dense rows: 8)
# torch._cslt_sparse_mm sets up its cuSPARSELt plan on every call: ~0.5 ms of host time measured on the H100
# (M=64 and 4096, 4096 x 4096: 0.54-0.63 ms eager against 0.02-0.23 ms replayed from a CUDA graph)
CUSPARSELT_HOST_S = 5e-4


def keep_24(weight_nk: torch.Tensor) -> torch.Tensor:
    """[N, K] -> int64 [N, padded K / 4, 2]: the positions (ascending) of the 2 largest |w| in each group of 4
    along K (K zero-padded)."""
    w = F.pad(weight_nk.detach().float().abs(), (0, padded_k(weight_nk.shape[1]) - weight_nk.shape[1]))
    return w.reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices.sort(dim=-1).values


def compress_24(weight_nk: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, padded K / 2] in the weight's dtype, 2-bit index fields uint8 [N, padded K / 8])."""
    N, K = weight_nk.shape
    w = F.pad(weight_nk.detach(), (0, padded_k(K) - K)).reshape(N, -1, 4)
    return w.gather(-1, keep).reshape(N, -1).contiguous(), pack2(keep.reshape(N, -1))


def decompress_24(values: torch.Tensor, fields: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of compress_24: dense [N, k] with zeros where nothing was kept."""
    N = values.shape[0]
    keep = unpack2(fields).long().reshape(N, -1, 2)
    dense = values.new_zeros(N, keep.shape[1], 4).scatter_(-1, keep, values.reshape(N, -1, 2))
    return dense.reshape(N, -1)[:, :k]


def uses_cusparselt(device: torch.device, dtype: torch.dtype, n: int, k: int) -> bool:
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and n % CUSPARSELT_ALIGN == 0
            and k % CUSPARSELT_ALIGN == 0 and torch.backends.cusparselt.is_available())


def _cusparselt_mm(x: torch.Tensor, compressed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) with W compressed by torch._cslt_compress; rows padded to a multiple of 8."""
    M = x.shape[0]
    xp = F.pad(x, (0, 0, 0, -M % 8))
    return torch._cslt_sparse_mm(compressed, xp.t(), bias=bias, transpose_result=True)[:M]


@torch.library.custom_op("torchfx_eff::sparse24_mm", mutates_args=())
def sparse24_mm(x: torch.Tensor, values: torch.Tensor, fields: torch.Tensor, compressed: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias): cuSPARSELt above GEMV_MAX_ROWS rows when `compressed` is given, else Triton."""
    if compressed is not None and x.shape[0] > GEMV_MAX_ROWS:
        return _cusparselt_mm(x.contiguous(), compressed, bias)
    return packed_mm(x, None, values, fields, None, bias, x.dtype)


@sparse24_mm.register_fake
def _(x, values, fields, compressed, bias):
    return x.new_empty(x.shape[0], values.shape[0])


def sparse24_linear(x, values, fields, compressed, bias):
    out = torch.ops.torchfx_eff.sparse24_mm.default(x.reshape(-1, x.shape[-1]), values, fields, compressed, bias)
    return out.reshape(*x.shape[:-1], values.shape[0])


def _site_cusparselt(site) -> bool:
    return uses_cusparselt(site.device, site.dtype, site.size("N"), site.size("K"))


def _sparse24_applicable(site, spec) -> str | None:
    # fp32: cuSPARSELt takes no fp32 and the Triton GEMM would skip the tensor cores; the interpreter takes it (tests)
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if site.device.type != "cuda" else ())
    return triton_applicable(site, dtypes, "2:4 sparse weights")


def _sparse24_cost(site, spec):
    if not _site_cusparselt(site):
        return triton_cost(formulas.linear_sparse24(site, spec, GEMV_MAX_ROWS, "sparse24_gemm"), spec)
    cost = triton_cost(formulas.linear_sparse24(site, spec, GEMV_MAX_ROWS, "sparse24_cusparselt"), spec)
    if spec.custom_op_s == 0:  # replayed from a CUDA graph: no host work
        return cost
    return cost + sympy.Piecewise((CUSPARSELT_HOST_S, site.dims["M"] > GEMV_MAX_ROWS), (0, True))


def _sparse24_replace(site) -> Replacement:
    layout = f"{site.weight_layout}_{site.dtype}"

    def pack():
        w = site.weight_nk().to(site.dtype)
        return compress_24(w, keep_24(w))

    values, fields = pack_once(site.weight, f"sparse24_{layout}", pack)
    compressed = None
    if _site_cusparselt(site):
        compressed = pack_once(site.weight, f"sparse24_cusparselt_{layout}",
                               lambda: torch._cslt_compress(decompress_24(values, fields, site.size("K")).contiguous()))
    after = sum(t.nbytes for t in (values, fields, compressed) if t is not None)
    return Replacement(sparse24_linear, (site.x, values, fields, compressed, site.bias),
                       weight_bytes=(site.weight.nbytes, after), sources={site.weight_name: site.weight})


register(Implementation("sparse24", "linear", _sparse24_applicable, _sparse24_cost, _sparse24_replace,
                        accuracy="aggressive"))


def ternary_sparse24_pack(weight_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept ternary codes + 1 as 2-bit fields [N, padded K / 8], index fields [N, padded K / 8], fp32 scales [N]):
    the ternary quantizer's codes and scales, masked 2:4 by the original |w|."""
    codes, scale = ternary_quantize(weight_nk)
    kept, fields = compress_24(codes, keep_24(weight_nk))
    return pack2(kept + 1), fields, scale


def _ternary_sparse24_applicable(site, spec) -> str | None:
    return triton_applicable(site, TERNARY_DTYPES, "ternary 2:4 weights")


def _ternary_sparse24_cost(site, spec):
    return triton_cost(formulas.linear_ternary_sparse24(site, spec, GEMV_MAX_ROWS), spec)


def _ternary_sparse24_replace(site) -> Replacement:
    w, fields, scale = pack_once(site.weight, f"ternary_sparse24_{site.weight_layout}",
                                 lambda: ternary_sparse24_pack(site.weight_nk()))
    return Replacement(int8_ternary_linear, (site.x, w, fields, scale, site.bias),
                       weight_bytes=(site.weight.nbytes, w.nbytes + fields.nbytes + scale.nbytes),
                       sources={site.weight_name: site.weight})


register(Implementation("ternary_sparse24", "linear", _ternary_sparse24_applicable, _ternary_sparse24_cost,
                        _ternary_sparse24_replace, accuracy="aggressive", weight_bits=2))
