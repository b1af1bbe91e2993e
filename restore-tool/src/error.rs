//! The restore tool's error type and how errors map to exit codes.

use std::path::PathBuf;

use tidemark_manifest::checksum::ChecksumMismatch;
use tidemark_manifest::keyring::{KeyringError, WrapError};
use tidemark_manifest::keys::ObjectKeyError;
use tidemark_manifest::model::ModelError;
use tidemark_manifest::origin::OriginError;
use tidemark_manifest::plan::PlanError;
use tidemark_manifest::repo::RepoError;
use tidemark_manifest::segment::SegmentError;
use tidemark_manifest::store::StoreError;

use crate::replay::ChainError;
use crate::timespec::TimeSpecError;

/// What kind of failure an error is; each class has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Anything else: I/O, network, RocksDB, an interruption.
    /// [`exit_code::FAILURE`].
    Failure,
    /// The command line or its input is wrong: a malformed time, a non-empty target without
    /// `--force`, a store URL with no repository. [`exit_code::USAGE`].
    Usage,
    /// The requested point cannot be restored from this repository: before or after the
    /// restorable window, or in a gap. [`exit_code::NOT_RESTORABLE`].
    NotRestorable,
    /// Data did not verify: a missing or corrupt object, a broken WAL chain, or a restored
    /// database that does not end at the planned sequence number.
    /// [`exit_code::VERIFICATION_FAILED`].
    VerificationFailed,
}

impl ErrorClass {
    /// The process exit code of this class.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Failure => exit_code::FAILURE,
            ErrorClass::Usage => exit_code::USAGE,
            ErrorClass::NotRestorable => exit_code::NOT_RESTORABLE,
            ErrorClass::VerificationFailed => exit_code::VERIFICATION_FAILED,
        }
    }

    /// The class's name in JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Failure => "failure",
            ErrorClass::Usage => "usage",
            ErrorClass::NotRestorable => "not_restorable",
            ErrorClass::VerificationFailed => "verification_failed",
        }
    }
}

/// The exit codes of `tidemark-restore`: those of [`tidemark_manifest::exit`], shared with
/// the archiver so that no number means two things.
pub use tidemark_manifest::exit as exit_code;

/// Everything that can go wrong in a list, restore or verify.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Repository(Box<RepoError>),
    #[error(transparent)]
    Plan(Box<PlanError>),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error(transparent)]
    Chain(Box<ChainError>),
    #[error(transparent)]
    Time(Box<TimeSpecError>),
    #[error(transparent)]
    Checksum(Box<ChecksumMismatch>),
    #[error(transparent)]
    Segment(Box<SegmentError>),
    #[error("{0}")]
    Usage(String),
    #[error(
        "the target directory {} is not empty ({entries} entries); restore into a new or empty \
         directory, or pass --force to move the existing contents aside to {}.old-<time> \
         (nothing is deleted)",
        path.display(), path.display()
    )]
    TargetNotEmpty { path: PathBuf, entries: usize },
    #[error("{0}")]
    NotRestorable(String),
    #[error("{0}")]
    Integrity(String),
    #[error("verification of the restored database failed: {0}; the target was not changed")]
    Verification(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RocksDB: {what}: {detail}")]
    Rocks { what: String, detail: String },
    #[error("interrupted; nothing was changed in the target directory")]
    Interrupted,
    #[error(
        "the repository was pruned while this restore ran: {key} is gone because {why}; \
         nothing was changed in the target directory; run the restore again (it plans from \
         the current manifest), and make the pruning grace period longer than a restore takes"
    )]
    PrunedDuringRestore { key: String, why: String },
}

