"""Rewrite: replace a site's node by one call of a registered op; packed constants become buffers."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .kernels import Replacement
from .passes.siblings import SOURCES


class Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.replaced: dict[fx.Node, fx.Node] = {}  # a site's old node -> its replacement, for later sites' args
        # parameters baked into constants, with their versions (from earlier passes too: fused siblings' copies)
        self.packed: list[tuple[torch.Tensor, int]] = list(gm.meta.get(SOURCES, []))

    def _arg(self, arg, before: fx.Node, prefix: str):
        if isinstance(arg, fx.Node):
            return self.replaced.get(arg, arg)
        if isinstance(arg, torch.Tensor):
            name = f"_torchfx_eff_{prefix}_{len(self.gm._buffers)}"
            self.gm.register_buffer(name, arg)
            with self.gm.graph.inserting_before(before):
                return self.gm.graph.get_attr(name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._arg(a, before, prefix) for a in arg)
        return arg

    def apply(self, chain: list[fx.Node], rep: Replacement, prefix: str) -> fx.Node:
        """Replace the last node of `chain` by rep's call; the chain's other nodes, now unused, go too."""
        node = chain[-1]
        self.packed += [(t, t._version) for t in rep.sources.values()]
        args = self._arg(rep.args, node, prefix)
        kwargs = {k: self._arg(v, node, prefix) for k, v in rep.kwargs.items()}
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_function(rep.op, args, kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        for n in reversed(chain):  # users before producers
            if not n.users:
                self.gm.graph.erase_node(n)
        self.replaced[node] = new
        return new

    def finish(self) -> fx.GraphModule:
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


def _branch(rep: Replacement):
    """rep as (function of its run-time operands, those operands): graph nodes and tensors are operands,
    everything else is fixed."""
    leaves, spec = tree_flatten((rep.args, rep.kwargs))
    where = [i for i, a in enumerate(leaves) if isinstance(a, (fx.Node, torch.Tensor))]

    def run(*operands):
        filled = list(leaves)
        for i, value in zip(where, operands):
            filled[i] = value
        args, kwargs = tree_unflatten(filled, spec)
        return rep.op(*args, **kwargs)

    return run, [leaves[i] for i in where]


def rows_dispatch(x: fx.Node, split: int, small: Replacement, large: Replacement, weight_bytes=None) -> Replacement:
    """One call that computes `small` when x has at most `split` rows and `large` otherwise: the cond operator
    itself (torch.ops.higher_order.cond; torch.cond would trace its branches again with Dynamo, whose lifted int
    arguments Inductor 2.13's FakeTensorUpdater rejects), so a graph with symbolic rows keeps both branches and
    picks one at run time. Its operands are distinct, as the operator requires: each branch indexes into them."""
    (small_fn, small_ops), (large_fn, large_ops) = _branch(small), _branch(large)
    operands: list = []

    def positions(ops) -> list[int]:
        for op in ops:
            if not any(op is o for o in operands):
                operands.append(op)
        return [next(i for i, o in enumerate(operands) if o is op) for op in ops]

    (at_x,), at_small, at_large = positions([x]), positions(small_ops), positions(large_ops)

    def by_rows(*values):
        rows = values[at_x].numel() // values[at_x].shape[-1]
        return torch.ops.higher_order.cond(rows <= split, lambda *v: (small_fn(*(v[i] for i in at_small)),),
                                           lambda *v: (large_fn(*(v[i] for i in at_large)),), values)[0]

    return Replacement(by_rows, tuple(operands), weight_bytes=weight_bytes, sources={**small.sources, **large.sources})
