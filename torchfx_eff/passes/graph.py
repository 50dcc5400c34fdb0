"""What matchers need to know about a Dynamo graph: shapes, parameters, source locations."""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx


def fake(node) -> torch.Tensor | None:
    """The fake value Dynamo (or shape propagation) attached to a node; a real tensor stands for itself."""
    if isinstance(node, torch.Tensor):
        return node
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def sym(size) -> sympy.Expr:
    """A size as a sympy expression: the shape-env expression of a SymInt, or an integer."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def hints_of(sizes) -> dict[sympy.Symbol, int]:
    """Example values of every symbol appearing in `sizes`, from their shape environment."""
    hints = {}
    for s in sizes:
        if isinstance(s, torch.SymInt):
            env = s.node.shape_env
            var_to_val = getattr(env, "backed_var_to_val", None) or env.var_to_val  # renamed in torch 2.13
            hints.update({v: int(var_to_val[v]) for v in s.node.expr.free_symbols})
    return hints


TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def location(node: fx.Node) -> str:
    """file:line of the innermost frame outside torch that produced the node (F.grouped_mm's own line says nothing
    of the model)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    frames = [f for f in frames if not f[0].startswith(TORCH_DIR)] or frames
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


@dataclass
class GraphInfo:
    """The graph with its real example inputs, as the backend received them."""

    gm: fx.GraphModule
    example_inputs: list
    placeholder_values: dict[fx.Node, object] = field(default_factory=dict)
    slices: dict[fx.Node, torch.Tensor] = field(default_factory=dict)  # parameter(): one view per indexing node

    def __post_init__(self):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.placeholder_values = dict(zip(placeholders, self.example_inputs))

    def parameter(self, node) -> torch.Tensor | None:
        """The real tensor behind a weight argument, if it is a parameter or a module attribute, one matrix of a
        stacked one (`W[i]`, a constant index, as JetMoE's experts index theirs) or a constant slice of one (`W[a:b]`,
        a packed projection's part)."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_function" and node.target is operator.getitem and _constant_index(node.args[1]):
            whole = self.parameter(node.args[0])
            if whole is not None and whole.dim() >= (3 if isinstance(node.args[1], int) else 1):
                return self.slices.setdefault(node, whole[node.args[1]])
            return None
        if node.op == "placeholder":
            value = self.placeholder_values.get(node)
            return value if isinstance(value, torch.nn.Parameter) else None
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def name(self, node: fx.Node) -> str:
        """What names a parameter() argument in every graph that reads it: its graph input or attribute name, with the
        index of a stack's matrix or the bounds of a slice."""
        if node.op == "call_function" and node.target is operator.getitem:
            i = node.args[1]
            index = ":".join("" if b is None else str(b) for b in (i.start, i.stop)) if isinstance(i, slice) else i
            return f"{self.name(node.args[0])}[{index}]"
        return str(node.target)

    @property
    def has_real_inputs(self) -> bool:
        from torch._subclasses.fake_tensor import is_fake

        return not any(isinstance(v, torch.Tensor) and is_fake(v) for v in self.example_inputs)


def _constant_index(i) -> bool:
    """An int, or a slice of int (or open) bounds and no step."""
    return isinstance(i, int) or (isinstance(i, slice) and i.step is None and
                                  all(b is None or isinstance(b, int) for b in (i.start, i.stop)))


def bind(node: fx.Node, names: tuple[str, ...]) -> dict:
    """Positional and keyword arguments of a call, by parameter name."""
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def call(node: fx.Node, value):
    """node's call (function or method) on its arguments, each argument node mapped through value()."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return fx.graph_module._get_attr(node.graph.owning_module, node.target)
    return node.target(*args, **kwargs)


def numel(sizes) -> sympy.Expr:
    return sympy.Mul(*[sym(s) for s in sizes])
