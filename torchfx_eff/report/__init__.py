"""Rewrite log: records of every compiled graph since the last reset()."""
from __future__ import annotations

import itertools
import json
import threading

from .records import PACKED_KINDS, STATUSES, CandidateRecord, Report, SiteRecord

__all__ = ["PACKED_KINDS", "STATUSES", "CandidateRecord", "Report", "SiteRecord", "add_graph", "last_report", "new_graph_id", "reset"]

_lock = threading.Lock()
_sites: list[SiteRecord] = []
_graph_ids = itertools.count()


def new_graph_id() -> int:
    return next(_graph_ids)


def add_graph(records: list[SiteRecord], log_path: str | None = None) -> None:
    """Keep one graph's records and, if asked, append them to a JSONL log."""
    with _lock:
        _sites.extend(records)
        if log_path:
            with open(log_path, "a") as f:
                f.writelines(json.dumps(r.to_dict()) + "\n" for r in records)


def last_report() -> Report:
    """Every site of every graph compiled since the last reset()."""
    with _lock:
        return Report(list(_sites))


def reset() -> None:
    with _lock:
        _sites.clear()
