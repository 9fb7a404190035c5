//! End-to-end tests: a real HTTP/3 client over real UDP sockets → Spooky (two workers) →
//! the project's real HTTP/2 backend over TCP. One binary, one module per scenario.

mod harness;

mod abuse;
mod access_log;
mod balancing;
mod bodies;
mod budgets;
mod config_errors;
mod control;
mod edge;
mod failures;
mod faults;
mod headers;
mod large_transfers;
mod load;
mod malformed;
mod reload_inflight;
mod resilience;
mod tls;
mod upstream_pool;
mod worker_panic;
