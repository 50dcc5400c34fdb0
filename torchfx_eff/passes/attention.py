"""Attention sites: the SDPA op in all its argument forms, and eager softmax attention."""
from __future__ import annotations

import operator
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import GraphInfo, bind, fake, hints_of, location, numel, sym
from .sites import AttentionSite, Miss

SDPA = torch._C._nn.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MATMULS = (torch.matmul, torch.bmm, torch.einsum)


def match(info: GraphInfo) -> Iterator[AttentionSite | Miss]:
    for node in info.gm.graph.nodes:
        if node.op == "call_function" and node.target is SDPA:
            yield _sdpa_site(node)
        elif _is_softmax(node) and _near(node, "up", 8, _is_matmul) and _near(node, "down", 4, _is_matmul):
            yield _eager_site(node)


def _unrepeat(node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(base, n_rep, view nodes) if `node` repeats the heads (dim 1) of a [B, Hkv, L, D] base: repeat_kv's
    base[:, :, None].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv * n_rep, L, D), or repeat_interleave."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    if node.target in ("repeat_interleave", torch.repeat_interleave):
        a = bind(node, ("input", "repeats", "dim"))
        base = a.get("input")
        if isinstance(a.get("repeats"), int) and fake(base) is not None and fake(base).dim() == 4 and a.get("dim") in (1, -3):
            return base, a["repeats"], [node]
        return None
    expand = node.args[0] if node.target in ("reshape", "view") else None
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    item = expand.args[0]
    if not (isinstance(item, fx.Node) and item.op == "call_function" and item.target is operator.getitem):
        return None
    base = item.args[0]
    fb, fi, fe, fo = fake(base), fake(item), fake(expand), fake(node)
    if any(t is None for t in (fb, fi, fe, fo)) or fb.dim() != 4 or fe.dim() != 5 or not isinstance(fe.shape[2], int):
        return None
    b, h, l, d = (sym(s) for s in fb.shape)
    n = fe.shape[2]
    shapes_ok = ([sym(s) for s in fi.shape] == [b, h, 1, l, d] and [sym(s) for s in fe.shape] == [b, h, n, l, d]
                 and [sym(s) for s in fo.shape] == [b, h * n, l, d])
    return (base, n, [item, expand, node]) if shapes_ok else None


def _fold_gqa(k, v, k_transposed: bool):
    """(k, v, k_transposed, n_rep, view nodes) with repeated K/V heads folded back to the base tensors."""
    kt_view = None
    if k_transposed and k.op == "call_method" and k.target == "transpose" and len(k.args) == 3:
        ndim = fake(k).dim() if fake(k) is not None else 0
        if {a % ndim for a in k.args[1:]} == {ndim - 2, ndim - 1}:
            kt_view, k = k, k.args[0]
    uk, uv = _unrepeat(k), _unrepeat(v)
    if (k_transposed and kt_view is None) or uk is None or uv is None or uk[1] != uv[1] or uk[1] < 2:
        return None
    return uk[0], uv[0], False, uk[1], uk[2] + ([kt_view] if kt_view is not None else []) + uv[2]


def _sdpa_site(node: fx.Node) -> AttentionSite | Miss:
    a = bind(node, SDPA_ARGS)
    where = location(node)
    q, k, v = (fake(a.get(n)) for n in ("query", "key", "value"))
    if q is None or k is None or v is None or q.dim() < 2:
        return Miss("attention", node, "sdpa", where, "no tensor shape metadata for q, k or v")
    dropout, is_causal, scale, gqa = (a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False))
    if isinstance(dropout, fx.Node) or dropout != 0.0:
        return Miss("attention", node, "sdpa", where, f"dropout_p={dropout} (training); only dropout-free attention is rewritten")
    if any(isinstance(x, fx.Node) for x in (is_causal, gqa)):  # a run-time scale is just passed along
        return Miss("attention", node, "sdpa", where, "is_causal or enable_gqa is a run-time value")
    key, value, views, repeat = a["key"], a["value"], [], 1
    if not gqa and (folded := _fold_gqa(key, value, k_transposed=False)):
        key, value, _, repeat, views = folded
        k, v, gqa = fake(key), fake(value), True
    heads = lambda t: t.shape[-3] if t.dim() >= 3 else 1
    dims = {"B": numel(q.shape[:-3]), "H": sym(heads(q)), "Hkv": sym(heads(k)), "Lq": sym(q.shape[-2]),
            "Lk": sym(k.shape[-2]), "D": sym(q.shape[-1]), "Dv": sym(v.shape[-1])}
    return AttentionSite(
        node=node, op="sdpa", location=where, dtype=q.dtype, device=q.device, dims=dims,
        hints=hints_of([*q.shape, *k.shape, *v.shape]), chain=[*views, node], q=a["query"], k=key, v=value,
        mask=a.get("attn_mask"), is_causal=bool(is_causal), scale=scale, enable_gqa=bool(gqa), kv_repeat=repeat,
    )


CASTS = ("to", "type", "float", "half", "bfloat16", "type_as")
SCALES = {operator.mul: False, torch.mul: False, operator.truediv: True, torch.div: True}  # op -> divides
ADDS = (operator.add, torch.add)


