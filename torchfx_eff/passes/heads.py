"""Eager attention respelled so that the eager-attention matcher takes it:
- Scores from baddbmm(bias, q, kᵀ, beta=, alpha=) (a bias added inside the score product) become
  bmm(q, kᵀ) * alpha + bias * beta.
- Scores multiplied or divided by a number known only at run time (a SymFloat: under dynamic shapes Dynamo makes a
  module's float attribute, such as an eager attention's `scaling`, symbolic) take that factor on q instead, since
  a site's scale must be a constant.
- BLOOM computes its scores over [B·H, L, D], views them as [B, H, Lq, Lk] to add its [B, 1, Lq, Lk] mask and take
  the softmax, and views the probabilities back to [B·H, Lq, Lk] for the product with v (GPT-2's upcast path
  multiplies them with v over [B, H, ...] as they are). Unflattening q, kᵀ, v and the score terms to [B, H, ...]
  leaves one 4-D chain from the scores to the output (flattened back to [B·H, Lq, D] once), every mask term in one
  shape.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from .attention import _is_add, _is_identity_after_softmax, _is_softmax, _near, _scores_operand, runtime_factor
from .graph import bind, call, fake, sym

VIEWS = ("view", "reshape")
BADDBMM_ARGS = ("input", "batch1", "batch2", "beta", "alpha")
BMM = (torch.bmm, torch.matmul, operator.matmul)


def respell(gm: fx.GraphModule) -> int:
    """Respell each baddbmm score product, run-time score factor and merged-heads attention in gm. Returns how
    many."""
    done = 0
    for node in list(gm.graph.nodes):
        if _is_baddbmm(node) and fake(node) is not None and _near(node, "down", 10, _is_softmax):
            _baddbmm_as_sum(gm, node)
            done += 1
    for node in list(gm.graph.nodes):
        if (factor := runtime_factor(node)) is not None and _scales_scores(node, factor):
            _scale_onto_q(gm, node, factor)
            done += 1
    for node in list(gm.graph.nodes):
        if _is_softmax(node) and (found := _merged(node)) is not None:
            _respell(gm, *found)
            done += 1
    return done


def _baddbmm_as_sum(gm: fx.GraphModule, node: fx.Node) -> None:
    a = bind(node, BADDBMM_ARGS)
    graph, mode = gm.graph, fake(node).fake_mode
    with graph.inserting_before(node):
        product = graph.call_function(torch.bmm, (a["batch1"], a["batch2"]))
        scaled = product if a.get("alpha", 1) == 1 else graph.call_function(operator.mul, (product, a["alpha"]))
        beta = a.get("beta", 1)
        bias = a["input"] if beta == 1 else None if beta == 0 else graph.call_function(operator.mul, (a["input"], beta))
        total = scaled if bias is None else graph.call_function(operator.add, (scaled, bias))
    for n in dict.fromkeys([product, scaled, bias, total]):
        if n is not None and n is not a["input"]:
            n.meta["stack_trace"] = node.meta.get("stack_trace")
            with mode:
                n.meta["example_value"] = call(n, lambda m: m.meta.get("example_value"))
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def _scales_scores(node: fx.Node, factor: fx.Node) -> bool:
    """Whether node scales a score product (its only user) on the way to a softmax."""
    p = next(a for a in node.args if a is not factor)
    return (isinstance(p, fx.Node) and _is_product(p) and len(p.users) == 1 and node.args[0] is p
            and _near(node, "down", 8, _is_softmax))


def _scale_onto_q(gm: fx.GraphModule, node: fx.Node, factor: fx.Node) -> None:
    """(q @ kᵀ) * f -> (q * f) @ kᵀ, and / f likewise."""
    product, graph = node.args[0], gm.graph
    node.prepend(product)  # after f, wherever f is computed (its only user is node)
    with graph.inserting_before(product):
        q = graph.call_function(node.target if node.op == "call_function" else getattr(torch, node.target),
                                (product.args[0], factor))
    q.meta["stack_trace"] = node.meta.get("stack_trace")
    with fake(product).fake_mode:
        q.meta["example_value"] = call(q, lambda m: m.meta.get("example_value"))
    product.args = (q, product.args[1])
    node.replace_all_uses_with(product)
    graph.erase_node(node)


def _merged(softmax: fx.Node):
    """(scores, the nodes from the scores to the split view, the split view, the heads, the merge view (None where
    the product with v is over [B, H, ...] already), the product with v) of a merged-heads attention around softmax,
    or None."""
    path, split, x = [], None, softmax.args[0] if softmax.args else None
    while isinstance(x, fx.Node) and not _is_product(x):
        if len(x.users) != 1:
            return None
        if split is None and _is_view(x) and _splits(x):
            split, x = x, x.args[0]
            continue
        up = _carrier(x)
        if not isinstance(up, fx.Node):
            return None
        if split is not None:
            path.insert(0, x)
        x = up
    if split is None or not isinstance(x, fx.Node) or len(x.users) != 1 or _dims(x) != 3:
        return None
    out = softmax
    while len(out.users) == 1 and _is_identity_after_softmax(next(iter(out.users))):
        out = next(iter(out.users))
    merge = next(iter(out.users)) if len(out.users) == 1 else None
    if merge is not None and _is_product(merge) and merge.args[0] is out and _dims(merge.args[1]) == 4:
        merge, pv = None, merge  # GPT-2's upcast path: the product with v over [B, H, ...] already
    elif merge is not None and _is_view(merge) and len(merge.users) == 1 and _splits(merge, back=True):
        pv = next(iter(merge.users))
        if not _is_product(pv) or pv.args[0] is not merge or _dims(pv.args[1]) != 3:
            return None
    else:
        return None
    heads = fake(split).shape[1]
    if not isinstance(heads, int) or not all(_broadcasts(t, heads) for n in path for t in n.all_input_nodes):
        return None
    return x, path, split, heads, merge, pv


def _respell(gm: fx.GraphModule, scores, path, split, heads: int, merge, pv) -> None:
    graph, new = gm.graph, []

    def unflatten(t: fx.Node, before: fx.Node) -> fx.Node:
        with graph.inserting_before(before):
            new.append(graph.call_method("unflatten", (t, 0, (-1, heads))))
        return new[-1]

    carried = {n: _carrier(n) for n in path}  # before any shape changes
    q, k = scores.args
    scores.op, scores.target, scores.kwargs = "call_function", torch.matmul, {}
    scores.args = (unflatten(q, scores), unflatten(k, scores))
    for n in path:
        n.args = tuple(unflatten(t, n) if t is not carried[n] and _leading(t, heads) else t for t in n.args)
    split.replace_all_uses_with(split.args[0])
    graph.erase_node(split)
    changed = {scores, *path}
    if merge is not None:
        merge.replace_all_uses_with(merge.args[0])
        graph.erase_node(merge)
        p, v = pv.args
        pv.op, pv.target, pv.args, pv.kwargs = "call_function", torch.matmul, (p, unflatten(v, pv)), {}
        with graph.inserting_after(pv):
            flat = graph.call_method("flatten", (pv, 0, 1))
        pv.replace_all_uses_with(flat, delete_user_cb=lambda user: user is not flat)
        changed |= {pv, flat}
    changed, mode = changed | set(new), fake(scores).fake_mode
    for n in graph.nodes:  # in graph order, so each one's inputs have values
        if n in changed:
            n.meta.setdefault("stack_trace", pv.meta.get("stack_trace"))
            with mode:
                n.meta["example_value"] = call(n, lambda m: m.meta.get("example_value"))


def _carrier(n: fx.Node, depth: int = 16):
    """The input carrying the scores into n: attention's _scores_operand, through views too."""
    if _is_view(n):
        return n.args[0]
    if _is_add(n) and depth > 0:
        return next((a for a in n.args if _reaches_product(a, depth - 1)), None)
    return _scores_operand(n)


