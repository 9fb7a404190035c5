"""Real browsers over HTTP/3 through Spooky: headless Chromium (driven over CDP) and Firefox ESR
(driven over WebDriver BiDi) load a page from Spooky and run `fetch()` in it: several GETs, 20
requests at once, a 10 MiB download and 1 MiB and 8 MiB POSTs to `/echo`, each checked by status,
length and a SHA-256 computed in the page (`crypto.subtle.digest`); the page's own timing entries
(`nextHopProtocol`) must say `h3` for the page and every request, and Chromium's net log must show
its QUIC session and the one UDP address it used.

Why: aioquic and quiche's client are libraries that tests drive one call at a time; browsers are
the clients Spooky is for, with QUIC stacks of their own (Chromium's, Mozilla's neqo), their own
flow-control windows, pacing, connection reuse, path probing and request patterns. A browser that
fails against Spooky is a bug the other interop tests cannot show.

Spooky needs a certificate the browsers trust: the test makes one (EC P-256, SAN `localhost`),
passes its SPKI hash to Chromium (`--ignore-certificate-errors-spki-list`) and imports it into
Firefox's fresh profile (`certutil -A -t "C,,"`). Chromium is forced onto QUIC for the origin
(`--origin-to-force-quic-on`), once with `localhost` mapped to 127.0.0.1 and once to [::1] (Spooky
listens on both, like its embedded default); Firefox gets the origin's h3 endpoint from
`network.http.http3.alt-svc-mapping-for-testing`.

Nothing a browser sends can leave the machine: the browsers, Spooky and spooky-backend all run in
a network namespace of their own that has only a loopback interface (Chromium's probe of a public
address to learn its local one fails there with ERR_ADDRESS_UNREACHABLE, as its net log shows).
The namespace has no name: the test's thread enters it (unshare(2), setns(2)) to start the
processes and to talk to them (DevTools websocket, Spooky's admin port), and it disappears with
the last of them, also when the test fails or is killed. Every browser runs in a process group of
its own, which teardown ends.

Port migration, exercised by `test_chromium_port_migration_after_stall`: when Spooky stalls or
loses a burst of packets, Chromium declares the path degrading and migrates to a new UDP port. It
does not answer the PATH_CHALLENGE quiche sends for the new port bundled with its PATH_RESPONSEs,
but acknowledges its packet, so quiche 0.30 never repeated it and the path stayed under the 3x
anti-amplification limit (~75 KB/s), or quiche gave it up (PROTOCOL_VIOLATION). Spooky's quiche
patch 2 (vendor/quiche/PATCHES.md) challenges the path again while Chromium keeps sending on it,
which Chromium answers; so every test here runs Spooky with its QUIC defaults, active migration
allowed (before, the workload tests ran with `quic.active_migration: false`, because the loss
bursts of an ordinary run trigger that migration in about one run in eight).

Without the SPKI flag Chromium does not trust the certificate: its navigation fails and Spooky
counts the handshake failure by the alert Chromium sends (certificate_unknown, 46) in
`spooky_handshake_failures_total` (`test_chromium_rejecting_the_certificate_...`).

Functional assertions, and no datagram dropped at any receive buffer. The timings of the 10 MiB
download and the 8 MiB echo, Spooky's
`spooky_quic_packets_lost_total` and the namespace's UDP `RcvbufErrors` (/proc/net/snmp, and
Udp6RcvbufErrors from snmp6) before and after each browser, and the per-socket drops at Spooky's
and at the browser's sockets, are printed on `SUMMARY browsers:` lines.
Run: `.venv/bin/python -m pytest tests/interop/test_browsers.py -q -s`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Proc, spooky_metric, start_backend, start_spooky, watched
from test_aioquic import pattern

CHROMIUM = shutil.which("chromium")
FIREFOX = shutil.which("firefox-esr")
CERTUTIL = shutil.which("certutil")

# Spooky's UDP ports inside the namespace, each on 127.0.0.1 and [::1]. The namespace is the
# test's own, so they are free.
PORT = 8443  # the workload tests' Spooky (QUIC defaults)
MIGRATION_PORT = 8444  # Spooky with its QUIC defaults, for the port-migration test
BACKEND_NAME = "browser-demo"
DOWNLOAD = 10 << 20
ECHOES = {"echo_1m": 1 << 20, "echo_8m": 8 << 20}
PARALLEL = 20
GETS = ["/hello?i=1", "/headers", "/status/201", "/bytes/1", "/bytes/65536", "/hello?i=2"]
BROWSER_READY_S = 40.0
STEP_S = 30.0  # one CDP/BiDi command (navigation, a short evaluation)
WORKLOAD_S = 120.0  # the whole fetch() workload in the page
CLOSE_S = 15.0  # browser exit after its close command; Spooky's connections closing after that
STALL_S = 5.0  # at most this long the port-migration test stops Spooky (SIGSTOP) as a download starts
AFTER_STALL_S = 15  # how long the download may take after that (~1 s when the path is usable)

# One line per browser run, for the module's closing SUMMARY line.
_RESULTS: dict[str, str] = {}


# --- The network namespace ---------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class Netns:
    """A fresh network namespace with only `lo` (up), held by a file descriptor. `entered()`
    moves the calling thread into it for a `with` block: sockets it opens and processes it starts
    there belong to the namespace. It is gone once `close()` ran and its last process exited."""

    def __init__(self) -> None:
        self._host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._fd = -1
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
            finally:
                _check(_libc.setns(self._host, CLONE_NEWNET), "setns(host)")
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def entered(self):
        _check(_libc.setns(self._fd, CLONE_NEWNET), "setns(test namespace)")
        try:
            yield
        finally:
            _check(_libc.setns(self._host, CLONE_NEWNET), "setns(host)")

    def links(self) -> list[str]:
        with self.entered():
            out = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True, timeout=10).stdout
        return [line.split(":")[1].strip() for line in out.splitlines()]

    def close(self) -> None:
        for fd in (self._fd, self._host):
            if fd >= 0:
                os.close(fd)
        self._fd = self._host = -1


# --- Certificate and Spooky --------------------------------------------------------------------


def make_certificate(tmp: Path) -> tuple[Path, Path, str]:
    """A self-signed EC P-256 certificate for localhost (and the loopback addresses); returns the
    PEM files and the base64 SHA-256 of its SubjectPublicKeyInfo (Chromium's SPKI pin)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert_path, key_path, base64.b64encode(hashlib.sha256(spki).digest()).decode()


def spooky_config(port: int, backend_port: int, cert: Path, key: Path, quic: str) -> str:
    return f"""\
listen: ["127.0.0.1:{port}", "[::1]:{port}"]
admin: {{ listen: 127.0.0.1:0 }}
workers: 2
tls:
  cert: {cert}
  key: {key}
quic: {{ {quic} }}
timeouts: {{ connect: 2s, request: 20s, idle: 10s }}
upstreams:
  demo:
    backends:
      - address: 127.0.0.1:{backend_port}
routes:
  - upstream: demo
"""


def udp_counters(pid: int) -> dict[str, int]:
    """The namespace's UDP counters as process `pid` sees them: Udp* from /proc/net/snmp and
    Udp6* from /proc/net/snmp6."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()]
    head, values = [line for line in lines if line[0] == "Udp:"][:2]
    out = {f"Udp{k}": int(v) for k, v in zip(head[1:], values[1:])}
    for line in Path(f"/proc/{pid}/net/snmp6").read_text().splitlines():
        k, v = line.split()
        if k.startswith("Udp6"):
            out[k] = int(v)
    return out


def socket_drops(pid: int, port: int) -> tuple[int, int]:
    """Datagrams the kernel dropped (full receive buffer) at the namespace's UDP sockets right
    now, summed for Spooky's (local `port`) and for everybody else's (the browser's)."""
    ours = theirs = 0
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port, drops = int(fields[1].rsplit(":", 1)[1], 16), int(fields[-1])
            if local_port == port:
                ours += drops
            else:
                theirs += drops
    return ours, theirs


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP, then wait until every thread of `pid` is stopped (a thread inside a system call
    stops only when it leaves it, and may handle one more packet meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]
        if all(st in ("T", "t") for st in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"spooky ({pid}) did not stop within {timeout}s: thread states {states}")


def remote_families(pid: int, port: int) -> set[str]:
    """How the namespace's UDP sockets connected to remote `port` (the browser's QUIC sockets
    to Spooky) reach it: "127.0.0.1" or "[::1]", from the remote addresses in /proc/net/udp{,6}."""
    loopback = {"0100007F": "127.0.0.1", "00000000000000000000000001000000": "[::1]"}
    found = set()
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            remote, remote_port = line.split()[2].rsplit(":", 1)
            if int(remote_port, 16) == port:
                found.add(loopback.get(remote, remote))
    return found


def connected_to(pid: int, port: int) -> set[int]:
    """Local ports of the namespace's UDP sockets connected to remote `port` (the browser's QUIC
    sockets to Spooky)."""
    found = set()
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found


@dataclass
class Edge:
    """Spooky (and the shared spooky-backend) in the namespace `ns`, on UDP `port`."""

    ns: Netns
    spooky: Proc
    port: int
    admin_port: int
    spki: str
    cert: Path

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.port}"

    def metric(self, name: str) -> float:
        with self.ns.entered():
            return spooky_metric(self.admin_port, name)

    def wait_no_connections(self, timeout: float) -> bool:
        """Until Spooky has no QUIC connection open (loss is counted when a connection closes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("spooky_connections_active") == 0:
                return True
            time.sleep(0.2)
        return False


@dataclass
class Lab:
    tmp: Path
    ns: Netns
    backend_port: int
    cert: Path
    key: Path
    spki: str
    procs: list[Proc]

    def spooky(self, port: int, quic: str, name: str) -> Edge:
        """Start a Spooky in the namespace; stopped with the lab."""
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(spooky_config(port, self.backend_port, self.cert, self.key, quic))
        with self.ns.entered():
            proc, got_port, admin_port = start_spooky(cfg, self.tmp / f"{name}.stderr.log", name)
        self.procs.append(proc)
        assert got_port == port
        return Edge(ns=self.ns, spooky=proc, port=port, admin_port=admin_port, spki=self.spki, cert=self.cert)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The namespace, the certificate and spooky-backend; at the end every process stops, the
    namespace goes, and the SUMMARY line is printed."""
    tmp = tmp_path_factory.mktemp("browsers")
    ns = Netns()
    procs: list[Proc] = []
    try:
        assert ns.links() == ["lo"], ns.links()
        cert, key, spki = make_certificate(tmp)
        with ns.entered():
            backend, backend_port = start_backend(BACKEND_NAME, tmp / "backend.log")
        procs.append(backend)
        yield Lab(tmp=tmp, ns=ns, backend_port=backend_port, cert=cert, key=key, spki=spki, procs=procs)
    finally:
        for p in reversed(procs):
            p.stop()
        ns.close()
        if _RESULTS:
            print("\nSUMMARY browsers: " + "; ".join(f"{k}: {v}" for k, v in _RESULTS.items()))


@pytest.fixture(scope="module")
def edge(lab):
    """The workload tests' Spooky, with its QUIC defaults (active migration allowed: see the
    module docstring)."""
    e = lab.spooky(PORT, "", "spooky")
    with watched(e.spooky):
        yield e


# --- Driving the browsers ----------------------------------------------------------------------


class Driver:
    """JSON commands over one websocket (CDP or WebDriver BiDi: both answer `{"id": N, ...}`),
    each bounded in time; events in between are skipped."""

    def __init__(self, url: str):
        from websockets.sync.client import connect

        self.ws = connect(url, proxy=None, open_timeout=10, max_size=None, compression=None)
        self._next = 0

    def call(self, method: str, params: dict | None = None, timeout: float = STEP_S, **extra) -> dict:
        self._next += 1
        msg_id = self._next
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}, **extra}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                raise TimeoutError(f"{method}: no answer within {timeout}s") from None
            if msg.get("id") != msg_id:
                continue
            if "error" in msg:
                raise RuntimeError(f"{method} failed: {msg['error']} {msg.get('message', '')}")
            return msg.get("result", {})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


