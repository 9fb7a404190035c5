"""Spooky in front of real HTTP/2 servers at their stock settings: nginx, hypercorn and Node's
built-in `http2`, one at a time.

Why: Spooky had only been proven against its own spooky-backend, which never ends a
connection. Stock servers do: nginx (`keepalive_requests 1000`) and hypercorn
(`keep_alive_max_requests 1000`) send GOAWAY after 1,000 requests on a connection, so a proxy
that keeps its HTTP/2 connections busy crosses that limit every few seconds. Nothing on the
backend side is tuned (no `keepalive_requests`, no stream or window settings): the backends
are what a user runs.

Per backend:
- `test_backend_ends_long_connections_by_itself`: a direct h2c probe (no Spooky) records how
  the backend ends a busy connection (GOAWAY, last_stream_id, resets), i.e. that the load test
  below crosses the limit at all, and what exactly Spooky has to cope with.
- `test_load_through_spooky`: 20,000 requests (GETs of a few sizes, POSTs of 5 B to 1 MB, half
  with content-length) over 16 QUIC connections with 16 streams in flight each, from several
  aioquic client processes: every answer must be 200 and byte-exact, none may be a 502, and
  `spooky_upstream_failures_total` must stay 0.
- `test_load_with_reloads`: the same while Spooky is reloaded (SIGHUP after a harmless config
  change) 6 times.

`REAL_BACKEND_REQUESTS` overrides the request count (e.g. for a quick look). Run:
`.venv/bin/python -m pytest tests/interop/test_real_backends.py -q -p no:cacheprovider`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import Proc, free_port, spooky_metric, start_nginx, start_spooky, watched, write_nginx_conf
from h2probe import h2get, probe
from h3load import GET_SIZES, NGINX_POST_BODY, run_load
from test_aioquic import pattern

HERE = Path(__file__).resolve().parent
VENV_BIN = HERE.parents[1] / ".venv" / "bin"
REQUESTS = int(os.environ.get("REAL_BACKEND_REQUESTS", "20000"))
# 16 QUIC connections x 16 streams, spread over client processes (aioquic is pure Python: one
# process is one busy core).
PROCESSES, CONNECTIONS_EACH, STREAMS = 4, 4, 16
LOAD_DEADLINE_S = 75.0
# The stock per-connection request limits the load must cross (None: the backend has none).
LIMITS = {"nginx": 1000, "hypercorn": 1000, "node": None}


@dataclass
class Backend:
    name: str
    port: int
    proc: Proc
    post_check: str  # how h3load checks POST answers: "echo" or "nginx"
    stats: Callable[[], dict]  # backend-side counts, fetched directly (not through Spooky)


def nginx_stats(port: int) -> dict:
    """nginx's stub_status: accepted connections and handled requests."""
    status, body = h2get(port, "/stub_status")
    assert status == 200, (status, body)
    # Active connections: 1 \n server accepts handled requests \n 5 5 12 \n Reading: ...
    accepts, handled, requests = map(int, body.decode().splitlines()[2].split())
    return {"connections": accepts, "requests": requests}


def json_stats(port: int) -> dict:
    status, body = h2get(port, "/stats")
    assert status == 200, (status, body)
    return json.loads(body)


def start_real_backend(name: str, tmp: Path) -> Backend:
    """Starts one backend at its defaults on a free port; stopped again if it never listens."""
    port = free_port()
    if name == "nginx":
        www = tmp / "www"
        (www / "bytes").mkdir(parents=True)
        for size, _ in GET_SIZES:
            (www / "bytes" / str(size)).write_bytes(pattern(size))
        # Stock directives only: static files, a `return` for the POSTs (nginx cannot echo;
        # it reads and discards the body), stub_status for its own counts.
        conf = write_nginx_conf(tmp, port, f"""\
        location /bytes/ {{
            root {www};
        }}
        location = /echo {{
            return 200 "{NGINX_POST_BODY.decode().strip()}\\n";
        }}
        location = /stub_status {{
            stub_status;
        }}""")
        proc = start_nginx(tmp, conf, port, tmp / "nginx.log")
        return Backend(name, port, proc, "nginx", lambda: nginx_stats(port))
    if name == "hypercorn":
        # Only the address is given: every other setting is hypercorn's default.
        app = f"{HERE / 'backends' / 'asgi_app'}:app"  # hypercorn puts the module's dir on sys.path
        proc = Proc("hypercorn", [str(VENV_BIN / "hypercorn"), "--bind", f"127.0.0.1:{port}", app],
                    tmp / "hypercorn.log")
    elif name == "node":
        argv = ["node", str(HERE / "backends" / "h2_server.js"), str(port)]
        proc = Proc("node-http2", argv, tmp / "node.log")
    else:
        raise ValueError(name)
    try:
        proc.wait_tcp(port)
    except BaseException:
        proc.stop()
        raise
    return Backend(name, port, proc, "echo", lambda: json_stats(port))


