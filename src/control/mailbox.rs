//! A channel a worker's event loop can sleep on: a crossbeam channel for the messages plus a
//! unix datagram pair whose readability wakes the loop (a crossbeam receiver cannot wake an
//! io_uring loop). The control thread talks to workers through one; workers hand each other
//! stray packets through another.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::os::unix::net::UnixDatagram;

/// Creates a mailbox: unbounded, or holding at most `bound` messages.
pub fn mailbox<T>(bound: Option<usize>) -> std::io::Result<(Postbox<T>, Mailbox<T>)> {
    let (tx, rx) = match bound {
        Some(n) => crossbeam_channel::bounded(n),
        None => crossbeam_channel::unbounded(),
    };
    let (wake, wake_io) = UnixDatagram::pair()?;
    wake.set_nonblocking(true)?;
    wake_io.set_nonblocking(true)?;
    Ok((Postbox { tx, wake }, Mailbox { rx, wake_io }))
}

/// The sending end; any thread.
pub struct Postbox<T> {
    tx: Sender<T>,
    wake: UnixDatagram,
}

impl<T> Postbox<T> {
    /// Delivers `msg` and wakes the receiver; gives it back if the mailbox is full or gone.
    pub fn send(&self, msg: T) -> Result<(), T> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                // A full wake-up socket already has a wake-up pending: ignore WouldBlock.
                let _ = self.wake.send(&[1]);
                Ok(())
            }
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => Err(m),
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Postbox { tx: self.tx.clone(), wake: self.wake.try_clone()? })
    }
}

/// The receiving end, owned outside any runtime: it outlives the runs of its worker (a
/// restarted worker attaches again and finds what was sent meanwhile).
pub struct Mailbox<T> {
    rx: Receiver<T>,
    wake_io: UnixDatagram,
}

impl<T> Mailbox<T> {
    /// A receiver on the calling thread's runtime, its wake-up socket registered there.
    pub fn attach(&self) -> std::io::Result<AttachedMailbox<T>> {
        let wake = monoio::net::unix::UnixDatagram::from_std(self.wake_io.try_clone()?)?;
        Ok(AttachedMailbox { rx: self.rx.clone(), wake_io: self.wake_io.try_clone()?, wake })
    }
}

/// The receiving end on its worker's runtime.
pub struct AttachedMailbox<T> {
    pub rx: Receiver<T>,
    wake_io: UnixDatagram,
    wake: monoio::net::unix::UnixDatagram,
}

impl<T> AttachedMailbox<T> {
    /// Resolves when something was sent.
    pub async fn wakeup(&self) {
        let _ = self.wake.readable(false).await;
    }

    /// Consumes pending wake-up bytes; call before draining `rx`, so a message sent meanwhile
    /// leaves a wake-up behind.
    pub fn clear_wakeups(&self) {
        let mut b = [0u8; 64];
        while self.wake_io.recv(&mut b).is_ok() {}
    }
}
