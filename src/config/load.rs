//! Loading and validating a configuration file as a whole.

use super::ranges::{self, Invalid, DAY, GIB, HOUR, KIB, MIB, MINUTE, MS, SECOND};
use super::schema::*;
use std::collections::HashMap;
use std::fmt;
use std::net::ToSocketAddrs;
use std::path::Path;

/// The embedded default configuration: Spooky in front of the demo backend on 127.0.0.1:8081,
/// with a self-signed certificate. Used by `spooky run` without `--config`.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../../config/default.yaml");

/// A configuration problem: which file, which key, what is wrong (and where, when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// Dotted key path such as `upstreams.api.backends[0].weight` (empty for the whole document).
    pub key: String,
    pub line: Option<usize>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.problem)
        } else {
            write!(f, ": `{}`: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates `path`. Relative certificate paths resolve against its folder.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        key: String::new(),
        line: None,
        problem: format!("cannot read: {e}"),
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &file, &base)
}

/// Parses and validates YAML text; `file` names it in errors, `base` anchors relative paths.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.location().map(|l| l.line());
        let mut problem = inner.to_string();
        // serde_norway appends "at line L column C"; the line is already reported separately.
        if let Some(i) = problem.find(" at line ") {
            problem.truncate(i);
        }
        // serde_norway starts some messages with (part of) the key path, already reported.
        if let Some((head, rest)) = problem.split_once(": ") {
            if key.starts_with(head) {
                problem = rest.to_string();
            }
        }
        ConfigError { file: file.to_string(), key: if key == "." { String::new() } else { key }, line, problem }
    })?;
    validate(&mut config, base).map_err(|(key, problem)| ConfigError {
        file: file.to_string(),
        key,
        line: None,
        problem,
    })?;
    Ok(config)
}

fn bad(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    (key.into(), problem.into())
}

/// Semantic checks that the schema cannot express, among them the legal range of every
/// number, duration and size ([`ranges`]). Fills resolved fields (backend addresses, absolute
/// certificate paths, the contents of upstream CA files).
pub(crate) fn validate(c: &mut Config, base: &Path) -> Result<(), Invalid> {
    if c.listen.is_empty() {
        return Err(bad("listen", "at least one address is required"));
    }
    if let Workers::Count(n) = c.workers {
        // The worker id is one byte of every connection ID.
        if !(1..=256).contains(&n) {
            return Err(bad("workers", format!("must be `auto` or 1..=256, got {n}")));
        }
    }
    validate_tls(&mut c.tls, base)?;
    validate_quic(&mut c.quic, base)?;
    validate_timeouts(&c.timeouts)?;
    if c.headers.via_name.is_empty() || !c.headers.via_name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("headers.via_name", "must be a non-empty token without spaces"));
    }
    if let Some(v) = &c.headers.alt_svc {
        check_alt_svc(v).map_err(|p| bad("headers.alt_svc", p))?;
    }
    validate_upstream_h2(&c.upstream_h2)?;
    if c.upstreams.is_empty() {
        return Err(bad("upstreams", "at least one upstream pool is required"));
    }
    for (name, pool) in c.upstreams.iter_mut() {
        if pool.backends.is_empty() {
            return Err(bad(format!("upstreams.{name}.backends"), "a pool needs at least one backend"));
        }
        match (pool.balance.hashes(), &pool.hash_key) {
            (true, None) => {
                return Err(bad(
                    format!("upstreams.{name}.hash_key"),
                    format!("`{:?}` needs a `hash_key`", pool.balance),
                ))
            }
            (false, Some(_)) => {
                return Err(bad(
                    format!("upstreams.{name}.hash_key"),
                    "only `ring_hash` and `maglev` use a `hash_key`".to_string(),
                ))
            }
            _ => {}
        }
        validate_resilience(name, pool)?;
        if let Some(tls) = pool.tls.as_mut() {
            if let Some(ca) = tls.ca.as_mut() {
                // Read here, once, on the control thread: workers build their verifiers from
                // these bytes and never open the file.
                let path = base.join(&*ca);
                let pem = read_pem(&format!("upstreams.{name}.tls.ca"), &path, "CERTIFICATE-----")?;
                *ca = path;
                tls.ca_pem = Some(FileBytes(pem.into_bytes().into()));
            }
        }
        for (i, b) in pool.backends.iter_mut().enumerate() {
            let key = format!("upstreams.{name}.backends[{i}]");
            ranges::count(&format!("{key}.weight"), b.weight.into(), 1, 10_000)?;
            b.addr = resolve(&b.address).map_err(|p| bad(format!("{key}.address"), p))?;
        }
    }
    let names: Vec<String> = c.upstreams.keys().cloned().collect();
    for (name, pool) in &c.upstreams {
        if let Some(f) = &pool.fallback {
            if f == name || !names.contains(f) {
                return Err(bad(
                    format!("upstreams.{name}.fallback"),
                    format!("`{f}` must name another pool (defined: {})", names.join(", ")),
                ));
            }
        }
    }
    if c.routes.is_empty() {
        return Err(bad("routes", "at least one route is required"));
    }
    for (i, r) in c.routes.iter().enumerate() {
        validate_route(&format!("routes[{i}]"), r, c)?;
    }
    if http::StatusCode::from_u16(c.no_route.status).is_err() || c.no_route.status < 200 {
        return Err(bad("no_route.status", format!("`{}` is not a final HTTP status", c.no_route.status)));
    }
    if c.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        return Err(bad("log.level", format!("`{}` is not a valid log filter", c.log.level)));
    }
    ranges::count("access_log.buffer", c.access_log.buffer as u64, 1, 1 << 20)?;
    Ok(())
}

