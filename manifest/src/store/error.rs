//! The error type shared by every object store.

use std::fmt;

/// A boxed error from a lower layer (the AWS SDK, the file system).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which object-store operation failed; every [`StoreError`] names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// Opening or configuring a store.
    Open,
    /// [`ObjectStore::put`](super::ObjectStore::put).
    Put,
    /// [`ObjectStore::put_if_absent`](super::ObjectStore::put_if_absent).
    PutIfAbsent,
    /// [`ObjectStore::put_if_match`](super::ObjectStore::put_if_match).
    PutIfMatch,
    /// [`ObjectStore::put_file`](super::ObjectStore::put_file).
    PutFile,
    /// [`ObjectStore::get`](super::ObjectStore::get) and
    /// [`ObjectStore::get_with_meta`](super::ObjectStore::get_with_meta).
    Get,
    /// [`ObjectStore::get_to_file`](super::ObjectStore::get_to_file).
    GetToFile,
    /// [`ObjectStore::get_range`](super::ObjectStore::get_range).
    GetRange,
    /// [`ObjectStore::head`](super::ObjectStore::head).
    Head,
    /// [`ObjectStore::delete`](super::ObjectStore::delete).
    Delete,
    /// [`ObjectStore::list`](super::ObjectStore::list).
    List,
}

impl StoreOp {
    /// Every operation that goes through [`ObjectStore`](super::ObjectStore) (all but `Open`).
    pub const ALL_OBJECT_OPS: [StoreOp; 10] = [
        StoreOp::Put,
        StoreOp::PutIfAbsent,
        StoreOp::PutIfMatch,
        StoreOp::PutFile,
        StoreOp::Get,
        StoreOp::GetToFile,
        StoreOp::GetRange,
        StoreOp::Head,
        StoreOp::Delete,
        StoreOp::List,
    ];

    /// The name used in messages and logs, e.g. `put_if_absent`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Open => "open",
            StoreOp::Put => "put",
            StoreOp::PutIfAbsent => "put_if_absent",
            StoreOp::PutIfMatch => "put_if_match",
            StoreOp::PutFile => "put_file",
            StoreOp::Get => "get",
            StoreOp::GetToFile => "get_to_file",
            StoreOp::GetRange => "get_range",
            StoreOp::Head => "head",
            StoreOp::Delete => "delete",
            StoreOp::List => "list",
        }
    }
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a `put_if_absent` / `put_if_match` was refused, for the message of
/// [`StoreError::PreconditionFailed`].
fn precondition_reason(op: StoreOp) -> &'static str {
    match op {
        StoreOp::PutIfAbsent => {
            "the object already exists (another writer created it first); \
             create-only writes never replace an object"
        }
        StoreOp::PutIfMatch => {
            "the object was changed by another writer since its ETag was read \
             (ETag mismatch); read it again and retry"
        }
        _ => "the server refused the conditional request",
    }
}

