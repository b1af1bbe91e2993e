//! The writer lease (FORMAT.md §8): one archiver per repository.
//!
//! A writer creates `lease.json` with put-if-absent, or takes over a lease that is free
//! (released, expired, or provably left by a process that is gone) with a compare-and-swap
//! on its ETag. It renews with compare-and-swap well before expiry and, on a clean
//! shutdown, replaces the lease with a released one by compare-and-swap, so that it can
//! never remove a successor's lease. A live lease held by someone else is a refusal that
//! names the holder. Manifest generations being create-only keeps even a writer that lost
//! its lease (paused, partitioned) from forking the history.
//!
//! ## Who is gone
//!
//! Host names and pids say nothing certain: containers share host names and each runs its
//! archiver as pid 1. A lease names its holder's *instance*, a random id drawn once per
//! process. A lease is taken over before it expires only with proof that its instance is
//! gone:
//!
//! - its instance is this process and no live [`LeaseHandle`] holds it (a database task
//!   that ended without releasing, such as one that panicked), or
//! - this process holds the *liveness lock* beside the database (an exclusive `flock` on
//!   `.NAME.tidemark-lock` next to the database directory `NAME`, held by every archiver for
//!   as long as it lives) and found the lock file naming the lease's instance when it took
//!   it: that instance held the lock while it lived, so it no longer does. The host name
//!   must match too, so that a file system that does not share locks between hosts proves
//!   nothing.
//!
//! Anything else, a lease written by an older version without an instance included, is
//! waited out until it expires.
//!
//! Tests only: `TIDEMARK_TEST_LEASE_HOST` and `TIDEMARK_TEST_LEASE_PID` replace the host
//! name and pid this process writes into leases and compares them with, so that a test can
//! run two processes that look like containers sharing a host name, each as pid 1. Never
//! set them in production.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tidemark_manifest::model::{FORMAT_VERSION, Lease};
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::store::{ETag, StoreError};
use time::OffsetDateTime;

