//! Loading and validating a configuration file as a whole.

use super::schema::*;
use std::collections::HashMap;
use std::fmt;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

type Invalid = (String, String);

fn bad(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    (key.into(), problem.into())
}

/// Semantic checks that the schema cannot express. Fills resolved fields (backend addresses,
/// absolute certificate paths).
pub(crate) fn validate(c: &mut Config, base: &Path) -> Result<(), Invalid> {
    if c.listen.is_empty() {
        return Err(bad("listen", "at least one address is required"));
    }
    if let Workers::Count(n) = c.workers {
        if !(1..=256).contains(&n) {
            return Err(bad("workers", format!("must be `auto` or 1..=256, got {n}")));
        }
    }
    validate_tls(&mut c.tls, base)?;
    validate_quic(&mut c.quic, base)?;
    for (key, d) in [
        ("timeouts.connect", c.timeouts.connect.0),
        ("timeouts.request", c.timeouts.request.0),
        ("timeouts.idle", c.timeouts.idle.0),
        ("timeouts.drain", c.timeouts.drain.0),
        ("timeouts.client_read", c.timeouts.client_read.0),
    ] {
        if d.is_zero() {
            return Err(bad(key, "must be greater than zero"));
        }
    }
    if c.headers.via_name.is_empty() || !c.headers.via_name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("headers.via_name", "must be a non-empty token without spaces"));
    }
    let h2 = &c.upstream_h2;
    if !(65_535..=(1 << 31) - 1).contains(&h2.stream_window.0) {
        return Err(bad("upstream_h2.stream_window", "must be between 65535 and 2^31-1 bytes"));
    }
    if !(h2.stream_window.0..=(1 << 31) - 1).contains(&h2.connection_window.0) {
        return Err(bad(
            "upstream_h2.connection_window",
            "must be at least upstream_h2.stream_window and at most 2^31-1 bytes",
        ));
    }
    if !(16_384..=16_777_215).contains(&h2.max_frame_size.0) {
        return Err(bad("upstream_h2.max_frame_size", "must be between 16384 and 16777215 (RFC 9113 §6.5.2)"));
    }
    if !(1..=64).contains(&h2.max_connections_per_backend) {
        return Err(bad("upstream_h2.max_connections_per_backend", "must be 1..=64"));
    }
    if h2.max_requests_per_connection == 0 {
        return Err(bad("upstream_h2.max_requests_per_connection", "must be at least 1"));
    }
    if h2.replay_buffer.0 > 16 << 20 {
        return Err(bad(
            "upstream_h2.replay_buffer",
            "must be at most 16MiB (0: only requests without a body are replayed)",
        ));
    }
    if h2.keepalive_timeout.0.is_zero() {
        return Err(bad("upstream_h2.keepalive_timeout", "must be greater than zero"));
    }
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
        if let Some(ca) = pool.tls.as_mut().and_then(|t| t.ca.as_mut()) {
            let path = base.join(&*ca);
            std::fs::read(&path).map_err(|e| {
                bad(format!("upstreams.{name}.tls.ca"), format!("cannot read `{}`: {e}", path.display()))
            })?;
            *ca = path;
        }
        for (i, b) in pool.backends.iter_mut().enumerate() {
            let key = format!("upstreams.{name}.backends[{i}]");
            if b.weight == 0 || b.weight > 10_000 {
                return Err(bad(format!("{key}.weight"), format!("must be 1..=10000, got {}", b.weight)));
            }
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
        let key = format!("routes[{i}]");
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
        if let Some(l) = &r.rate_limit {
            if !(l.rate.is_finite() && l.rate > 0.0) || l.burst == 0 {
                return Err(bad(format!("{key}.rate_limit"), "need rate > 0 and burst >= 1"));
            }
        }
        let rt = &r.retries;
        if rt.attempts > 10 {
            return Err(bad(format!("{key}.retries.attempts"), "at most 10"));
        }
        if !(1..=100).contains(&rt.budget_percent) {
            return Err(bad(format!("{key}.retries.budget_percent"), "must be 1..=100"));
        }
        if let Some(s) = rt.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(bad(format!("{key}.retries.statuses"), format!("{s} is not an HTTP status")));
        }
        if rt.per_try_timeout.is_some_and(|t| t.0.is_zero()) || r.request_timeout.is_some_and(|t| t.0.is_zero()) {
            return Err(bad(key.clone(), "timeouts must be greater than zero"));
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
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
                || h.name.bytes().any(|b| b.is_ascii_uppercase())
            {
                return Err(bad(
                    format!("{key}.headers[{j}].name"),
                    format!("`{}` is not a lower-case header name", h.name),
                ));
            }
        }
        let host = r.host.strip_prefix("*.").unwrap_or(&r.host);
        let valid_host = r.host == "*"
            || (!host.is_empty()
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':'));
        if !valid_host || r.host.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                format!("{key}.host"),
                format!("`{}` is not `*`, a lower-case host name, or `*.suffix`", r.host),
            ));
        }
    }
    if http::StatusCode::from_u16(c.no_route.status).is_err() || c.no_route.status < 200 {
        return Err(bad("no_route.status", format!("`{}` is not a final HTTP status", c.no_route.status)));
    }
    if c.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
        return Err(bad("log.level", format!("`{}` is not a valid log filter", c.log.level)));
    }
    Ok(())
}

