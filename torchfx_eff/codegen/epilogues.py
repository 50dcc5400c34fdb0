"""Fused linear epilogues as generated Triton source.

An epilogue is a spec: steps, comma-separated, that a linear kernel applies in fp32 to its output tile (x @ W^T,
dequantized, + bias) before it stores it:
    relu, silu, gelu, gelu_tanh   an activation
    add, mul                      + or * the operand, one tensor of the output's shape (a residual; SwiGLU's up)
    glu_<activation>              act(gate) * up for a weight whose channels interleave gate and up (pair_channels):
                                  the tile's even columns are gate, its odd ones up; the output has half the columns
A dtype cast needs no step: the kernel stores in its output's dtype. The spec "" only stores.

epilogue(spec) writes one @triton.jit function's source to a file in the cache directory (Triton's JIT reads a
function's source from its file, as it does for Inductor's generated kernels), imports it, and caches it by its text.
The kernels take it as a tl.constexpr argument and call it in place of their store:
    EPILOGUE(acc, offs_m, offs_n, M, N, Out, stride_om, E, stride_em)
acc is the fp32 [BLOCK_M, BLOCK_N] tile at rows offs_m and weight channels offs_n of the M x N product, E the operand
as [M, N_out] with unit column stride (any pointer when the spec reads none).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys

import torch

from ..cache import cache_dir

ACTIVATIONS = {  # fp32 Triton expressions of {x}
    "relu": "tl.maximum({x}, 0.0)",
    "silu": "{x} * tl.sigmoid({x})",
    "gelu": "0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))",  # x * Phi(x)
    # 0.5 * (1 + tanh(z)) = sigmoid(2z), z = sqrt(2 / pi) * (x + 0.044715 x^3)
    "gelu_tanh": "{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))",
}
OPERAND_STEPS = {"add": "+", "mul": "*"}
PAIRED = "glu_"
STEPS = (*ACTIVATIONS, *OPERAND_STEPS, *(PAIRED + a for a in ACTIVATIONS))
ARGS = "acc, offs_m, offs_n, M, N, Out, stride_om, E, stride_em"
LOAD_OPERAND = "tl.load(E + offs_m[:, None] * stride_em + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)"


@functools.cache  # the kernels' wrappers ask on every call
def parse(spec: str) -> tuple[str, ...]:
    """The steps of a spec, checked."""
    if not isinstance(spec, str):
        raise TypeError(f"epilogue spec {spec!r} is not a string")
    steps = tuple(spec.split(",")) if spec else ()
    for i, step in enumerate(steps):
        if step not in STEPS:
            raise ValueError(f"epilogue {spec!r}: unknown step {step!r}; steps are {', '.join(STEPS)}")
        if step.startswith(PAIRED) and i:
            raise ValueError(f"epilogue {spec!r}: {step} must come first (it pairs the kernel's channels)")
    if sum(s in OPERAND_STEPS for s in steps) > 1:
        raise ValueError(f"epilogue {spec!r} reads more than one operand; the kernels take one")
    return steps


def reads_operand(spec: str) -> bool:
    return any(s in OPERAND_STEPS for s in parse(spec))


def out_features(spec: str, n: int) -> int:
    """Output columns of a kernel with n weight channels: half of them when the spec pairs gate and up."""
    if not any(s.startswith(PAIRED) for s in parse(spec)):
        return n
    if n % 2:
        raise ValueError(f"epilogue {spec!r} pairs channels, but the weight has an odd number of them ({n})")
    return n // 2


def pair_channels(t: torch.Tensor) -> torch.Tensor:
    """Rows [gate; up] (the first half gate, the second up) -> gate and up channels interleaved, as glu_* reads them."""
    return t.reshape(2, t.shape[0] // 2, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def operand_arg(spec: str, operand: torch.Tensor | None, out: torch.Tensor, shape) -> tuple[torch.Tensor, int]:
    """(E, stride_em) for a kernel writing `out` [M, N_out], the output of shape `shape` as rows: the operand as a
    matrix with unit column stride, or out itself (never read) when the spec reads none."""
    if reads_operand(spec) != (operand is not None):
        need = "reads an operand" if operand is None else "reads no operand"
        raise ValueError(f"epilogue {spec!r} {need}, got {None if operand is None else tuple(operand.shape)}")
    if operand is None:
        return out, 0
    if operand.shape != shape or operand.device != out.device:
        raise ValueError(f"epilogue operand {tuple(operand.shape)} on {operand.device} does not match the output "
                         f"{tuple(shape)} on {out.device}")
    e = operand.reshape(out.shape)
    e = e if e.stride(1) == 1 else e.contiguous()
    return e, e.stride(0)


def _name(spec: str) -> str:
    return "epilogue_" + ("_".join(parse(spec)) or "store")


@functools.cache
def source(spec: str) -> str:
    """The Triton source of the epilogue `spec`."""
    steps = parse(spec)
    body = []
    for step in steps:
        if step.startswith(PAIRED):
            act = ACTIVATIONS[step.removeprefix(PAIRED)].format(x="gate")
            body += ["# interleaved gate and up channels: even columns are gate, odd ones up",
                     "gate, up = tl.split(tl.reshape(acc, [acc.shape[0], acc.shape[1] // 2, 2]))",
                     f"acc = {act} * up",
                     "offs_n = tl.split(tl.reshape(offs_n, [offs_n.shape[0] // 2, 2]))[0] // 2",
                     "N = N // 2"]
    body.append("mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]")
    for step in steps:
        if step in ACTIVATIONS:
            body.append(f"acc = {ACTIVATIONS[step].format(x='acc')}  # {step}")
        elif step in OPERAND_STEPS:
            body.append(f"acc = acc {OPERAND_STEPS[step]} {LOAD_OPERAND}  # {step}")
    body.append("tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=mask)")
    lines = [f"# Generated by torchfx_eff.codegen from the epilogue {spec!r}; do not edit.",
             "import triton", "import triton.language as tl", "", "", "@triton.jit", f"def {_name(spec)}({ARGS}):",
             *(f"    {line}" for line in body)]
    return "\n".join(lines) + "\n"


_GENERATED: dict[str, str] = {}  # spec -> path of its file, in the order generated


@functools.cache
def _load(text: str, name: str):
    """The JITFunction defined by `text`, written to a file named by its hash and imported from there."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    path = cache_dir() / "codegen" / f"epilogue_{digest}.py"
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # another process may import the file meanwhile
        tmp.write_text(text)
        tmp.replace(path)
    module_name = f"torchfx_eff_codegen_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # Triton resolves a JITFunction constant by module name when it reloads a kernel
    module_spec.loader.exec_module(module)
    return getattr(module, name), str(path)


@functools.cache
def epilogue(spec: str):
    """The @triton.jit function that applies `spec` to a tile and stores it."""
    fn, path = _load(source(spec), _name(spec))
    _GENERATED[spec] = path
    return fn


def dump() -> str:
    """Every epilogue generated in this process: its spec, its file and its source."""
    if not _GENERATED:
        return "torchfx_eff.codegen: no epilogue generated yet"
    return "\n".join(f"# --- epilogue {spec!r}: {path}\n{source(spec)}" for spec, path in _GENERATED.items())
