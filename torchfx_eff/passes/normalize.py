"""Canonical spellings, so each matcher looks for one target per operation."""
from __future__ import annotations

import builtins
import operator

import torch
import torch.fx as fx

from . import heads, mha
from .graph import GraphInfo, bind, fake

# Aliases Dynamo may leave in a graph -> the one target matchers look for.
CANONICAL_FUNCTIONS = {
    operator.matmul: torch.matmul,
    torch.Tensor.matmul: torch.matmul,
    torch.Tensor.addmm: torch.addmm,
    torch.mm: torch.matmul,  # 2-D operands only, where matmul is mm
    torch.Tensor.mm: torch.matmul,
}
# Tensor methods whose torch function takes the same arguments, self first.
CANONICAL_METHODS = {"matmul": torch.matmul, "addmm": torch.addmm, "bmm": torch.bmm, "mm": torch.matmul}
# x times a transposed [N, K] parameter, by target: (parameter names, name of x, of the transposed weight, of the bias)
TRANSPOSED_WEIGHT = {torch.matmul: (("input", "other"), "input", "other", None),
                     torch.addmm: (("input", "mat1", "mat2"), "mat1", "mat2", "input")}


def normalize(info: GraphInfo) -> int:
    """Rewrite aliases in place, then linears spelled otherwise as F.linear or matmul: x times a transposed 2-D
    parameter (Falcon's `x @ self.weight.T`), a parameter times a transposed x (Mamba's `weight @ x.transpose(1, 2)`,
    then transposed back), einsum("...k,kn->...n") or ("...k,nk->...n") with a parameter, tensordot(x, W, dims=1).
    torch's multi-head attention calls are spelled out first (passes/mha.py), and eager attention's baddbmm scores,
    run-time score factors and heads merged into the batch respelled (passes/heads.py). Returns how many nodes
    changed."""
    gm = info.gm
    changed = mha.decompose(gm) + heads.respell(gm)
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
    for node in list(gm.graph.nodes):
        changed += (_as_linear(info, node) or _as_transposed_linear(info, node) or _einsum_as_linear(info, node)
                    or _tensordot_as_matmul(info, node))
    if changed:
        gm.recompile()
    return changed


def _as_linear(info: GraphInfo, node: fx.Node) -> bool:
    """Turn node into F.linear if it multiplies x by a transposed 2-D parameter (addmm: with alpha = beta = 1)."""
    if node.op != "call_function" or node.target not in TRANSPOSED_WEIGHT:
        return False
    names, x_name, w_name, b_name = TRANSPOSED_WEIGHT[node.target]
    args = bind(node, names)
    transposed = args.get(w_name)
    weight = transpose_source(transposed, 2)
    if weight is None or info.parameter(weight) is None or info.parameter(weight).dim() != 2:
        return False
    if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return False
    if b_name and (fake(args.get(b_name)) is None or fake(args[b_name]).dim() != 1):
        return False  # F.linear's bias is one value a channel
    node.target, node.args, node.kwargs = torch._C._nn.linear, (args[x_name], weight, args.get(b_name)), {}
    if not transposed.users:
        info.gm.graph.erase_node(transposed)
    return True


def _as_transposed_linear(info: GraphInfo, node: fx.Node) -> bool:
    """Turn matmul(W, x.mT) (W a 2-D parameter) into F.linear(x, W).mT."""
    if node.op != "call_function" or node.target is not torch.matmul or len(node.args) != 2 or node.kwargs:
        return False
    weight, transposed = node.args
    w, out = info.parameter(weight), fake(node)
    if w is None or w.dim() != 2 or out is None or fake(transposed) is None or fake(transposed).dim() < 2:
        return False
    if (x := transpose_source(transposed, fake(transposed).dim())) is None:
        return False
    node.target, node.args = torch._C._nn.linear, (x, weight)
    with info.gm.graph.inserting_after(node):
        back = info.gm.graph.call_method("transpose", (node, -1, -2))
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    back.meta["example_value"] = out
    node.meta["example_value"] = out.transpose(-1, -2)
    if not transposed.users:
        info.gm.graph.erase_node(transposed)
    return True


def _einsum_as_linear(info: GraphInfo, node: fx.Node) -> bool:
    """einsum of x and a 2-D parameter (either order) contracting x's last index with one of the parameter's, the
    output x's other indices then the parameter's other one: matmul(x, W) ("kn") or F.linear(x, W) ("nk")."""
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs or not isinstance(node.args[0], str):
        return False
    operands = list(node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:])
    equation = node.args[0].replace(" ", "")
    if len(operands) != 2 or "->" not in equation or equation.count(",") != 1:
        return False
    (first, second), out = equation.split("->")[0].split(","), equation.split("->")[1]
    w_at = next((i for i, o in enumerate(operands) if (w := info.parameter(o)) is not None and w.dim() == 2), None)
    if w_at is None:
        return False
    x, sx, sw = operands[1 - w_at], (first, second)[1 - w_at], (first, second)[w_at]
    letters = sx.replace("...", "")
    if len(sw) != 2 or len(set(sw)) != 2 or not letters or len(set(letters)) != len(letters) or "." in letters:
        return False
    k = sx[-1]
    n = sw.replace(k, "")
    if k not in sw or len(n) != 1 or n in sx or out != sx[:-1] + n:
        return False
    w = operands[w_at]
    node.target, node.args = (torch.matmul, (x, w)) if sw == k + n else (torch._C._nn.linear, (x, w))
    return True


def _tensordot_as_matmul(info: GraphInfo, node: fx.Node) -> bool:
    """tensordot(x, W, dims=1) with W a 2-D parameter: x's last index against W's first, matmul(x, W)."""
    if node.op != "call_function" or node.target is not torch.tensordot:
        return False
    args = bind(node, ("a", "b", "dims"))
    w = info.parameter(args.get("b"))
    if w is None or w.dim() != 2 or args.get("dims") != 1 or set(args) != {"a", "b", "dims"}:
        return False
    node.target, node.args, node.kwargs = torch.matmul, (args["a"], args["b"]), {}
    return True


def transpose_source(node, ndim: int) -> fx.Node | None:
    """The node that `node` transposes, if it swaps the last two of ndim dimensions and nothing else (W.T, W.mT, W.t(),
    W.transpose(0, 1), W.permute(1, 0), x.transpose(1, 2) of a 3-D x, and their torch.* spellings), else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    source, rest = node.args[0], [*node.args[1:], *node.kwargs.values()]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    last_two = lambda dims: all(isinstance(d, int) for d in dims) and [d % ndim for d in dims]
    if node.op == "call_function" and node.target is builtins.getattr:
        return source if rest == ["mT"] or rest == ["T"] and ndim == 2 else None
    if name == "t" and not rest:
        return source if ndim == 2 else None
    if name == "transpose" and len(rest) == 2:
        return source if sorted(last_two(rest) or []) == [ndim - 2, ndim - 1] else None
    if name == "permute":
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return source if last_two(dims) == [*range(ndim - 2), ndim - 1, ndim - 2] else None
    return None
