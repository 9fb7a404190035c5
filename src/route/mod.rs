//! Routing: which upstream pool serves a request.
//!
//! A route matches on host (exact, `*.suffix`, or any), path (prefix or exact, query ignored),
//! method and header conditions (presence or exact value); all of a route's conditions must
//! hold. Routes are tried in declared order and the first match wins — there is no
//! "most specific" scoring, so the order in the file is the whole story.

pub mod rate_limit;

use crate::config::Route;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Which route matched (its index in the config) and the pool it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    pub route: usize,
    pub pool: usize,
}

/// What a route looks at in a request.
pub struct RequestView<'a> {
    pub authority: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// A compiled route table.
pub struct Router {
    routes: Vec<CompiledRoute>,
}

struct CompiledRoute {
    host: HostMatch,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    pool: usize,
}

enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
    Suffix(String),
}

enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl Router {
    /// `pool_index` maps an upstream name to its index in the worker's pool list. Routes are
    /// validated already, so conversions cannot fail.
    pub fn new(routes: &[Route], pool_index: impl Fn(&str) -> usize) -> Self {
        let routes = routes
            .iter()
            .map(|r| CompiledRoute {
                host: if r.host == "*" {
                    HostMatch::Any
                } else if let Some(s) = r.host.strip_prefix('*') {
                    HostMatch::Suffix(s.to_string())
                } else {
                    HostMatch::Exact(r.host.clone())
                },
                path: match &r.path_exact {
                    Some(p) => PathMatch::Exact(p.clone()),
                    None => PathMatch::Prefix(r.path_prefix.clone()),
                },
                methods: r.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect(),
                headers: r
                    .headers
                    .iter()
                    .filter_map(|h| {
                        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                        Some((name, h.value.as_ref().and_then(|v| HeaderValue::from_str(v).ok())))
                    })
                    .collect(),
                pool: pool_index(&r.upstream),
            })
            .collect();
        Router { routes }
    }

    /// The first route matching the request.
    pub fn route(&self, req: &RequestView<'_>) -> Option<RouteMatch> {
        let host = strip_port(req.authority);
        let path = req.path.split('?').next().unwrap_or("");
        self.routes
            .iter()
            .position(|r| r.matches(host, path, req))
            .map(|i| RouteMatch { route: i, pool: self.routes[i].pool })
    }
}

impl CompiledRoute {
    fn matches(&self, host: &str, path: &str, req: &RequestView<'_>) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s),
        };
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
        };
        host_ok
            && path_ok
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self.headers.iter().all(|(name, value)| match value {
                None => req.headers.contains_key(name),
                Some(v) => req.headers.get_all(name).iter().any(|got| got == v),
            })
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // [v6]:port
        return authority.split(']').next().map(|h| &authority[..h.len() + 1]).unwrap_or(authority);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderMatch;

    fn route(host: &str, prefix: &str, up: &str) -> Route {
        Route {
            name: None,
            host: host.into(),
            path_prefix: prefix.into(),
            path_exact: None,
            methods: vec![],
            headers: vec![],
            upstream: up.into(),
            request_timeout: None,
            retries: Default::default(),
            rate_limit: None,
        }
    }

    fn pool_of(r: &Router, authority: &str, path: &str, method: Method, headers: &HeaderMap) -> Option<usize> {
        r.route(&RequestView { authority, path, method: &method, headers }).map(|m| m.pool)
    }

    #[test]
    fn first_match_in_order_wins() {
        let routes =
            [route("api.example.com", "/v1/", "a"), route("*.example.com", "/", "b"), route("*", "/static/", "c")];
        let r = Router::new(&routes, |n| ["a", "b", "c"].iter().position(|x| *x == n).unwrap());
        let h = HeaderMap::new();
        let pool = |a, p| pool_of(&r, a, p, Method::GET, &h);
        assert_eq!(pool("api.example.com:443", "/v1/users"), Some(0));
        assert_eq!(pool("API.example.com", "/v2"), Some(1));
        assert_eq!(pool("x.y.example.com", "/"), Some(1));
        assert_eq!(pool("example.com", "/static/x"), Some(2));
        assert_eq!(pool("example.com", "/other"), None);
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
    }

    #[test]
    fn exact_paths_methods_and_headers_narrow_a_route() {
        let mut exact = route("*", "/", "health");
        exact.path_exact = Some("/healthz".into());
        let mut writes = route("*", "/api/", "writer");
        writes.methods = vec!["POST".into(), "PUT".into()];
        let mut canary = route("*", "/api/", "canary");
        canary.headers = vec![HeaderMatch { name: "x-canary".into(), value: Some("1".into()) }];
        let mut traced = route("*", "/api/", "traced");
        traced.headers = vec![HeaderMatch { name: "traceparent".into(), value: None }];
        let routes = [exact, writes, canary, traced, route("*", "/api/", "reader")];
        let names = ["health", "writer", "canary", "traced", "reader"];
        let r = Router::new(&routes, |n| names.iter().position(|x| *x == n).unwrap());
        let none = HeaderMap::new();
        let mut canary_on = HeaderMap::new();
        canary_on.insert("x-canary", HeaderValue::from_static("1"));
        let mut canary_off = HeaderMap::new();
        canary_off.insert("x-canary", HeaderValue::from_static("0"));
        let mut traced_h = HeaderMap::new();
        traced_h.insert("traceparent", HeaderValue::from_static("00-x"));
        assert_eq!(pool_of(&r, "a", "/healthz?full=1", Method::GET, &none), Some(0));
        assert_eq!(pool_of(&r, "a", "/healthz/more", Method::GET, &none), None);
        assert_eq!(pool_of(&r, "a", "/api/x", Method::POST, &canary_on), Some(1), "declared order wins");
        assert_eq!(pool_of(&r, "a", "/api/x", Method::GET, &canary_on), Some(2));
        assert_eq!(pool_of(&r, "a", "/api/x", Method::GET, &canary_off), Some(4));
        assert_eq!(pool_of(&r, "a", "/api/x", Method::GET, &traced_h), Some(3));
        assert_eq!(pool_of(&r, "a", "/api/x", Method::GET, &none), Some(4));
    }
}
