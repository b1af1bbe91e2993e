//! The target directory and the staging directory beside it.
//!
//! A restore never writes into the target directly. It builds the database in a staging
//! directory next to it (`.<name>.tidemark-restore-<random>`, same file system, so the final
//! step is one `rename`), with a scratch directory for downloaded segments beside that. Only
//! a verified result is renamed into place. On any failure, dropping [`Staging`] removes both
//! and the target is exactly as it was.
//!
//! An existing target is never deleted. A missing target or an empty directory is replaced;
//! anything else needs `--force`, and then it is renamed to `<target>.old-<time>` first. A
//! target whose RocksDB `LOCK` is held by a running process is refused even with `--force`,
//! and so is a mount point (a rename cannot replace it).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::RestoreError;

/// What is at the target path now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// Nothing: the restore creates it.
    Missing,
    /// An empty directory: the restore replaces it.
    Empty,
    /// A directory with entries.
    NotEmpty { entries: usize },
    /// A file, a symbolic link or anything else that is not a plain directory.
    NotADirectory,
}

impl TargetState {
    /// True when the restore may put its result here without `--force`.
    pub fn is_free(&self) -> bool {
        matches!(self, TargetState::Missing | TargetState::Empty)
    }

    /// For messages: what is there.
    pub fn describe(&self) -> String {
        match self {
            TargetState::Missing => "does not exist yet (it will be created)".into(),
            TargetState::Empty => "is an empty directory (it will be replaced)".into(),
            TargetState::NotEmpty { entries } => format!("is not empty ({entries} entries)"),
            TargetState::NotADirectory => "is not a plain directory".into(),
        }
    }
}

/// Looks at the target path without following a symbolic link at the path itself.
pub fn inspect(target: &Path) -> Result<TargetState, RestoreError> {
    let meta = match fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TargetState::Missing),
        Err(e) => return Err(RestoreError::io("cannot inspect the target", target, e)),
    };
    if !meta.is_dir() {
        return Ok(TargetState::NotADirectory);
    }
    let entries = fs::read_dir(target)
        .map_err(|e| RestoreError::io("cannot list the target", target, e))?
        .count();
    Ok(if entries == 0 {
        TargetState::Empty
    } else {
        TargetState::NotEmpty { entries }
    })
}

/// Makes a target path absolute (without resolving symbolic links) and checks that it names
/// a directory inside an existing parent directory.
pub fn resolve_target(target: &Path) -> Result<PathBuf, RestoreError> {
    if target.as_os_str().is_empty() {
        return Err(RestoreError::Usage(
            "--target is empty; give a directory".into(),
        ));
    }
    let abs = std::path::absolute(target)
        .map_err(|e| RestoreError::io("cannot make the target path absolute", target, e))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(RestoreError::Usage(format!(
            "the target {} has no parent directory; restore into a directory such as /srv/restore/db",
            abs.display()
        )));
    };
    if name == ".." || name == "." {
        return Err(RestoreError::Usage(format!(
            "the target {} must end with a directory name, not {:?}",
            abs.display(),
            name
        )));
    }
    if !parent.is_dir() {
        return Err(RestoreError::Usage(format!(
            "the parent directory {} of the target does not exist; create it first",
            parent.display()
        )));
    }
    Ok(abs)
}

/// Refuses a target that would put the repository itself at risk: the repository's own
/// directory (a `file://` store), anything inside it, or anything that contains it.
pub fn check_not_overlapping(target: &Path, repo_root: &Path) -> Result<(), RestoreError> {
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // The target may not exist yet: compare through its parent.
    let target = match (target.parent(), target.file_name()) {
        (Some(parent), Some(name)) => canon(parent).join(name),
        _ => target.to_path_buf(),
    };
    let root = canon(repo_root);
    if target.starts_with(&root) || root.starts_with(&target) {
        return Err(RestoreError::Usage(format!(
            "the target {} overlaps the repository directory {}; restore somewhere else",
            target.display(),
            root.display()
        )));
    }
    Ok(())
}

/// Refuses a target that is a mount point: the finished database is renamed into place,
/// which cannot replace (or move aside) a mount point. Say so before any work is done.
pub fn check_not_mount_point(target: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Some(parent)) = (fs::symlink_metadata(target), target.parent()) else {
        return Ok(());
    };
    let parent_meta = fs::metadata(parent)
        .map_err(|e| RestoreError::io("cannot inspect the target's parent", parent, e))?;
    if meta.is_dir() && meta.dev() != parent_meta.dev() {
        return Err(RestoreError::Usage(format!(
            "the target {} is a mount point, which a restore cannot replace; restore into a \
             directory inside it, such as {}",
            target.display(),
            target.join("db").display()
        )));
    }
    Ok(())
}

