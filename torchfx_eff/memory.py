"""Config.release_weights: free a weight's memory once every compiled graph reads its packed copy instead.

A released tensor keeps its object and metadata (shape, dtype, stride, device: what Dynamo guards on, parameters
being graph inputs); its storage is resized to 0 bytes, as FSDP does. Its bytes go home first, so that it can
always come back: to host memory from an accelerator; on the CPU, where host memory is the memory being freed, to
an unlinked temporary file in the cache directory. A fused siblings' concatenation (passes/siblings.py) has no
home: it is recomputed from its members; it is released with Config.release_weights off too, as it is our copy.

Each compiled graph registers, for as long as it lives, the tensors it reads as they are (an unrewritten node, a
tied embedding, a fallback, its original graph once parameters changed): those stay resident, or come back. A graph
compiled later (decode after prefill, a recompile) gets back the released tensors it takes, since packing and the
numerics gate read them, and releases them again once compiled: its compile peaks as high as the first one.

Outside compiled graphs a released parameter holds no data. ATen refuses most reads ("out of bounds for storage of
size 0", "data is not allocated yet"), but some ops crash the process (printing, elementwise math, copy_, hence
load_state_dict) and torch.save writes empty storages: call restore_weights(model) first.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import IO

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from . import report
from .cache import cache_dir
from .passes.graph import location
from .report import SiteRecord
from .report.records import FUSED_COPY_PREFIX, PACKED_KINDS

log = logging.getLogger("torchfx_eff")
CHUNK = 64 * 2**20  # bytes staged at a time between a CPU tensor and its file


@dataclass
class _Home:
    name: str  # the graph's name of the tensor, for the report
    version: int  # the tensor's version and storage when its bytes were saved (`.data =` swaps the storage)
    storage: int
    data: torch.Tensor | IO | None  # a host copy, a temporary file, or None: recomputed when needed


_HOMES = WeakIdKeyDictionary()  # released tensor (or restored for a compile) -> its _Home
_READERS = WeakIdKeyDictionary()  # tensor -> WeakKeyDictionary(compiled graph -> what in it reads the tensor)


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and t.device.type != "meta"


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's whole storage as a uint8 tensor of its own: writes through it leave t's version alone (a new version
    would mark t's packed copies stale)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _unreleasable(t: torch.Tensor) -> str | None:
    if not _plain(t):
        return "a tensor subclass or non-strided tensor"
    storage = t.untyped_storage()
    if t in _HOMES and not storage.nbytes():  # released already, and nothing brought it back
        return None
    if t.storage_offset() or storage.nbytes() != t.nbytes:
        return "shares its storage with other tensors (a view, or part of a flat buffer)"
    if not storage.resizable():
        return "its storage cannot be resized (memory-mapped or borrowed memory)"
    return None


def _where(home: _Home) -> str:
    if home.data is None:
        return "released; recomputed from its members when a later graph needs it"
    if isinstance(home.data, torch.Tensor):
        return "moved to host memory; restored when a graph or restore_weights() needs it"
    return f"moved to a temporary file in {cache_dir()} (on CPU host memory is what is freed); restored when needed"


def _spill(flat: torch.Tensor) -> IO:
    """flat's bytes in an unlinked temporary file, deleted once closed (when its _Home goes)."""
    os.makedirs(cache_dir(), exist_ok=True)
    file = tempfile.TemporaryFile(dir=cache_dir())  # noqa: SIM115 (it lives as long as the weight's _Home)
    for i in range(0, flat.numel(), CHUNK):  # staged: .numpy() of the weight's own storage would pin its size
        file.write(flat[i:i + CHUNK].clone().numpy())
    return file


def _release(t: torch.Tensor, name: str) -> str:
    home = _HOMES.get(t)
    if home is None or (home.version, home.storage) != (t._version, _storage_key(t)):
        data = None if name.startswith(FUSED_COPY_PREFIX) else _spill(_as_bytes(t)) if t.device.type == "cpu" \
            else _as_bytes(t).cpu()
        home = _HOMES[t] = _Home(name, t._version, _storage_key(t), data)
    t.untyped_storage().resize_(0)
    return _where(home)


def _trim() -> None:
    """Give freed heap memory back to the OS: glibc keeps the freed blocks of weights it allocated on its heap
    (measured: a 90 MiB release left RSS unchanged until malloc_trim)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _home_of(t: torch.Tensor) -> _Home | None:
    home = _HOMES.get(t)
    if home is None and t.numel() and not t.untyped_storage().nbytes():  # another tensor of its storage released it
        key = _storage_key(t)
        home = next((h for k, h in list(_HOMES.items()) if _storage_key(k) == key), None)
    return home


def _restore(t: torch.Tensor) -> bool:
    """Bring t's bytes back from its home if it is released and has one; whether it did."""
    home = _home_of(t) if _plain(t) else None
    storage = t.untyped_storage() if home is not None else None
    if home is None or home.data is None or storage.nbytes():
        return False
    storage.resize_(t.nbytes)
    flat = _as_bytes(t)
    if isinstance(home.data, torch.Tensor):
        flat.copy_(home.data)
        return True
    home.data.seek(0)
    staging = torch.empty(min(CHUNK, flat.numel()), dtype=torch.uint8)
    for i in range(0, flat.numel(), CHUNK):
        n = home.data.readinto(staging.numpy()[:min(CHUNK, flat.numel() - i)])
        flat[i:i + n].copy_(staging[:n])
    return True


