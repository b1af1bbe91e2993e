//! The local-directory store (`file:///ABSOLUTE/DIR`).

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::checksum::Hasher;

use super::direct;
use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PREALLOC_MAX, PageCache, RESERVED_SEGMENT_PREFIX,
    StoreError, StoreOp, StoreResult, validate_key, validate_prefix,
};

/// Name of the lock file that serialises `put_if_match` and `delete` across processes.
const LOCK_FILE: &str = ".tidemark-store.lock";
/// Prefix of the temporary files a write goes through.
const TEMP_PREFIX: &str = ".tidemark-tmp-";
/// Copy buffer for `put_file` / `get_to_file`.
const COPY_BUF: usize = 1 << 20;

/// An object store in a local directory: each object is a file under the root, its key the
/// relative path.
///
/// - **Atomic, durable writes.** Every write goes to a temporary file in the destination
///   directory, which is written, fsynced, then renamed (or hard-linked) into place, after
///   which the directory is fsynced. Readers see the old object or the new one, never a
///   mix; a crash leaves at most a stray temporary file.
/// - **Create-only writes** (`put_if_absent`) hard-link the finished temporary file to the
///   final name; `link(2)` fails if the name exists, so of any number of writers in any
///   number of processes exactly one wins.
/// - **Compare-and-swap writes** (`put_if_match`) and deletes hold an exclusive `flock(2)` on
///   the lock file `.tidemark-store.lock` in the root while they compare and replace, so they
///   are atomic across processes on one machine. (Plain `put` does not take the lock: like
///   on S3, the last unconditional writer wins.)
/// - **ETags** are `SIZE-MTIME-INODE` (hex; modification time in nanoseconds), read from the
///   file's metadata so that `head` and `list` never read contents. Every write creates a
///   new file (a new inode while the old file still exists) and stamps it with the current
///   time at nanosecond resolution, so each write yields a new ETag. This needs a file
///   system with nanosecond timestamps (ext4, XFS, btrfs, tmpfs, ZFS all have them).
/// - Files and directories whose names start with `.tidemark-` (temporary and lock files) are
///   never visible as objects; keys cannot contain such segments. Stray temporary files
///   left by a crash are inert and may be deleted while no writer runs.
///
/// - **No symbolic links inside the repository.** The root may be a link (the operator's
///   choice), but no operation follows a link below it: `list` skips a link with a warning,
///   every other operation refuses it with an error naming its path. Objects are opened with
///   `O_NOFOLLOW` and directories are checked with `lstat`, so a link planted in the
///   repository (say `bases/x/files -> /var/lib/app/db`) can never make a prune delete, or a
///   restore read, files outside it.
///
/// A key and keys below it (`a` and `a/b`) cannot both exist here, unlike on S3; Tidemark's
/// key layout never needs that.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
}

