//! Cost of one pick per balancing algorithm (written with the balancing work).
fn main() {}
