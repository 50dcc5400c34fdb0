"""Attention sites: the SDPA op in all its argument forms, and eager softmax attention."""
from __future__ import annotations

import operator
import re
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import mha
from .graph import GraphInfo, bind, fake, hints_of, location, numel, sym
from .sites import AttentionSite, Miss

SDPA = torch._C._nn.scaled_dot_product_attention
FLEX = torch.ops.higher_order.flex_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MATMULS = (torch.matmul, operator.matmul, torch.bmm, torch.einsum)  # `@` is operator.matmul until normalized


def match(info: GraphInfo) -> Iterator[AttentionSite | Miss]:
    for node in info.gm.graph.nodes:
        if node.op == "call_function" and node.target is SDPA:
            yield _sdpa_site(node)
        elif node.op == "call_function" and node.target is FLEX:
            yield Miss("attention", node, "flex_attention", location(node), "flex_attention (its score_mod and mask as "
                       "functions) has no candidate: it runs as the inner compiler compiles it")
        elif why := mha.unspelled(node):
            yield Miss("attention", node, node.target.__name__, location(node), f"torch's fused attention call is "
                       f"not spelled out as linear + SDPA + linear: {why}")
        elif _is_softmax(node) and _near(node, "down", 4, _is_matmul) and _near(node, "up", 10, _is_matmul):
            yield _eager_site(node)  # (baddbmm scores are bmm + bias by now: passes/heads.py)


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
# In place too (Falcon's `scores /= sqrt(d)`): the ops from the scores to softmax each have one user (_scores_to_softmax),
# so no other reader sees the mutation.
SCALES = {operator.mul: False, torch.mul: False, "mul": False, operator.imul: False, operator.truediv: True,
          torch.div: True, "div": True, operator.itruediv: True}
ADDS = (operator.add, torch.add, operator.iadd)
FILL_ARGS = ("input", "mask", "value")
# A finite masked_fill value is taken only this low: adding it to any score below 2**40 leaves it unchanged in
# fp32, so the additive mask it becomes reproduces the fill exactly, a fully masked row included.
FILL_FLOOR = -(2.0 ** 64)


def _eager_site(softmax: fx.Node) -> AttentionSite | Miss:
    """matmul(q, kᵀ) [scale] [softcap] [+ masks, masked_fill] -> softmax(-1) [cast] [dropout off] -> matmul(·, v).

    The matmuls may be matmul, bmm, @ or einsum; scales fold into one, casts are passed through."""
    where = location(softmax)
    miss = lambda why: Miss("attention", softmax, "eager", where, f"eager attention not taken: {why}")
    a = bind(softmax, ("input", "dim"))
    ndim = fake(softmax).dim() if fake(softmax) is not None else -1
    if a.get("dim") not in (-1, ndim - 1):
        return miss(f"softmax over dim {a.get('dim')}, not the last")
    if isinstance(after := _softmax_to_pv(softmax), str):
        return miss(after)
    if isinstance(before := _scores_to_softmax(a["input"]), str):
        return miss(before)
    (tail, v), (scores, between) = after, before
    if isinstance(folded := _fold_scores(between), str):
        return miss(folded)
    qk = _einsum_qk(scores) if scores.target is torch.einsum else _matmul_qk(scores)
    if isinstance(qk, str):
        return miss(qk)
    site = _eager_attention([scores, *between, *tail], qk, v, folded, where)
    return miss(site) if isinstance(site, str) else site


def _eager_attention(chain, qk, v, folded: dict, where: str) -> AttentionSite | str:
    """The site from its parts, or why not."""
    (q, k, k_transposed), pv = qk, chain[-1]
    if any(fake(t) is None for t in (q, k, v, pv)) or fake(q).dim() < 2:
        return "no tensor shape metadata for q, k or v"
    if fake(pv).dtype != fake(q).dtype:  # the replacement computes in q's dtype
        return f"the output is {fake(pv).dtype}, q is {fake(q).dtype}"
    gqa, repeat = False, 1
    if fold := _fold_gqa(k, v, k_transposed=k_transposed):
        k, v, k_transposed, repeat, views = fold
        chain, gqa = [*views, *chain], True
    fq, fk, fv = fake(q), fake(k), fake(v)
    heads = lambda t: t.shape[-3] if t.dim() >= 3 else 1
    dims = {"B": numel(fq.shape[:-3]), "H": sym(heads(fq)), "Hkv": sym(heads(fk)), "Lq": sym(fq.shape[-2]),
            "Lk": sym(fk.shape[-1] if k_transposed else fk.shape[-2]), "D": sym(fq.shape[-1]), "Dv": sym(fv.shape[-1])}
    terms = folded["mask"]
    return AttentionSite(
        node=pv, op="eager", location=where, dtype=fq.dtype, device=fq.device, dims=dims,
        hints=hints_of([*fq.shape, *fk.shape, *fv.shape]), chain=chain, q=q, k=k, v=v,
        mask=tuple(terms) if len(terms) > 1 else (terms[0] if terms else None), mask_fill=folded["fill"],
        softcap=folded["softcap"], scale=folded["scale"], k_transposed=k_transposed, enable_gqa=gqa, kv_repeat=repeat,
    )


