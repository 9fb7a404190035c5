"""Requests a backend did not process must be replayed by Spooky, transparently and exactly
once; requests it cannot replay must fail cleanly, never reach the backend as a partial or
second copy.

The backend is Node's own `http2` (tests/interop/backends/h2_faults.js, not Spooky's backend),
misbehaving in RFC-legal ways chosen by `--mode`:
- refuse-first-post: RST_STREAM(REFUSED_STREAM) on each POST's first attempt, before reading
  any of its body (RFC 9113 §8.7: "the request has not been processed").
- goaway-mid-upload: on each POST's first attempt, after K bytes of its body, GOAWAY(NO_ERROR,
  last_stream_id below that stream) and no more reading: the stream is unprocessed (§6.8).
  At HTTP/2's default 64 KiB window Spooky can have sent at most 64 KiB of it, which a 64 KiB
  replay buffer still holds; with a 1 MiB window and K = 200 KiB it cannot be replayed.
- goaway-after: GOAWAY(NO_ERROR, last_stream_id) after N streams of a connection while more
  are in flight, the streams above it ignored, as nginx does at keepalive_requests.

The backend records every body it saw (id, bytes received, sha256, whether it ended) on a
stats port the test reads directly, so "received exactly once, byte-exact" is checked where
it matters: at the backend. Run:
`.venv/bin/python -m pytest tests/interop/test_upstream_replay.py -q -p no:cacheprovider`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Proc, spooky_metric, start_spooky, watched
from h3client import h3_connect, run
from h3load import run_load
from test_aioquic import PERIOD, pattern

HERE = Path(__file__).resolve().parent
KIB, MIB = 1024, 1 << 20
_WIDE = pattern(MIB + PERIOD)


@dataclass
class Faulty:
    """h2_faults.js in one mode and the Spooky (2 workers, stock upstream settings) in front."""

    backend: Proc
    stats_port: int
    spooky: Proc
    port: int
    admin: int

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats", timeout=5) as r:
            return json.loads(r.read())

    def bodies(self, rid: str) -> list[dict]:
        """What the backend saw of request `rid`: one record per stream it arrived on."""
        return [b for b in self.stats()["bodies"] if b["id"] == rid]

    def metric(self, name: str, label: str = "") -> float:
        return spooky_metric(self.admin, name, label)


@contextlib.contextmanager
def faulty(tmp: Path, *args: str):
    argv = ["node", str(HERE / "backends" / "h2_faults.js"), *args]
    backend = Proc("h2-faults", argv, tmp / "h2_faults.log", ready_re=r"listening on 127\.0\.0\.1:(\d+) stats=(\d+)")
    try:
        m = backend.wait_ready()
        cfg = tmp / "spooky.yaml"
        # Stock upstream settings (retries, pool, windows); a short request timeout so that a
        # request stuck on a backend that waits for a body fails within the test's bounds.
        cfg.write_text(f"""\
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
workers: 2
tls: {{ self_signed: [localhost] }}
timeouts: {{ request: 5s }}
upstreams:
  faulty: {{ backends: [{{ address: "127.0.0.1:{m.group(1)}" }}] }}
