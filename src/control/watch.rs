//! What makes the control thread act: signals (SIGHUP reload, SIGTERM/SIGINT drain) and
//! changes to the configuration file (inotify on its folder, so editors that replace the file
//! by rename are seen too; bursts of events are debounced into one reload).

use super::Event;
use crossbeam_channel::Sender;
use inotify::{Inotify, WatchMask};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::path::Path;
use std::time::Duration;

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

pub fn signals(events: Sender<Event>) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("spooky-signals".into()).spawn(move || {
        for sig in signals.forever() {
            let event = if sig == SIGHUP { Event::Reload { reason: "SIGHUP", reply: None } } else { Event::Shutdown };
            if events.send(event).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

pub fn config_file(path: &Path, events: Sender<Event>) -> anyhow::Result<()> {
    let path = std::fs::canonicalize(path)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut inotify = Inotify::init()?;
    inotify.watches().add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE)?;
    std::thread::Builder::new().name("spooky-watch".into()).spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let touched = match inotify.read_events_blocking(&mut buf) {
                Ok(mut evs) => evs.any(|e| e.name == Some(name.as_os_str())),
                Err(e) => {
                    tracing::error!(error = %e, "watching the configuration file failed; SIGHUP still reloads");
                    return;
                }
            };
            if !touched {
                continue;
            }
            // Debounce: wait until the writer has been quiet for a moment.
            loop {
                std::thread::sleep(DEBOUNCE);
                let more = inotify.read_events(&mut buf).map(|mut evs| evs.next().is_some());
                if !matches!(more, Ok(true)) {
                    break;
                }
            }
            if events.send(Event::Reload { reason: "file changed", reply: None }).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}