/// Lease errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "{location} is being archived by another archiver (holder {holder} on host {host}, pid \
         {pid}, lease valid until {expires_at}); stop it first, or wait for its lease to expire \
         if it died"
    )]
    Held {
        location: String,
        holder: String,
        host: String,
        pid: u32,
        expires_at: String,
    },
    #[error(
        "lost the lease on {location}: another archiver took it over (it expired before it \
         could be renewed); this archiver stops"
    )]
    Lost { location: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held lease.
#[derive(Debug)]
pub struct LeaseHandle {
    repo: Repository,
    lease: Lease,
    etag: ETag,
    ttl: Duration,
}

/// This process's instance id: random, drawn once, shared by all its tasks.
pub fn instance_id() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

/// The host name written into leases (`TIDEMARK_TEST_LEASE_HOST` in tests only).
fn this_host() -> String {
    std::env::var("TIDEMARK_TEST_LEASE_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(crate::checkpoint::hostname)
}

/// The pid written into leases (`TIDEMARK_TEST_LEASE_PID` in tests only).
fn this_pid() -> u32 {
    std::env::var("TIDEMARK_TEST_LEASE_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// Holders of the leases this process holds now (live [`LeaseHandle`]s). A lease that names
/// this process but no live handle was left by a task that ended without releasing it (a
/// database's service that panicked, with several databases per process).
static LIVE_HOLDERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live_holders() -> MutexGuard<'static, Vec<String>> {
    LIVE_HOLDERS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        live_holders().retain(|h| *h != self.lease.holder);
    }
}

/// A liveness lock this process holds until it exits.
#[derive(Debug)]
struct LivenessLock {
    /// Kept open: closing it would drop the lock.
    _file: File,
    /// The instances the lock file named when this process took the lock: all gone.
    previous: Vec<String>,
}

/// The liveness locks this process holds, by path.
static LIVENESS_LOCKS: Mutex<BTreeMap<PathBuf, LivenessLock>> = Mutex::new(BTreeMap::new());

/// The liveness lock file of the database directory `db`: `.NAME.tidemark-lock` beside it.
pub fn liveness_lock_path(db: &Path) -> PathBuf {
    let name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".to_owned());
    db.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(format!(".{name}.tidemark-lock"))
}

/// What the liveness lock proves: `None` when this process could not take it (then nothing
/// is proven), else the instances that held it before (all gone).
type Proof = Option<Vec<String>>;

/// How many earlier instances the lock file remembers. Not one: a process killed after it
/// took the lock but before it took the lease must not make its predecessor's lease
/// unprovable.
const LOCK_FILE_INSTANCES: usize = 16;

/// Takes the liveness lock at `path` for the rest of this process's life (once; later
/// calls return what the first found).
fn hold_liveness_lock(path: &Path) -> Proof {
    let mut locks = LIVENESS_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(held) = locks.get(path) {
        return Some(held.previous.clone());
    }
    match take_liveness_lock(path) {
        Ok(Some(held)) => {
            let previous = held.previous.clone();
            locks.insert(path.to_owned(), held);
            Some(previous)
        }
        Ok(None) => {
            tracing::info!(
                lock = %path.display(),
                "another running process holds the liveness lock of this database"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                lock = %path.display(),
                error = %e,
                "cannot hold the liveness lock beside the database; should this archiver die, \
                 the next one waits for its lease to expire"
            );
            None
        }
    }
}

/// Locks the file (`None`: another process holds it), reads the instances it names (every
/// one held the lock once, so none runs now), and adds this process's instance to them.
fn take_liveness_lock(path: &Path) -> std::io::Result<Option<LivenessLock>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    let mut previous: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let keep_from = previous.len().saturating_sub(LOCK_FILE_INSTANCES - 1);
    previous.drain(..keep_from);
    let mut content: String = previous.iter().map(|p| format!("{p}\n")).collect();
    content.push_str(&format!("{}\n", instance_id()));
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(content.as_bytes())?;
    file.sync_all()?;
    Ok(Some(LivenessLock {
        _file: file,
        previous,
    }))
}

/// Why `lease` is known to be left by a holder that is gone, if it is.
fn holder_is_gone(lease: &Lease, proof: &Proof) -> Option<&'static str> {
    // A lease written without an instance (an older version) proves nothing.
    let instance = lease.instance.as_deref()?;
    if instance == instance_id() {
        return (!live_holders().contains(&lease.holder))
            .then_some("ended without releasing it (a task of this process)");
    }
    let lock_says_gone = matches!(proof, Some(previous) if previous.iter().any(|p| p == instance));
    (lock_says_gone && lease.host == this_host()).then_some("is gone (its liveness lock is free)")
}

fn fmt(t: OffsetDateTime) -> String {
    tidemark_manifest::plan::fmt_time(t)
}

impl LeaseHandle {
    /// Takes the lease for `ttl`, or says who holds it. Without a liveness lock: should this
    /// process die, the next writer waits for the lease to expire (see
    /// [`LeaseHandle::acquire_beside`]).
    pub async fn acquire(repo: &Repository, ttl: Duration) -> Result<LeaseHandle, LeaseError> {
        Self::acquire_with(repo, ttl, None).await
    }

    /// Takes the lease for `ttl` as the archiver of the database directory `db`, holding the
    /// liveness lock beside it for the rest of this process's life: a successor on this host
    /// that shares the lock file takes the lease over at once should this process die, and
    /// this process takes over at once the lease of a holder the lock proves gone.
    pub async fn acquire_beside(
        repo: &Repository,
        ttl: Duration,
        db: &Path,
    ) -> Result<LeaseHandle, LeaseError> {
        let proof = hold_liveness_lock(&liveness_lock_path(db));
        Self::acquire_with(repo, ttl, proof).await
    }

