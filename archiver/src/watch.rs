//! Waking the WAL follower.
//!
//! A [`Watcher`] watches the WAL directory and its `archive/` subdirectory (which RocksDB
//! creates when it first archives a WAL file) and wakes its owner when something changes
//! there. Events are coalesced: any number of them between two [`Watcher::wait`] calls wake
//! it once. A poll interval is the fallback, so that a missed event (or a filesystem that
//! delivers none) delays archiving by at most one interval, never stalls it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::Notify;
use tokio::time::{Interval, MissedTickBehavior};

/// The default poll interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Errors setting up a [`Watcher`].
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch {path} for changes: {source}; check that the directory exists and is \
         readable (on Linux, also the inotify limits fs.inotify.max_user_watches and \
         fs.inotify.max_user_instances)"
    )]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("the poll interval must be longer than zero")]
    ZeroInterval,
}

/// Wakes its owner when the WAL directory or its `archive/` changes, or when the poll
/// interval has passed.
pub struct Watcher {
    dir: PathBuf,
    archive: PathBuf,
    watcher: RecommendedWatcher,
    archive_watched: bool,
    /// Set by the event handler when `archive/` appeared or vanished.
    archive_changed: Arc<AtomicBool>,
    wake: Arc<Notify>,
    poll_interval: Duration,
    ticker: Option<Interval>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("dir", &self.dir)
            .field("archive_watched", &self.archive_watched)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Watches `wal_dir` (non-recursively) and, once it exists, `wal_dir/archive`.
    pub fn new(wal_dir: &Path, poll_interval: Duration) -> Result<Watcher, WatchError> {
        if poll_interval.is_zero() {
            return Err(WatchError::ZeroInterval);
        }
        let dir = wal_dir.to_path_buf();
        let archive = dir.join("archive");
        let wake = Arc::new(Notify::new());
        let archive_changed = Arc::new(AtomicBool::new(false));
        let handler = {
            let wake = Arc::clone(&wake);
            let archive_changed = Arc::clone(&archive_changed);
            let archive = archive.clone();
            move |res: notify::Result<Event>| {
                match res {
                    Ok(event) => {
                        if matches!(event.kind, EventKind::Create(_) | EventKind::Remove(_))
                            && event.paths.iter().any(|p| p == &archive)
                        {
                            archive_changed.store(true, Ordering::Release);
                        }
                        if !relevant(&event) {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "file watch error; relying on polling"),
                }
                // Stores one permit if nobody waits: events coalesce.
                wake.notify_one();
            }
        };
        let mut watcher =
            notify::recommended_watcher(handler).map_err(|source| WatchError::Watch {
                path: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                path: dir.clone(),
                source,
            })?;
        let mut w = Watcher {
            dir,
            archive,
            watcher,
            archive_watched: false,
            archive_changed,
            wake,
            poll_interval,
            ticker: None,
        };
        w.watch_archive();
        Ok(w)
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Whether `archive/` is being watched (it is once it exists).
    pub fn watching_archive(&self) -> bool {
        self.archive_watched
    }

    /// Returns when something changed in the watched directories since the previous call
    /// (at once if it did already), or when the poll interval has passed.
    pub async fn wait(&mut self) {
        let poll_interval = self.poll_interval;
        let ticker = self.ticker.get_or_insert_with(|| {
            let mut t = tokio::time::interval_at(
                tokio::time::Instant::now() + poll_interval,
                poll_interval,
            );
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = ticker.tick() => {}
        }
        self.watch_archive();
    }

    /// Starts watching `archive/` when it has appeared (again).
    fn watch_archive(&mut self) {
        if self.archive_changed.swap(false, Ordering::AcqRel) && self.archive_watched {
            // It was removed or re-created: the old watch may be stale.
            let _ = self.watcher.unwatch(&self.archive);
            self.archive_watched = false;
        }
        if self.archive_watched || !self.archive.is_dir() {
            return;
        }
        match self
            .watcher
            .watch(&self.archive, RecursiveMode::NonRecursive)
        {
            Ok(()) => {
                tracing::debug!(dir = %self.archive.display(), "watching WAL archive directory");
                self.archive_watched = true;
            }
            Err(e) => tracing::warn!(
                dir = %self.archive.display(),
                error = %e,
                "cannot watch the WAL archive directory; relying on polling"
            ),
        }
    }
}

/// Whether an event can matter to the follower: a change to a `*.log` file or to `archive/`,
/// or an event that names no path (a rescan request, an overflow).
fn relevant(event: &Event) -> bool {
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    event.need_rescan()
        || event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.extension().is_some_and(|e| e == "log")
                || p.file_name().is_some_and(|n| n == "archive")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn wakes_on_log_changes_and_on_the_poll_tick() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(tmp.path(), Duration::from_secs(30)).unwrap();
        assert!(!w.watching_archive());

        // An event wakes it long before the poll interval.
        std::fs::write(tmp.path().join("000004.log"), b"x").unwrap();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("woken by the file event");
        assert!(started.elapsed() < Duration::from_secs(10));

        // archive/ appears and is watched from then on; an event in it wakes the watcher.
        std::fs::create_dir(tmp.path().join("archive")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("woken by archive/ appearing");
        // Drain anything still pending from the creation, then move a log into archive/.
        while tokio::time::timeout(Duration::from_millis(200), w.wait())
            .await
            .is_ok()
        {}
        assert!(w.watching_archive());
        std::fs::write(tmp.path().join("archive").join("000009.log"), b"y").unwrap();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("woken by a change in archive/");

        // Changes to other files do not wake it; the poll tick does.
        while tokio::time::timeout(Duration::from_millis(200), w.wait())
            .await
            .is_ok()
        {}
        std::fs::write(tmp.path().join("000010.sst"), b"z").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), w.wait())
                .await
                .is_err(),
            "an SST file must not wake the follower"
        );
        let mut polling = Watcher::new(tmp.path(), Duration::from_millis(50)).unwrap();
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), polling.wait())
            .await
            .expect("the poll tick wakes it");
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[test]
    fn a_zero_interval_or_a_missing_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Watcher::new(tmp.path(), Duration::ZERO),
            Err(WatchError::ZeroInterval)
        ));
        let missing = tmp.path().join("nope");
        let err = Watcher::new(&missing, DEFAULT_POLL_INTERVAL).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
