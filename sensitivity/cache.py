"""On-disk cache of sensitivity results, keyed by everything that determines them.

The key is the sha256 of (model weights hash, calibration tokens hash, metric, its parameters, cache format
version), so one computation serves every budget and every job on the same model and calibration set. Entries
are JSON files written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


class SensitivityCache:
    """``get`` / ``put`` of :class:`SensitivityResult` under ``root/sensitivity/KEY.json``."""

    def __init__(self, root: Path | None = None) -> None:
        self.folder = (root or default_cache_dir()) / "sensitivity"

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> SensitivityResult | None:
        """The cached result, or ``None`` when absent or unreadable (a damaged entry is recomputed)."""
        try:
            return SensitivityResult.from_json(json.loads(self.path(key).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, result: SensitivityResult) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(result.to_json(), stream)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target


class StatisticsCache:
    """``get`` / ``put`` of named float tensors (calibration statistics such as every unit's input energy) under
    ``root/statistics/KEY.safetensors``, written under a temporary name and renamed: a job whose sensitivity is
    cached does not run its calibration forward again for them."""

    def __init__(self, root: Path | None = None) -> None:
        self.folder = (root or default_cache_dir()) / "statistics"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached tensors, or ``None`` when absent or unreadable."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(self.folder / f"{key}.safetensors")))
        except (OSError, ValueError, SafetensorError):
            return None

    def put(self, key: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary)
            os.replace(temporary, self.folder / f"{key}.safetensors")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
