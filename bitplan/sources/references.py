"""Checking a model reference given by a caller of the service before anything is queued: a bundled id, or a path
inside one of the allowed roots (symlinks resolved first) whose files have sound headers and an allowed size."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

from bitplan.errors import ModelReferenceError, ModelTooLargeError
from bitplan.sources.models import BUNDLED_MODELS, resolve_reference, validate_gguf, validate_safetensors_header


def reference_bytes(kind: str, path: Path) -> int:
    """Bytes of a model reference on disk (every file of an HF folder)."""
    if kind == "hf-folder":
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def check_reference(reference: str, *, roots: Sequence[Path], max_bytes: int) -> str:
    """The reference as the pipeline will read it: a bundled id, or the resolved path inside an allowed root.
    Raises :class:`ModelReferenceError` (or :class:`ModelTooLargeError`) saying what to change."""
    if reference in BUNDLED_MODELS:
        return reference
    if "\x00" in reference or any(ord(c) < 32 for c in reference):
        raise ModelReferenceError("model reference contains a NUL or control character; give a bundled id or a "
                                  "plain path under an allowed root", param="model")
    if "://" in reference:
        raise ModelReferenceError("model URLs are not fetched; give a bundled id or a path under an allowed root",
                                  param="model")
    if ".." in Path(reference).parts:
        raise ModelReferenceError(f"model path {reference!r} contains '..'; give a path inside an allowed root",
                                  param="model")
    if not roots:
        raise ModelReferenceError(f"{reference!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}) and this "
                                  "service allows no model paths (start it with --model-root DIR)", param="model")
    target = _inside_roots(reference, roots)
    kind, file = resolve_reference(str(target))
    _check_files(reference, kind, file, roots)
    size = reference_bytes(kind, file)
    if size > max_bytes:
        raise ModelTooLargeError(f"model is {size} bytes, over this service's limit of {max_bytes}", param="model")
    if kind == "gguf":
        validate_gguf(file)
    else:
        for weights in ([file] if kind == "safetensors" else sorted(file.glob("*.safetensors"))):
            validate_safetensors_header(weights)
    return str(target)


def _inside_roots(reference: str, roots: Sequence[Path]) -> Path:
    inside = _candidates_inside(reference, roots)
    if not inside:
        raise ModelReferenceError(f"model path {reference!r} is outside the allowed roots", param="model")
    return inside[0]


def _candidates_inside(reference: str, roots: Sequence[Path]) -> list[Path]:
    """Where ``reference`` resolves (symlinks followed) under each root, keeping those inside a root."""
    path = Path(reference)
    candidates = [path.resolve()] if path.is_absolute() else [(root / path).resolve() for root in roots]
    resolved_roots = [root.resolve() for root in roots]
    return [c for c in candidates if any(c.is_relative_to(r) for r in resolved_roots)]


def _check_files(reference: str, kind: str, path: Path, roots: Sequence[Path]) -> None:
    """Every file the loader will open is a regular file whose real path stays inside an allowed root (no symlink
    out of a root, no FIFO or device that would hang a read)."""
    folder = path if path.is_dir() else path.parent
    files = list(folder.iterdir()) if kind == "hf-folder" else [path, folder / "config.json"]
    resolved_roots = [root.resolve() for root in roots]
    for file in files:
        if not file.exists() and not file.is_symlink():
            continue
        real = file.resolve()
        if not any(real.is_relative_to(r) for r in resolved_roots):
            raise ModelReferenceError(f"model file {file.name!r} of {reference!r} links outside the allowed roots",
                                      param="model")
        if not stat.S_ISREG(real.stat().st_mode) and not real.is_dir():
            raise ModelReferenceError(f"model file {file.name!r} of {reference!r} is not a regular file",
                                      param="model")


MAX_TEXT_BYTES = 64 * 2**20


def check_text_file(reference: str, *, roots: Sequence[Path], param: str) -> str:
    """A text file a caller names (an evaluation text): a regular UTF-8 file inside an allowed root, at most
    ``MAX_TEXT_BYTES``; its resolved path, or a :class:`SpecError` naming ``param``."""
    from bitplan.errors import SpecError

    if "\x00" in reference or any(ord(c) < 32 for c in reference) or "://" in reference \
            or ".." in Path(reference).parts:
        raise SpecError(f"{param} must be a plain path under an allowed root (no '..', URL or control character)",
                        param=param)
    if not roots:
        raise SpecError(f"this service allows no file paths (start it with --model-root DIR); leave {param} out "
                        "to use the built-in text", param=param)
    inside = [c for c in _candidates_inside(reference, roots) if c.is_file()]
    if not inside:
        raise SpecError(f"{param} {reference!r} is not a file under an allowed root", param=param)
    target = inside[0]
    if not stat.S_ISREG(target.stat().st_mode) or target.stat().st_size > MAX_TEXT_BYTES:
        raise SpecError(f"{param} {reference!r} must be a regular file of at most {MAX_TEXT_BYTES} bytes", param=param)
    try:
        target.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{param} {reference!r} is not UTF-8 text", param=param) from None
    return str(target)
