"""Linear sites: F.linear, addmm and matmul against a parameter (GPT-2's Conv1D is addmm)."""
from __future__ import annotations

from typing import Iterator

import torch

from .graph import GraphInfo, bind, fake, hints_of, location, numel, sym
from .sites import LinearSite, Miss

# target -> (parameter names, name of x, name of the weight, name of the bias, weight layout)
SPELLINGS = {
    torch._C._nn.linear: (("input", "weight", "bias"), "input", "weight", "bias", "nk"),
    torch.addmm: (("input", "mat1", "mat2"), "mat1", "mat2", "input", "kn"),
    torch.matmul: (("input", "other"), "input", "other", None, "kn"),
}


def match(info: GraphInfo) -> Iterator[LinearSite | Miss]:
    for node in info.gm.graph.nodes:
        if node.op != "call_function" or node.target not in SPELLINGS:
            continue
        names, x_name, w_name, b_name, layout = SPELLINGS[node.target]
        args = bind(node, names)
        op, where = node.target.__name__, location(node)
        weight = info.parameter(args.get(w_name))
        if weight is None:
            # matmul/addmm of two activations is attention or plain math, not a linear layer
            if node.target is torch._C._nn.linear:
                yield Miss("linear", node, op, where, "weight is computed at run time, not a parameter, so it cannot be packed at compile time")
            continue
        if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            yield Miss("linear", node, op, where, "addmm with beta or alpha other than 1")
            continue
        x, out = fake(args[x_name]), fake(node)
        if x is None or out is None or weight.dim() != 2 or x.dim() < 1:
            yield Miss("linear", node, op, where, "no tensor shape metadata, or a weight that is not 2-D")
            continue
        n, k = weight.shape if layout == "nk" else weight.shape[::-1]
        bias = args.get(b_name) if b_name else None
        yield LinearSite(
            node=node, op=op, location=where, dtype=out.dtype, device=out.device,
            dims={"M": numel(x.shape[:-1]), "N": sym(n), "K": sym(k)}, hints=hints_of(x.shape),
            x=args[x_name], weight=weight, weight_name=str(args[w_name].target), weight_layout=layout, bias=bias,
            bias_param=info.parameter(bias),
        )
