//! The command line of `copy`: the source (`--from` and the usual store flags and
//! `TIDEMARK_*` variables), the destination (`--to`, `--to-config`, `--to-encryption-key-file`),
//! and how they become [`CopyOptions`].
//!
//! The destination is reached with the source's endpoint, region and path style unless
//! `--to-config FILE` gives it a `[store]` table of its own (the keys of the archiver's
//! `[store]`; an archiver's config file works, its other keys are ignored). Its encryption
//! key comes only from `--to-encryption-key-file` or that table's `encryption_key_file`,
//! never from the source's settings or `TIDEMARK_ENCRYPTION_KEY`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tidemark_manifest::cli::{StoreAccess, StoreArgs};
use tidemark_manifest::store::{EncryptionKey, StoreError};

use super::validation::MIN_LEASE_TTL;
use super::{ConfigError, file};
use crate::copy::CopyOptions;

/// `copy`: bring a second repository up to date with a first.
#[derive(Debug, Clone, Args)]
pub struct CopyFlags {
    /// The repository to copy from: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR (read only;
    /// the store flags below and TIDEMARK_* apply to it).
    #[arg(long, value_name = "URL")]
    pub from: String,
    /// The repository to bring up to date (created if there is none).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// A TOML file whose [store] table reaches the destination (endpoint_url, region,
    /// path_style, storage_class, encryption_key_file…). Without it the destination is
    /// reached with the source's endpoint, region and path style.
    #[arg(long, value_name = "FILE")]
    pub to_config: Option<PathBuf>,
    /// The destination's encryption key file (a new destination is then encrypted with it).
    #[arg(long, value_name = "PATH")]
    pub to_encryption_key_file: Option<PathBuf>,
    /// The destination's lease lasts this long without renewal (at least 10s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    pub lease_ttl: Duration,
    /// Show what would be copied; write nothing (no lease is taken).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON (with --every, one line per run).
    #[arg(long)]
    pub json: bool,
    /// Run as a service: copy again this long after each copy ends (e.g. 1m), until SIGTERM
    /// or SIGINT. A store that fails or a lease held is tried again at the next run.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub every: Option<Duration>,
    /// Copy a source written with S3 Object Lock to a destination that cannot lock objects
    /// (a directory, a bucket without Object Lock): the copy records no lock and anyone who
    /// can write to it can delete it. Without it such a copy is refused.
    #[arg(long)]
    pub unlocked_copy: bool,
    #[command(flatten)]
    pub store: StoreAccess,
}

/// The destination's file: its `[store]` table; other keys are not the copy's.
#[derive(Debug, Default, serde::Deserialize)]
struct DestinationFile {
    #[serde(default)]
    store: StoreArgs,
}

/// `copy`: the flags, the destination's file, checked.
pub fn copy_options(flags: CopyFlags) -> Result<CopyOptions, ConfigError> {
    if flags.lease_ttl < MIN_LEASE_TTL {
        return Err(ConfigError::Usage(format!(
            "--lease-ttl {} is shorter than {}: a lease that short cannot be renewed in time",
            humantime::format_duration(flags.lease_ttl),
            humantime::format_duration(MIN_LEASE_TTL)
        )));
    }
    if flags.dry_run && flags.every.is_some() {
        return Err(ConfigError::Usage(
            "--dry-run shows one copy: it does not go with --every".to_owned(),
        ));
    }
    if flags.every.is_some_and(|e| e.is_zero()) {
        return Err(ConfigError::Usage(
            "--every 0s would copy without a pause: give an interval such as 1m".to_owned(),
        ));
    }
    let mut destination = match &flags.to_config {
        Some(path) => {
            let text = file::read(path)?;
            let f: DestinationFile = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: path.clone(),
                source: file::FileError::Options(e),
            })?;
            f.store
        }
        None => StoreArgs {
            access: StoreAccess {
                encryption_key_file: None,
                encryption_key: None,
                ..flags.store.clone()
            },
            ..StoreArgs::default()
        },
    };
    if let Some(path) = &flags.to_encryption_key_file {
        destination.access.encryption_key_file = Some(path.clone());
    }
    let destination_key = match &destination.access.encryption_key_file {
        Some(path) => Some(
            EncryptionKey::from_file(path)
                .map_err(|e| ConfigError::Store(StoreError::config(e.to_string())))?,
        ),
        None => None,
    };
    Ok(CopyOptions {
        from: flags.from,
        to: flags.to,
        source: flags.store,
        destination,
        destination_key,
        lease_ttl: flags.lease_ttl,
        dry_run: flags.dry_run,
        every: flags.every,
        unlocked_copy: flags.unlocked_copy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        copy: CopyFlags,
    }

    /// A key file only its owner reads, as a key file must be.
    fn key_file(path: &std::path::Path, key: &EncryptionKey) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, key.to_hex().as_bytes()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn flags(args: &[&str]) -> CopyFlags {
        let mut all = vec!["copy", "--from", "s3://a/p", "--to", "file:///tmp/b"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().copy
    }

    #[test]
    fn the_destination_takes_the_sources_endpoint_but_never_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let source_key = dir.path().join("source.key");
        key_file(&source_key, &EncryptionKey::generate());
        let key = source_key.display().to_string();
        let o = copy_options(flags(&[
            "--endpoint-url",
            "http://127.0.0.1:9000",
            "--path-style",
            "--encryption-key-file",
            &key,
        ]))
        .unwrap();
        let d = &o.destination.access;
        assert_eq!(d.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(d.path_style);
        assert!(d.encryption_key_file.is_none() && o.destination_key.is_none());
        assert_eq!(o.source.encryption_key_file, Some(source_key));
    }

    #[test]
    fn a_destination_file_replaces_the_sources_settings() {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::generate();
        let key_path = dir.path().join("dest.key");
        key_file(&key_path, &key);
        let conf = dir.path().join("dest.toml");
        std::fs::write(
            &conf,
            format!(
                "db = \"/ignored\"\n[store]\nregion = \"eu-west-1\"\nstorage_class = \
                 \"STANDARD_IA\"\nencryption_key_file = {:?}\n",
                key_path.display().to_string()
            ),
        )
        .unwrap();
        let c = conf.display().to_string();
        let o = copy_options(flags(&["--endpoint-url", "http://x", "--to-config", &c])).unwrap();
        assert_eq!(o.destination.access.endpoint_url, None);
        assert_eq!(o.destination.access.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            o.destination.write.storage_class.as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(o.destination_key.map(|k| k.key_id()), Some(key.key_id()));
    }

    #[test]
    fn a_lease_too_short_and_a_bad_file_are_refused() {
        let e = copy_options(flags(&["--lease-ttl", "2s"])).unwrap_err();
        assert!(e.to_string().contains("--lease-ttl 2s"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("dest.toml");
        std::fs::write(&conf, "[store]\ncolour = \"blue\"\n").unwrap();
        let c = conf.display().to_string();
        let e = copy_options(flags(&["--to-config", &c])).unwrap_err();
        assert!(matches!(e, ConfigError::File { .. }), "{e}");
    }
}
