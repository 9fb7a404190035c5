//! One load-generator thread speaking HTTP/3: a non-blocking epoll loop over its connections,
//! in one of three modes (see [`Mode`]).

use crate::h3conn::{self, Conn, Outcome};
use crate::pacer::Pacer;
use crate::plan::{Mode, Plan};
use crate::poller::Poller;
use crate::stats::{Progress, Stats};
use quiche::h3;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Longest a thread waits for its connections before the measured window starts anyway.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// Runs one thread's plan; meets the other threads at `barrier` when the measured window starts.
pub fn run(plan: &Plan, progress: &Progress, barrier: &Barrier) -> anyhow::Result<Stats> {
    let mut r = Runner::new(plan, progress)?;
    let stats = match plan.mode {
        Mode::Load => r.load(barrier),
        Mode::NewConn => r.new_conn(barrier),
        Mode::Idle => r.idle(barrier),
    };
    r.close_all();
    stats
}

struct Runner<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    config: quiche::Config,
    poller: Poller,
    conns: Vec<Option<Conn>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    headers: Vec<h3::Header>,
    body_chunk: Vec<u8>,
    buf: Vec<u8>,
    out: Vec<u8>,
    stats: Stats,
    /// Filled by `turn`: slots that completed the handshake, finished requests, died.
    ready: Vec<usize>,
    done: Vec<(usize, Outcome)>,
    closed: Vec<usize>,
    tokens: Vec<u64>,
    scratch: Vec<Outcome>,
    /// Slots that may have something to send (duplicates are harmless).
    dirty: Vec<usize>,
}

impl<'a> Runner<'a> {
    fn new(plan: &'a Plan, progress: &'a Progress) -> anyhow::Result<Self> {
        // Idle connections must outlive the hold; everything else fails fast.
        let idle_ms = match plan.mode {
            Mode::Idle => plan.duration.unwrap_or_default().as_millis() as u64 + 60_000,
            _ => 30_000,
        };
        Ok(Runner {
            plan,
            progress,
            config: h3conn::client_config(idle_ms)?,
            poller: Poller::new()?,
            conns: Vec::new(),
            timers: BinaryHeap::new(),
            headers: h3conn::request_headers(&plan.request),
            body_chunk: h3conn::body_chunk(),
            buf: vec![0; 65_535],
            out: vec![0; 65_535],
            stats: Stats::default(),
            ready: Vec::new(),
            done: Vec::new(),
            closed: Vec::new(),
            tokens: Vec::new(),
            scratch: Vec::new(),
            dirty: Vec::new(),
        })
    }

    /// Long-lived connections, closed or open loop.
    fn load(&mut self, barrier: &Barrier) -> anyhow::Result<Stats> {
        for _ in 0..self.plan.connections {
            self.open_slot(None);
        }
        let setup_end = Instant::now() + SETUP_LIMIT;
        while self.conns.iter().flatten().any(|c| !c.is_ready() && !c.is_closed())
            && Instant::now() < setup_end.min(self.plan.deadline)
        {
            self.turn(setup_end);
            for slot in std::mem::take(&mut self.closed) {
                self.stats.error(self.progress, "handshake failed");
                self.conns[slot] = None;
            }
        }
        self.ready.clear();
        self.stats.connections = self.conns.iter().flatten().filter(|c| c.is_ready()).count() as u64;
        barrier.wait();
        let start = Instant::now();
        let mut pacer = Pacer::new(self.plan.rate, start);
        let mut backlog: VecDeque<Instant> = VecDeque::new();
        let mut issued = 0u64;
        let window_end = self.plan.duration.map_or(self.plan.deadline, |d| (start + d).min(self.plan.deadline));
        loop {
            let now = Instant::now();
            if self.plan.window_over(start, now, self.stats.finished()) {
                break;
            }
            // Open loop: queue every due request; they start as streams free up.
            while self.plan.may_issue(issued + backlog.len() as u64) {
                match pacer.due() {
                    Some(_) => match pacer.claim_due(now) {
                        Some(t) => backlog.push_back(t),
                        None => break,
                    },
                    None => break,
                }
            }
            let open_loop = pacer.due().is_some();
            for slot in 0..self.conns.len() {
                let Some(c) = self.conns[slot].as_mut() else {
                    continue;
                };
                while c.can_start(self.plan.streams) {
                    let intended = if open_loop {
                        match backlog.pop_front() {
                            Some(t) => t,
                            None => break,
                        }
                    } else if self.plan.may_issue(issued) {
                        now
                    } else {
                        break;
                    };
                    if c.start(&self.headers, self.plan.request.body, &self.body_chunk, intended).is_err() {
                        self.stats.error(self.progress, "send_request");
                        break;
                    }
                    issued += 1;
                    self.dirty.push(slot);
                }
            }
            self.flush_touched();
            let wake = pacer.due().map_or(window_end, |d| d.min(window_end));
            self.turn(wake);
            self.record_done(|_, intended| intended);
            for slot in std::mem::take(&mut self.closed) {
                let lost = self.conns[slot].as_mut().map_or(0, |c| c.abandon());
                for _ in 0..lost {
                    self.stats.error(self.progress, "connection closed");
                }
                self.open_slot(Some(slot));
            }
            self.ready.clear();
        }
        self.stats.elapsed = start.elapsed();
        Ok(std::mem::take(&mut self.stats))
    }

