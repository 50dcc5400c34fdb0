"""Horizontal fusion: sibling linears that read the same input (Q/K/V, gate/up) become one linear over their
concatenated weights, followed by a split. The math is unchanged; the linear matcher then sees one bigger site.

The concatenation is a copy (the member parameters stay in the user's module): the graph records which
parameters it copied, at which versions (work.meta[SOURCES]), so that an in-place update after compile is caught
by the backend's stale-weight guard like any packed weight. It also records each fused weight's members
(work.meta[MEMBERS]): a site that keeps the original at some row counts computes that branch from them
(separately), so that the copy is read only to be packed.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from ..report.records import FUSED_COPY_PREFIX, SiteRecord
from .graph import GraphInfo, bind, call, fake, hints_of, location, numel
from .linear import SPELLINGS

log = logging.getLogger("torchfx_eff")
SOURCES = "torchfx_eff_sources"  # GraphModule.meta key: [(parameter, version)] the graph holds copies of
MEMBERS = "torchfx_eff_members"  # GraphModule.meta key: {a fused weight's name: (op, member weights, member biases)}

# first member -> {ids of all members: (weak references to them, their versions, their concatenation)}
_COPIES = WeakIdKeyDictionary()


@dataclass
class _Member:
    node: fx.Node
    x: fx.Node
    weight: torch.Tensor
    weight_name: str
    bias: torch.Tensor | None
    bias_name: str | None
    n: int


def fuse(info: GraphInfo, graph_id: int, unfused: frozenset = frozenset()) -> list[SiteRecord]:
    """Fuse every group of >= 2 linears that read the same input node with compatible weights, except the groups
    named in unfused (copies_read_as_is); one record each."""
    if not info.has_real_inputs:
        return []  # fake parameters cannot be copied
    groups: dict[tuple, list[_Member]] = {}
    for node in list(info.gm.graph.nodes):
        if (found := _member(info, node)) is not None:
            groups.setdefault(found[0], []).append(found[1])
    replaced: dict[fx.Node, fx.Node] = {}  # a fused member -> its piece, for groups that read a member's output
    records = [_fuse_group(info.gm, key, members, graph_id, replaced, unfused) for key, members in groups.items()
               if len(members) > 1]
    if any(r is not None and r.status == "rewritten" for r in records):
        info.gm.graph.lint()
        info.gm.recompile()
    return [r for r in records if r is not None]


def _member(info: GraphInfo, node: fx.Node) -> tuple[tuple, _Member] | None:
    """(group key, member) for a linear with a parameter weight of static shape, else None."""
    if node.op != "call_function" or node.target not in SPELLINGS:
        return None
    names, x_name, w_name, b_name, layout = SPELLINGS[node.target]
    args = bind(node, names)
    x, w_node, b_node = args.get(x_name), args.get(w_name), args.get(b_name) if b_name else None
    weight, out = info.parameter(w_node), fake(node)
    if weight is None or weight.dim() != 2 or not isinstance(x, fx.Node) or fake(x) is None or out is None:
        return None
    if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return None
    w_value = fake(w_node) if fake(w_node) is not None else weight
    if any(isinstance(s, torch.SymInt) for s in (*w_value.shape, out.shape[-1])):
        return None  # N or K symbolic: the split sizes would not be constants
    bias = info.parameter(b_node)
    n, k = weight.shape if layout == "nk" else weight.shape[::-1]
    if b_node is not None and (bias is None or bias.shape != (n,) or bias.dtype != weight.dtype):
        return None  # a computed or broadcast bias cannot be concatenated at compile time
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        return None  # the copy would cut the parameters out of autograd
    key = (node.target, x, k, weight.dtype, weight.device, bias is not None)
    member = _Member(node, x, weight, info.name(w_node), bias, info.name(b_node) if bias is not None else None, n)
    return key, member


def _copy_name(member_names: list[str]) -> str:
    """A group's name: its concatenated weight is {name}_weight, its bias {name}_bias."""
    return FUSED_COPY_PREFIX + hashlib.sha1("\0".join(member_names).encode()).hexdigest()[:16]


