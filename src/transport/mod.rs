//! The HTTP/2 upstream side of a worker.
//!
//! - [`pool`]: lazily opened, multiplexed HTTP/2 connections per backend, lent while they have
//!   stream slots and receive window, replaced the moment they stop taking streams (GOAWAY).
//! - [`forward`]: the task that carries one request upstream and its response back into the
//!   request's [`crate::bridge::exchange::Exchange`], sending again what a backend did not
//!   process, with retries where they are safe, and failures mapped to 502/503/504 or stream
//!   resets.
//! - [`upload`]: the request-body pump of one stream, and the replay buffer behind it.
//! - [`select`]: which backend an attempt goes to — balancer pick over the backends that are
//!   healthy, not ejected and under their circuit-breaker limits, then the fallback pool.

pub mod forward;
pub mod pool;
pub mod select;
pub mod tls;
pub mod upload;

use crate::config::{Config, HashKey};
use crate::health::outlier::OutlierDetector;
use crate::health::HealthView;
use crate::lb::{self, Balancer};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// A worker's upstream state: pools with their balancers, load, outlier state and
/// connections. Owned by one thread; rebuilt per configuration snapshot.
pub struct Upstreams {
    pub pools: Vec<PoolInfo>,
    pub balancers: RefCell<Vec<Box<dyn Balancer>>>,
    /// Shared with the previous snapshot's `Upstreams` across a reload, so live HTTP/2
    /// connections to backends that stay are reused.
    pub connections: Rc<RefCell<pool::ConnectionPool>>,
    pub body_idle_timeout: Duration,
    /// `timeouts.client_read`: how long a response may wait for a client that reads nothing.
    pub client_read: Duration,
    /// `upstream_h2.replay_buffer`: request-body bytes held for sending an unprocessed stream again.
    pub replay_buffer: usize,
    /// The latest verdicts of active health checking (shared across snapshots).
    pub health: Rc<RefCell<Arc<HealthView>>>,
    load: RefCell<Vec<Vec<Load>>>,
    outliers: RefCell<Vec<OutlierDetector>>,
    /// Requests and retries in flight on this worker, for the retry budget.
    in_flight: Cell<u32>,
    retries_in_flight: Cell<u32>,
}

/// One upstream pool as the worker sees it.
pub struct PoolInfo {
    pub name: String,
    pub backends: Vec<SocketAddr>,
    pub hash_key: Option<HashKey>,
    pub fallback: Option<usize>,
    /// This worker's share of the circuit-breaker limits, per backend.
    pub max_active: u32,
    pub max_pending: u32,
    /// TLS towards this pool's backends (h2c when absent).
    pub tls: Option<Rc<tls::TlsUpstream>>,
}

/// Requests in flight and waiting, per backend.
#[derive(Clone, Copy, Default)]
struct Load {
    active: u32,
    pending: u32,
}