routes: [{{ upstream: faulty }}]
""")
        spooky, port, admin = start_spooky(cfg, tmp / "spooky.log")
        try:
            with watched(spooky, backend):
                yield Faulty(backend, int(m.group(2)), spooky, port, admin)
        finally:
            spooky.stop()
    finally:
        backend.stop()


def body_of(size: int, salt: int) -> bytes:
    """`size` pattern bytes from an offset of its own, so no two test bodies are alike."""
    off = (salt * 7919) % PERIOD
    return _WIDE[off:off + size]


async def post(c, rid: str, body: bytes, content_length: bool, timeout: float = 20.0):
    headers = [(b"content-type", b"application/octet-stream")]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    return await c.request("POST", f"/echo?id={rid}", body=body, headers=headers, timeout=timeout)


async def warm_up(c) -> None:
    """A GET just before the upload, on the same worker: the upload then never is stream 1 of a
    backend connection, which h2_faults.js cannot declare unprocessed (see its header)."""
    r = await c.get("/bytes/10")
    assert r.status == 200 and bytes(r.body) == pattern(10), (r.status, bytes(r.body[:100]))


def outcome(r, body: bytes) -> str:
    """What the client got, in a few words."""
    if r.reset_code is not None:
        return f"stream reset 0x{r.reset_code:x} (status {r.status})"
    if r.status != 200:
        return f"{r.status} {bytes(r.body[:100])!r}"
    same = bytes(r.body) == body
    return (f"200, echo {'byte-exact' if same else f'WRONG ({len(r.body)} bytes)'}, backend says it got "
            f"{r.header('x-body-length')} bytes {'(right sha256)' if r.header('x-body-sha256') == hashlib.sha256(body).hexdigest() else '(WRONG sha256)'}")


def seen(records: list[dict], body: bytes) -> dict:
    """The backend's records of one request, classified."""
    want = hashlib.sha256(body).hexdigest()
    ended = [b for b in records if b["ended"]]
    return {
        "streams": len(records),
        "complete_exact": sum(1 for b in ended if b["sha256"] == want and b["received"] == len(body)),
        "complete_wrong": [(b["received"], b["outcome"]) for b in ended if b["sha256"] != want or b["received"] != len(body)],
        # (bytes received, what happened, RST_STREAM code) of the streams whose body never ended
        "unfinished": [(b["received"], b["outcome"], b.get("rst_code")) for b in records if not b["ended"]],
    }


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    with faulty(tmp_path_factory.mktemp("refuse"), "--mode", "refuse-first-post") as f:
        yield f


SIZES = [KIB, 60 * KIB, MIB]


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "no-content-length"])
@pytest.mark.parametrize("size", SIZES, ids=["1KiB", "60KiB", "1MiB"])
def test_refused_post_is_replayed_exactly_once(refusing, size, content_length):
    """The first attempt is refused before the backend read a byte of it, so Spooky may and
    must send the request again: the client gets 200 and its exact body back, and the backend
    completed exactly one copy, byte-exact (no truncated or doubled second copy). At default
    windows at most 64 KiB went out before the refusal, so all sizes fit a 64 KiB replay buffer."""
    rid = uuid.uuid4().hex
    body = body_of(size, int(rid[:4], 16))
    failures = refusing.metric("spooky_upstream_failures_total")

    async def go():
        async with h3_connect("127.0.0.1", refusing.port) as c:
            return await post(c, rid, body, content_length)

    r = run(go(), timeout=40)
    s = seen(refusing.bodies(rid), body)
    failed = refusing.metric("spooky_upstream_failures_total") - failures
    detail = (f"POST {size} B ({'with' if content_length else 'without'} content-length), refused once: client got "
              f"{outcome(r, body)}; backend saw {s}; spooky_upstream_failures_total +{failed:.0f}")
    print(f"\nSUMMARY {detail}")
    assert r.reset_code is None and r.status == 200, detail
    assert bytes(r.body) == body and r.header("x-body-sha256") == hashlib.sha256(body).hexdigest(), detail
    assert s["complete_exact"] == 1 and not s["complete_wrong"], detail
    assert [o for _, o, _ in s["unfinished"]] == ["refused"], detail
    assert failed == 0, detail


@pytest.fixture(scope="module")
def goaway_16k(tmp_path_factory):
    with faulty(tmp_path_factory.mktemp("goaway16k"), "--mode", "goaway-mid-upload", "--after", str(16 * KIB)) as f:
        yield f


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "no-content-length"])
@pytest.mark.parametrize("size", [100 * KIB, MIB], ids=["100KiB", "1MiB"])
def test_goaway_mid_upload_within_the_replay_buffer_is_replayed(goaway_16k, size, content_length):
    """GOAWAY(NO_ERROR, last_stream_id below the upload's stream) after 16 KiB of the body, at
    the default 64 KiB windows: the stream is unprocessed and everything Spooky sent of it is
    still in its replay buffer, so it must be sent again on a new connection: 200, byte-exact,
    and exactly one complete copy at the backend."""
    rid = uuid.uuid4().hex
    body = body_of(size, int(rid[:4], 16))
    failures = goaway_16k.metric("spooky_upstream_failures_total")
    goaways = goaway_16k.stats()["goaways"]

    async def go():
        async with h3_connect("127.0.0.1", goaway_16k.port) as c:
            await warm_up(c)
            return await post(c, rid, body, content_length)

    r = run(go(), timeout=40)
    st = goaway_16k.stats()
    s = seen(goaway_16k.bodies(rid), body)
    failed = goaway_16k.metric("spooky_upstream_failures_total") - failures
    detail = (f"POST {size} B ({'with' if content_length else 'without'} content-length), GOAWAY after 16 KiB: client "
              f"got {outcome(r, body)}; backend sent {st['goaways'] - goaways} GOAWAY ({st['not_victimised']} uploads "
              f"on stream 1 so far, not victimised), saw {s}; "
              f"spooky_upstream_failures_total +{failed:.0f}")
    print(f"\nSUMMARY {detail}")
    assert st["goaways"] - goaways == 1, detail
    assert r.reset_code is None and r.status == 200, detail
    assert bytes(r.body) == body and r.header("x-body-sha256") == hashlib.sha256(body).hexdigest(), detail
    assert s["complete_exact"] == 1 and not s["complete_wrong"], detail
    assert failed == 0, detail