def copies_read_as_is(gm: fx.GraphModule) -> set[str]:
    """Names of the groups whose concatenated weight gm reads unpacked (a fused linear kept in the original dtype)."""
    return {n.target[:-len("_weight")] for n in gm.graph.nodes if n.op == "get_attr" and n.users
            and n.target.startswith(FUSED_COPY_PREFIX) and n.target.endswith("_weight")}


def _fuse_group(gm: fx.GraphModule, key: tuple, members: list[_Member], graph_id: int, replaced: dict,
                unfused: frozenset) -> SiteRecord | None:
    target, x, k = key[0], replaced.get(key[1], key[1]), key[2]
    names, x_name, w_name, b_name, layout = SPELLINGS[target]
    tag = _copy_name([m.weight_name for m in members])
    if tag in unfused:  # an earlier pass made its concatenation: not cached any more, it goes with that pass's graph
        for tensors in ([m.weight for m in members], [m.bias for m in members if m.bias is not None]):
            if tensors:
                _COPIES.get(tensors[0], {}).pop(tuple(id(t) for t in tensors), None)
        return SiteRecord(graph_id, "siblings", "kept", f"{target.__name__} x{len(members)}", location(members[0].node),
                          chosen="original", reason="not fused: the fused linear read its concatenated weight as is "
                          "(kept in the original dtype, at some size), which would stay resident beside the member "
                          "parameters (Config.release_weights is off)")
    sizes = [m.n for m in members]
    fused_value = torch.cat([fake(m.node) for m in members], dim=-1)
    pieces = torch.split(fused_value, sizes, dim=-1)
    new_meta: dict[fx.Node, object] = {}
    for m, piece in zip(members, pieces):
        if not _users_accept(m.node, piece, piece, new_meta):
            log.debug("torchfx_eff: not fusing %s: a user of %s needs its contiguous output", target.__name__, m.node)
            return None
    sources = [m.weight for m in members] + [m.bias for m in members if m.bias is not None]
    weight = _concatenation([m.weight for m in members], dim=0 if layout == "nk" else 1)
    bias = _concatenation([m.bias for m in members], dim=0) if members[0].bias is not None else None
    first = members[0].node
    with gm.graph.inserting_before(first):
        w_attr = _attr(gm, f"{tag}_weight", weight)
        b_attr = _attr(gm, f"{tag}_bias", bias) if bias is not None else None
        fused = gm.graph.call_function(target, _linear_args(target, x, w_attr, b_attr))
        split = gm.graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        outs = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
    fused.meta = {**_without_values(first.meta), "example_value": fused_value}
    split.meta = {**_without_values(first.meta), "example_value": pieces}
    for m, out, piece in zip(members, outs, pieces):
        out.meta = {**_without_values(m.node.meta), "example_value": piece}
        m.node.replace_all_uses_with(out)
        gm.graph.erase_node(m.node)
        replaced[m.node] = out
    for node, value in new_meta.items():  # views of the pieces keep the fused output's strides
        node.meta = {**_without_values(node.meta), "example_value": value}
    gm.meta.setdefault(SOURCES, []).extend((t, t._version) for t in sources)
    gm.meta.setdefault(MEMBERS, {})[f"{tag}_weight"] = (target, [m.weight for m in members], [m.bias for m in members])
    copies = [weight] + ([bias] if bias is not None else [])
    return _record(graph_id, target.__name__, first, x, members, k, sources, copies, tag)


def _linear_args(target, x, weight, bias) -> tuple:
    """target's positional arguments for a linear of x by weight (+ bias)."""
    names, x_name, w_name, b_name, _ = SPELLINGS[target]
    values = {x_name: x, w_name: weight, **({b_name: bias} if b_name else {})}
    return tuple(values[n] for n in names)


def _separate_linears(target, x, weights, biases):
    """A fused linear's output computed as its members compute theirs, each from its own parameters."""
    return torch.cat([target(*_linear_args(target, x, w, b)) for w, b in zip(weights, biases)], dim=-1)


