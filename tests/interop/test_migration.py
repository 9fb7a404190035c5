"""Connection migration with aioquic as the client (issue 12): one connection follows 100 NAT
rebindings (same CID, new port) and 100 deliberate migrations (new port and new CID), with a
request answered after every move; a spoofed migration to an address that never answers does
not move the connection and gets no more than anti-amplification allows.

quiche used to keep a path per client address until its destination CID was retired, in a
table of `active_connection_id_limit` (8) paths: the 8th move found the table full and every
packet from then on was dropped (vendor/quiche/PATCHES.md, patch 1).
"""

from __future__ import annotations

import asyncio
import socket

from conftest import spooky_metric
from h3client import H3Client, h3_connect, run

MOVES = 100
BODY = 64  # bytes per answer: /bytes/64 from spooky-backend


def _dual_stack_socket() -> socket.socket:
    """A UDP socket like the one aioquic's `connect` makes (IPv6, IPv4-mapped addresses)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0, 0, 0))
    return sock


async def _new_socket(client: H3Client) -> asyncio.DatagramTransport:
    """Gives the connection a new local UDP port (the old socket is closed): what a NAT
    rebinding looks like to the server. Returns the new transport."""
    loop = asyncio.get_running_loop()
    old = client._transport
    # `create_datagram_endpoint` calls `connection_made`, which makes the new socket the one
    # the protocol sends from.
    transport, _ = await loop.create_datagram_endpoint(lambda: client, sock=_dual_stack_socket())
    assert client._transport is transport
    old.close()
    return transport


async def _answered(client: H3Client, move: int, what: str) -> None:
    try:
        r = await client.get(f"/bytes/{BODY}", timeout=5)
    except (TimeoutError, ConnectionError) as e:
        raise AssertionError(f"{what} {move}: {e}") from None
    assert r.status == 200 and len(r.body) == BODY, f"{what} {move}: status {r.status}, {len(r.body)} bytes"


def _port(transport: asyncio.DatagramTransport) -> int:
    return transport.get_extra_info("sockname")[1]


def test_100_nat_rebindings(stack):
    """Same CID, new port, 100 times; every request answered."""
    before = spooky_metric(stack.admin_port, "spooky_connection_migrations_total")

    async def go() -> int:
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            await _answered(c, 0, "before any rebinding")
            cid = c._quic._peer_cid.cid
            port, ports = _port(c._transport), 0
            for move in range(1, MOVES + 1):
                old, port = port, _port(await _new_socket(c))
                assert port != old, f"rebinding {move}: still on port {port}"
                ports += 1
                await _answered(c, move, "rebinding")
                assert c._quic._peer_cid.cid == cid, "a rebinding keeps the CID"
            return ports

    ports = run(go(), timeout=120)
    assert ports == MOVES
    moved = spooky_metric(stack.admin_port, "spooky_connection_migrations_total") - before
    assert moved >= MOVES, f"Spooky counted {moved:.0f} migrations for {MOVES} rebindings"


def test_100_migrations_with_new_cids(stack):
    """New port and new CID, 100 times; every request answered; Spooky keeps issuing CIDs and
    its CID table does not grow with the moves."""
    before = spooky_metric(stack.admin_port, "spooky_connection_migrations_total")

    async def go() -> tuple[int, float, float]:
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            await _answered(c, 0, "before any migration")
            # Spooky's CID table with this connection's CIDs issued (8 and the client's
            # original DCID).
            cids_before = spooky_metric(stack.admin_port, "spooky_connection_ids")
            seen = {c._quic._peer_cid.cid}
            for move in range(1, MOVES + 1):
                old = c._quic._peer_cid.cid
                # Spooky's replacement for the CID retired last time may still be on its way
                # (NEW_CONNECTION_ID follows the RETIRE_CONNECTION_ID): a few round trips.
                for _ in range(5):
                    if c._quic._peer_cid_available:
                        break
                    await asyncio.wait_for(c.ping(), 2)
                c._quic.change_connection_id()
                assert c._quic._peer_cid.cid != old, f"migration {move}: no spare CID from Spooky left"
                seen.add(c._quic._peer_cid.cid)
                await _new_socket(c)
                await _answered(c, move, "migration")
            # While the connection is still open: Spooky's CID table.
            return len(seen), cids_before, spooky_metric(stack.admin_port, "spooky_connection_ids")

    seen, cids_before, cids_during = run(go(), timeout=120)
    assert seen == MOVES + 1, f"only {seen} distinct CIDs used"
    moved = spooky_metric(stack.admin_port, "spooky_connection_migrations_total") - before
    assert moved >= MOVES, f"Spooky counted {moved:.0f} migrations for {MOVES} migrations"
    # One connection holds at most active_connection_id_limit (8) CIDs of Spooky's at a time;
    # the 100 it retired must have left the table.
    assert cids_before > 0, "no spooky_connection_ids gauge"
    assert cids_during <= cids_before, f"CID table grew from {cids_before:.0f} to {cids_during:.0f}"


class _Spoofer(asyncio.DatagramProtocol):
    """A second socket that sends copies of the client's packets and never answers what comes
    back (an off-path attacker's spoofed address that does not reply): counts bytes both ways."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def datagram_received(self, data: bytes, addr) -> None:
        self.received += len(data)


def test_spoofed_migration_does_not_move_the_connection(stack):
    """Before each of 20 requests, a copy of the request's first datagram arrives first from
    another address (a new one each time) that never answers the PATH_CHALLENGE. The connection
    stays on its own address and is served throughout, the spoofed addresses never get more than
    3x what they sent (RFC 9000 §8.1, §9.3), and the failed paths do not keep the client from
    rebinding 10 times afterwards."""
    rounds = 20

    async def go() -> tuple[_Spoofer, int]:
        loop = asyncio.get_running_loop()
        async with h3_connect("127.0.0.1", stack.spooky_port) as c:
            await _answered(c, 0, "before spoofing")
            spoofer = _Spoofer()
            spoofers = []
            real = c._transport
            served_here = {"n": 0}
            orig_received = c.datagram_received

            def counting(data, addr):
                served_here["n"] += 1
                orig_received(data, addr)

            c.datagram_received = counting  # the real socket's protocol is `c`
            try:
                for move in range(1, rounds + 1):
                    # A new spoofed address each round: more than the 8 paths quiche's table
                    # holds, so failed paths must be released.
                    spoof_t, _ = await loop.create_datagram_endpoint(lambda: spoofer, sock=_dual_stack_socket())
                    spoofers.append(spoof_t)
                    spoofing = {"on": True}
                    real_sendto = real.sendto

                    def sendto(data, addr=None, _real=real_sendto, _on=spoofing, _spoof=spoof_t):
                        if _on["on"]:
                            # The first datagram of the request: its copy is sent first, so
                            # it wins the race and Spooky drops the original as a duplicate.
                            _on["on"] = False
                            _spoof.sendto(data, addr)
                            spoofer.sent += len(data)
                        _real(data, addr)

                    real.sendto = sendto
                    r = await c.get(f"/bytes/{BODY}", timeout=5)
                    assert not spoofing["on"], "no datagram was copied"
                    # Later packets from the real address move the connection back at once
                    # (that path is validated); what went to the spoofed one is resent.
                    assert r.status == 200 and len(r.body) == BODY, f"round {move}: {r.status}"
                    await _answered(c, move, "after spoofing")
                    real.sendto = real_sendto
                # The spoofed paths that failed must not keep the client from moving.
                for move in range(1, 11):
                    real = await _new_socket(c)
                    await _answered(c, move, "rebinding after spoofing")
            finally:
                for t in spoofers:
                    t.close()
            return spoofer, served_here["n"]

    spoofer, served = run(go(), timeout=120)
    assert spoofer.sent > 0 and served > 0
    # Spooky answered the spoofed address (a PATH_CHALLENGE at least): the spoof was taken as a
    # migration, so the test exercised the path.
    assert spoofer.received > 0, f"nothing came to the spoofed addresses ({spoofer.sent} bytes sent)"
    assert spoofer.received <= 3 * spoofer.sent, (
        f"spoofed address got {spoofer.received} bytes for {spoofer.sent} sent (amplification)"
    )
