"""The on-disk cache: device measurements, calibrations, converted models."""
from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """$TORCHFX_EFF_CACHE_DIR, or ~/.cache/torchfx_eff."""
    return Path(os.environ.get("TORCHFX_EFF_CACHE_DIR") or Path.home() / ".cache" / "torchfx_eff")


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half-written by a killed process: measure again
        return default


def write_json(path: Path, obj) -> None:
    """Write through a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)
