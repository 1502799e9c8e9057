"""Each kind of job's measured stage durations on this machine, kept in a small JSON file: the ETA of the next
job of that kind (split from :mod:`bitplan.service.worker`)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def stage_times_key(request: dict[str, Any]) -> str:
    """Jobs that run the same stages at about the same speed: everything but the budgets' values, and their
    count."""
    budget = request.get("budget") or {}
    count = len(budget.get("bits_per_weight") or []) or 1
    shape = {**{k: v for k, v in request.items() if k != "budget"}, "budgets": count}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:32]


def read_stage_times(path: Path, key: str) -> list[tuple[str, float]] | None:
    try:
        return [(str(stage), float(seconds)) for stage, seconds in json.loads(path.read_text())[key]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none measured yet, or an unreadable file: the ETA falls back to the stage spans


def write_stage_times(path: Path, key: str, durations: list[tuple[str, float]]) -> None:
    """Record a succeeded job's stage durations (the newest 200 kinds of job kept; renamed into place)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table.pop(key, None)
    table[key] = [[stage, round(seconds, 3)] for stage, seconds in durations]
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    staging.write_text(json.dumps(dict(list(table.items())[-200:])))
    os.replace(staging, path)