def separately(gm: fx.GraphModule, weight_name: str, x: fx.Node) -> tuple | None:
    """(function, args) computing the fused linear whose weight gm holds as weight_name from its members'
    parameters, or None if weight_name is no fused weight. The original branch of a fused site that dispatches on
    rows runs this, so that no graph reads the concatenated copy as is and it goes once packed."""
    if (found := gm.meta.get(MEMBERS, {}).get(weight_name)) is None:
        return None
    target, weights, biases = found
    return functools.partial(_separate_linears, target), (x, weights, biases)


def _users_accept(node: fx.Node, value, base: torch.Tensor, new_meta: dict) -> bool:
    """Whether every user of `node` still works when `node` yields `value`, a view of `base` (a strided piece of
    the fused output). Users run on fake tensors; the users of views are checked in turn (a view that merges
    the split dimension with others would fail). A graph output or an in-place op on the node is refused; one that
    only reads it (a cache's index_copy_ of it) is run like any user."""
    for user in node.users:
        if user.op not in ("call_function", "call_method") or _writes_into(user, node):
            return False
        try:
            with base.fake_mode:  # ops that make constants (masks) need the mode, not only fake arguments
                out = _run_fake(user, {node: value})
        except Exception:  # e.g. "view size is not compatible with input tensor's size and stride"
            return False
        if any(isinstance(t, torch.Tensor) and torch._C._is_alias_of(t, base) for t in _flat(out)):
            new_meta[user] = out
            if not _users_accept(user, out, base, new_meta):
                return False
    return True


def _run_fake(node: fx.Node, env: dict):
    def value(n: fx.Node):
        if n in env:
            return env[n]
        if "example_value" not in n.meta and "val" not in n.meta:
            raise ValueError(f"{n} has no example value")
        return n.meta.get("example_value", n.meta.get("val"))

    return call(node, value)


def _writes_into(node: fx.Node, value: fx.Node) -> bool:
    """Whether `node` is an in-place op on `value` (its self argument or out=)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__") and node.args and node.args[0] is value
    return bool(in_place) or node.kwargs.get("out") is value


def _flat(value) -> list:
    return [t for v in value for t in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def _without_values(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("example_value", "val", "tensor_meta")}


def _attr(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    if not hasattr(gm, name):  # the same group may be applied to several inputs (shared layers)
        gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def _concatenation(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat of parameters, made once per set of versions and shared by every graph that fuses them (a prefill
    and a decode graph hold one copy). Not pack_once: it watches the version of one tensor, and an update of any
    member must give a new copy."""
    entries = _COPIES.setdefault(tensors[0], {})
    key, versions = tuple(id(t) for t in tensors), tuple(t._version for t in tensors)
    hit = entries.get(key)
    if hit is None or hit[1] != versions or any(ref() is not t for ref, t in zip(hit[0], tensors)):
        with torch.no_grad():
            entries[key] = hit = ([weakref.ref(t) for t in tensors], versions, torch.cat([t.detach() for t in tensors], dim))
    elif not hit[2].untyped_storage().nbytes():  # released (Config.release_weights, memory.py): recompute in place
        hit[2].untyped_storage().resize_(hit[2].nbytes)
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(hit[2]):  # its packings stay valid
            torch.cat([t.detach() for t in tensors], dim, out=hit[2])
    return hit[2]


def _record(graph_id, op, first, x, members, k, sources, copies, tag) -> SiteRecord:
    rows = numel(fake(x).shape[:-1])
    n = sum(m.n for m in members)
    member_bytes, copy_bytes = sum(t.nbytes for t in sources), sum(t.nbytes for t in copies)
    reason = (f"{len(members)} linears read the same input: one GEMM over the concatenated weight {tag}_weight, "
              f"N={n} ({'+'.join(str(m.n) for m in members)}), K={k}; the copy adds {copy_bytes / 2**20:.2f} MiB "
              f"while the member parameters stay in the module")
    return SiteRecord(graph_id, "siblings", "rewritten", f"{op} x{len(members)}", location(first), chosen="concat",
                      reason=reason, copy=f"{tag}_weight", dims={"M": str(rows), "N": str(n), "K": str(k)},
                      hints={"M": int(rows.xreplace(hints_of(fake(x).shape))), "N": n, "K": k},
                      weight_bytes=(member_bytes, copy_bytes), packed=sorted(m.weight_name for m in members) +
                      sorted(m.bias_name for m in members if m.bias_name))
