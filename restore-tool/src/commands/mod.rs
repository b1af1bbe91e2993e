//! The commands: one module each, with a serde `*Options` struct, a `run` function and a
//! serde report that renders as text for people or as JSON for automation.
//!
//! - [`list`]: what a repository can restore (bases, window, gaps, a timeline);
//! - [`restore`]: plan → fetch → replay → verify into a target directory;
//! - [`verify`]: check a repository's objects without restoring.

pub mod list;
pub mod restore;
pub mod verify;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use tidemark_manifest::plan::Target;
use tidemark_manifest::repo::{RepoState, Repository};
use tidemark_manifest::store::{self, ObjectStore, S3Options, StoreUrl};

use crate::RestoreError;

/// Where the repository is, and how to reach an S3 one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreOptions {
    /// `s3://BUCKET[/PREFIX]` or `file:///ABSOLUTE/DIR`.
    pub from: String,
    /// A custom S3 endpoint such as `http://127.0.0.1:9000`.
    pub endpoint_url: Option<String>,
    /// The bucket's region.
    pub region: Option<String>,
    /// Path-style S3 addressing.
    pub path_style: bool,
}

impl StoreOptions {
    /// The parsed `--from` URL.
    pub fn url(&self) -> Result<StoreUrl, RestoreError> {
        Ok(StoreUrl::parse(&self.from)?)
    }

    /// The S3 settings.
    pub fn s3(&self) -> S3Options {
        S3Options {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.path_style,
            ..S3Options::default()
        }
    }

    /// Opens the store (with the retry layer) and the repository on it.
    pub async fn open(&self) -> Result<Repository, RestoreError> {
        let url = self.url()?;
        if let StoreUrl::Local { root } = &url
            && !root.is_dir()
        {
            return Err(RestoreError::Usage(format!(
                "there is no directory {} for the repository {}; check --from",
                root.display(),
                self.from
            )));
        }
        let store: Arc<dyn ObjectStore> = store::open_store(&url, &self.s3()).await?;
        Ok(Repository::new(store))
    }
}

/// A restore (or verification) target as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSpec {
    /// The newest archived point.
    Latest,
    /// A sequence number (rounded down to a whole batch).
    Seq(u64),
    /// Every record at or before this time.
    Time(#[serde(with = "time::serde::rfc3339")] OffsetDateTime),
}

impl TargetSpec {
    /// The planner's target.
    pub fn target(self) -> Target {
        match self {
            TargetSpec::Latest => Target::Latest,
            TargetSpec::Seq(n) => Target::Seq(n),
            TargetSpec::Time(t) => Target::Time(t),
        }
    }
}

/// Loads a repository's current state, logging where it came from.
pub async fn load(repo: &Repository) -> Result<RepoState, RestoreError> {
    let state = repo.load().await?;
    tracing::debug!(
        location = %repo.location(),
        generation = state.generation.as_ref().map(|g| g.generation),
        bases = state.history.bases.len(),
        segments = state.history.segments.len(),
        tail_segments = state.tail_segments,
        "loaded the repository"
    );
    Ok(state)
}

/// A time as `2026-11-23 13:30:00.123456Z` (UTC, microseconds: the precision of record
/// times), for people.
pub fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_round_trip_through_json() {
        let t = time::macros::datetime!(2026-11-23 13:30:00.5 UTC);
        for spec in [TargetSpec::Latest, TargetSpec::Seq(42), TargetSpec::Time(t)] {
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(
                serde_json::from_str::<TargetSpec>(&json).unwrap(),
                spec,
                "{json}"
            );
        }
        assert_eq!(
            serde_json::to_string(&TargetSpec::Time(t)).unwrap(),
            r#"{"time":"2026-11-23T13:30:00.5Z"}"#
        );
        assert_eq!(short_time(t), "2026-11-23 13:30:00.500000Z");
    }

    #[tokio::test]
    async fn a_missing_local_repository_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = StoreOptions {
            from: format!("file://{}/nope", dir.path().display()),
            ..StoreOptions::default()
        };
        let e = missing.open().await.unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::Usage, "{e}");
        let bad = StoreOptions {
            from: "/plain/path".into(),
            ..StoreOptions::default()
        };
        let e = bad.open().await.unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::Usage, "{e}");
        assert!(e.to_string().contains("file://"), "{e}");
        let empty = StoreOptions {
            from: format!("file://{}", dir.path().display()),
            ..StoreOptions::default()
        };
        let repo = empty.open().await.unwrap();
        let e = load(&repo).await.unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::Usage, "{e}");
        assert!(e.to_string().contains("no Tidemark repository"), "{e}");
    }
}
