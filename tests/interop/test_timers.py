"""The worker's timer set is bounded by its connections.

Every packet a client sends moves its connection's idle deadline on. A timer heap with lazy
deletion gained an entry per move, dropped only when the old deadline came due (the idle
timeout later), so one client sending PINGs grew it by thousands of entries a second. Spooky
keeps exactly one entry per connection: `spooky_worker_timers` never exceeds the
connections, however many PINGs arrive.
"""

from __future__ import annotations

import asyncio

from h3client import h3_connect, run
from test_abuse import abuse, legit_round  # noqa: F401  (the module fixture, shared)

PINGS = 5_000


def test_a_ping_flood_does_not_grow_the_timer_set(abuse):  # noqa: F811
    async def go():
        async with h3_connect("127.0.0.1", abuse.port) as legit:
            async with h3_connect("127.0.0.1", abuse.port) as pinger:
                await legit_round(legit)
                rss_before = abuse.rss()
                peak = 0.0
                for i in range(PINGS):
                    # Each PING is answered (ACKed) before the next: every one moves the
                    # connection's deadline.
                    await asyncio.wait_for(pinger.ping(), 5)
                    if i % 500 == 0:
                        await legit_round(legit)
                        peak = max(peak, abuse.metric("spooky_worker_timers"))
                connections = abuse.metric("spooky_connections_active")
                peak = max(peak, abuse.metric("spooky_worker_timers"))
                growth = abuse.rss() - rss_before
        print(f"\nSUMMARY timers: {PINGS} PINGs on one connection: worker timers peak {peak:.0f} "
              f"({connections:.0f} connections open), RSS growth {growth / (1 << 20):.1f} MiB")
        assert connections >= 2
        assert peak <= connections, f"{peak} timer entries for {connections} connections"
        assert growth < 8 << 20, f"RSS grew {growth >> 20} MiB"

    run(go(), timeout=120)
