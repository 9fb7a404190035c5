//! Bodies of every size, both directions, checked byte-for-byte by hash; trailers both ways.

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::{Body, Options, Request};
use spooky::tools::pattern;
use std::time::Duration;

const SIZES: [u64; 4] = [0, 1, 1 << 20, 100 << 20];

fn opts() -> Options {
    Options { timeout: Duration::from_secs(120), keep_body: 4096, ..Options::default() }
}

#[test]
fn get_streams_bodies_of_every_size_intact() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client_with(opts());
    for n in SIZES {
        let r = client.request(Request::get(&format!("/bytes/{n}"))).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body_len, n);
        assert_eq!(r.sha256, pattern::sha256_hex(n), "GET /bytes/{n}");
        assert_eq!(r.header("content-length"), Some(n.to_string().as_str()));
    }
}

#[test]
fn post_echo_streams_bodies_of_every_size_both_ways() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client_with(opts());
    for n in SIZES {
        let r = client.request(Request::post("/echo", Body::Pattern(n))).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!((r.body_len, r.sha256.as_str()), (n, pattern::sha256_hex(n).as_str()), "POST /echo {n}");
    }
    // The backend's own view of an upload: every byte arrived, in order.
    let r = client.request(Request::post("/sink", Body::Pattern(1 << 20))).unwrap();
    assert_eq!(r.text(), format!("{{\"bytes\":{},\"sha256\":\"{}\"}}", 1 << 20, pattern::sha256_hex(1 << 20)));
}

#[test]
fn trailers_are_forwarded_both_ways() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    let r = client.request(Request::get("/trailers")).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert!(r.trailers.contains(&("grpc-status".into(), "0".into())), "{:?}", r.trailers);
    assert!(r.trailers.contains(&("x-trailer".into(), "yes".into())));

    // Request trailers reach the backend, which echoes them as response trailers.
    let mut req = Request::post("/echo", Body::Pattern(100_000));
    req.trailers = vec![("x-checksum".into(), "abc123".into())];
    let r = client.request(req).unwrap();
    assert_eq!(r.sha256, pattern::sha256_hex(100_000));
    assert_eq!(r.trailers, vec![("x-checksum".to_string(), "abc123".to_string())]);
}
