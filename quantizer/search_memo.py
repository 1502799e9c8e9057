"""A content-addressed memo of grid searches: the fractional-zero formats of one width and group size
(``int4-g32-fzero``, ``-dq4``, ``-dq6``) search the same grid for a weight before each stores it its own way, and
the quantize step encodes again the format that the weight errors already encoded (the salience-calibrated
integer grids too). The search is done once per weight, importance, width and group size; a second caller of the
same key, on another thread, waits for the first. A job clears it when it ends.

The key is a digest of the bytes searched (blake2b of the weight and of the importance), never an object's
address, so a freed tensor whose memory is reused cannot be mistaken for another. The results kept are bounded
(:data:`MEMO_BYTES`), the least recently used dropped first. ``BITPLAN_SEARCH_MEMO=0`` turns it off (the
reference: every call searches).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch

MEMO_BYTES = 256 << 20  # the searched grids kept: all of SmolLM2-135M's for bitplan-mix's eleven formats, ~110 MB

Grids = tuple[torch.Tensor, torch.Tensor]


def digest(*tensors: torch.Tensor) -> bytes:
    """blake2b of the tensors' shapes, dtypes and bytes."""
    hasher = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        contiguous = tensor.detach().cpu().contiguous()
        hasher.update(f"{tuple(contiguous.shape)}:{contiguous.dtype};".encode())
        hasher.update(memoryview(contiguous.view(torch.uint8).numpy() if contiguous.numel() else b""))
    return hasher.digest()


class SearchMemo:
    """``key -> (scale, zero)`` for the searches in flight and the last ones done, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[object, ...], Grids] = OrderedDict()
        self._running: dict[tuple[object, ...], Future[Grids]] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple[object, ...], search: Callable[[], Grids]) -> Grids:
        """``search()``'s result for ``key`` (copies: a caller may change them), computed once while kept."""
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                self.hits += 1
                return _copies(self._done[key])
            waiting = self._running.get(key)
            if waiting is None:
                self._running[key] = mine = Future()
                self.misses += 1
            else:
                self.hits += 1
        if waiting is not None:
            return _copies(waiting.result())
        try:
            result = search()
        except BaseException as error:
            with self._lock:
                del self._running[key]
            mine.set_exception(error)
            raise
        with self._lock:
            del self._running[key]
            self._keep(key, result)
        mine.set_result(result)
        return _copies(result)

    def clear(self) -> None:
        with self._lock:
            self._done.clear()
            self._bytes = 0

    def _keep(self, key: tuple[object, ...], result: Grids) -> None:
        size = sum(t.numel() * t.element_size() for t in result)
        if size > self.max_bytes:
            return
        self._done[key] = result
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._done.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in dropped)


def _copies(grids: Grids) -> Grids:
    return grids[0].clone(), grids[1].clone()


def enabled() -> bool:
    return os.environ.get("BITPLAN_SEARCH_MEMO", "1") != "0"


SEARCHES = SearchMemo()  # quantizer.rtn's fractional-zero and salience-calibrated grid searches