impl LocalStore {
    /// Opens the store in an existing directory.
    pub fn open(root: impl AsRef<Path>) -> StoreResult<Self> {
        let root = absolute(root.as_ref())?;
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(LocalStore {
                root: Arc::new(root),
            }),
            Ok(_) => Err(StoreError::config(format!(
                "local store root '{}' exists but is not a directory; point the store URL at \
                 a directory",
                root.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::config(format!(
                "local store root '{}' does not exist; create the directory first (or ask for \
                 it to be created), or fix the store URL",
                root.display()
            ))),
            Err(e) => Err(StoreError::config(format!(
                "cannot open local store root '{}': {e}; check that it exists and is accessible",
                root.display()
            ))),
        }
    }

    /// Opens the store in `root`, creating the directory and its parents if needed.
    pub fn create(root: impl AsRef<Path>) -> StoreResult<Self> {
        let root = absolute(root.as_ref())?;
        fs::create_dir_all(&root).map_err(|e| {
            StoreError::config(format!(
                "cannot create local store root '{}': {e}; check the path and permissions",
                root.display()
            ))
        })?;
        Self::open(root)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn location(&self, key: &str) -> String {
        self.path_of(key).display().to_string()
    }

    /// Maps an I/O error on the store side (the object, its directory, the lock file).
    fn io_error(&self, op: StoreOp, key: &str, e: io::Error) -> StoreError {
        let location = self.location(key);
        let key = key.to_owned();
        match e.kind() {
            _ if is_read(op) && is_missing(&e) => StoreError::NotFound { op, key, location },
            io::ErrorKind::PermissionDenied => StoreError::AccessDenied {
                op,
                key,
                location,
                detail: e.to_string(),
            },
            io::ErrorKind::NotADirectory => StoreError::Other {
                op,
                key,
                location,
                source: format!(
                    "a leading part of the key is an object, so it cannot also be a directory \
                     here ({e})"
                )
                .into(),
            },
            _ => StoreError::Other {
                op,
                key,
                location,
                source: Box::new(e),
            },
        }
    }

    /// The refusal of a symbolic link found at `link` on the way to `key`.
    fn link_error(&self, op: StoreOp, key: &str, link: &Path) -> StoreError {
        StoreError::Other {
            op,
            key: key.to_owned(),
            location: self.location(key),
            source: format!(
                "'{}' is a symbolic link; the local store never follows links inside the \
                 repository (one could lead it to read or delete files outside it): remove \
                 the link, and put the data itself in the repository if it belongs there",
                link.display()
            )
            .into(),
        }
    }

    /// Checks the directories between the root and `key`'s object: none may be a symbolic
    /// link (the root itself may be). Stops at the first one that does not exist.
    fn check_parents(&self, op: StoreOp, key: &str) -> StoreResult<()> {
        let Some((parents, _)) = key.rsplit_once('/') else {
            return Ok(());
        };
        let mut dir = (*self.root).clone();
        for segment in parents.split('/') {
            dir.push(segment);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.link_error(op, key, &dir));
                }
                Ok(_) => {}
                Err(e) if is_missing(&e) => return Ok(()),
                Err(e) => return Err(self.io_error(op, key, e)),
            }
        }
        Ok(())
    }

    /// The metadata of whatever is at `key` (never following a link), `None` if nothing is.
    /// A symbolic link, there or on the way, is an error.
    fn entry_meta(&self, op: StoreOp, key: &str) -> StoreResult<Option<Metadata>> {
        self.check_parents(op, key)?;
        let path = self.path_of(key);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => Err(self.link_error(op, key, &path)),
            Ok(m) => Ok(Some(m)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(self.io_error(op, key, e)),
        }
    }

    fn not_found(&self, op: StoreOp, key: &str) -> StoreError {
        StoreError::NotFound {
            op,
            key: key.to_owned(),
            location: self.location(key),
        }
    }

    /// Runs blocking file-system work off the async runtime.
    async fn run<T, F>(&self, op: StoreOp, key: &str, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(LocalStore) -> StoreResult<T> + Send + 'static,
    {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || work(this)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::Other {
                op,
                key: key.to_owned(),
                location: self.location(key),
                source: format!("the file-system task was cancelled: {e}").into(),
            }),
        }
    }

    /// Creates the directories leading to `key` (fsyncing each new one into its parent) and
    /// returns the object's directory. An existing one that is a symbolic link is refused.
    fn ensure_parent(&self, op: StoreOp, key: &str) -> StoreResult<PathBuf> {
        let on_io = |e| self.io_error(op, key, e);
        let mut dir = (*self.root).clone();
        let Some((parents, _)) = key.rsplit_once('/') else {
            return Ok(dir);
        };
        for segment in parents.split('/') {
            dir.push(segment);
            match fs::create_dir(&dir) {
                Ok(()) => sync_dir(dir.parent().unwrap_or(&self.root)).map_err(on_io)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let m = fs::symlink_metadata(&dir).map_err(on_io)?;
                    if m.file_type().is_symlink() {
                        return Err(self.link_error(op, key, &dir));
                    }
                }
                Err(e) => return Err(on_io(e)),
            }
        }
        Ok(dir)
    }

    /// Writes a finished, fsynced temporary file in `dir`; `fill` writes the contents.
    fn write_temp(
        dir: &Path,
        fill: impl FnOnce(&mut File) -> Result<(), StoreError>,
        on_io: impl Fn(io::Error) -> StoreError,
    ) -> StoreResult<(PathBuf, Metadata)> {
        let tmp = dir.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(&on_io)?;
        let finish = |file: &mut File| -> StoreResult<Metadata> {
            fill(file)?;
            // A fresh nanosecond timestamp gives each write its own ETag (see the type docs).
            file.set_modified(SystemTime::now()).map_err(&on_io)?;
            file.sync_all().map_err(&on_io)?;
            file.metadata().map_err(&on_io)
        };
        match finish(&mut file) {
            Ok(meta) => Ok((tmp, meta)),
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn lock(&self) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.root.join(LOCK_FILE))?;
        file.lock()?;
        Ok(file)
    }

    /// Shared body of `put`, `put_if_absent`, `put_if_match` and `put_file`.
    fn write_object(
        &self,
        op: StoreOp,
        key: &str,
        fill: impl FnOnce(&mut File) -> Result<(), StoreError>,
        expected: Option<&ETag>,
    ) -> StoreResult<ETag> {
        let on_io = |e| self.io_error(op, key, e);
        let dir = self.ensure_parent(op, key)?;
        // Never replace a link (nor write through one): refuse it, naming it.
        self.entry_meta(op, key)?;
        let (tmp, meta) = Self::write_temp(&dir, fill, on_io)?;
        let etag = etag_of(&meta);
        let dest = self.path_of(key);
        let placed = match op {
            StoreOp::PutIfAbsent => match fs::hard_link(&tmp, &dest) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(StoreError::PreconditionFailed {
                        op,
                        key: key.to_owned(),
                        location: self.location(key),
                    })
                }
                Err(e) => Err(on_io(e)),
            },
            StoreOp::PutIfMatch => self.lock().map_err(on_io).and_then(|_guard| {
                let current = match self.entry_meta(op, key)? {
                    Some(m) if m.is_file() => etag_of(&m),
                    _ => return Err(self.not_found(op, key)),
                };
                if Some(&current) != expected {
                    return Err(StoreError::PreconditionFailed {
                        op,
                        key: key.to_owned(),
                        location: self.location(key),
                    });
                }
                fs::rename(&tmp, &dest).map_err(on_io)
                // `_guard` is dropped here, after the rename: the lock is released.
            }),
            _ => fs::rename(&tmp, &dest).map_err(on_io),
        };
        let synced = placed.and_then(|()| sync_dir(&dir).map_err(on_io));
        // After a rename the temporary name is gone already; after a link or a failure it
        // must be removed.
        if op == StoreOp::PutIfAbsent || synced.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        synced.map(|()| etag)
    }

    fn open_object(&self, op: StoreOp, key: &str) -> StoreResult<(File, Metadata)> {
        self.check_parents(op, key)?;
        let path = self.path_of(key);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    self.link_error(op, key, &path)
                } else {
                    self.io_error(op, key, e)
                }
            })?;
        let meta = file.metadata().map_err(|e| self.io_error(op, key, e))?;
        if !meta.is_file() {
            return Err(self.not_found(op, key));
        }
        Ok((file, meta))
    }

    /// `get_to_file`, stopping with [`StoreError::TooLarge`] after `max_len + 1` bytes; with
    /// a `hasher`, every byte written to the file goes through it too.
    async fn download(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        mut hasher: Option<Hasher>,
        uncached: bool,
    ) -> StoreResult<(u64, Option<Hasher>)> {
        validate_key(key)?;
        let k = key.to_owned();
        let dest = path.to_owned();
        self.run(StoreOp::GetToFile, key, move |s| {
            let op = StoreOp::GetToFile;
            let (src, meta) = s.open_object(op, &k)?;
            let local = |e: io::Error| StoreError::LocalFile {
                op,
                key: k.clone(),
                path: dest.display().to_string(),
                source: e,
            };
            // Around the page cache when asked, for a large object only (see
            // `get_to_file_hashed` with `PageCache::Around`).
            let uncached = uncached && meta.len() >= direct::MIN_LEN;
            // One byte more than allowed tells "too long" from "exactly the limit".
            let mut src = src.take(max_len.saturating_add(1));
            let seen = |bytes: &[u8]| {
                if let Some(h) = hasher.as_mut() {
                    h.update(bytes);
                }
            };
            let n = write_local_file(&dest, local, |out| {
                let on_read = |e| s.io_error(op, &k, e);
                let n = if uncached {
                    direct::copy_uncached(&mut src, out, on_read, local, seen)?
                } else {
                    copy(&mut src, out, on_read, local, seen)?
                };
                if n > max_len {
                    return Err(StoreError::TooLarge {
                        op,
                        key: k.clone(),
                        location: s.location(&k),
                        limit: max_len,
                    });
                }
                Ok(n)
            })?;
            Ok((n, hasher))
        })
        .await
    }

    fn list_blocking(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        let op = StoreOp::List;
        // Start at the deepest directory the prefix names completely.
        let start = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let mut out = Vec::new();
        if !start.is_empty() && !self.real_directory(start)? {
            return Ok(out);
        }
        let mut pending = vec![start.to_owned()];
        while let Some(rel_dir) = pending.pop() {
            let entries = match fs::read_dir(self.root.join(&rel_dir)) {
                Ok(entries) => entries,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(self.io_error(op, prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io_error(op, prefix, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    tracing::warn!(
                        dir = %self.root.join(&rel_dir).display(),
                        name = ?name,
                        "skipping a file whose name is not UTF-8; it cannot be an object"
                    );
                    continue;
                };
                if name.starts_with(RESERVED_SEGMENT_PREFIX) {
                    continue;
                }
                let rel = if rel_dir.is_empty() {
                    name.to_owned()
                } else {
                    format!("{rel_dir}/{name}")
                };
                // Never follows a link (`DirEntry::metadata` does not).
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if is_missing(&e) => continue, // deleted meanwhile
                    Err(e) => return Err(self.io_error(op, &rel, e)),
                };
                if meta.file_type().is_symlink() {
                    warn_link(&entry.path());
                } else if meta.is_dir() {
                    let as_dir = format!("{rel}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        pending.push(rel);
                    }
                } else if meta.is_file() && rel.starts_with(prefix) {
                    out.push(ObjectMeta {
                        key: rel,
                        size: meta.len(),
                        etag: etag_of(&meta),
                        last_modified: modified_of(&meta),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// For `list`: true when the directory `rel` exists and neither it nor a directory on
    /// the way to it is a symbolic link (a link is reported and skipped).
    fn real_directory(&self, rel: &str) -> StoreResult<bool> {
        let mut dir = (*self.root).clone();
        for segment in rel.split('/') {
            dir.push(segment);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    warn_link(&dir);
                    return Ok(false);
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(false),
                Err(e) if is_missing(&e) => return Ok(false),
                Err(e) => return Err(self.io_error(StoreOp::List, rel, e)),
            }
        }
        Ok(true)
    }
}

/// Reports a symbolic link that `list` skips.
fn warn_link(path: &Path) {
    tracing::warn!(
        link = %path.display(),
        "skipping a symbolic link inside the repository: the local store never follows \
         links (one could lead it to read or delete files outside the repository); remove it"
    );
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        super::url::file_url(&self.root)
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::Put, key, move |s| {
            let on_io = |e| s.io_error(StoreOp::Put, &k, e);
            s.write_object(StoreOp::Put, &k, |f| write_data(f, &data, on_io), None)
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::PutIfAbsent, key, move |s| {
            let op = StoreOp::PutIfAbsent;
            // Cheap early answer; the hard link below is what decides.
            if s.entry_meta(op, &k)?.is_some() {
                return Err(StoreError::PreconditionFailed {
                    op,
                    key: k.clone(),
                    location: s.location(&k),
                });
            }
            let on_io = |e| s.io_error(op, &k, e);
            s.write_object(op, &k, |f| write_data(f, &data, on_io), None)
        })
        .await
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        validate_key(key)?;
        let k = key.to_owned();
        let expected = etag.clone();
        self.run(StoreOp::PutIfMatch, key, move |s| {
            let op = StoreOp::PutIfMatch;
            let on_io = |e| s.io_error(op, &k, e);
            s.write_object(
                op,
                &k,
                |f| f.write_all(&data).map_err(on_io),
                Some(&expected),
            )
        })
        .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        validate_key(key)?;
        let k = key.to_owned();
        let src_path = path.to_owned();
        self.run(StoreOp::PutFile, key, move |s| {
            let op = StoreOp::PutFile;
            let local = |e: io::Error| StoreError::LocalFile {
                op,
                key: k.clone(),
                path: src_path.display().to_string(),
                source: e,
            };
            let mut src = File::open(&src_path).map_err(local)?;
            let expected_len = src.metadata().map_err(local)?.len();
            let on_io = |e| s.io_error(op, &k, e);
            let copied = std::cell::Cell::new(0u64);
            let etag = s.write_object(
                op,
                &k,
                |dst| {
                    let n = if expected_len >= direct::MIN_LEN {
                        direct::copy_uncached(&mut src, dst, local, on_io, |_| {})?
                    } else {
                        copy(&mut src, dst, local, on_io, |_| {})?
                    };
                    copied.set(n);
                    Ok(())
                },
                None,
            )?;
            if copied.get() != expected_len {
                tracing::warn!(
                    key = %k,
                    file = %src_path.display(),
                    expected_len,
                    copied = copied.get(),
                    "the local file changed size while it was uploaded"
                );
            }
            Ok(etag)
        })
        .await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::Get, key, move |s| {
            let op = StoreOp::Get;
            let (file, meta) = s.open_object(op, &k)?;
            let too_large = || StoreError::TooLarge {
                op,
                key: k.clone(),
                location: s.location(&k),
                limit: max_len,
            };
            if meta.len() > max_len {
                return Err(too_large());
            }
            // The file's length is a hint only (it may grow, or be a sparse giant): one byte
            // more than allowed is read to tell "too long" from "exactly the limit".
            let hint = usize::try_from(meta.len()).unwrap_or(0).min(PREALLOC_MAX);
            let mut data = Vec::with_capacity(hint);
            file.take(max_len.saturating_add(1))
                .read_to_end(&mut data)
                .map_err(|e| s.io_error(op, &k, e))?;
            if data.len() as u64 > max_len {
                return Err(too_large());
            }
            let meta = ObjectMeta {
                key: k,
                size: data.len() as u64,
                etag: etag_of(&meta),
                last_modified: modified_of(&meta),
            };
            Ok((Bytes::from(data), meta))
        })
        .await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        Ok(self.download(key, path, u64::MAX, None, false).await?.0)
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        Ok(self.download(key, path, max_len, None, false).await?.0)
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        cache: PageCache,
    ) -> StoreResult<FileDigest> {
        let around = cache == PageCache::Around;
        let (_, hasher) = self
            .download(key, path, max_len, Some(Hasher::new()), around)
            .await?;
        Ok(hasher.unwrap_or_default().into())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::GetRange, key, move |s| {
            let op = StoreOp::GetRange;
            let (file, meta) = s.open_object(op, &k)?;
            if range.start > range.end || range.end > meta.len() {
                return Err(StoreError::InvalidRange {
                    op,
                    location: s.location(&k),
                    key: k,
                    start: range.start,
                    end: range.end,
                    size: Some(meta.len()),
                });
            }
            let len = usize::try_from(range.end - range.start).map_err(|_| StoreError::Other {
                op,
                key: k.clone(),
                location: s.location(&k),
                source: "the range is too large to hold in memory".into(),
            })?;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| s.io_error(op, &k, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::Head, key, move |s| {
            match s.entry_meta(StoreOp::Head, &k)? {
                Some(m) if m.is_file() => Ok(Some(ObjectMeta {
                    key: k,
                    size: m.len(),
                    etag: etag_of(&m),
                    last_modified: modified_of(&m),
                })),
                _ => Ok(None),
            }
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        let k = key.to_owned();
        self.run(StoreOp::Delete, key, move |s| {
            let op = StoreOp::Delete;
            let on_io = |e| s.io_error(op, &k, e);
            let path = s.path_of(&k);
            let _guard = s.lock().map_err(on_io)?;
            match s.entry_meta(op, &k)? {
                Some(m) if m.is_file() => {}
                _ => return Ok(()), // missing, or a directory: not an object
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => return Ok(()),
                Err(e) => return Err(on_io(e)),
            }
            sync_dir(path.parent().unwrap_or(&s.root)).map_err(on_io)?;
            // A base's directory is never written again once its files go: remove it when
            // empty, so that pruned bases leave nothing behind; so is a store probe's run directory.
            // (Directories shared by objects written later, like `wal/` and `probe/`, stay.)
            let stop = if k.starts_with(crate::keys::BASES_PREFIX) {
                Some(s.root.join(crate::keys::BASES_PREFIX))
            } else if k.starts_with(crate::keys::PROBE_PREFIX) {
                Some(s.root.join(crate::keys::PROBE_PREFIX))
            } else {
                None
            };
            if let Some(stop) = stop {
                let mut dir = path.parent();
                while let Some(d) = dir.filter(|d| d.starts_with(&stop) && *d != stop) {
                    if fs::remove_dir(d).is_err() {
                        break; // not empty (or already gone)
                    }
                    dir = d.parent();
                }
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let p = prefix.to_owned();
        self.run(StoreOp::List, prefix, move |s| s.list_blocking(&p))
            .await
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        Err(StoreError::config(format!(
            "{} is a directory, and a directory cannot lock its files: anyone who can write \
             to it can delete them. Object Lock needs an S3 bucket created with Object Lock \
             enabled; archive to s3://BUCKET/PREFIX, or leave out --object-lock-mode and \
             --object-lock-days",
            self.describe()
        )))
    }
}

fn absolute(root: &Path) -> StoreResult<PathBuf> {
    std::path::absolute(root).map_err(|e| {
        StoreError::config(format!(
            "cannot resolve local store root '{}': {e}",
            root.display()
        ))
    })
}

/// Operations for which a missing file means a missing object (for writes it means the
/// store directory itself vanished, which is a different problem).
fn is_read(op: StoreOp) -> bool {
    matches!(
        op,
        StoreOp::Get | StoreOp::GetToFile | StoreOp::GetRange | StoreOp::Head
    )
}

/// "No such file", including "a parent is a file" (`a/b` when `a` is an object).
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn etag_of(meta: &Metadata) -> ETag {
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    ETag::new(format!("{:x}-{:x}-{:x}", meta.len(), mtime_ns, meta.ino()))
}

/// A file's modification time: when the store wrote the object.
fn modified_of(meta: &Metadata) -> Option<time::OffsetDateTime> {
    meta.modified().ok().map(time::OffsetDateTime::from)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes an object's bytes to its new file: a large one around the page cache
/// ([`direct`]), for nobody reads it back soon.
fn write_data(
    dst: &mut File,
    data: &[u8],
    on_io: impl Fn(io::Error) -> StoreError,
) -> StoreResult<()> {
    if data.len() as u64 >= direct::MIN_LEN {
        direct::copy_uncached(&mut &data[..], dst, &on_io, &on_io, |_| {})?;
    } else {
        dst.write_all(data).map_err(on_io)?;
    }
    Ok(())
}

/// Copies `src` to `dst`, attributing read and write errors to their own side; `seen` is
/// shown every piece written.
fn copy(
    src: &mut impl Read,
    dst: &mut File,
    on_read: impl Fn(io::Error) -> StoreError,
    on_write: impl Fn(io::Error) -> StoreError,
    mut seen: impl FnMut(&[u8]),
) -> StoreResult<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(on_read(e)),
        };
        dst.write_all(&buf[..n]).map_err(&on_write)?;
        seen(&buf[..n]);
        total += n as u64;
    }
}

/// Writes a downloaded file the safe way: into a temporary file next to `dest`, fsynced,
/// renamed to `dest`, directory fsynced. `fill` writes the contents and returns their length.
pub(crate) fn write_local_file(
    dest: &Path,
    local: impl Fn(io::Error) -> StoreError,
    fill: impl FnOnce(&mut File) -> StoreResult<u64>,
) -> StoreResult<u64> {
    let (dir, tmp) = local_temp_path(dest).map_err(&local)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(&local)?;
    let result = fill(&mut out).and_then(|n| {
        out.sync_all().map_err(&local)?;
        fs::rename(&tmp, dest).map_err(&local)?;
        sync_dir(&dir).map_err(&local)?;
        Ok(n)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A temporary file removed when this is dropped: on an error, and when the future writing
/// it is dropped half-way (a download stopped by its caller leaves nothing behind). Once the
/// file was renamed into place, the removal finds nothing.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The directory of `dest` and a fresh temporary name in it.
pub(crate) fn local_temp_path(dest: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let name = dest.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the destination must name a file",
        )
    })?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tidemark-part-{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    Ok((dir, tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn open_requires_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = LocalStore::open(&missing).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("nope"),
            "{err}"
        );
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = LocalStore::open(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        let created = LocalStore::create(missing.join("deeper")).unwrap();
        assert!(created.root().is_dir());
    }

    #[tokio::test]
    async fn internal_files_are_invisible() {
        let (dir, store) = store();
        store.put("a/b", Bytes::from_static(b"1")).await.unwrap();
        let etag = store.head("a/b").await.unwrap().unwrap().etag;
        store
            .put_if_match("a/b", Bytes::from_static(b"2"), &etag)
            .await
            .unwrap();
        // A stray temporary file, as a crash would leave it.
        fs::write(dir.path().join("a/.tidemark-tmp-0123"), b"junk").unwrap();
        assert!(dir.path().join(LOCK_FILE).exists());
        let keys: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/b"]);
        assert!(store.get("a/.tidemark-tmp-0123").await.is_err());
    }

    #[tokio::test]
    async fn every_write_changes_the_etag() {
        let (_dir, store) = store();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let etag = store.put("k", Bytes::from_static(b"same")).await.unwrap();
            assert_eq!(store.head("k").await.unwrap().unwrap().etag, etag);
            assert!(seen.insert(etag), "an ETag was reused");
        }
    }

    /// A repository with `bases/x/files -> OUTSIDE` (a directory holding `CURRENT`) and
    /// `wal/1.seg -> OUTSIDE/CURRENT`; returns the guard, the store and OUTSIDE.
    async fn planted() -> (tempfile::TempDir, LocalStore, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("live-db");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("CURRENT"), b"live").unwrap();
        let store = LocalStore::create(dir.path().join("repo")).unwrap();
        store
            .put("bases/y/files/CURRENT", Bytes::from_static(b"ok"))
            .await
            .unwrap();
        fs::create_dir_all(dir.path().join("repo/bases/x")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("repo/bases/x/files")).unwrap();
        fs::create_dir(dir.path().join("repo/wal")).unwrap();
        std::os::unix::fs::symlink(outside.join("CURRENT"), dir.path().join("repo/wal/1.seg"))
            .unwrap();
        (dir, store, outside)
    }

    fn names_link(e: StoreError, link: &str) -> String {
        let msg = e.to_string();
        assert!(msg.contains("symbolic link") && msg.contains(link), "{msg}");
        msg
    }

    #[tokio::test]
    async fn list_skips_links_inside_the_repository() {
        let (_dir, store, outside) = planted().await;
        let keys: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["bases/y/files/CURRENT"]);
        // A prefix that names the link's directory, or goes through it, lists nothing.
        for prefix in ["bases/x/files/", "bases/x/files/CUR", "bases/x/", "wal/"] {
            assert!(store.list(prefix).await.unwrap().is_empty(), "{prefix}");
        }
        assert_eq!(fs::read(outside.join("CURRENT")).unwrap(), b"live");
    }

    #[tokio::test]
    async fn delete_never_goes_through_a_link() {
        let (_dir, store, outside) = planted().await;
        let e = store.delete("bases/x/files/CURRENT").await.unwrap_err();
        names_link(e, "bases/x/files'");
        let e = store.delete("wal/1.seg").await.unwrap_err();
        names_link(e, "wal/1.seg'");
        assert_eq!(fs::read(outside.join("CURRENT")).unwrap(), b"live");
        assert!(fs::symlink_metadata(store.root().join("wal/1.seg")).is_ok());
        store.delete("bases/y/files/CURRENT").await.unwrap();
    }

    #[tokio::test]
    async fn reads_refuse_links() {
        let (dir, store, _outside) = planted().await;
        let dest = dir.path().join("restored");
        for key in ["bases/x/files/CURRENT", "wal/1.seg"] {
            let link = if key.starts_with("wal") {
                "wal/1.seg'"
            } else {
                "bases/x/files'"
            };
            names_link(store.get(key).await.unwrap_err(), link);
            names_link(store.head(key).await.unwrap_err(), link);
            names_link(store.get_range(key, 0..1).await.unwrap_err(), link);
            names_link(store.get_to_file(key, &dest).await.unwrap_err(), link);
            let hashed = store.get_to_file_max_hashed(key, &dest, 1 << 20).await;
            names_link(hashed.unwrap_err(), link);
        }
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn writes_refuse_links() {
        let (_dir, store, outside) = planted().await;
        let data = Bytes::from_static(b"new");
        for key in [
            "bases/x/files/CURRENT",
            "bases/x/files/MANIFEST-1",
            "wal/1.seg",
        ] {
            let link = if key.starts_with("wal") {
                "wal/1.seg'"
            } else {
                "bases/x/files'"
            };
            names_link(store.put(key, data.clone()).await.unwrap_err(), link);
            names_link(
                store.put_if_absent(key, data.clone()).await.unwrap_err(),
                link,
            );
            let etag = ETag::new("x");
            names_link(
                store
                    .put_if_match(key, data.clone(), &etag)
                    .await
                    .unwrap_err(),
                link,
            );
        }
        assert_eq!(fs::read(outside.join("CURRENT")).unwrap(), b"live");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing written outside"
        );
        assert!(
            fs::symlink_metadata(store.root().join("wal/1.seg"))
                .unwrap()
                .is_symlink()
        );
    }

    #[tokio::test]
    async fn a_bounded_download_stops_after_one_byte_too_many() {
        let (dir, store) = store();
        store
            .put("k", Bytes::from(vec![5u8; 10_000]))
            .await
            .unwrap();
        let dest = dir.path().join("out");
        assert_eq!(
            store.get_to_file_max("k", &dest, 10_000).await.unwrap(),
            10_000
        );
        assert_eq!(
            store.get_to_file_max("k", &dest, 20_000).await.unwrap(),
            10_000
        );
        fs::remove_file(&dest).unwrap();
        let e = store.get_to_file_max("k", &dest, 9_999).await.unwrap_err();
        assert!(
            matches!(e, StoreError::TooLarge { limit: 9_999, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("longer than the 9999 bytes"), "{e}");
        assert!(!dest.exists());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !left
                .iter()
                .any(|n| n.to_string_lossy().contains("tidemark-part")),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn the_root_itself_may_be_a_link() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("repo")).unwrap();
        let store = LocalStore::open(dir.path().join("repo")).unwrap();
        store.put("a/b", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(store.get("a/b").await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(store.list("a/").await.unwrap().len(), 1);
        store.delete("a/b").await.unwrap();
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn key_below_an_object_is_a_clear_error() {
        let (_dir, store) = store();
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        let err = store
            .put("a/b", Bytes::from_static(b"2"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("put 'a/b'"), "{err}");
        assert!(err.contains("cannot also be a directory"), "{err}");
        assert!(store.head("a/b").await.unwrap().is_none());
        assert!(store.get("a/b").await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn hashed_downloads_give_the_sha256_of_the_file() {
        let (_dir, store) = store();
        crate::store::testkit::check_hashed_downloads(&store).await;
        crate::store::testkit::check_bounded_reads(&store).await;
    }
}