class Cdp(Driver):
    """Chromium over the DevTools protocol: one page target, attached in flat mode."""

    def __init__(self, url: str):
        super().__init__(url)
        pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        assert pages, "Chromium has no page target"
        self.session = self.call("Target.attachToTarget", {"targetId": pages[0]["targetId"], "flatten": True})[
            "sessionId"
        ]

    def load(self, url: str) -> None:
        nav = self.call("Page.navigate", {"url": url}, sessionId=self.session)
        assert not nav.get("errorText"), f"navigation to {url} failed: {nav}"
        deadline = time.monotonic() + STEP_S
        while self.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, f"{url} did not finish loading within {STEP_S}s"
            time.sleep(0.1)

    def evaluate(self, expr: str, timeout: float = STEP_S):
        params = {"expression": expr, "awaitPromise": True, "returnByValue": True}
        r = self.call("Runtime.evaluate", params, timeout=timeout, sessionId=self.session)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)


class Bidi(Driver):
    """Firefox over WebDriver BiDi: a session and its first browsing context."""

    def __init__(self, url: str):
        super().__init__(url.rstrip("/") + "/session")
        self.call("session.new", {"capabilities": {}})
        self.context = self.call("browsingContext.getTree", {})["contexts"][0]["context"]

    def load(self, url: str) -> None:
        self.call("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expr: str, timeout: float = STEP_S):
        params = {"expression": expr, "target": {"context": self.context}, "awaitPromise": True}
        r = self.call("script.evaluate", params, timeout=timeout)
        assert r["type"] == "success", r
        return r["result"].get("value")

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.call("browser.close", timeout=5)


class Browser:
    """A browser process in a process group of its own (setsid), its output in a log file; ready
    once it prints its websocket endpoint (`ready_re`'s group 1)."""

    def __init__(self, name: str, argv: list[str], log: Path, ready_re: str):
        self.proc = Proc(name, ["setsid", *argv], log, ready_re=ready_re)
        try:
            self.endpoint = self.proc.wait_ready(BROWSER_READY_S).group(1)
        except BaseException:
            self.kill()
            raise

    def wait_exit(self, timeout: float) -> bool:
        try:
            self.proc.popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """End the browser's whole process group (its leader is the browser we started)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.popen.pid, sig)
            if self.wait_exit(5):
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.stop()


def chromium_argv(tmp: Path, edge: Edge, addr: str, netlog: bool = True, force_quic: bool = True) -> list[str]:
    """Chromium's command line; with `netlog`, a net log in tmp/netlog.json (it logs every QUIC
    packet and costs Chromium a lot of time: runs that are timed go without); without
    `force_quic`, Chromium finds HTTP/3 only through Alt-Svc, like any user's browser."""
    log = [f"--log-net-log={tmp / 'netlog.json'}", "--net-log-capture-mode=Default"] if netlog else []
    return [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--mute-audio",
        f"--user-data-dir={tmp / 'profile'}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        *([f"--origin-to-force-quic-on=localhost:{edge.port}"] if force_quic else []),
        f"--ignore-certificate-errors-spki-list={edge.spki}",
        f"--host-resolver-rules=MAP localhost {addr}, MAP * ~NOTFOUND",
        *log,
        "about:blank",
    ]


