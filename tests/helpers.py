"""Helpers shared by the tests: tiny random-init HF models, independent counters and fp64 references."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import torchfx_eff

VOCAB = 128

# Tiny sizes: nothing is worth rewriting (fp32, small matrices).
SMALL = {"hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv_heads": 2}
# Decode-sized bf16 sizes where the int8 weight-only candidate beats the original by the cost model on CPU
# (memory-bound matrices, K a multiple of 16).
BIG = {"hidden": 256, "inter": 512, "layers": 2, "heads": 4, "kv_heads": 2}


def make_model(family: str, sizes: dict = SMALL, dtype=torch.float32, attn: str = "sdpa") -> torch.nn.Module:
    """A random-init model of `family` (llama, qwen2, gpt2, bert) built from a config; no downloads."""
    import transformers as T

    h, i, n, a, kv = sizes["hidden"], sizes["inter"], sizes["layers"], sizes["heads"], sizes["kv_heads"]
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                                 num_attention_heads=a, num_key_value_heads=kv, vocab_size=VOCAB,
                                                 attn_implementation=attn))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                                 num_attention_heads=a, num_key_value_heads=kv, vocab_size=VOCAB,
                                                 attn_implementation=attn))
    elif family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=h, n_inner=i, n_layer=n, n_head=a, vocab_size=VOCAB,
                                               n_positions=64, bos_token_id=None, eos_token_id=None,
                                               attn_implementation=attn))
    elif family == "bert":
        model = T.BertModel(T.BertConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                                         vocab_size=VOCAB, max_position_embeddings=64, attn_implementation=attn))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def first_output(out) -> torch.Tensor:
    """logits of a CausalLM output, last_hidden_state of an encoder output."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def linear_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


@contextlib.contextmanager
def count_calls(model: torch.nn.Module):
    """Count, during an eager run, nn.Linear/Conv1D forward calls (hooks), SDPA calls and softmax calls (wrapped
    torch.nn.functional functions; eager attention calls softmax once). Yields a dict filled in as the model runs."""
    counts = {"linear": 0, "attention": 0, "softmax": 0}

    def hook(*_):
        counts["linear"] += 1

    real_sdpa, real_softmax = F.scaled_dot_product_attention, F.softmax

    def counting(key, real):
        def call(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        return call

    handles = [m.register_forward_hook(hook) for m in linear_modules(model)]
    F.scaled_dot_product_attention = counting("attention", real_sdpa)
    F.softmax = counting("softmax", real_softmax)
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention, F.softmax = real_sdpa, real_softmax
        for h in handles:
            h.remove()


def sqnr_ref(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """SQNR in dB computed independently of the package: Python floats (fp64), element by element."""
    ref = reference.detach().double().flatten().tolist()
    act = actual.detach().double().flatten().tolist()
    signal = math.fsum(r * r for r in ref)
    noise = math.fsum((r - a) ** 2 for r, a in zip(ref, act))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def compiled(model, **config):
    """torch.compile with the torchfx_eff backend; inner='eager', linear=("int8_weight_only",),
    output_linear_8bit=False and fuse_siblings=False unless said otherwise: the pipeline tests follow one lossy linear
    candidate (each other candidate has its own tests) on every linear, the graph's output one too (test_int4_kernel
    tests that rule), each linear its own site (test_siblings tests fusion, "auto" included)."""
    config.setdefault("inner", "eager")
    config.setdefault("fuse_siblings", False)
    config.setdefault("linear", ("int8_weight_only",))
    config.setdefault("output_linear_8bit", False)
    return torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(**config)))


def sites(kind: str | None = None, status: str | None = None, report=None):
    report = report or torchfx_eff.last_report()
    return [s for s in report.sites if (kind is None or s.kind == kind) and (status is None or s.status == status)]


def matched(kind: str, report=None):
    """Sites of `kind` a matcher took (every status except 'missed')."""
    return [s for s in sites(kind, report=report) if s.status != "missed"]


@contextlib.contextmanager
def found_sites(kind: str = "attention"):
    """The Site and Miss objects the `kind` matcher yields while compiling in the block, in a list filled in as
    graphs compile: what a site holds beyond its report record (scale, softcap, mask_fill, k_transposed)."""
    from torchfx_eff import passes

    found, real = [], passes.MATCHERS[kind]

    def spy(info):
        for s in real(info):
            found.append(s)
            yield s

    passes.MATCHERS[kind] = spy
    try:
        yield found
    finally:
        passes.MATCHERS[kind] = real


