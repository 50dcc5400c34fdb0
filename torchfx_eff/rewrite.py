"""Rewrite: replace a site's node by one call of a registered op; packed constants become buffers."""
from __future__ import annotations

import torch
import torch.fx as fx

from .kernels import Replacement


class Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.replaced: dict[fx.Node, fx.Node] = {}  # a site's old node -> its replacement, for later sites' args
        self.packed: list[tuple[torch.Tensor, int]] = []  # parameters baked into constants, with their versions

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
