//! HTTP/3 request header section → validated request head → HTTP/2 request.

use super::CONNECTION_SPECIFIC;
use crate::config::{ForwardedMode, HeaderPolicy};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use std::net::SocketAddr;

/// A request head that passed RFC 9114 §4.3.1 validation.
#[derive(Debug)]
pub struct RequestHead {
    pub method: http::Method,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    /// Regular fields, names lower-case, connection-specific fields already refused.
    pub headers: HeaderMap,
    pub content_length: Option<u64>,
}

/// Why a request is malformed (RFC 9114 §4.1.2): the stream is reset with H3_MESSAGE_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed request: {0}")]
pub struct Malformed(pub &'static str);

/// Validates an HTTP/3 request header section (`quiche` yields it as name/value pairs in
/// wire order).
pub fn parse_head<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Result<RequestHead, Malformed> {
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers = HeaderMap::new();
    let mut regular_seen = false;
    for (name, value) in fields {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular_seen {
                return Err(Malformed("pseudo-header after a regular field"));
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                b"protocol" => return Err(Malformed(":protocol without extended CONNECT")),
                _ => return Err(Malformed("unknown pseudo-header")),
            };
            if slot.is_some() {
                return Err(Malformed("duplicate pseudo-header"));
            }
            let text = std::str::from_utf8(value).map_err(|_| Malformed("pseudo-header is not UTF-8"))?;
            *slot = Some(text.to_string());
            continue;
        }
        regular_seen = true;
        let name = field_name(name)?;
        if CONNECTION_SPECIFIC.contains(&name.as_str()) {
            return Err(Malformed("connection-specific header field"));
        }
        if name == http::header::TE && !value.eq_ignore_ascii_case(b"trailers") {
            return Err(Malformed("te other than `trailers`"));
        }
        headers.append(name, field_value(value)?);
    }
    let method = method.ok_or(Malformed("missing :method"))?;
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| Malformed("invalid :method"))?;
    let content_length = content_length(&headers)?;
    if method == http::Method::CONNECT {
        // Plain CONNECT carries only :method and :authority (RFC 9114 §4.4).
        if scheme.is_some() || path.is_some() {
            return Err(Malformed("CONNECT with :scheme or :path"));
        }
        let authority = authority.ok_or(Malformed("CONNECT without :authority"))?;
        if !valid_authority(&authority) {
            return Err(Malformed("invalid :authority"));
        }
        return Ok(RequestHead {
            method,
            scheme: String::new(),
            authority,
            path: String::new(),
            headers,
            content_length,
        });
    }
    let scheme = scheme.ok_or(Malformed("missing :scheme"))?;
    if scheme.is_empty() || http::uri::Scheme::try_from(scheme.as_str()).is_err() {
        return Err(Malformed("invalid :scheme"));
    }
    let path = path.ok_or(Malformed("missing :path"))?;
    if path.is_empty() {
        return Err(Malformed("empty :path"));
    }
    if !(path.starts_with('/') || (path == "*" && method == http::Method::OPTIONS)) {
        return Err(Malformed("invalid :path"));
    }
    // Exactly what goes upstream: no byte the URI grammar refuses, no fragment (which the
    // HTTP/2 request would silently drop).
    if http::uri::PathAndQuery::try_from(path.as_str()).map_or(true, |p| p.as_str() != path) {
        return Err(Malformed("invalid :path"));
    }
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
    let authority = match (authority, host) {
        (Some(a), Some(h)) if a != h => return Err(Malformed(":authority and host differ")),
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) => return Err(Malformed("missing :authority and host")),
    };
    if !valid_authority(&authority) {
        return Err(Malformed("invalid :authority"));
    }
    headers.remove(http::header::HOST);
    Ok(RequestHead { method, scheme, authority, path, headers, content_length })
}

/// Validates a trailer section: regular, lower-case fields only.
pub fn parse_trailers<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Result<HeaderMap, Malformed> {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        if name.starts_with(b":") {
            return Err(Malformed("pseudo-header in trailers"));
        }
        let name = field_name(name)?;
        if CONNECTION_SPECIFIC.contains(&name.as_str()) {
            return Err(Malformed("connection-specific header field in trailers"));
        }
        map.append(name, field_value(value)?);
    }
    Ok(map)
}

/// A non-empty `host[:port]`, without the deprecated userinfo (RFC 9114 §4.3.1).
fn valid_authority(authority: &str) -> bool {
    !authority.is_empty() && !authority.contains('@') && http::uri::Authority::try_from(authority).is_ok()
}

fn field_name(name: &[u8]) -> Result<HeaderName, Malformed> {
    if name.iter().any(u8::is_ascii_uppercase) {
        return Err(Malformed("upper-case field name"));
    }
    HeaderName::from_bytes(name).map_err(|_| Malformed("invalid field name"))
}

