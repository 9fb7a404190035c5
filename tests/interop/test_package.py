"""The Debian package (scripts/package): built from the binaries under test, inspected with
`dpkg-deb --info/--contents`, installed into a fresh root (extracted, `dpkg-deb -x`), its
systemd unit verified there by `systemd-analyze verify` and scored by `systemd-analyze
security`, its sysctl drop-in matched against the buffer size Spooky asks for, and the shipped
configuration checked with the shipped binary: refused for the missing certificate (the
operator's step, named by key), accepted once a certificate is in /etc/spooky/tls.

Not run here: the maintainer scripts themselves (they would create a user and change sysctls on
this machine); they are syntax-checked (`sh -n`).
Run: `.venv/bin/python -m pytest tests/interop/test_package.py -q -s`.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN_DIR, REPO

DPKG_DEB = shutil.which("dpkg-deb")
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    DPKG_DEB is None or ANALYZE is None, reason="dpkg-deb or systemd-analyze missing (scripts/setup installs them)"
)

UNIT = "/lib/systemd/system/spooky.service"
EXPECTED = {
    # path: (mode, kind)
    "./usr/bin/spooky": ("-rwxr-xr-x", "file"),
    "./usr/bin/spooky-client": ("-rwxr-xr-x", "file"),
    "./etc/spooky/": ("drwxr-xr-x", "dir"),
    "./etc/spooky/tls/": ("drwxr-xr-x", "dir"),
    "./etc/spooky/spooky.yaml": ("-rw-r--r--", "file"),
    f".{UNIT}": ("-rw-r--r--", "file"),
    "./usr/lib/sysctl.d/60-spooky.conf": ("-rw-r--r--", "file"),
    "./usr/share/spooky/grafana/spooky.json": ("-rw-r--r--", "file"),
    "./usr/share/doc/spooky/README.md": ("-rw-r--r--", "file"),
    "./usr/share/doc/spooky/copyright": ("-rw-r--r--", "file"),
}


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    env = dict(os.environ, SPOOKY_BIN_DIR=str(BIN_DIR), SPOOKY_DEB_OUT=str(out))
    r = sh(REPO / "scripts" / "package", env=env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out, r.stdout
    print(f"\npackage: {path.name}, {path.stat().st_size} bytes")
    return path


@pytest.fixture(scope="module")
def root(deb, tmp_path_factory) -> Path:
    """A fresh root with the package's files in it, plus what systemd-analyze needs to resolve
    the unit's dependencies there: the machine's own target units, and /bin/kill."""
    root = tmp_path_factory.mktemp("root")
    r = sh(DPKG_DEB, "-x", deb, root)
    assert r.returncode == 0, r.stderr
    units = root / "lib/systemd/system"
    for target in Path("/lib/systemd/system").glob("*.target"):
        if not (units / target.name).exists():
            shutil.copy(target, units / target.name)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    return root


def test_control_fields(deb):
    r = sh(DPKG_DEB, "--info", deb)
    assert r.returncode == 0, r.stderr
    info = r.stdout
    print(info)
    fields = dict(re.findall(r"^ ([A-Z][A-Za-z-]+): (.*)$", info, re.M))
    version = re.search(r'^version = "(.+)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)
    assert fields["Package"] == "spooky" and fields["Version"] == version, fields
    assert fields["Architecture"] == sh("dpkg", "--print-architecture").stdout.strip()
    assert re.search(r"\blibc6 \(>= [0-9.]+\)", fields["Depends"]) and "adduser" in fields["Depends"], fields
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+{script}\b", info, re.M), f"no {script}"


def test_contents(deb):
    r = sh(DPKG_DEB, "--contents", deb)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    listing = {}
    for line in r.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        listing[path] = (mode, owner)
    for path, (mode, _) in EXPECTED.items():
        assert path in listing, f"{path} missing from the package"
        assert listing[path] == (mode, "root/root"), (path, listing[path])
    # Nothing else of substance: only the directories leading to the files above.
    parents = {p for path in EXPECTED for p in _parents(path)}
    extra = set(listing) - set(EXPECTED) - parents
    assert not extra, extra


def _parents(path: str) -> list[str]:
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]


def test_installed_files_are_the_repositorys(root):
    assert (root / "etc/spooky/spooky.yaml").read_bytes() == (REPO / "config/spooky.yaml").read_bytes()
    assert (root / UNIT.lstrip("/")).read_bytes() == (REPO / "deploy/debian/spooky.service").read_bytes()
    assert (root / "usr/share/spooky/grafana/spooky.json").read_bytes() == (
        REPO / "deploy/grafana/spooky.json"
    ).read_bytes()
    r = sh(root / "usr/bin/spooky", "--version")
    assert r.returncode == 0 and r.stdout.startswith("spooky "), (r.stdout, r.stderr)
    # Stripped: no debug sections left in the shipped binary.
    sections = sh("objdump", "-h", root / "usr/bin/spooky").stdout
    assert ".debug_info" not in sections


def test_sysctl_drop_in_matches_the_buffer_spooky_asks_for(root):
    m = re.search(r"pub const SOCKET_BUFFER: usize = (\d+) << (\d+);", (REPO / "src/edge/socket.rs").read_text())
    assert m, "SOCKET_BUFFER not found in src/edge/socket.rs"
    wanted = int(m.group(1)) << int(m.group(2))
    text = (root / "usr/lib/sysctl.d/60-spooky.conf").read_text()
    values = dict(re.findall(r"^([a-z0-9_.]+)\s*=\s*(\d+)\s*$", text, re.M))
    assert values == {"net.core.rmem_max": str(wanted), "net.core.wmem_max": str(wanted)}, values


def unit(root: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read_string((root / UNIT.lstrip("/")).read_text())
    return cp


def test_unit_settings(root):
    s = unit(root)["Service"]
    assert s["User"] == "spooky" and s["Group"] == "spooky"
    assert s["ExecStart"] == "/usr/bin/spooky run --config /etc/spooky/spooky.yaml"
    assert s["ExecStartPre"] == "/usr/bin/spooky check --config /etc/spooky/spooky.yaml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(s["LimitNOFILE"]) >= 65536
    assert s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE" == s["CapabilityBoundingSet"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert s[key] == value, (key, s.get(key))
    assert "io_uring_enter" in s["SystemCallFilter"]
    assert "CPUAffinity" in (root / UNIT.lstrip("/")).read_text(), "the CPUAffinity guidance is gone"
    assert (root / s["ExecStart"].split()[0].lstrip("/")).is_file()
    assert (root / "etc/spooky/spooky.yaml").is_file()


def test_systemd_analyze_verify(root):
    r = sh(ANALYZE, f"--root={root}", "verify", UNIT)
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r.stdout + r.stderr
    # And the check is a real one: a misspelt key is reported.
    broken = root / "lib/systemd/system/spooky-broken.service"
    broken.write_text((root / UNIT.lstrip("/")).read_text().replace("ProtectSystem=", "ProtectSytem="))
    r = sh(ANALYZE, f"--root={root}", "verify", "/lib/systemd/system/spooky-broken.service")
    broken.unlink()
    assert "Unknown key 'ProtectSytem'" in r.stderr, r.stderr


def test_systemd_analyze_security(root):
    r = sh(ANALYZE, "security", "--offline=true", f"--root={root}", UNIT)
    m = re.search(r"Overall exposure level for spooky\.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"\nsystemd-analyze security: exposure {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 3.0, r.stdout


def test_shipped_config_checks_with_the_shipped_binary(root, tmp_path):
    spooky = root / "usr/bin/spooky"
    cfg = root / "etc/spooky/spooky.yaml"
    r = sh(spooky, "check", "--config", cfg)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "`tls.cert`: cannot read" in r.stderr and "etc/spooky/tls/cert.pem" in r.stderr, r.stderr
    tls = root / "etc/spooky/tls"
    key = sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", tls / "key.pem")
    assert key.returncode == 0, key.stderr
    cert = sh(
        "openssl", "req", "-x509", "-new", "-key", tls / "key.pem", "-out", tls / "cert.pem",
        "-subj", "/CN=edge.example.com", "-days", "2",
    )  # fmt: skip
    assert cert.returncode == 0, cert.stderr
    os.chmod(tls / "key.pem", 0o640)
    try:
        r = sh(spooky, "check", "--config", cfg)
        assert r.returncode == 0, r.stderr
    finally:
        (tls / "key.pem").unlink()
        (tls / "cert.pem").unlink()


def test_maintainer_scripts_parse(deb, tmp_path):
    r = sh(DPKG_DEB, "-e", deb, tmp_path / "DEBIAN")
    assert r.returncode == 0, r.stderr
    for script in ("postinst", "prerm", "postrm"):
        path = tmp_path / "DEBIAN" / script
        assert path.read_text().startswith("#!/bin/sh\n") and os.access(path, os.X_OK), script
        r = sh("sh", "-n", path)
        assert r.returncode == 0, (script, r.stderr)
    assert (tmp_path / "DEBIAN/conffiles").read_text() == "/etc/spooky/spooky.yaml\n"
    postinst = (tmp_path / "DEBIAN/postinst").read_text()
    assert "adduser --system --group" in postinst and "60-spooky.conf" in postinst