impl Upstreams {
    /// Builds a worker's upstream state; with `previous` (a reload), keeps its connections to
    /// backends that remain when the HTTP/2 settings did not change, and the health view.
    pub fn new(config: &Config, previous: Option<&Upstreams>) -> anyhow::Result<Self> {
        let workers = config.workers.resolve().max(1) as u32;
        let names: Vec<&String> = config.upstreams.keys().collect();
        let pools: Vec<PoolInfo> = config
            .upstreams
            .iter()
            .map(|(name, u)| -> anyhow::Result<PoolInfo> {
                Ok(PoolInfo {
                    name: name.clone(),
                    backends: u.backends.iter().map(|b| b.addr).collect(),
                    hash_key: u.hash_key.clone(),
                    fallback: u.fallback.as_ref().and_then(|f| names.iter().position(|n| *n == f)),
                    max_active: (u.circuit_breaker.max_active / workers).max(1),
                    max_pending: (u.circuit_breaker.max_pending / workers).max(1),
                    tls: u.tls.as_ref().map(tls::TlsUpstream::new).transpose()?.map(Rc::new),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let balancers = config.upstreams.values().map(lb::build).collect();
        let outliers = config.upstreams.values().map(|u| OutlierDetector::new(&u.outlier, u.backends.len())).collect();
        let load = pools.iter().map(|p| vec![Load::default(); p.backends.len()]).collect();
        let settings = pool::Settings::from_config(config);
        let connections = match previous {
            Some(prev) if prev.connections.borrow().settings() == settings => {
                let keep: Vec<SocketAddr> = pools.iter().flat_map(|p| p.backends.iter().copied()).collect();
                prev.connections.borrow_mut().retain(&keep);
                prev.connections.clone()
            }
            _ => Rc::new(RefCell::new(pool::ConnectionPool::new(settings))),
        };
        Ok(Upstreams {
            pools,
            balancers: RefCell::new(balancers),
            connections,
            body_idle_timeout: config.timeouts.idle.0,
            client_read: config.timeouts.client_read.0,
            replay_buffer: config.upstream_h2.replay_buffer.0 as usize,
            health: previous.map(|p| p.health.clone()).unwrap_or_default(),
            load: RefCell::new(load),
            outliers: RefCell::new(outliers),
            in_flight: Cell::new(0),
            retries_in_flight: Cell::new(0),
        })
    }

    /// Index of the pool named `name` (validation guarantees it exists).
    pub fn pool_index(&self, name: &str) -> usize {
        self.pools.iter().position(|p| p.name == name).expect("routes reference known pools")
    }

    /// Records a finished attempt for passive outlier detection.
    pub fn record_health(&self, pool: usize, backend: usize, gateway_failure: bool) {
        let ejected = self.outliers.borrow_mut()[pool].record(backend, gateway_failure, std::time::Instant::now());
        if let Some(time) = ejected {
            let addr = self.pools[pool].backends[backend];
            tracing::warn!(backend = %addr, pool = %self.pools[pool].name, ?time, "backend ejected as an outlier");
            metrics::counter!("spooky_outlier_ejections_total", "pool" => self.pools[pool].name.clone()).increment(1);
        }
    }

    /// Whether another retry fits the budget: retries in flight stay under `percent` of the
    /// requests in flight (never fewer than 3 allowed).
    pub fn retry_allowed(&self, percent: u32) -> bool {
        let cap = (self.in_flight.get() * percent / 100).max(3);
        self.retries_in_flight.get() < cap
    }
}

/// Counts a request (or a retry) in flight for as long as it lives.
pub struct InFlight<'a> {
    counter: &'a Cell<u32>,
}

impl<'a> InFlight<'a> {
    pub fn request(up: &'a Upstreams) -> Self {
        up.in_flight.set(up.in_flight.get() + 1);
        InFlight { counter: &up.in_flight }
    }

    pub fn retry(up: &'a Upstreams) -> Self {
        up.retries_in_flight.set(up.retries_in_flight.get() + 1);
        InFlight { counter: &up.retries_in_flight }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.set(self.counter.get() - 1);
    }
}

/// Counts one request against a backend's active or pending limit while it lives (also when
/// the request's task is dropped because the client went away).
pub struct LoadGuard<'a> {
    up: &'a Upstreams,
    pool: usize,
    backend: usize,
    pending: bool,
    /// An active request's balancer feedback was given ([`LoadGuard::end`]).
    ended: bool,
}

impl<'a> LoadGuard<'a> {
    pub fn pending(up: &'a Upstreams, pool: usize, backend: usize) -> Self {
        up.load.borrow_mut()[pool][backend].pending += 1;
        LoadGuard { up, pool, backend, pending: true, ended: false }
    }

    pub fn active(up: &'a Upstreams, pool: usize, backend: usize) -> Self {
        up.load.borrow_mut()[pool][backend].active += 1;
        up.balancers.borrow_mut()[pool].on_start(backend);
        LoadGuard { up, pool, backend, pending: false, ended: false }
    }

    /// The active request's response head came (or it failed) after `latency`: tells the
    /// balancer. Without this, dropping the guard tells it the request was cancelled.
    pub fn end(&mut self, latency: Duration, ok: bool) {
        if !self.pending && !self.ended {
            self.ended = true;
            self.up.balancers.borrow_mut()[self.pool].on_end(self.backend, latency, ok);
        }
    }
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        let mut load = self.up.load.borrow_mut();
        let l = &mut load[self.pool][self.backend];
        if self.pending {
            l.pending -= 1;
        } else {
            l.active -= 1;
            if !self.ended {
                // The client went away first: the request only leaves the balancer's count.
                self.up.balancers.borrow_mut()[self.pool].on_cancel(self.backend);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_caps_retries_in_flight() {
        let yaml = "listen: 127.0.0.1:0\nworkers: 1\ntls: { self_signed: [localhost] }\nupstreams:\n  p: { backends: [{ address: \"127.0.0.1:1\" }] }\nroutes: [{ upstream: p }]\n";
        let config = crate::config::parse(yaml, "t", std::path::Path::new(".")).unwrap();
        let up = Upstreams::new(&config, None).unwrap();
        let requests: Vec<_> = (0..40).map(|_| InFlight::request(&up)).collect();
        // 20% of 40 requests in flight: 8 retries at once, no more.
        let retries: Vec<_> = (0..8).map(|_| InFlight::retry(&up)).collect();
        assert!(!up.retry_allowed(20));
        drop(retries);
        assert!(up.retry_allowed(20));
        drop(requests);
        // With little traffic, a floor of 3 concurrent retries still applies.
        let few: Vec<_> = (0..2).map(|_| InFlight::retry(&up)).collect();
        assert!(up.retry_allowed(20));
        drop(few);
    }
}
