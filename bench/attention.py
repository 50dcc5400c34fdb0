"""GPU attention suite: triton_flash against SDPA's flash, cuDNN and efficient backends (bf16, same run), the
per-site choice the cost model makes (parts: kernels), split-K decode (decode), and end-to-end prefill of a 1.1B
Llama against torch.compile max-autotune (e2e)."""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

import torchfx_eff
from torchfx_eff.kernels import triton_flash
from torchfx_eff.kernels.triton_flash import flash_attention

from models import llama

SHAPES = [(4, 32, 4096, 128), (1, 32, 16384, 128), (16, 16, 1024, 64)]  # (B, H, L, D)
# (B, H, Hkv, Lk, D, keys the mask keeps or None), one query; the last is the 1.1B decode's layer (static cache of
# 768 positions, a bool mask over the filled ones)
DECODE = [(1, 32, 8, 4096, 128, None), (1, 32, 8, 32768, 128, None), (1, 32, 8, 768, 64, 640)]
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _ms(fn, graph=False) -> float | None:
    """Median GPU time; with graph=True inside a CUDA graph, as decode runs (launch overhead excluded)."""
    try:
        fn()
        torch.cuda.synchronize()
    except RuntimeError:  # the backend refuses this shape
        return None
    if graph:
        return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _candidates(q, k, v, causal, gqa=False, mask=None):
    out = {"triton_flash": lambda: flash_attention(q, k, v, mask, causal)}
    for name, backend in BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        out[name] = run
    return out


class SDPA(torch.nn.Module):
    def __init__(self, causal, gqa=False):
        super().__init__()
        self.causal, self.gqa = causal, gqa

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=self.causal, enable_gqa=self.gqa)


def _choice(q, k, v, causal, gqa=False, cudagraphs=False, mask=None) -> str:
    """What the cost model picks for this site, as it would in a user's graph (replayed from a CUDA graph when
    `cudagraphs`, as decode is)."""
    torch._dynamo.reset()
    torchfx_eff.reset()
    with torch.no_grad(), torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}):
        torch.compile(SDPA(causal, gqa), backend=torchfx_eff.backend())(q, k, v, mask)
    (site,) = [s for s in torchfx_eff.last_report().sites if s.kind == "attention"]
    return site.chosen


def _site_rows(label, times, flops, nbytes, chosen, original):
    rows = []
    times = {**times, "original": original}
    best = min(t for t in times.values() if t is not None)
    for name, ms in times.items():
        if ms is None:
            rows.append({"name": f"{label} {name}", "value": None, "note": "refused by the backend"})
            continue
        rows.append({"name": f"{label} {name}", "value": flops / ms / 1e9 if flops else nbytes / ms / 1e6,
                     "unit": "TFLOP/s" if flops else "GB/s", "ms": ms})
    picked = times[chosen]
    rows.append({"name": f"{label} choice={chosen}", "value": picked, "unit": "ms", "anchor": "best candidate",
                 "anchor_value": best, "ratio": best / picked, "target_ratio": 0.95})
    return rows


def _conditional_rescale_row(label, q, k, v, flops) -> dict:
    """Ablation of FA4's conditional rescaling: the same kernel, rescaling only when a row's max grew by 2^8."""
    saved, triton_flash.RESCALE_LOG2 = triton_flash.RESCALE_LOG2, 8.0
    try:
        ms = _ms(lambda: flash_attention(q, k, v))
    finally:
        triton_flash.RESCALE_LOG2 = saved
    return {"name": f"{label} triton_flash, conditional rescale", "value": flops / ms / 1e9, "unit": "TFLOP/s",
            "ms": ms}


def kernels() -> list[dict]:
    rows = []
    for B, H, L, D in SHAPES:
        for causal in (False, True):
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            err = (flash_attention(q, k, v, None, causal).float() - ref.float()).abs().max().item()
            times = {name: _ms(fn) for name, fn in _candidates(q, k, v, causal).items()}
            original = _ms(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal))
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1)
            label = f"({B},{H},{L},{D}){' causal' if causal else ''}"
            site = _site_rows(label, times, flops, 0, _choice(q, k, v, causal), original)
            site[0]["max_abs_err_vs_sdpa"] = err
            rows += site
            if (B, H, L, D, causal) == (4, 32, 4096, 128, False):
                site[0].update(anchor="sdpa_cudnn", anchor_value=flops / times["sdpa_cudnn"] / 1e9, target=480.0,
                               autotuned=str(getattr(triton_flash._flash_fwd_tuned, "best_config", None)))
                rows.append(_conditional_rescale_row(label, q, k, v, flops))
            del q, k, v
    return rows


def decode() -> list[dict]:
    """One query against a KV cache, every candidate replayed from a CUDA graph as decode runs."""
    rows = []
    for B, H, Hkv, Lk, D, kept in DECODE:
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = None if kept is None else (torch.arange(Lk, device="cuda") < kept).view(1, 1, 1, Lk)
        ref = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
        err = (flash_attention(q, k, v, mask).float() - ref.float()).abs().max().item()
        times = {name: _ms(fn, graph=True) for name, fn in _candidates(q, k, v, False, True, mask).items()}
        original = _ms(functools.partial(F.scaled_dot_product_attention, q, k, v, mask, enable_gqa=True), graph=True)
        label = f"decode Lk={Lk} Hkv={Hkv} D={D}{'' if kept is None else ' bool mask'} (CUDA graph)"
        site = _site_rows(label, times, 0, 2 * B * Hkv * Lk * D * 2,
                          _choice(q, k, v, False, gqa=True, cudagraphs=True, mask=mask), original)
        site[0]["max_abs_err_vs_sdpa"] = err
        rows += site
    return rows


def prefill(P: int = 4096) -> list[dict]:
    """Forward of a random-init 1.1B Llama (TinyLlama's shape) over P tokens: logits of the last position."""
    model = llama(layers=22, kv_heads=4, max_positions=8192)  # TinyLlama's shape
    ids = torch.randint(0, 32000, (1, P), device="cuda")
    run = lambda m: m(ids, logits_to_keep=1).logits
    rows, outs = [], {}
    modes = {"max-autotune": lambda: torch.compile(model, mode="max-autotune-no-cudagraphs"),
             "torchfx_eff": lambda: torch.compile(model, backend=torchfx_eff.backend(
                 torchfx_eff.Config(inner="max-autotune-no-cudagraphs")))}
    times = {}
    for name, make in modes.items():
        torch._dynamo.reset()
        torchfx_eff.reset()
        start = time.perf_counter()
        with torch.no_grad():
            compiled = make()
            outs[name] = run(compiled).float()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            times[name] = do_bench(functools.partial(run, compiled), warmup=5, rep=50, return_mode="median")
        rows.append({"name": f"prefill P={P} {name}", "value": times[name], "unit": "ms", "compile_s": compile_s})
        if name == "torchfx_eff":
            rows[-1]["summary"] = torchfx_eff.last_report().summary()
    mine = rows[-1]
    mine.update(anchor="max-autotune", anchor_value=times["max-autotune"],
                ratio=times["max-autotune"] / times["torchfx_eff"], target_ratio=1.0,
                max_abs_logit_diff=(outs["torchfx_eff"] - outs["max-autotune"]).abs().max().item())
    return rows


def gpu_attention(args) -> list[dict]:
    rows = kernels() if "kernels" in args.parts else []
    rows += decode() if "decode" in args.parts else []
    return rows + (prefill() if "e2e" in args.parts else [])
