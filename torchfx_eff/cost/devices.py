"""Device specs: the roofline numbers cost formulas are evaluated against."""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cache import cache_dir, read_json, write_json


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    type: str  # "cuda" | "cpu"
    flops: dict[str, float]  # dense matmul FLOP/s by dtype name, as reached by the vendor GEMM
    bandwidth: float  # bytes/s of a device-to-device copy (read + write)
    launch_s: float  # fixed cost of one kernel launch or op dispatch
    # kernel key -> (fraction of `flops`, fraction of `bandwidth`) that kernel reaches
    efficiency: dict[str, tuple[float, float]] = field(default_factory=dict)
    custom_op_s: float = 0.0  # extra fixed cost of calling a Python-implemented custom op (torch.library)

    def eff(self, kernel: str) -> tuple[float, float]:
        return self.efficiency.get(kernel, (1.0, 1.0))

    def matmul_flops(self, dtype: torch.dtype) -> float:
        return self.flops.get(str(dtype).removeprefix("torch."), self.flops["float32"])


# Hopper figures are this workplace's measurements (ANCHORS.md): GEMM 692-798 TFLOP/s bf16, copy 3.0 TB/s (H100)
# and 4.3 TB/s (H200); SDPA flash 355, cuDNN 556-632, efficient 180, triton_flash 488 TFLOP/s at head dim 128, and
# at decode 2.3 (flash) / 2.6 TB/s (cuDNN, triton_flash) (bench/results/gpu_attention-*); cuBLAS GEMV ~0.7 of copy bandwidth;
# ATen's int8pack_mm on CUDA reaches only ~150 GB/s. A100 and L40S use vendor peaks scaled like Hopper's.
_HOPPER_EFFICIENCY = {
    "sdpa_flash": (0.50, 0.77), "sdpa_cudnn": (0.82, 0.88), "sdpa_efficient": (0.25, 0.7), "sdpa_math": (0.10, 0.2),
    "triton_flash": (0.67, 0.88),
    "dense_bfloat16": (1.0, 0.7), "dense_float16": (1.0, 0.7), "dense_float32": (1.0, 0.7), "int8pack": (0.2, 0.05),
    # Low-bit Triton kernels (kernels/packed_linear.py), one H100 run, CUDA graphs, bf16, N = K = 4096..8192: decoding
    # in registers bounds them (ternary GEMV 3-4 TFLOP/s, 360-440 GB/s of packed weights; 2:4 GEMVs ~0.8 TFLOP/s;
    # GEMMs at M=64: ternary 12, 2:4 ~6.5 TFLOP/s); cuSPARSELt 608 TFLOP/s at 4096^3 (its host time is charged apart)
    "ternary_gemv": (0.0055, 0.15), "ternary_gemm": (0.017, 0.15), "ternary_sparse24_gemv": (0.0011, 0.15),
    "ternary_sparse24_gemm": (0.009, 0.15), "sparse24_gemv": (0.0011, 0.15), "sparse24_gemm": (0.009, 0.15),
    "sparse24_cusparselt": (0.84, 0.7),
    # 8-bit GEMMs after a per-row activation quantization, the GEMM alone measured on the H100 (torch 2.11, Triton 3.6;
    # K x N = 4096 x 14336 and 8192 x 8192): FLOPs as a fraction of the bf16 rate (8-bit tensor cores double it) at
    # M=4096, weight bytes as a fraction of copy bandwidth at M=1..16. The Triton fp8 GEMM promotes its accumulator to
    # fp32 every K block, which costs it a third of _scaled_mm's rate; its int8 twin needs no promotion.
    "fp8_scaled_mm": (1.6, 0.65), "fp8_triton": (1.1, 0.75), "w8a8_triton": (1.55, 0.8),
    # weight-only Triton kernels (int4/int8_weight_only) on the H100, L2-cold (bench/results/gpu_linear-*): the GEMV
    # (1-2 rows) reaches 0.37-0.59 (int4, at 8-64 MB matrices; 0.2-0.33 at the 2-6 MB ones of a 1.1B model) / 0.55-0.8
    # (int8) of copy bandwidth at one row and decodes the weights again
    # for each further row (its FLOP fraction); int4's GEMM reaches 0.3 of the bf16 rate at 2048 rows and, its K
    # split where its tiles are few (gemm_splits), 0.15-0.21 of bandwidth at 4-16; int8's MMA GEMM 0.66-0.71 of
    # the bf16 rate at 1024-4096 rows and 0.44-0.71 of bandwidth at 16 (scratch sweep, 5 shapes, 2026-12-06)
    # the decoding pass (from 64 rows) moves its bytes (packed in, decoded out) at 0.88-0.97 (int4) and 0.91-0.93
    # (int8) of copy bandwidth (4096x4096: 14.8 / 18.1 us; 4096x14336: 57 / 65 us)
    "int4_decode": (1.0, 0.9), "int8_decode": (1.0, 0.9),
    # MoE experts' int8 Triton kernel (kernels/experts.py) at Mixtral 8x7B's stacks (bench/results/gpu_linear-experts-*):
    # 0.76-1.0 of copy bandwidth in the int8 weights read at 2-32 rows, ~300 TFLOP/s (0.42 of the bf16 rate) at 1024
    "int8_experts": (0.42, 0.76),
    # its int4 kernel, the same stacks (gpu_linear-experts-*-2026-12-08): 0.23-0.56 TB/s of int4 bytes (0.075-0.19
    # of copy) at 2-32 rows, 39 TFLOP/s (0.055) at 1024: slower than bf16 _grouped_mm everywhere, so never chosen there
    "int4_experts": (0.055, 0.075),
    # the GEMVs' FLOP fractions: int4 >= 0.0072 measured (5.7 TFLOP/s at 4096x14336, M=1, still bandwidth-bound),
    # int8 >= 0.0070 (23.1 us at 4096x14336, e54bd7d; 0.004 had costed its M=1 GEMV compute-bound, 15.7 us at
    # 2048x8192 where it ran 9.4); their cost at 2 rows is unmeasured (bench/run.py --parts crossover times it)
    "int4_gemv": (0.008, 0.45), "int4_gemm": (0.3, 0.15), "int8_gemv": (0.007, 0.6), "int8_gemm": (0.66, 0.55),
}


