//! The HTTP/2 upstream side of a worker.
//!
//! - [`pool`]: one lazily opened, multiplexed HTTP/2 (h2c) connection per backend, replaced
//!   when it closes or is GOAWAY'd; stream concurrency bounded by the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` (h2 waits in `ready()`).
//! - [`forward`]: the task that carries one request upstream and its response back into the
//!   request's [`crate::bridge::exchange::Exchange`], mapping failures to 502/504 or resets.

pub mod forward;
pub mod pool;

use crate::config::Config;
use crate::lb::{self, Balancer};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// A worker's upstream state: pools with their balancers and connections. Owned by one thread.
pub struct Upstreams {
    pub pools: Vec<PoolInfo>,
    pub balancers: RefCell<Vec<Box<dyn Balancer>>>,
    /// Shared with the previous snapshot's `Upstreams` across a reload, so live HTTP/2
    /// connections to backends that stay are reused.
    pub connections: Rc<RefCell<pool::ConnectionPool>>,
    pub request_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub via_name: String,
}

/// One upstream pool as the worker sees it.
pub struct PoolInfo {
    pub name: String,
    pub backends: Vec<SocketAddr>,
}

impl Upstreams {
    /// Builds a worker's upstream state; with `previous` (a reload), keeps its connections to
    /// backends that remain when the HTTP/2 settings did not change.
    pub fn new(config: &Config, previous: Option<&Upstreams>) -> Self {
        let pools = config
            .upstreams
            .iter()
            .map(|(name, u)| PoolInfo { name: name.clone(), backends: u.backends.iter().map(|b| b.addr).collect() })
            .collect();
        let balancers = config.upstreams.values().map(lb::build).collect();
        let settings = pool::Settings::from_config(config);
        let connections = match previous {
            Some(prev) if prev.connections.borrow().settings() == settings => {
                let keep: Vec<SocketAddr> =
                    config.upstreams.values().flat_map(|u| u.backends.iter().map(|b| b.addr)).collect();
                prev.connections.borrow_mut().retain(&keep);
                prev.connections.clone()
            }
            _ => Rc::new(RefCell::new(pool::ConnectionPool::new(settings))),
        };
        Upstreams {
            pools,
            balancers: RefCell::new(balancers),
            connections,
            request_timeout: config.timeouts.request.0,
            body_idle_timeout: config.timeouts.idle.0,
            via_name: config.headers.via_name.clone(),
        }
    }

    /// Index of the pool named `name` (validation guarantees it exists).
    pub fn pool_index(&self, name: &str) -> usize {
        self.pools.iter().position(|p| p.name == name).expect("routes reference known pools")
    }
}