impl RestoreError {
    /// An I/O error on `path`, saying what was being done.
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RestoreError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }

    /// The class of the error, hence the exit code.
    pub fn class(&self) -> ErrorClass {
        match self {
            RestoreError::Repository(e) => repo_class(e),
            RestoreError::Plan(_) | RestoreError::NotRestorable(_) => ErrorClass::NotRestorable,
            RestoreError::Store(e) => store_class(e),
            RestoreError::Chain(_)
            | RestoreError::Checksum(_)
            | RestoreError::Segment(_)
            | RestoreError::Integrity(_)
            | RestoreError::Verification(_) => ErrorClass::VerificationFailed,
            RestoreError::Time(_)
            | RestoreError::Usage(_)
            | RestoreError::TargetNotEmpty { .. } => ErrorClass::Usage,
            RestoreError::Io { .. }
            | RestoreError::Rocks { .. }
            | RestoreError::Interrupted
            | RestoreError::PrunedDuringRestore { .. } => ErrorClass::Failure,
        }
    }

    /// True when the error is an object that does not exist (as opposed to one that is
    /// damaged or could not be read).
    pub fn is_missing_object(&self) -> bool {
        match self {
            RestoreError::Store(e) => e.is_not_found(),
            RestoreError::Repository(e) => match e.as_ref() {
                RepoError::MissingObject { .. } => true,
                RepoError::Store(s) => s.is_not_found(),
                _ => false,
            },
            _ => false,
        }
    }
}

impl RestoreError {
    /// The repository object (its key) the error is about, when it names one: a corrupt or
    /// missing segment, table file, base file, index page or manifest generation.
    pub fn object(&self) -> Option<String> {
        let structured = match self {
            RestoreError::Checksum(e) => Some(e.key.clone()),
            RestoreError::PrunedDuringRestore { key, .. } => Some(key.clone()),
            RestoreError::Store(e) => e.key().map(str::to_owned),
            RestoreError::Repository(e) => match e.as_ref() {
                RepoError::MissingObject { key, .. } => Some(key.clone()),
                RepoError::Store(s) => s.key().map(str::to_owned),
                RepoError::Checksum(c) => Some(c.key.clone()),
                _ => None,
            },
            _ => None,
        };
        structured
            .filter(|k| !k.is_empty())
            .or_else(|| object_in(&self.to_string()))
    }
}

/// The first repository key in a message (FORMAT.md §2: `wal/…`, `sst/…`, `bases/…`,
/// `index/…`, `manifest/…`).
fn object_in(message: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = tidemark_manifest::keys::LAYOUT_PREFIXES;
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_');
    let mut rest = message;
    while !rest.is_empty() {
        let start = rest.find(|c: char| is_key_char(c))?;
        let token_len = rest[start..]
            .find(|c: char| !is_key_char(c))
            .unwrap_or(rest.len() - start);
        let token = rest[start..start + token_len].trim_end_matches('.');
        if PREFIXES
            .iter()
            .any(|p| token.starts_with(p) && token.len() > p.len())
        {
            return Some(token.to_owned());
        }
        rest = &rest[start + token_len..];
    }
    None
}

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for RestoreError {
            fn from(e: $ty) -> Self {
                RestoreError::$variant(Box::new(e))
            }
        })*
    };
}

boxed_from!(
    Repository(RepoError),
    Plan(PlanError),
    Store(StoreError),
    Chain(ChainError),
    Time(TimeSpecError),
    Checksum(ChecksumMismatch),
    Segment(SegmentError),
);

impl From<OriginError> for RestoreError {
    fn from(e: OriginError) -> Self {
        match e {
            OriginError::Io {
                action,
                path,
                source,
            } => RestoreError::io(format!("cannot {action} the origin file"), path, source),
            e => RestoreError::Integrity(e.to_string()),
        }
    }
}

impl From<ObjectKeyError> for RestoreError {
    fn from(e: ObjectKeyError) -> Self {
        RestoreError::Integrity(e.to_string())
    }
}

fn store_class(e: &StoreError) -> ErrorClass {
    match e {
        StoreError::NotFound { .. }
        | StoreError::InvalidKey { .. }
        | StoreError::InvalidRange { .. } => ErrorClass::VerificationFailed,
        StoreError::Config { .. } | StoreError::BucketNotFound { .. } => ErrorClass::Usage,
        _ => ErrorClass::Failure,
    }
}

