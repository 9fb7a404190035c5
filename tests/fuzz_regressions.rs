//! Replays every input in `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through the
//! check the fuzz target of that name runs (`spooky::fuzzing`), on stable and without
//! libFuzzer: a crash the fuzzers once found, or a seed that stopped passing, fails
//! `cargo test`. See docs/FUZZING.md.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.expect("readable directory").path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for file in files {
        let data = std::fs::read(&file).expect("readable input");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target}: {} fails its check again", file.display());
    }
}

#[test]
fn h3_request_head() {
    replay("h3_request_head", spooky::fuzzing::h3_request_head);
}

#[test]
fn config_parse() {
    replay("config_parse", spooky::fuzzing::config_parse);
}

#[test]
fn cid_steering() {
    replay("cid_steering", spooky::fuzzing::cid_steering);
}

#[test]
fn retry_token() {
    replay("retry_token", spooky::fuzzing::retry_token);
}

#[test]
fn datagram_entry() {
    replay("datagram_entry", spooky::fuzzing::datagram_entry);
}

#[test]
fn reload_apply() {
    replay("reload_apply", spooky::fuzzing::reload_apply);
}

/// Writes the hand-made seeds of `fuzz/corpus/` (run with `--ignored` after changing them):
/// real datagrams for `datagram_entry` (and `cid_steering`), the shipped configurations for
/// `config_parse`, inputs of chosen shapes for `reload_apply`.
#[test]
#[ignore]
fn write_seed_corpora() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    // A real client Initial (ClientHello, padded to 1200 bytes).
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    config.set_application_protos(quiche::h3::APPLICATION_PROTOCOL).unwrap();
    config.verify_peer(false);
    let scid = [0x5a; 16];
    let local = "127.0.0.1:4433".parse().unwrap();
    let peer = "127.0.0.1:8443".parse().unwrap();
    let mut conn =
        quiche::connect(Some("localhost"), &quiche::ConnectionId::from_ref(&scid), local, peer, &mut config).unwrap();
    let mut initial = vec![0u8; 1350];
    let (n, _) = conn.send(&mut initial).unwrap();
    initial.truncate(n);
    write("datagram_entry", "client-initial", &initial);
    // Spooky CIDs: worker 0 (the harness worker: unknown → stateless reset), worker 1 (handed
    // over), worker 9 (no such worker).
    for w in [0u8, 1, 9] {
        let cid = spooky::edge::cid::CidGenerator::new(0, 0, w).generate();
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0xab; 40]);
        write("datagram_entry", &format!("short-header-worker-{w}"), &short);
        write("cid_steering", &format!("short-header-worker-{w}"), &short);
        let mut handshake = vec![0xe0, 0, 0, 0, 1, 16];
        handshake.extend_from_slice(&cid);
        handshake.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8, 0x40, 0x20]);
        handshake.extend_from_slice(&[0xcd; 32]);
        write("datagram_entry", &format!("handshake-worker-{w}"), &handshake);
        write("cid_steering", &format!("handshake-worker-{w}"), &handshake);
    }
    // An unknown version, large enough to deserve a Version Negotiation.
    let mut vn = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9];
    vn.resize(1200, 0);
    write("datagram_entry", "unknown-version", &vn);
    write("datagram_entry", "garbage", b"\x07GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    write("cid_steering", "client-initial", &initial);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, file) in [("default.yaml", "config/default.yaml"), ("spooky.yaml", "config/spooky.yaml")] {
        write("config_parse", name, &std::fs::read(manifest.join(file)).unwrap());
    }
    for (name, input) in spooky::fuzzing::reload_seeds() {
        write("reload_apply", name, &input);
    }
}