def start_chromium(tmp: Path, edge: Edge, addr: str, netlog: bool = True) -> Browser:
    argv = chromium_argv(tmp, edge, addr, netlog)
    return Browser("chromium", argv, tmp / "chromium.log", r"DevTools listening on (ws://\S+)")


# The page's workload: returns a JSON string of per-step results and timings (ms). Every fetch is
# bounded by an AbortSignal; request bodies are ArrayBuffers (Firefox cannot stream a body).
# Hashing happens outside the timed part.
WORKLOAD = """
(async () => {
  const opts = (extra) => Object.assign({cache: 'no-store', signal: AbortSignal.timeout(60000)}, extra || {});
  const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');
  const sha = async (buf) => hex(await crypto.subtle.digest('SHA-256', buf));
  const out = {ms: {}};
  const timed = async (name, f) => {
    const t0 = performance.now();
    try { out[name] = await f(); } catch (e) { out[name] = {error: String(e)}; }
    out.ms[name] = performance.now() - t0;
  };
  const get = async (path) => {
    const r = await fetch(path, opts());
    const b = await r.arrayBuffer();
    return {path, status: r.status, bytes: b.byteLength, backend: r.headers.get('x-backend')};
  };
  await timed('gets', async () => { const rs = []; for (const p of GETS) rs.push(await get(p)); return rs; });
  await timed('parallel', () => Promise.all(Array.from({length: PARALLEL}, (_, i) => get(`/bytes/${1000 + i}?p=${i}`))));
  let buf = null;
  await timed('download', async () => {
    const r = await fetch(`/bytes/${DOWNLOAD}`, opts());
    buf = await r.arrayBuffer();
    return {status: r.status, bytes: buf.byteLength, backend: r.headers.get('x-backend')};
  });
  if (buf) out.download.sha256 = await sha(buf);
  for (const [name, n] of Object.entries(ECHOES)) {
    const body = new Uint8Array(n);
    for (let i = 0; i < n; i += 65536) crypto.getRandomValues(body.subarray(i, i + 65536));
    const sent = await sha(body);
    buf = null;
    await timed(name, async () => {
      const r = await fetch('/echo', opts({method: 'POST', body: body.buffer, headers: {'content-type': 'application/octet-stream'}}));
      buf = await r.arrayBuffer();
      return {status: r.status, bytes: buf.byteLength, backend: r.headers.get('x-backend')};
    });
    out[name].sent_bytes = n;
    out[name].sent_sha256 = sent;
    if (buf) out[name].sha256 = await sha(buf);
  }
  const proto = (type) => performance.getEntriesByType(type).map((e) => [e.name, e.nextHopProtocol]);
  out.navigation = proto('navigation');
  out.resources = proto('resource');
  out.user_agent = navigator.userAgent;
  return JSON.stringify(out);
})()
"""