fn validate_tls(tls: &mut Tls, base: &Path) -> Result<(), Invalid> {
    let rotation = tls.ticket_key_rotation.0;
    if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)).contains(&rotation) {
        return Err(bad(
            "tls.ticket_key_rotation",
            "must be between 1s and 7d (a TLS 1.3 ticket lives at most 7 days, RFC 8446 §4.6.1)",
        ));
    }
    validate_default_cert(tls, base)?;
    // Explicit names must be unique; names taken from certificates are checked when the
    // certificates are read (edge::tls).
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, entry) in tls.sni.iter_mut().enumerate() {
        let key = format!("tls.sni[{i}]");
        entry.cert = read_pem(&format!("{key}.cert"), base.join(&entry.cert), "CERTIFICATE-----")?;
        entry.key = read_pem(&format!("{key}.key"), base.join(&entry.key), "PRIVATE KEY-----")?;
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
            tls.cert = Some(read_pem("tls.cert", base.join(cert), "CERTIFICATE-----")?);
            tls.key = Some(read_pem("tls.key", base.join(key), "PRIVATE KEY-----")?);
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

/// Checks that `path` is readable and holds a PEM block ending in `marker`; returns the path.
fn read_pem(key: &str, path: PathBuf, marker: &str) -> Result<PathBuf, Invalid> {
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad(key, format!("cannot read `{}`: {e}", path.display())))?;
    if !text.contains(marker) {
        return Err(bad(key, format!("`{}` holds no PEM `{}` block", path.display(), marker.trim_end_matches('-'))));
    }
    Ok(path)
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
        if !h.path.starts_with('/') {
            return Err(bad(format!("{key}.health_check.path"), "must start with `/`"));
        }
        if h.interval.0.is_zero() || h.timeout.0.is_zero() || h.timeout.0 > h.interval.0 {
            return Err(bad(format!("{key}.health_check"), "need 0 < timeout <= interval"));
        }
        if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
            return Err(bad(format!("{key}.health_check"), "thresholds must be at least 1"));
        }
    }
    let o = &pool.outlier;
    if o.consecutive_failures == 0 || o.max_ejected_percent > 100 || o.base_ejection.0.is_zero() {
        return Err(bad(
            format!("{key}.outlier"),
            "need consecutive_failures >= 1, base_ejection > 0, max_ejected_percent <= 100",
        ));
    }
    if pool.circuit_breaker.max_active == 0 || pool.circuit_breaker.max_pending == 0 {
        return Err(bad(format!("{key}.circuit_breaker"), "limits must be at least 1"));
    }
    Ok(())
}

fn validate_quic(q: &mut Quic, base: &Path) -> Result<(), Invalid> {
    if !(1200..=65_507).contains(&q.max_udp_payload) {
        return Err(bad(
            "quic.max_udp_payload",
            format!("must be 1200..=65507 (the largest IPv4 UDP payload), got {}", q.max_udp_payload),
        ));
    }
    if !(1..=1 << 20).contains(&q.max_concurrent_streams) {
        return Err(bad("quic.max_concurrent_streams", "must be 1..=1048576"));
    }
    if q.max_stream_data.0 < 1024 || q.max_stream_data.0 > (1 << 30) {
        return Err(bad("quic.max_stream_data", "must be between 1KiB and 1GiB"));
    }
    if q.max_data.0 < q.max_stream_data.0 || q.max_data.0 > (1 << 32) {
        return Err(bad("quic.max_data", "must be at least quic.max_stream_data and at most 4GiB"));
    }
    if q.max_header_list_size.0 < 1024 {
        return Err(bad("quic.max_header_list_size", "must be at least 1KiB"));
    }
    if !["cubic", "reno", "bbr2"].contains(&q.congestion_control.as_str()) {
        return Err(bad(
            "quic.congestion_control",
            format!("unknown algorithm `{}` (use cubic, reno or bbr2)", q.congestion_control),
        ));
    }
    if q.cid_rotation > 6 {
        return Err(bad("quic.cid_rotation", "must be 0..=6 (7 marks unroutable CIDs in QUIC-LB)"));
    }
    if q.retry == RetryMode::Auto && q.retry_above_rate == 0 {
        return Err(bad("quic.retry_above_rate", "must be at least 1 with `retry: auto` (or use `retry: always`)"));
    }
    if q.retry_token_lifetime.0.is_zero() || q.retry_token_lifetime.0 > Duration::from_secs(600) {
        return Err(bad("quic.retry_token_lifetime", "must be between 1s and 10m"));
    }
    if q.max_connections_per_worker == 0 {
        return Err(bad("quic.max_connections_per_worker", "must be at least 1"));
    }
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
}