/// An `Alt-Svc` field value (RFC 7838 §3): `clear`, or a comma-separated list of
/// `protocol-id="[host]:port"` with optional `; name=value` parameters (`ma` a number of
/// seconds, `persist=1`).
fn check_alt_svc(v: &str) -> Result<(), String> {
    fn token(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    }
    if http::HeaderValue::from_str(v).is_err() || v.trim() != v {
        return Err(format!("`{v}` is not a valid header value"));
    }
    if v == "clear" {
        return Ok(());
    }
    for alt in v.split(',') {
        let mut parts = alt.split(';').map(str::trim);
        let first = parts.next().unwrap_or_default();
        let Some((proto, authority)) = first.split_once('=') else {
            return Err(format!("`{}` is not `protocol=\"host:port\"` (e.g. `h3=\":443\"; ma=86400`)", alt.trim()));
        };
        if !token(proto) {
            return Err(format!("`{proto}` is not a protocol id (e.g. `h3`)"));
        }
        let Some(authority) = authority.strip_prefix('"').and_then(|a| a.strip_suffix('"')) else {
            return Err(format!("the authority of `{proto}` must be quoted: `{proto}=\"{authority}\"`"));
        };
        let port = authority.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        if !matches!(port.parse::<u16>(), Ok(1..)) || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{authority}` needs a port 1..=65535 (`:443`, or `host:443`)"));
        }
        for param in parts {
            let Some((name, value)) = param.split_once('=') else {
                return Err(format!("parameter `{param}` is not `name=value`"));
            };
            let value = value.trim_matches('"');
            match name.trim() {
                "ma" if value.parse::<u32>().is_ok() => {}
                "ma" => return Err(format!("`ma={value}` must be a number of seconds")),
                "persist" if value == "1" => {}
                "persist" => return Err("`persist` can only be 1".into()),
                other if token(other) => {}
                other => return Err(format!("`{other}` is not a parameter name")),
            }
        }
    }
    Ok(())
}

fn validate_timeouts(t: &Timeouts) -> Result<(), Invalid> {
    ranges::duration("timeouts.connect", t.connect.0, MS, 10 * MINUTE)?;
    ranges::duration("timeouts.request", t.request.0, MS, DAY)?;
    ranges::duration("timeouts.idle", t.idle.0, 100 * MS, DAY)?;
    ranges::duration("timeouts.drain", t.drain.0, MS, HOUR)?;
    // The grace is also how far an excused deadline moves: a tiny one would re-fire at once.
    ranges::duration("timeouts.body_grace", t.body_grace.0, 100 * MS, HOUR)?;
    ranges::size_or_off("timeouts.body_min_rate", t.body_min_rate.0, 1, GIB)?;
    ranges::duration("timeouts.client_read", t.client_read.0, 100 * MS, DAY)
}

fn validate_upstream_h2(h2: &UpstreamH2) -> Result<(), Invalid> {
    // HTTP/2 windows are 31-bit (RFC 9113 §6.9.1), frame sizes 2^14..2^24-1 (§6.5.2).
    let window = "RFC 9113 §6.9.1";
    ranges::because(ranges::size("upstream_h2.stream_window", h2.stream_window.0, 65_535, (1 << 31) - 1), window)?;
    ranges::because(
        ranges::size("upstream_h2.connection_window", h2.connection_window.0, h2.stream_window.0, (1 << 31) - 1),
        "at least upstream_h2.stream_window; RFC 9113 §6.9.1",
    )?;
    ranges::because(
        ranges::size("upstream_h2.max_frame_size", h2.max_frame_size.0, 16_384, 16_777_215),
        "RFC 9113 §6.5.2",
    )?;
    ranges::count("upstream_h2.max_connections_per_backend", h2.max_connections_per_backend as u64, 1, 64)?;
    ranges::duration_or_off("upstream_h2.keepalive_interval", h2.keepalive_interval.0, 100 * MS, HOUR)?;
    ranges::duration("upstream_h2.keepalive_timeout", h2.keepalive_timeout.0, MS, 10 * MINUTE)?;
    ranges::duration_or_off("upstream_h2.idle_timeout", h2.idle_timeout.0, 10 * MS, DAY)?;
    ranges::count("upstream_h2.max_requests_per_connection", h2.max_requests_per_connection as u64, 1, 1 << 31)?;
    // 0: only requests without a body are sent again when a backend did not process them.
    ranges::size_or_off("upstream_h2.replay_buffer", h2.replay_buffer.0, 1, 16 << 20)
}

fn validate_route(key: &str, r: &Route, c: &Config) -> Result<(), Invalid> {
    if !c.upstreams.contains_key(&r.upstream) {
        let known: Vec<&str> = c.upstreams.keys().map(String::as_str).collect();
        return Err(bad(
            format!("{key}.upstream"),
            format!("unknown upstream `{}` (defined: {})", r.upstream, known.join(", ")),
        ));
    }
    if !r.path_prefix.starts_with('/') {
        return Err(bad(format!("{key}.path_prefix"), format!("must start with `/`, got `{}`", r.path_prefix)));
    }
    if let Some(t) = r.request_timeout {
        ranges::duration(&format!("{key}.request_timeout"), t.0, MS, DAY)?;
    }
    if let Some(l) = &r.rate_limit {
        // The rate is split across workers and turned into a `retry-after` wait (1 / rate).
        ranges::rate(&format!("{key}.rate_limit.rate"), l.rate, 0.001, 1e9)?;
        ranges::count(&format!("{key}.rate_limit.burst"), l.burst.into(), 1, 1_000_000_000)?;
    }
    let rt = &r.retries;
    ranges::count(&format!("{key}.retries.attempts"), rt.attempts.into(), 0, 10)?;
    ranges::count(&format!("{key}.retries.budget_percent"), rt.budget_percent.into(), 1, 100)?;
    if let Some(s) = rt.statuses.iter().find(|s| !(100..=599).contains(*s)) {
        return Err(bad(format!("{key}.retries.statuses"), format!("{s} is not an HTTP status")));
    }
    if let Some(t) = rt.per_try_timeout {
        ranges::duration(&format!("{key}.retries.per_try_timeout"), t.0, MS, DAY)?;
    }
    if let Some(exact) = &r.path_exact {
        if !exact.starts_with('/') || exact.contains('?') {
            return Err(bad(
                format!("{key}.path_exact"),
                format!("must start with `/` and hold no query, got `{exact}`"),
            ));
        }
    }
    for (j, m) in r.methods.iter().enumerate() {
        if http::Method::from_bytes(m.as_bytes()).is_err() || m.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(bad(format!("{key}.methods[{j}]"), format!("`{m}` is not an upper-case HTTP method")));
        }
    }
    for (j, h) in r.headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() || h.name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                format!("{key}.headers[{j}].name"),
                format!("`{}` is not a lower-case header name", h.name),
            ));
        }
    }
    let host = r.host.strip_prefix("*.").unwrap_or(&r.host);
    let valid_host = r.host == "*"
        || (!host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':'));
    if !valid_host || r.host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad(
            format!("{key}.host"),
            format!("`{}` is not `*`, a lower-case host name, or `*.suffix`", r.host),
        ));
    }
    Ok(())
}

fn validate_tls(tls: &mut Tls, base: &Path) -> Result<(), Invalid> {
    ranges::because(
        ranges::duration("tls.ticket_key_rotation", tls.ticket_key_rotation.0, SECOND, 7 * DAY),
        "a TLS 1.3 ticket lives at most 7 days, RFC 8446 §4.6.1",
    )?;
    validate_default_cert(tls, base)?;
    // Explicit names must be unique; names taken from certificates are checked when the
    // certificates are read (edge::tls).
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, entry) in tls.sni.iter_mut().enumerate() {
        let key = format!("tls.sni[{i}]");
        entry.cert = base.join(&entry.cert);
        entry.key = base.join(&entry.key);
        read_pem(&format!("{key}.cert"), &entry.cert, "CERTIFICATE-----")?;
        read_pem(&format!("{key}.key"), &entry.key, "PRIVATE KEY-----")?;
        let Some(names) = entry.names.as_mut() else { continue };
        if names.is_empty() {
            return Err(bad(
                format!("{key}.names"),
                "list at least one name, or leave `names` out to use the certificate's DNS names",
            ));
        }
        for (j, name) in names.iter().enumerate() {
            if let Err(problem) = check_sni_name(name) {
                return Err(bad(format!("{key}.names[{j}]"), problem));
            }
            if let Some(first) = seen.insert(name.clone(), i) {
                return Err(bad(
                    format!("{key}.names[{j}]"),
                    format!("`{name}` is already listed in tls.sni[{first}]"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_default_cert(tls: &mut Tls, base: &Path) -> Result<(), Invalid> {
    match (&tls.cert, &tls.key, &tls.self_signed) {
        (Some(cert), Some(key), None) => {
            let (cert, key) = (base.join(cert), base.join(key));
            read_pem("tls.cert", &cert, "CERTIFICATE-----")?;
            read_pem("tls.key", &key, "PRIVATE KEY-----")?;
            (tls.cert, tls.key) = (Some(cert), Some(key));
            Ok(())
        }
        (None, None, Some(names)) => {
            if names.is_empty() || names.iter().any(|n| n.is_empty()) {
                return Err(bad("tls.self_signed", "list at least one non-empty name"));
            }
            Ok(())
        }
        (_, _, Some(_)) => Err(bad("tls", "set either `cert` and `key`, or `self_signed`, not both")),
        (Some(_), None, None) => Err(bad("tls.key", "`cert` is set but `key` is missing")),
        (None, Some(_), None) => Err(bad("tls.cert", "`key` is set but `cert` is missing")),
        (None, None, None) => Err(bad("tls", "set `cert` and `key` (PEM files), or `self_signed: [names]`")),
    }
}

/// Reads `path` and checks that it holds a PEM block ending in `marker`; returns the text.
fn read_pem(key: &str, path: &Path, marker: &str) -> Result<String, Invalid> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(key, format!("cannot read `{}`: {e}", path.display())))?;
    if !text.contains(marker) {
        return Err(bad(key, format!("`{}` holds no PEM `{}` block", path.display(), marker.trim_end_matches('-'))));
    }
    Ok(text)
}

/// An SNI name: a lower-case DNS name, or `*.` followed by one.
fn check_sni_name(name: &str) -> Result<(), String> {
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("`{name}` is not a lower-case DNS name or `*.suffix`"));
    }
    Ok(())
}

fn validate_resilience(name: &str, pool: &Upstream) -> Result<(), Invalid> {
    let key = format!("upstreams.{name}");
    if let Some(h) = &pool.health_check {
        let key = format!("{key}.health_check");
        if !h.path.starts_with('/') {
            return Err(bad(format!("{key}.path"), "must start with `/`"));
        }
        ranges::duration(&format!("{key}.interval"), h.interval.0, 100 * MS, HOUR)?;
        ranges::because(
            ranges::duration(&format!("{key}.timeout"), h.timeout.0, MS, h.interval.0),
            "at most the interval",
        )?;
        ranges::count(&format!("{key}.healthy_threshold"), h.healthy_threshold.into(), 1, 1000)?;
        ranges::count(&format!("{key}.unhealthy_threshold"), h.unhealthy_threshold.into(), 1, 1000)?;
        if let Some(s) = h.expected_statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(bad(format!("{key}.expected_statuses"), format!("{s} is not an HTTP status")));
        }
    }
    let o = &pool.outlier;
    let okey = format!("{key}.outlier");
    ranges::count(&format!("{okey}.consecutive_failures"), o.consecutive_failures.into(), 1, 1_000_000)?;
    // Ejection times grow as base × times ejected, capped at max_ejection.
    ranges::duration(&format!("{okey}.base_ejection"), o.base_ejection.0, MS, HOUR)?;
    ranges::because(
        ranges::duration(&format!("{okey}.max_ejection"), o.max_ejection.0, o.base_ejection.0, DAY),
        "at least base_ejection",
    )?;
    ranges::count(&format!("{okey}.max_ejected_percent"), o.max_ejected_percent.into(), 0, 100)?;
    let cb = &pool.circuit_breaker;
    ranges::count(&format!("{key}.circuit_breaker.max_active"), cb.max_active.into(), 1, u32::MAX.into())?;
    ranges::count(&format!("{key}.circuit_breaker.max_pending"), cb.max_pending.into(), 1, u32::MAX.into())
}

fn validate_quic(q: &mut Quic, base: &Path) -> Result<(), Invalid> {
    ranges::because(
        ranges::count("quic.max_udp_payload", q.max_udp_payload as u64, 1200, 65_507),
        "RFC 9000 §14 to the largest IPv4 UDP payload",
    )?;
    ranges::count("quic.max_concurrent_streams", q.max_concurrent_streams, 1, 1 << 20)?;
    ranges::size("quic.max_stream_data", q.max_stream_data.0, KIB, GIB)?;
    ranges::because(
        ranges::size("quic.max_data", q.max_data.0, q.max_stream_data.0, 4 * GIB),
        "at least quic.max_stream_data",
    )?;
    ranges::size("quic.max_header_list_size", q.max_header_list_size.0, KIB, MIB)?;
    if !["cubic", "reno", "bbr2"].contains(&q.congestion_control.as_str()) {
        return Err(bad(
            "quic.congestion_control",
            format!("unknown algorithm `{}` (use cubic, reno or bbr2)", q.congestion_control),
        ));
    }
    ranges::because(
        ranges::count("quic.cid_rotation", q.cid_rotation.into(), 0, 6),
        "7 marks unroutable CIDs in QUIC-LB",
    )?;
    if q.retry == RetryMode::Auto {
        ranges::because(
            ranges::count("quic.retry_above_rate", q.retry_above_rate.into(), 1, 10_000_000),
            "new connections per second per worker, with `retry: auto`; or use `retry: always`",
        )?;
    }
    // Tokens carry their issue time in whole seconds.
    ranges::duration("quic.retry_token_lifetime", q.retry_token_lifetime.0, SECOND, 10 * MINUTE)?;
    // At most a week, TLS 1.3's longest session ticket lifetime (RFC 8446 §4.6.1).
    ranges::duration("quic.new_token_lifetime", q.new_token_lifetime.0, SECOND, 7 * DAY)?;
    ranges::count("quic.max_connections_per_worker", q.max_connections_per_worker as u64, 1, 10_000_000)?;
    ranges::count_or_off("quic.max_new_connections_per_sec", q.max_new_connections_per_sec.into(), 1, 10_000_000)?;
    // At least one read from QUIC (64 KiB), so a stream alone can always make progress.
    ranges::size("quic.body_buffer_per_connection", q.body_buffer_per_connection.0, 64 * KIB, GIB)?;
    ranges::because(
        ranges::size(
            "quic.body_buffer_per_worker",
            q.body_buffer_per_worker.0,
            q.body_buffer_per_connection.0,
            64 * GIB,
        ),
        "at least quic.body_buffer_per_connection",
    )?;
    if let Some(file) = q.secret_key_file.as_mut() {
        let path = base.join(&*file);
        let bytes = std::fs::read(&path)
            .map_err(|e| bad("quic.secret_key_file", format!("cannot read `{}`: {e}", path.display())))?;
        if bytes.len() < 32 {
            return Err(bad(
                "quic.secret_key_file",
                format!("`{}` holds {} bytes; at least 32 random bytes are needed", path.display(), bytes.len()),
            ));
        }
        *file = path;
    }
    Ok(())
}

fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = address.parse() {
        return Ok(a);
    }
    if !address.contains(':') {
        return Err(format!("`{address}` needs a port, as `host:port`"));
    }
    address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{address}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{address}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOOD: &str = "
listen: 127.0.0.1:8443
tls: { self_signed: [localhost] }
upstreams:
  demo:
    backends:
      - address: 127.0.0.1:8081
        weight: 3
routes:
  - upstream: demo
";

    fn err(yaml: &str) -> ConfigError {
        parse(yaml, "t.yaml", Path::new(".")).expect_err("config should be refused")
    }

    #[test]
    fn minimal_config_is_accepted_with_defaults() {
        let c = parse(GOOD, "t.yaml", Path::new(".")).unwrap();
        assert_eq!(c.upstreams["demo"].backends[0].addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.quic.max_concurrent_streams, 256);
        assert_eq!(c.tls.ticket_key_rotation.0, Duration::from_secs(3600));
        assert!(c.tls.sni.is_empty());
    }

    #[test]
    fn sni_names_and_ticket_rotation_are_checked() {
        let tls = |extra: &str| {
            GOOD.replace("tls: { self_signed: [localhost] }", &format!("tls:\n  self_signed: [localhost]\n{extra}"))
        };
        let e = err(&tls("  ticket_key_rotation: 8d"));
        assert_eq!(e.key, "tls.ticket_key_rotation");
        let e = err(&tls("  sni: [{ cert: /nonexistent.pem, key: /nonexistent.key }]"));
        assert_eq!(e.key, "tls.sni[0].cert");
        assert!(e.problem.contains("cannot read `/nonexistent.pem`"), "{e}");
        for bad in ["*", "a..b", "-a.b", "a.*.b", "A.b", "a b"] {
            assert!(check_sni_name(bad).is_err(), "{bad}");
        }
        for good in ["a", "api.example.com", "*.example.com", "x-1.y"] {
            assert!(check_sni_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn alt_svc_is_checked() {
        let with = |v: &str| GOOD.replace("routes:", &format!("headers: {{ alt_svc: '{v}' }}\nroutes:"));
        let c = parse(&with(r#"h3=":443"; ma=86400"#), "t.yaml", Path::new(".")).unwrap();
        assert_eq!(c.headers.alt_svc.as_deref(), Some(r#"h3=":443"; ma=86400"#));
        assert_eq!(parse(GOOD, "t.yaml", Path::new(".")).unwrap().headers.alt_svc, None);
        let e = err(&with("h3=:443"));
        assert_eq!(e.key, "headers.alt_svc");
        assert!(e.problem.contains("must be quoted"), "{e}");
        for good in [
            "clear",
            r#"h3=":8443""#,
            r#"h3="edge.example.com:443"; ma=3600; persist=1"#,
            r#"h3=":443"; ma=86400, h3-29=":443""#,
            r#"h3="[::1]:443""#,
        ] {
            assert!(check_alt_svc(good).is_ok(), "{good}: {:?}", check_alt_svc(good));
        }
        for bad in [
            "",
            "h3",
            r#"h3=":0""#,
            r#"h3=":65536""#,
            r#"h3="host""#,
            r#"h3=":443"; ma=soon"#,
            r#"h3=":443"; persist=2"#,
            r#"h 3=":443""#,
            r#"h3=":443"; ma"#,
            " h3=\":443\"",
            "h3=\":443\"\n",
        ] {
            assert!(check_alt_svc(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_upstream_ca_file_is_read_once_by_validation() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::tools::certs::ecdsa_key().unwrap();
        let pem = crate::tools::certs::self_signed(&key, &["backend.test"]).unwrap().to_pem().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pem).unwrap();
        let yaml = GOOD.replace("    backends:", "    tls: { ca: ca.pem }\n    backends:");
        let c = parse(&yaml, "t.yaml", dir.path()).unwrap();
        let tls = c.upstreams["demo"].tls.as_ref().unwrap();
        assert_eq!(tls.ca_pem.as_ref().map(|p| p.0.to_vec()), Some(pem));
        // Workers build their verifier from the bytes: the file is not needed any more.
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        crate::transport::tls::TlsUpstream::new(tls).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let e = parse(&yaml, "t.yaml", dir.path()).unwrap_err();
        assert_eq!(e.key, "upstreams.demo.tls.ca");
        assert!(e.problem.contains("holds no PEM `CERTIFICATE` block"), "{e}");
    }

    #[test]
    fn embedded_default_is_valid() {
        parse(DEFAULT_CONFIG_YAML, "default", Path::new(".")).unwrap();
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = err(&GOOD.replace("weight: 3", "wieght: 3"));
        assert_eq!(e.key, "upstreams.demo.backends[0].wieght");
        assert_eq!(e.line, Some(8));
        assert!(e.problem.starts_with("unknown field `wieght`"), "{e}");
    }

    #[test]
    fn hashing_pools_need_a_readable_hash_key() {
        let hashing =
            GOOD.replace("    backends:", "    balance: maglev\n    hash_key: { header: X-User }\n    backends:");
        let c = parse(&hashing, "t.yaml", Path::new(".")).unwrap();
        assert_eq!(c.upstreams["demo"].hash_key, Some(HashKey::Header("x-user".into())));
        let e = err(&hashing.replace("    hash_key: { header: X-User }\n", ""));
        assert_eq!(e.key, "upstreams.demo.hash_key");
        let e = err(&hashing.replace("{ header: X-User }", "everything"));
        assert!(e.problem.contains("unknown hash key `everything`"), "{e}");
        let e = err(&GOOD.replace("    backends:", "    fallback: demo\n    backends:"));
        assert_eq!(e.key, "upstreams.demo.fallback");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let e = err(&GOOD.replace("upstream: demo", "upstream: nope"));
        assert_eq!(e.key, "routes[0].upstream");
        assert!(e.problem.contains("unknown upstream `nope`"));
        let e = err(&GOOD.replace("weight: 3", "weight: 0"));
        assert_eq!(e.key, "upstreams.demo.backends[0].weight");
        let e = err(&GOOD.replace("127.0.0.1:8443", "nonsense"));
        assert_eq!(e.key, "listen");
        assert!(e.to_string().starts_with("t.yaml:"), "{e}");
    }

    #[test]
    fn body_budgets_hold_at_least_one_read_and_the_worker_at_least_a_connection() {
        let quic = |q: &str| GOOD.replace("tls:", &format!("quic: {{ {q} }}\ntls:"));
        let c = parse(GOOD, "t.yaml", Path::new(".")).unwrap();
        assert_eq!((c.quic.body_buffer_per_connection.0, c.quic.body_buffer_per_worker.0), (4 << 20, 128 << 20));
        let e = err(&quic("body_buffer_per_connection: 4KiB"));
        assert_eq!(e.key, "quic.body_buffer_per_connection");
        assert!(e.problem.contains("must be between 64KiB and 1GiB"), "{}", e.problem);
        let e = err(&quic("body_buffer_per_connection: 8MiB, body_buffer_per_worker: 4MiB"));
        assert_eq!(e.key, "quic.body_buffer_per_worker");
        assert!(e.problem.contains("at least quic.body_buffer_per_connection"), "{}", e.problem);
        parse(&quic("body_buffer_per_connection: 64KiB, body_buffer_per_worker: 64KiB"), "t.yaml", Path::new("."))
            .unwrap();
    }
}
