"""One parse of a GGUF file per model load.

Loading a ``.gguf`` reference goes through transformers, which opens the file with ``gguf.GGUFReader`` for the
config, again for the weights (twice: config and state dict) and again for the tokenizer; bitplan opens it to
validate it and to keep the source's own blocks. Each opening parses the whole header: for SmolLM2 a 49,152-token
vocabulary and its merges, about 1.2 s on this project's 2-core machine, seven times per load. Within
:func:`gguf_parsed_once` every ``gguf.GGUFReader(path)`` of the same file and mode returns one reader (they are
read-only memory maps), so the header is parsed once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def gguf_parsed_once() -> Iterator[dict[tuple[str, str], Any]]:
    """Within the block, ``gguf.GGUFReader`` (as looked up at call time, which is how transformers and bitplan
    import it) returns one reader per (resolved path, mode); yields the readers made. The module attribute is
    restored afterwards, also on error."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | Path, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[misc,assignment]
    try:
        yield readers
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
