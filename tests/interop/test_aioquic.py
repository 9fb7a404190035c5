"""HTTP/3 interop: an aioquic client talks to Spooky, which proxies to HTTP/2 backends
(spooky-backend and nginx). Run: `.venv/bin/python -m pytest tests/interop -q`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from h3client import H3Client, h3_connect, run

H3_MESSAGE_ERROR = 0x10E
PERIOD = 65_521
MASK64 = (1 << 64) - 1


def _pattern_table() -> bytes:
    """One period of spooky-backend's byte pattern (src/tools/pattern.rs), xorshift64."""
    state = 0x9E3779B97F4A7C15
    out = bytearray(PERIOD)
    for i in range(PERIOD):
        state ^= (state << 13) & MASK64
        state ^= state >> 7
        state ^= (state << 17) & MASK64
        out[i] = (state >> 24) & 0xFF
    return bytes(out)


_TABLE = _pattern_table()


def pattern(n: int) -> bytes:
    """The first n bytes the backend serves for /bytes/n."""
    reps = n // PERIOD + 1
    return (_TABLE * reps)[:n]


def test_pattern_replica_is_not_trivial():
    """Guard for the replica itself: it must vary and have the right period."""
    assert len(set(_TABLE)) > 200
    assert pattern(PERIOD + 5)[PERIOD:] == _TABLE[:5]


def test_get_1mib_pattern(stack):
    """GET /bytes/1048576: 200, exact length, sha256 of the expected pattern."""
    n = 1 << 20

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await c.get(f"/bytes/{n}", timeout=20)

    r = run(go())
    assert r.reset_code is None, f"stream reset 0x{r.reset_code:x}"
    assert r.status == 200
    assert r.header("content-length") == str(n)
    assert r.header("x-backend") == stack.backend_name
    assert len(r.body) == n
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(pattern(n)).hexdigest()


def test_echo_300k(stack):
    """POST /echo with 300 KiB random data: same bytes back, x-backend and via set."""
    data = os.urandom(300 * 1024)

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await c.request(
                "POST", "/echo", body=data,
                headers=[(b"content-type", b"application/octet-stream")], timeout=20,
            )

    r = run(go())
    assert r.reset_code is None, f"stream reset 0x{r.reset_code:x}"
    assert r.status == 200
    assert r.header("x-backend") == stack.backend_name
    assert any("2 spooky" in v for v in r.header_all("via")), r.headers
    assert r.header("content-type") == "application/octet-stream"
    assert len(r.body) == len(data)
    assert bytes(r.body) == data


def test_request_and_response_trailers(stack):
    """Request trailers reach the backend (echoed back); backend trailers reach the client."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            echo = await c.request(
                "POST", "/echo", body=b"hello", trailers=[(b"x-checksum", b"abc")]
            )
            tr = await c.get("/trailers")
            return echo, tr

    echo, tr = run(go())
    assert echo.status == 200
    assert bytes(echo.body) == b"hello"
    assert echo.trailers is not None, f"no response trailers; headers={echo.headers}"
    assert echo.trailer("x-checksum") == "abc"

    assert tr.status == 200
    assert bytes(tr.body) == b"ok"
    assert tr.trailers is not None, f"no response trailers; headers={tr.headers}"
    assert tr.trailer("grpc-status") == "0"
    assert tr.trailer("x-trailer") == "yes"


def test_forwarding_headers(stack):
    """x-forwarded-for is overwritten with the client IP; x-forwarded-proto and via are added."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await c.get(
                "/headers?q=1", headers=[(b"x-forwarded-for", b"6.6.6.6"), (b"x-custom", b"kept")]
            )

    r = run(go())
    assert r.status == 200
    lines = r.body.decode().splitlines()
    assert lines[0] == ":method: GET"
    assert ":path: /headers?q=1" in lines
    assert "x-forwarded-for: 127.0.0.1" in lines, lines
    assert not any("6.6.6.6" in line for line in lines), lines
    assert "x-forwarded-proto: https" in lines, lines
    assert any(line.startswith("via:") and "3 spooky" in line for line in lines), lines
    assert "x-custom: kept" in lines, lines