def workload_js() -> str:
    consts = {"GETS": GETS, "PARALLEL": PARALLEL, "DOWNLOAD": DOWNLOAD, "ECHOES": ECHOES}
    decl = "".join(f"  const {k} = {json.dumps(v)};\n" for k, v in consts.items())
    # Constants inside the async function's scope, so a second evaluation cannot clash.
    return WORKLOAD.replace("(async () => {\n", "(async () => {\n" + decl, 1)


def check_workload(r: dict) -> None:
    """Functional assertions on what the page reported."""
    assert isinstance(r["gets"], list), r["gets"]
    for g in r["gets"]:
        assert g["status"] == (201 if g["path"] == "/status/201" else 200), g
        assert g["backend"] == BACKEND_NAME, g
    assert isinstance(r["parallel"], list) and len(r["parallel"]) == PARALLEL, r["parallel"]
    for i, p in enumerate(r["parallel"]):
        assert (p["status"], p["bytes"]) == (200, 1000 + i), p
    d = r["download"]
    assert (d.get("status"), d.get("bytes")) == (200, DOWNLOAD), d
    assert d["sha256"] == hashlib.sha256(pattern(DOWNLOAD)).hexdigest(), "10 MiB download: wrong bytes"
    for name, n in ECHOES.items():
        e = r[name]
        assert (e.get("status"), e.get("bytes")) == (200, n), (name, e)
        assert e["sha256"] == e["sent_sha256"], f"{name}: the echoed bytes differ from those sent"
    assert [p for _, p in r["navigation"]] == ["h3"], r["navigation"]
    resources = r["resources"]
    assert len(resources) >= len(GETS) + PARALLEL + 1 + len(ECHOES), resources
    assert all(p == "h3" for _, p in resources), [x for x in resources if x[1] != "h3"]


