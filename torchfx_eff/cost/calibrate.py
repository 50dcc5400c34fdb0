"""Measured candidate times, cached on disk by device, site shape and candidate."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..cache import cache_dir, read_json, write_json


def seconds(fn, device: torch.device, min_runs: int = 5, budget_s: float = 0.2) -> float:
    """Median wall time of fn() after a warm-up; synchronizes CUDA around each run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 100):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def site_key(spec_name: str, candidate: str, site) -> str:
    sizes = ",".join(f"{k}={site.size(k)}" for k in site.dims)
    flags = ",".join(f"{k}={getattr(site, k)}" for k in ("is_causal", "enable_gqa") if hasattr(site, k))
    extras = f"mask={getattr(site, 'mask', None) is not None},bias={getattr(site, 'bias', None) is not None}"
    return f"{spec_name}|{candidate}|{site.kind}|{site.op}|{site.dtype}|{sizes}|{flags}|{extras}"


class Calibration:
    """A JSON file of measured seconds; read once, written back atomically."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "calibration.json"
        self.times: dict[str, float] = read_json(self.path, {})

    def get(self, key: str) -> float | None:
        return self.times.get(key)

    def put(self, key: str, value: float) -> None:
        self.times[key] = value

    def save(self) -> None:
        write_json(self.path, self.times)
