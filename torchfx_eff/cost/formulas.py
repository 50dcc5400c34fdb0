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
    return _aten_weight_only(site, spec, M, N, K, N * K + 2 * N, "int8pack")


def _aten_weight_only(site, spec: DeviceSpec, M, N, K, weight_bytes, kernel: str, matrices=1, Kp=None) -> sympy.Expr:
    """ATen's CPU int8/int4 pack matmul (`kernel`) once per weight matrix of weight_bytes over M rows in all, with
    bf16 activations (others cast around it) padded to Kp (int4's groups) when given."""
    Kp = K if Kp is None else Kp
    cost = roofline(2 * M * N * Kp, matrices * weight_bytes + 2 * (M * Kp + M * N), spec, torch.bfloat16, kernel,
                    launches=matrices)
    if site.dtype != torch.bfloat16:  # a cast in and a cast out, each read + write
        cost += roofline(0, (M * K + M * N) * (itemsize(site.dtype) + 2), spec, site.dtype, "elementwise", launches=2)
    return cost


def padded(K, group_size: int):
    return sympy.ceiling(K / group_size) * group_size


def int4_bytes(N, K, group_size: int):
    """An [N, K] weight in int4 codes with a bf16 scale and zero per group of group_size (K padded to the group)."""
    return N * padded(K, group_size) / 2 + 4 * N * padded(K, group_size) / group_size


def experts_dense(site, spec: DeviceSpec) -> sympy.Expr:
    """MoE experts' product as spelled: the A experts' weights read in the site's dtype, S rows in and out."""
    S, A, N, K = (site.dims[d] for d in "SANK")
    b = itemsize(site.dtype)
    return roofline(2 * S * N * K, (A * N * K + S * K + S * N) * b, spec, site.dtype, f"dense_{dtype_name(site.dtype)}")


def experts_weight_only(site, spec: DeviceSpec, bits: int, group_size: int, kernel: str) -> sympy.Expr:
    """MoE experts with int8 weights (per-channel bf16 scales) or int4 ones (a bf16 scale and zero per group): ATen's
    CPU kernel ("int8pack"/"int4pack") once per expert read; otherwise the Triton kernel that `kernel` keys, with
    activations in the site's dtype."""
    S, A, N, K = (site.dims[d] for d in "SANK")
    weight_bytes = N * K + 2 * N if bits == 8 else int4_bytes(N, K, group_size)
    if kernel.endswith("pack"):
        return _aten_weight_only(site, spec, S, N, K, weight_bytes, kernel, A, padded(K, group_size) if bits == 4 else K)
    return roofline(2 * S * N * K, A * weight_bytes + (S * K + S * N) * itemsize(site.dtype), spec, site.dtype, kernel)


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


def epilogue(site, spec: DeviceSpec, fused) -> sympy.Expr:
    """What a linear's epilogue (site.epilogue) adds to its kernel where `fused` (a condition over the site's sizes,
    or True/False) holds and where not. Unfused: one pointwise pass (Inductor fuses the ops into one kernel) that
    reads the linear's output and the operand and writes the result. Fused: only the operand's read and the result's
    bytes beyond the linear output's, which the kernel's own cost counts; the output's round trip and a launch are
    saved."""
    ep = site.epilogue
    M, N = site.dims["M"], site.dims["N"]
    linear_out = M * N * itemsize(site.dtype)
    result = M * (N / 2 if ep.pairs else N) * (itemsize(ep.dtype) + (itemsize(ep.operand_dtype) if ep.operand is not None else 0))
    in_kernel = (result - linear_out) / (spec.bandwidth * spec.eff("elementwise")[1])
    return sympy.Piecewise((in_kernel, fused), (roofline(0, linear_out + result, spec, site.dtype, "elementwise"), True))


def evaluate(expr: sympy.Expr, hints: dict) -> float:
    return float(expr.xreplace(hints))


def _int8_activations_linear(site, spec: DeviceSpec, weight_bytes, kernel: str) -> sympy.Expr:
    """An int8 x low-bit weight kernel (FLOPs at the bf16 rate times the kernel's efficiency), after one fused
    pass that quantizes the activations per row (read x, write int8 x and fp32 row scales)."""
    M, N, K = (site.dims[d] for d in "MNK")
    b = itemsize(site.dtype)
    matmul = roofline(2 * M * N * K, weight_bytes + 4 * N + M * K + 4 * M + M * N * b, spec, torch.bfloat16, kernel)
    return matmul + roofline(0, M * K * (b + 1) + 4 * M, spec, site.dtype, "elementwise")


def _by_rows(site, split_rows: int, few: sympy.Expr, many: sympy.Expr) -> sympy.Expr:
    """`few` when the site has at most split_rows rows (a GEMV-style kernel), else `many`."""
    return sympy.Piecewise((few, site.dims["M"] <= split_rows), (many, True))


def linear_ternary(site, spec: DeviceSpec, split_rows: int) -> sympy.Expr:
    """Ternary weights, 2 bits each, with fp32 per-channel scales; int8 activations. A GEMV up to split_rows
    rows, a GEMM above (keys ternary_gemv / ternary_gemm)."""
    N, K = site.dims["N"], site.dims["K"]
    return _by_rows(site, split_rows, _int8_activations_linear(site, spec, N * K / 4, "ternary_gemv"),
                    _int8_activations_linear(site, spec, N * K / 4, "ternary_gemm"))


