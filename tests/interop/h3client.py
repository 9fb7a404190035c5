"""A small HTTP/3 client on aioquic, modelled on aioquic's examples/http3_client.py.

One `H3Client` is one QUIC connection; `request()` may be awaited concurrently to
multiplex several streams. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)

Headers = list[tuple[bytes, bytes]]

DEFAULT_TIMEOUT = 10.0


@dataclass
class Response:
    """What came back on one request stream."""

    stream_id: int
    status: int | None = None
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    reset_code: int | None = None  # RESET_STREAM from the server
    stop_sending_code: int | None = None  # STOP_SENDING from the server
    ended: bool = False  # FIN received

    def header(self, name: str) -> str | None:
        """First value of a response header (name in lower case), or None."""
        key = name.encode()
        for k, v in self.headers:
            if k == key:
                return v.decode()
        return None

    def header_all(self, name: str) -> list[str]:
        """All values of a response header."""
        key = name.encode()
        return [v.decode() for k, v in self.headers if k == key]

    def trailer(self, name: str) -> str | None:
        """First value of a response trailer, or None."""
        key = name.encode()
        for k, v in self.trailers or []:
            if k == key:
                return v.decode()
        return None


class H3Client(QuicConnectionProtocol):
    """QUIC protocol that routes HTTP/3 events to per-stream futures."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._responses: dict[int, Response] = {}
        self._waiters: dict[int, asyncio.Future] = {}
        self.terminated: ConnectionTerminated | None = None
        self.authority = "localhost"

    # -- event routing -------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            resp = self._responses.get(event.stream_id)
            if resp is not None:
                resp.reset_code = event.error_code
                self._finish(event.stream_id)
        elif isinstance(event, StopSendingReceived):
            resp = self._responses.get(event.stream_id)
            if resp is not None:
                resp.stop_sending_code = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            for sid, waiter in list(self._waiters.items()):
                if not waiter.done():
                    waiter.set_exception(
                        ConnectionError(
                            f"connection terminated (code 0x{event.error_code:x}, "
                            f"reason {event.reason_phrase!r}) before stream {sid} ended"
                        )
                    )
            self._waiters.clear()

        for h3_event in self._http.handle_event(event):
            self._h3_event_received(h3_event)

    def _h3_event_received(self, event) -> None:
        resp = self._responses.get(getattr(event, "stream_id", -1))
        if resp is None:
            return
        if isinstance(event, HeadersReceived):
            if resp.status is None:
                resp.headers = list(event.headers)
                status = dict(event.headers).get(b":status")
                resp.status = int(status) if status is not None else None
                if resp.status is not None and 100 <= resp.status < 200:
                    resp.status = None  # interim response: wait for the final one
            else:
                resp.trailers = list(event.headers)
        elif isinstance(event, DataReceived):
            resp.body += event.data
        if getattr(event, "stream_ended", False):
            resp.ended = True
            self._finish(event.stream_id)

    def _finish(self, stream_id: int) -> None:
        waiter = self._waiters.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self._responses[stream_id])

    # -- requests ------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Headers | None = None,
        body: bytes | None = None,
        trailers: Headers | None = None,
        authority: str | None = None,
        raw_headers: Headers | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Response:
        """Send one request and wait for its response (or a stream reset).

        `raw_headers`, if given, is sent verbatim as the whole header section
        (pseudo-headers included), bypassing the usual construction; aioquic
        does not validate what it sends, so this can carry malformed fields.
        """
        if self.terminated is not None:
            raise ConnectionError("connection already terminated")
        stream_id = self._quic.get_next_available_stream_id()
        resp = Response(stream_id=stream_id)
        self._responses[stream_id] = resp
        waiter = self._loop.create_future()
        self._waiters[stream_id] = waiter

        if raw_headers is not None:
            head = list(raw_headers)
        else:
            head = [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", (authority or self.authority).encode()),
                (b":path", path.encode()),
                (b"user-agent", b"spooky-interop-aioquic"),
            ] + list(headers or [])
        has_body = body is not None or trailers is not None
        self._http.send_headers(stream_id, head, end_stream=not has_body)
        if has_body:
            if body:
                self._http.send_data(stream_id, body, end_stream=trailers is None)
            elif trailers is None:
                self._http.send_data(stream_id, b"", end_stream=True)
            if trailers is not None:
                self._http.send_headers(stream_id, list(trailers), end_stream=True)
        self.transmit()

        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{method} {path}: no complete response within {timeout}s "
                f"(status={resp.status}, {len(resp.body)} body bytes so far)"
            ) from None

    async def get(self, path: str, **kw) -> Response:
        return await self.request("GET", path, **kw)


def client_configuration() -> QuicConfiguration:
    """Client config: ALPN h3, no certificate verification (self-signed), SNI localhost."""
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        verify_mode=ssl.CERT_NONE,
        server_name="localhost",
        max_data=16 << 20,
        max_stream_data=4 << 20,
        idle_timeout=30.0,
    )


@contextlib.asynccontextmanager
async def h3_connect(host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT):
    """Open an H3 connection; handshake and close are each bounded by `timeout`."""
    cm = connect(
        host,
        port,
        configuration=client_configuration(),
        create_protocol=H3Client,
    )
    client: H3Client = await asyncio.wait_for(cm.__aenter__(), timeout)
    client.authority = f"localhost:{port}"
    try:
        yield client
    finally:
        await asyncio.wait_for(cm.__aexit__(None, None, None), timeout)


def run(coro, timeout: float = 30.0):
    """Run a coroutine to completion from sync code, bounded by `timeout`."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
