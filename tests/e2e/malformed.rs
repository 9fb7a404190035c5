//! Malformed requests (RFC 9114 §4.1.2) get H3_MESSAGE_ERROR on their stream only.
//! (quiche's QPACK encoder lower-cases names, so upper-case names are sent by the aioquic
//! interop suite instead.)

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::{Body, Request};

const H3_MESSAGE_ERROR: u64 = 0x10e;

fn raw(fields: &[(&str, &str)]) -> Request {
    let mut r = Request::get("/");
    r.raw_head = Some(fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect());
    r
}

#[test]
fn malformed_requests_are_reset_with_message_error() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    let base = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/")];
    let with = |extra: (&'static str, &'static str)| {
        let mut v = base.to_vec();
        v.push(extra);
        raw(&v)
    };
    let cases = vec![
        ("missing :path", raw(&base[..3])),
        ("missing :method", raw(&base[1..])),
        ("connection header", with(("connection", "close"))),
        ("transfer-encoding", with(("transfer-encoding", "chunked"))),
        ("te: gzip", with(("te", "gzip"))),
        ("unknown pseudo-header", with((":bogus", "1"))),
        ("pseudo after regular", raw(&[("a", "b"), (":method", "GET"), (":scheme", "https"), (":path", "/")])),
    ];
    for (what, req) in cases {
        let r = client.request(req).unwrap();
        assert_eq!(r.reset, Some(H3_MESSAGE_ERROR), "{what}: got status {}", r.status);
    }
    // A body longer than its content-length.
    let mut lying = Request::post("/echo", Body::Pattern(5000));
    lying.headers.push(("content-length".into(), "10".into()));
    assert_eq!(client.request(lying).unwrap().reset, Some(H3_MESSAGE_ERROR));
    // ... and shorter.
    let mut short = Request::post("/echo", Body::Pattern(5));
    short.headers.push(("content-length".into(), "10".into()));
    assert_eq!(client.request(short).unwrap().reset, Some(H3_MESSAGE_ERROR));
    // The connection keeps serving.
    let r = client.request(Request::get("/")).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello from b\n"));
}