def restore(tensors, why: str) -> None:
    """Bring back every released tensor among `tensors` (for a compile: packing and the gate read the originals)."""
    if _HOMES:
        back = [t for t in tensors if isinstance(t, torch.Tensor) and _restore(t)]
        if back:
            log.info("torchfx_eff: restored %d released weights (%.1f MiB) for %s", len(back),
                     sum(t.nbytes for t in back) / 2**20, why)


def restore_weights(model: torch.nn.Module) -> list[str]:
    """Give `model`'s released parameters and buffers their data back, for eager calls, saving or loading a state
    dict; returns their names. Compiled graphs keep working; a later compile under Config(release_weights=True)
    may release them again."""
    back, records = [], []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        home = _home_of(t)
        if _restore(t):
            back.append(name)
            records.append(SiteRecord(-1, "weight", "kept", home.name, reason="restored by restore_weights()",
                                      weight_bytes=(t.nbytes, t.nbytes)))
            _HOMES.pop(t, None)
    report.add_graph(records)
    return back


def _attr(gm: fx.GraphModule, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def _reads(gm: fx.GraphModule, inputs: list) -> list[tuple[torch.Tensor, str]]:
    """The tensors that gm's nodes read as they are (used graph inputs and attributes), each with its first reader."""
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    reads = []
    for node in gm.graph.nodes:
        value = values.get(node) if node.op == "placeholder" else _attr(gm, node.target) if node.op == "get_attr" else None
        if node.users and _plain(value):
            user = next(iter(node.users))
            op = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
            reads.append((value, f"{op} at {os.path.basename(location(user)) or '?'}"))
    return reads


def _named(gm: fx.GraphModule, inputs: list) -> dict[str, torch.Tensor]:
    """gm's tensors by the names sites record: graph inputs, then parameters and buffers (fused copies)."""
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    named = {name: t for name, t in zip(placeholders, inputs) if isinstance(t, torch.Tensor)}
    return {**named, **dict(gm.named_parameters()), **dict(gm.named_buffers())}


def settle(graph, graph_id: int, runs: fx.GraphModule, rewritten: fx.GraphModule, inputs: list, packed: list,
           release: bool, records: list[SiteRecord]) -> list[SiteRecord]:
    """Once graph `graph_id` is compiled (`graph`: the callable Dynamo keeps; `runs`: the fx graph it runs): register
    what it reads as is, then decide for each tensor that its rewrites packed (`packed`), each fused copy and each
    released tensor it took whether it stays resident or, under Config.release_weights, is released (a fused copy,
    ours and recomputable, is released whatever the setting once no graph reads it as is). Returns one
    "weight" record per decision, and gives the graph's rewritten linear records their resident bytes."""
    reads = [(t, f"graph {graph_id}: {where}") for t, where in _reads(runs, inputs)]
    for t, what in reads:
        _READERS.setdefault(t, weakref.WeakKeyDictionary())[graph] = what
    readers = {}  # storage -> what in a live graph reads it as is (this graph's reader first)
    for t, what in [*reads, *((t, w) for t, graphs in list(_READERS.items()) for w in list(graphs.values()))]:
        readers.setdefault(_storage_key(t), what)
    # a stack's matrix (a linear reading W[i]) was packed from its stack: the stack is what may go
    packed_ids = {id(t if t._base is None else t._base) for t in packed}
    seen, decided, cpu_released = set(), [], False
    for name, t in _named(rewritten, inputs).items():
        if id(t) in seen or not (id(t) in packed_ids or name.startswith(FUSED_COPY_PREFIX) or t in _HOMES):
            continue
        seen.add(id(t))
        reader = readers.get(_storage_key(t)) if _plain(t) else None
        if reader is not None:
            _restore(t)
            _HOMES.pop(t, None)
            status, why = "kept", f"read as is by {reader}"
        elif not release and t not in _HOMES and not name.startswith(FUSED_COPY_PREFIX):
            status, why = "kept", "Config.release_weights is off: the original stays beside its packed copy"
        elif (refusal := _unreleasable(t)) is not None:
            status, why = "kept", refusal
        else:
            status, why = "released", _release(t, name)
            cpu_released |= t.device.type == "cpu"
        decided.append(SiteRecord(graph_id, "weight", status, name, reason=why,
                                  weight_bytes=(t.nbytes, 0 if status == "released" else t.nbytes)))
    resident = {r.op: r.weight_bytes[1] for r in decided}
    for r in records:
        if r.kind in PACKED_KINDS and r.status == "rewritten" and r.weight_bytes:
            r.resident_bytes = (r.weight_bytes[0], r.weight_bytes[1] + sum(resident.get(n, 0) for n in r.packed))
    if cpu_released:
        _trim()
    released = [r for r in decided if r.status == "released"]
    if released:
        log.info("torchfx_eff: graph %d released %d weights (%.1f MiB), kept %d", graph_id, len(released),
                 sum(r.weight_bytes[0] for r in released) / 2**20, len(decided) - len(released))
    return decided
