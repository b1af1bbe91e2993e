//! The commands: one module each, with a serde `*Options` struct, a `run` function and a
//! serde report that renders as text for people or as JSON for automation.
//!
//! - [`list`]: what a repository can restore (bases, window, gaps, a timeline);
//! - [`restore`]: plan → fetch → replay → verify into a target directory;
//! - [`verify`]: check a repository's objects without restoring;
//! - [`follow`]: a warm standby: restore the latest point, then keep it current from the
//!   archive until it is stopped or promoted;
//! - [`drill`]: the recovery drill: a verified restore into a scratch directory, the
//!   operator's own check, the achieved RTO and the RPO, in a JSON report.

pub mod drill;
pub mod follow;
pub mod list;
pub mod restore;
pub mod verify;

use serde::{Deserialize, Serialize};

use tidemark_manifest::cli::StoreAccess;
use tidemark_manifest::repo::{ReadFrom, RepoState, Repository};
use tidemark_manifest::store::{S3Options, StoreUrl};

use crate::RestoreError;

/// The point to restore to (or to verify for): one type from the planner to the reports.
pub use tidemark_manifest::plan::{Target, short_time};

/// Where the repository is, and how to reach it: `--from` plus the store flags every
/// Tidemark program shares to read ([`StoreAccess`]: endpoint, region, path-style
/// addressing, request timeout, encryption key). The write settings (storage classes,
/// server-side encryption, upload rate) are not taken: their variables in an environment
/// file shared with the archiver are ignored here.
///
/// In JSON the store flags sit beside `from`:
/// `{"from": "s3://bucket/prefix", "endpoint_url": "http://127.0.0.1:9000", "path_style": true}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
pub struct StoreOptions {
    /// The repository: s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR.
    #[arg(long, value_name = "URL", env = "TIDEMARK_FROM")]
    #[serde(default)]
    pub from: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub store: StoreAccess,
}

impl StoreOptions {
    /// Options for the repository at `from` with default store flags.
    pub fn new(from: impl Into<String>) -> StoreOptions {
        StoreOptions {
            from: from.into(),
            store: StoreAccess::default(),
        }
    }

    /// The parsed `--from` URL.
    pub fn url(&self) -> Result<StoreUrl, RestoreError> {
        Ok(StoreUrl::parse(&self.from)?)
    }

    /// The S3 settings the store flags describe.
    pub fn s3(&self) -> Result<S3Options, RestoreError> {
        Ok(self.store.s3_options()?)
    }

    /// Opens the store (with the retry layer) and the repository on it. A missing local
    /// directory is reported as bad input, never created.
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
        Ok(self.store.open(&self.from).await?)
    }
}

/// Loads a repository's current state (from its newest intact generation), logging where
/// it came from.
pub async fn load(repo: &Repository) -> Result<RepoState, RestoreError> {
    load_from(repo, ReadFrom::NewestIntact).await
}

/// Loads a repository's state from the generation `from` says (FORMAT.md §4.4, reader
/// rules), logging where it came from.
pub async fn load_from(repo: &Repository, from: ReadFrom) -> Result<RepoState, RestoreError> {
    let state = repo.load_for_reading(from).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreOptions,
    }

    #[test]
    fn store_flags_are_the_shared_ones_and_keep_their_json_shape() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "x",
            "--from",
            "s3://bucket/prefix",
            "--endpoint-url",
            "http://127.0.0.1:9000",
            "--region",
            "eu-west-1",
            "--path-style",
        ])
        .unwrap();
        // Write settings are the archiver's: not taken here.
        assert!(Cli::try_parse_from(["x", "--from", "file:///r", "--sse", "AES256"]).is_err());
        let s = &cli.store;
        assert_eq!(s.from, "s3://bucket/prefix");
        assert_eq!(
            s.store.endpoint_url.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(s.store.region.as_deref(), Some("eu-west-1"));
        assert!(s.store.path_style);
        let s3 = s.s3().unwrap();
        assert!(s3.force_path_style);
        assert_eq!(s3.region.as_deref(), Some("eu-west-1"));

        // The store flags sit beside `from` in JSON, as before.
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["from"], "s3://bucket/prefix");
        assert_eq!(json["endpoint_url"], "http://127.0.0.1:9000");
        assert_eq!(json["path_style"], true);
        let back: StoreOptions = serde_json::from_value(serde_json::json!({
            "from": "file:///r",
            "region": "us-east-1",
            "path_style": true
        }))
        .unwrap();
        assert_eq!(back.from, "file:///r");
        assert_eq!(back.store.region.as_deref(), Some("us-east-1"));
        assert!(back.store.path_style && back.store.endpoint_url.is_none());

        // --from is required (unless the environment gives it); a bad encryption setting is
        // bad input.
        if std::env::var_os("TIDEMARK_FROM").is_none() {
            assert!(Cli::try_parse_from(["x", "--path-style"]).is_err());
        }
        let mut bad = StoreOptions::new("s3://bucket");
        bad.store.endpoint_url = Some("not a url".into());
        assert_eq!(bad.s3().unwrap_err().class(), crate::ErrorClass::Usage);
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
