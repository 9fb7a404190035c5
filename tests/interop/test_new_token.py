"""NEW_TOKEN (RFC 9000 §8.1.3, §19.7): after a handshake Spooky sends the client a token, so the
client's next connection is address-validated and skips the Retry even with `retry: always`; a
token Spooky cannot open counts as none (a Retry, the connection still served).
"""

from __future__ import annotations

import asyncio

from aioquic.asyncio import connect

from conftest import spooky_metric
from h3client import H3Client, client_configuration, run
from test_edge import edge_spooky  # noqa: F401  (the fixture)


def test_a_returning_client_skips_the_retry_with_its_new_token(edge_spooky):  # noqa: F811
    port, admin = edge_spooky("retry: always")
    tokens: list[bytes] = []

    async def get(token: bytes = b"") -> None:
        config = client_configuration()
        config.token = token
        async with connect("127.0.0.1", port, configuration=config, create_protocol=H3Client,
                           token_handler=tokens.append) as c:
            r = await c.get("/bytes/1000")
            assert (r.status, len(r.body)) == (200, 1000)
            # The NEW_TOKEN is queued once the handshake completed; it may trail the response.
            for _ in range(100):
                if tokens:
                    break
                await asyncio.sleep(0.02)

    # First connection: a Retry, then a NEW_TOKEN.
    run(get())
    assert spooky_metric(admin, "spooky_retries_sent_total") == 1
    assert spooky_metric(admin, "spooky_new_tokens_sent_total") == 1
    assert len(tokens) == 1 and tokens[0], "aioquic received the NEW_TOKEN"
    token = tokens[0]

    # Second connection with the token (from a new port): no Retry, served.
    run(get(token))
    assert spooky_metric(admin, "spooky_retries_sent_total") == 1, "the NEW_TOKEN skipped the Retry"
    assert spooky_metric(admin, "spooky_new_tokens_accepted_total") == 1
    assert spooky_metric(admin, "spooky_connections_accepted_total") == 2

    # A garbled token counts as none: a Retry, and the connection is still served.
    garbled = bytearray(token)
    garbled[len(garbled) // 2] ^= 0xFF
    run(get(bytes(garbled)))
    assert spooky_metric(admin, "spooky_retries_sent_total") == 2
    assert spooky_metric(admin, "spooky_new_tokens_accepted_total") == 1
    assert spooky_metric(admin, "spooky_connections_accepted_total") == 3