/// Refuses a target whose RocksDB `LOCK` file is locked by a process (a live database):
/// moving a live database's directory aside would not stop it, and the application would
/// keep writing into the old copy. Reads `/proc/locks`; elsewhere the check is skipped.
pub fn check_not_locked(target: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let lock = target.join("LOCK");
    let Ok(meta) = fs::symlink_metadata(&lock) else {
        return Ok(());
    };
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return Ok(());
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let held = locks.lines().find(|line| {
        line.split_whitespace().any(|field| {
            let mut parts = field.split(':');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(ma), Some(mi), Some(ino), None) => {
                    u64::from_str_radix(ma, 16).ok() == Some(major)
                        && u64::from_str_radix(mi, 16).ok() == Some(minor)
                        && ino.parse::<u64>().ok() == Some(meta.ino())
                }
                _ => false,
            }
        })
    });
    if let Some(line) = held {
        let pid = line.split_whitespace().nth(4).unwrap_or("?");
        return Err(RestoreError::Usage(format!(
            "{} is locked by process {pid}: a database is open there; stop the application \
             before restoring over it",
            lock.display()
        )));
    }
    Ok(())
}

/// The staging and scratch directories of one restore.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    dir: PathBuf,
    scratch: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates `.<name>.tidemark-restore-<random>` and its scratch directory beside `target`
    /// (an absolute path from [`resolve_target`]).
    pub fn create(target: &Path) -> Result<Staging, RestoreError> {
        let parent = target.parent().expect("resolved targets have a parent");
        let name = target
            .file_name()
            .expect("resolved targets have a name")
            .to_string_lossy()
            .into_owned();
        for _ in 0..16 {
            let tag = format!("{:08x}", rand::random::<u32>());
            let dir = parent.join(format!(".{name}.tidemark-restore-{tag}"));
            let scratch = parent.join(format!(".{name}.tidemark-restore-{tag}.scratch"));
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(RestoreError::io(
                        "cannot create the staging directory",
                        &dir,
                        e,
                    ));
                }
            }
            let staging = Staging {
                target: target.to_path_buf(),
                dir,
                scratch,
                committed: false,
            };
            fs::create_dir(&staging.scratch).map_err(|e| {
                RestoreError::io("cannot create the scratch directory", &staging.scratch, e)
            })?;
            return Ok(staging);
        }
        Err(RestoreError::Usage(format!(
            "cannot find a free staging directory name in {}",
            parent.display()
        )))
    }

    /// Where the database is built.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where downloads and temporary logs go (never part of the result).
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Moves the built database into place. Returns where an existing target was moved to.
    pub fn commit(mut self, force: bool) -> Result<Option<PathBuf>, RestoreError> {
        sync_dir(&self.dir)?;
        let _ = fs::remove_dir_all(&self.scratch);
        let target = self.target.clone();
        let state = inspect(&target)?;
        let moved = match state {
            TargetState::Missing | TargetState::Empty => None,
            TargetState::NotEmpty { entries } if !force => {
                return Err(RestoreError::TargetNotEmpty {
                    path: target,
                    entries,
                });
            }
            TargetState::NotADirectory if !force => {
                return Err(RestoreError::TargetNotEmpty {
                    path: target,
                    entries: 1,
                });
            }
            TargetState::NotEmpty { .. } | TargetState::NotADirectory => {
                check_not_locked(&target)?;
                let aside = aside_path(&target, OffsetDateTime::now_utc());
                fs::rename(&target, &aside).map_err(|e| {
                    RestoreError::io(
                        format!(
                            "cannot move the existing target aside to {}",
                            aside.display()
                        ),
                        &target,
                        e,
                    )
                })?;
                tracing::warn!(
                    "moved the previous contents of {} to {}",
                    target.display(),
                    aside.display()
                );
                Some(aside)
            }
        };
        // rename(2) replaces an empty directory atomically and fails on a non-empty one, so
        // a target filled in the meantime is never overwritten.
        fs::rename(&self.dir, &target).map_err(|e| {
            RestoreError::io(
                format!(
                    "cannot rename the restored database {} to the target",
                    self.dir.display()
                ),
                &target,
                e,
            )
        })?;
        self.committed = true;
        sync_dir(target.parent().expect("resolved targets have a parent"))?;
        Ok(moved)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.scratch);
        if !self.committed
            && let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(
                "could not remove the staging directory {}: {e}; remove it by hand",
                self.dir.display()
            );
        }
    }
}

