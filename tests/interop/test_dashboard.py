"""The Grafana dashboard (deploy/grafana/spooky.json) cannot rot: every metric its PromQL names
exists in the `/metrics` of a running Spooky, and every label it selects on, groups by or puts
in a legend exists on those metrics.

Spooky exports most series from the start, at 0; the rest appear with their first event. The
test makes each of those happen against spooky-backend before it reads `/metrics`: a request
(upstream connect), a backend reset, a dead backend (502, outlier ejection, then panic routing),
a pool of a dead and a live backend (a retry), a circuit breaker of one (a 503), active health
checks, and a reload (the file changed, then SIGHUP).

Prometheus adds `instance` and `job` to every series it scrapes; those two labels are the only
ones allowed that `/metrics` does not show.
Run: `.venv/bin/python -m pytest tests/interop/test_dashboard.py -q`.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request

import pytest
from conftest import REPO, free_port, start_backend, start_spooky, watched
from h3client import h3_connect, run

DASHBOARD = REPO / "deploy" / "grafana" / "spooky.json"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
METRIC = re.compile(r"\bspooky_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(spooky_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
LABEL_VALUES = re.compile(r"label_values\(\s*(spooky_[a-z0-9_]+)(?:\{[^}]*\})?\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")


def queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every PromQL expression: panel targets (also in rows),
    annotations and template variables."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t.get('refId')}", t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for a in dashboard.get("annotations", {}).get("list", []):
        if "expr" in a:
            out.append((f"annotation {a['name']!r}", a["expr"], a.get("textFormat", "")))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable ${v['name']}", q, ""))
    return out


def exported(text: str) -> dict[str, set[str]]:
    """Series names in a Prometheus text exposition, each with the label names it carries."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? \S+$", line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
    return out


def problems(where: str, expr: str, legend: str, metrics: dict[str, set[str]]) -> list[str]:
    """What in one expression does not match the exported metrics."""
    out = []
    names = set(METRIC.findall(expr))
    if not names:
        out.append(f"{where}: names no spooky_ metric: {expr}")
    for n in sorted(names - metrics.keys()):
        out.append(f"{where}: `{n}` is not exported")
    known = TARGET_LABELS.union(*(metrics.get(n, set()) for n in names))
    for name, inner in SELECTOR.findall(expr):
        for label in MATCHER.findall(inner):
            if label not in TARGET_LABELS | metrics.get(name, set()):
                out.append(f"{where}: `{name}` has no label `{label}`")
    grouped = {x.strip() for g in GROUPING.findall(expr) for x in g.split(",") if x.strip()}
    for label in sorted(grouped - known):
        out.append(f"{where}: grouped by `{label}`, which none of {sorted(names)} has")
    for label in LEGEND.findall(legend):
        if label not in (grouped or known) and label != "__value__":
            out.append(f"{where}: legend uses `{label}`, which the result does not carry")
    for name, label in LABEL_VALUES.findall(expr):
        if label not in TARGET_LABELS | metrics.get(name, set()):
            out.append(f"{where}: label_values of `{name}` by `{label}`, which it does not have")
    for a, b in ("()", "{}", "[]"):
        if expr.count(a) != expr.count(b):
            out.append(f"{where}: unbalanced {a}{b}: {expr}")
    if "histogram_quantile" in expr and not all(n.endswith("_bucket") for n in names):
        out.append(f"{where}: histogram_quantile over something other than _bucket series: {expr}")
    if "histogram_quantile" in expr and "le" not in grouped:
        out.append(f"{where}: histogram_quantile without `le` kept: {expr}")
    return out


def test_the_checker_finds_rot():
    """The check itself: a missing metric, a missing label and a bad grouping are each reported."""
    metrics = {"spooky_a_total": {"worker", "class"}, "spooky_h_seconds_bucket": {"le", "pool"}}
    assert problems("t", 'sum by (class) (rate(spooky_a_total{instance=~"$i"}[5m]))', "{{class}}", metrics) == []
    assert problems("t", "histogram_quantile(0.9, sum by (le) (rate(spooky_h_seconds_bucket[5m])))", "", metrics) == []
    assert problems("t", "rate(spooky_b_total[5m])", "", metrics) == ["t: `spooky_b_total` is not exported"]
    assert problems("t", 'rate(spooky_a_total{cause="x"}[5m])', "", metrics) == ["t: `spooky_a_total` has no label `cause`"]
    assert len(problems("t", "sum by (route) (rate(spooky_a_total[5m]))", "{{route}}", metrics)) == 1
    assert problems("t", "sum by (class) (rate(spooky_a_total[5m]))", "{{worker}}", metrics) == [
        "t: legend uses `worker`, which the result does not carry"
    ]
    assert len(problems("t", "histogram_quantile(0.9, sum(rate(spooky_h_seconds_bucket[5m])))", "", metrics)) == 1
    assert exported('# TYPE x counter\nspooky_a_total{worker="0",class="2xx"} 3\nspooky_b 1\n') == {
        "spooky_a_total": {"worker", "class"},
        "spooky_b": set(),
    }


