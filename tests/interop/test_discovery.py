"""HTTP/3 discovery through a TCP front: browsers find Spooky the way users' browsers do.

The setup an operator runs (README, "Deploying"): a stock TCP proxy they already have, here
nginx from Debian, serves TLS + HTTP/2 on TCP port P and adds `Alt-Svc: h3=":P"; ma=86400` to
its responses; Spooky serves HTTP/3 on UDP port P with the same certificate, in front of the same
backend, and sends the same `alt-svc` itself (`headers.alt_svc`), so clients on HTTP/3 keep
their record of it fresh. The backend is hypercorn (the interop suite's ASGI app), which speaks
HTTP/1.1 to nginx (`proxy_pass`) and h2c to Spooky.

Chromium and Firefox ESR get no QUIC-forcing flag or pref: no `--origin-to-force-quic-on`, no
`network.http.http3.alt-svc-mapping-for-testing`. They only trust the test certificate (Chromium
by its SPKI hash, or a private CA in its NSS database; Firefox by the certificate in its
profile's NSS database) and learn about h3 from the Alt-Svc field. Firefox then moves to h3;
Chromium dials Spooky and refuses the certificate, because its QUIC accepts only roots built
into Chromium (see the Chromium test). The browser's own record says which protocol carried each
request (`performance` entries' `nextHopProtocol`): for Firefox the first navigation is `h2`
(nginx), later requests `h3` (Spooky); responses that passed Spooky carry `via: 2 spooky`, nginx's access log shows the
HTTP/2 requests it served, and Spooky's `spooky_requests_total` counts the HTTP/3 ones.

Firefox keeps `network.http.http3.disable_when_third_party_roots_found` off, as
test_browsers.py does: by default Firefox turns HTTP/3 off entirely while any certificate outside
its built-in roots is trusted (an enterprise-interception guard), and the test certificate is such
a certificate (`test_firefox_keeps_h2_while_a_third_party_root_is_trusted` shows it). A site
with a publicly trusted certificate does not meet that guard.

Everything runs in a network namespace of test_browsers.py's kind (`Netns`), with only loopback.
Run: `.venv/bin/python -m pytest tests/interop/test_discovery.py -q -s`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Proc, free_port, start_nginx, start_spooky, watched, write_nginx_conf
from test_browsers import (
    CERTUTIL,
    CHROMIUM,
    CLOSE_S,
    FIREFOX,
    STEP_S,
    Bidi,
    Browser,
    Cdp,
    Edge,
    Netns,
    chromium_argv,
    firefox_profile,
    make_certificate,
    netlog,
)

HERE = Path(__file__).resolve().parent
HYPERCORN = Path(sys.executable).parent / "hypercorn"
PORT = 8443  # TCP (nginx) and UDP (Spooky) inside the namespace
ALT_SVC = f'h3=":{PORT}"; ma=86400'
FETCHES = 40  # at most this many fetch() calls, 250 ms apart, until HTTP/3 carried some
H3_WANTED = 5  # stop once this many of them went over h3


def spooky_config(backend_port: int, cert: Path, key: Path) -> str:
    return f"""\
listen: ["127.0.0.1:{PORT}", "[::1]:{PORT}"]
admin: {{ listen: 127.0.0.1:0 }}
workers: 2
tls:
  cert: {cert}
  key: {key}
quic: {{ active_migration: false }}
headers:
  alt_svc: '{ALT_SVC}'
upstreams:
  app:
    backends:
      - address: 127.0.0.1:{backend_port}
routes:
  - upstream: app
