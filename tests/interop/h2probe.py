"""A direct HTTP/2 (h2c, prior knowledge) probe of a backend, without Spooky in between:
how does it end a connection that carries many requests?

`probe()` keeps `concurrency` GETs in flight on one connection until the backend closes it
(or `max_requests` were sent, or `timeout` passed) and records every GOAWAY and RST_STREAM the
backend sent, from a frame-level tap of the raw bytes (so frames that arrive after the first
GOAWAY, which the `h2` state machine no longer accepts, are seen too).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

DATA, HEADERS, RST_STREAM, GOAWAY = 0x0, 0x1, 0x3, 0x7
END_STREAM = 0x1
CODES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x7: "REFUSED_STREAM",
         0x8: "CANCEL", 0xB: "ENHANCE_YOUR_CALM"}


def code_name(code: int) -> str:
    return CODES.get(code, f"0x{code:x}")


@dataclass
class ProbeResult:
    sent: int = 0
    completed: int = 0  # responses that ended (END_STREAM)
    goaways: list = field(default_factory=list)  # (after n completed, last_stream_id, code name)
    resets: list = field(default_factory=list)  # (stream id, code name)
    sent_above_last: int = 0  # streams in flight above the first GOAWAY's last_stream_id when it came
    answered_above_last: int = 0  # ... that the backend answered anyway
    unanswered_at_or_below_last: list = field(default_factory=list)  # covered by GOAWAY, never answered
    closed: bool = False  # the backend closed the TCP connection
    elapsed: float = 0.0

    def describe(self) -> str:
        runs: list[list] = []  # consecutive identical GOAWAYs, counted
        for g in self.goaways:
            if runs and runs[-1][0] == g:
                runs[-1][1] += 1
            else:
                runs.append([g, 1])
        gs = ", then ".join(f"GOAWAY({c}, last_stream_id={s}){f' x{k}' if k > 1 else ''} after {n} responses"
                            for (n, s, c), k in runs) or "no GOAWAY"
        rs = {}
        for _, c in self.resets:
            rs[c] = rs.get(c, 0) + 1
        return (f"{self.sent} requests sent, {self.completed} answered; {gs}; RST_STREAM {rs or 'none'}; "
                f"{self.sent_above_last} streams in flight above last_stream_id, {self.answered_above_last} of them "
                f"answered, {len(self.unanswered_at_or_below_last)} at or below it never answered "
                f"(neither response nor RST_STREAM); TCP {'closed by the backend' if self.closed else 'still open'} "
                f"({self.elapsed:.1f}s)")


def _frames(buf: bytearray):
    """Pops complete frames (type, flags, stream id, payload) off the front of `buf`."""
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            return
        ftype, flags = buf[3], buf[4]
        sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = bytes(buf[9:9 + length])
        del buf[:9 + length]
        yield ftype, flags, sid, payload


def probe(port: int, path: str, *, concurrency: int = 16, max_requests: int = 3000,
          timeout: float = 30.0) -> ProbeResult:
    res = ProbeResult()
    started = time.monotonic()
    deadline = started + timeout
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"), (":path", path)]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    tap = bytearray()
    in_flight: set[int] = set()
    last_sid: int | None = None
    h2_alive = True

    def absorb(data: bytes) -> None:
        """The tap (every frame the backend sent, in order), then h2 (for flow control)."""
        nonlocal last_sid, h2_alive
        tap.extend(data)
        for ftype, flags, sid, payload in _frames(tap):
            if ftype in (DATA, HEADERS) and flags & END_STREAM and sid in in_flight:
                res.completed += 1
                in_flight.discard(sid)
                if last_sid is not None and sid > last_sid:
                    res.answered_above_last += 1
            elif ftype == GOAWAY:
                ls, code = struct.unpack(">II", payload[:8])
                ls &= 0x7FFFFFFF
                res.goaways.append((res.completed, ls, code_name(code)))
                if last_sid is None:
                    last_sid = ls
                    res.sent_above_last = sum(1 for s in in_flight if s > ls)
            elif ftype == RST_STREAM:
                res.resets.append((sid, code_name(struct.unpack(">I", payload[:4])[0])))
                in_flight.discard(sid)
        if h2_alive:
            try:
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        h2_alive = False
            except h2.exceptions.ProtocolError:
                h2_alive = False  # frames after the GOAWAY: the tap still sees them
            out = conn.data_to_send()
            if out:
                sock.sendall(out)

    try:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        while time.monotonic() < deadline:
            # Keep `concurrency` streams open until the backend says GOAWAY.
            while h2_alive and last_sid is None and len(in_flight) < concurrency and res.sent < max_requests:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                sock.sendall(conn.data_to_send())
                in_flight.add(sid)
                res.sent += 1
            if not in_flight and (res.sent >= max_requests or last_sid is not None):
                break
            sock.settimeout(max(0.05, min(2.0, deadline - time.monotonic())))
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                if last_sid is not None:
                    break  # nothing more is coming on a connection that is going away
                continue
            if not data:
                res.closed = True
                break
            absorb(data)
    except (BrokenPipeError, ConnectionResetError):
        # The backend closed while we were writing: read what it had sent before that.
        res.closed = True
        try:
            sock.settimeout(0.5)
            while data := sock.recv(1 << 16):
                h2_alive = False
                absorb(data)
        except OSError:
            pass
    finally:
        sock.close()
        if last_sid is not None:
            res.unanswered_at_or_below_last = sorted(s for s in in_flight if s <= last_sid)
        res.elapsed = time.monotonic() - started
    return res


def h2get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET over a fresh h2c connection: (status, body)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"),
                              (":path", path)], end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = None, bytearray()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"GET {path}: no complete response within {timeout}s")
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"GET {path}: connection closed before the response ended")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    assert status is not None
                    return status, bytes(body)
                elif isinstance(ev, h2.events.StreamReset):
                    raise ConnectionError(f"GET {path}: reset {code_name(ev.error_code)}")
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