/// A field value as RFC 9113 §8.2.1 (which RFC 9114 §4.2 refers to) allows it: no NUL, CR or
/// LF (`HeaderValue` refuses those), and no leading or trailing space or tab.
fn field_value(value: &[u8]) -> Result<HeaderValue, Malformed> {
    let blank = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    if blank(value.first()) || blank(value.last()) {
        return Err(Malformed("field value with leading or trailing whitespace"));
    }
    HeaderValue::from_bytes(value).map_err(|_| Malformed("invalid field value"))
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Malformed> {
    let mut found: Option<u64> = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        let n = v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or(Malformed("invalid content-length"))?;
        if found.is_some_and(|f| f != n) {
            return Err(Malformed("conflicting content-length values"));
        }
        found = Some(n);
    }
    Ok(found)
}

/// Generates `x-request-id` values: 128 bits from a per-worker generator seeded by the OS
/// (unique, not a secret, so no syscall per request).
pub struct RequestIds {
    state: u64,
}

impl RequestIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).expect("OS randomness");
        RequestIds { state: u64::from_le_bytes(seed) }
    }

    /// wyrand: a fast, well-distributed 64-bit generator.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Returns the request's `x-request-id`, inserting a new one when the client sent none.
    pub fn ensure(&mut self, headers: &mut HeaderMap) -> String {
        if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
            return id.to_string();
        }
        let id = format!("{:016x}{:016x}", self.next_u64(), self.next_u64());
        headers.insert(HeaderName::from_static("x-request-id"), HeaderValue::from_str(&id).expect("hex"));
        id
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Fields in which proxies tell a backend about the client, besides `x-forwarded-for` (which
/// Spooky sets): removed from the client's request with `x_forwarded_for: overwrite`.
const CLIENT_FORWARDING_FIELDS: [&str; 3] = ["forwarded", "x-real-ip", "x-forwarded-host"];

/// Builds the HTTP/2 request Spooky sends upstream: same method, scheme, authority and path;
/// `via` appended; `x-forwarded-for` / `x-forwarded-proto` set per policy.
pub fn to_upstream(head: RequestHead, client: SocketAddr, policy: &HeaderPolicy) -> http::Request<()> {
    let RequestHead { method, scheme, authority, path, mut headers, .. } = head;
    if policy.x_forwarded_for == ForwardedMode::Overwrite {
        // Spooky is the edge: what a client claims about addresses and hosts is not passed on.
        for name in CLIENT_FORWARDING_FIELDS {
            headers.remove(name);
        }
    }
    let client_ip = client.ip().to_string();
    let xff = match (policy.x_forwarded_for, headers.get("x-forwarded-for").and_then(|v| v.to_str().ok())) {
        (ForwardedMode::Append, Some(prev)) => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&xff).expect("IP text is a valid header value"),
    );
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
    append_via(&mut headers, "3", &policy.via_name);
    let uri = http::Uri::builder()
        .scheme(if scheme.is_empty() { "https" } else { scheme.as_str() })
        .authority(authority.as_str())
        .path_and_query(path.as_str())
        .build()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    let mut req = http::Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = headers;
    req
}

