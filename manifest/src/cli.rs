//! Command-line options both programs share: where the repository is and how to reach it.
//! Each flag can also come from the environment (`TIDEMARK_*`), so the archiver's service
//! unit and the restore tool's drills are configured the same way.

use std::sync::Arc;

use crate::repo::Repository;
use crate::store::{OpenOptions, Rate, S3Options, Sse, StoreError, StoreUrl, open_store_with};

/// How to reach the object store.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreArgs {
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS).
    #[arg(long, env = "TIDEMARK_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// The bucket's region (default: from the AWS configuration; us-east-1 with --endpoint-url).
    #[arg(long, env = "TIDEMARK_REGION")]
    pub region: Option<String>,
    /// Path-style bucket addressing (most S3-compatible servers need it).
    #[arg(long, env = "TIDEMARK_PATH_STYLE")]
    pub path_style: bool,
    /// Storage class of new data objects (base files, WAL segments), e.g. STANDARD_IA;
    /// documents always get the bucket's default. GLACIER and DEEP_ARCHIVE are refused.
    #[arg(long, env = "TIDEMARK_STORAGE_CLASS", value_name = "CLASS")]
    pub storage_class: Option<String>,
    /// Storage class of base backups' files (sst/, bases/*/files/), e.g. STANDARD_IA
    /// (default: --storage-class).
    #[arg(long, env = "TIDEMARK_BASE_STORAGE_CLASS", value_name = "CLASS")]
    pub base_storage_class: Option<String>,
    /// Storage class of WAL segments (wal/), e.g. STANDARD (default: --storage-class).
    #[arg(long, env = "TIDEMARK_WAL_STORAGE_CLASS", value_name = "CLASS")]
    pub wal_storage_class: Option<String>,
    /// Limit the process's uploads to this rate, e.g. 50MiB/s, 500KB/s or 100Mbit/s (at
    /// least 64KiB/s; default: no limit). WAL segments and documents go ahead of base files.
    #[arg(long, env = "TIDEMARK_MAX_UPLOAD_RATE", value_name = "RATE")]
    pub max_upload_rate: Option<Rate>,
    /// Server-side encryption of new objects: AES256 or aws:kms.
    #[arg(long, env = "TIDEMARK_SSE", value_name = "AES256|aws:kms")]
    pub sse: Option<String>,
    /// KMS key id, ARN or alias for --sse aws:kms.
    #[arg(long, env = "TIDEMARK_SSE_KMS_KEY_ID", value_name = "KEY")]
    pub sse_kms_key_id: Option<String>,
    /// Seconds one attempt of a small request may take before it is retried (default 30).
    #[arg(long, env = "TIDEMARK_REQUEST_TIMEOUT", value_name = "SECONDS")]
    pub request_timeout: Option<u64>,
}

impl StoreArgs {
    /// The S3 options these flags describe.
    pub fn s3_options(&self) -> Result<S3Options, StoreError> {
        let sse = match (self.sse.as_deref(), &self.sse_kms_key_id) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(StoreError::config(
                    "--sse-kms-key-id needs --sse aws:kms".to_owned(),
                ));
            }
            (Some("AES256"), None) => Some(Sse::Aes256),
            (Some("AES256"), Some(_)) => {
                return Err(StoreError::config(
                    "--sse-kms-key-id goes with --sse aws:kms, not AES256".to_owned(),
                ));
            }
            (Some("aws:kms"), key) => Some(Sse::Kms {
                key_id: key.clone(),
            }),
            (Some(other), _) => {
                return Err(StoreError::config(format!(
                    "--sse {other:?} is not supported: use AES256 or aws:kms"
                )));
            }
        };
        let defaults = S3Options::default();
        let opts = S3Options {
            request_timeout_secs: self
                .request_timeout
                .unwrap_or(defaults.request_timeout_secs),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.path_style,
            storage_class: self.storage_class.clone(),
            base_storage_class: self.base_storage_class.clone(),
            wal_storage_class: self.wal_storage_class.clone(),
            sse,
            ..defaults
        };
        opts.validate()?;
        Ok(opts)
    }

    /// Opens the repository at `url`. `create` creates a missing local directory (the
    /// archiver does; the restore tool must not, so that a typo is reported).
    pub async fn open(&self, url: &str, create: bool) -> Result<Repository, StoreError> {
        let url = StoreUrl::parse(url)?;
        let store = open_store_with(
            &url,
            &OpenOptions {
                s3: self.s3_options()?,
                create_local_root: create,
                max_upload_rate: self.max_upload_rate,
                ..OpenOptions::default()
            },
        )
        .await?;
        Ok(Repository::new(Arc::clone(&store)))
    }
}
