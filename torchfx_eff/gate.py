"""Numerics gate: run each chosen rewrite on the real example inputs against the original subgraph."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .kernels import Replacement
from .passes.graph import call

# Per-site error budgets as SQNR of the site's output, in dB. "lossless" allows only rounding-level error,
# which depends on the dtype the model computes in.
LOSSLESS_DB = {torch.float64: 200.0, torch.float32: 100.0, torch.float16: 50.0, torch.bfloat16: 35.0}
BUDGET_DB = {"balanced": 20.0, "aggressive": 8.0}


def min_sqnr_db(accuracy: str, dtype: torch.dtype) -> float:
    return LOSSLESS_DB.get(dtype, 35.0) if accuracy == "lossless" else BUDGET_DB[accuracy]


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """10·log10(|ref|² / |ref - actual|²), computed in fp64; inf when they are equal."""
    ref, act = reference.detach().double(), actual.detach().double()
    noise = (ref - act).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutated(gm: fx.GraphModule) -> set[fx.Node]:
    """Values the graph writes to in place (e.g. a static KV cache), and the values they are views of."""
    mutated = set()
    for node in gm.graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        schema = getattr(node.target, "_schema", None)
        if (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) or node.target in _INPLACE_OPERATORS \
                or (schema is not None and schema.is_mutable):
            stack = list(node.all_input_nodes[:1])
            while stack:  # walk back through views (conservatively: through first inputs)
                n = stack.pop()
                mutated.add(n)
                stack.extend(n.all_input_nodes[:1])
    return mutated


class _Recorder(fx.Interpreter):
    """Keeps, for each site, the values it reads from outside its chain of nodes, as the chain reads them,
    and the value of its last node."""

    def __init__(self, gm, chains: dict[fx.Node, list[fx.Node]], mutated: set[fx.Node]):
        super().__init__(gm)
        self.mutated, self.values = mutated, {out: {} for out in chains}
        self.readers: dict[fx.Node, list[tuple[fx.Node, set[fx.Node]]]] = {}  # chain node -> (site, its chain)
        for out, chain in chains.items():
            for n in chain:
                self.readers.setdefault(n, []).append((out, set(chain)))

    def _snapshot(self, node, value):
        return value.clone() if node in self.mutated and isinstance(value, torch.Tensor) else value

    def run_node(self, n):
        for out, chain in self.readers.get(n, ()):
            seen = self.values[out]
            seen.update({a: self._snapshot(a, self.env[a]) for a in n.all_input_nodes if a not in chain and a not in seen})
        result = super().run_node(n)
        if n in self.values:
            self.values[n][n] = self._snapshot(n, result)
        return result


def _concrete(x):
    """A value to run with: symbolic sizes (dynamic shapes) become their example values, and tensors that
    are not parameters are copied, so that the run never touches the caller's caches or buffers."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        if x.node.hint is None:
            raise ValueError(f"symbolic input {x} has no example value")
        return x.node.hint
    return x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) else x


@torch.no_grad()
def capture(gm: fx.GraphModule, example_inputs: list, chains: dict[fx.Node, list[fx.Node]]) -> dict[fx.Node, dict]:
    """Run the original graph once on the example inputs. For each site, given as its last node -> its chain of
    nodes: the values the chain reads from outside (as read) and the value it produces."""
    recorder = _Recorder(gm, chains, _mutated(gm))
    recorder.run(*map(_concrete, example_inputs))
    return recorder.values


def resolve(arg, values: dict):
    """A replacement argument with graph nodes swapped for their captured values."""
    if isinstance(arg, fx.Node):
        return values[arg]
    if isinstance(arg, (list, tuple)):
        return type(arg)(resolve(a, values) for a in arg)
    if isinstance(arg, dict):
        return {k: resolve(v, values) for k, v in arg.items()}
    return arg


@torch.no_grad()
def run_replacement(rep: Replacement, values: dict):
    return rep.op(*resolve(rep.args, values), **resolve(rep.kwargs, values))


@torch.no_grad()
def run_chain(chain: list[fx.Node], values: dict):
    """The original chain of nodes on the values it reads from outside (capture's), as the graph runs it."""
    env = dict(values)
    for node in chain:
        env[node] = call(node, env.__getitem__)
    return env[chain[-1]]


