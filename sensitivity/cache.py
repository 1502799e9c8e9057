"""On-disk cache of sensitivity results, keyed by everything that determines them.

The key is the sha256 of (model weights hash, calibration tokens hash, metric, its parameters, cache format
version), so one computation serves every budget and every job on the same model and calibration set. Entries
are JSON files written under a temporary name and renamed, so a reader never sees half a file.

A cache may have a :class:`CacheMirror`: a second home for its entries that other machines read (a service's
object store, issue 44). A local miss is then looked up there, and every entry written here is published there, so
a job on one host takes the sensitivity another host measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bitplan.sensitivity.api import SensitivityResult

CACHE_FORMAT = 5  # 2: token_taylor shrinks its first-order term; 3: a GGUF source's own blocks (zero error);
# 4: the fractional-zero grids search each group's range by importance; 5: then refit it by weighted least squares


def default_cache_dir() -> Path:
    """``$BITPLAN_CACHE_DIR``, else ``~/.cache/bitplan``."""
    configured = os.environ.get("BITPLAN_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "bitplan"


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON (plus the cache format)."""
    canonical = json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class CacheMirror(Protocol):
    """Where other machines keep the same cache. ``name`` is an entry's path relative to the cache root
    (``sensitivity/KEY.json``). Neither method raises for an unreachable mirror: the cache is only a shortcut, so
    an implementation logs and answers as if the entry were absent (or not published)."""

    where: str  # how reports name it ("the shared object store")

    def fetch(self, name: str, dest: Path) -> bool:
        """Copy the entry ``name`` to ``dest`` (complete or not at all); whether it was there."""
        ...

    def publish(self, name: str, path: Path) -> None:
        """Make the complete local file ``path`` the entry ``name``."""
        ...


class SensitivityCache:
    """``get`` / ``put`` of :class:`SensitivityResult` under ``root/sensitivity/KEY.json``, with an optional
    ``mirror`` shared with other machines."""

    def __init__(self, root: Path | None = None, *, mirror: CacheMirror | None = None) -> None:
        self.root = root or default_cache_dir()
        self.folder = self.root / "sensitivity"
        self.mirror = mirror

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> SensitivityResult | None:
        """The cached result, or ``None`` when absent or unreadable (a damaged entry is recomputed)."""
        return self.lookup(key)[0]

    def lookup(self, key: str) -> tuple[SensitivityResult | None, str | None]:
        """The cached result and where it came from: this machine's folder (``"this machine"``), the mirror (its
        ``where``; the entry is then kept here too), or ``(None, None)``."""
        found = _read_result(self.path(key))
        if found is not None:
            return found, "this machine"
        if self.mirror is not None and fetched(self.mirror, f"sensitivity/{key}.json", self.path(key)):
            found = _read_result(self.path(key))
            if found is not None:
                return found, self.mirror.where
        return None, None

    def put(self, key: str, result: SensitivityResult) -> Path:
        target = self.path(key)
        write_atomically(target, lambda temporary: temporary.write_text(json.dumps(result.to_json())))
        if self.mirror is not None:
            self.mirror.publish(f"sensitivity/{key}.json", target)
        return target

    def statistics(self) -> StatisticsCache:
        """The calibration statistics kept beside these results (and mirrored with them)."""
        return StatisticsCache(self.root, mirror=self.mirror)


def _read_result(path: Path) -> SensitivityResult | None:
    try:
        return SensitivityResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetched(mirror: CacheMirror, name: str, dest: Path) -> bool:
    """``mirror.fetch`` into ``dest``'s folder (made when missing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return mirror.fetch(name, dest)


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` beside ``target``, then renamed onto it: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class StatisticsCache:
    """``get`` / ``put`` of named float tensors (calibration statistics such as every unit's input energy) under
    ``root/statistics/KEY.safetensors``, written under a temporary name and renamed: a job whose sensitivity is
    cached does not run its calibration forward again for them."""

    def __init__(self, root: Path | None = None, *, mirror: CacheMirror | None = None) -> None:
        self.folder = (root or default_cache_dir()) / "statistics"
        self.mirror = mirror

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached tensors (from the mirror when this machine has none), or ``None`` when absent or
        unreadable."""
        path = self.folder / f"{key}.safetensors"
        found = _read_tensors(path)
        if found is None and self.mirror is not None and fetched(self.mirror, f"statistics/{path.name}", path):
            found = _read_tensors(path)
        return found

    def put(self, key: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        target = self.folder / f"{key}.safetensors"
        write_atomically(target, lambda temporary: save_file(
            {name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary)))
        if self.mirror is not None:
            self.mirror.publish(f"statistics/{target.name}", target)


def _read_tensors(path: Path) -> dict[str, Any] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (OSError, ValueError, SafetensorError):
        return None
