"""One pagination style for every list: ``?cursor=&limit=`` in, ``items``, ``next_cursor``, ``has_more`` out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import Query

from bitplan.errors import CursorError

T = TypeVar("T")
CURSOR = Query(default=None, max_length=200, description="a previous page's next_cursor")


def one_page(fetched: Sequence[T], limit: int, cursor_of: Callable[[T], str]) -> dict[str, Any]:
    """The page from up to ``limit + 1`` fetched items (the extra one only tells that more exist)."""
    items = list(fetched[:limit])
    has_more = len(fetched) > limit
    return {"items": items, "has_more": has_more, "next_cursor": cursor_of(items[-1]) if has_more else None}


def after_cursor(items: Sequence[T], cursor: str | None, key_of: Callable[[T], str], limit: int) -> list[T]:
    """Up to ``limit + 1`` items of a short, fully listed sequence after the one whose key is ``cursor`` (a 400
    for a cursor no item has: the caller passed something that is not a ``next_cursor`` of this list)."""
    start = 0
    if cursor is not None:
        keys = [key_of(item) for item in items]
        if cursor not in keys:
            raise CursorError(cursor)
        start = keys.index(cursor) + 1
    return list(items[start:start + limit + 1])
