//! Budgets for the request-body bytes Spooky holds: per connection
//! (`quic.body_buffer_per_connection`) and per worker (`quic.body_buffer_per_worker`), on top of
//! the per-stream queue ([`super::exchange::REQUEST_BUFFER`]).
//!
//! A byte is charged when the edge reads it from QUIC into an exchange and released when the
//! upstream pump has handed it to HTTP/2 whole (it asks for the next item) or the exchange
//! ends. When a budget is full the edge simply stops reading that stream: the bytes stay in
//! quiche, whose flow-control window (`quic.max_data` per connection) stops the client. So a
//! full budget is backpressure, never an error.
//!
//! Resuming: a stream that found no room is put on its connection's stalled list, and the
//! connection on the worker's; every release marks the budget and wakes the worker loop, which
//! then drives stalled streams again (connections round-robin, streams oldest first) while
//! there is room. Streams that still find none go to the back of the lists.
//!
//! Why this cannot deadlock: a charged byte never waits for budget. It is released when its
//! pump hands it upstream or its stream ends, and the pump waits only for its backend: for
//! HTTP/2 window or a stream slot, which other uploads to that backend hold. A wait can form a
//! cycle through the budget (a backend that reads one request's body only after another's, or
//! a slot held by an upload whose next bytes wait for budget), but every such cycle contains an
//! upload that sends nothing, and `per_try_timeout` ends an upload that sends nothing (504),
//! whatever it waits for; the connect and request timeouts, `client_read` and the QUIC idle
//! timeout bound the other waits. So a stall ends at the latest when such a timer fires, and
//! with backends that read, at the next release: every release wakes the stalled streams, so
//! no stall outlives the room it waits for. A stream alone always fits: the per-connection
//! budget is at least one read (64 KiB).

use super::exchange::Notifier;
use metrics::{Counter, Gauge};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

/// One worker's budget, shared by its connections. It outlives configuration snapshots (a
/// reload changes its limits, not what is held).
pub struct BodyBudget {
    held: Cell<usize>,
    per_connection: Cell<usize>,
    per_worker: Cell<usize>,
    /// Connections with stalled streams, in the order they stalled; each at most once.
    stalled: RefCell<VecDeque<Rc<ConnectionBudget>>>,
    /// Bytes were released (or limits raised) since the last resume pass.
    released: Cell<bool>,
    notifier: Rc<Notifier>,
    held_gauge: Gauge,
    stalls: Counter,
}

/// One connection's share: what its streams hold, and which of them wait for room.
pub struct ConnectionBudget {
    /// The connection's handle in its worker.
    pub conn: u64,
    held: Cell<usize>,
    worker: Rc<BodyBudget>,
    /// Stream ids waiting for room, oldest first; each at most once.
    stalled: RefCell<VecDeque<u64>>,
    /// Set while on the worker's stalled list.
    queued: Cell<bool>,
}

impl BodyBudget {
    pub fn new(worker: usize, per_connection: usize, per_worker: usize, notifier: Rc<Notifier>) -> Rc<Self> {
        let w = worker.to_string();
        Rc::new(BodyBudget {
            held: Cell::new(0),
            per_connection: Cell::new(per_connection),
            per_worker: Cell::new(per_worker),
            stalled: RefCell::new(VecDeque::new()),
            released: Cell::new(false),
            notifier,
            held_gauge: metrics::gauge!("spooky_request_body_buffered_bytes", "worker" => w.clone()),
            stalls: metrics::counter!("spooky_request_body_stalls_total", "worker" => w),
        })
    }

    /// New limits from a reload; raised ones let stalled streams go on.
    pub fn reconfigure(&self, per_connection: usize, per_worker: usize) {
        self.per_connection.set(per_connection);
        self.per_worker.set(per_worker);
        self.mark_released();
    }

    /// A new connection's share.
    pub fn connection(self: &Rc<Self>, conn: u64) -> Rc<ConnectionBudget> {
        Rc::new(ConnectionBudget {
            conn,
            held: Cell::new(0),
            worker: self.clone(),
            stalled: RefCell::new(VecDeque::new()),
            queued: Cell::new(false),
        })
    }

