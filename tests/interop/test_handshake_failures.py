"""Handshakes that fail are visible: counted in spooky_handshake_failures_total{cause} and
logged at info (rate-limited), while legitimate clients are still served.

- aioquic verifying the certificate (CERT_REQUIRED, certifi's CAs) rejects Spooky's
  self-signed one with TLS alert bad_certificate (42): CRYPTO_ERROR 0x12a (aioquic's tls.py
  raises AlertBadCertificate for a failed chain or name check);
- a client offering only an ALPN Spooky does not speak: Spooky's TLS refuses the ClientHello
  with no_application_protocol (120), `local_no_application_protocol`;
- a client that sends its first Initial and goes silent: `idle_timeout`;
- a burst of 200 failing handshakes logs at most the rate limit's worth of lines, and the
  summary lines account for every one left out.

Each fixture starts its own Spooky (one worker, so the per-worker log limit is the limit) in
front of the session's spooky-backend. Run:
`.venv/bin/python -m pytest tests/interop/test_handshake_failures.py -q`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time

import pytest
from aioquic.asyncio import connect
from aioquic.quic.connection import QuicConnection

from conftest import Proc, spooky_metric, start_backend, start_spooky
from h3client import H3Client, client_configuration, h3_connect, run

METRIC = "spooky_handshake_failures_total"
# src/edge/handshake.rs: LOG_BURST, LOG_PER_SECOND.
LOG_BURST = 10
LOG_PER_SECOND = 1.0
IDLE_S = 2
FAILED_LINE = re.compile(r"handshake failed peer=(\S+) cause=(\S+) code=(\S+) reason=(\".*?\") sni=(\".*?\")$")
SUPPRESSED_LINE = re.compile(r"suppressed (\d+) handshake-failure lines")


class Edge:
    def __init__(self, proc: Proc, port: int, admin: int):
        self.proc, self.port, self.admin = proc, port, admin

    def failures(self, cause: str) -> float:
        return spooky_metric(self.admin, METRIC, f'cause="{cause}"')

    def total_failures(self) -> float:
        return spooky_metric(self.admin, METRIC)

    def failed_lines(self) -> list[re.Match]:
        return [m for line in self.proc.output().splitlines() if (m := FAILED_LINE.search(line))]

    def suppressed(self) -> int:
        return sum(int(m.group(1)) for m in SUPPRESSED_LINE.finditer(self.proc.output()))

    def wait(self, what, limit: float = 15.0):
        """Polls `what()` until it is truthy or `limit` seconds pass; returns its last value."""
        deadline = time.monotonic() + limit
        while True:
            v = what()
            if v or time.monotonic() >= deadline:
                return v
            time.sleep(0.1)


@pytest.fixture(scope="module")
def backend_port(tmp_path_factory):
    proc, port = start_backend("handshakes", tmp_path_factory.mktemp("handshakes") / "backend.log")
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture
def edge(backend_port, tmp_path):
    cfg = tmp_path / "spooky.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nworkers: 1\n"
        f"tls: {{ self_signed: [localhost] }}\ntimeouts: {{ idle: {IDLE_S}s }}\nlog: {{ level: info }}\n"
        f"upstreams:\n  demo: {{ backends: [ {{ address: 127.0.0.1:{backend_port} }} ] }}\n"
        f"routes: [ {{ upstream: demo }} ]\n"
    )
    proc, port, admin = start_spooky(cfg, tmp_path / "spooky.log", "spooky-handshakes")
    try:
        yield Edge(proc, port, admin)
    finally:
        proc.stop()


def verifying_configuration():
    """A client that checks the certificate against certifi's CAs (no cafile): Spooky's
    self-signed one cannot pass."""
    conf = client_configuration()
    conf.verify_mode = ssl.CERT_REQUIRED
    return conf


async def attempt(port: int, conf, limit: float = 10.0) -> str:
    """One connection attempt that must fail; returns why, as the client saw it."""
    try:
        async with connect("127.0.0.1", port, configuration=conf, create_protocol=H3Client,
                           wait_connected=True) as _:
            pass
    except ConnectionError as e:
        return str(e)
    raise AssertionError("the handshake succeeded")


def bounded(coro, limit: float = 10.0):
    return asyncio.wait_for(coro, limit)


def served(port: int) -> None:
    async def go():
        async with h3_connect("127.0.0.1", port) as c:
            return await c.get("/bytes/1000")

    r = run(go())
    assert (r.status, len(r.body)) == (200, 1000)


def test_a_client_rejecting_the_certificate_is_counted_and_logged(edge):
    attempts = 3
    before_accepted = spooky_metric(edge.admin, "spooky_connections_accepted_total")
    assert edge.failures("bad_certificate") == 0  # pre-registered: a dashboard sees the zero

    async def go():
        for _ in range(attempts):
            await bounded(attempt(edge.port, verifying_configuration()))

    run(go())
    edge.wait(lambda: edge.failures("bad_certificate") >= attempts)
    assert edge.failures("bad_certificate") == attempts
    assert edge.total_failures() == attempts
    assert spooky_metric(edge.admin, "spooky_connections_accepted_total") - before_accepted == attempts

    edge.wait(lambda: len(edge.failed_lines()) >= attempts)
    lines = edge.failed_lines()
    assert len(lines) == attempts, lines
    for m in lines:
        peer, cause, code, reason, sni = m.groups()
        assert peer.startswith("127.0.0.1:")
        assert (cause, code, sni) == ("bad_certificate", "0x12a", '"localhost"')
        assert reason != '""'  # aioquic says why (e.g. "self-signed certificate")

    # Legitimate clients are unaffected, and a completed handshake is no failure.
    served(edge.port)
    assert edge.total_failures() == attempts


def test_a_client_offering_no_alpn_spooky_speaks_is_spooky_s_refusal(edge):
    conf = client_configuration()
    conf.alpn_protocols = ["spooky-test-nope"]

    async def go():
        for _ in range(2):
            await bounded(attempt(edge.port, conf))

    run(go())
    cause = "local_no_application_protocol"
    edge.wait(lambda: edge.failures(cause) >= 2)
    assert edge.failures(cause) == 2
    assert edge.total_failures() == 2
    edge.wait(lambda: len(edge.failed_lines()) >= 2)
    lines = edge.failed_lines()
    assert [(m.group(2), m.group(3)) for m in lines] == [(cause, "0x178")] * 2
    served(edge.port)


def test_a_client_that_goes_silent_after_its_initial_times_out(edge):
    conf = client_configuration()
    quic = QuicConnection(configuration=conf)
    quic.connect(("127.0.0.1", edge.port), now=time.time())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data, _ in quic.datagrams_to_send(now=time.time()):
            s.sendto(data, ("127.0.0.1", edge.port))
        # Spooky answers (and retries) into this socket; nobody reads it.
        edge.wait(lambda: edge.failures("idle_timeout") >= 1, limit=IDLE_S * 5)
    assert edge.failures("idle_timeout") == 1
    assert edge.total_failures() == 1
    lines = edge.failed_lines()
    assert [(m.group(2), m.group(3), m.group(5)) for m in lines] == [("idle_timeout", "-", '"localhost"')]


def test_a_flood_of_failing_handshakes_logs_at_most_the_limit_and_accounts_for_the_rest(edge):
    flood = 200

    async def go():
        sem = asyncio.Semaphore(25)

        async def one():
            async with sem:
                await bounded(attempt(edge.port, verifying_configuration()), 30)

        await asyncio.gather(*(one() for _ in range(flood)))

    start = time.monotonic()
    run(go(), timeout=240)
    edge.wait(lambda: edge.failures("bad_certificate") >= flood, limit=30)
    assert edge.failures("bad_certificate") == flood
    elapsed = time.monotonic() - start
    logged = len(edge.failed_lines())
    # The bucket starts full at the first failure and refills at LOG_PER_SECOND: within
    # `elapsed` no more than this can pass, however fast or slow the machine is.
    assert LOG_BURST <= logged <= LOG_BURST + LOG_PER_SECOND * elapsed + 1, (logged, elapsed)
    assert logged < flood
    assert edge.proc.output().count("too many handshake failures to log each") >= 1

    # The count of left-out lines comes with the next line logged: one more failure once the
    # bucket has a token again.
    time.sleep(1.5 / LOG_PER_SECOND)
    run(bounded(attempt(edge.port, verifying_configuration())))
    edge.wait(lambda: edge.failures("bad_certificate") >= flood + 1)
    assert edge.failures("bad_certificate") == flood + 1
    edge.wait(lambda: len(edge.failed_lines()) + edge.suppressed() >= flood + 1)
    assert len(edge.failed_lines()) + edge.suppressed() == flood + 1, (len(edge.failed_lines()), edge.suppressed())
    served(edge.port)