/// Appends `<protocol-version> <name>` to `via` (RFC 9110 §7.6.3).
pub(crate) fn append_via(headers: &mut HeaderMap, version: &str, name: &str) {
    let ours = format!("{version} {name}");
    let value = match headers.get(http::header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ours}"),
        None => ours,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(http::header::VIA, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&str, &str)]) -> Result<RequestHead, Malformed> {
        parse_head(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    const BASE: [(&str, &str); 4] =
        [(":method", "GET"), (":scheme", "https"), (":authority", "a.example"), (":path", "/x?y=1")];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = BASE.to_vec();
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn valid_request_maps_to_h2_with_forwarding_headers() {
        let h = head(&with(&[("x-forwarded-for", "6.6.6.6"), ("accept", "*/*"), ("te", "trailers")])).unwrap();
        let policy = HeaderPolicy::default();
        let req = to_upstream(h, "192.0.2.7:5555".parse().unwrap(), &policy);
        assert_eq!(req.uri().to_string(), "https://a.example/x?y=1");
        assert_eq!(req.headers()["x-forwarded-for"], "192.0.2.7");
        assert_eq!(req.headers()["x-forwarded-proto"], "https");
        assert_eq!(req.headers()["via"], "3 spooky");
        assert_eq!(req.headers()["te"], "trailers");
    }

    #[test]
    fn overwrite_mode_drops_what_the_client_claims_about_forwarding() {
        let claims = [
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;host=evil"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
        ];
        let req =
            to_upstream(head(&with(&claims)).unwrap(), "192.0.2.7:5555".parse().unwrap(), &HeaderPolicy::default());
        assert_eq!(req.headers()["x-forwarded-for"], "192.0.2.7");
        for name in ["forwarded", "x-real-ip", "x-forwarded-host"] {
            assert!(!req.headers().contains_key(name), "{name} passed through");
        }
        // `append` trusts an upstream proxy in front of Spooky: its fields stay.
        let policy = HeaderPolicy { x_forwarded_for: ForwardedMode::Append, ..Default::default() };
        let req = to_upstream(head(&with(&claims)).unwrap(), "192.0.2.7:5555".parse().unwrap(), &policy);
        assert_eq!(req.headers()["x-real-ip"], "6.6.6.6");
    }

    #[test]
    fn field_values_with_surrounding_whitespace_are_malformed() {
        for value in [" x", "x ", "\tx", "x\t", " "] {
            assert_eq!(
                head(&with(&[("accept", value)])).err(),
                Some(Malformed("field value with leading or trailing whitespace")),
                "{value:?}"
            );
        }
        assert!(head(&with(&[("accept", "a b")])).is_ok(), "inner whitespace is fine");
        assert!(head(&with(&[("accept", "")])).is_ok(), "an empty value is fine");
        let trailers = [(&b"x-t"[..], &b"v "[..])];
        assert!(parse_trailers(trailers).is_err());
    }

    #[test]
    fn append_mode_keeps_the_chain() {
        let h = head(&with(&[("x-forwarded-for", "10.0.0.1"), ("via", "1.1 cdn")])).unwrap();
        let policy = HeaderPolicy { x_forwarded_for: ForwardedMode::Append, ..Default::default() };
        let req = to_upstream(h, "[::1]:5555".parse().unwrap(), &policy);
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(req.headers()["via"], "1.1 cdn, 3 spooky");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![(":scheme", "https"), (":authority", "a"), (":path", "/")], "missing :method"),
            (vec![(":method", "GET"), (":authority", "a"), (":path", "/")], "missing :scheme"),
            (vec![(":method", "GET"), (":scheme", "https"), (":authority", "a")], "missing :path"),
            (with(&[("Accept", "x")]), "upper-case field name"),
            (with(&[("connection", "close")]), "connection-specific header field"),
            (with(&[("transfer-encoding", "chunked")]), "connection-specific header field"),
            (with(&[("te", "gzip")]), "te other than `trailers`"),
            (with(&[(":foo", "x")]), "unknown pseudo-header"),
            (
                vec![(":method", "GET"), ("a", "b"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
                "pseudo-header after a regular field",
            ),
            (with(&[("a", "b"), (":method", "POST")]), "pseudo-header after a regular field"),
            (
                vec![(":method", "GET"), (":method", "GET"), (":scheme", "https"), (":path", "/")],
                "duplicate pseudo-header",
            ),
            (with(&[("content-length", "1"), ("content-length", "2")]), "conflicting content-length values"),
            (with(&[("content-length", "-1")]), "invalid content-length"),
            (with(&[("host", "b.example")]), ":authority and host differ"),
            (with(&[("x", "a\nb")]), "invalid field value"),
            // Found by the h3_request_head fuzz target.
            (vec![(":method", "CONNECT"), (":authority", "")], "invalid :authority"),
            (vec![(":method", "GET"), (":scheme", ""), (":authority", "a"), (":path", "/")], "invalid :scheme"),
            (vec![(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/p#f")], "invalid :path"),
            (vec![(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/a b")], "invalid :path"),
            (vec![(":method", "CONNECT"), (":authority", "a:443"), ("content-length", "x")], "invalid content-length"),
            (
                vec![(":method", "GET"), (":scheme", "https"), (":authority", "u@a.example"), (":path", "/")],
                "invalid :authority",
            ),
        ];
        for (fields, reason) in cases {
            assert_eq!(head(&fields).unwrap_err(), Malformed(reason), "{fields:?}");
        }
    }

    #[test]
    fn request_ids_are_added_once_and_kept_when_present() {
        let mut ids = RequestIds::new();
        let mut h = HeaderMap::new();
        let a = ids.ensure(&mut h);
        assert_eq!(a.len(), 32);
        assert_eq!(h["x-request-id"], a.as_str());
        assert_eq!(ids.ensure(&mut h), a, "an existing id is forwarded unchanged");
        assert_ne!(ids.ensure(&mut HeaderMap::new()), a);
    }

    #[test]
    fn trailers_must_not_carry_pseudo_headers() {
        let t = parse_trailers([(&b"grpc-status"[..], &b"0"[..])]).unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert!(parse_trailers([(&b":status"[..], &b"200"[..])]).is_err());
    }
}
