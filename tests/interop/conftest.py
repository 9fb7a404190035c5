"""Fixtures for the aioquic interop suite: spooky-backend, nginx and spooky as child processes.

Binaries come from $SPOOKY_BIN_DIR (default: <repo>/target/debug); nginx from $NGINX
(default: /usr/sbin/nginx). Each process's output is kept in a log file in the session's
tmp dir; spooky's stderr tail is attached to every failing test's report.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("SPOOKY_BIN_DIR", REPO / "target" / "debug"))
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
READY_TIMEOUT = 30.0
BACKEND_NAME = "interop-demo"

_STACK: "Stack | None" = None
# Processes of module fixtures whose output tail goes into failing tests' reports (`watched`).
_WATCHED: list["Proc"] = []


class Proc:
    """A child process whose merged stdout/stderr is copied to a log file by a reader thread.

    If `ready_re` is given, `wait_ready()` returns its first match on an output line.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, ready_re: str | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._ready_re = re.compile(ready_re) if ready_re else None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._match: re.Match | None = None
        self._ready = threading.Event()
        self._eof = threading.Event()
        self._log = open(log_path, "w", encoding="utf-8", errors="replace")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._thread = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self._lock:
                self._lines.append(line)
                self._log.write(line)
                self._log.flush()
            if self._ready_re is not None and self._match is None:
                m = self._ready_re.search(line)
                if m:
                    self._match = m
                    self._ready.set()
        self._eof.set()

    def output(self) -> str:
        """Everything the process printed so far."""
        with self._lock:
            return "".join(self._lines)

    def tail(self, n: int = 60) -> str:
        with self._lock:
            return "".join(self._lines[-n:])

    def _fail(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} {why}\ncommand: {' '.join(map(str, self.argv))}\n"
            f"exit status: {self.popen.poll()}\n--- output ({self.log_path}) ---\n{self.output()}"
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> re.Match:
        """Wait for the readiness line; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                assert self._match is not None
                return self._match
            if self.popen.poll() is not None and self._eof.wait(0.5):
                if self._ready.is_set():
                    continue
                raise self._fail("exited before becoming ready")
        raise self._fail(f"not ready within {timeout}s")

    def wait_tcp(self, port: int, timeout: float = READY_TIMEOUT) -> None:
        """Poll until 127.0.0.1:port accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                self._eof.wait(1)
                raise self._fail("exited before accepting connections")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise self._fail(f"did not accept TCP connections on port {port} within {timeout}s")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """Terminate; kill after 5 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._thread.join(5)
        with self._lock:
            self._log.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the OS considers free right now (bind to 0, close)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str) -> Path:
    path = BIN_DIR / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(f"{path} not found or not executable (set SPOOKY_BIN_DIR)")
    return path


def start_backend(name: str, log: Path, proc_name: str = "spooky-backend") -> tuple[Proc, int]:
    """Runs spooky-backend (one thread, answering as `name` in x-backend) until it listens;
    returns the process and its port. Stopped again if it never becomes ready."""
    argv = [str(find_binary("spooky-backend")), "-l", "127.0.0.1:0", "-n", name, "-t", "1"]
    proc = Proc(proc_name, argv, log, ready_re=r"listening on 127\.0\.0\.1:(\d+)")
    try:
        return proc, int(proc.wait_ready().group(1))
    except BaseException:
        proc.stop()
        raise


SPOOKY_READY = r"spooky ready.*listen=127\.0\.0\.1:(\d+).*admin=127\.0\.0\.1:(\d+)"


def start_spooky(cfg: Path, log: Path, name: str = "spooky") -> tuple[Proc, int, int]:
    """Runs `spooky run --config cfg` (the config must have an admin listener) until it is
    ready; returns the process, its UDP port and its admin port. Stopped again if it never
    becomes ready."""
    proc = Proc(name, [str(find_binary("spooky")), "run", "--config", str(cfg)], log, ready_re=SPOOKY_READY)
    try:
        m = proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    return proc, int(m.group(1)), int(m.group(2))


def spooky_metric(admin_port: int, name: str, label: str = "") -> float:
    """Sum of every series of `name` in Spooky's /metrics (only those containing `label`,
    e.g. 'class="reset"', if given)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and label in (m.group(1) or ""):
            total += float(m.group(2))
    return total


@dataclass
class Stack:
    """The running processes and what the tests need to know about them."""

    tmp: Path
    spooky_port: int
    admin_port: int
    backend_port: int
    backend_name: str
    nginx_port: int
    dead_port: int
    nginx_file: bytes
    nginx_hello: bytes
    spooky: Proc
    backend: Proc
    nginx: Proc


