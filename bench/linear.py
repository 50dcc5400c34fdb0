"""GPU linear suite: every registered linear candidate's kernel at decode (GEMV) and prefill (GEMM) sizes
against cuBLAS bf16 and ATen's int8/int4 pack matmuls, measured in the same run; and batch-1 decode of a
random-init 1.1B Llama (static cache, CUDA graphs) against torch.compile max-autotune."""
from __future__ import annotations

import time

import sympy
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import torchfx_eff
from torchfx_eff import cost, kernels
from torchfx_eff.passes.sites import LinearSite

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (2048, 8192), (8192, 2048)]  # (K in, N out)
ROWS = [1, 16, 128, 4096]
COPY_BANDWIDTH = 3.0e12  # H100 device-to-device copy, ANCHORS.md: the GEMV targets are fractions of it


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


def _site(x, weight) -> LinearSite:
    """A linear site over real tensors: what the matcher would build from a graph, for calling kernels directly."""
    M, (N, K) = x.shape[0], weight.shape
    dims = {"M": sympy.Integer(M), "N": sympy.Integer(N), "K": sympy.Integer(K)}
    return LinearSite(node=None, op="linear", location="bench", dtype=x.dtype, device=x.device, dims=dims,
                      x=x, weight=weight, weight_name="weight", weight_layout="nk")


def _aten_int4(x, w):
    """torch's tinygemm int4 (group 128) as the vendor anchor."""
    N, K = w.shape
    groups = w.float().reshape(N, K // 128, 128)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    zeros = lo + 8 * scale  # tinygemm's zero point is the value of the middle code
    sz = torch.stack([scale.squeeze(-1), zeros.squeeze(-1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)


def _anchor_bytes(N, K) -> dict:
    return {"cublas_bf16": 2 * N * K, "aten_int8pack": N * K + 2 * N, "aten_int4pack": N * K // 2 + 4 * N * K // 128}


def _anchors(x, w) -> dict:
    q8 = (w.float() / (w.float().abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    s8 = (w.float().abs().amax(1) / 127).to(torch.bfloat16)
    out = {"cublas_bf16": lambda: F.linear(x, w), "aten_int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8)}
    try:
        out["aten_int4pack"] = _aten_int4(x, w)
    except RuntimeError:
        pass
    return out


def kernels_rows() -> list[dict]:
    spec = cost.detect(torch.device("cuda"))
    # Replacements that are Python functions (a prologue that quantizes x, casts) run as Inductor compiles them
    # inside the pipeline's graph; custom ops are called as they are.
    compiled = {}
    rows = []
    for K, N in SHAPES:
        for M in ROWS:
            copies = -(-COLD_BYTES // (2 * N * K)) if M <= 128 else 1  # large M: compute-bound, one copy
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            anchors = [_anchors(x, w) for w in ws]
            times = {name: (_ms([a[name] for a in anchors]), _anchor_bytes(N, K)[name]) for name in anchors[0]}
            for impl in kernels.implementations("linear"):
                if impl.replace is None:
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
                if err:
                    row["rel_err_vs_fp32"] = err[0]
                if name != "cublas_bf16":
                    row.update(anchor="cublas_bf16", anchor_value=cublas, ratio=cublas / ms)
                rows.append(row)
            del x, ws, anchors
    return rows


def _llama_1b():
    import transformers as T

    config = T.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                           attn_implementation="sdpa")
    with torch.device("cuda"):
        return T.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@torch.no_grad()
def _decode_tok_per_s(forward, model, prompt: int, new_tokens: int) -> tuple[float, torch.Tensor]:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
    ids = torch.randint(0, 32000, (1, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    logits = forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"),
                     logits_to_keep=1).logits
    token, tokens = logits[:, -1].argmax(-1, keepdim=True), []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for position in range(prompt, prompt + new_tokens - 1):
        logits = forward(input_ids=token, past_key_values=cache,
                         cache_position=torch.tensor([position], device="cuda"), logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True).clone()
        tokens.append(token)
    torch.cuda.synchronize()
    return (new_tokens - 1) / (time.perf_counter() - start), torch.cat(tokens, 1)


def decode_rows(prompt=512, new_tokens=256, modes=("int4_weight_only", "int8_weight_only")) -> list[dict]:
    # dynamic=False: prefill and decode each get a static graph. With automatic dynamic shapes, torch 2.11's
    # max-autotune crashes autotuning the decode graph under CUDA graphs (a size passed where a pointer goes).
    model = _llama_1b()
    make = {"max-autotune": lambda: torch.compile(model, mode="max-autotune", dynamic=False)}
    for mode in modes:
        make[mode] = lambda mode=mode: torch.compile(model, dynamic=False, backend=torchfx_eff.backend(
            torchfx_eff.Config(linear=(mode,), inner="max-autotune")))
    rows, tokens = [], {}
    for name, build in make.items():
        torch._dynamo.reset()
        torchfx_eff.reset()
        forward = build()
        start = time.perf_counter()
        _decode_tok_per_s(forward, model, prompt, 4)
        compile_s = time.perf_counter() - start
        print(f"{name}: compiled in {compile_s:.0f} s", flush=True)
        tok_s, tokens[name] = max((_decode_tok_per_s(forward, model, prompt, new_tokens) for _ in range(2)),
                                  key=lambda r: r[0])
        row = {"name": f"decode 1.1B {name}", "value": tok_s, "unit": "tok/s", "compile_s": compile_s}
        if name != "max-autotune":
            report = torchfx_eff.last_report()
            row.update(anchor="max-autotune", anchor_value=rows[0]["value"], ratio=tok_s / rows[0]["value"],
                       summary=report.summary(), weight_bytes=list(report.weight_bytes()),
                       same_tokens_as_bf16=int((tokens[name] == tokens["max-autotune"]).cumprod(1).sum()))
        rows.append(row)
    return rows


def gpu_linear(args) -> list[dict]:
    rows = kernels_rows() if "kernels" in args.parts else []
    return rows + (decode_rows() if "e2e" in args.parts else [])
