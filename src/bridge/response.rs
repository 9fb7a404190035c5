//! HTTP/2 response head and trailers → HTTP/3 header sections, and Spooky's own error responses.

use super::CONNECTION_SPECIFIC;
use http::HeaderMap;
use quiche::h3::Header;

/// The fields Spooky adds to every response head it sends (from `headers` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The name in `via: 2 NAME`.
    pub via_name: Box<str>,
    /// `alt-svc`, replacing the backend's, when configured.
    pub alt_svc: Option<Box<str>>,
}

impl Added {
    pub fn new(policy: &crate::config::HeaderPolicy) -> Self {
        Added { via_name: policy.via_name.as_str().into(), alt_svc: policy.alt_svc.as_deref().map(Into::into) }
    }
}

/// The HTTP/3 header section for an upstream response: `:status`, then the upstream's fields
/// without connection-specific ones (and without its `alt-svc` when Spooky has its own), with
/// `via` appended, then Spooky's `alt-svc`.
pub fn head_to_h3(parts: &http::response::Parts, added: &Added) -> Vec<Header> {
    let mut out = Vec::with_capacity(parts.headers.len() + 3);
    out.push(Header::new(b":status", parts.status.as_str().as_bytes()));
    let mut via = None;
    for (name, value) in &parts.headers {
        if name == http::header::VIA {
            via = Some(value.as_bytes());
            continue;
        }
        if added.alt_svc.is_some() && name == http::header::ALT_SVC {
            continue;
        }
        if is_forwardable(name) {
            out.push(Header::new(name.as_str().as_bytes(), value.as_bytes()));
        }
    }
    let ours = format!("2 {}", added.via_name);
    let via = match via {
        Some(prev) => [prev, b", ", ours.as_bytes()].concat(),
        None => ours.into_bytes(),
    };
    out.push(Header::new(b"via", &via));
    if let Some(alt_svc) = &added.alt_svc {
        out.push(Header::new(b"alt-svc", alt_svc.as_bytes()));
    }
    out
}

/// The HTTP/3 trailer section for upstream trailers.
pub fn trailers_to_h3(trailers: &HeaderMap) -> Vec<Header> {
    trailers
        .iter()
        .filter(|(n, _)| is_forwardable(n))
        .map(|(n, v)| Header::new(n.as_str().as_bytes(), v.as_bytes()))
        .collect()
}

/// Trailers from HTTP/3 as a map for HTTP/2 (already validated).
fn is_forwardable(name: &http::HeaderName) -> bool {
    !CONNECTION_SPECIFIC.contains(&name.as_str()) && name != http::header::TE
}

/// A response Spooky generates itself (no route, upstream failure): status and a short
/// plain-text body naming the cause.
pub fn local_response(status: http::StatusCode, detail: &str) -> (http::response::Parts, bytes::Bytes) {
    let body =
        bytes::Bytes::from(format!("{} {}: {detail}\n", status.as_u16(), status.canonical_reason().unwrap_or("")));
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    parts.headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(body.len()));
    parts.headers.insert(http::header::SERVER, http::HeaderValue::from_static("spooky"));
    (parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &[Header]) -> Vec<(String, String)> {
        use quiche::h3::NameValue;
        h.iter()
            .map(|h| (String::from_utf8_lossy(h.name()).into(), String::from_utf8_lossy(h.value()).into()))
            .collect()
    }

    #[test]
    fn response_head_drops_connection_fields_and_appends_via() {
        let mut resp = http::Response::builder().status(203).header("x-a", "1").header("via", "1.1 origin");
        resp.headers_mut().unwrap().insert("keep-alive", http::HeaderValue::from_static("5"));
        let (parts, ()) = resp.body(()).unwrap().into_parts();
        let h = names(&head_to_h3(&parts, &Added { via_name: "spooky".into(), alt_svc: None }));
        assert_eq!(h[0], (":status".into(), "203".into()));
        assert!(h.contains(&("x-a".into(), "1".into())));
        assert!(h.contains(&("via".into(), "1.1 origin, 2 spooky".into())));
        assert!(!h.iter().any(|(n, _)| n == "keep-alive"));
    }

    #[test]
    fn configured_alt_svc_replaces_the_backends() {
        let resp = http::Response::builder().status(200).header("alt-svc", "h2=\":9000\"").header("x-a", "1");
        let (parts, ()) = resp.body(()).unwrap().into_parts();
        let added = Added { via_name: "edge".into(), alt_svc: Some("h3=\":443\"; ma=86400".into()) };
        let h = names(&head_to_h3(&parts, &added));
        let alt: Vec<_> = h.iter().filter(|(n, _)| n == "alt-svc").map(|(_, v)| v.as_str()).collect();
        assert_eq!(alt, ["h3=\":443\"; ma=86400"]);
        assert!(h.contains(&("via".into(), "2 edge".into())));
        // Without one of its own, Spooky passes the backend's on.
        let h = names(&head_to_h3(&parts, &Added { via_name: "edge".into(), alt_svc: None }));
        assert!(h.contains(&("alt-svc".into(), "h2=\":9000\"".into())));
    }
}