"""


def nginx_locations(backend_port: int, tmp: Path) -> str:
    """Only what a TCP front needs: proxy to the backend and advertise h3 on the same port."""
    return f"""\
        access_log {tmp}/access.log;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            add_header Alt-Svc '{ALT_SVC}' always;
        }}"""


def make_ca_signed(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA (EC P-256) and a certificate for localhost it signed: returns the CA
    certificate, the chain (leaf, CA) and the leaf's key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, key, signer, ca: bool, sans=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Spooky test CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, True)
    sans = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    leaf = build(leaf_name, ca_name, key, ca_key, False, sans)
    pem = serialization.Encoding.PEM
    ca_path, chain_path, key_path = tmp / "ca.pem", tmp / "chain.pem", tmp / "leaf-key.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    chain_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, chain_path, key_path


class Front:
    """hypercorn, nginx (TCP front) and Spooky (UDP) in a namespace of their own, both with the
    same certificate: self-signed (`ca=False`; browsers trust it by its SPKI hash or as an
    NSS database entry) or signed by a private CA (`ca=True`, `self.ca`)."""

    def __init__(self, tmp: Path, ca: bool = False):
        self.tmp = tmp
        self.ns = Netns()
        self.procs: list[Proc] = []
        try:
            assert self.ns.links() == ["lo"], self.ns.links()
            self.cert, self.key, self.spki = make_certificate(tmp)
            self.ca = None
            if ca:
                self.ca, self.cert, self.key = make_ca_signed(tmp)
            with self.ns.entered():
                backend_port = free_port()
                app = f"{HERE / 'backends' / 'asgi_app'}:app"
                hc = Proc("hypercorn", [str(HYPERCORN), "--bind", f"127.0.0.1:{backend_port}", app], tmp / "hypercorn.log")
                self.procs.append(hc)
                hc.wait_tcp(backend_port)
                prefix = tmp / "nginx"
                prefix.mkdir()
                conf = write_nginx_conf(prefix, PORT, nginx_locations(backend_port, prefix), tls=(self.cert, self.key))
                self.procs.append(start_nginx(prefix, conf, PORT, tmp / "nginx.log"))
                cfg = tmp / "spooky.yaml"
                cfg.write_text(spooky_config(backend_port, self.cert, self.key))
                spooky, port, admin = start_spooky(cfg, tmp / "spooky.stderr.log")
                self.procs.append(spooky)
            assert port == PORT
            self.edge = Edge(ns=self.ns, spooky=spooky, port=PORT, admin_port=admin, spki=self.spki, cert=self.cert)
        except BaseException:
            self.close()
            raise

    def nginx_requests(self) -> list[str]:
        """Request lines and protocols nginx served (`GET /x HTTP/2.0`)."""
        log = self.tmp / "nginx" / "access.log"
        return re.findall(r'"([A-Z]+ \S+ HTTP/[0-9.]+)"', log.read_text()) if log.exists() else []

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.ns.close()


@pytest.fixture
def front(tmp_path, request):
    f = Front(tmp_path, ca=getattr(request, "param", False))
    try:
        with watched(*f.procs):
            yield f
    finally:
        f.close()


# fetch() same-origin requests one after another until H3_WANTED went over h3 (or FETCHES were
# made); returns, per request, the protocol the browser's timing entry names and the `via` and
# `alt-svc` fields of the response.
DISCOVER = """
(async () => {
  const out = [];
  let h3 = 0;
  for (let i = 0; i < FETCHES && h3 < H3_WANTED; i++) {
    const url = new URL(`/bytes/${1000 + i}?i=${i}`, location.href).href;
    let row = {i};
    try {
      const r = await fetch(url, {cache: 'no-store', signal: AbortSignal.timeout(10000)});
      const b = await r.arrayBuffer();
      const e = performance.getEntriesByName(url).pop();
      row = {i, status: r.status, bytes: b.byteLength, protocol: e ? e.nextHopProtocol : null,
             via: r.headers.get('via'), alt_svc: r.headers.get('alt-svc')};
    } catch (e) { row.error = String(e); }
    out.push(row);
    if (row.protocol === 'h3') h3++;
    await new Promise((r) => setTimeout(r, 250));
  }
  return JSON.stringify(out);
})()
""".replace("FETCHES", str(FETCHES)).replace("H3_WANTED", str(H3_WANTED))

NAVIGATION = "JSON.stringify(performance.getEntriesByType('navigation').map((e) => e.nextHopProtocol))"


def discover(front: Front, name: str, start, session) -> dict:
    """Start a browser in the namespace, navigate to the site through the TCP front, fetch until
    h3 carries requests, navigate again; returns what the browser and the servers recorded."""
    edge = front.edge
    before = edge.metric("spooky_requests_total")
    with front.ns.entered():
        browser = start()
    try:
        with watched(browser.proc), front.ns.entered():
            s = session(browser.endpoint)
            try:
                s.load(f"{edge.origin}/stats")
                first_nav = json.loads(s.evaluate(NAVIGATION))
                fetches = json.loads(s.evaluate(DISCOVER, STEP_S + FETCHES * 11))
                s.load(f"{edge.origin}/stats?again=1")
                second_nav = json.loads(s.evaluate(NAVIGATION))
                s.quit()
            finally:
                s.close()
        browser.wait_exit(CLOSE_S)
    finally:
        browser.kill()
    r = {
        "first_navigation": first_nav,
        "fetches": fetches,
        "second_navigation": second_nav,
        "spooky_requests": edge.metric("spooky_requests_total") - before,
        "nginx": front.nginx_requests(),
    }
    protocols = [f.get("protocol") or f.get("error") for f in fetches]
    print(
        f"\nSUMMARY discovery: {name}: first navigation {first_nav}, fetches {protocols}, second navigation "
        f"{second_nav}; nginx served {len(r['nginx'])} ({sorted(set(x.rsplit(' ', 1)[1] for x in r['nginx']))}), "
        f"spooky_requests_total +{r['spooky_requests']:.0f}"
    )
    return r


def check_discovery(r: dict) -> None:
    assert r["first_navigation"] == ["h2"], r["first_navigation"]
    assert r["nginx"] and r["nginx"][0] == "GET /stats HTTP/2.0", r["nginx"]
    assert all(line.endswith("HTTP/2.0") for line in r["nginx"]), r["nginx"]
    fetches = r["fetches"]
    assert all(f.get("status") == 200 and f.get("bytes") == 1000 + f["i"] for f in fetches), fetches
    h3 = [f for f in fetches if f["protocol"] == "h3"]
    assert len(h3) >= 1, f"no request went over h3: {fetches}"
    # Once on h3, the browser stays on it; every h3 response passed Spooky, with its alt-svc.
    first = fetches.index(h3[0])
    assert all(f["protocol"] == "h3" for f in fetches[first:]), fetches
    assert all(f["via"] == "2 spooky" and f["alt_svc"] == ALT_SVC for f in h3), h3
    assert all(f["protocol"] == "h2" and f["via"] is None for f in fetches[:first]), fetches
    assert r["second_navigation"] == ["h3"], r["second_navigation"]
    # Spooky counted every h3 request the page saw (and the browser may have sent a favicon).
    assert r["spooky_requests"] >= len(h3) + 1, r
    assert len(r["nginx"]) >= 1 + first, r["nginx"]


def handshake_failures(edge: Edge) -> dict[str, float]:
    with edge.ns.entered():
        text = urllib.request.urlopen(f"http://127.0.0.1:{edge.admin_port}/metrics", timeout=5).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^spooky_handshake_failures_total\{cause="([a-z_]+)"\} (\S+)$', text, re.M)
    }


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup installs it)")
@pytest.mark.parametrize("front", [False, True], ids=["spki-pinned", "private-ca-in-nssdb"], indirect=True)
def test_chromium_finds_spooky_through_alt_svc_and_refuses_a_root_it_does_not_know(front, tmp_path):
    """Chromium without --origin-to-force-quic-on learns h3=":P" from nginx's Alt-Svc and opens
    a QUIC connection to Spooky on UDP P, but closes it during the handshake (TLS alert 46,
    certificate_unknown, counted by Spooky): Chromium's QUIC accepts only certificates that chain
    to a root built into Chromium (ProofVerifierChromium: ERR_QUIC_CERT_ROOT_NOT_KNOWN, waived only
    for --origin-to-force-quic-on hosts), and the net log says `cert_is_issued_by_known_root =
    false`. Twice: the self-signed certificate trusted by its SPKI hash
    (--ignore-certificate-errors-spki-list), and a private CA trusted in Chromium's NSS database
    ($HOME/.pki/nssdb, as an enterprise or mkcert root is), no certificate flag at all. No request
    fails: the page keeps using h2 through nginx. With a publicly trusted certificate the same
    setup moves Chromium to h3; offline, that cannot be shown (README, "Deploying")."""
    argv = chromium_argv(tmp_path, front.edge, "127.0.0.1", netlog=True, force_quic=False)
    assert not any("quic" in a for a in argv), argv
    if front.ca is not None:
        home = tmp_path / "home"
        db = home / ".pki" / "nssdb"
        db.mkdir(parents=True)
        subprocess.run([CERTUTIL, "-N", "-d", f"sql:{db}", "--empty-password"], check=True, timeout=30)
        add = [CERTUTIL, "-A", "-n", "spooky-test-ca", "-t", "C,,", "-i", str(front.ca), "-d", f"sql:{db}"]
        subprocess.run(add, check=True, timeout=30)
        argv = ["env", f"HOME={home}"] + [a for a in argv if not a.startswith("--ignore-certificate-errors")]

    def start():
        return Browser("chromium", argv, tmp_path / "chromium.log", r"DevTools listening on (ws://\S+)")

    before = handshake_failures(front.edge)
    r = discover(front, "chromium/" + ("private CA in nssdb" if front.ca else "SPKI-pinned"), start, Cdp)
    grown = {c: v - before.get(c, 0) for c, v in handshake_failures(front.edge).items() if v > before.get(c, 0)}
    log = netlog(tmp_path / "netlog.json", PORT)
    text = (tmp_path / "netlog.json").read_text()
    known_root = sorted(set(re.findall(r"cert_is_issued_by_known_root = (\w+)", text)))
    print(
        f"chromium: QUIC sessions {sorted(log['hosts'])} via {sorted(log['peers'])}; Spooky's handshake failures "
        f"{grown}; cert_is_issued_by_known_root {known_root}"
    )
    # Discovery: the Alt-Svc from the TCP front made Chromium dial Spooky on UDP P.
    assert log["hosts"] == {f"localhost:{PORT}"}, log
    assert log["peers"] == {f"127.0.0.1:{PORT}"}, log
    assert grown and set(grown) == {"certificate_unknown"}, grown
    assert "cert_is_issued_by_known_root = false" in text
    # ...and nothing failed: every request was answered over h2 by nginx.
    assert r["first_navigation"] == ["h2"] and r["second_navigation"] == ["h2"], r
    fetches = r["fetches"]
    assert len(fetches) == FETCHES, fetches
    assert all(f.get("status") == 200 and f.get("protocol") == "h2" and f.get("via") is None for f in fetches), fetches
    assert r["spooky_requests"] == 0, r
    assert len([x for x in r["nginx"] if x.startswith("GET /bytes/")]) == FETCHES, r["nginx"]


def start_firefox(front: Front, tmp_path: Path, third_party_roots_guard: bool):
    """Firefox ESR with a fresh profile that trusts the test certificate and has no alt-svc
    mapping; with `third_party_roots_guard`, Firefox's default for
    `network.http.http3.disable_when_third_party_roots_found` (on) is left in force."""
    profile = tmp_path / "profile"
    firefox_profile(profile, front.cert, PORT, mapping=False)
    prefs = (profile / "user.js").read_text()
    assert "alt-svc-mapping" not in prefs
    if third_party_roots_guard:
        kept = [line for line in prefs.splitlines() if "disable_when_third_party_roots_found" not in line]
        (profile / "user.js").write_text("".join(line + "\n" for line in kept))
    argv = [
        "env", "MOZ_CRASHREPORTER_DISABLE=1", "MOZ_HEADLESS=1",
        FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0", "about:blank",
    ]  # fmt: skip
    return lambda: Browser("firefox", argv, tmp_path / "firefox.log", r"WebDriver BiDi listening on (ws://\S+)")


FIREFOX_MISSING = FIREFOX is None or CERTUTIL is None
FIREFOX_WHY = "firefox-esr or certutil (libnss3-tools) is not installed (scripts/setup installs them)"


@pytest.mark.skipif(FIREFOX_MISSING, reason=FIREFOX_WHY)
def test_firefox_discovers_h3_through_alt_svc(front, tmp_path):
    """Firefox ESR without the testing alt-svc mapping: h2 through nginx first, then h3."""
    check_discovery(discover(front, "firefox", start_firefox(front, tmp_path, False), Bidi))


@pytest.mark.skipif(FIREFOX_MISSING, reason=FIREFOX_WHY)
def test_firefox_keeps_h2_while_a_third_party_root_is_trusted(front, tmp_path):
    """With its default `disable_when_third_party_roots_found`, Firefox does not use HTTP/3 at
    all while a root outside its built-in list is trusted (the test's certificate is one): every
    request stays on h2 through nginx, and Spooky serves none."""
    r = discover(front, "firefox/third-party-roots guard on", start_firefox(front, tmp_path, True), Bidi)
    assert r["first_navigation"] == r["second_navigation"] == ["h2"], r
    assert len(r["fetches"]) == FETCHES and all(f.get("protocol") == "h2" for f in r["fetches"]), r["fetches"]
    assert r["spooky_requests"] == 0, r
