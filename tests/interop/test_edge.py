"""The QUIC edge with an independent client stack (aioquic): Retry, 0-RTT with replay safety,
and a client switching to one of the spare connection IDs Spooky issued.

Each test starts its own Spooky (with the edge settings it needs) in front of the session's
spooky-backend.
"""

from __future__ import annotations

import asyncio

import pytest
from aioquic.asyncio import connect

from conftest import spooky_metric, start_spooky
from h3client import H3Client, client_configuration, run


@pytest.fixture
def edge_spooky(stack, tmp_path):
    """A factory: Spooky with `quic: {settings}` in front of the session's backend; returns
    (UDP port, admin port)."""
    procs = []

    def start(settings: str) -> tuple[int, int]:
        cfg = tmp_path / f"spooky-{len(procs)}.yaml"
        cfg.write_text(
            f"listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nworkers: 2\n"
            f"tls: {{ self_signed: [localhost] }}\nquic: {{ {settings} }}\n"
            f"upstreams:\n  demo: {{ backends: [ {{ address: 127.0.0.1:{stack.backend_port} }} ] }}\n"
            f"routes: [ {{ upstream: demo }} ]\n"
        )
        p, port, admin = start_spooky(cfg, tmp_path / f"spooky-{len(procs)}.log", "spooky-edge")
        procs.append(p)
        return port, admin

    yield start
    for p in procs:
        p.stop()


def test_aioquic_follows_a_retry(edge_spooky):
    port, admin = edge_spooky("retry: always")

    async def go():
        async with connect("127.0.0.1", port, configuration=client_configuration(),
                           create_protocol=H3Client) as c:
            r = await c.get("/bytes/1000")
            assert (r.status, len(r.body)) == (200, 1000)

    run(go())
    assert spooky_metric(admin, "spooky_retries_sent_total") == 1
    assert spooky_metric(admin, "spooky_connections_accepted_total") == 1


def test_aioquic_0rtt_get_is_forwarded_marked_and_post_gets_425(edge_spooky):
    port, admin = edge_spooky("early_data: true")
    tickets = []

    async def first():
        async with connect("127.0.0.1", port, configuration=client_configuration(),
                           create_protocol=H3Client, session_ticket_handler=tickets.append) as c:
            r = await c.get("/bytes/10")
            assert r.status == 200
            # The ticket arrives after the handshake; give it a moment.
            for _ in range(50):
                if tickets:
                    break
                await asyncio.sleep(0.02)

    async def early():
        config = client_configuration()
        config.session_ticket = tickets[-1]
        async with connect("127.0.0.1", port, configuration=config, create_protocol=H3Client,
                           wait_connected=False) as c:
            # Sent before the handshake completes: these ride in 0-RTT packets.
            get, post = await asyncio.gather(
                c.get("/headers"), c.request("POST", "/echo", body=b"replayable"))
            return get, post

    run(first())
    assert tickets and tickets[-1].max_early_data_size, "Spooky's ticket allows 0-RTT"
    get, post = run(early())
    assert get.status == 200
    assert b"early-data: 1" in get.body, get.body
    assert post.status == 425
    assert spooky_metric(admin, "spooky_early_data_requests_total") == 2


def test_aioquic_moves_to_a_spare_connection_id(edge_spooky):
    port, admin = edge_spooky("")

    async def go():
        async with connect("127.0.0.1", port, configuration=client_configuration(),
                           create_protocol=H3Client) as c:
            r = await c.get("/bytes/100")
            assert r.status == 200
            # Spooky issued spare CIDs after the handshake; switch to one (RFC 9000 §5.1.2).
            c.change_connection_id()
            for i in range(5):
                r = await c.get(f"/bytes/{1000 + i}")
                assert (r.status, len(r.body)) == (200, 1000 + i)

    run(go())
    # The new CID names the same worker: the BPF program steered every packet to it.
    assert spooky_metric(admin, "spooky_packets_forwarded_total") == 0
    assert spooky_metric(admin, "spooky_packets_dropped_total") == 0