def run_workload(edge: Edge, name: str, start, session) -> dict:
    """Start a browser (`start()`) in the namespace, connect `session(endpoint)`, load the page,
    run the workload, close the browser, wait for Spooky's connections to close; return the
    page's results and record the SUMMARY line."""
    pid = edge.spooky.popen.pid
    lost0, udp0 = edge.metric("spooky_quic_packets_lost_total"), udp_counters(pid)
    with edge.ns.entered():
        browser = start()
    try:
        with watched(browser.proc), edge.ns.entered():
            s = session(browser.endpoint)
            try:
                s.load(f"{edge.origin}/hello")
                assert s.evaluate("document.body.innerText").strip() == f"hello from {BACKEND_NAME}"
                result = json.loads(s.evaluate(workload_js(), WORKLOAD_S))
                at_spooky, at_browser = socket_drops(pid, edge.port)
                result["reached_via"] = sorted(remote_families(pid, edge.port))
                s.quit()
            finally:
                s.close()
        browser.wait_exit(CLOSE_S)
    finally:
        browser.kill()
    closed = edge.wait_no_connections(CLOSE_S)
    lost1, udp1 = edge.metric("spooky_quic_packets_lost_total"), udp_counters(pid)
    ms = result["ms"]

    def f(key: str) -> str:
        v = ms.get(key)
        return "n/a" if v is None else f"{v:.0f} ms"

    line = (
        f"{result.get('user_agent', '?').split(') ')[-1]}: 10 MiB download {f('download')}, 8 MiB echo "
        f"{f('echo_8m')} (1 MiB echo {f('echo_1m')}, {PARALLEL} parallel GETs {f('parallel')}, {len(GETS)} GETs "
        f"{f('gets')}); spooky_quic_packets_lost_total {lost0:.0f} -> {lost1:.0f}"
        f"{'' if closed else ' (connections still open)'}; UDP RcvbufErrors {udp0['UdpRcvbufErrors']} -> "
        f"{udp1['UdpRcvbufErrors']}, Udp6RcvbufErrors {udp0['Udp6RcvbufErrors']} -> {udp1['Udp6RcvbufErrors']}; "
        f"socket drops at Spooky {at_spooky}, at the browser {at_browser}"
    )
    _RESULTS[name] = line
    print(f"\nSUMMARY browsers: {name}: {line}")
    # Paced BBR2 (the default) follows the browser's delivery rate: nothing overflows a socket
    # buffer in the namespace (with cubic Chromium dropped 60-2,400 datagrams a run).
    drops = sum(udp1[k] - udp0[k] for k in ("UdpRcvbufErrors", "Udp6RcvbufErrors"))
    assert drops == 0, f"{drops} datagrams dropped at a receive buffer: {line}"
    return result


