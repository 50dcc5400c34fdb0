"""Attention sites: the SDPA op in all its argument forms; eager spellings are reported as missed."""
from __future__ import annotations

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
        elif _is_softmax(node) and _near(node, "up", 4, _is_matmul) and _near(node, "down", 3, _is_matmul):
            yield Miss("attention", node, "softmax", location(node),
                       "eager attention (matmul -> softmax -> matmul) is not matched yet; only the SDPA op is")


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
    heads = lambda t: t.shape[-3] if t.dim() >= 3 else 1
    dims = {"B": numel(q.shape[:-3]), "H": sym(heads(q)), "Hkv": sym(heads(k)), "Lq": sym(q.shape[-2]),
            "Lk": sym(k.shape[-2]), "D": sym(q.shape[-1]), "Dv": sym(v.shape[-1])}
    return AttentionSite(
        node=node, op="sdpa", location=where, dtype=q.dtype, device=q.device, dims=dims,
        hints=hints_of([*q.shape, *k.shape, *v.shape]), q=a["query"], k=a["key"], v=a["value"],
        mask=a.get("attn_mask"), is_causal=bool(is_causal), scale=scale, enable_gqa=bool(gqa),
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