def _reaches_product(n, depth: int) -> bool:
    while isinstance(n, fx.Node) and depth > 0 and not _is_product(n):
        n, depth = _carrier(n, depth), depth - 1
    return isinstance(n, fx.Node) and _is_product(n)


def _broadcasts(t: fx.Node, heads: int) -> bool:
    """Whether an operand of an op between the scores and the split view stays right over [B, H, ...]: no tensor,
    fewer than 3 dims, or 3 with the first 1 (kept) or B·H (unflattened)."""
    f = fake(t)
    return f is None or f.dim() < 3 or f.dim() == 3 and (sym(f.shape[0]) == 1 or _leading(t, heads))


def _leading(t, heads: int) -> bool:
    """Whether t is a 3-D tensor whose first dim is the merged B·H (a multiple of heads)."""
    f = fake(t)
    return (isinstance(t, fx.Node) and f is not None and f.dim() == 3
            and sympy.simplify(sym(f.shape[0]) / heads).is_integer is True)


def _splits(view: fx.Node, back: bool = False) -> bool:
    """Whether view turns [B·H, a, b] into [B, H, a, b] (back: the reverse), the last two dims kept."""
    src, out = fake(view.args[0]), fake(view)
    if back:
        src, out = out, src
    if src is None or out is None or src.dim() != 3 or out.dim() != 4:
        return False
    s, o = [sym(d) for d in src.shape], [sym(d) for d in out.shape]
    return s[1:] == o[2:] and sympy.simplify(s[0] - o[0] * o[1]) == 0


def _is_baddbmm(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is torch.baddbmm) or (n.op == "call_method" and n.target == "baddbmm")


def _is_view(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in VIEWS) or (n.op == "call_function" and n.target is torch.reshape)


def _is_product(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in BMM and len(n.args) == 2 and not n.kwargs


def _dims(n) -> int:
    return fake(n).dim() if fake(n) is not None else -1