def _gpu(name, bf16_flops, bandwidth, efficiency=_HOPPER_EFFICIENCY) -> DeviceSpec:
    flops = {"bfloat16": bf16_flops, "float16": bf16_flops, "float32": bf16_flops / 2}  # fp32 runs as TF32
    # custom_op_s: Python dispatch, as measured on CPU here (~15 us); unmeasured on GPUs
    return DeviceSpec(name, "cuda", flops, bandwidth, launch_s=4e-6, custom_op_s=15e-6, efficiency=dict(efficiency))


SPECS = {
    "h100": lambda: _gpu("h100", 720e12, 3.0e12),
    "h200": lambda: _gpu("h200", 720e12, 4.3e12),
    "a100": lambda: _gpu("a100", 230e12, 1.7e12),
    "l40s": lambda: _gpu("l40s", 260e12, 0.78e12),
    "cuda": lambda: generic_cuda(torch.cuda.current_device()),
    "cpu": lambda: measured_cpu(),
}


def generic_cuda(index: int) -> DeviceSpec:
    """A CUDA device we have no table for: peaks estimated from its properties."""
    p = torch.cuda.get_device_properties(index)
    per_sm_per_clock = {8: 2048, 9: 4096}.get(p.major, 1024)  # dense bf16 FLOP per SM per cycle, by generation
    clock_hz = getattr(p, "clock_rate", 1_500_000) * 1e3
    bus_bits, mem_khz = getattr(p, "memory_bus_width", 0), getattr(p, "memory_clock_rate", 0)
    bandwidth = 2 * mem_khz * 1e3 * bus_bits / 8 * 0.85 if bus_bits and mem_khz else 1e12
    return _gpu(f"cuda:{p.name}", 0.75 * p.multi_processor_count * clock_hz * per_sm_per_clock, bandwidth)


