"""Typed sites: what a matcher found, in the terms the kernels and cost formulas use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import sympy
import torch
import torch.fx as fx


@dataclass
class Site:
    kind: ClassVar[str]
    rows: ClassVar[str | None] = None  # the dim that counts rows where the site's cost regime changes (decode/prefill)
    node: fx.Node  # the node whose value the rewrite replaces
    op: str
    location: str
    dtype: torch.dtype
    device: torch.device
    dims: dict[str, sympy.Expr]  # named sizes over the graph's symbols
    hints: dict[sympy.Symbol, int] = field(default_factory=dict)
    chain: list[fx.Node] = field(default_factory=list)  # every node the rewrite replaces, `node` last
    # the values the chain reads, on the example inputs: set by the backend after its capture, before any replace()
    inputs: dict[fx.Node, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.chain = self.chain or [self.node]

    def size(self, name: str) -> int:
        """A named size at the example inputs."""
        return int(self.dims[name].xreplace(self.hints))


@dataclass
class Epilogue:
    """Pointwise ops after a linear that its kernel may apply to the output tile before storing it (passes/epilogue.py
    finds them, codegen/ generates their Triton)."""

    spec: str  # codegen.epilogue's steps, e.g. "silu,mul"
    nodes: list[fx.Node]  # the graph nodes it computes, in graph order; the last one holds its value
    labels: list[str]  # what it does, for the report: "swiglu(silu)", "+residual", "to float16"
    dtype: torch.dtype  # of its value, after any cast: the kernel stores in it
    operand: fx.Node | None = None  # the tensor an add or mul step reads (a residual, SwiGLU's up)
    operand_dtype: torch.dtype | None = None

    @property
    def out(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def pairs(self) -> bool:
        """Gate and up are the two halves of the linear's channels (a sibling-fused gate/up)."""
        return self.spec.startswith("glu_")

    def __str__(self) -> str:
        return ", ".join(self.labels)


@dataclass
class LinearSite(Site):
    """y = x @ W^T + b with W a parameter; dims M (rows of x), N (out), K (in)."""

    kind: ClassVar[str] = "linear"
    rows: ClassVar[str] = "M"
    x: fx.Node = None
    weight: torch.Tensor = None  # the real parameter, as stored
    weight_name: str = ""  # its graph input or attribute name, the same in every graph that reads it
    weight_layout: str = "nk"  # "nk" for F.linear, "kn" for addmm/matmul (GPT-2 Conv1D)
    bias: fx.Node | None = None
    bias_param: torch.Tensor | None = None  # the real tensor behind bias when it is a parameter or buffer
    # the pointwise ops after it that a Triton kernel may apply (passes/epilogue.py); replace() applies it when set,
    # and candidates that do not fuse it get a copy of the site without it
    epilogue: Epilogue | None = None

    def weight_nk(self) -> torch.Tensor:
        return self.weight if self.weight_layout == "nk" else self.weight.t()


@dataclass
class ExpertsSite(Site):
    """A product by a stack of E weight matrices, one per MoE expert: rows offs[e-1]:offs[e] of x [S, K] times expert
    e's weight (grouped_mm); with ids, row s of x [S, K] times expert ids[s]'s (a gathered bmm, transformers'
    batched_mm experts: the value is [S, N, 1], or [S, 1, N] with transposed_out); with neither, batch e of x
    [E, T, K] times expert e's (bmm). dims S (rows), E, N, K and A, the experts whose weights are read: min(E, S)
    where rows pick experts (one no row picks is skipped), E for a batched product."""

    kind: ClassVar[str] = "experts"
    rows: ClassVar[str] = "S"
    x: fx.Node = None
    offs: fx.Node | None = None
    ids: fx.Node | None = None
    transposed_out: bool = False
    weight: torch.Tensor = None  # the real [E, N, K] or [E, K, N] parameter, as stored
    weight_name: str = ""
    weight_layout: str = "enk"  # "enk": the product reads each expert's weight transposed (as F.linear does)

    def weight_enk(self) -> torch.Tensor:
        return self.weight if self.weight_layout == "enk" else self.weight.transpose(1, 2)


@dataclass
class AttentionSite(Site):
    """softmax(cap(q k^T * scale) + mask) v; dims B, H, Hkv, Lq, Lk, D, Dv.

    cap(s) = softcap * tanh(s / softcap) when softcap is set (Gemma 2), else s. mask follows SDPA: a bool tensor
    is True where a key is attended, a float one is added. mask_fill = (cond, value) is masked_fill's spelling:
    where cond holds the score is replaced by value (-inf, or finfo.min)."""

    kind: ClassVar[str] = "attention"
    q: fx.Node = None
    k: fx.Node = None
    v: fx.Node = None
    mask: fx.Node | tuple[fx.Node, ...] | None = None  # several additive terms (T5: bias + mask) are summed
    mask_fill: tuple[fx.Node, float] | None = None
    softcap: float | None = None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    k_transposed: bool = False  # k is given as k^T (eager attention's matmul operand)
    kv_repeat: int = 1  # the original repeats K/V heads this many times (repeat_kv); the site reads them unrepeated

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.mask_fill is not None


@dataclass
class Miss:
    """Something that looks like a site but that no matcher could take."""

    kind: str
    node: fx.Node
    op: str
    location: str
    reason: str
