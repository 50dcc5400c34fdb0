"""Instructions a weight in the weight-only GEMVs' main loops, offline (no GPU): each autotune config compiled for
sm90 as Triton's JIT would at M = 1 (pointers and sizes divisible by 16, unit strides constant), assembled by the
ptxas and disassembled by the nvdisasm that Triton bundles. A GEMV near the read speed is bound by issue as much as
by DRAM, so fewer instructions a weight is a lead worth a GPU run.

    python bench/sass.py              # int4 and int8, every config, without and with a folded norm
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchfx_eff import codegen
from torchfx_eff.kernels import weight_only_triton as wt

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"X": "*bf16", "S": "*bf16", "Z": "*bf16", "B": "*bf16", "Out": "*bf16", "E": "*bf16",
            "G": "*bf16"}
DIVISIBLE = ("N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_om", "stride_em")  # by 16 at the bench shapes
INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")


def sass(kernel, constants: dict, warps: int, weight: str) -> str:
    names = kernel.arg_names
    types = {n: {**POINTERS, "W": weight}.get(n, "fp32" if n in ("inv_k", "eps") else "i32") for n in names}
    signature = {n: "constexpr" if n in constants else types[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constants and (types[n].startswith("*") or n in DIVISIBLE)}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", ptx, "-o", cubin], check=True)
        return subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], check=True, capture_output=True,
                              text=True).stdout


def loop_mix(text: str) -> collections.Counter:
    """Opcodes (without modifiers) of the longest loop: from the target of the backward branch spanning the most
    code to that branch."""
    labels, instructions, pending = {}, [], []
    for line in text.splitlines():
        if re.match(r"^\s*\.L_x_\d+:", line):
            pending.append(line.strip().rstrip(":"))
        elif m := INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            labels.update((label, address) for label in pending)
            pending = []
            instructions.append((address, m.group(2), m.group(3)))
    spans = [(labels[t.group(1)], address) for address, op, rest in instructions
             if op.startswith("BRA") and (t := re.search(r"(\.L_x_\d+)", rest)) and labels.get(t.group(1), address) < address]
    start, end = max(spans, key=lambda s: s[1] - s[0])
    return collections.Counter(op.split(".")[0] for address, op, _ in instructions if start <= address <= end)


def gemv_rows(bits: int, norm: bool, configs=None) -> list[dict]:
    """One row per autotune config (or per given config): loop instructions per weight, the most frequent opcodes."""
    tuned, kernel = (wt._gemv_int4_tuned, wt._gemv_int4) if bits == 4 else (wt._gemv_tuned, wt._gemv)
    part = wt._parts(bits, 64)[1]
    rows = []
    for config in configs or tuned.configs:
        block_n, step_bytes = config.kwargs["BLOCK_N"], config.kwargs["STEP_BYTES"]
        constants = {"M": 1, "stride_xk": 1, "PART": part, "HAS_BIAS": False, "NORM": norm, "PDL": True,
                     "EPILOGUE": codegen.epilogue(""), "BLOCK_N": block_n, "STEP_BYTES": step_bytes,
                     **({"ASM": True} if bits == 4 else {"BITS": 8})}
        mix = loop_mix(sass(kernel, constants, config.num_warps, "*i32" if bits == 4 else "*i8"))
        weights = block_n * step_bytes * (8 // bits) / (32 * config.num_warps)  # a thread's weights a loop pass
        rows.append({"bits": bits, "norm": norm, "config": (block_n, step_bytes, config.num_warps),
                     "instructions_per_weight": sum(mix.values()) / weights, "weights_per_pass": weights,
                     "ffma": mix["FFMA"], "mix": dict(mix.most_common(8))})
    return rows


def main():
    print(f"{'kernel':<12} {'config (BLOCK_N, STEP_BYTES, warps)':<36} {'instr/weight':>12}  most frequent")
    for bits in (4, 8):
        for norm in (False, True):
            for r in gemv_rows(bits, norm):
                name = f"int{bits}{'+norm' if norm else ''}"
                mix = " ".join(f"{op} {n}" for op, n in r["mix"].items())
                print(f"{name:<12} {str(r['config']):<36} {r['instructions_per_weight']:>12.2f}  {mix}", flush=True)


if __name__ == "__main__":
    main()