def write_nginx_conf(tmp: Path, port: int, locations: str, tls: tuple[Path, Path] | None = None) -> Path:
    """nginx's prefix dir `tmp` (temp dirs, config) for one h2c server on 127.0.0.1:port with
    `locations` in its server block; everything else is nginx's default (no limits tuned).
    With `tls` (certificate, key): TLS + HTTP/2 on TCP 127.0.0.1:port and [::1]:port instead."""
    if tls is None:
        listen = f"listen 127.0.0.1:{port} http2;"
    else:
        listen = (
            f"listen 127.0.0.1:{port} ssl http2;\n        listen [::1]:{port} ssl http2;\n"
            f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};"
        )
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "temp" / d).mkdir(parents=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""\
user root;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/temp/body;
    proxy_temp_path {tmp}/temp/proxy;
    fastcgi_temp_path {tmp}/temp/fastcgi;
    uwsgi_temp_path {tmp}/temp/uwsgi;
    scgi_temp_path {tmp}/temp/scgi;
    default_type application/octet-stream;
    types {{ text/plain txt; }}
    server {{
        {listen}
        server_name localhost;
{locations}
    }}
}}
"""
    )
    return conf


def start_nginx(prefix: Path, conf: Path, port: int, log: Path, name: str = "nginx") -> Proc:
    """Runs nginx in the foreground on `conf` until it accepts TCP on `port`. Stopped again if
    it never does."""
    proc = Proc(
        name,
        [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log", "-g", "daemon off;"],
        log,
    )
    try:
        proc.wait_tcp(port)
    except BaseException:
        proc.stop()
        raise
    return proc


def write_nginx_tree(tmp: Path, port: int) -> tuple[Path, bytes, bytes]:
    """Create nginx's prefix dir: config, temp dirs, and the static files it serves."""
    www = tmp / "www"
    www.mkdir()
    file_bin = os.urandom(1 << 20)
    hello = b"hello from nginx\n"
    (www / "file.bin").write_bytes(file_bin)
    (www / "hello.txt").write_bytes(hello)
    conf = write_nginx_conf(
        tmp,
        port,
        f"""\
        location /nginx/ {{
            alias {www}/;
        }}
        location = /nginx/teapot {{
            return 418 "short and stout\\n";
        }}""",
    )
    return conf, file_bin, hello


def spooky_config(backend_port: int, nginx_port: int, dead_port: int) -> str:
    """Spooky config: demo on localhost and only.example, /nginx/ and /dead/ on any host."""
    return f"""\
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
workers: 2
tls:
  self_signed: [localhost]
timeouts: {{ connect: 2s, request: 5s, idle: 30s }}
upstreams:
  nginx:
    backends:
      - address: 127.0.0.1:{nginx_port}
  demo:
    backends:
      - address: 127.0.0.1:{backend_port}
        weight: 1
  dead:
    backends:
      - address: 127.0.0.1:{dead_port}
routes:
  - path_prefix: /nginx/
    upstream: nginx
  - path_prefix: /dead/
    upstream: dead
  - host: only.example
    path_prefix: /
    upstream: demo
  - host: localhost
    path_prefix: /
    upstream: demo
"""


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """Start spooky-backend, nginx and spooky; stop them all at the end of the session."""
    global _STACK
    tmp = tmp_path_factory.mktemp("interop")
    procs: list[Proc] = []
    try:
        backend, backend_port = start_backend(BACKEND_NAME, tmp / "backend.log")
        procs.append(backend)

        nginx_dir = tmp / "nginx"
        nginx_dir.mkdir()
        nginx_port = free_port()
        conf, file_bin, hello = write_nginx_tree(nginx_dir, nginx_port)
        nginx = start_nginx(nginx_dir, conf, nginx_port, tmp / "nginx.log")
        procs.append(nginx)

        dead_port = free_port()
        cfg = tmp / "spooky.yaml"
        cfg.write_text(spooky_config(backend_port, nginx_port, dead_port))
        spooky, spooky_port, admin_port = start_spooky(cfg, tmp / "spooky.stderr.log")
        procs.append(spooky)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise

    _STACK = Stack(
        tmp=tmp,
        spooky_port=spooky_port,
        admin_port=admin_port,
        backend_port=backend_port,
        backend_name=BACKEND_NAME,
        nginx_port=nginx_port,
        dead_port=dead_port,
        nginx_file=file_bin,
        nginx_hello=hello,
        spooky=spooky,
        backend=backend,
        nginx=nginx,
    )
    try:
        yield _STACK
    finally:
        _STACK = None
        for p in reversed(procs):
            p.stop()


@contextlib.contextmanager
def watched(*procs: Proc):
    """While inside, failing tests' reports carry these processes' output tails too."""
    _WATCHED.extend(procs)
    try:
        yield
    finally:
        for p in procs:
            _WATCHED.remove(p)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the recent output (and liveness) of spooky and of `watched` processes to failing
    test reports."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    procs = ([_STACK.spooky] if _STACK is not None and "stack" in item.fixturenames else []) + _WATCHED
    for p in procs:
        state = "running" if p.alive() else f"EXITED ({p.popen.poll()})"
        report.sections.append((f"{p.name} output tail ({state}; full log {p.log_path})", p.tail(60)))