def compare(reference: torch.Tensor, actual) -> tuple[float, str | None]:
    """(SQNR of actual against reference in dB, None), or (-inf, why they do not compare): another shape or dtype,
    or non-finite values where the other has none."""
    if not isinstance(actual, torch.Tensor) or actual.shape != reference.shape or actual.dtype != reference.dtype:
        got = (tuple(actual.shape), actual.dtype) if isinstance(actual, torch.Tensor) else type(actual).__name__
        return -math.inf, f"output {got} differs from the original's {(tuple(reference.shape), reference.dtype)}"
    if not torch.equal(actual.isfinite(), reference.isfinite()):
        return -math.inf, "non-finite values where the original has none (or the reverse)"
    finite = reference.isfinite()
    return sqnr_db(reference[finite], actual[finite]), None


def check(rep: Replacement, reference: torch.Tensor, values: dict, accuracy: str) -> tuple[float, str | None]:
    """(SQNR in dB, None) if the replacement is within the budget, else (SQNR, why not)."""
    db, why = compare(reference, run_replacement(rep, values))
    need = min_sqnr_db(accuracy, reference.dtype)
    return db, why or (None if db >= need else f"SQNR {db:.1f} dB below the {accuracy!r} budget of {need:.0f} dB")


@torch.no_grad()
def run_graph(gm: fx.GraphModule, example_inputs: list) -> list[torch.Tensor]:
    """The graph's tensor outputs on the example inputs, run as capture runs them (caches copied), from the random
    state it finds, which it restores: two graphs' runs draw the same random numbers."""
    cuda = [x.device.index or 0 for x in example_inputs if isinstance(x, torch.Tensor) and x.is_cuda][:1]
    with torch.random.fork_rng(devices=cuda):
        out = gm(*map(_concrete, example_inputs))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


# What a rewritten graph's outputs must keep against the original's, in dB: per-site budgets compound over a
# graph's sites, and logits lose more than a site. Chosen on SmolLM2 (every linear but the head emulated; logits of
# a 512-token window; perplexity over 2044 other tokens, bf16 30.71): int8 28.2 dB (-0.1%), fp8 19.4 dB (+3.4%),
# int4 g64 round-to-nearest 10.9 dB (+23%; held to 12 dB, the lowest-SQNR 48 of 210 back to bf16: +12.5%), 2:4 0.6 dB
# (x73; held to 8 dB, 179 back: +33%): bench/graph_budget.py.
GRAPH_BUDGET_DB = {"balanced": 12.0, "aggressive": 8.0}


def graph_budget_db(accuracy: str, outputs: list[torch.Tensor], sites: int) -> float:
    """What a rewritten graph's outputs must reach against the original's: GRAPH_BUDGET_DB's, or under "lossless"
    the rounding level of `sites` sites, whose errors add (10·log10(sites) below one site's)."""
    if accuracy != "lossless":
        return GRAPH_BUDGET_DB[accuracy]
    dtype = min((t.dtype for t in outputs if t.is_floating_point()), key=lambda d: LOSSLESS_DB.get(d, 35.0),
                default=torch.float32)
    return min_sqnr_db("lossless", dtype) - 10 * math.log10(max(sites, 1))


def compare_outputs(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, str | None]:
    """The lowest SQNR over a graph's floating-point outputs (inf for a graph without any), and why some output does
    not compare, if one does not. Other outputs (integers: token ids, indices) are not compared: a rewrite within
    budget may still flip an argmax between near-tied logits."""
    results = [compare(r, a) for r, a in zip(reference, actual) if r.is_floating_point()]
    why = next((f"output {i}: {w}" for i, (_, w) in enumerate(results) if w), None)
    return min((db for db, _ in results), default=math.inf), why


def fewest_reverted(n: int, attempt):
    """(the fewest k in 1..n for which attempt(k) -> (result, passes) passes, that attempt's result), or None if
    attempt(n) fails too: a bisection on k, which assumes that reverting more sites never makes outputs worse (and
    that attempt(0), every site rewritten, failed)."""
    low, high, found = 0, n, None  # attempt(low) fails; attempt(high) passes unless tried and found failing
    while found is None or high - low > 1:
        k = high if high - low <= 1 else (low + high) // 2
        result, passes = attempt(k)
        if passes:
            high, found = k, result
        elif k == high:
            return None
        else:
            low = k
    return high, found