def detect(device: torch.device) -> DeviceSpec:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        known = next((k for k in ("h100", "h200", "a100", "l40s") if k in name), "cuda")
        return SPECS[known]()
    return measured_cpu()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _seconds(fn, reps=5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


_cpu_spec: DeviceSpec | None = None


def measured_cpu() -> DeviceSpec:
    """The host CPU, measured once by a microbenchmark (about a second) and cached on disk."""
    global _cpu_spec
    if _cpu_spec is not None:
        return _cpu_spec
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}|spec=3"
    path = cache_dir() / "devices.json"
    cached = read_json(path, {})
    if key in cached:
        d = cached[key]
        d["efficiency"] = {k: tuple(v) for k, v in d["efficiency"].items()}
        _cpu_spec = DeviceSpec(**d)
        return _cpu_spec
    _cpu_spec = _measure_cpu()
    cached[key] = asdict(_cpu_spec)
    write_json(path, cached)
    return _cpu_spec


@torch.no_grad()
def _measure_cpu() -> DeviceSpec:
    src, dst = torch.ones(16 * 2**20), torch.empty(16 * 2**20)  # 64 MiB each, beyond any last-level cache
    bandwidth = 2 * src.nbytes / _seconds(lambda: dst.copy_(src))
    tiny = torch.ones(1)
    launch_s = _seconds(lambda: [tiny.add(1) for _ in range(100)]) / 100
    flops, efficiency = {}, {}
    n, k = 4096, 4096  # weights larger than a last-level cache, as a model's are
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        a, b = torch.randn(128, 1024, dtype=dtype), torch.randn(1024, 512, dtype=dtype)
        flops[name] = 2 * 128 * 1024 * 512 / _seconds(lambda: a @ b, reps=3)
        w, x = torch.randn(n, k, dtype=dtype), torch.randn(1, k, dtype=dtype)
        efficiency[f"dense_{name}"] = (1.0, w.nbytes / _seconds(lambda: torch.nn.functional.linear(x, w)) / bandwidth)
    # ATen int8 weight-only matmul with bf16 activations: bandwidth at M=1, compute at M=64
    wq, s = torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16)
    x1, x64 = torch.randn(1, k, dtype=torch.bfloat16), torch.randn(64, k, dtype=torch.bfloat16)
    gemv = wq.nbytes / _seconds(lambda: torch._weight_int8pack_mm(x1, wq, s)) / bandwidth
    gemm = 2 * 64 * n * k / _seconds(lambda: torch._weight_int8pack_mm(x64, wq, s), reps=3) / flops["bfloat16"]
    efficiency["int8pack"] = (gemm, gemv)
    # ATen int4 (group 64) weight-only matmul, likewise
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // 64, n, 2, dtype=torch.bfloat16)
    int4 = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 64, sz)
    efficiency["int4pack"] = (2 * 64 * n * k / _seconds(lambda: int4(x64), reps=3) / flops["bfloat16"],
                              (w4.nbytes + sz.nbytes) / _seconds(lambda: int4(x1)) / bandwidth)
    q = torch.randn(1, 8, 512, 64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    efficiency["sdpa_cpu"] = (4 * 8 * 512 * 512 * 64 / _seconds(lambda: sdpa(q, q, q)) / flops["float32"], 1.0)
    efficiency["elementwise"] = (1.0, 1.0)
    from ..kernels.sdpa import sdpa as pinned_sdpa  # a real custom op, against the ATen call it wraps

    t = torch.randn(1, 1, 1, 8)
    custom_op_s = max(0.0, _seconds(lambda: [pinned_sdpa(t, t, t, None, False, None, False, "sdpa_cpu") for _ in range(50)])
                      / 50 - _seconds(lambda: [sdpa(t, t, t) for _ in range(50)]) / 50)
    return DeviceSpec(f"cpu:{cpu_model()}", "cpu", flops, bandwidth, launch_s, efficiency, custom_op_s)
