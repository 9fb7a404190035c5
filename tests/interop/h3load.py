"""A bounded HTTP/3 load generator on aioquic, checking every answer byte for byte.

One process runs `--connections` QUIC connections with `--streams` requests in flight on each
until `--requests` requests are done or `--deadline` seconds have passed, and prints one JSON
line with the counts. aioquic is pure Python, so one process saturates one core long before
Spooky does: `run_load()` starts several processes and adds their counts up.

The mix (deterministic per `--seed`): GETs of `/bytes/N` for a few sizes (the answer must be
spooky-backend's pattern), and POSTs to `/echo` with bodies from 5 bytes to 1,000,000 bytes
(a slice of the pattern at a random offset, so no two bodies are alike), half of them with a
`content-length`, half without. `--post-check echo`: the answer must be the same bytes, with
`x-body-sha256` and `x-body-length` of them; `--post-check nginx`: nginx cannot echo, the
answer must be exactly NGINX_POST_BODY. `--post-share 0` sends GETs only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from h3client import h3_connect  # noqa: E402
from test_aioquic import PERIOD, pattern  # noqa: E402

NGINX_POST_BODY = b"nginx took the body\n"
GET_SIZES = [(0, 2), (1, 10), (1_000, 40), (16_384, 30), (100_000, 3)]
POST_SIZES = [(5, 30), (1_000, 40), (20_000, 20), (100_000, 4), (1_000_000, 0.3)]
POST_SHARE = 0.4
MAX_BODY = max(s for s, _ in POST_SIZES)
_WIDE = pattern(MAX_BODY + PERIOD)


@dataclass
class Spec:
    method: str
    size: int
    offset: int = 0  # POST: where in the pattern the body starts
    content_length: bool = False

    def body(self) -> bytes:
        return _WIDE[self.offset:self.offset + self.size]


def make_specs(n: int, seed: int, post_share: float = POST_SHARE) -> list[Spec]:
    rng = random.Random(seed)
    gets, gw = zip(*GET_SIZES)
    posts, pw = zip(*POST_SIZES)
    out = []
    for i in range(n):
        if rng.random() < post_share:
            size = rng.choices(posts, pw)[0]
            out.append(Spec("POST", size, rng.randrange(PERIOD), content_length=i % 2 == 0))
        else:
            out.append(Spec("GET", rng.choices(gets, gw)[0]))
    return out


@dataclass
class Tally:
    done: int = 0
    ok: int = 0
    statuses: Counter = field(default_factory=Counter)
    resets: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    mismatches: int = 0
    failed_by_method: Counter = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    samples: Counter = field(default_factory=Counter)  # what went wrong (ports elided) -> how often

    def bad(self, what: str) -> None:
        self.samples[re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:*", what)[:200]] += 1


def check(spec: Spec, r, post_check: str) -> str | None:
    """None if the response is right, else what is wrong."""
    if r.reset_code is not None:
        return f"reset 0x{r.reset_code:x}"
    if r.status != 200:
        return f"status {r.status}: {bytes(r.body[:120])!r}"
    if spec.method == "GET":
        if bytes(r.body) != pattern(spec.size):
            return f"GET /bytes/{spec.size}: {len(r.body)} bytes, not the pattern"
        return None
    if post_check == "nginx":
        if bytes(r.body) != NGINX_POST_BODY:
            return f"POST {spec.size}: nginx answered {bytes(r.body[:120])!r}"
        return None
    body = spec.body()
    if r.header("x-body-length") != str(spec.size) or r.header("x-body-sha256") != hashlib.sha256(body).hexdigest():
        return (f"POST {spec.size} (content-length: {spec.content_length}): backend received "
                f"{r.header('x-body-length')} bytes sha256 {r.header('x-body-sha256')}")
    if bytes(r.body) != body:
        return f"POST {spec.size}: echo of {len(r.body)} bytes differs"
    return None


async def one_request(c, spec: Spec, timeout: float):
    if spec.method == "GET":
        return await c.get(f"/bytes/{spec.size}", timeout=timeout)
    headers = [(b"content-type", b"application/octet-stream")]
    if spec.content_length:
        headers.append((b"content-length", str(spec.size).encode()))
    return await c.request("POST", "/echo", body=spec.body(), headers=headers, timeout=timeout)


async def connection(port: int, queue: asyncio.Queue, streams: int, tally: Tally, post_check: str,
                     deadline: float, timeout: float) -> None:
    """One QUIC connection with `streams` requests in flight; reopened if it dies."""
    loop = asyncio.get_running_loop()
    while not queue.empty() and loop.time() < deadline:
        try:
            async with h3_connect("127.0.0.1", port) as c:
                async def lane():
                    while c.terminated is None and loop.time() < deadline:
                        try:
                            spec = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        try:
                            r = await one_request(c, spec, min(timeout, max(1.0, deadline - loop.time())))
                        except TimeoutError as e:
                            tally.errors["timeout"] += 1
                            tally.failed_by_method[spec.method] += 1
                            tally.bad(str(e))
                            tally.done += 1
                            continue
                        except ConnectionError as e:
                            tally.errors["connection"] += 1
                            tally.failed_by_method[spec.method] += 1
                            tally.bad(str(e))
                            tally.done += 1
                            return
                        c._responses.pop(r.stream_id, None)
                        tally.done += 1
                        tally.bytes_down += len(r.body)
                        tally.bytes_up += spec.size if spec.method == "POST" else 0
                        if r.status is not None:
                            tally.statuses[str(r.status)] += 1
                        if r.reset_code is not None:
                            tally.resets[f"0x{r.reset_code:x}"] += 1
                        wrong = check(spec, r, post_check)
                        if wrong is None:
                            tally.ok += 1
                        else:
                            if r.status == 200 and r.reset_code is None:
                                tally.mismatches += 1
                            tally.failed_by_method[spec.method] += 1
                            tally.bad(wrong)

                await asyncio.gather(*(lane() for _ in range(streams)))
        except (ConnectionError, TimeoutError, OSError) as e:
            tally.errors["connect"] += 1
            tally.bad(f"connection: {e!r}")
            await asyncio.sleep(0.1)


async def main_async(a) -> dict:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for spec in make_specs(a.requests, a.seed, a.post_share):
        queue.put_nowait(spec)
    tally = Tally()
    started = time.monotonic()
    deadline = loop.time() + a.deadline
    await asyncio.wait_for(
        asyncio.gather(*(connection(a.port, queue, a.streams, tally, a.post_check, deadline, a.timeout)
                         for _ in range(a.connections))),
        a.deadline + 30,
    )
    return {
        "requests": a.requests, "done": tally.done, "ok": tally.ok, "not_run": queue.qsize(),
        "statuses": dict(tally.statuses), "resets": dict(tally.resets), "errors": dict(tally.errors),
        "mismatches": tally.mismatches, "failed_by_method": dict(tally.failed_by_method), "bytes_up": tally.bytes_up, "bytes_down": tally.bytes_down,
        "elapsed": time.monotonic() - started, "samples": dict(tally.samples),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--post-check", choices=["echo", "nginx"], default="echo")
    p.add_argument("--post-share", type=float, default=POST_SHARE, help="0: GETs only")
    p.add_argument("--deadline", type=float, default=60.0, help="stop starting requests after this many seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="per request")
    a = p.parse_args()
    print(json.dumps(asyncio.run(main_async(a))), flush=True)


@dataclass
class LoadResult:
    """The added-up counts of every client process."""

    requests: int
    done: int = 0
    ok: int = 0
    not_run: int = 0
    statuses: Counter = field(default_factory=Counter)
    resets: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    mismatches: int = 0
    failed_by_method: Counter = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    elapsed: float = 0.0
    samples: Counter = field(default_factory=Counter)
    failed_processes: list = field(default_factory=list)

    def summary(self) -> str:
        rate = self.done / self.elapsed if self.elapsed else 0.0
        mb = (self.bytes_up + self.bytes_down) / self.elapsed / 1e6 if self.elapsed else 0.0
        non200 = sum(v for k, v in self.statuses.items() if k != "200")
        return (f"{self.ok}/{self.requests} ok, {self.statuses.get('502', 0)} x 502, {non200} non-200 "
                f"(statuses {dict(self.statuses)}), {sum(self.resets.values())} stream resets {dict(self.resets)}, "
                f"{self.mismatches} wrong 200 bodies, errors {dict(self.errors)}, {self.not_run} not run; "
                f"failed by method {dict(self.failed_by_method) or 'none'}; "
                f"{self.elapsed:.1f}s, {rate:.0f} req/s, {mb:.1f} MB/s; "
                f"what went wrong: {dict(self.samples.most_common(8)) or 'nothing'}")


def run_load(port: int, *, processes: int, connections: int, streams: int, requests: int,
             post_check: str = "echo", post_share: float = POST_SHARE, deadline: float = 60.0,
             seed: int = 1) -> LoadResult:
    """`processes` client processes with `connections` each (so processes x connections QUIC
    connections), `requests` in total; every process is killed if it overruns the deadline."""
    per = [requests // processes + (1 if i < requests % processes else 0) for i in range(processes)]
    procs = []
    started = time.monotonic()
    result = LoadResult(requests=requests)
    try:
        for i, n in enumerate(per):
            argv = [sys.executable, str(HERE / "h3load.py"), "--port", str(port), "--connections", str(connections),
                    "--streams", str(streams), "--requests", str(n), "--seed", str(seed * 1000 + i),
                    "--post-check", post_check, "--post-share", str(post_share), "--deadline", str(deadline)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"}))
        for i, pr in enumerate(procs):
            try:
                out, err = pr.communicate(timeout=max(1.0, started + deadline + 45 - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.kill()
                out, err = pr.communicate()
                result.failed_processes.append(f"client {i} overran the deadline")
                continue
            lines = out.decode().strip().splitlines()
            if pr.returncode != 0 or not lines:
                result.failed_processes.append(f"client {i} exit {pr.returncode}: {err.decode()[-2000:]}")
                continue
            r = json.loads(lines[-1])
            result.done += r["done"]
            result.ok += r["ok"]
            result.not_run += r["not_run"]
            result.statuses.update(r["statuses"])
            result.resets.update(r["resets"])
            result.errors.update(r["errors"])
            result.mismatches += r["mismatches"]
            result.failed_by_method.update(r["failed_by_method"])
            result.bytes_up += r["bytes_up"]
            result.bytes_down += r["bytes_down"]
            result.samples.update(r["samples"])
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait(5)
    result.elapsed = time.monotonic() - started
    return result


if __name__ == "__main__":
    main()
