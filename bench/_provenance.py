"""Which code a bench result came from: every bench script puts ``provenance()`` in the JSON it prints, so a file
in ``bench/results/`` names its commit (``bench/results/README.md``). Loaded with
``_own_folder_off_path.sibling("_provenance")``: the scripts take this folder off the import path."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def provenance() -> dict[str, object]:
    """``{"commit": HEAD's sha or "unknown", "dirty": bool, "date": UTC ISO time}``; ``dirty`` is true when tracked
    files differ from the commit, or when git could not tell (no git, not a checkout)."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or "unknown", "dirty": changed is None or changed != "",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _git(*args: str) -> str | None:
    """``git args`` in this repository, its stdout stripped; ``None`` when git is missing or fails. The status
    takes no lock (``--no-optional-locks``): a bench never writes the index of a checkout others work in."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(REPOSITORY), *args], capture_output=True,
                              text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