# --- Chromium ----------------------------------------------------------------------------------


def netlog(path: Path, port: int) -> dict:
    """From Chromium's net log: the hosts of its QUIC sessions, the addresses its UDP sockets
    connected to on `port` and elsewhere (Chromium probes a public address to learn its local
    one; the namespace has no route for it), how often it migrated to another port, and the
    transport error codes of the CONNECTION_CLOSE frames it received."""
    log = json.loads(path.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = {"hosts": set(), "peers": set(), "elsewhere": set(), "port_migrations": 0, "closed_by_peer": []}
    for ev in log.get("events", []):
        kind, params = types.get(ev["type"]), ev.get("params", {})
        if kind == "QUIC_SESSION" and "host" in params:
            out["hosts"].add(f"{params['host']}:{params.get('port', '')}")
        elif kind == "UDP_CONNECT" and "address" in params:
            out["peers" if params["address"].endswith(f":{port}") else "elsewhere"].add(params["address"])
        elif kind == "QUIC_PORT_MIGRATION_SUCCESS":
            out["port_migrations"] += 1
        elif kind == "QUIC_SESSION_CONNECTION_CLOSE_FRAME_RECEIVED":
            out["closed_by_peer"].append(f"0x{params.get('quic_wire_error', 0):x}")
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup installs it)")
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_chromium_h3(edge, tmp_path, family):
    """Chromium, forced onto QUIC for https://localhost:PORT, with localhost mapped to 127.0.0.1
    (ipv4) or [::1] (ipv6): the page and every fetch() answered over h3, byte-exact, on one UDP
    path to Spooky."""
    addr = {"ipv4": "127.0.0.1", "ipv6": "[::1]"}[family]
    # Without a net log: it would cost Chromium more than the transfers it times.
    result = run_workload(edge, f"chromium/{family}", lambda: start_chromium(tmp_path, edge, addr, netlog=False), Cdp)
    check_workload(result)
    print(f"chromium/{family}: UDP sockets to Spooky's port reach it via {result['reached_via']}")
    assert result["reached_via"] == [addr], f"the browser's UDP sockets to Spooky's port: {result['reached_via']}"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup installs it)")
