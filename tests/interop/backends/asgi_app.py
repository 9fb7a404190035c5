"""A small ASGI app for the interop suite, served by hypercorn at its default settings.

- `GET /bytes/N`: N bytes of spooky-backend's deterministic pattern (xorshift64, period
  65,521: the same bytes as `src/tools/pattern.rs` and `test_aioquic.pattern`).
- `POST /echo`: the request body back, with `x-body-sha256` and `x-body-length` of what was
  received. The body is read to its end first (a header must precede the body, and the hash
  is only known at the end), then sent back in 64 KiB chunks.
- `GET /stats`: JSON counts of this process: requests, POST bodies and bytes received, and
  connections (distinct client ports seen).

Run: `hypercorn --bind 127.0.0.1:PORT asgi_app:app` from this directory.
"""

from __future__ import annotations

import hashlib
import json

PERIOD = 65_521
MASK64 = (1 << 64) - 1
CHUNK = 64 * 1024


def _table() -> bytes:
    state = 0x9E3779B97F4A7C15
    out = bytearray(PERIOD)
    for i in range(PERIOD):
        state ^= (state << 13) & MASK64
        state ^= state >> 7
        state ^= (state << 17) & MASK64
        out[i] = (state >> 24) & 0xFF
    return bytes(out)


# Enough periods that any slice of up to CHUNK bytes at any phase is one slice.
_TABLE = _table()
_WIDE = _TABLE * (CHUNK // PERIOD + 2)

STATS = {"requests": 0, "posts": 0, "post_bytes": 0, "connections": 0}
_CLIENTS: set = set()


async def _send_pattern(send, n: int) -> None:
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(n).encode())],
    })
    off = 0
    while True:
        k = min(CHUNK, n - off)
        phase = off % PERIOD
        await send({"type": "http.response.body", "body": _WIDE[phase:phase + k], "more_body": off + k < n})
        off += k
        if off >= n:
            return


async def _echo(receive, send) -> None:
    parts = []
    h = hashlib.sha256()
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        chunk = msg.get("body", b"")
        if chunk:
            parts.append(chunk)
            h.update(chunk)
            total += len(chunk)
        if not msg.get("more_body", False):
            break
    STATS["posts"] += 1
    STATS["post_bytes"] += total
    body = b"".join(parts)
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(total).encode()),
            (b"x-body-sha256", h.hexdigest().encode()),
            (b"x-body-length", str(total).encode()),
        ],
    })
    for off in range(0, total, CHUNK):
        await send({"type": "http.response.body", "body": body[off:off + CHUNK], "more_body": off + CHUNK < total})
    if total == 0:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _plain(send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    STATS["requests"] += 1
    client = tuple(scope.get("client") or ())
    if client not in _CLIENTS:
        _CLIENTS.add(client)
        STATS["connections"] = len(_CLIENTS)
    method, path = scope["method"], scope["path"]
    if method == "GET" and path.startswith("/bytes/") and path[7:].isdigit():
        return await _send_pattern(send, int(path[7:]))
    if method == "POST" and path == "/echo":
        return await _echo(receive, send)
    if method == "GET" and path == "/stats":
        return await _plain(send, 200, json.dumps(STATS).encode())
    return await _plain(send, 404, b"not found\n")