def _softmax_to_pv(softmax: fx.Node) -> tuple[list[fx.Node], fx.Node] | str:
    """(softmax, the identities after it and the P·V matmul; v), or why not."""
    chain, out = [softmax], softmax
    while len(out.users) == 1 and _is_identity_after_softmax(next(iter(out.users))):
        out = next(iter(out.users))
        chain.append(out)
    pv = next(iter(out.users)) if len(out.users) == 1 else None
    if pv is None or not _is_matmul(pv):
        return "softmax output is not consumed by one matmul with v (directly, or through a cast or dropout)"
    if pv.target is torch.einsum:
        v = _einsum_v(pv, out)
    elif len(pv.args) == 2 and pv.args[0] is out and pv.args[1] is not out:
        v = pv.args[1]
    else:
        v = "the softmax output is not the left-hand operand (only) of the matmul with v"
    return v if isinstance(v, str) else ([*chain, pv], v)


def _scores_to_softmax(x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | str:
    """(the score matmul, the nodes from it to softmax's input in graph order), or why not."""
    path = []
    while not _is_matmul(x):
        if len(x.users) != 1:
            return f"{x.name} between the scores and softmax is used elsewhere too"
        up = _scores_operand(x)
        if not isinstance(up, fx.Node):
            return f"{x.op} {getattr(x.target, '__name__', x.target)} between the scores and softmax"
        path.insert(0, x)
        x = up
    return (x, path) if len(x.users) == 1 else "the score matmul is used elsewhere too"


def _fold_scores(path: list[fx.Node]) -> dict | str:
    """scale, softcap, additive mask terms and masked_fill of the ops between the scores and softmax, or why
    they cannot be put so. In graph order: scales, at most one tanh among them, then the masks."""
    pre, post, terms, fill, masked = 1.0, None, [], None, None  # post: the product of scales after tanh
    for n in path:
        if _is_cast(n):
            continue
        if (factor := runtime_factor(n)) is not None:
            return (f"the scores are scaled by {factor.name}, a number known only at run time (under dynamic shapes "
                    "Dynamo makes a module's float attribute symbolic)")
        if masked and (_is_scale(n) or _is_tanh(n)):
            return f"{masked} before the {'scale' if _is_scale(n) else 'softcap (tanh)'}"
        if _is_scale(n) and post is None:
            pre *= _scaled_operand(n)[1]
        elif _is_scale(n):
            post *= _scaled_operand(n)[1]
        elif _is_tanh(n):
            if post is not None:
                return "tanh applied twice to the scores"
            post = 1.0
        elif _is_fill(n):
            if why := _fill_refusal(n, fill):
                return why
            fill, masked = (bind(n, FILL_ARGS)["mask"], float(bind(n, FILL_ARGS)["value"])), "masked_fill"
        else:  # an add: the operand that is not the scores is the term
            term = n.args[1] if n.args[0] is _scores_operand(n) else n.args[0]
            if not isinstance(term, fx.Node) or fake(term) is None or not fake(term).is_floating_point():
                return "an additive mask or bias that is not a floating-point tensor"
            terms.append(term)
            masked = "a mask or bias added"
    if post is not None and post <= 0:
        return f"scores multiplied by {post} after tanh (a softcap must be positive)"
    # post·tanh(pre·s) = softcap·tanh(scale·s / softcap) with softcap = post and scale = pre·post
    return {"scale": float(pre * (post or 1.0)), "softcap": post, "mask": terms, "fill": fill}


def _fill_refusal(n: fx.Node, taken) -> str | None:
    """Why this masked_fill cannot become the site's mask_fill (None if it can)."""
    a = bind(n, FILL_ARGS)
    cond, value = a.get("mask"), a.get("value")
    if taken is not None:
        return "more than one masked_fill on the scores"
    if not isinstance(value, (int, float)):
        return "masked_fill with a run-time value (a tensor, not a number)"
    if fake(cond) is None or fake(cond).dtype != torch.bool:
        return "masked_fill whose condition is not a bool tensor"
    if not (value == float("-inf") or value <= FILL_FLOOR):
        return (f"masked_fill value {value} is neither -inf nor low enough (<= -2**64, e.g. finfo(float32).min) "
                "for adding it to a score to equal replacing the score")
    return None


def _is_identity_after_softmax(n: fx.Node) -> bool:
    """A cast, or dropout that is off (eval or p=0)."""
    if _is_cast(n):
        return True
    if n.op == "call_function" and n.target is F.dropout:
        a = bind(n, ("input", "p", "training", "inplace"))
        return a.get("training", True) is False or a.get("p", 0.5) == 0
    return False


def runtime_factor(n: fx.Node) -> fx.Node | None:
    """The factor of a product or quotient (SCALES) by a number held in a graph node (a SymFloat), else None."""
    if n.op not in ("call_function", "call_method") or n.target not in SCALES or len(n.args) != 2 or n.kwargs:
        return None
    numbers = [a for a in n.args if isinstance(a, fx.Node)
               and isinstance(a.meta.get("example_value"), (torch.SymFloat, torch.SymInt, float, int))]
    return numbers[0] if len(numbers) == 1 and not (SCALES[n.target] and n.args[0] is numbers[0]) else None


def _scaled_operand(n: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, factor) of `tensor * number`, `number * tensor` or `tensor / number` (factor 1/number); else None."""
    a, b = n.args[:2] if len(n.args) >= 2 else (None, None)
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not (SCALES[n.target] and b == 0):
        return a, (1.0 / b if SCALES[n.target] else b)
    if not SCALES[n.target] and isinstance(a, (int, float)) and isinstance(b, fx.Node):
        return b, a
    return None


def _scores_operand(n: fx.Node, depth: int = 16):
    """The input carrying the scores into `n`, if `n` is an op allowed between the scores and softmax. Of an
    add's inputs it is the one that leads up to a matmul through such ops (the other is the mask)."""
    if _is_cast(n) or _is_tanh(n):
        return n.args[0]
    if (factor := runtime_factor(n)) is not None:  # passed, for _fold_scores to refuse by name
        return next(a for a in n.args if a is not factor)
    if _is_scale(n):
        return _scaled_operand(n)[0]
    if _is_fill(n):
        return bind(n, FILL_ARGS).get("input")
    if _is_add(n) and depth > 0:
        return next((a for a in n.args if _leads_to_matmul(a, depth - 1)), None)
    return None


def _leads_to_matmul(n, depth: int) -> bool:
    while isinstance(n, fx.Node) and depth > 0 and not _is_matmul(n):
        n, depth = _scores_operand(n, depth), depth - 1
    return isinstance(n, fx.Node) and _is_matmul(n)


def _is_cast(n: fx.Node) -> bool:
    return n.op == "call_method" and n.target in CASTS


def _is_scale(n: fx.Node) -> bool:
    """A product or quotient with a number (SCALES: target -> whether it divides), as a function or a method."""
    return (n.op in ("call_function", "call_method") and n.target in SCALES and not n.kwargs
            and _scaled_operand(n) is not None)


def _is_tanh(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is torch.tanh) or (n.op == "call_method" and n.target == "tanh")


def _is_fill(n: fx.Node) -> bool:
    return ((n.op == "call_function" and n.target is torch.masked_fill)
            or (n.op == "call_method" and n.target == "masked_fill"))


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ADDS and len(n.args) == 2 and not n.kwargs


def _matmul_qk(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | str:
    """(q, kᵀ, True) of matmul(q, kᵀ): the right-hand operand is kᵀ however it was transposed."""
    return (*node.args, True) if len(node.args) == 2 and not node.kwargs else "the score matmul's operands are keywords"


def _einsum(node: fx.Node) -> tuple[list[list[str]], list[str], list] | None:
    """(labels of the two inputs, labels of the output, the operands) of a two-operand einsum with an explicit
    output; '...' counts as one label."""
    eq, *ops = node.args
    ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
    if not isinstance(eq, str) or eq.count("->") != 1 or len(ops) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    terms = [re.findall(r"\.\.\.|[A-Za-z]", t) for t in [*lhs.split(","), out]]
    if len(terms) != 3 or any("".join(t) != s or len(t) < 2 for t, s in zip(terms, [*lhs.split(","), out])):
        return None
    return terms[:2], terms[2], ops


def _einsum_qk(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | str:
    """(q, k, k_transposed) of scores spelled [..., i, d],[..., j, d] -> [..., i, j] (k as given) or
    [..., i, d],[..., d, j] -> [..., i, j] (kᵀ given), the same batch labels in place everywhere."""
    parsed = _einsum(node)
    why = f"the score einsum {node.args[0]!r} is not q·kᵀ over the last dim with the batch dims in place"
    if parsed is None:
        return why
    (a, b), out, (q, k) = parsed
    batch, (i, j), d = out[:-2], out[-2:], a[-1]
    if a != [*batch, i, d] or d in out or b[:-2] != batch:
        return why
    if b[-2:] == [j, d]:
        return q, k, False
    return (q, k, True) if b[-2:] == [d, j] else why


def _einsum_v(node: fx.Node, p: fx.Node) -> fx.Node | str:
    """v of P·v spelled [..., i, j],[..., j, e] -> [..., i, e], with P (the softmax output) either operand."""
    parsed = _einsum(node)
    why = f"the output einsum {node.args[0]!r} is not P·v over the last dim with the batch dims in place"
    if parsed is None or [o is p for o in parsed[2]].count(True) != 1:
        return why
    (a, b), out, ops = parsed
    if ops[1] is p:
        (a, b), ops = (b, a), ops[::-1]
    batch, (i, e), j = out[:-2], out[-2:], a[-1]
    if a != [*batch, i, j] or j in out or b[:-2] != batch:
        return why
    if b[-2:] == [e, j]:
        return "v is given transposed to the output einsum"
    return ops[1] if b[-2:] == [j, e] else why


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
