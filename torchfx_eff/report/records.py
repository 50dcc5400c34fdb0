"""The rewrite log: one record per site, readable as a table and as JSON."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

# released: a "weight" record (memory.py); checked: an "outputs" record, the graph check (backend.py)
STATUSES = ("rewritten", "kept", "fallback", "missed", "released", "checked")
FUSED_COPY_PREFIX = "_torchfx_eff_cat_"  # names of the concatenated weights of fused sibling linears
PACKED_KINDS = ("linear", "experts")  # site kinds whose rewrites repack their weights


@dataclass
class CandidateRecord:
    name: str
    applicable: bool
    reason: str | None = None  # why it is not applicable
    estimate_us: float | None = None  # cost model estimate at the example sizes
    measured_us: float | None = None  # with Config.calibrate
    formula: str | None = None  # the symbolic cost in seconds, over the graph's sizes

    @property
    def time_us(self) -> float | None:
        """The measurement when there is one, else the estimate."""
        return self.measured_us if self.measured_us is not None else self.estimate_us


@dataclass
class SiteRecord:
    graph_id: int
    kind: str  # attention | linear | ...
    status: str  # one of STATUSES
    op: str  # the matched call, e.g. "linear" or "scaled_dot_product_attention"
    location: str = ""  # user file:line from the node's stack trace
    chosen: str | None = None
    reason: str = ""
    candidates: list[CandidateRecord] = field(default_factory=list)
    dims: dict[str, str] = field(default_factory=dict)  # symbolic size -> expression
    hints: dict[str, int] = field(default_factory=dict)  # the example value of each size
    sqnr_db: float | None = None  # numerics gate result of the chosen candidate (or of the rewrite the graph check reverted)
    weight_bytes: tuple[int, int] | None = None  # (before, packed) for rewrites that repack weights
    # (before, after) in memory: the originals, then the packed copy plus the originals still resident. A "weight"
    # record (one parameter or fused copy) has (bytes, bytes resident) in weight_bytes.
    resident_bytes: tuple[int, int] | None = None
    packed: list[str] = field(default_factory=list)  # names of the parameters packed into constants
    # with symbolic rows: regime label -> {"chosen": name, "estimates_us": {candidate: us}}
    regimes: dict[str, dict] = field(default_factory=dict)
    epilogue: str = ""  # the pointwise ops after a linear that its kernel applies, e.g. "swiglu(silu), to float16"
    copy: str = ""  # a "siblings" record: the name of the concatenated weight it made
    site_id: str = ""  # a linear's weight name, another site's node name: the graph check reverts sites by it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SiteRecord":
        d = dict(d)
        d["candidates"] = [CandidateRecord(**c) for c in d.get("candidates", [])]
        for key in ("weight_bytes", "resident_bytes"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _us(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 1000 else f"{x / 1000:.2f}ms")


@dataclass
class Report:
    sites: list[SiteRecord] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts by kind, then by status."""
        out: dict[str, dict[str, int]] = {}
        for (kind, status), n in sorted(Counter((s.kind, s.status) for s in self.sites).items()):
            out.setdefault(kind, {})[status] = n
        return out

    def to_json(self, **kw) -> str:
        return json.dumps([s.to_dict() for s in self.sites], **kw)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls([SiteRecord.from_dict(d) for d in json.loads(text)])

    @classmethod
    def from_jsonl(cls, path) -> "Report":
        with open(path) as f:
            return cls([SiteRecord.from_dict(json.loads(line)) for line in f if line.strip()])

    def weight_bytes(self) -> tuple[int, int]:
        """Weight bytes (before, packed) of the parameters that rewritten sites repacked, each parameter once
        (graphs share a parameter's packed copy). A fused siblings' concatenation that a site repacked is an
        intermediate: the members' bytes count before (the "siblings" record) and that site's packing after. What
        stays in memory, originals included: resident_bytes()."""
        repacked = {n for s in self.sites if s.kind != "siblings" and s.status == "rewritten" for n in s.packed}
        pairs = {tuple(s.packed) or id(s): (s.weight_bytes[0], 0) if s.copy in repacked else s.weight_bytes
                 for s in self.sites if s.weight_bytes and s.status == "rewritten"}
        copies = {k for k in pairs if isinstance(k, tuple) and all(str(n).startswith(FUSED_COPY_PREFIX) for n in k)}
        before = sum(p[0] for k, p in pairs.items() if k not in copies)
        return before, sum(p[1] for p in pairs.values())

    def resident_bytes(self) -> tuple[int, int]:
        """Weight bytes in memory (before, after) for the tensors that rewritten sites packed: before, the original
        parameters; after, every packed copy plus each original or fused copy still resident, as its latest
        "weight" record says (Config.release_weights releases them)."""
        latest = {s.op: s.weight_bytes for s in self.sites if s.kind == "weight"}
        packings = {(tuple(s.packed), s.chosen): s.weight_bytes[1] for s in self.sites
                    if s.kind in PACKED_KINDS and s.status == "rewritten" and s.weight_bytes}
        before = sum(b for name, (b, _) in latest.items() if not name.startswith(FUSED_COPY_PREFIX))
        return before, sum(packings.values()) + sum(r for _, r in latest.values())

    def __str__(self) -> str:
        """A table with one row per group of identical sites (same graph, location, shape and decision)."""
        if not self.sites:
            return "torchfx_eff: no sites recorded"
        header = ("n", "graph", "kind", "status", "chosen", "location", "shape", "candidates (est us)", "SQNR dB", "reason")
        groups: dict[tuple, list[SiteRecord]] = {}
        for s in self.sites:
            usable = [c for c in s.candidates if c.applicable]
            cands = " ".join(f"{c.name}={_us(c.time_us)}" for c in usable)
            if len(usable) < len(s.candidates):
                cands += f" (+{len(s.candidates) - len(usable)} n/a)"
            shape = ",".join(f"{k}={v}" for k, v in s.hints.items())
            choices = [r["chosen"] for r in s.regimes.values()]
            chosen = "|".join(choices) if len(set(choices)) > 1 else (s.chosen or "-")  # dispatched on rows
            chosen += f"[{s.epilogue}]" if s.epilogue else ""
            key = (str(s.graph_id), s.kind, s.status, chosen, os.path.basename(s.location), shape, cands, s.reason)
            groups.setdefault(key, []).append(s)
        rows = []
        for key, members in groups.items():
            dbs = [m.sqnr_db for m in members if m.sqnr_db is not None]
            rows.append((str(len(members)), *key[:-1], f"{min(dbs):.1f}" if dbs else "-", key[-1]))
        widths = [min(max(len(r[i]) for r in rows + [header]), 60) for i in range(len(header) - 1)]
        fmt = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
        lines = [fmt(header), fmt(tuple("-" * w for w in widths) + ("-" * 6,))]
        lines += [fmt(r) for r in rows]
        counts = "; ".join(f"{k}: " + ", ".join(f"{n} {st}" for st, n in v.items()) for k, v in self.summary().items())
        lines.append(f"summary: {counts}")
        before, after = self.weight_bytes()
        if before:
            lines.append(f"weights of rewritten linears and experts: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB packed")
        if any(s.kind == "weight" for s in self.sites):  # logs written before weight records have none
            before, after = self.resident_bytes()
            lines.append(f"weights resident: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (packed copies and "
                         f"the originals still resident; see the weight records)")
        return "\n".join(lines)
