//! Getting every packet to the worker that owns its connection, with no shared table.
//!
//! 1. **In the kernel:** a classic BPF program attached to each listen address's reuseport
//!    group reads the worker id at its fixed offset in the destination CID (see [`super::cid`])
//!    and returns it as the socket index. Sockets join the group in worker order, so index =
//!    worker. Packets whose DCID is not in Spooky's layout (a client's first Initial and its
//!    0-RTT packets) make the program return an index past the group, which tells the kernel
//!    to use its usual 4-tuple hash.
//! 2. **In Spooky:** when a packet still reaches the wrong worker (BPF disabled or refused,
//!    or a race while a socket joins), the worker hands it to the owner as a [`Stray`] over a
//!    mailbox bounded in packets and in bytes, counted; correctness never depends on the BPF
//!    program.

use super::cid::{CID_LEN, WORKER_OFFSET};
use crate::control::mailbox::{self, Mailbox, Postbox};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Stray packets one worker may have queued for another before further ones are dropped.
pub const STRAY_QUEUE: usize = 4096;
/// Bytes of stray packets queued for one worker (from all the others) before further ones
/// are dropped: a stray is a copy of a datagram of up to 64 KiB, so the count alone would let
/// a flood queue 256 MiB per worker.
pub const STRAY_QUEUE_BYTES: usize = 4 << 20;

/// A packet received by a worker that does not own its connection. Its bytes count against
/// its mailbox's [`STRAY_QUEUE_BYTES`] until it is dropped (handled, or refused by the mailbox).
pub struct Stray {
    pub data: Vec<u8>,
    pub from: SocketAddr,
    /// Index of the listen address (the same in every worker) it arrived on.
    pub socket: usize,
    queued: Arc<AtomicUsize>,
    charged: usize,
}

impl Drop for Stray {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.charged, Ordering::Relaxed);
    }
}

/// A worker's stray mailbox: the sending end, one per sending worker, and the receiving end.
pub fn stray_mailbox() -> std::io::Result<(StrayPeer, Mailbox<Stray>)> {
    let (postbox, mailbox) = mailbox::mailbox(Some(STRAY_QUEUE))?;
    Ok((StrayPeer { postbox, queued: Arc::default() }, mailbox))
}

/// The sending end of a worker's stray mailbox, with the count of bytes queued in it that
/// every sender and the receiver share.
pub struct StrayPeer {
    postbox: Postbox<Stray>,
    queued: Arc<AtomicUsize>,
}

impl StrayPeer {
    /// Hands a copy of `pkt` over; false (nothing queued) when the mailbox is full in packets
    /// or in bytes.
    pub fn send(&self, pkt: &[u8], from: SocketAddr, socket: usize) -> bool {
        let n = pkt.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > STRAY_QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        // Charged before the copy exists; a refused stray gives its bytes back as it drops.
        let stray = Stray { data: pkt.to_vec(), from, socket, queued: self.queued.clone(), charged: n };
        self.postbox.send(stray).is_ok()
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(StrayPeer { postbox: self.postbox.try_clone()?, queued: self.queued.clone() })
    }
}

/// Byte offset of the DCID in a short-header packet (after the first byte).
const SHORT_DCID: u32 = 1;
/// Byte offset of the DCID in a long-header packet (first byte, version, DCID length).
const LONG_DCID: u32 = 6;

/// The steering program for a group of `workers` sockets. Offset 0 is the first byte of the
/// UDP payload.
pub fn program(workers: u32) -> Vec<libc::sock_filter> {
    const LD_B: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_LEN: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_LEN) as u16;
    const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let marker = (CID_LEN - 1) as u32; // low five bits of CID byte 0: the length of the rest
    let worker = WORKER_OFFSET as u32;
    // Every load is checked against the payload length first: the kernel ends a program whose
    // load runs past the end with 0, which would steer truncated packets to worker 0.
    // Jump offsets count from the next instruction; FALLBACK is instruction 20.
    vec![
        /* 0 */ op(LD_LEN, 0, 0, 0),
        /* 1 */ op(JGE, 0, 18, SHORT_DCID + CID_LEN as u32), // too short for any DCID of ours
        /* 2 */ op(LD_B, 0, 0, 0),
        /* 3 */ op(JSET, 6, 0, 0x80), // long header → 10
        // Short header: the DCID has no length field; check our layout marker.
        /* 4 */
        op(LD_B, 0, 0, SHORT_DCID),
        /* 5 */ op(AND, 0, 0, 0x1f),
        /* 6 */ op(JEQ, 0, 13, marker),
        /* 7 */ op(LD_B, 0, 0, SHORT_DCID + worker),
        /* 8 */ op(JGE, 11, 0, workers),
        /* 9 */ op(RET_A, 0, 0, 0),
        // Long header: room for the whole DCID, its length, then the same checks at the
        // long-header offset.
        /* 10 */
        op(LD_LEN, 0, 0, 0),
        /* 11 */ op(JGE, 0, 8, LONG_DCID + CID_LEN as u32),
        /* 12 */ op(LD_B, 0, 0, LONG_DCID - 1),
        /* 13 */ op(JEQ, 0, 6, CID_LEN as u32),
        /* 14 */ op(LD_B, 0, 0, LONG_DCID),
        /* 15 */ op(AND, 0, 0, 0x1f),
        /* 16 */ op(JEQ, 0, 3, marker),
        /* 17 */ op(LD_B, 0, 0, LONG_DCID + worker),
        /* 18 */ op(JGE, 1, 0, workers),
        /* 19 */ op(RET_A, 0, 0, 0),
        /* 20 FALLBACK */ op(RET_K, 0, 0, u32::MAX),
    ]
}

