"""Validated, serializable configuration."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Union

ACCURACY = ("lossless", "balanced", "aggressive")
INNER = ("inductor", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "eager")  # Inductor's modes
FAMILY_MODES = ("auto", "off")
FAMILIES = ("attention", "linear", "experts")  # site kinds with a field of their own
CUDA_GRAPHS = ("auto", "on", "off")
BOOLEANS = ("calibrate", "strict", "check_outputs", "fuse_epilogues", "fuse_norms", "release_weights",
            "output_linear_8bit", "combo_kernels")

# A family field is "auto", "off", or a tuple of allowed candidate names.
FamilyChoice = Union[str, tuple]


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Config.{field}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _family(field: str, value) -> FamilyChoice:
    if isinstance(value, str):
        _choice(field, value, FAMILY_MODES)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"Config.{field}={value!r} is not allowed; use 'auto', 'off' or a non-empty tuple of candidate names")


@dataclass(frozen=True)
class Config:
    """What torchfx_eff may rewrite and how hard it may try.

    attention, linear, experts: "auto" (cost model chooses), "off", or a tuple of allowed candidate names, per site
        family (experts: products by MoE experts' stacked weights).
    accuracy: per-site error budget, checked by the numerics gate.
    inner: compiler for the rewritten graph: Inductor (optionally in one of torch.compile's modes) or eager.
    cuda_graphs: whether the compiled graph runs replayed from CUDA graphs, where no Python dispatches a custom op
        and the cost model leaves that term out: "auto" as the inner mode sets Inductor's CUDA graphs, "on" when the
        caller captures graphs of its own (as a static-cache decode loop does), "off" never.
    calibrate: time applicable candidates on the real inputs (cached on disk) instead of trusting estimates.
    strict: raise instead of falling back when a stage fails or a rewrite fails its check.
    check_outputs: hold the rewritten graph's outputs to the accuracy budget too, against the original graph's on
        the example inputs: per-site budgets compound over a graph's sites (under "aggressive", 2:4 passes 195 of
        SmolLM2's 211 linears and takes its perplexity from 30.7 to 3006). Below it, the rewritten sites of lowest
        SQNR go back to the original, as few as bring the outputs within it. Costs two runs of the graph on the
        example inputs per compile, and a rewrite and a run per bisection step when it reverts.
    fuse_siblings: fuse linears that read the same input (Q/K/V, gate/up) into one over their concatenated
        weights, before matching (exact). The concatenation is a copy (about +70% of a Llama layer's weight bytes)
        next to the module's parameters, freed once no compiled graph reads it as is (its linear packed; a branch
        that keeps the original at some row counts runs the member linears). "auto" (default): a group whose fused
        linear would read the copy as is (kept in the original dtype at every size) is left unfused, unless
        release_weights frees the members; True: always fused; False: never.
        linear="off" turns it off too.
    fuse_epilogues: let a linear's Triton kernel apply the pointwise ops after it (activation, SwiGLU, residual add,
        dtype cast) before it stores its output (codegen/ generates them); checked by the gate like any rewrite.
        Estimates credit the fusion; calibrate=True times the linears alone.
    fuse_norms: fold an RMSNorm into the weight-only Triton linears (int8/int4 on CUDA) that read it: they normalize
        their input in their own K loop and the norm's kernel goes (passes/norms.py); checked by the gate at
        rounding level ("lossless"), per norm. On the H100 the 1.1B's int4 decode went 937 -> 977 tok/s with it.
    release_weights: free each original weight once every compiled graph reads its packed copy instead (its bytes
        go to host memory from a GPU, to a temporary file on CPU; see torchfx_eff.memory). The model's released
        parameters then hold no data outside compiled graphs: torchfx_eff.restore_weights(model) brings them back.
    output_linear_8bit: the graph's output linear (an LM head: a linear whose value the graph returns, directly or
        through views, reshapes and casts, and that no other linear reads) refuses candidates of fewer than 8 bits a
        weight (int4, ternary), as GPTQ, AWQ and llama.cpp keep the LM head at high precision; it takes the next
        candidate (int8, or the original). On SmolLM2 it takes int4 g64 from +7.2% perplexity to +5.25%.
    combo_kernels: let the inner Inductor compile launch independent kernels as one (its combo kernels: a decode
        layer's RoPE of q, RoPE of k with the key cache write, the value cache write), where kernel launches rather
        than bytes bound a step. On the H100 the 1.1B's int4 decode went 1388 -> 1484 tok/s with it. Where Inductor
        fails with them, the graph compiles without them (an "inductor" record says so).
    log: path of a JSONL file that receives every compiled graph's records.
    device: name of a device spec (see torchfx_eff.cost.devices.SPECS) to cost for instead of the detected one.
    """

    attention: FamilyChoice = "auto"
    linear: FamilyChoice = "auto"
    experts: FamilyChoice = "auto"
    accuracy: str = "balanced"
    inner: str = "inductor"
    cuda_graphs: str = "auto"
    calibrate: bool = False
    strict: bool = False
    check_outputs: bool = True
    fuse_siblings: bool | str = "auto"
    fuse_epilogues: bool = True
    fuse_norms: bool = True
    release_weights: bool = False
    output_linear_8bit: bool = True
    combo_kernels: bool = True
    log: str | None = None
    device: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
        for field in FAMILIES:
            set_(field, _family(field, getattr(self, field)))
        _choice("accuracy", self.accuracy, ACCURACY)
        _choice("inner", self.inner, INNER)
        _choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        for field in BOOLEANS:
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"Config.{field}={getattr(self, field)!r} is not allowed; use True or False")
        if not (isinstance(self.fuse_siblings, bool) or self.fuse_siblings == "auto"):
            raise ValueError(f"Config.fuse_siblings={self.fuse_siblings!r} is not allowed; use 'auto', True or False")
        if self.log is not None and not isinstance(self.log, (str, os.PathLike)):
            raise ValueError(f"Config.log={self.log!r} is not allowed; use a file path or None")
        if self.log is not None:
            set_("log", os.fspath(self.log))
        if self.device is not None:
            from .cost.devices import SPECS

            _choice("device", self.device, tuple(SPECS))

    def family(self, kind: str) -> FamilyChoice:
        """The setting that governs sites of `kind` ("auto" for kinds without a field)."""
        return getattr(self, kind, "auto")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Config":
        """Read TORCHFX_EFF_<FIELD> variables; tuples are comma-separated, booleans 1/0/true/false."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"TORCHFX_EFF_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "fuse_siblings" and raw.lower() == "auto":
                values[f.name] = "auto"
            elif f.name in (*BOOLEANS, "fuse_siblings"):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"TORCHFX_EFF_{f.name.upper()}={raw!r} is not allowed; use 1/0/true/false")
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif f.name in FAMILIES and raw not in FAMILY_MODES:
                values[f.name] = tuple(s.strip() for s in raw.split(",") if s.strip())
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)