    /// A new connection for every request; latency counts from the start of the handshake.
    fn new_conn(&mut self, barrier: &Barrier) -> anyhow::Result<Stats> {
        barrier.wait();
        let start = Instant::now();
        let mut issued = 0u64;
        for _ in 0..self.plan.connections {
            if self.plan.may_issue(issued) {
                self.open_slot(None);
                issued += 1;
            }
        }
        let window_end = self.plan.duration.map_or(self.plan.deadline, |d| (start + d).min(self.plan.deadline));
        loop {
            let now = Instant::now();
            if self.plan.window_over(start, now, self.stats.finished()) {
                break;
            }
            self.flush_touched();
            self.turn(window_end);
            for slot in std::mem::take(&mut self.ready) {
                self.stats.handshakes += 1;
                Progress::add(&self.progress.handshakes, 1);
                if let Some(c) = self.conns[slot].as_mut() {
                    let opened = c.opened;
                    if c.start(&self.headers, self.plan.request.body, &self.body_chunk, opened).is_err() {
                        self.stats.error(self.progress, "send_request");
                    }
                    self.dirty.push(slot);
                }
            }
            let mut finished = self.record_done(|c, _| c.opened);
            for slot in std::mem::take(&mut self.closed) {
                self.stats.error(self.progress, "connection closed");
                finished.push(slot);
            }
            for slot in finished {
                if let Some(mut c) = self.conns[slot].take() {
                    c.close(&mut self.out);
                }
                if self.plan.may_issue(issued) {
                    self.open_slot(Some(slot));
                    issued += 1;
                    self.dirty.push(slot);
                }
            }
        }
        self.stats.elapsed = start.elapsed();
        Ok(std::mem::take(&mut self.stats))
    }

    /// Opens the connections (a bounded number of handshakes at once, one request each to set
    /// up HTTP/3 fully), then holds them idle for the measured window.
    fn idle(&mut self, barrier: &Barrier) -> anyhow::Result<Stats> {
        let target = self.plan.connections;
        let mut opened = 0usize;
        let mut settled = 0usize;
        let setup_end = (Instant::now() + SETUP_LIMIT * 4).min(self.plan.deadline);
        while settled < target && Instant::now() < setup_end {
            while opened < target && opened - settled < self.plan.handshake_window {
                self.open_slot(None);
                opened += 1;
            }
            self.flush_touched();
            self.turn(setup_end);
            for slot in std::mem::take(&mut self.ready) {
                self.stats.handshakes += 1;
                Progress::add(&self.progress.handshakes, 1);
                if let Some(c) = self.conns[slot].as_mut() {
                    let now = Instant::now();
                    let _ = c.start(&self.headers, self.plan.request.body, &self.body_chunk, now);
                    self.dirty.push(slot);
                }
            }
            settled += self.record_done(|_, intended| intended).len();
            for slot in std::mem::take(&mut self.closed) {
                self.stats.error(self.progress, "connection closed");
                self.conns[slot] = None;
                settled += 1;
            }
        }
        self.flush_touched();
        self.stats.connections = self.conns.iter().flatten().filter(|c| c.is_ready()).count() as u64;
        barrier.wait();
        let start = Instant::now();
        let end = self.plan.duration.map_or(self.plan.deadline, |d| (start + d).min(self.plan.deadline));
        while Instant::now() < end {
            self.turn(end);
            for slot in std::mem::take(&mut self.closed) {
                self.stats.error(self.progress, "closed while idle");
                self.conns[slot] = None;
            }
            self.flush_touched();
        }
        self.stats.elapsed = start.elapsed();
        Ok(std::mem::take(&mut self.stats))
    }