def spooky_yaml(backend_port: int, request_timeout: str = "20s") -> str:
    """Stock Spooky settings (retries, pool, windows) but for the listeners; `request_timeout`
    is what the reload test changes."""
    return f"""\
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
workers: 2
tls: {{ self_signed: [localhost] }}
timeouts: {{ request: {request_timeout} }}
upstreams:
  real: {{ backends: [{{ address: "127.0.0.1:{backend_port}" }}] }}
routes: [{{ upstream: real }}]
"""


@dataclass
class Front:
    """A backend and the Spooky in front of it."""

    backend: Backend
    spooky: Proc
    port: int
    admin: int
    cfg: Path

    def metric(self, name: str, label: str = "") -> float:
        return spooky_metric(self.admin, name, label)


@contextlib.contextmanager
def front_of(name: str, tmp: Path):
    backend = start_real_backend(name, tmp)
    try:
        cfg = tmp / "spooky.yaml"
        cfg.write_text(spooky_yaml(backend.port))
        spooky, port, admin = start_spooky(cfg, tmp / "spooky.log")
        try:
            with watched(spooky, backend.proc):
                yield Front(backend, spooky, port, admin, cfg)
        finally:
            spooky.stop()
    finally:
        backend.proc.stop()


@pytest.fixture(scope="module", params=list(LIMITS))
def front(request, tmp_path_factory):
    """One backend at a time (nginx, hypercorn, node) with its own Spooky."""
    with front_of(request.param, tmp_path_factory.mktemp(request.param)) as f:
        yield f


def test_backend_ends_long_connections_by_itself(front):
    """The premise of the load test, checked without Spooky: on one connection with 16 GETs
    in flight, nginx and hypercorn end the connection with GOAWAY at their 1,000-request limit
    (Node has no such limit). Records what exactly they send.

    Seen here (nginx 1.22, hypercorn 0.18 on hyper-h2 4.x): nginx sends GOAWAY(NO_ERROR,
    last_stream_id = the 1,000th stream), answers every stream up to it, ignores the ones above
    and closes the connection. hypercorn sends GOAWAY(NO_ERROR, last_stream_id = the newest
    stream it has read), repeats it for every further request in the same read, and then
    answers nothing more: hyper-h2's state machine is closed once it sent GOAWAY, so streams
    at or below last_stream_id go unanswered (their app did run), and the next frame from the
    client of any kind gets GOAWAY(PROTOCOL_ERROR) and the connection closes."""
    b = front.backend
    r = probe(b.port, "/bytes/1", concurrency=16, max_requests=3000, timeout=30)
    print(f"\nSUMMARY {b.name} direct h2c, 16 GETs in flight: {r.describe()}; streams covered by "
          f"the GOAWAY but never answered: {r.unanswered_at_or_below_last}")
    limit = LIMITS[b.name]
    if limit is None:
        assert not r.goaways and r.completed == r.sent == 3000, r.describe()
    else:
        assert r.goaways, f"{b.name} sent no GOAWAY: {r.describe()}"
        first_count, last_sid, code = r.goaways[0]
        assert code == "NO_ERROR", r.describe()
        # (hypercorn may still be writing earlier answers when its GOAWAY goes out)
        assert limit - 16 <= first_count <= limit + 16, r.describe()
        assert limit <= (last_sid + 1) // 2 <= limit + 16, r.describe()


def assert_clean(f: Front, load, failures_before: float, what: str) -> None:
    """Every request answered 200 and byte-exact, no 502, no upstream failure counted."""
    failures = f.metric("spooky_upstream_failures_total") - failures_before
    by_status = {s: f.metric("spooky_upstream_failures_total", f'status="{s}"') for s in ("502", "503", "504")}
    stats = f.backend.stats()
    # Spooky's 502 bodies carry h2's error: which of the two ways a backend ended a stream.
    above = sum(n for k, n in load.samples.items() if "not a result of an error" in k)
    dropped = sum(n for k, n in load.samples.items() if "broken pipe" in k)
    detail = (f"{f.backend.name} {what}: {load.summary()}; of the failures, {above} were streams above a "
              f"GOAWAY's last_stream_id (unprocessed) and {dropped} died with a connection the backend closed "
              f"under streams it had accepted; spooky_upstream_failures_total +{failures:.0f} "
              f"(cumulative by status {by_status}); backend saw {stats}; client processes failed: "
              f"{load.failed_processes or 'none'}")
    print(f"\nSUMMARY {detail}")
    n502, ok = load.statuses.get("502", 0), load.ok == load.requests
    assert not load.failed_processes, detail
    assert n502 == 0, detail
    assert ok, detail
    assert failures == 0, detail