def test_chromium_port_migration_after_stall(lab, tmp_path):
    """Spooky with its QUIC defaults (active migration allowed) stops just as Chromium asks for
    10 MiB, until Chromium declares the path degrading and opens a socket for a new UDP port; then
    Spooky runs again, and Chromium moves the connection to the new port. The download must still
    finish within AFTER_STALL_S.

    Before Spooky's quiche patch 2 it mostly did not (see the module docstring): the download
    crawled under the anti-amplification limit, or the connection closed with PROTOCOL_VIOLATION;
    about one run in five recovered. It fails outright if Chromium did not migrate, since then it
    no longer exercises that path."""
    edge = lab.spooky(MIGRATION_PORT, "", "spooky-defaults")
    with watched(edge.spooky), edge.ns.entered():
        browser = start_chromium(tmp_path, edge, "127.0.0.1")
        try:
            with watched(browser.proc):
                s = Cdp(browser.endpoint)
                try:
                    s.load(f"{edge.origin}/hello")
                    # The request goes out while Spooky is stopped: a retransmittable packet left
                    # unacknowledged is what makes Chromium call the path degrading (ACKs alone,
                    # as during a download, would not). Spooky runs again once Chromium opened the
                    # socket for its new port (its probe then waits in Spooky's socket), or after
                    # STALL_S.
                    pid = edge.spooky.popen.pid
                    before = connected_to(pid, edge.port)
                    try:
                        stop_process(pid)
                        s.evaluate(
                            f"window.dl = fetch('/bytes/{DOWNLOAD}', {{cache: 'no-store'}})"
                            ".then((r) => r.arrayBuffer()).then((b) => b.byteLength).catch((e) => String(e)); 0"
                        )
                        deadline = time.monotonic() + STALL_S
                        while time.monotonic() < deadline and not connected_to(pid, edge.port) - before:
                            time.sleep(0.02)
                        stalled = STALL_S - (deadline - time.monotonic())
                        time.sleep(0.1)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    got = s.evaluate(
                        f"Promise.race([window.dl, new Promise((r) => setTimeout(() => r('not done after "
                        f"{AFTER_STALL_S} s'), {AFTER_STALL_S * 1000}))])",
                        AFTER_STALL_S + STEP_S,
                    )
                    s.quit()
                finally:
                    s.close()
            browser.wait_exit(CLOSE_S)
        finally:
            browser.kill()
    migrations = edge.metric("spooky_connection_migrations_total")
    log = netlog(tmp_path / "netlog.json", edge.port)
    detail = (
        f"after a {stalled:.2f}s stall: download {got!r}; Chromium port migrations {log['port_migrations']}, "
        f"spooky_connection_migrations_total {migrations:.0f}, CONNECTION_CLOSE from Spooky: "
        f"{', '.join(log['closed_by_peer']) or 'none'} (0xa is PROTOCOL_VIOLATION)"
    )
    print(f"\nSUMMARY browsers: chromium port migration: {detail}")
    assert log["port_migrations"] > 0, f"Chromium did not migrate, the test exercises nothing: {detail}"
    assert got == DOWNLOAD, f"the download did not finish after the port migration: {detail}"
    # Spooky validated the new port and moved the connection there.
    assert migrations >= 1, f"Spooky never moved the connection to Chromium's new port: {detail}"
    (tmp_path / "netlog.json").unlink()


# --- Firefox -----------------------------------------------------------------------------------


def firefox_prefs(port: int, mapping: bool = True) -> dict:
    """With `mapping`, h3 for localhost:port comes from the testing alt-svc mapping; without,
    only from the Alt-Svc fields Firefox receives."""
    return {
        "network.http.http3.enable": True,
        **({"network.http.http3.alt-svc-mapping-for-testing": f"localhost;h3=:{port}"} if mapping else {}),
        "network.http.http3.disable_when_third_party_roots_found": False,
        # A quiet start: no first-run pages, default-browser check, updates or telemetry.
        "browser.shell.checkDefaultBrowser": False,
        "browser.startup.homepage_override.mstone": "ignore",
        "browser.aboutwelcome.enabled": False,
        "app.update.disabledForTesting": True,
        "datareporting.policy.dataSubmissionEnabled": False,
        "toolkit.telemetry.reportingpolicy.firstRun": False,
        "network.captive-portal-service.enabled": False,
        "network.connectivity-service.enabled": False,
    }