/// `<target>.old-<YYYYMMDDTHHMMSSZ>`, with `-2`, `-3`… if that exists.
pub fn aside_path(target: &Path, now: OffsetDateTime) -> PathBuf {
    let t = now.to_offset(time::UtcOffset::UTC);
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let base = format!("{}.old-{stamp}", target.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 2;
    while fs::symlink_metadata(&candidate).is_ok() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// fsyncs a directory, so that renames and new entries in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RestoreError::io("cannot sync the directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_commit_into_missing_and_empty_targets() {
        let root = tempfile::tempdir().unwrap();
        let target = resolve_target(&root.path().join("db")).unwrap();
        assert_eq!(inspect(&target).unwrap(), TargetState::Missing);
        let s = Staging::create(&target).unwrap();
        fs::write(s.dir().join("CURRENT"), b"MANIFEST-000001\n").unwrap();
        assert_eq!(s.commit(false).unwrap(), None);
        assert!(target.join("CURRENT").is_file());
        assert_eq!(
            inspect(&target).unwrap(),
            TargetState::NotEmpty { entries: 1 }
        );

        let empty = resolve_target(&root.path().join("empty")).unwrap();
        fs::create_dir(&empty).unwrap();
        assert_eq!(inspect(&empty).unwrap(), TargetState::Empty);
        let s = Staging::create(&empty).unwrap();
        fs::write(s.dir().join("x"), b"1").unwrap();
        s.commit(false).unwrap();
        assert!(empty.join("x").is_file());
        // Only the two results remain: no staging or scratch directory left behind.
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_non_empty_target_needs_force_and_is_moved_aside_never_deleted() {
        let root = tempfile::tempdir().unwrap();
        let target = resolve_target(&root.path().join("db")).unwrap();
        fs::create_dir(&target).unwrap();
        fs::write(target.join("precious"), b"old data").unwrap();

        let s = Staging::create(&target).unwrap();
        let staging_dir = s.dir().to_path_buf();
        fs::write(s.dir().join("CURRENT"), b"new").unwrap();
        let e = s.commit(false).unwrap_err();
        assert!(
            matches!(e, RestoreError::TargetNotEmpty { entries: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(
            !staging_dir.exists(),
            "a failed commit removes the staging directory"
        );
        assert_eq!(fs::read(target.join("precious")).unwrap(), b"old data");

        let s = Staging::create(&target).unwrap();
        fs::write(s.dir().join("CURRENT"), b"new").unwrap();
        let aside = s.commit(true).unwrap().expect("moved aside");
        assert_eq!(fs::read(aside.join("precious")).unwrap(), b"old data");
        assert_eq!(fs::read(target.join("CURRENT")).unwrap(), b"new");
        assert!(
            aside
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("db.old-")
        );
    }

    #[test]
    fn dropping_staging_removes_everything() {
        let root = tempfile::tempdir().unwrap();
        let target = resolve_target(&root.path().join("db")).unwrap();
        let s = Staging::create(&target).unwrap();
        fs::write(s.dir().join("000001.log"), b"x").unwrap();
        fs::write(s.scratch().join("seg"), b"x").unwrap();
        drop(s);
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
        assert!(!target.exists());
    }

    #[test]
    fn aside_names_do_not_collide() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("db");
        let now = time::macros::datetime!(2026-11-23 13:30:05 UTC);
        let first = aside_path(&target, now);
        assert!(
            first.ends_with("db.old-20261123T133005Z"),
            "{}",
            first.display()
        );
        fs::create_dir(&first).unwrap();
        assert!(aside_path(&target, now).ends_with("db.old-20261123T133005Z-2"));
    }

    #[test]
    fn targets_are_checked() {
        let root = tempfile::tempdir().unwrap();
        assert!(resolve_target(Path::new("")).is_err());
        let e = resolve_target(&root.path().join("no/such/parent/db")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let repo = root.path().join("repo");
        fs::create_dir(&repo).unwrap();
        assert!(check_not_overlapping(&repo.join("db"), &repo).is_err());
        assert!(check_not_overlapping(&repo, &repo).is_err());
        assert!(check_not_overlapping(root.path(), &repo).is_err());
        check_not_overlapping(&root.path().join("db"), &repo).unwrap();
        let file = root.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert_eq!(inspect(&file).unwrap(), TargetState::NotADirectory);
    }

    #[test]
    fn mount_points_are_refused_before_any_work() {
        let e = check_not_mount_point(Path::new("/proc")).unwrap_err();
        assert!(e.to_string().contains("is a mount point"), "{e}");
        let root = tempfile::tempdir().unwrap();
        check_not_mount_point(root.path()).unwrap();
        check_not_mount_point(&root.path().join("missing")).unwrap();
    }

    #[test]
    fn a_live_database_is_detected_by_its_lock() {
        let root = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, root.path()).unwrap();
        let e = check_not_locked(root.path()).unwrap_err().to_string();
        assert!(e.contains("is locked by process"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(db);
        check_not_locked(root.path()).unwrap();
    }
}
