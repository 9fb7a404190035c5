//! `spooky-load`: the HTTP/3 load generator (lands with the benchmark harness, bench/README.md).
fn main() {
    eprintln!("spooky-load: not built in this revision");
    std::process::exit(2);
}
