"""Linear sites: F.linear, addmm and matmul against a parameter (GPT-2's Conv1D is addmm)."""
from __future__ import annotations

import operator
from typing import Iterator

import torch
import torch.fx as fx

from .attention import CASTS
from .graph import GraphInfo, bind, fake, hints_of, location, numel, sym
from .sites import LinearSite, Miss

# target -> (parameter names, name of x, name of the weight, name of the bias, weight layout)
SPELLINGS = {
    torch._C._nn.linear: (("input", "weight", "bias"), "input", "weight", "bias", "nk"),
    torch.addmm: (("input", "mat1", "mat2"), "mat1", "mat2", "input", "kn"),
    torch.matmul: (("input", "other"), "input", "other", None, "kn"),
}
# Products by a 2-D parameter that are no linear spelling: each is reported missed (by target, or by method name).
# Products by a 3-D one (MoE experts' stacks) are passes/experts.py's.
PRODUCTS = {torch.matmul, torch.bmm, torch.baddbmm, torch.addbmm, torch.einsum, torch.tensordot,
            torch.nn.functional.multi_head_attention_forward, torch._native_multi_head_attention}
PRODUCT_NAMES = {"baddbmm", "addbmm"}
# Ops through which a parameter reaches a product as its layout changes
LAYOUT_METHODS = {"transpose", "permute", "t", "contiguous", "view", "reshape"}


def match(info: GraphInfo) -> Iterator[LinearSite | Miss]:
    for node in info.gm.graph.nodes:
        if node.op != "call_function" or node.target not in SPELLINGS:
            if (miss := _product_miss(info, node)) is not None:
                yield miss
            continue
        names, x_name, w_name, b_name, layout = SPELLINGS[node.target]
        args = bind(node, names)
        op, where = node.target.__name__, location(node)
        weight = info.parameter(args.get(w_name))
        if weight is None:
            # matmul/addmm of two activations is attention or plain math, not a linear layer
            if node.target is torch._C._nn.linear:
                yield Miss("linear", node, op, where, _runtime_weight(info, args.get(w_name)))
            elif (miss := _product_miss(info, node)) is not None:
                yield miss
            continue
        if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            yield Miss("linear", node, op, where, "addmm with beta or alpha other than 1")
            continue
        x, out = fake(args[x_name]), fake(node)
        if weight.dim() == 3:
            continue  # a stack of expert weights: passes/experts.py
        if x is None or out is None or weight.dim() != 2 or x.dim() < 1:
            yield Miss("linear", node, op, where, "no tensor shape metadata, or a weight that is not 2-D")
            continue
        n, k = weight.shape if layout == "nk" else weight.shape[::-1]
        bias = args.get(b_name) if b_name else None
        w_node = args[w_name]  # a stack's matrix (W[i]) goes with the site when nothing else reads it
        chain = [w_node, node] if w_node.op == "call_function" and len(w_node.users) == 1 else [node]
        yield LinearSite(
            node=node, op=op, location=where, dtype=out.dtype, device=out.device, chain=chain,
            dims={"M": numel(x.shape[:-1]), "N": sym(n), "K": sym(k)}, hints=hints_of(x.shape),
            x=args[x_name], weight=weight, weight_name=info.name(args[w_name]), weight_layout=layout, bias=bias,
            bias_param=info.parameter(bias),
        )


def _runtime_weight(info: GraphInfo, w: fx.Node) -> str:
    """Why F.linear's weight w, no parameter, is no site."""
    if isinstance(w, fx.Node) and w.op == "call_method" and w.target in CASTS and info.parameter(w.args[0]) is not None:
        return (f"weight is the parameter {info.name(w.args[0])} converted by .{w.target}() at run time (MoE routers "
                "compute in float32 so): kept at the precision the model asks for")
    return "weight is computed at run time, not a parameter, so it cannot be packed at compile time"


def _product_miss(info: GraphInfo, node: fx.Node) -> Miss | None:
    """Why a product by a 2-D parameter (PRODUCTS) is no linear site, or None if node is none."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_function", "call_method") or not (node.target in PRODUCTS or name in PRODUCT_NAMES):
        return None
    for operand in node.all_input_nodes:
        while operand.op == "call_method" and operand.target in LAYOUT_METHODS or (
                operand.op == "call_function" and operand.target is getattr and operand.args[1] in ("mT", "T")):
            operand = operand.args[0]
        if (p := info.parameter(operand)) is not None and p.dim() == 2:
            return Miss("linear", node, name, location(node),
                        f"multiplies by the parameter {info.name(operand)} {tuple(p.shape)} in a form that no linear spelling "
                        "takes (F.linear, x @ W, x @ W.T, W @ x.mT, addmm, mm, einsum or tensordot of x and W)")
    return None


# Ops through which a value reaches the graph's output unchanged but for its shape or dtype (views, reshapes,
# slicing, casts), or an elementwise map of it alone: a logit soft-cap (/ cap, tanh, * cap) still makes the
# linear the graph's output linear.
PASS_THROUGH_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "detach", *CASTS}
PASS_THROUGH_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, operator.getitem}
ELEMENTWISE_METHODS = {"tanh", "div", "mul", "add", "sub"}
ELEMENTWISE_FUNCTIONS = {torch.tanh, torch.div, torch.mul, torch.add, torch.sub, operator.truediv, operator.mul,
                         operator.add, operator.sub}


def passes_through(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS or (
            node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS):
        return not any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()])  # scalars only
    return ((node.op == "call_method" and node.target in PASS_THROUGH_METHODS)
            or (node.op == "call_function" and node.target in PASS_THROUGH_FUNCTIONS))


def feeds_output(node: fx.Node) -> bool:
    """Whether node's value is (part of) the graph's output, directly or through pass-through ops only."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                return True
            if passes_through(user) and user.args and user.args[0] is n:
                frontier.append(user)
    return False


def read_by_a_linear(node: fx.Node) -> bool:
    """Whether a linear (or a matmul) reads node's value, directly or downstream."""
    frontier, seen = list(node.users), set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in SPELLINGS:
            return True
        frontier.extend(n.users)
    return False


def is_output_linear(site: LinearSite) -> bool:
    """The graph's output linear, as an LM head is: its value is (part of) the graph's output, directly or through
    views, reshapes and casts only, and no other linear reads it. (A linear whose value a graph returns but a later
    linear also reads, such as a hidden state returned beside the logits, is an inner one.)"""
    return feeds_output(site.node) and not read_by_a_linear(site.node)
