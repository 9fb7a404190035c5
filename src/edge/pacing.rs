//! Pacing: when each of a connection's datagrams may leave (RFC 9002 §7.7).
//!
//! quiche stamps release times only under BBR2; for cubic and reno every packet is "now", so a
//! connection would send its whole congestion window in one burst, which overflows the
//! receive buffers of clients that read slowly (Chromium drops them). Spooky therefore keeps
//! its own schedule for window-based controllers, at `1.25 × cwnd / srtt` as §7.7 suggests,
//! and takes quiche's times where quiche paces.
//!
//! Most egress paths do not enforce `SO_TXTIME` (that needs an `fq` or `etf` qdisc; loopback
//! and the common `fq_codel`/`pfifo_fast` defaults have none). There Spooky holds the first
//! datagram that is not yet due and stops generating for that connection until a worker timer
//! releases it: one held datagram per connection, no busy loop. The worker's timers tick in
//! milliseconds, so whatever is due within the next [`HORIZON`] leaves at once, in GSO runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Datagrams due within this much of now are sent now (the worker's timer resolution).
pub const HORIZON: Duration = Duration::from_millis(1);
/// RFC 9002 §7.7: pace a little faster than cwnd per RTT, so RTT variation does not leave
/// the window unused.
const RATE_GAIN: f64 = 1.25;
/// Bursts may reach the initial window's ten datagrams (RFC 9002 §7.7), so a connection that
/// was idle, or one whose rate is still the handshake's guess, is not held back.
const BURST_DATAGRAMS: f64 = 10.0;

/// Who enforces release times, decided per worker at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaceMode {
    /// Every datagram leaves at once (`quic.pacing: false`).
    Off,
    /// Spooky holds datagrams until they are due.
    UserSpace,
    /// The egress qdisc releases them at the time carried by `SO_TXTIME`.
    Qdisc,
}

/// A datagram generated before it was due, kept until its release time.
pub struct Held {
    pub data: Vec<u8>,
    pub to: SocketAddr,
    pub at: Instant,
}

/// One connection's pacing schedule.
#[derive(Default)]
pub struct Pacer {
    /// Ideal release time of the next datagram under Spooky's own schedule.
    next: Option<Instant>,
    pub held: Option<Held>,
}

/// The pacing rate of one flush, read from the connection's active path once per flush.
#[derive(Clone, Copy)]
pub struct Rate {
    /// Time one byte takes at the pacing rate, in nanoseconds; `None` when quiche stamps the
    /// release times itself (BBR2) or pacing is off.
    nanos_per_byte: Option<f64>,
    /// Largest head start, for the burst allowance.
    burst: Duration,
}

impl Rate {
    /// The rate for `conn` now. `mode` off or BBR2 leave the times to quiche.
    pub fn of(conn: &quiche::Connection, mode: PaceMode) -> Rate {
        let own = mode != PaceMode::Off && conn.gcongestion_enabled() == Some(false);
        let path = own.then(|| conn.path_stats().find(|p| p.active)).flatten();
        match path {
            Some(p) if p.cwnd > 0 && !p.rtt.is_zero() => {
                let nanos_per_byte = p.rtt.as_nanos() as f64 / (RATE_GAIN * p.cwnd as f64);
                let burst = Duration::from_nanos((BURST_DATAGRAMS * p.pmtu as f64 * nanos_per_byte) as u64);
                Rate { nanos_per_byte: Some(nanos_per_byte), burst: burst.max(HORIZON) }
            }
            _ => Rate { nanos_per_byte: None, burst: Duration::ZERO },
        }
    }
}

impl Pacer {
    /// When a datagram of `len` bytes that quiche wants sent at `quiche_at` may leave, and
    /// moves the schedule on by its size.
    pub fn release(&mut self, now: Instant, len: usize, quiche_at: Instant, rate: Rate) -> Instant {
        let Some(nanos_per_byte) = rate.nanos_per_byte else { return quiche_at };
        // Idle time banks at most one burst: a connection that was quiet may not flood.
        let earliest = now.checked_sub(rate.burst).unwrap_or(now);
        let at = self.next.map_or(earliest, |next| next.max(earliest));
        self.next = Some(at + Duration::from_nanos((len as f64 * nanos_per_byte) as u64));
        at.max(quiche_at)
    }

    /// The held datagram's release time, if one waits.
    pub fn held_until(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(nanos_per_byte: f64, burst_ms: u64) -> Rate {
        Rate { nanos_per_byte: Some(nanos_per_byte), burst: Duration::from_millis(burst_ms) }
    }

    /// Release offsets from `now`, in whole milliseconds, of `count` 1,000-byte datagrams.
    fn offsets(pacer: &mut Pacer, now: Instant, count: usize, r: Rate) -> Vec<u128> {
        (0..count).map(|_| pacer.release(now, 1000, now, r).duration_since(now).as_millis()).collect()
    }

    #[test]
    fn a_steady_sender_is_spread_at_the_rate_after_its_burst() {
        let now = Instant::now();
        let mut pacer = Pacer::default();
        // 1,000 ns per byte: a 1,000-byte datagram every millisecond, 2 ms of head start.
        let r = rate(1000.0, 2);
        assert_eq!(offsets(&mut pacer, now, 6, r), [0, 0, 0, 1, 2, 3], "a 2 ms burst at once, then 1 ms apart");
    }

    #[test]
    fn idle_time_banks_at_most_one_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        let r = rate(1000.0, 2);
        offsets(&mut pacer, start, 3, r);
        // A long silence, then a new flight: again one burst's worth at once, no more.
        let later = start + Duration::from_secs(5);
        assert_eq!(offsets(&mut pacer, later, 5, r), [0, 0, 0, 1, 2]);
    }

    #[test]
    fn quiche_times_are_kept_when_quiche_paces_or_pacing_is_off() {
        let now = Instant::now();
        let mut pacer = Pacer::default();
        let quiche_at = now + Duration::from_micros(700);
        let r = Rate { nanos_per_byte: None, burst: Duration::ZERO };
        assert_eq!(pacer.release(now, 1200, quiche_at, r), quiche_at);
        // Spooky's schedule never sends earlier than quiche asks either.
        assert_eq!(pacer.release(now, 1200, quiche_at, rate(0.001, 1)), quiche_at);
    }
}