    /// Records finished requests (latency from `since(conn, intended)`); returns their slots.
    fn record_done(&mut self, since: impl Fn(&Conn, Instant) -> Instant) -> Vec<usize> {
        let now = Instant::now();
        let mut slots = Vec::new();
        for (slot, outcome) in std::mem::take(&mut self.done) {
            match outcome {
                Outcome::Response { intended, status, down, up } => {
                    let from = self.conns[slot].as_ref().map_or(intended, |c| since(c, intended));
                    self.stats.bytes_up += up;
                    self.stats.response(self.progress, now.saturating_duration_since(from), status, down);
                }
                Outcome::Failed { kind } => self.stats.error(self.progress, kind),
            }
            slots.push(slot);
        }
        slots
    }

    /// Opens a connection into `slot` (or a new slot) and registers it.
    fn open_slot(&mut self, slot: Option<usize>) {
        let slot = slot.unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        match Conn::open(self.plan.peer, &self.plan.request.authority, &mut self.config) {
            Ok(c) => {
                if self.poller.add(c.fd(), slot as u64).is_err() {
                    self.stats.error(self.progress, "epoll add");
                    self.conns[slot] = None;
                    return;
                }
                self.conns[slot] = Some(c);
                self.dirty.push(slot);
            }
            Err(_) => {
                self.stats.error(self.progress, "connect");
                self.conns[slot] = None;
            }
        }
    }

    /// Waits for socket readiness or a due timer (at most until `wake`), then feeds sockets and
    /// fires timers; results land in `ready`, `done` and `closed`.
    fn turn(&mut self, wake: Instant) {
        self.flush_touched();
        let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let wake = next_timer.map_or(wake, |t| t.min(wake));
        let mut tokens = std::mem::take(&mut self.tokens);
        if self.poller.wait(wake, &mut tokens).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for token in tokens.drain(..) {
            let slot = token as usize;
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                continue;
            };
            self.dirty.push(slot);
            let was_closed = c.is_closed();
            if c.readable(&mut self.buf, &self.body_chunk, &mut self.scratch) {
                self.ready.push(slot);
            }
            self.done.extend(self.scratch.drain(..).map(|o| (slot, o)));
            if !was_closed && c.is_closed() {
                self.closed.push(slot);
            }
        }
        self.tokens = tokens;
        let now = Instant::now();
        while let Some(Reverse((t, slot))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                continue;
            };
            if c.armed != Some(t) {
                continue;
            }
            c.armed = None;
            self.dirty.push(slot);
            let was_closed = c.is_closed();
            c.on_timer(now);
            if !was_closed && c.is_closed() {
                self.closed.push(slot);
            }
        }
        self.flush_touched();
    }

    /// Sends what every touched connection has queued and re-arms its timer.
    fn flush_touched(&mut self) {
        for slot in std::mem::take(&mut self.dirty) {
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                continue;
            };
            if c.touched {
                c.flush(&mut self.out);
            }
            let t = c.next_timer();
            if t != c.armed {
                c.armed = t;
                if let Some(t) = t {
                    self.timers.push(Reverse((t, slot)));
                }
            }
        }
    }

    fn close_all(&mut self) {
        for c in self.conns.iter_mut().flatten() {
            c.close(&mut self.out);
        }
    }
}