    async fn acquire_with(
        repo: &Repository,
        ttl: Duration,
        proof: Proof,
    ) -> Result<LeaseHandle, LeaseError> {
        // Registered before the attempt: another task of this process that finds the lease
        // must see its holder as alive, even before this call returns.
        let holder = uuid::Uuid::new_v4().to_string();
        live_holders().push(holder.clone());
        let result = loop {
            match Self::attempt(repo, ttl, &holder, &proof).await {
                // Someone else changed the lease in the meantime: look again.
                Ok(None) => continue,
                Ok(Some(handle)) => break Ok(handle),
                Err(e) => break Err(e),
            }
        };
        if result.is_err() {
            live_holders().retain(|h| *h != holder);
        }
        result
    }

    /// One try: the lease, a refusal, or `None` when another writer changed it between the
    /// read and the compare-and-swap.
    async fn attempt(
        repo: &Repository,
        ttl: Duration,
        holder: &str,
        proof: &Proof,
    ) -> Result<Option<LeaseHandle>, LeaseError> {
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            format_version: FORMAT_VERSION,
            holder: holder.to_owned(),
            host: this_host(),
            pid: this_pid(),
            acquired_at: now,
            renewed_at: now,
            expires_at: now + ttl,
            instance: Some(instance_id().to_owned()),
            released_at: None,
        };
        let etag = match repo.create_lease(&lease).await? {
            Some(etag) => etag,
            None => {
                let Some((current, current_etag)) = repo.read_lease().await? else {
                    return Ok(None);
                };
                let gone = holder_is_gone(&current, proof);
                if current.is_live(now) && gone.is_none() {
                    return Err(LeaseError::Held {
                        location: repo.location(),
                        holder: current.holder,
                        host: current.host,
                        pid: current.pid,
                        expires_at: fmt(current.expires_at),
                    });
                }
                if current.released_at.is_none() {
                    let why = match gone {
                        Some(gone) if current.expires_at > now => gone,
                        _ => "let it expire",
                    };
                    tracing::warn!(
                        previous_host = %current.host,
                        previous_pid = current.pid,
                        previous_instance = current.instance.as_deref().unwrap_or("unknown"),
                        expires_at = %fmt(current.expires_at),
                        "taking over the lease of an archiver that {why}"
                    );
                }
                match repo.replace_lease(&lease, &current_etag).await? {
                    Some(etag) => etag,
                    None => return Ok(None),
                }
            }
        };
        tracing::info!(holder = %lease.holder, expires_at = %fmt(lease.expires_at), "lease acquired");
        Ok(Some(LeaseHandle {
            repo: repo.clone(),
            lease,
            etag,
            ttl,
        }))
    }

    /// When the lease should be renewed: a third of its time before expiry.
    pub fn renew_due(&self) -> OffsetDateTime {
        self.lease.expires_at - self.ttl * 2 / 3
    }

    /// The lease as held.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Extends the lease. Fails with [`LeaseError::Lost`] if someone else holds it now.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let now = OffsetDateTime::now_utc();
        let mut next = self.lease.clone();
        next.renewed_at = now;
        next.expires_at = now + self.ttl;
        match self.repo.replace_lease(&next, &self.etag).await? {
            Some(etag) => {
                self.etag = etag;
                self.lease = next;
                Ok(())
            }
            None => Err(LeaseError::Lost {
                location: self.repo.location(),
            }),
        }
    }

    /// Gives the lease up: replaces it with a released lease if it is still ours, by
    /// compare-and-swap, so that a successor's lease is never touched.
    pub async fn release(self) -> Result<(), LeaseError> {
        let now = OffsetDateTime::now_utc();
        match self
            .repo
            .release_lease(&self.lease, &self.etag, now)
            .await?
        {
            Some(_) => tracing::info!(holder = %self.lease.holder, "lease released"),
            None => tracing::warn!("the lease was no longer ours at shutdown; left it alone"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use tidemark_manifest::keys;
    use tidemark_manifest::model;
    use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
    use tidemark_manifest::store::{LocalStore, ObjectStore, StoreOp};

    fn repo(dir: &Path) -> Repository {
        Repository::new(Arc::new(LocalStore::open(dir).unwrap()))
    }

    /// Writes a lease as another process would have.
    async fn plant(r: &Repository, host: &str, pid: u32, instance: Option<&str>, ttl: Duration) {
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            format_version: FORMAT_VERSION,
            holder: uuid::Uuid::new_v4().to_string(),
            host: host.to_owned(),
            pid,
            acquired_at: now,
            renewed_at: now,
            expires_at: now + ttl,
            instance: instance.map(str::to_owned),
            released_at: None,
        };
        r.store()
            .put(keys::LEASE, Bytes::from(model::to_document_bytes(&lease)))
            .await
            .unwrap();
    }

    async fn stored(r: &Repository) -> Lease {
        r.read_lease().await.unwrap().expect("a lease").0
    }

    #[tokio::test]
    async fn a_second_holder_is_refused_until_release_or_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let mut a = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
        let err = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LeaseError::Held { .. }), "{msg}");
        assert!(
            msg.contains("another archiver") && msg.contains("pid"),
            "{msg}"
        );
        a.renew().await.unwrap();
        a.release().await.unwrap();
        // Released: marked so, and free at once.
        let left = stored(&r).await;
        assert!(left.released_at.is_some() && !left.is_live(OffsetDateTime::now_utc()));
        let short = LeaseHandle::acquire(&r, Duration::from_millis(200))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Expired: taken over, and the old holder finds out when it renews.
        let _b = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
        let mut short = short;
        assert!(matches!(
            short.renew().await.unwrap_err(),
            LeaseError::Lost { .. }
        ));
    }

    #[tokio::test]
    async fn a_lease_whose_handle_this_process_dropped_is_taken_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let db = dir.path().join("db");
        // A task that ends without releasing (a panic) drops its handle.
        let gone = LeaseHandle::acquire_beside(&r, Duration::from_secs(600), &db)
            .await
            .unwrap();
        let gone_holder = gone.lease().holder.clone();
        assert_eq!(gone.lease().instance.as_deref(), Some(instance_id()));
        drop(gone);
        let again = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db)
            .await
            .expect("taken over without waiting for expiry");
        assert_ne!(again.lease().holder, gone_holder);
        // A live handle in this process still keeps others out, liveness lock or not.
        for attempt in [
            LeaseHandle::acquire(&r, Duration::from_secs(60)).await,
            LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db).await,
        ] {
            assert!(matches!(attempt.unwrap_err(), LeaseError::Held { .. }));
        }
    }

    #[tokio::test]
    async fn another_process_with_this_host_name_and_pid_is_waited_out() {
        // A container sharing the host name, its archiver pid 1 like ours would be.
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let db = dir.path().join("db");
        let other = uuid::Uuid::new_v4().to_string();
        plant(
            &r,
            &this_host(),
            this_pid(),
            Some(&other),
            Duration::from_secs(60),
        )
        .await;
        for attempt in [
            LeaseHandle::acquire(&r, Duration::from_secs(60)).await,
            LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db).await,
        ] {
            let err = attempt.unwrap_err();
            assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        }
        assert_eq!(stored(&r).await.instance.as_deref(), Some(other.as_str()));
        // Once expired, it is free.
        plant(&r, &this_host(), this_pid(), Some(&other), Duration::ZERO).await;
        let h = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(h.lease().instance.as_deref(), Some(instance_id()));
    }

    #[tokio::test]
    async fn a_lease_without_an_instance_is_waited_out() {
        // Written by an older version, on this host, with this pid: no proof either way.
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        plant(&r, &this_host(), this_pid(), None, Duration::from_secs(60)).await;
        let err = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &dir.path().join("db"))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        plant(&r, &this_host(), this_pid(), None, Duration::ZERO).await;
        LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_free_liveness_lock_naming_the_holder_proves_it_gone() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let db = dir.path().join("db");
        let lock = liveness_lock_path(&db);
        assert_eq!(lock, dir.path().join(".db.tidemark-lock"));
        let dead = uuid::Uuid::new_v4().to_string();
        // The dead holder's lock file, no longer locked by anyone.
        std::fs::write(&lock, format!("{dead}\n")).unwrap();
        plant(&r, &this_host(), 1, Some(&dead), Duration::from_secs(600)).await;
        // Without the lock, nothing is proven.
        let err = LeaseHandle::acquire(&r, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        let h = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db)
            .await
            .expect("the holder is proven gone");
        assert_eq!(h.lease().instance.as_deref(), Some(instance_id()));
        // The lock file now names this process last.
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(text.lines().last(), Some(instance_id()));
    }

    #[tokio::test]
    async fn a_process_killed_before_it_took_the_lease_leaves_the_holder_provably_gone() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        let db = dir.path().join("db");
        let lock = liveness_lock_path(&db);
        let holder = uuid::Uuid::new_v4().to_string();
        // The holder died; a successor took the lock, then died too before taking the lease.
        let successor = uuid::Uuid::new_v4().to_string();
        std::fs::write(&lock, format!("{holder}\n{successor}\n")).unwrap();
        plant(&r, &this_host(), 1, Some(&holder), Duration::from_secs(600)).await;
        let h = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db)
            .await
            .expect("every instance the free lock names is gone");
        assert_eq!(h.lease().instance.as_deref(), Some(instance_id()));
        let text = std::fs::read_to_string(&lock).unwrap();
        let named: Vec<&str> = text.lines().collect();
        assert_eq!(named, [holder.as_str(), successor.as_str(), instance_id()]);
    }

    #[tokio::test]
    async fn a_held_liveness_lock_or_another_host_proves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path());
        // Another live process holds the lock (a second open file description conflicts
        // like another process would).
        let db = dir.path().join("held");
        let lock = liveness_lock_path(&db);
        let alive = uuid::Uuid::new_v4().to_string();
        std::fs::write(&lock, format!("{alive}\n")).unwrap();
        let holding = File::open(&lock).unwrap();
        holding.try_lock().unwrap();
        plant(&r, &this_host(), 1, Some(&alive), Duration::from_secs(600)).await;
        let err = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db)
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        // A free lock naming the holder, but the lease names another host.
        let db = dir.path().join("elsewhere");
        let gone = uuid::Uuid::new_v4().to_string();
        std::fs::write(liveness_lock_path(&db), format!("{gone}\n")).unwrap();
        plant(
            &r,
            "some-other-host",
            1,
            Some(&gone),
            Duration::from_secs(600),
        )
        .await;
        let err = LeaseHandle::acquire_beside(&r, Duration::from_secs(60), &db)
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        drop(holding);
    }

    #[tokio::test]
    async fn release_never_removes_a_successors_lease() {
        // The releasing store answers late, so that a successor takes the (expired) lease
        // over between the releaser's look and its change.
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let slow = Arc::new(FaultStore::new(Arc::clone(&inner)));
        let releaser = Repository::new(Arc::clone(&slow) as Arc<dyn ObjectStore>);
        let successor = Repository::new(inner);
        let old = LeaseHandle::acquire(&releaser, Duration::from_millis(100))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for op in [StoreOp::PutIfMatch, StoreOp::Delete] {
            slow.inject(
                FaultRule::new(Fault::Delay(Duration::from_millis(600)))
                    .on(op)
                    .key_prefix(keys::LEASE),
            );
        }
        let release = tokio::spawn(old.release());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut new = LeaseHandle::acquire(&successor, Duration::from_secs(60))
            .await
            .unwrap();
        release.await.unwrap().unwrap();
        let left = stored(&successor).await;
        assert_eq!(
            left.holder,
            new.lease().holder,
            "the successor's lease is gone"
        );
        assert!(left.is_live(OffsetDateTime::now_utc()));
        new.renew()
            .await
            .expect("the successor still holds its lease");
    }
}
