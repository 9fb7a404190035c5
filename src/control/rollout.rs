//! Which configuration is in force: the control thread sends each new snapshot to every worker,
//! and each worker acknowledges the version it swapped in. The version Spooky reports (`/config`,
//! `spooky_config_version`) is the newest one every worker has acknowledged; a newer one sent
//! but not yet acknowledged by all is reported as pending.

use super::snapshot::Snapshot;
use std::collections::VecDeque;
use std::sync::Arc;

pub struct Rollout {
    /// The newest version each worker acknowledged, by worker id.
    acked: Vec<u64>,
    /// Snapshots from the one every worker runs (first) to the newest sent (last).
    sent: VecDeque<Arc<Snapshot>>,
}

impl Rollout {
    /// Every worker was built from `first` (start-up waits for them all).
    pub fn new(first: Arc<Snapshot>, workers: usize) -> Self {
        Rollout { acked: vec![first.version; workers], sent: VecDeque::from([first]) }
    }

    /// The newest snapshot every worker acknowledged.
    pub fn applied(&self) -> &Arc<Snapshot> {
        self.sent.front().expect("never empty")
    }

    /// The newest snapshot sent, when not every worker has acknowledged it yet.
    pub fn pending(&self) -> Option<&Arc<Snapshot>> {
        (self.sent.len() > 1).then(|| self.latest())
    }

    /// The newest snapshot sent (what a reload compares against and a restarted worker runs).
    pub fn latest(&self) -> &Arc<Snapshot> {
        self.sent.back().expect("never empty")
    }

    /// The newest version each worker acknowledged, by worker id.
    pub fn worker_versions(&self) -> &[u64] {
        &self.acked
    }

    /// `next` was sent to every worker.
    pub fn sent(&mut self, next: Arc<Snapshot>) {
        self.sent.push_back(next);
    }

    /// `worker` runs `version` now; true if that moved the version every worker runs.
    pub fn acknowledged(&mut self, worker: usize, version: u64) -> bool {
        let Some(acked) = self.acked.get_mut(worker) else { return false };
        *acked = (*acked).max(version);
        let everyone = self.acked.iter().copied().min().unwrap_or(version);
        let before = self.applied().version;
        while self.sent.len() > 1 && self.sent[1].version <= everyone {
            self.sent.pop_front();
        }
        self.applied().version != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::snapshot::Source;

    fn snapshot(version: u64) -> Arc<Snapshot> {
        Arc::new(Snapshot::load(&Source::Embedded, version).unwrap())
    }

    #[test]
    fn the_applied_version_is_the_newest_every_worker_acknowledged() {
        let mut r = Rollout::new(snapshot(1), 2);
        assert_eq!((r.applied().version, r.pending().map(|s| s.version)), (1, None));
        r.sent(snapshot(2));
        r.sent(snapshot(3));
        assert_eq!((r.applied().version, r.pending().map(|s| s.version)), (1, Some(3)));
        assert!(!r.acknowledged(0, 3), "one worker is not everyone");
        assert_eq!(r.worker_versions(), [3, 1]);
        assert!(r.acknowledged(1, 2));
        assert_eq!((r.applied().version, r.pending().map(|s| s.version)), (2, Some(3)));
        assert!(!r.acknowledged(1, 2), "a repeated acknowledgement changes nothing");
        assert!(r.acknowledged(1, 3));
        assert_eq!((r.applied().version, r.pending().map(|s| s.version)), (3, None));
        assert_eq!(r.latest().version, 3);
        assert!(!r.acknowledged(7, 3), "an unknown worker is ignored");
    }

    #[test]
    fn a_restarted_worker_acknowledging_the_latest_catches_up_at_once() {
        let mut r = Rollout::new(snapshot(1), 2);
        r.sent(snapshot(2));
        r.acknowledged(0, 2);
        // Worker 1 restarts on the latest snapshot and acknowledges it without ever seeing 1→2.
        assert!(r.acknowledged(1, 2));
        assert_eq!(r.applied().version, 2);
        assert!(!r.acknowledged(1, 1), "an older version never moves a worker back");
        assert_eq!(r.worker_versions(), [2, 2]);
    }
}
