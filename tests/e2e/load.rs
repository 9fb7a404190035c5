//! Many concurrent streams over many connections, spread across both workers.

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::{Body, Options, Request};
use spooky::tools::pattern;
use std::time::Duration;

#[test]
fn a_thousand_concurrent_streams_over_ten_connections() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let threads: Vec<_> = (0..10)
        .map(|c| {
            let mut client =
                spooky.client_with(Options { timeout: Duration::from_secs(120), keep_body: 0, ..Options::default() });
            std::thread::spawn(move || {
                let requests: Vec<Request> = (0..100)
                    .map(|i| {
                        let n = 1000 + c * 100 + i;
                        if i % 2 == 0 {
                            Request::get(&format!("/bytes/{n}"))
                        } else {
                            Request::post("/echo", Body::Pattern(n as u64))
                        }
                    })
                    .collect();
                let sizes: Vec<u64> = (0..100).map(|i| (1000 + c * 100 + i) as u64).collect();
                let responses = client.run(requests).expect("run");
                for (r, n) in responses.iter().zip(sizes) {
                    assert_eq!(r.status, 200);
                    assert_eq!(r.sha256, pattern::sha256_hex(n), "{n} bytes");
                }
                responses.len()
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().expect("client thread")).sum();
    assert_eq!(total, 1000);
}
