"""Expert sites: products by a stack of weight matrices, one per MoE expert, as transformers' experts compute them:
grouped_mm(x, W, offs) over rows sorted by expert (torch._grouped_mm, F.grouped_mm, or transformers' fallback op),
bmm(x, W) over a batch per expert (Llama 4), or bmm of each row with its expert's matrix gathered (W[ids], the
batched_mm experts). W is the [E, K, N] parameter or the transpose of an [E, N, K] one. Any other product by a stack
is reported missed."""
from __future__ import annotations

import operator
from typing import Iterator

import sympy
import torch
import torch.fx as fx

from .graph import GraphInfo, bind, fake, hints_of, location, sym
from .normalize import transpose_source
from .sites import ExpertsSite, Miss

GROUPED = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}  # by name: torch's op, F's function, transformers' op
BATCHED = {torch.bmm, torch.matmul}
PRODUCTS = {torch.baddbmm, torch.addbmm, torch.einsum, torch.tensordot}  # of a stack: missed
# Ops through which a stack reaches a product unchanged but for its layout, or indexed by expert (a gather)
STACK_METHODS = {"transpose", "permute", "contiguous", "__getitem__"}
STACK_FUNCTIONS = {torch.transpose, torch.permute, operator.getitem}
TAKEN = ("grouped_mm(x, W, offs=...), bmm(x, W) or a gathered bmm(W[ids], x.unsqueeze(-1)) / bmm(x.unsqueeze(1), "
         "W[ids]), with W an [E, K, N] parameter or an [E, N, K] one transposed")


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _stack(info: GraphInfo, operand) -> tuple[torch.Tensor, str] | None:
    """(the 3-D parameter operand reads, "ekn" if as stored, "enk" if transposed), or None if it reads none so."""
    if (p := info.parameter(operand)) is not None:
        return (p, "ekn") if p.dim() == 3 else None
    source = transpose_source(operand, 3)
    if (p := info.parameter(source)) is not None and p.dim() == 3:
        return p, "enk"
    return None


def _stack_behind(info: GraphInfo, operand) -> torch.Tensor | None:
    """A 3-D parameter that operand is, or reaches through layout changes and indexing."""
    while isinstance(operand, fx.Node) and info.parameter(operand) is None and operand.args and (
            operand.op == "call_method" and operand.target in STACK_METHODS
            or operand.op == "call_function" and operand.target in STACK_FUNCTIONS):
        operand = operand.args[0]
    p = info.parameter(operand)
    return p if p is not None and p.dim() == 3 else None


def match(info: GraphInfo) -> Iterator[ExpertsSite | Miss]:
    for node in info.gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        grouped = _name(node) in GROUPED
        if not grouped and node.target not in BATCHED | PRODUCTS:
            continue
        stack = next((p for a in node.all_input_nodes if (p := _stack_behind(info, a)) is not None), None)
        if stack is None:
            continue
        yield _site(info, node, grouped, stack)


def _gathered(info: GraphInfo, node: fx.Node, a, b) -> ExpertsSite | None:
    """bmm(W[ids], x.unsqueeze(-1)) or bmm(x.unsqueeze(1), W[ids]) with W a stack and ids [S] (transformers'
    batched_mm experts) as a site, else None."""
    for gather, vector, layout, dim in ((a, b, "enk", -1), (b, a, "ekn", 1)):
        if not (isinstance(gather, fx.Node) and gather.op == "call_function" and gather.target is operator.getitem
                and isinstance(vector, fx.Node) and vector.op == "call_method" and vector.target == "unsqueeze"):
            continue
        stack, ids, x = info.parameter(gather.args[0]), gather.args[1], vector.args[0]
        ids_val, x_val, out = fake(ids), fake(x), fake(node)
        if (stack is None or stack.dim() != 3 or ids_val is None or ids_val.dim() != 1 or ids_val.is_floating_point()
                or x_val is None or x_val.dim() != 2 or vector.args[1] % 3 != dim % 3 or out is None):
            continue
        n, k = (stack.shape[1], stack.shape[2]) if layout == "enk" else (stack.shape[2], stack.shape[1])
        E, rows = sympy.Integer(stack.shape[0]), sym(x_val.shape[0])
        chain = [n for n in (gather, vector) if len(n.users) == 1] + [node]
        return ExpertsSite(
            node=node, op="bmm", location=location(node), dtype=out.dtype, device=out.device, chain=chain,
            dims={"S": rows, "E": E, "N": sym(n), "K": sym(k), "A": sympy.Min(E, rows)}, hints=hints_of(x_val.shape),
            x=x, ids=ids, transposed_out=layout == "ekn", weight=stack, weight_name=info.name(gather.args[0]),
            weight_layout=layout)
    return None


def _site(info: GraphInfo, node: fx.Node, grouped: bool, stack: torch.Tensor) -> ExpertsSite | Miss:
    op, where = _name(node), location(node)
    miss = lambda why: Miss("experts", node, op, where, f"multiplies by a stack of {stack.shape[0]} weight matrices "
                                                         f"(a {tuple(stack.shape)} parameter, as MoE experts keep "
                                                         f"theirs) {why}; taken: {TAKEN}")
    if node.target in PRODUCTS:
        return miss(f"through {op}")
    args = bind(node, ("input", "mat2", "offs") if grouped else ("input", "mat2"))
    x, w_node = args.get("input"), args.get("mat2", args.get("other"))
    if not grouped and (gathered := _gathered(info, node, x, w_node)) is not None:
        return gathered
    if (found := _stack(info, w_node)) is None:
        read_as_x = _stack_behind(info, x) is not None
        return miss("as the first operand" if read_as_x and _stack(info, x) else "indexed or reshaped first")
    weight, layout = found
    x_val, out = fake(x), fake(node)
    if x_val is None or out is None:
        return miss("with no tensor shape metadata")
    if grouped and (x_val.dim() != 2 or args.get("offs") is None or set(args) - {"input", "mat2", "offs", "bias", "out_dtype"}
                    or args.get("bias") is not None or args.get("out_dtype") is not None):
        return miss("in a grouped product other than grouped_mm(x [S, K], W, offs=...) with no bias or out_dtype")
    if not grouped and (x_val.dim() != 3 or set(args) != {"input", "mat2"} and set(args) != {"input", "other"}):
        return miss("in a batched product whose x is not [E, T, K]")
    n, k = (weight.shape[1], weight.shape[2]) if layout == "enk" else (weight.shape[2], weight.shape[1])
    rows = sym(x_val.shape[0]) if grouped else sym(x_val.shape[0]) * sym(x_val.shape[1])
    E = sympy.Integer(weight.shape[0])
    chain = [w_node, node] if w_node is not None and info.parameter(w_node) is None and len(w_node.users) == 1 else [node]
    return ExpertsSite(
        node=node, op=op, location=where, dtype=out.dtype, device=out.device, chain=chain,
        dims={"S": rows, "E": E, "N": sym(n), "K": sym(k), "A": sympy.Min(E, rows) if grouped else E},
        hints=hints_of(x_val.shape), x=x, offs=args.get("offs") if grouped else None, weight=weight,
        weight_name=info.name(w_node if w_node.op in ("placeholder", "get_attr") else w_node.args[0]), weight_layout=layout)
