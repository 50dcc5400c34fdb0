"""Canonical spellings, so each matcher looks for one target per operation."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

# Aliases Dynamo may leave in a graph -> the one target matchers look for.
CANONICAL_FUNCTIONS = {
    operator.matmul: torch.matmul,
    torch.Tensor.matmul: torch.matmul,
    torch.Tensor.addmm: torch.addmm,
}
# Tensor methods whose torch function takes the same arguments, self first.
CANONICAL_METHODS = {"matmul": torch.matmul, "addmm": torch.addmm, "bmm": torch.bmm}


def normalize(gm: fx.GraphModule) -> int:
    """Rewrite aliases in place; returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CANONICAL_FUNCTIONS:
            target = CANONICAL_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in CANONICAL_METHODS:
            target = CANONICAL_METHODS[node.target]
        else:
            continue
        if node.target is target:
            continue
        node.op, node.target = "call_function", target
        changed += 1
    if changed:
        gm.recompile()
    return changed