def test_load_through_spooky(front):
    """20,000 mixed requests through Spooky (2 workers) over 16 connections x 16 streams: every
    answer 200 and byte-exact, 0 x 502, spooky_upstream_failures_total unchanged. At 1,000
    requests per backend connection, nginx and hypercorn end Spooky's pooled connections about
    20 times during the run."""
    before = front.metric("spooky_upstream_failures_total")
    backend_before = front.backend.stats()
    load = run_load(front.port, processes=PROCESSES, connections=CONNECTIONS_EACH, streams=STREAMS,
                    requests=REQUESTS, post_check=front.backend.post_check, deadline=LOAD_DEADLINE_S)
    after = front.backend.stats()
    conns = after["connections"] - backend_before["connections"] - 1  # the stats fetch is one
    print(f"\nSUMMARY {front.backend.name}: requests arrived on {conns} new backend connections during the load "
          f"(spooky_upstream_connects_total: {front.metric('spooky_upstream_connects_total'):.0f})")
    assert_clean(front, load, before, "load")
    limit = LIMITS[front.backend.name]
    if limit is not None:
        # Else the test proved nothing: the limit must have ended connections many times.
        assert conns >= REQUESTS // limit // 2, f"only {conns} backend connections for {REQUESTS} requests"


def admin_config_version(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config", timeout=5) as r:
        return int(json.loads(r.read())["version"])


def reload_repeatedly(f: Front, times: int, every: float, stop: threading.Event, log: list) -> None:
    """Rewrites the config (timeouts.request alternating 21s/20s; written aside and renamed in,
    so no reader sees half a file) and sends SIGHUP, `times` times, `every` seconds apart;
    logs (seconds since start, config version now in force) after each."""
    started = time.monotonic()
    for i in range(times):
        if stop.wait(every):
            return
        tmp = f.cfg.with_suffix(".next")
        tmp.write_text(spooky_yaml(f.backend.port, request_timeout="21s" if i % 2 == 0 else "20s"))
        os.replace(tmp, f.cfg)
        f.spooky.popen.send_signal(signal.SIGHUP)
        want = (log[-1][1] if log else 1) + 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and admin_config_version(f.admin) < want:
            time.sleep(0.05)
        log.append((round(time.monotonic() - started, 1), admin_config_version(f.admin)))


@pytest.mark.parametrize("name", list(LIMITS))
def test_load_with_reloads(name, tmp_path):
    """The same load while Spooky is reloaded 6 times, every 2 s (a harmless change:
    timeouts.request). Pooled backend connections survive a reload, so reloads must not add
    failures of their own: every answer 200 and byte-exact, 0 x 502, no upstream failure
    counted, every reload applied. A Spooky of its own, since this one is reloaded."""
    with front_of(name, tmp_path) as f:
        before = f.metric("spooky_upstream_failures_total")
        ok_before = f.metric("spooky_reloads_total", 'result="ok"')
        stop, versions = threading.Event(), []
        reloader = threading.Thread(target=reload_repeatedly, args=(f, 6, 1.5, stop, versions), daemon=True)
        reloader.start()
        try:
            load = run_load(f.port, processes=PROCESSES, connections=CONNECTIONS_EACH, streams=STREAMS,
                            requests=REQUESTS, post_check=f.backend.post_check, deadline=LOAD_DEADLINE_S, seed=2)
        except BaseException:
            stop.set()
            raise
        finally:
            reloader.join(30)
        reloads = f.metric("spooky_reloads_total", 'result="ok"') - ok_before
        print(f"\nSUMMARY {name} with reloads: {reloads:.0f} reloads applied, (second, config version) "
              f"{versions}, during a {load.elapsed:.1f}s load")
        assert_clean(f, load, before, f"load with {reloads:.0f} reloads")
        assert [v for _, v in versions] == list(range(2, 8)), versions
        assert reloads >= 6, reloads
        assert versions[-1][0] < load.elapsed, f"the reloads did not all fall within the {load.elapsed:.1f}s load"