    /// Bytes the worker's streams hold.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    fn room(&self) -> usize {
        self.per_worker.get().saturating_sub(self.held.get())
    }

    fn mark_released(&self) {
        self.released.set(true);
        if !self.stalled.borrow().is_empty() {
            self.notifier.wake();
        }
    }

    /// The connections to drive again, oldest stall first, if anything was released since the
    /// last pass and the worker has room; empty otherwise. Each leaves the stalled list: those
    /// whose streams still find no room join it again (at the back).
    pub fn take_resumable(&self) -> Vec<Rc<ConnectionBudget>> {
        if !self.released.replace(false) || self.room() == 0 {
            return Vec::new();
        }
        let list: Vec<_> = self.stalled.borrow_mut().drain(..).collect();
        for c in &list {
            c.queued.set(false);
        }
        list
    }
}

impl ConnectionBudget {
    /// Bytes a stream of this connection may read now.
    pub fn room(&self) -> usize {
        let own = self.worker.per_connection.get().saturating_sub(self.held.get());
        own.min(self.worker.room())
    }

    pub fn charge(&self, n: usize) {
        self.held.set(self.held.get() + n);
        let w = &self.worker;
        w.held.set(w.held.get() + n);
        w.held_gauge.set(w.held.get() as f64);
    }

    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.held.set(self.held.get() - n);
        let w = &self.worker;
        w.held.set(w.held.get() - n);
        w.held_gauge.set(w.held.get() as f64);
        w.mark_released();
    }

    /// Stream `sid` found no room: it waits until some is released.
    pub fn stall(self: &Rc<Self>, sid: u64) {
        let mut stalled = self.stalled.borrow_mut();
        if stalled.contains(&sid) {
            return;
        }
        stalled.push_back(sid);
        self.worker.stalls.increment(1);
        if !self.queued.replace(true) {
            self.worker.stalled.borrow_mut().push_back(self.clone());
        }
    }

    /// The stalled streams, oldest first, emptying the list: the caller drives them while
    /// [`Self::room`] has room and gives the rest back with [`Self::restall`].
    pub fn take_stalled(&self) -> VecDeque<u64> {
        std::mem::take(&mut self.stalled.borrow_mut())
    }

    /// Puts streams taken but not driven back at the front, ahead of any that stalled meanwhile.
    pub fn restall(self: &Rc<Self>, mut rest: VecDeque<u64>) {
        if rest.is_empty() {
            return;
        }
        let mut stalled = self.stalled.borrow_mut();
        rest.extend(stalled.drain(..));
        *stalled = rest;
        if !self.queued.replace(true) {
            self.worker.stalled.borrow_mut().push_back(self.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_budgets_bound_the_room_and_releases_resume_stalled_streams() {
        let notifier = Rc::new(Notifier::default());
        let budget = BodyBudget::new(0, 100, 150, notifier.clone());
        let (a, b) = (budget.connection(1), budget.connection(2));
        a.charge(100);
        assert_eq!(a.room(), 0, "the connection's budget is full");
        assert_eq!(b.room(), 50, "the worker's has 50 left");
        b.charge(50);
        assert_eq!((a.room(), b.room(), budget.held()), (0, 0, 150));
        a.stall(4);
        a.stall(4);
        b.stall(8);
        assert!(budget.take_resumable().is_empty(), "nothing released yet");
        // A release wakes the loop and hands back every stalled connection, oldest first.
        b.release(30);
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        assert!(notifier.poll_ready(&mut cx).is_ready());
        let resumable = budget.take_resumable();
        assert_eq!(resumable.iter().map(|c| c.conn).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(a.take_stalled(), [4], "a stream stalls once however often it asks");
        assert_eq!((a.room(), b.room()), (0, 30));
        // Connection 1 is still full: its stream goes back and the connection with it.
        a.restall(VecDeque::from([4]));
        assert_eq!(b.take_stalled(), [8]);
        assert!(budget.take_resumable().is_empty(), "only a release starts another pass");
        a.release(100);
        b.release(20);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.take_resumable().iter().map(|c| c.conn).collect::<Vec<_>>(), [1]);
    }
}
