//! `tidemark-archiver rekey`: rotates the key of an encrypted repository (FORMAT.md §10.7,
//! docs/operations.md §12). The data keys are rewrapped under the new key; no object is
//! rewritten, and an archiver writing to the repository meanwhile goes on (the data key it
//! seals with does not change). The rotation itself is the format crate's
//! ([`tidemark_manifest::keyring::rekey`]); this module reads the keys and reports.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::exit;
use tidemark_manifest::keyring::{self, FileKeyWrapper, RekeyReport};
use tidemark_manifest::store::{EncryptionKey, OpenOptions, StoreUrl, open_store_with};

/// `rekey`'s flags.
#[derive(Debug, Clone, Args)]
pub struct RekeyOptions {
    /// The repository: s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// The repository's current key (the file the archiver and restores use today).
    #[arg(long, value_name = "FILE")]
    pub old_key_file: PathBuf,
    /// The key to rotate to (create it with `openssl rand -hex 32`, mode 600).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Runs the rotation. `OK` when the repository's key is the new key (now, or already:
/// running the same command again after an interruption finishes it); `USAGE` for a bad
/// URL, an unreadable key file, a wrong old key or an unencrypted repository (nothing was
/// changed); `FAILURE` when the store failed (run the command again).
pub async fn run(o: RekeyOptions) -> anyhow::Result<ExitCode> {
    let usage = |e: &dyn std::fmt::Display| {
        eprintln!("tidemark-archiver rekey: {e}");
        Ok(ExitCode::from(exit::USAGE))
    };
    if o.store.access.encryption_key_file.is_some() || o.store.access.encryption_key.is_some() {
        return usage(
            &"rekey takes its keys from --old-key-file and --new-key-file only; drop \
              --encryption-key-file (and unset TIDEMARK_ENCRYPTION_KEY_FILE)",
        );
    }
    if std::env::var_os(tidemark_manifest::cli::ENCRYPTION_KEY_ENV).is_some() {
        return usage(
            &"rekey takes its keys from --old-key-file and --new-key-file only; unset \
              TIDEMARK_ENCRYPTION_KEY",
        );
    }
    let (old, new) = match (
        EncryptionKey::from_file(&o.old_key_file),
        EncryptionKey::from_file(&o.new_key_file),
    ) {
        (Ok(old), Ok(new)) => (old, new),
        (Err(e), _) | (_, Err(e)) => return usage(&e),
    };
    let url = match StoreUrl::parse(&o.to) {
        Ok(u) => u,
        Err(e) => return usage(&e),
    };
    let s3 = match o.store.s3_options() {
        Ok(s) => s,
        Err(e) => return usage(&e),
    };
    let opts = OpenOptions {
        s3,
        ..OpenOptions::default()
    };
    let store = match open_store_with(&url, &opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tidemark-archiver rekey: cannot open {}: {e}", o.to);
            return Ok(ExitCode::from(exit::FAILURE));
        }
    };
    let (old, new) = (FileKeyWrapper::new(old), FileKeyWrapper::new(new));
    let now = time::OffsetDateTime::now_utc();
    match keyring::rekey(store, &old, &new, now).await {
        Ok(report) => {
            if o.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&o.to, &report);
            }
            Ok(ExitCode::from(exit::OK))
        }
        Err(e) => {
            eprintln!("tidemark-archiver rekey: {e}");
            Ok(ExitCode::from(if e.is_usage() {
                exit::USAGE
            } else {
                exit::FAILURE
            }))
        }
    }
}

fn print_report(to: &str, r: &RekeyReport) {
    if r.already_done {
        println!(
            "{to}: the key is key id {} already (a rotation from {} was completed before); \
             nothing to do",
            r.to,
            r.from.join(", ")
        );
        return;
    }
    println!(
        "{to}: rotated from key id {} to key id {}: {} data keys rewrapped, no object \
         rewritten{}",
        r.from.join(", "),
        r.to,
        r.data_keys,
        if r.created_keyring {
            " (keyring.json created; new objects are sealed with a new data key once the \
             archiver is restarted with the new key)"
        } else {
            ""
        }
    );
    println!(
        "the old key no longer opens the repository; give the new key to the archiver, \
         restores and drills"
    );
}