def linear_ternary_sparse24(site, spec: DeviceSpec, split_rows: int) -> sympy.Expr:
    """Ternary 2:4: the kept half's 2-bit codes and 2-bit indices (2 bits a weight); int8 activations."""
    N, K = site.dims["N"], site.dims["K"]
    return _by_rows(site, split_rows, _int8_activations_linear(site, spec, N * K / 4, "ternary_sparse24_gemv"),
                    _int8_activations_linear(site, spec, N * K / 4, "ternary_sparse24_gemm"))


def linear_sparse24(site, spec: DeviceSpec, split_rows: int, many_rows_kernel: str) -> sympy.Expr:
    """2:4 weights: half the values in the site's dtype + 2-bit indices. The Triton GEMV up to split_rows
    rows (key sparse24_gemv), `many_rows_kernel` above (sparse24_cusparselt or sparse24_gemm)."""
    M, N, K = (site.dims[d] for d in "MNK")
    nbytes = N * K * itemsize(site.dtype) / 2 + N * K / 8 + (M * K + M * N) * itemsize(site.dtype)
    return _by_rows(site, split_rows, roofline(2 * M * N * K, nbytes, spec, site.dtype, "sparse24_gemv"),
                    roofline(2 * M * N * K, nbytes, spec, site.dtype, many_rows_kernel))


def linear_fp8(site, spec: DeviceSpec, kernel: str = "fp8_scaled_mm") -> sympy.Expr:
    """e4m3 weights (N*K bytes) with fp32 channel scales, activations quantized to e4m3 per row at run time (one
    fused pass), fp32 accumulation. `kernel` keys the GEMM's efficiency (fp8 tensor cores: up to twice the bf16
    rate). torch._scaled_mm adds no bias to fp32 output: that costs one more elementwise pass."""
    M, N = site.dims["M"], site.dims["N"]
    cost = _int8_activations_linear(site, spec, N * site.dims["K"], kernel)
    if kernel == "fp8_scaled_mm" and site.bias is not None and site.dtype == torch.float32:
        cost += roofline(0, M * N * 8, spec, site.dtype, "elementwise")
    return cost


def linear_w8a8(site, spec: DeviceSpec) -> sympy.Expr:
    """SmoothQuant: int8 weights (N*K bytes), activations smoothed and quantized to int8 per row at run time (one
    fused pass). CUDA: the Triton int8 GEMM, dequantizing in its epilogue, plus a custom op's dispatch. CPU:
    ATen's _int_mm writes an int32 result that one more fused pass dequantizes (key "int_mm"; a spec that has
    not measured it is taken at the bf16 rate)."""
    M, N, K = (site.dims[d] for d in "MNK")
    if spec.type == "cuda":
        return _int8_activations_linear(site, spec, N * K, "w8a8_triton") + spec.custom_op_s
    b = itemsize(site.dtype)
    quantize = roofline(0, M * K * (b + 1) + 4 * M, spec, site.dtype, "elementwise")
    matmul = roofline(2 * M * N * K, N * K + M * K + 4 * M * N, spec, torch.bfloat16, "int_mm")
    return quantize + matmul + roofline(0, M * N * (4 + b) + 4 * (M + N), spec, site.dtype, "elementwise")


def linear_weight_only_triton(site, spec: DeviceSpec, bits: int, weight_bytes, gemv_rows: int,
                              dequantize_rows: int) -> sympy.Expr:
    """A weight-only Triton kernel (int4/int8 weights decoded in registers) in the regime it runs in: the GEMV
    (key "int{bits}_gemv", CUDA-core FMAs) up to gemv_rows rows, the tl.dot GEMM ("int{bits}_gemm") above, and
    from dequantize_rows rows one decoding pass (read the packed weights, write them in the site's dtype) before
    the dense matmul ("int{bits}_decode"). Activations and output move in the site's dtype."""
    M, N, K = (site.dims[d] for d in "MNK")
    b = itemsize(site.dtype)
    flops, nbytes = 2 * M * N * K, weight_bytes + (M * K + M * N) * b
    gemv, gemm = (roofline(flops, nbytes, spec, site.dtype, f"int{bits}_{kind}") for kind in ("gemv", "gemm"))
    decoded = roofline(0, weight_bytes + N * K * b, spec, site.dtype, f"int{bits}_decode") + linear_dense(site, spec)
    return sympy.Piecewise((gemv, M <= gemv_rows), (gemm, M < dequantize_rows), (decoded, True))


def linear_int4_weight_only(site, spec: DeviceSpec, group_size: int = 64,
                            triton_rows: tuple[int, int] | None = None) -> sympy.Expr:
    """int4 weights with a bf16 scale and zero per group of group_size along K (K padded to the group): N*Kp/2 +
    4*N*Kp/group_size bytes. triton_rows=None: ATen's CPU kernel (key "int4pack"), which takes bf16 activations,
    so other dtypes are cast around it, as for int8. Otherwise the Triton kernels, with triton_rows = (gemv_rows,
    dequantize_rows) (linear_weight_only_triton)."""
    M, N, K = (site.dims[d] for d in "MNK")
    weight_bytes = int4_bytes(N, K, group_size)
    if triton_rows is not None:
        return linear_weight_only_triton(site, spec, 4, weight_bytes, *triton_rows)
    return _aten_weight_only(site, spec, M, N, K, weight_bytes, "int4pack", Kp=padded(K, group_size))
