//! Header mapping: forwarding headers, `via`, pseudo-headers, routing by host and path.

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::Request;

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn forwarding_headers_overwrite_by_default() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    let r = client
        .request(Request::get("/headers?q=1").header("x-forwarded-for", "6.6.6.6").header("accept", "*/*"))
        .unwrap();
    let text = r.text();
    let l = lines(&text);
    assert!(l.contains(&":method: GET"), "{text}");
    assert!(l.contains(&":scheme: https"), "{text}");
    assert!(l.contains(&":authority: localhost"), "{text}");
    assert!(l.contains(&":path: /headers?q=1"), "{text}");
    assert!(l.contains(&"x-forwarded-for: 127.0.0.1"), "client value must be overwritten: {text}");
    assert!(l.contains(&"x-forwarded-proto: https"), "{text}");
    assert!(l.contains(&"via: 3 spooky"), "{text}");
    assert!(l.contains(&"accept: */*"), "{text}");
    assert_eq!(r.header("via"), Some("2 spooky"));
    assert_eq!(r.header("x-backend"), Some("b"));
}

#[test]
fn append_mode_extends_the_forwarded_chain() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "headers:\n  x_forwarded_for: append\n  via_name: edge-1");
    let r = spooky.client().request(Request::get("/headers").header("x-forwarded-for", "6.6.6.6")).unwrap();
    let text = r.text();
    assert!(lines(&text).contains(&"x-forwarded-for: 6.6.6.6, 127.0.0.1"), "{text}");
    assert!(lines(&text).contains(&"via: 3 edge-1"), "{text}");
}

#[test]
fn routes_pick_pools_by_host_and_path_and_unmatched_get_404() {
    let api = Backend::start("api");
    let web = Backend::start("web");
    let spooky = Spooky::start(&format!(
        "listen: 127.0.0.1:0
workers: 2
tls: {{ self_signed: [localhost] }}
upstreams:
  api: {{ backends: [{{ address: \"{}\" }}] }}
  web: {{ backends: [{{ address: \"{}\" }}] }}
routes:
  - {{ host: localhost, path_prefix: /api/, upstream: api }}
  - {{ host: \"*.example.com\", upstream: web }}
  - {{ host: localhost, path_prefix: /static/, upstream: web }}
",
        api.addr, web.addr
    ));
    let mut client = spooky.client();
    let ask = |client: &mut spooky::tools::h3client::Client, authority: &str, path: &str| {
        let mut req = Request::get(path);
        req.authority = Some(authority.into());
        client.request(req).unwrap()
    };
    assert_eq!(ask(&mut client, "localhost", "/api/users").header("x-backend"), Some("api"));
    assert_eq!(ask(&mut client, "localhost:8443", "/static/a.css").header("x-backend"), Some("web"));
    assert_eq!(ask(&mut client, "www.example.com", "/api/users").header("x-backend"), Some("web"));
    let r = ask(&mut client, "localhost", "/other");
    assert_eq!(r.status, 404);
    assert!(r.text().starts_with("404 Not Found"), "{}", r.text());
    assert_eq!(ask(&mut client, "example.com", "/").status, 404, "`*.example.com` does not match the bare domain");
}

#[test]
fn smooth_weighted_round_robin_follows_weights() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&a, 3), (&b, 1)], "");
    // One connection lives on one worker, whose balancer gives exactly 3:1 per cycle.
    let responses = spooky.client().run((0..400).map(|_| Request::get("/")).collect()).unwrap();
    let count = |name: &str| responses.iter().filter(|r| r.header("x-backend") == Some(name)).count();
    assert_eq!((count("a"), count("b")), (300, 100));
}

#[test]
fn routes_match_methods_headers_and_exact_paths_and_no_route_is_configurable() {
    let (reads, writes, canary) = (Backend::start("reads"), Backend::start("writes"), Backend::start("canary"));
    let spooky = Spooky::start(&format!(
        "listen: 127.0.0.1:0
workers: 2
tls: {{ self_signed: [localhost] }}
no_route: {{ status: 421, body: not served here }}
upstreams:
  reads: {{ backends: [{{ address: \"{}\" }}] }}
  writes: {{ backends: [{{ address: \"{}\" }}] }}
  canary: {{ backends: [{{ address: \"{}\" }}] }}
routes:
  - {{ path_exact: /status/204, upstream: canary }}
  - {{ path_prefix: /api/, methods: [POST, PUT], upstream: writes }}
  - {{ path_prefix: /api/, headers: [{{ name: x-canary, value: \"1\" }}], upstream: canary }}
  - {{ path_prefix: /api/, upstream: reads }}
",
        reads.addr, writes.addr, canary.addr
    ));
    let mut c = spooky.client();
    let backend = |c: &mut spooky::tools::h3client::Client, req: Request| c.request(req).unwrap();
    assert_eq!(backend(&mut c, Request::get("/api/x")).header("x-backend"), Some("reads"));
    let post = Request::post("/api/x", spooky::tools::h3client::Body::Bytes("x".into()));
    assert_eq!(backend(&mut c, post).header("x-backend"), Some("writes"));
    assert_eq!(backend(&mut c, Request::get("/api/x").header("x-canary", "1")).header("x-backend"), Some("canary"));
    assert_eq!(backend(&mut c, Request::get("/api/x").header("x-canary", "2")).header("x-backend"), Some("reads"));
    assert_eq!(backend(&mut c, Request::get("/status/204?q")).status, 204);
    let r = backend(&mut c, Request::get("/status/204/more"));
    assert_eq!(r.status, 421);
    assert!(r.text().contains("not served here"), "{}", r.text());
}

#[test]
fn configured_alt_svc_is_on_every_response_and_follows_reloads() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "headers:\n  alt_svc: 'h3=\":443\"; ma=60'");
    let mut client = spooky.client();
    for path in ["/hello", "/status/503", "/bytes/70000"] {
        let r = client.request(Request::get(path)).unwrap();
        let all: Vec<_> = r.headers.iter().filter(|(n, _)| n == "alt-svc").map(|(_, v)| v.as_str()).collect();
        assert_eq!(all, ["h3=\":443\"; ma=60"], "{path}");
    }
    // A reload sets it for connections opened after it; open ones keep theirs.
    let text = std::fs::read_to_string(&spooky.config).unwrap().replace("ma=60", "ma=120");
    std::fs::write(&spooky.config, &text).unwrap();
    spooky.wait_for_config(&text);
    let fresh = spooky.client().request(Request::get("/hello")).unwrap();
    assert_eq!(fresh.header("alt-svc"), Some("h3=\":443\"; ma=120"));
    assert_eq!(client.request(Request::get("/hello")).unwrap().header("alt-svc"), Some("h3=\":443\"; ma=60"));
    // Spooky's own answers carry it too (a backend that is gone: 502).
    let dead = Spooky::start(
        "listen: 127.0.0.1:0\nworkers: 1\ntls: { self_signed: [localhost] }\nheaders: { alt_svc: clear }\n\
         timeouts: { connect: 1s }\nupstreams:\n  gone: { backends: [{ address: \"127.0.0.1:1\" }] }\n\
         routes:\n  - upstream: gone\n",
    );
    let r = dead.client().request(Request::get("/x")).unwrap();
    assert_eq!((r.status, r.header("alt-svc")), (502, Some("clear")));
    // Not configured: none.
    let plain = Spooky::in_front_of(&[(&backend, 1)], "");
    assert_eq!(plain.client().request(Request::get("/hello")).unwrap().header("alt-svc"), None);
}