def spooky_config(live: int, dead: int) -> str:
    return f"""\
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
workers: 1
tls: {{ self_signed: [localhost] }}
timeouts: {{ connect: 1s, request: 10s }}
upstreams:
  app:
    backends: [{{ address: 127.0.0.1:{live} }}]
    health_check: {{ path: /hello, interval: 200ms, timeout: 100ms }}
  dead:
    backends: [{{ address: 127.0.0.1:{dead} }}]
    outlier: {{ consecutive_failures: 1, base_ejection: 1m, max_ejection: 1h, max_ejected_percent: 100 }}
  mixed:
    backends: [{{ address: 127.0.0.1:{dead} }}, {{ address: 127.0.0.1:{live} }}]
  tight:
    backends: [{{ address: 127.0.0.1:{live} }}]
    circuit_breaker: {{ max_active: 1, max_pending: 1 }}
routes:
  - {{ name: dead, path_prefix: /dead/, upstream: dead }}
  - {{ name: mixed, path_prefix: /mixed/, upstream: mixed, retries: {{ attempts: 1, on: [connect_failure] }} }}
  - {{ name: tight, path_prefix: /bytes/, upstream: tight }}
  - {{ name: app, upstream: app }}
"""


def scrape(admin_port: int) -> dict[str, set[str]]:
    return exported(urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode())


@pytest.fixture(scope="module")
def spooky_metrics(tmp_path_factory) -> dict[str, set[str]]:
    """/metrics of a Spooky that went through every event the dashboard's metrics count."""
    tmp = tmp_path_factory.mktemp("dashboard")
    backend, live = start_backend("dashboard", tmp / "backend.log")
    try:
        cfg = tmp / "spooky.yaml"
        cfg.write_text(spooky_config(live, free_port()))
        spooky, port, admin = start_spooky(cfg, tmp / "spooky.stderr.log")
        try:
            with watched(spooky, backend):

                async def traffic():
                    async with h3_connect("127.0.0.1", port) as c:
                        statuses = [(await c.get("/hello")).status, (await c.get("/reset-after/100")).reset_code]
                        statuses += [(await c.get("/dead/x", timeout=15)).status for _ in range(2)]
                        statuses += [(await c.get("/mixed/x", timeout=15)).status for _ in range(2)]
                        slow = [c.get("/bytes/10?delay_ms=2000", timeout=15) for _ in range(3)]
                        statuses += [r.status for r in await asyncio.gather(*slow)]
                        return statuses

                statuses = run(traffic(), 60)
                assert statuses[0] == 200 and statuses[2:4] == [502, 502] and 503 in statuses[6:], statuses
                # A changed file (an unchanged one is no reload), then SIGHUP.
                cfg.write_text(cfg.read_text().replace("request: 10s", "request: 11s"))
                spooky.popen.send_signal(signal.SIGHUP)
                wanted = {"spooky_reloads_total", "spooky_outlier_ejections_total", "spooky_health_checks_total"}
                deadline = time.monotonic() + 15
                metrics = scrape(admin)
                while not wanted <= metrics.keys() and time.monotonic() < deadline:
                    time.sleep(0.2)
                    metrics = scrape(admin)
                return metrics
        finally:
            spooky.stop()
    finally:
        backend.stop()


def test_dashboard_is_valid_grafana_json():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    panels = [p for p in d["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
    assert "datasource" in {v["name"] for v in d["templating"]["list"]}


def test_dashboard_covers_what_an_operator_watches():
    """Requests by class and route, latency percentiles, upstream health and ejections,
    handshakes and their failures by cause, drops by reason, reloads."""
    exprs = [e for _, e, _ in queries(json.loads(DASHBOARD.read_text()))]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"by \(class\) \(rate\(spooky_requests_total")
    assert some(r"by \(route\) \(rate\(spooky_requests_total")
    assert some(r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(spooky_request_duration_seconds_bucket")
    assert some(r"spooky_upstream_response_seconds_bucket")
    assert some(r"spooky_backend_healthy") and some(r"spooky_outlier_ejections_total")
    assert some(r"spooky_quic_handshakes_total") and some(r"by \(cause\) \(rate\(spooky_handshake_failures_total")
    assert some(r"by \(reason\) \(rate\(spooky_packets_dropped_total")
    assert some(r"by \(result\) \(increase\(spooky_reloads_total")


def test_every_metric_and_label_of_the_dashboard_is_exported(spooky_metrics):
    found = []
    for where, expr, legend in queries(json.loads(DASHBOARD.read_text())):
        found += problems(where, expr, legend, spooky_metrics)
    referenced = {n for _, e, _ in queries(json.loads(DASHBOARD.read_text())) for n in METRIC.findall(e)}
    print(f"\nSUMMARY dashboard: {len(referenced)} metrics referenced, all exported: {not found}")
    assert not found, "\n".join(found)