def _is_identity_after_softmax(n: fx.Node) -> bool:
    """A cast, or dropout that is off (eval or p=0)."""
    if n.op == "call_method" and n.target in CASTS:
        return True
    if n.op == "call_function" and n.target is F.dropout:
        a = bind(n, ("input", "p", "training", "inplace"))
        return a.get("training", True) is False or a.get("p", 0.5) == 0
    return False


def _scaled_operand(n: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, number) of `tensor * number`, `number * tensor` or `tensor / number`; else None."""
    a, b = n.args[:2] if len(n.args) >= 2 else (None, None)
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, b
    if not SCALES[n.target] and isinstance(a, (int, float)) and isinstance(b, fx.Node):
        return b, a
    return None


def _eager_site(softmax: fx.Node) -> AttentionSite | Miss:
    """matmul(q, kᵀ) [* or / scale] [+ mask] -> softmax(-1) [cast] [dropout off] -> matmul(·, v)."""
    where = location(softmax)
    miss = lambda why: Miss("attention", softmax, "eager", where, f"eager attention not taken: {why}")
    chain = [softmax]
    out = softmax
    while len(out.users) == 1 and _is_identity_after_softmax(next(iter(out.users))):
        out = next(iter(out.users))
        chain.append(out)
    pv = next(iter(out.users)) if len(out.users) == 1 else None
    if pv is None or not _is_matmul(pv) or pv.target is torch.einsum or pv.args[0] is not out:
        return miss("softmax output is not consumed by one matmul with v (directly, or through a cast or dropout)")
    chain.append(pv)
    a = bind(softmax, ("input", "dim"))
    ndim = fake(softmax).dim() if fake(softmax) is not None else -1
    if a.get("dim") not in (-1, ndim - 1):
        return miss(f"softmax over dim {a.get('dim')}, not the last")
    scale, terms, scaled, x = 1.0, [], False, a["input"]
    while not _is_matmul(x):
        if len(x.users) != 1:
            return miss(f"{x.name} between the scores and softmax is used elsewhere too")
        chain.insert(0, x)
        if x.op == "call_method" and x.target in CASTS:
            x = x.args[0]
        elif x.op == "call_function" and x.target in SCALES and (operand := _scaled_operand(x)) is not None:
            divides = SCALES[x.target]
            x, c = operand
            scale, scaled = (scale / c if divides else scale * c), True
        elif x.op == "call_function" and x.target in ADDS and len(x.args) == 2 and not x.kwargs:
            if scaled:
                return miss("a mask or bias added before the scale")
            scores_first = _near(x.args[0], "up", 3, _is_matmul) or _is_matmul(x.args[0])
            x, term = (x.args[0], x.args[1]) if scores_first else (x.args[1], x.args[0])
            if not isinstance(term, fx.Node) or fake(term) is None or not fake(term).is_floating_point():
                return miss("an additive mask or bias that is not a floating-point tensor")
            terms.insert(0, term)
        else:
            return miss(f"{x.op} {getattr(x.target, '__name__', x.target)} between the scores and softmax")
    if len(x.users) != 1 or x.target is torch.einsum:
        return miss("the score matmul is an einsum or is used elsewhere too")
    chain.insert(0, x)
    q, k, v = x.args[0], x.args[1], pv.args[1]
    if fake(q) is None or fake(k) is None or fake(v) is None or fake(q).dim() < 2:
        return miss("no tensor shape metadata for q, k or v")
    k_transposed, gqa, repeat = True, False, 1
    if folded := _fold_gqa(k, v, k_transposed=True):
        k, v, k_transposed, repeat, views = folded
        chain[:0], gqa = views, True
    fq, fk, fv = fake(q), fake(k), fake(v)
    heads = lambda t: t.shape[-3] if t.dim() >= 3 else 1
    dims = {"B": numel(fq.shape[:-3]), "H": sym(heads(fq)), "Hkv": sym(heads(fk)), "Lq": sym(fq.shape[-2]),
            "Lk": sym(fk.shape[-1] if k_transposed else fk.shape[-2]), "D": sym(fq.shape[-1]), "Dv": sym(fv.shape[-1])}
    return AttentionSite(
        node=pv, op="eager", location=where, dtype=fq.dtype, device=fq.device, dims=dims,
        hints=hints_of([*fq.shape, *fk.shape, *fv.shape]), chain=chain, q=q, k=k, v=v,
        mask=tuple(terms) if len(terms) > 1 else (terms[0] if terms else None),
        scale=float(scale), k_transposed=k_transposed, enable_gqa=gqa, kv_repeat=repeat,
    )


def _is_softmax(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (torch.softmax, F.softmax)) or (n.op == "call_method" and n.target == "softmax")


def _is_matmul(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in MATMULS


def _near(node: fx.Node, direction: str, depth: int, pred) -> bool:
    """Whether a node satisfying `pred` lies within `depth` steps up (inputs) or down (users)."""
    frontier = [node]
    for _ in range(depth):
        frontier = [m for n in frontier for m in (n.all_input_nodes if direction == "up" else n.users)]
        if any(pred(m) for m in frontier):
            return True
    return False
