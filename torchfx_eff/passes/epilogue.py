"""Epilogues: the pointwise ops after a linear site that a Triton kernel can apply to its output tile before storing
it (codegen/ generates that code). From the linear, a chain follows users while each is the only user of the value
before it:
    activation  relu, silu, gelu (exact or tanh)
    residual    + a tensor of the output's shape
    cast        .to(dtype), .float(), .half(), .bfloat16(): the kernel stores in that dtype
    SwiGLU      act(gate) * up with up a linear of the gate's input (the gate's kernel reads up's output), or the two
                halves of one sibling-fused linear (its channels packed interleaved, so gate and up meet in one tile)
Patterns say how an op is spelled; guards, separate predicates, whether this one may be absorbed (None, or why not).
An op spelled as an epilogue op that fails a guard ends the chain and is reported as a miss with the guard's reason,
except after a residual add whose sum several ops read: that sum is the stream later layers read, and its fan-out is
the model's structure, not a miss.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .. import codegen
from .graph import GraphInfo, bind, fake, location, sym
from .linear import SPELLINGS
from .sites import Epilogue, LinearSite, Miss, Site

ACTIVATION_TARGETS = {F.silu: "silu", F.relu: "relu", torch.relu: "relu", "relu": "relu", F.gelu: "gelu",
                      torch._C._nn.gelu: "gelu"}
ADD, MUL = (operator.add, torch.add, "add"), (operator.mul, torch.mul, "mul")
CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "to": None, "type": None}
HALVES = (torch.split, torch.chunk, "split", "chunk")
STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Step:
    spec: str | None  # codegen's step; None for a cast (the store's dtype)
    label: str
    operand: fx.Node | None = None


# Patterns: what a node computes, by its spelling (call_function targets are callables, call_method targets names).
def calls(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def activation(node: fx.Node) -> str | None:
    """'silu', 'relu', 'gelu' or 'gelu_tanh' for a call of that activation."""
    if not calls(node, ACTIVATION_TARGETS):
        return None
    name = ACTIVATION_TARGETS[node.target]
    return "gelu_tanh" if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh" else name


def other_operand(node: fx.Node, value: fx.Node, targets):
    """For a binary call of `targets` that reads value: its other operand (the same node when it reads value twice)."""
    if not calls(node, targets) or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    return b if a is value else a


def cast(node: fx.Node) -> torch.dtype | None:
    """The dtype a call spelled as a cast converts to."""
    if node.op != "call_method" or node.target not in CASTS:
        return None
    dtype = CASTS[node.target] or arg(node, 1, "dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


def halves(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(first, second) for a split/chunk of the last dimension in two equal halves, each read by a getitem."""
    whole = fake(node.args[0]) if calls(node, HALVES) else None
    if whole is None or arg(node, 2, "dim", 0) not in (-1, whole.dim() - 1):
        return None
    sizes = node.args[1] if len(node.args) > 1 else next((v for k, v in node.kwargs.items() if k != "dim"), None)
    n = whole.shape[-1]
    two = sizes == 2 if calls(node, (torch.chunk, "chunk")) else sizes in (n // 2, [n // 2] * 2, (n // 2,) * 2)
    items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if not isinstance(n, int) or n % 2 or not two or len(node.users) != 2 or set(items) != {0, 1}:
        return None
    return items[0], items[1]


# Guards: None, or why the op may not join the epilogue.
def only_user(value: fx.Node) -> str | None:
    n = len(value.users)
    return None if n == 1 else f"the value of {op_name(value)} has {n} users; an epilogue takes only ops that the " \
                               "linear alone feeds"


def not_in_place(node: fx.Node) -> str | None:
    in_place = node.kwargs.get("inplace", node.target in (F.silu, F.relu) and arg(node, 1, "inplace") is True)
    return f"{op_name(node)} works in place" if in_place else None


def plain_add(node: fx.Node) -> str | None:
    return None if node.kwargs.get("alpha", 1) == 1 else f"{op_name(node)} scales its operand (alpha)"


def one_operand(steps: list[Step]) -> str | None:
    return "the epilogue reads a tensor already; the kernels take one" if any(s.operand is not None for s in steps) else None


def output_shaped(operand, value: fx.Node) -> str | None:
    """The operand is another tensor of exactly the value's shape (no broadcast: the kernel reads it tile by tile)."""
    if not isinstance(operand, fx.Node) or operand is value or fake(operand) is None:
        return f"its operand {operand} is not another tensor"
    shape, out = fake(operand).shape, fake(value).shape
    if list(map(sym, shape)) != list(map(sym, out)) or fake(operand).device != fake(value).device:  # no guards
        return f"its operand's shape {tuple(shape)} is not the output's {tuple(out)}"
    return None


def linear_of(up: fx.Node, x: fx.Node) -> str | None:
    """up is a linear that reads x (SwiGLU's up projection next to the gate's)."""
    if up.op == "call_function" and up.target in SPELLINGS:
        names, x_name = SPELLINGS[up.target][:2]
        if bind(up, names).get(x_name) is x:
            return None
    return f"{up.name} is not a linear of the gate's input, so the product is not SwiGLU"


def plain_cast(node: fx.Node, dtype: torch.dtype) -> str | None:
    if len(node.args) + len(node.kwargs) > (1 if CASTS[node.target] else 2):
        return f"{op_name(node)} passes arguments other than a dtype"
    return None if dtype in STORE_DTYPES else f"the kernels store {', '.join(map(str, STORE_DTYPES))}, not {dtype}"


def constant_bias(site: LinearSite) -> str | None:
    computed = site.bias is not None and site.bias_param is None
    return "the fused linear's bias is computed at run time; pairing gate and up needs it at compile time" if computed else None


@dataclass
class _Chain:
    site: LinearSite
    value: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def take(self, nodes: list[fx.Node], step: Step) -> None:
        self.nodes += nodes
        self.steps.append(step)
        self.value = nodes[-1]


def _step(chain: _Chain, node: fx.Node) -> Step | str | None:
    """node as the chain's next step, why it cannot be, or None when it is no epilogue op."""
    value = chain.value
    if (name := activation(node)) is not None:
        return not_in_place(node) or Step(name, name)
    if (residual := other_operand(node, value, ADD)) is not None:
        return plain_add(node) or one_operand(chain.steps) or output_shaped(residual, value) \
            or Step("add", "+residual", residual)
    after_activation = chain.steps and chain.steps[-1].spec in codegen.ACTIVATIONS
    if after_activation and (up := other_operand(node, value, MUL)) is not None:
        return one_operand(chain.steps) or output_shaped(up, value) or linear_of(up, chain.site.x) \
            or Step("mul", f"swiglu({chain.steps[-1].spec})", up)
    dtype = cast(node)
    if dtype is not None and dtype != fake(value).dtype:  # a cast to the same dtype is no op at all
        return plain_cast(node, dtype) or Step(None, f"to {str(dtype).removeprefix('torch.')}")
    return None


def _paired(chain: _Chain) -> tuple[fx.Node | None, str | None]:
    """A sibling-fused gate/up: the linear split in two halves, act(first) * second, taken into the chain. (the
    activation, why it cannot be) when it is spelled so."""
    split = next(iter(chain.value.users)) if len(chain.value.users) == 1 else None
    pair = halves(split) if split is not None else None
    act = next(iter(pair[0].users)) if pair and len(pair[0].users) == 1 else None
    name = activation(act) if act is not None else None
    product = next((u for u in act.users if other_operand(u, act, MUL) is pair[1]), None) if name else None
    if product is None:
        return None, None
    why = only_user(act) or only_user(pair[1]) or not_in_place(act) or constant_bias(chain.site)
    if why is None:
        chain.nodes += [split, *pair, act]
        chain.take([product], Step(f"glu_{name}", f"swiglu({name}) of the fused gate/up"))
    return act, why


def _shared_residual_sum(chain: _Chain) -> bool:
    """The chain ends at a residual sum that several ops read: the stream later layers read, no miss."""
    return len(chain.value.users) > 1 and bool(chain.steps) and chain.steps[-1].spec == "add"


def _chain(site: LinearSite, taken: set[fx.Node]) -> tuple[_Chain, Miss | None]:
    """The ops a linear site's epilogue takes, and the miss that ended them (None if none did)."""
    chain = _Chain(site, site.node)
    node, why = _paired(chain)
    while why is None and not _shared_residual_sum(chain):
        found = [(u, s) for u in chain.value.users if u not in taken and (s := _step(chain, u)) is not None]
        if not found:
            break
        node, step = found[0]
        why = step if isinstance(step, str) else only_user(chain.value)
        if why is None:
            chain.take([node], step)
    miss = Miss("epilogue", node, op_name(node), location(node),
                f"not fused into the epilogue of {op_name(site.node)}: {why}") if why else None
    return chain, miss


def match(sites: list[Site], info: GraphInfo) -> list[Miss]:
    """Set the epilogue of every linear site that has one; the ops that look like epilogue ops but cannot join one."""
    taken = {n for s in sites for n in s.chain}  # a node belongs to one site at most
    order = {n: i for i, n in enumerate(info.gm.graph.nodes)}
    misses = []
    for site in sites:
        if not isinstance(site, LinearSite):
            continue
        chain, miss = _chain(site, taken)
        misses += [miss] if miss else []
        if chain.nodes:
            steps, nodes = chain.steps, sorted(chain.nodes, key=order.__getitem__)
            operand = next((s.operand for s in steps if s.operand is not None), None)
            # an activation that SwiGLU's product follows is part of its label
            labels = [s.label for s, after in zip(steps, [*steps[1:], None]) if not (after and after.spec == "mul")]
            site.epilogue = Epilogue(",".join(s.spec for s in steps if s.spec), nodes, labels, fake(chain.value).dtype,
                                     operand, None if operand is None else fake(operand).dtype)
            taken.update(nodes)
    return [m for m in misses if m.node not in taken]  # e.g. a residual add that the next linear's epilogue took
