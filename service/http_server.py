"""The HTTP server ``bitplan serve`` runs: uvicorn with its h11 protocol, plus a deadline on request headers.

uvicorn times out an idle keep-alive connection, but not one that has sent part of a request's headers: a client
that sends ``GET / HTTP/1.1\\r\\nHost: x\\r\\n`` and nothing more holds a connection (and its buffers) for ever, and
a few thousand such clients hold the server (slowloris). :class:`HeaderDeadlineProtocol` arms a timer when a
connection opens and after each response; when the next request's headers are not complete in
``header_timeout_s`` the connection is answered ``408 Request Timeout`` and closed. A request that is not HTTP at
all gets its 400 as a problem (``application/problem+json``), like every other error of the service.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
_TIMEOUT_BODY = (b'{"type":"about:blank","title":"Request Timeout","status":408,"code":"request_timeout",'
                 b'"detail":"the request headers did not arrive in time"}')
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (``header_timeout_s``)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers still incomplete
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"type": "about:blank", "title": "Bad Request", "status": 400, "code": "bad_request",
                           "detail": f"{msg} (not an HTTP/1.1 request this server can read)"}).encode()
        event = h11.Response(status_code=400, reason=b"Bad Request",
                             headers=[(b"content-type", b"application/problem+json"), (b"connection", b"close"),
                                      (b"content-length", str(len(body)).encode())])
        for part in (event, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(part))
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in: its body and handler may take long
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def serve(app: Any, *, host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
    """Run ``app`` with uvicorn on ``host:port`` until interrupted, request headers due in ``header_timeout_s``."""
    import uvicorn

    protocol = type("Protocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
    uvicorn.run(app, host=host, port=port, log_level="warning", http=protocol)