def firefox_profile(dir: Path, cert: Path, port: int, mapping: bool = True) -> None:
    """A fresh profile: the prefs above, and the test certificate in its NSS database."""
    dir.mkdir()
    prefs = "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in firefox_prefs(port, mapping).items())
    (dir / "user.js").write_text(prefs)
    db = f"sql:{dir}"
    subprocess.run([CERTUTIL, "-N", "-d", db, "--empty-password"], check=True, timeout=30)
    subprocess.run([CERTUTIL, "-A", "-n", "spooky-test", "-t", "C,,", "-i", str(cert), "-d", db], check=True, timeout=30)


@pytest.mark.skipif(
    FIREFOX is None or CERTUTIL is None,
    reason="firefox-esr or certutil (libnss3-tools) is not installed (scripts/setup installs them)",
)
def test_firefox_h3(edge, tmp_path):
    """Firefox ESR with h3 for localhost:PORT from its testing alt-svc mapping and the test
    certificate in its profile: the page and every fetch() answered over h3, byte-exact."""
    profile = tmp_path / "profile"
    firefox_profile(profile, edge.cert, edge.port)
    argv = [
        "env", "MOZ_CRASHREPORTER_DISABLE=1", "MOZ_HEADLESS=1",
        FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0", "about:blank",
    ]  # fmt: skip

    def start():
        return Browser("firefox", argv, tmp_path / "firefox.log", r"WebDriver BiDi listening on (ws://\S+)")

    check_workload(run_workload(edge, "firefox", start, Bidi))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup installs it)")
def test_chromium_rejecting_the_certificate_shows_in_the_handshake_failure_metric(edge, tmp_path):
    """Chromium without `--ignore-certificate-errors-spki-list` does not trust the test's
    certificate: the navigation fails, and Spooky counts the handshake failures by the alert
    Chromium sends (`spooky_handshake_failures_total{cause=...}`) and logs them."""

    def failures() -> dict[str, float]:
        with edge.ns.entered():
            text = urllib.request.urlopen(f"http://127.0.0.1:{edge.admin_port}/metrics", timeout=5).read().decode()
        out = {}
        for m in re.finditer(r'^spooky_handshake_failures_total\{cause="([a-z_]+)"\} (\S+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    before = failures()
    argv = [a for a in chromium_argv(tmp_path, edge, "127.0.0.1", netlog=False) if not a.startswith("--ignore-certificate-errors")]
    with edge.ns.entered():
        browser = Browser("chromium", argv, tmp_path / "chromium.log", r"DevTools listening on (ws://\S+)")
    try:
        with watched(browser.proc), edge.ns.entered():
            s = Cdp(browser.endpoint)
            try:
                nav = s.call("Page.navigate", {"url": f"{edge.origin}/hello"}, sessionId=s.session)
                deadline = time.monotonic() + STEP_S
                grown: dict[str, float] = {}
                while not grown and time.monotonic() < deadline:
                    time.sleep(0.2)
                    grown = {c: v - before.get(c, 0) for c, v in failures().items() if v > before.get(c, 0)}
                s.quit()
            finally:
                s.close()
        browser.wait_exit(CLOSE_S)
    finally:
        browser.kill()
    print(f"\nchromium without the certificate's SPKI: navigation {nav}; handshake failures {grown}")
    assert nav.get("errorText"), f"the navigation succeeded without trusting the certificate: {nav}"
    assert grown, "no handshake failure counted"
    assert set(grown) <= CERTIFICATE_ALERTS, grown
    assert "handshake failed" in edge.spooky.output()


# TLS alerts a client sends when it does not trust a certificate.
CERTIFICATE_ALERTS = {"bad_certificate", "unknown_ca", "certificate_unknown", "unsupported_certificate"}
