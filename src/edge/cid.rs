//! Spooky's server connection IDs.
//!
//! Every CID Spooky issues is [`CID_LEN`] bytes, laid out so that a load balancer in front of a
//! fleet (QUIC-LB plaintext mode, Katran) and the kernel's reuseport BPF program on this host
//! can route a packet by reading fixed offsets, with no shared table:
//!
//! ```text
//! byte 0      : bits 7-5 config rotation (0-6; 7 is QUIC-LB's "unroutable")
//!               bits 4-0 length of the rest of the CID (15)
//! bytes 1-2   : server id, big-endian (which node of the fleet)
//! byte 3      : worker id (which thread/socket of this node)
//! bytes 4-15  : nonce from the OS CSPRNG (unpredictable, unique)
//! ```

use ring::rand::{SecureRandom, SystemRandom};

/// Length of every CID Spooky issues.
pub const CID_LEN: usize = 16;
/// Offset of the worker id inside the CID.
pub const WORKER_OFFSET: usize = 3;

/// Issues CIDs for one worker.
pub struct CidGenerator {
    prefix: [u8; 4],
    rng: SystemRandom,
}

impl CidGenerator {
    pub fn new(rotation: u8, server_id: u16, worker: u8) -> Self {
        assert!(rotation < 7, "rotation 7 is reserved");
        let sid = server_id.to_be_bytes();
        CidGenerator {
            prefix: [(rotation << 5) | (CID_LEN as u8 - 1), sid[0], sid[1], worker],
            rng: SystemRandom::new(),
        }
    }

    pub fn generate(&self) -> [u8; CID_LEN] {
        let mut cid = [0u8; CID_LEN];
        cid[..4].copy_from_slice(&self.prefix);
        self.rng.fill(&mut cid[4..]).expect("the OS random source works");
        cid
    }
}

impl CidGenerator {
    /// The worker id this generator puts into its CIDs.
    pub fn worker(&self) -> u8 {
        self.prefix[WORKER_OFFSET]
    }

    /// Whether `cid` was issued by this node (any of its workers): layout, rotation and
    /// server id match.
    pub fn issued_here(&self, cid: &[u8]) -> bool {
        cid.len() == CID_LEN && cid[..WORKER_OFFSET] == self.prefix[..WORKER_OFFSET]
    }
}

/// The worker id inside a CID Spooky issued, if `dcid` has Spooky's layout.
pub fn worker_of(dcid: &[u8]) -> Option<u8> {
    (dcid.len() == CID_LEN && usize::from(dcid[0] & 0x1f) == CID_LEN - 1).then(|| dcid[WORKER_OFFSET])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_carries_rotation_server_and_worker() {
        let g = CidGenerator::new(2, 0xabcd, 7);
        let a = g.generate();
        let b = g.generate();
        assert_eq!(a[0], (2 << 5) | 15);
        assert_eq!(&a[1..3], &[0xab, 0xcd]);
        assert_eq!(worker_of(&a), Some(7));
        assert_eq!(g.worker(), 7);
        assert_ne!(a[4..], b[4..], "nonces differ");
        assert_eq!(worker_of(&a[..8]), None);
        assert!(g.issued_here(&a));
        assert!(CidGenerator::new(2, 0xabcd, 3).issued_here(&a), "any worker of the node");
        assert!(!CidGenerator::new(2, 0xabce, 7).issued_here(&a), "another node");
        assert!(!CidGenerator::new(3, 0xabcd, 7).issued_here(&a), "another rotation");
    }
}
