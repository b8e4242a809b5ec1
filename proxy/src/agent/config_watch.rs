//! `--config FILE` is watched: a changed rules file is reloaded without a signal (issue
//! 25), whichever way it changed:
//! * written in place (IN_CLOSE_WRITE, IN_MODIFY on the file);
//! * an editor's write to a temporary file renamed over it (IN_MOVED_TO);
//! * the kubelet's update of a mounted ConfigMap: it writes a new timestamped directory and
//!   renames a `..data` symlink over the old one, beside the file, which is a symlink
//!   through `..data` (IN_MOVED_TO, IN_CREATE in the file's directory);
//! * configuration management replacing the target of a symlinked file (the target's own
//!   directory is watched too).
//!
//! inotify watches directories, not paths through symlinks, so the watch is on the file's
//! directory and on the directory of what it resolves to, and any event there counts. A
//! burst of events (an editor's several writes, the kubelet's several renames) is debounced
//! into one look at the file; the agent reloads only if the file's bytes changed since it
//! last read them, so an event for a neighbour file, or a rewrite with the same bytes,
//! reloads nothing.

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};
use log::{debug, warn};
use tokio::time::Instant;

/// Quiet time that ends a burst of events.
const QUIET: Duration = Duration::from_millis(150);
/// The longest a burst is waited out.
const MAX_BURST: Duration = Duration::from_secs(1);

/// The watch on the rules file.
pub struct ConfigWatch {
    path: PathBuf,
    events: EventStream<Vec<u8>>,
    /// The directory of the resolved file, watched beside the file's own directory.
    resolved: Option<(PathBuf, WatchDescriptor)>,
    /// The file's bytes when last read, to tell a change from an event that changed nothing.
    last_seen: Option<Vec<u8>>,
    /// A burst of events under way: when it is quiet enough to look, and when to look at
    /// the latest.
    settling: Option<(Instant, Instant)>,
}

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MODIFY
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB
}

impl ConfigWatch {
    /// Watches `path`'s directory (and its resolved directory). Its bytes now are the
    /// baseline: the rules the agent starts with were read from them.
    pub fn new(path: &Path) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let dir = parent(path);
        inotify.watches().add(&dir, mask())?;
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        let mut watch = ConfigWatch {
            path: path.to_owned(),
            events,
            resolved: None,
            last_seen: std::fs::read(path).ok(),
            settling: None,
        };
        watch.follow_symlinks();
        Ok(watch)
    }

    /// Watches the directory the file resolves to now, if it is another one.
    fn follow_symlinks(&mut self) {
        let Ok(real) = std::fs::canonicalize(&self.path) else {
            return;
        };
        let dir = parent(&real);
        if dir == parent(&self.path) || self.resolved.as_ref().is_some_and(|(d, _)| *d == dir) {
            return;
        }
        let mut watches = self.events.watches();
        if let Some((_, old)) = self.resolved.take() {
            // Gone already if the directory was removed (the kubelet's old timestamped one).
            let _ = watches.remove(old);
        }
        match watches.add(&dir, mask()) {
            Ok(wd) => self.resolved = Some((dir, wd)),
            Err(e) => debug!("config watch: {}: {e}", dir.display()),
        }
    }

    /// Resolves once the file's bytes differ from when it was last read: after a burst of
    /// events in the watched directories has settled. Never resolves if the watch fails.
    /// Cancel-safe (the serve loop drops it whenever another input comes first): a burst
    /// under way is kept in `self`, not in the future.
    pub async fn changed(&mut self) {
        loop {
            let Some((quiet, burst_end)) = self.settling else {
                self.next_event().await;
                let now = Instant::now();
                self.settling = Some((now + QUIET, now + MAX_BURST));
                continue;
            };
            tokio::select! {
                () = self.next_event() => {
                    let now = Instant::now();
                    self.settling = Some(((now + QUIET).min(burst_end), burst_end));
                }
                () = tokio::time::sleep_until(quiet.min(burst_end)) => {
                    self.settling = None;
                    self.follow_symlinks();
                    let now = std::fs::read(&self.path).ok();
                    if now != self.last_seen {
                        self.last_seen = now;
                        return;
                    }
                    debug!("config watch: {} unchanged", self.path.display());
                }
            }
        }
    }

    /// The next event; never, once the watch has failed.
    async fn next_event(&mut self) {
        match self.events.next().await {
            Some(Ok(event)) => debug!("config watch: {:?} {:?}", event.mask, name(&event.name)),
            Some(Err(e)) => {
                warn!("config watch: {e}; the rules file is no longer watched (SIGHUP reloads)");
                std::future::pending::<()>().await;
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// The file was read for a reload (SIGHUP): its bytes now are the baseline.
    pub fn read_now(&mut self) {
        self.last_seen = std::fs::read(&self.path).ok();
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn name(name: &Option<std::ffi::OsString>) -> &str {
    name.as_ref()
        .and_then(|n: &OsString| n.to_str())
        .unwrap_or("")
}