/// Attaches the steering program to the reuseport group `socket` belongs to.
pub fn attach(socket: &UdpSocket, workers: usize) -> std::io::Result<()> {
    let mut filter = program(workers as u32);
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The reference interpreter for steering programs, used by the unit tests below and by the
/// `cid_steering` fuzz target ([`crate::fuzzing::cid_steering`]): runs `prog` on the UDP payload
/// `pkt` the way the kernel runs a reuseport cBPF program and returns the socket index it
/// picks (an index at or past the group size means "use the kernel's hash"). As in the kernel,
/// a load past the end of the packet ends the program with 0.
///
/// It knows exactly the instructions [`program`] uses (byte loads, the packet length, `and`,
/// `jset`/`jeq`/`jge`/`jgt` with constants, `ret` of A or a constant) and panics on any other,
/// or on a jump out of the program: both are bugs in the program, which the kernel would
/// refuse to attach.
pub fn run_program(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
    let (mut pc, mut a) = (0usize, 0u32);
    loop {
        let i = *prog.get(pc).expect("the program ran off its end");
        pc += 1;
        let code = u32::from(i.code);
        match code & 0x07 {
            libc::BPF_LD => match (code & 0x18, code & 0xe0) {
                (libc::BPF_B, libc::BPF_ABS) => match pkt.get(i.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0,
                },
                (libc::BPF_W, libc::BPF_LEN) => a = pkt.len() as u32,
                _ => panic!("unexpected load {code:#x}"),
            },
            libc::BPF_ALU if code & 0xf8 == libc::BPF_AND | libc::BPF_K => a &= i.k,
            libc::BPF_JMP if code & 0x08 == libc::BPF_K => {
                let taken = match code & 0xf0 {
                    libc::BPF_JSET => a & i.k != 0,
                    libc::BPF_JEQ => a == i.k,
                    libc::BPF_JGE => a >= i.k,
                    libc::BPF_JGT => a > i.k,
                    _ => panic!("unexpected jump {code:#x}"),
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            libc::BPF_RET => {
                return match code & 0x18 {
                    libc::BPF_A => a,
                    libc::BPF_K => i.k,
                    _ => panic!("unexpected return {code:#x}"),
                }
            }
            _ => panic!("unexpected instruction {code:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stray_mailbox_is_bounded_in_bytes_and_gives_them_back() {
        let (peer, mailbox) = stray_mailbox().unwrap();
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let big = vec![0u8; 60_000];
        let fits = STRAY_QUEUE_BYTES / big.len();
        assert!(fits < STRAY_QUEUE, "the byte bound binds before the count");
        for _ in 0..fits {
            assert!(peer.send(&big, from, 0));
        }
        assert!(!peer.send(&big, from, 0), "past the byte bound");
        assert!(peer.try_clone().unwrap().send(&[0u8; 100], from, 0), "small ones still fit");
        // Handled strays give their bytes back (the receiving end needs a runtime).
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().build().unwrap();
        rt.block_on(async { drop(mailbox.attach().unwrap().rx.try_recv().unwrap()) });
        assert!(peer.send(&big, from, 0));
        assert!(peer.queued.load(Ordering::Relaxed) <= STRAY_QUEUE_BYTES);
    }

    fn cid(worker: u8) -> [u8; CID_LEN] {
        super::super::cid::CidGenerator::new(1, 7, worker).generate()
    }

    #[test]
    fn short_header_goes_to_the_worker_in_the_cid() {
        let prog = program(4);
        for w in 0..4 {
            let mut pkt = vec![0x40];
            pkt.extend_from_slice(&cid(w));
            pkt.extend_from_slice(&[0xaa; 40]);
            assert_eq!(run_program(&prog, &pkt), u32::from(w));
        }
        // A worker id past the group, or a foreign CID layout: the kernel's hash decides.
        let mut pkt = vec![0x40];
        pkt.extend_from_slice(&cid(9));
        assert_eq!(run_program(&prog, &pkt), u32::MAX);
        pkt[1] = 0x08;
        pkt[4] = 1;
        assert_eq!(run_program(&prog, &pkt), u32::MAX);
    }

    #[test]
    fn long_header_uses_the_dcid_when_it_is_spookys() {
        let prog = program(2);
        // Handshake packet (type 2) to worker 1.
        let mut pkt = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
        pkt.extend_from_slice(&cid(1));
        pkt.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(run_program(&prog, &pkt), 1);
        // A client's first Initial: its own random 8-byte DCID → fallback.
        let mut initial = vec![0xc0, 0, 0, 0, 1, 8];
        initial.extend_from_slice(&[0x5a; 8]);
        initial.extend_from_slice(&[0; 1200]);
        assert_eq!(run_program(&prog, &initial), u32::MAX);
    }

    #[test]
    fn packets_too_short_for_a_dcid_of_ours_fall_back() {
        // Found by the cid_steering fuzz target: loads past the end used to end the program
        // with 0 (worker 0) instead of falling back to the kernel's hash.
        let prog = program(4);
        let mut short = vec![0x40];
        short.extend_from_slice(&cid(2));
        let mut long = vec![0xe0, 0, 0, 0, 1, CID_LEN as u8];
        long.extend_from_slice(&cid(2));
        assert_eq!(run_program(&prog, &short), 2);
        assert_eq!(run_program(&prog, &long), 2);
        for pkt in [&short, &long] {
            for len in 0..pkt.len() {
                assert_eq!(run_program(&prog, &pkt[..len]), u32::MAX, "{len} bytes");
            }
        }
    }
}