fn repo_class(e: &RepoError) -> ErrorClass {
    match e {
        RepoError::NoRepository { .. }
        | RepoError::KeyRequired { .. }
        | RepoError::WrongKey { .. }
        | RepoError::NotEncrypted { .. }
        | RepoError::NoSuchGeneration { .. } => ErrorClass::Usage,
        RepoError::FallbackFailed { source, .. } => repo_class(source),
        RepoError::Keyring(_) if e.is_usage() => ErrorClass::Usage,
        RepoError::Keyring(
            KeyringError::Inconsistent { .. }
            | KeyringError::Wrap {
                source: WrapError::Tampered { .. },
                ..
            },
        ) => ErrorClass::VerificationFailed,
        RepoError::MissingObject { .. }
        | RepoError::History { .. }
        | RepoError::Segment(_)
        | RepoError::Checksum(_) => ErrorClass::VerificationFailed,
        RepoError::Model(ModelError::UnsupportedVersion { .. }) => ErrorClass::Failure,
        RepoError::Model(_) => ErrorClass::VerificationFailed,
        RepoError::Store(s) => store_class(s),
        _ => ErrorClass::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_manifest::store::StoreOp;

    #[test]
    fn classes_map_to_the_documented_codes() {
        let missing = StoreError::NotFound {
            op: StoreOp::Get,
            key: "wal/0000000000000001.seg".into(),
            location: "file:///r/wal/0000000000000001.seg".into(),
        };
        assert_eq!(
            RestoreError::from(missing).class().exit_code(),
            exit_code::VERIFICATION_FAILED
        );
        assert_eq!(
            RestoreError::from(StoreError::config("bad url"))
                .class()
                .exit_code(),
            exit_code::USAGE
        );
        assert_eq!(
            RestoreError::Usage("x".into()).class().exit_code(),
            exit_code::USAGE
        );
        assert_eq!(
            RestoreError::from(PlanError::NoBase).class().exit_code(),
            exit_code::NOT_RESTORABLE
        );
        assert_eq!(
            RestoreError::Verification("x".into()).class().exit_code(),
            exit_code::VERIFICATION_FAILED
        );
        assert_eq!(
            RestoreError::Interrupted.class().exit_code(),
            exit_code::FAILURE
        );
        let no_repo = RepoError::NoRepository {
            location: "file:///x".into(),
            key: "tidemark.json".into(),
        };
        assert_eq!(RestoreError::from(no_repo).class(), ErrorClass::Usage);
    }

    #[test]
    fn errors_name_their_object() {
        let missing = StoreError::NotFound {
            op: StoreOp::Get,
            key: "wal/0000000000000001.seg".into(),
            location: "file:///r/wal/0000000000000001.seg".into(),
        };
        assert_eq!(
            RestoreError::from(missing).object().as_deref(),
            Some("wal/0000000000000001.seg")
        );
        let corrupt = ChecksumMismatch {
            key: "sst/ab12".into(),
            expected: "ab12".into(),
            expected_size: 3,
            found: "cd34".into(),
            found_size: 3,
        };
        assert_eq!(
            RestoreError::from(corrupt).object().as_deref(),
            Some("sst/ab12")
        );
        let e = RestoreError::Integrity(
            "bases/b20261123T133000Z-0a1b2c3d/base.json: the column families differ.".into(),
        );
        assert_eq!(
            e.object().as_deref(),
            Some("bases/b20261123T133000Z-0a1b2c3d/base.json")
        );
        assert_eq!(RestoreError::Interrupted.object(), None);
        assert_eq!(
            RestoreError::Verification("ends at sequence 5, planned 7".into()).object(),
            None
        );
        assert_eq!(object_in("a wal/ without a name"), None);
    }
}
