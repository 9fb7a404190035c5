//! Routing: which upstream pool serves a request, by host and path prefix.
//! Routes are tried in declared order; the first match wins.

use crate::config::Route;

/// Which route matched (its index in the config) and the pool it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    pub route: usize,
    pub pool: usize,
}

/// A compiled route table.
pub struct Router {
    routes: Vec<CompiledRoute>,
}

struct CompiledRoute {
    host: HostMatch,
    path_prefix: String,
    pool: usize,
}

enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
    Suffix(String),
}

impl Router {
    /// `pool_index` maps an upstream name to its index in the worker's pool list.
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
                path_prefix: r.path_prefix.clone(),
                pool: pool_index(&r.upstream),
            })
            .collect();
        Router { routes }
    }

    /// The first route matching `authority` (port ignored, case-insensitive) and `path`.
    pub fn route(&self, authority: &str, path: &str) -> Option<RouteMatch> {
        let host = strip_port(authority);
        self.routes
            .iter()
            .position(|r| {
                let host_ok = match &r.host {
                    HostMatch::Any => true,
                    HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
                    HostMatch::Suffix(s) => {
                        host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                    }
                };
                host_ok && path.starts_with(r.path_prefix.as_str())
            })
            .map(|i| RouteMatch { route: i, pool: self.routes[i].pool })
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

    fn route(host: &str, prefix: &str, up: &str) -> Route {
        Route { name: None, host: host.into(), path_prefix: prefix.into(), upstream: up.into() }
    }

    #[test]
    fn first_match_in_order_wins() {
        let routes =
            [route("api.example.com", "/v1/", "a"), route("*.example.com", "/", "b"), route("*", "/static/", "c")];
        let r = Router::new(&routes, |n| ["a", "b", "c"].iter().position(|x| *x == n).unwrap());
        let pool = |a, p| r.route(a, p).map(|m| m.pool);
        assert_eq!(pool("api.example.com:443", "/v1/users"), Some(0));
        assert_eq!(pool("API.example.com", "/v2"), Some(1));
        assert_eq!(pool("x.y.example.com", "/"), Some(1));
        assert_eq!(r.route("example.com", "/static/x"), Some(RouteMatch { route: 2, pool: 2 }));
        assert_eq!(pool("example.com", "/other"), None);
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
    }
}