class LinearStack(torch.nn.Module):
    """Two bf16-sized linears with a nonlinearity: the smallest model whose linears get rewritten on CPU."""

    def __init__(self, k=256, n=512, bias=True):
        super().__init__()
        self.up = torch.nn.Linear(k, n, bias=bias)
        self.down = torch.nn.Linear(n, k, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def fused_away(report=None, graph_id=None) -> int:
    """Linear calls that sibling fusion merged into others: a "siblings" record of n members ("linear xn") stands
    for n eager calls and leaves one linear site. Expected linear sites = counts["linear"] - fused_away()."""
    return sum(int(s.op.rsplit(" x", 1)[1]) - 1 for s in sites("siblings", "rewritten", report=report)
               if graph_id is None or s.graph_id == graph_id)


# weight_only_triton's three paths, each forced at any row count, and the rows the kernel tests take them at
WEIGHT_ONLY_PATHS = [("gemv", 1), ("gemv", 7), ("gemm", 1), ("gemm", 7), ("gemm", 64), ("split_gemm", 7),
                     ("dequantize", 1), ("dequantize", 7)]


def force_weight_only_path(monkeypatch, path: str) -> None:
    from torchfx_eff.kernels import weight_only_triton

    gemv_max, dequantize_min = {"gemv": (1 << 30, 1 << 30), "gemm": (0, 1 << 30), "split_gemm": (0, 1 << 30),
                                "dequantize": (0, 0)}[path]
    monkeypatch.setattr(weight_only_triton, "GEMV_MAX_ROWS", gemv_max)
    monkeypatch.setattr(weight_only_triton, "DEQUANTIZE_MIN_ROWS", {4: dequantize_min, 8: dequantize_min})
    if path == "split_gemm":  # K split as finely as it goes: each split sums one step ("gemm" splits as it would)
        steps = weight_only_triton.gemm_steps
        monkeypatch.setattr(weight_only_triton, "gemm_splits", lambda M, N, K, bits, part, sms: (steps(K, bits, part), 1))


ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


def unfused_epilogue(spec: str, y: torch.Tensor, operand=None) -> torch.Tensor:
    """A fused epilogue's spec (torchfx_eff.codegen) as the graph computes it without fusion: PyTorch ops on the plain
    linear's output y (for glu_*, y's first half is gate and its second up)."""
    for step in spec.split(",") if spec else []:
        if step.startswith("glu_"):
            gate, up = y.chunk(2, dim=-1)
            y = ACTIVATIONS[step.removeprefix("glu_")](gate) * up
        elif step in ("add", "mul"):
            y = y + operand if step == "add" else y * operand
        else:
            y = ACTIVATIONS[step](y)
    return y


def compiles_for_sm90(script: str) -> None:
    """Run `script` (it prints "compiled" last) in a process without the interpreter: Triton compiles for a GPU it does
    not have, to a cubin with its bundled ptxas. Skips where this Triton cannot compile for CUDA at all."""
    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parents[1], timeout=600, check=False)
    if "compiled" not in done.stdout and ("ptxas" in done.stderr or "NVIDIA" in done.stderr):
        pytest.skip(f"Triton cannot compile for CUDA here: {done.stderr.strip().splitlines()[-1]}")
    assert "compiled" in done.stdout, done.stderr[-3000:]


def experts_packed(w_enk: torch.Tensor, bits: int = 8, triton_kernel: bool = True):
    """The candidate's packing of an [E, N, K] stack, and its dequantized weights in fp64 (independently of the
    kernels: the int4 bytes unpacked here, codes (q - 8) * scale + zero of their group of 64)."""
    from torchfx_eff.kernels import experts
    from torchfx_eff.kernels.int4_weight_only import quantize_int4

    site = SimpleNamespace(weight_enk=lambda: w_enk)
    w, scales, zeros = experts._pack(site, bits, 64, triton_kernel)
    E, N, K = w_enk.shape
    if bits == 8:
        return (w, scales, zeros), w.double() * scales.double()[..., None]
    if triton_kernel:
        codes = torch.stack([w & 15, w >> 4], dim=-1).reshape(E, N, -1).double()
        s, z = (t.double().repeat_interleave(64, dim=-1) for t in (scales, zeros))
        return (w, scales, zeros), ((codes - 8) * s + z)[..., :K]
    # ATen's CPU layout: recover the codes from quantize_int4 itself (the layout is ATen's own)
    codes, s, z = quantize_int4(w_enk.reshape(E * N, K), 64)
    s, z = (t.double().repeat_interleave(64, dim=-1) for t in (s, z))
    return (w, scales, zeros), ((codes.double() - 8) * s + z).reshape(E, N, -1)[..., :K]


def experts_reference(x, w, offs) -> torch.Tensor:
    """fp64: rows offs[e-1]:offs[e] of x times expert e's (dequantized) weight w[e], an explicit loop; rows past
    offs[-1] zero."""
    out, start = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ w[e].T
        start = end
    return out