/// An object-store failure.
///
/// Every variant names the operation and the object (its key relative to the store, and its
/// full location such as `s3://bucket/prefix/key` or `/srv/repo/key`), so the message alone
/// says what failed. Messages never contain credentials.
///
/// Only [`StoreError::Transient`] is worth retrying; [`RetryStore`](super::RetryStore) does
/// exactly that.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The object does not exist.
    #[error("{op} '{key}': no such object at {location}")]
    NotFound {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// Where the object would be, e.g. `s3://bucket/prefix/key`.
        location: String,
    },

    /// A conditional write was refused: `put_if_absent` found the object already present, or
    /// `put_if_match` found a different ETag.
    #[error("{op} '{key}' at {location}: {reason}", reason = precondition_reason(*op))]
    PreconditionFailed {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
    },

    /// The server did not accept the credentials (unknown access key, bad signature, expired
    /// token, no credentials found at all, or a request signed for the wrong region).
    #[error(
        "{op} '{key}' at {location}: the credentials were rejected ({detail}); check \
         AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE, and that \
         the region and endpoint URL are the ones the bucket lives in"
    )]
    InvalidCredentials {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// What the server or the credential chain said (never the credentials themselves).
        detail: String,
    },

    /// The credentials are valid but not allowed to do this, or the local directory is not
    /// writable/readable.
    #[error(
        "{op} '{key}' at {location}: access denied ({detail}); check that the credentials (or \
         the file permissions) allow this operation on this bucket or directory, and that the \
         region and endpoint URL are right"
    )]
    AccessDenied {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// What the server or the file system said.
        detail: String,
    },

    /// The bucket does not exist (or is not visible at this endpoint / region).
    #[error(
        "{op} '{key}': bucket '{bucket}' does not exist at {endpoint}; create it, or fix the \
         bucket name in the store URL, the region or the endpoint URL"
    )]
    BucketNotFound {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The bucket name.
        bucket: String,
        /// The endpoint / region the request went to.
        endpoint: String,
    },

    /// A temporary failure (5xx, throttling, timeout, broken connection). Retrying may help.
    #[error("{op} '{key}' at {location}: temporary failure: {source}")]
    Transient {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// [`RetryStore`](super::RetryStore) retried a transient failure and gave up.
    #[error(
        "{op} '{key}' at {location} failed {attempts} times in a row, giving up; last error: \
         {last}"
    )]
    RetriesExhausted {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt (a [`StoreError::Transient`]).
        #[source]
        last: Box<StoreError>,
    },

    /// The key is not a valid object key; nothing was sent to the store.
    #[error(
        "invalid object key '{key}': {reason} (keys are relative '/'-separated paths such as \
         'segments/000001.seg')"
    )]
    InvalidKey {
        /// The rejected key (or prefix).
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The byte range is empty-inverted or reaches past the end of the object.
    #[error(
        "{op} '{key}' at {location}: byte range {start}..{end} is not inside the object{size}",
        size = match size { Some(s) => format!(" (the object is {s} bytes long)"), None => String::new() }
    )]
    InvalidRange {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// Requested start (inclusive).
        start: u64,
        /// Requested end (exclusive).
        end: u64,
        /// The object's size, when known.
        size: Option<u64>,
    },

    /// A download was stopped: the object proved longer than it may be (the size the
    /// repository records for it, or the largest document for an object read whole:
    /// [`ObjectStore::get_to_file_max`](super::ObjectStore::get_to_file_max),
    /// [`ObjectStore::get_with_meta_max`](super::ObjectStore::get_with_meta_max)).
    #[error(
        "{op} '{key}' at {location}: the object is longer than the {limit} bytes it may \
         have, so it is corrupt or was replaced; the download was stopped and nothing was \
         kept"
    )]
    TooLarge {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// The most bytes the object may have.
        limit: u64,
    },

    /// A local file given to `put_file` / `get_to_file` could not be read or written.
    #[error("{op} '{key}': local file '{path}': {source}")]
    LocalFile {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The local file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The store URL or the store configuration is not usable.
    #[error("{message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// Any other failure.
    #[error("{op} '{key}' at {location} failed: {source}")]
    Other {
        /// The operation.
        op: StoreOp,
        /// The key, relative to the store.
        key: String,
        /// The object's full location.
        location: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Builds a [`StoreError::Config`].
    pub fn config(message: impl Into<String>) -> Self {
        StoreError::Config {
            message: message.into(),
        }
    }

    /// True for [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// True for [`StoreError::PreconditionFailed`] (a conditional write lost).
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, StoreError::PreconditionFailed { .. })
    }

    /// True for [`StoreError::Transient`]: the only kind worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }

    /// True for credential and permission problems.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            StoreError::InvalidCredentials { .. } | StoreError::AccessDenied { .. }
        )
    }

    /// The operation that failed, when the error is about one.
    pub fn op(&self) -> Option<StoreOp> {
        match self {
            StoreError::NotFound { op, .. }
            | StoreError::PreconditionFailed { op, .. }
            | StoreError::InvalidCredentials { op, .. }
            | StoreError::AccessDenied { op, .. }
            | StoreError::BucketNotFound { op, .. }
            | StoreError::Transient { op, .. }
            | StoreError::RetriesExhausted { op, .. }
            | StoreError::InvalidRange { op, .. }
            | StoreError::LocalFile { op, .. }
            | StoreError::TooLarge { op, .. }
            | StoreError::Other { op, .. } => Some(*op),
            StoreError::InvalidKey { .. } | StoreError::Config { .. } => None,
        }
    }

    /// The key (relative to the store) the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            StoreError::NotFound { key, .. }
            | StoreError::PreconditionFailed { key, .. }
            | StoreError::InvalidCredentials { key, .. }
            | StoreError::AccessDenied { key, .. }
            | StoreError::BucketNotFound { key, .. }
            | StoreError::Transient { key, .. }
            | StoreError::RetriesExhausted { key, .. }
            | StoreError::InvalidKey { key, .. }
            | StoreError::InvalidRange { key, .. }
            | StoreError::LocalFile { key, .. }
            | StoreError::TooLarge { key, .. }
            | StoreError::Other { key, .. } => Some(key),
            StoreError::Config { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_operation_and_object() {
        let e = StoreError::NotFound {
            op: StoreOp::Get,
            key: "manifest/current".into(),
            location: "s3://b/p/manifest/current".into(),
        };
        assert_eq!(
            e.to_string(),
            "get 'manifest/current': no such object at s3://b/p/manifest/current"
        );
        let e = StoreError::PreconditionFailed {
            op: StoreOp::PutIfAbsent,
            key: "k".into(),
            location: "/r/k".into(),
        };
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = StoreError::PreconditionFailed {
            op: StoreOp::PutIfMatch,
            key: "k".into(),
            location: "/r/k".into(),
        };
        assert!(e.to_string().contains("ETag mismatch"), "{e}");
        let e = StoreError::InvalidRange {
            op: StoreOp::GetRange,
            key: "k".into(),
            location: "/r/k".into(),
            start: 5,
            end: 20,
            size: Some(10),
        };
        assert_eq!(
            e.to_string(),
            "get_range 'k' at /r/k: byte range 5..20 is not inside the object (the object is 10 bytes long)"
        );
    }

    #[test]
    fn accessors() {
        let e = StoreError::Transient {
            op: StoreOp::Head,
            key: "a/b".into(),
            location: "x".into(),
            source: "boom".into(),
        };
        assert!(e.is_transient());
        assert!(!e.is_not_found());
        assert_eq!(e.op(), Some(StoreOp::Head));
        assert_eq!(e.key(), Some("a/b"));
        assert_eq!(StoreError::config("x").op(), None);
    }
}