@pytest.fixture(scope="module")
def goaway_200k_big_window(tmp_path_factory):
    args = ["--mode", "goaway-mid-upload", "--after", str(200 * KIB), "--window", str(MIB)]
    with faulty(tmp_path_factory.mktemp("goaway200k"), *args) as f:
        yield f


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "no-content-length"])
def test_goaway_after_more_than_the_replay_buffer_fails_cleanly(goaway_200k_big_window, content_length):
    """The same GOAWAY, but the backend opened 1 MiB windows and only stopped after 200 KiB:
    more than a 64 KiB replay buffer holds was sent, so the request cannot be replayed. Spooky
    must answer 502 itself (counted in spooky_upstream_failures_total{status="502"}), and the
    backend must never complete a partial or second copy of the body."""
    f = goaway_200k_big_window
    rid = uuid.uuid4().hex
    body = body_of(MIB, int(rid[:4], 16))
    failures_502 = f.metric("spooky_upstream_failures_total", 'status="502"')
    goaways = f.stats()["goaways"]

    async def go():
        async with h3_connect("127.0.0.1", f.port) as c:
            await warm_up(c)
            return await post(c, rid, body, content_length)

    r = run(go(), timeout=40)
    st = f.stats()
    s = seen(f.bodies(rid), body)
    counted = f.metric("spooky_upstream_failures_total", 'status="502"') - failures_502
    detail = (f"POST 1 MiB ({'with' if content_length else 'without'} content-length), GOAWAY after 200 KiB at 1 MiB "
              f"windows: client got {outcome(r, body)}; backend sent {st['goaways'] - goaways} GOAWAY, saw {s}; "
              f"spooky_upstream_failures_total{{status=\"502\"}} +{counted:.0f}")
    print(f"\nSUMMARY {detail}")
    assert st["goaways"] - goaways == 1, detail
    assert not s["complete_wrong"], detail
    assert s["complete_exact"] == 0, detail
    assert r.reset_code is None and r.status == 502 and r.header("x-body-sha256") is None, detail
    assert counted == 1, detail


def test_gets_on_connections_ended_by_goaway_never_fail(tmp_path):
    """GOAWAY(NO_ERROR, last_stream_id) after every 100 streams of a connection, with up to
    256 GETs in flight through Spooky: the streams above last_stream_id were not processed
    and must be sent again on another connection. 6,000 GETs, 0 x 502, every body byte-exact,
    spooky_upstream_failures_total unchanged."""
    with faulty(tmp_path, "--mode", "goaway-after", "--streams", "100") as f:
        failures = f.metric("spooky_upstream_failures_total")
        load = run_load(f.port, processes=4, connections=4, streams=16, requests=6000, post_share=0.0,
                        deadline=60.0, seed=3)
        st = f.stats()
        failed = f.metric("spooky_upstream_failures_total") - failures
        detail = (f"GETs, GOAWAY after 100 streams: {load.summary()}; backend sent {st['goaways']} GOAWAYs on "
                  f"{st['connections']} connections and ignored {st['ignored_streams']} streams above last_stream_id; "
                  f"spooky_upstream_failures_total +{failed:.0f}; client processes failed: {load.failed_processes or 'none'}")
        print(f"\nSUMMARY {detail}")
        n502, ok = load.statuses.get("502", 0), load.ok == load.requests
        assert st["goaways"] >= 20, detail
        assert not load.failed_processes, detail
        assert n502 == 0, detail
        assert ok, detail
        assert failed == 0, detail
