"""GPU linear suite: every registered linear candidate's kernel at decode (GEMV) and prefill (GEMM) sizes
against cuBLAS bf16 and ATen's int8/int4 pack matmuls, measured in the same run; and batch-1 decode of a
random-init 1.1B Llama (static cache, CUDA graphs) against torch.compile max-autotune."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import sympy
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

import torchfx_eff
from torchfx_eff import cost, kernels
from torchfx_eff.kernels import weight_only_triton
from torchfx_eff.passes.sites import ExpertsSite, LinearSite

from models import llama

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (2048, 8192), (8192, 2048)]  # (K in, N out)
ROWS = [1, 16, 128, 4096]
COPY_BANDWIDTH = 3.0e12  # H100 device-to-device copy, ANCHORS.md: the GEMV targets are fractions of it


DECODE_TIMEOUT_S = 420  # one mode's process: build, compile with autotuning, prefill, decode
DECODE_TARGET = {"int4_weight_only": 1400.0}  # tok/s: above the bf16 bandwidth bound (1368)
COLD_BYTES = 320 << 20  # bf16 weights cycled through per timed pass: even int4 copies overflow the 50 MB L2


def _ms(fns) -> float | None:
    """Median ms of one call, the calls cycling over weight copies so that decode-sized weights come from HBM."""
    try:
        run = lambda: [fn() for fn in fns]
        run()
        torch.cuda.synchronize()
        return do_bench_cudagraph(run, rep=100, return_mode="median") / len(fns)
    except RuntimeError:  # a vendor kernel that refuses this shape
        return None


def copy_ms(nbytes: int) -> float:
    """ms of an ATen device-to-device copy moving nbytes (half read, half written), cycling over buffers of
    COLD_BYTES in all so that each copy reads from HBM."""
    pairs = [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),
              torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")) for _ in range(-(-COLD_BYTES // nbytes))]
    return _ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs])


@triton.jit
def _stream_read(p, out, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Reads CHUNK int32 words a program, BLOCK at a time, and writes their xor: nothing but the reads."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.xor_sum(acc, 0))


# (BLOCK, CHUNK / BLOCK, warps): the winners of an 8-config sweep at 4-58 MB and 1 GiB (H100, 2026-12-06)
READ_CONFIGS = [(1024, 1, 4), (1024, 4, 8), (4096, 1, 8)]


def read_ms(nbytes: int) -> float:
    """ms of the fastest READ_CONFIGS kernel that only reads nbytes, L2-cold as copy_ms: a GEMV's ceiling at its
    size (launch, DRAM latency and the last wave weigh more the fewer the bytes)."""
    words = nbytes // 4
    bufs = [torch.empty(words, dtype=torch.int32, device="cuda") for _ in range(-(-COLD_BYTES // nbytes))]
    out = torch.empty(triton.cdiv(words, 1024), dtype=torch.int32, device="cuda")
    return min(_ms([lambda p=p, b=b, s=s, w=w: _stream_read[(triton.cdiv(words, b * s),)](
        p, out, words, CHUNK=b * s, BLOCK=b, num_warps=w) for p in bufs]) for b, s, w in READ_CONFIGS)


def ceiling_rows() -> list[dict]:
    """What moving bytes reaches on this device in this run: a 1 GiB copy (read and written bytes both counted)
    and a 1 GiB read."""
    return [{"name": "device-to-device copy 1 GiB", "value": (1 << 30) / copy_ms(1 << 30) / 1e9, "unit": "TB/s",
             "anchor": "ANCHORS.md copy (H100)", "anchor_value": COPY_BANDWIDTH / 1e12},
            {"name": "read 1 GiB", "value": (1 << 30) / read_ms(1 << 30) / 1e9, "unit": "TB/s"}]


def _site(x, weight) -> LinearSite:
    """A linear site over real tensors: what the matcher would build from a graph, for calling kernels directly."""
    M, (N, K) = x.shape[0], weight.shape
    dims = {"M": sympy.Integer(M), "N": sympy.Integer(N), "K": sympy.Integer(K)}
    return LinearSite(node=None, op="linear", location="bench", dtype=x.dtype, device=x.device, dims=dims,
                      x=x, weight=weight, weight_name="weight", weight_layout="nk")


def _aten_int4(w):
    """torch's tinygemm int4 (group 128) as the vendor anchor: a function of x."""
    N, K = w.shape
    groups = w.float().reshape(N, K // 128, 128)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    zeros = lo + 8 * scale  # tinygemm's zero point is the value of the middle code
    sz = torch.stack([scale.squeeze(-1), zeros.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)


def _anchor_bytes(N, K) -> dict:
    return {"cublas_bf16": 2 * N * K, "aten_int8pack": N * K + 2 * N, "aten_int4pack": N * K // 2 + 4 * N * K // 128}


def _anchors(x, w) -> dict:
    q8 = (w.float() / (w.float().abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    s8 = (w.float().abs().amax(1) / 127).to(torch.bfloat16)
    out = {"cublas_bf16": lambda: F.linear(x, w), "aten_int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8)}
    try:
        int4 = _aten_int4(w)
        out["aten_int4pack"] = lambda: int4(x)
    except RuntimeError:
        pass
    return out


def kernels_rows(modes=(), row_counts=ROWS) -> list[dict]:
    """Every linear implementation (those named in modes, when given) beside the anchors, at SHAPES x row_counts; at
    M = 1 also as a fraction of the speed of a copy and of a read of the same bytes (copy_ms, read_ms)."""
    spec = cost.detect(torch.device("cuda"))
    # Replacements that are Python functions (a prologue that quantizes x, casts) run as Inductor compiles them
    # inside the pipeline's graph; custom ops are called as they are.
    compiled = {}
    rows = []
    for K, N in SHAPES:
        for M in row_counts:
            copies = -(-COLD_BYTES // (2 * N * K)) if M <= 128 else 1  # large M: compute-bound, one copy
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            anchors = [_anchors(x, w) for w in ws]
            times = {name: (_ms([a[name] for a in anchors]), _anchor_bytes(N, K)[name]) for name in anchors[0]}
            for impl in kernels.implementations("linear"):
                if impl.replace is None or (modes and impl.name not in modes):
                    continue
                if why := impl.applicable(_site(x, ws[0]), spec):
                    rows.append({"name": f"K={K} N={N} M={M} {impl.name}", "value": None, "note": why})
                    continue
                reps = [impl.replace(_site(x, w)) for w in ws]
                op = reps[0].op
                if not isinstance(op, torch._ops.OpOverload):
                    op = compiled.setdefault(impl.name, torch.compile(op, dynamic=True))
                err = ((op(*reps[0].args, **reps[0].kwargs).float() - ref).norm() / ref.norm()).item()
                times[impl.name] = (_ms([lambda r=r, op=op: op(*r.args, **r.kwargs) for r in reps]), reps[0].weight_bytes[1], err)
            cublas = times["cublas_bf16"][0]
            for name, (ms, wbytes, *err) in times.items():
                if ms is None:
                    continue
                nbytes = wbytes + 2 * M * (K + N)
                row = {"name": f"K={K} N={N} M={M} {name}", "value": ms, "unit": "ms",
                       "GB/s": nbytes / ms / 1e6, "TFLOP/s": 2 * M * N * K / ms / 1e9,
                       "copy_bandwidth_fraction": nbytes / ms / 1e-3 / COPY_BANDWIDTH}
                if M == 1:
                    row.update(same_bytes_copy_fraction=copy_ms(nbytes) / ms, same_bytes_read_fraction=read_ms(nbytes) / ms)
                if err:
                    row["rel_err_vs_fp32"] = err[0]
                if name != "cublas_bf16":
                    row.update(anchor="cublas_bf16", anchor_value=cublas, ratio=cublas / ms)
                rows.append(row)
            del x, ws, anchors
    return rows


# The GEMVs the autotuner picks a config for, by linear mode: (autotuned kernel, its config pruner, PART).
TUNED_GEMVS = {"int4_weight_only": (weight_only_triton._gemv_int4_tuned, weight_only_triton._prune_gemv_int4, 8),
               "int8_weight_only": (weight_only_triton._gemv_tuned, weight_only_triton._prune_gemv, 64)}


def tuner_rows(modes=tuple(TUNED_GEMVS)) -> list[dict]:
    """Each weight-only GEMV's autotuned pick at M = 1 (registry.decode_bench timing each config, fresh cache) against
    the best of the configs it chose from, all timed as kernels_rows times the GEMV: weight copies back to back from
    one CUDA graph, through the mode's replacement (programmatic launch where the device has it)."""
    impls = {impl.name: impl for impl in kernels.implementations("linear")}
    rows = []
    for name in modes:
        tuned, prune, part = TUNED_GEMVS[name]
        configs = list(tuned.configs)
        for K, N in SHAPES:
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            reps = [impls[name].replace(_site(x, torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5))
                    for _ in range(-(-COLD_BYTES // (2 * N * K)))]
            calls = [lambda r=r: r.op(*r.args, **r.kwargs) for r in reps]
            try:
                tuned.cache.clear()
                calls[0]()
                pick = next(iter(tuned.cache.values()))
                times = {}
                for config in prune(configs, {"K": K, "N": N}, PART=part):
                    tuned.configs, tuned.cache = [config], {}  # one config: triton runs it untimed
                    if (ms := _ms(calls)) is not None:  # None: the config failed to run here
                        times[config] = ms
            finally:
                tuned.configs, tuned.cache = configs, {}
            best = min(times, key=times.get)
            rows.append({"name": f"K={K} N={N} M=1 {name} autotuner pick", "value": times[pick], "unit": "ms",
                         "anchor": "best config", "anchor_value": times[best], "ratio": times[best] / times[pick],
                         "pick": str(pick), "best": str(best),
                         "configs_ms": {str(c): t for c, t in sorted(times.items(), key=lambda kv: kv[1])}})
            del x, reps, calls
    return rows


CROSSOVER_ROWS = (1, 2, 3, 4)


def crossover_rows(modes=tuple(TUNED_GEMVS)) -> list[dict]:
    """Each weight-only mode's GEMV and GEMM at few rows, both forced (weight_only_triton.GEMV_MAX_ROWS set to M or
    0), timed as kernels_rows times them, beside the cost model's estimate of each path: where the GEMV should stop
    on this device. The row's value is the GEMV's time."""
    spec = cost.detect(torch.device("cuda"))
    impls = {impl.name: impl for impl in kernels.implementations("linear")}
    default, rows = weight_only_triton.GEMV_MAX_ROWS, []
    for K, N in SHAPES:
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(-(-COLD_BYTES // (2 * N * K)))]
        for M in CROSSOVER_ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            for name in modes:
                reps = [impls[name].replace(_site(x, w)) for w in ws]
                timed = {}
                try:
                    for path, gemv_rows in (("gemv", M), ("gemm", 0)):
                        weight_only_triton.GEMV_MAX_ROWS = gemv_rows
                        estimate = float(impls[name].cost(_site(x, ws[0]), spec))
                        timed[path] = (_ms([lambda r=r: r.op(*r.args, **r.kwargs) for r in reps]), estimate)
                finally:
                    weight_only_triton.GEMV_MAX_ROWS = default
                (gemv, gemv_est), (gemm, gemm_est) = timed["gemv"], timed["gemm"]
                rows.append({"name": f"K={K} N={N} M={M} {name} GEMV", "value": gemv, "unit": "ms",
                             "anchor": "the GEMM", "anchor_value": gemm, "ratio": gemm / gemv,
                             "estimate_ms": gemv_est * 1e3, "gemm_estimate_ms": gemm_est * 1e3,
                             "dispatched": "gemv" if M <= default else "gemm"})
            del x
        del ws
    return rows


# Mixtral 8x7B's expert stacks as (E, N, K): gate/up fused, down
EXPERT_STACKS = [(8, 28672, 4096), (8, 4096, 14336)]
EXPERT_TOKENS = [1, 16, 512]  # routed top-2: 2, 32 and 1024 rows


def experts_rows() -> list[dict]:
    """Each experts candidate's kernel against torch._grouped_mm over the same bf16 stack (cuBLAS/CUTLASS grouped
    GEMM), both over rows routed round-robin (at one token two experts have rows, so two experts' weights are read).
    Value: the bytes of the packed weights read over the kernel's time."""
    impls = [i for i in kernels.implementations("experts") if i.replace is not None]
    rows = []
    for E, N, K in EXPERT_STACKS:
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        for tokens in EXPERT_TOKENS:
            S = 2 * tokens
            counts = torch.bincount(torch.arange(S) % E, minlength=E)
            offs = counts.cumsum(0).to(torch.int32).cuda()
            x = torch.randn(S, K, device="cuda", dtype=torch.bfloat16)
            site = ExpertsSite(node=None, op="grouped_mm", location="bench", dtype=x.dtype, device=x.device,
                               dims={k: sympy.Integer(v) for k, v in dict(S=S, E=E, N=N, K=K, A=min(E, S)).items()},
                               x=x, offs=offs, weight=w, weight_name="w", weight_layout="enk")
            anchor = _ms([lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)])
            for impl in impls:
                rep = impl.replace(site)
                ours = _ms([lambda: rep.op(*rep.args, **rep.kwargs)])
                read = min(E, S) * rep.weight_bytes[1] / E
                rows.append({"name": f"experts E={E} N={N} K={K} S={S} {impl.name}", "value": read / ours / 1e9,
                             "unit": "TB/s (packed weights read)", "ms": ours, "anchor": "torch._grouped_mm bf16",
                             "anchor_value": min(E, S) * N * K * 2 / anchor / 1e9 if anchor else None,
                             "anchor_ms": anchor, "ratio": anchor / ours if anchor else None})
                del rep
            del x
        del w
    return rows


# One decoder layer's linears of the 1.1B at M = 1, Q/K/V and gate/up fused, as (N, K): a decode step runs 16 in turn
CHAIN_LAYER = [(3072, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]
CHAIN_LAYERS = 16


def _chain_us(linears, x, replays=50) -> float:
    """us of one pass through `linears` (functions of x), each reading the one before's output (its first K
    columns), replayed from one CUDA graph: GEMVs back to back, as a decode step has them."""
    def chain():
        h = x
        for f, (_, K) in zip(linears, CHAIN_LAYER * CHAIN_LAYERS):
            h = f(h[:, :K])
        return h

    side = torch.cuda.Stream()  # compile and autotune outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def chain_rows() -> list[dict]:
    """The 1.1B decode step's 64 linears back to back at M = 1 (CHAIN_LAYER x 16, distinct weights: even int4's
    190 MB overflow L2): int4 g64 and int8 weight-only with and without programmatic dependent launch, int4 also
    with the e2e's folded norms and epilogues, against cuBLAS bf16 and ATen's tinygemm int4 in the same chain. us
    per layer and effective bandwidth."""
    from torchfx_eff.kernels.int4_weight_only import pack_int4, quantize_int4
    from torchfx_eff.kernels.int8_weight_only import quantize_per_channel

    wt = weight_only_triton
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
               for _ in range(CHAIN_LAYERS) for N, K in CHAIN_LAYER]
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    int4 = [(pack_int4(c, 64), wt.aligned_rows(s), wt.aligned_rows(z)) for c, s, z in
            (quantize_int4(w, 64) for w in weights)]
    int8 = [quantize_per_channel(w) for w in weights]
    tinygemm = [_aten_int4(w) for w in weights]
    residual, norm = (torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16),
                      torch.ones(2048, device="cuda", dtype=torch.bfloat16))
    # as the e2e's sites run: Q/K/V and gate/up read a folded RMSNorm, gate/up applies SwiGLU, O and down add the
    # residual (the layer's order in CHAIN_LAYER)
    as_decoded = [dict(norm_weight=norm, norm_eps=1e-6), dict(epilogue="add", operand=residual),
                  dict(epilogue="glu_silu", norm_weight=norm, norm_eps=1e-6), dict(epilogue="add", operand=residual)]
    chains = {
        "cublas_bf16": ([lambda h, w=w: F.linear(h, w) for w in weights], [2 * w.numel() for w in weights]),
        "aten_int4pack": (tinygemm, [w.numel() // 2 + 4 * w.numel() // 128 for w in weights]),
        "int4_weight_only": ([lambda h, p=p: wt.weight_only_matmul(h, *p, None, 4, 64) for p in int4],
                             [sum(t.nbytes for t in p) for p in int4]),
        "int8_weight_only": ([lambda h, p=p: wt.weight_only_matmul(h, *p, None, None, 8, 0) for p in int8],
                             [sum(t.nbytes for t in p) for p in int8]),
        "int4_weight_only+norms+epilogues": (
            [lambda h, p=p, o=o: wt.weight_only_matmul(h, *p, None, 4, 64, **o)
             for p, o in zip(int4, as_decoded * CHAIN_LAYERS)], [sum(t.nbytes for t in p) for p in int4]),
    }
    times = {name: (_chain_us(fns, x), sum(nbytes)) for name, (fns, nbytes) in chains.items()}
    launch = wt.programmatic_launch
    wt.programmatic_launch = lambda device: False
    try:
        for name in ("int4_weight_only", "int8_weight_only", "int4_weight_only+norms+epilogues"):
            times[f"{name}+nopdl"] = (_chain_us(chains[name][0], x), times[name][1])
    finally:
        wt.programmatic_launch = launch
    cublas = times["cublas_bf16"][0]
    rows = []
    for name, (us, nbytes) in times.items():
        row = {"name": f"chain 1.1B layer linears M=1 {name}", "value": us / CHAIN_LAYERS, "unit": "us/layer",
               "GB/s": nbytes / us / 1e3, "copy_bandwidth_fraction": nbytes / us / 1e-6 / COPY_BANDWIDTH}
        if name != "cublas_bf16":
            row.update(anchor="chain 1.1B layer linears M=1 cublas_bf16", anchor_value=cublas / CHAIN_LAYERS,
                       ratio=cublas / us)
        rows.append(row)
    return rows


# By default each linear mode as it decodes fastest: Q/K/V and gate/up fused, their originals released
DECODE_MODES = ("max-autotune", "int4_weight_only+siblings", "int8_weight_only+siblings")
DECODE_ACCURACY = {"int4_weight_only": "aggressive"}  # int4's tier (SmolLM2 perplexity): under "balanced" it is kept
# The LM head keeps >= 8-bit weights (Config.output_linear_8bit): int4 runs offer int8 for it, as llama.cpp's Q4 files
# keep theirs at 6 bits; every other linear the cost model gives int4 (estimated faster at one row)
DECODE_HEAD = {"int4_weight_only": "int8_weight_only"}
PROFILED_STEPS = 8
WARMUP_STEPS = 3  # decode steps before capture: compile, autotune, then a run with everything warm


# Decode mode suffixes: "+siblings" fuses Q/K/V and gate/up into one linear each (their originals released; without
# it Config.fuse_siblings="auto" fuses those whose fused linear packs), "+nosiblings" fuses none (the default until
# 2026-12-07); "+nonorms" keeps the RMSNorms out of the linears reading them (Config.fuse_norms, on by default); "+calibrate" times
# the applicable candidates on the real inputs instead of trusting estimates; "+flash" gives every attention site to
# triton_flash (its split-K decode), whatever the cost model would pick; "+nocombo" turns Inductor's combo kernels off.
MODE_OPTIONS = {"siblings": {"fuse_siblings": True, "release_weights": True}, "nosiblings": {"fuse_siblings": False},
                "nonorms": {"fuse_norms": False},
                "calibrate": {"calibrate": True}, "flash": {"attention": ("triton_flash",)}, "nopdl": {},
                "nocombo": {"combo_kernels": False}}
# "+nopdl": the weight-only GEMVs launch plainly, not overlapping the previous kernel (programmatic dependent launch)
MODE_SWITCHES = {"nopdl": lambda: setattr(weight_only_triton, "programmatic_launch", lambda device: False)}


def _linear_mode(mode: str) -> tuple[str, dict]:
    """'int4_weight_only+siblings' -> ('int4_weight_only', its Config options)."""
    linear, *suffixes = mode.split("+")
    if unknown := [s for s in suffixes if s not in MODE_OPTIONS]:
        raise ValueError(f"decode mode {mode!r}: unknown suffix {unknown}; allowed: {sorted(MODE_OPTIONS)}")
    return linear, {k: v for s in suffixes for k, v in MODE_OPTIONS[s].items()}


def _compiled(mode: str, model):
    """The anchor is torch.compile max-autotune with our own CUDA graph capture (as for every mode here): Inductor's
    own CUDA graphs were crashing its run-time autotuning on torch 2.11 (a segfault in the static launcher)."""
    if mode == "max-autotune":
        return torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)
    linear, options = _linear_mode(mode)
    return torch.compile(model, dynamic=False, backend=torchfx_eff.backend(
        torchfx_eff.Config(linear=(linear, *filter(None, [DECODE_HEAD.get(linear)])),
                           accuracy=DECODE_ACCURACY.get(linear, "balanced"),
                           inner="max-autotune-no-cudagraphs", cuda_graphs="on", **options)))


def _kernel_profile(graph) -> tuple[dict[str, float], dict[str, float]]:
    """GPU time and launches per decode step by kernel name (the twelve longest; then all kernels' time and launch
    count), from a profile of PROFILED_STEPS replays. Under programmatic dependent launch a kernel's time counts from
    its early start, so the times can sum past the step's wall time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(PROFILED_STEPS):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in profile.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    us = {e.key[:80]: round(e.device_time_total / PROFILED_STEPS, 1) for e in events[:12]}
    launches = {e.key[:80]: e.count / PROFILED_STEPS for e in events[:12]}
    us["all kernels"] = round(sum(e.device_time_total for e in events) / PROFILED_STEPS, 1)
    us["launches"] = launches["all kernels"] = sum(e.count for e in events) / PROFILED_STEPS
    return us, launches


@torch.no_grad()
def decode_one(mode: str, prompt: int, new_tokens: int) -> dict:
    """Batch-1 greedy decode of the 1.1B Llama (16 layers, 8 KV heads) after an eager prefill of `prompt` random
    tokens, into a static cache: each step (forward, argmax, bookkeeping) is one CUDA graph replay."""
    from transformers import StaticCache

    for suffix in mode.split("+")[1:]:
        MODE_SWITCHES.get(suffix, lambda: None)()
    model = llama(layers=16, kv_heads=8, max_positions=4096)
    forward = _compiled(mode, model)
    cache = StaticCache(config=model.config, max_cache_len=prompt + WARMUP_STEPS + new_tokens + PROFILED_STEPS)
    ids = torch.randint(0, 32000, (1, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    token = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    position = torch.tensor([prompt], device="cuda")
    tokens = torch.zeros(1, WARMUP_STEPS + new_tokens + PROFILED_STEPS, dtype=torch.long, device="cuda")

    def step():
        logits = forward(input_ids=token, past_key_values=cache, cache_position=position, logits_to_keep=1).logits
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        tokens.index_copy_(1, position - prompt, token)
        position.add_(1)

    side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        for _ in range(WARMUP_STEPS - 1):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        graph.replay()
    torch.cuda.synchronize()
    tok_s = new_tokens / (time.perf_counter() - start)
    us, launches = _kernel_profile(graph)
    row = {"name": f"decode 1.1B {mode}", "value": tok_s, "unit": "tok/s", "compile_s": compile_s,
           "tokens": tokens[0, :WARMUP_STEPS + new_tokens].tolist(), "kernel_us_per_step": us,
           "kernel_launches_per_step": launches}
    if mode != "max-autotune":
        report = torchfx_eff.last_report()
        kept = collections.Counter(r.reason[:120] for r in report.sites if r.kind == "linear" and r.status != "rewritten")
        chosen = collections.Counter(f"{r.kind}: {r.chosen}" + (f" + {r.epilogue}" if r.epilogue else "")
                                     for r in report.sites if r.status == "rewritten")
        row.update(summary=report.summary(), weight_bytes=list(report.weight_bytes()),
                   resident_bytes=list(report.resident_bytes()), chosen=dict(chosen),
                   accuracy=DECODE_ACCURACY.get(_linear_mode(mode)[0], "balanced"), linears_not_rewritten=dict(kept.most_common(5)),
                   graph_checks=[r.reason for r in report.sites if r.kind == "outputs"])
    return row


def decode_rows(prompt=512, new_tokens=256, modes=DECODE_MODES) -> list[dict]:
    """Each mode in its own process (the same seed builds the same model), so that a crash costs one row."""
    rows = []
    for mode in modes:
        run = subprocess.run([sys.executable, __file__, mode, str(prompt), str(new_tokens)], capture_output=True,
                             text=True, timeout=DECODE_TIMEOUT_S)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if run.returncode == 0 and lines else {
            "name": f"decode 1.1B {mode}", "value": None, "error": f"exit {run.returncode}: {run.stderr[-2000:]}"}
        print(f"{row['name']}: {row.get('value') or row['error'][:300]}", flush=True)
        rows.append(row)
    anchor = rows[0]
    for row in rows[1:]:
        if row["value"] and anchor["value"]:
            same = 0
            for a, b in zip(row["tokens"], anchor["tokens"]):
                if a != b:
                    break
                same += 1
            row.update(anchor=anchor["name"], anchor_value=anchor["value"], ratio=row["value"] / anchor["value"],
                       target=DECODE_TARGET.get(_linear_mode(row["name"].split()[-1])[0]), same_tokens_as_bf16=same)
    return rows


def gpu_linear(args) -> list[dict]:
    rows = ceiling_rows()
    if "kernels" in args.parts:
        rows += kernels_rows(tuple(_linear_mode(m)[0] for m in filter(None, args.modes.split(","))),
                             [int(m) for m in args.rows.split(",")] if args.rows else ROWS)
    modes = DECODE_MODES[:1] + tuple(args.modes.split(",")) if args.modes else DECODE_MODES
    rows += chain_rows() if "chain" in args.parts else []
    rows += tuner_rows() if "tuner" in args.parts else []
    rows += crossover_rows() if "crossover" in args.parts else []
    rows += experts_rows() if "experts" in args.parts else []
    return rows + (decode_rows(modes=modes) if "e2e" in args.parts else [])


if __name__ == "__main__":  # one decode mode, in its own process: prints its row as JSON
    print(json.dumps(decode_one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