def test_nginx_backend(stack):
    """nginx (h2c) as upstream: 1 MiB static file, a small file, and a 418 from `return`."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await asyncio.gather(
                c.get("/nginx/file.bin", timeout=20),
                c.get("/nginx/hello.txt"),
                c.get("/nginx/teapot"),
            )

    big, hello, teapot = run(go())
    assert big.status == 200
    assert (big.header("server") or "").startswith("nginx"), big.headers
    assert len(big.body) == len(stack.nginx_file)
    assert hashlib.sha256(big.body).digest() == hashlib.sha256(stack.nginx_file).digest()

    assert hello.status == 200
    assert bytes(hello.body) == stack.nginx_hello
    assert hello.header("content-type") == "text/plain"

    assert teapot.status == 418
    assert bytes(teapot.body) == b"short and stout\n"
    assert any("2 spooky" in v for v in teapot.header_all("via")), teapot.headers


def _check_bytes(r, n: int) -> None:
    assert r.reset_code is None, f"stream {r.stream_id} reset 0x{r.reset_code:x}"
    assert r.status == 200, f"stream {r.stream_id}: status {r.status}"
    assert bytes(r.body) == pattern(n), f"stream {r.stream_id}: {len(r.body)} bytes"


def test_concurrent_streams_one_connection(stack):
    """50 concurrent GET /bytes/10000 multiplexed on one connection."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await asyncio.gather(*(c.get("/bytes/10000", timeout=20) for _ in range(50)))

    responses = run(go())
    assert len(responses) == 50
    assert len({r.stream_id for r in responses}) == 50
    for r in responses:
        _check_bytes(r, 10000)


def test_parallel_connections(stack):
    """5 connections in parallel, 20 concurrent requests each."""

    async def one_connection(i: int):
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await asyncio.gather(
                *(c.get(f"/bytes/{10000 + i}", timeout=20) for _ in range(20))
            )

    async def go():
        return await asyncio.gather(*(one_connection(i) for i in range(5)))

    results = run(go(), timeout=45)
    assert len(results) == 5
    for i, responses in enumerate(results):
        assert len(responses) == 20
        for r in responses:
            _check_bytes(r, 10000 + i)


def test_malformed_request_resets_stream(stack):
    """An upper-case header name resets that stream with H3_MESSAGE_ERROR; the connection lives on.

    aioquic's H3Connection does not validate headers it sends, so the malformed field goes out
    as-is (QPACK preserves case).
    """

    async def go(c: H3Client):
        bad = await c.request(
            "GET", "/headers",
            raw_headers=[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", c.authority.encode()),
                (b":path", b"/headers"),
                (b"X-Upper", b"1"),
            ],
        )
        good = await c.get("/")
        return bad, good, c.terminated

    async def main():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await go(c)

    bad, good, terminated = run(main())
    assert bad.status is None, f"malformed request got a response: {bad.status} {bytes(bad.body)!r}"
    assert bad.reset_code == H3_MESSAGE_ERROR, f"reset code {bad.reset_code!r}"
    assert terminated is None
    assert good.status == 200
    assert bytes(good.body) == f"hello from {stack.backend_name}\n".encode()


def test_routing_by_host_and_unknown_route(stack):
    """Host-based routes: only.example reaches demo; other.example matches no route → 404."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            only = await c.get("/x", authority="only.example")
            other = await c.get("/x", authority="other.example:443")
            nginx_any_host = await c.get("/nginx/hello.txt", authority="other.example")
            return only, other, nginx_any_host

    only, other, nginx_any_host = run(go())
    assert only.status == 200
    assert only.header("x-backend") == stack.backend_name
    assert bytes(only.body) == f"hello from {stack.backend_name}\n".encode()

    assert other.status == 404, (other.status, bytes(other.body))
    assert other.header("x-backend") is None, "404 must come from Spooky, not a backend"

    assert nginx_any_host.status == 200
    assert bytes(nginx_any_host.body) == stack.nginx_hello


def test_dead_backend_502(stack):
    """An upstream whose port is closed: Spooky answers 502 itself."""

    async def go():
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            return await c.get("/dead/x", timeout=15)

    r = run(go())
    assert r.status == 502, (r.status, bytes(r.body), r.reset_code)
    assert r.header("x-backend") is None
    assert bytes(r.body).startswith(b"502"), bytes(r.body)


def test_spooky_still_alive(stack):
    """After all of the above, every process is still running."""
    assert stack.spooky.alive(), stack.spooky.tail()
    assert stack.backend.alive(), stack.backend.tail()
    assert stack.nginx.alive(), stack.nginx.tail()
