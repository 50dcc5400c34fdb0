"""RMSNorm folded into the weight-only linears that read it: after the rewrite, a norm whose every reader is a
`torchfx_eff::weight_only_mm` taking it as x is computed inside those kernels (x times the norm's weight in the K
loop, the sum of squares beside it, 1 / rms on the output rows), and its own kernel is gone.

Pattern (how an RMSNorm is spelled, whatever the model): F.rms_norm over the last dim with a weight, or the
product, through casts, of exactly three factors:
    x0                      the input (through casts)
    rsqrt(mean(x0^2) + eps) over the last dim, keepdim, x0 through casts, eps a number
    a weight of shape [K]   any value that does not depend on x0 (Llama's weight, Gemma's 1 + weight)
Guards (separate predicates) say why a found norm is not folded; the numerics gate checks each fold against the
unfused op on the example inputs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .epilogue import arg, calls, cast
from .graph import fake, location

MUL = (operator.mul, torch.mul, "mul")
ADD = (operator.add, torch.add, "add")


@dataclass
class RMSNorm:
    out: fx.Node  # the normalized value
    x: fx.Node  # its input
    weight: fx.Node  # the [K] factor
    eps: float
    nodes: list[fx.Node]  # what computes out from x and weight, out last


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and (cast(node) is not None or node.target == "type_as")


def _through_casts(node, seen: list):
    """node with the casts before it stripped (each stripped cast appended to seen)."""
    while _is_cast(node):
        seen.append(node)
        node = node.args[0]
    return node


def _factors(node: fx.Node, seen: list) -> list:
    """The leaves of a product tree through casts; its mul and cast nodes appended to seen."""
    node = _through_casts(node, seen)
    if isinstance(node, fx.Node) and calls(node, MUL) and len(node.args) == 2:
        seen.append(node)
        return _factors(node.args[0], seen) + _factors(node.args[1], seen)
    return [node]


def _inverse_rms(node, seen: list) -> tuple[fx.Node, float] | None:
    """(x0, eps) if node is rsqrt(mean(x0^2, -1, keepdim) + eps), x0 through casts."""
    if not (isinstance(node, fx.Node) and calls(node, (torch.rsqrt, "rsqrt"))):
        return None
    total = node.args[0]
    if not (isinstance(total, fx.Node) and calls(total, ADD) and len(total.args) == 2):
        return None
    mean, eps = total.args if isinstance(total.args[1], (int, float)) else total.args[::-1]
    if not (isinstance(eps, (int, float)) and isinstance(mean, fx.Node) and calls(mean, (torch.mean, "mean"))):
        return None
    square, dim = mean.args[0], arg(mean, 1, "dim")
    square_of = fake(square)
    if square_of is None or dim not in (-1, square_of.dim() - 1, [-1], (-1,)) or not arg(mean, 2, "keepdim", False):
        return None
    if not (isinstance(square, fx.Node) and calls(square, (torch.pow, "pow")) and arg(square, 1, "exponent") == 2):
        return None
    inner: list = []
    x0 = _through_casts(square.args[0], inner)
    seen += [node, total, mean, square, *inner]
    return x0, float(eps)


def _rms_norm_call(node: fx.Node) -> RMSNorm | None:
    """F.rms_norm over the last dim with a weight (nn.RMSNorm traces to it); eps None is the dtype's epsilon."""
    if not calls(node, (torch.rms_norm, F.rms_norm)):
        return None
    x0, shape, weight, eps = (arg(node, i, name) for i, name in enumerate(("input", "normalized_shape", "weight", "eps")))
    value = fake(x0) if isinstance(x0, fx.Node) else None
    if value is None or not isinstance(weight, fx.Node) or list(shape) != [value.shape[-1]]:
        return None
    return RMSNorm(node, x0, weight, torch.finfo(value.dtype).eps if eps is None else float(eps), [node])


def find(node: fx.Node) -> RMSNorm | None:
    """The RMSNorm whose value node is, if it is one."""
    if isinstance(node, fx.Node) and (norm := _rms_norm_call(node)):
        return norm
    seen: list[fx.Node] = []
    leaves = _factors(node, seen)
    if len(leaves) != 3:
        return None
    for r in leaves:
        found = _inverse_rms(r, seen_r := [])
        if found is None:
            continue
        x0, eps = found
        rest = [leaf for leaf in leaves if leaf is not r]
        stripped = [_through_casts(leaf, []) for leaf in rest]
        if sum(s is x0 for s in stripped) != 1:
            return None
        weight = rest[0] if stripped[1] is x0 else rest[1]
        value, w = fake(x0), fake(weight)
        if value is None or w is None or w.dim() != 1 or w.shape[0] != value.shape[-1] or _reads(weight, x0):
            return None
        lead = rest[0] if weight is rest[1] else rest[1]
        _through_casts(lead, casts := [])
        nodes = set(seen + seen_r + casts)
        return RMSNorm(node, x0, weight, eps, [n for n in node.graph.nodes if n in nodes])
    return None


def _reads(node, x0: fx.Node) -> bool:
    """Whether node's value depends on x0."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is x0:
            return True
        if isinstance(n, fx.Node) and n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return False


# Guards: why a found norm is not folded (None: it may be).
def foldable(norm: RMSNorm, op) -> str | None:
    inside = set(norm.nodes)
    for n in norm.nodes[:-1]:
        if any(u not in inside for u in n.users):
            return f"{n.name}, inside the norm, is read elsewhere too"
    readers = list(norm.out.users)
    if not readers or any(u.target is not op or u.args[0] is not norm.out or norm.out in (*u.args[1:], *u.kwargs.values())
                          or u.kwargs.get("norm_weight") is not None for u in readers):
        return "a reader of the norm's value is not a weight-only Triton linear taking it as its input"
    if fake(norm.x).dtype != fake(norm.out).dtype:
        return f"the norm changes the dtype ({fake(norm.x).dtype} -> {fake(norm.out).dtype})"
    return None


def folded(reader: fx.Node, norm: RMSNorm) -> dict:
    """reader's arguments, by name, with the norm folded in: it reads the norm's input and stores in its own dtype."""
    names = [a.name for a in reader.target._schema.arguments]
    bound = {**dict(zip(names, reader.args)), **reader.kwargs}
    return {**bound, "x": norm.x, "out_dtype": bound.get("out_dtype") or fake(reader).dtype, "norm_weight": norm.weight,
            "norm_eps": norm.eps}


def label(norm: RMSNorm) -> str:
    return location(norm.out)
