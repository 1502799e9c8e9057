"""Serving one object of the object store over HTTP the way ``FileResponse`` serves a file: ``Accept-Ranges``,
a single byte range answered 206 with ``Content-Range``, an unsatisfiable one 416, HEAD without a body. The bytes
stream from the store as they arrive (a range is asked of the store, not cut here)."""

from __future__ import annotations

import re
from urllib.parse import quote

from fastapi import Response
from fastapi.responses import StreamingResponse

from bitplan.service.api.errors import problem
from bitplan.service.objects import ObjectStore

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """The ``[start, end)`` a ``Range`` header asks for; ``None`` for the whole object (no header, several
    ranges or another unit: RFC 9110 lets a server ignore them); ``False`` when it cannot be satisfied."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        length = int(last)
        return (max(size - length, 0), size) if length > 0 and size > 0 else False
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        return False
    return start, end


def object_response(store: ObjectStore, key: str, *, size: int, name: str, headers: dict[str, str],
                    range_header: str | None, head: bool) -> Response:
    """The object ``key`` (``size`` bytes) as a download named ``name``, with ``headers`` (ETag, checksum)."""
    span = parse_range(range_header, size)
    disposition = f'attachment; filename="{name}"' if quote(name) == name else \
        f"attachment; filename*=utf-8''{quote(name)}"
    common = {**headers, "Accept-Ranges": "bytes", "Content-Disposition": disposition}
    if span is False:
        return problem(416, f"the range {range_header!r} is outside the file's {size} bytes",
                       headers={"Content-Range": f"bytes */{size}"})
    start, end = (0, size) if span is None or isinstance(span, bool) else span
    status = 200 if span is None else 206
    if status == 206:
        common["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    common["Content-Length"] = str(end - start)
    if head:
        return Response(status_code=status, headers=common, media_type="application/octet-stream")
    chunks = store.open_range(key, start, end) if end > start else iter(())  # asked now: errors answer here
    return StreamingResponse(chunks, status_code=status, headers=common, media_type="application/octet-stream")
