//! `tidemark-archiver check-store`, and the check of conditional writes the service runs
//! at start (docs/operations.md, "Checking a store").
//!
//! The probes themselves are the format crate's
//! ([`tidemark_manifest::store::probe`]); this module runs them and reports.

use std::process::ExitCode;

use tidemark_manifest::cli::StoreArgs;
use tidemark_manifest::exit;
use tidemark_manifest::store::probe::{self, ProbeReport};
use tidemark_manifest::store::{OpenOptions, StoreUrl, open_store_with};

use crate::config::flags::CheckStoreFlags;

/// Runs every probe and prints the table (or JSON). Exits `OK` whatever the store does;
/// `FAILURE` when it cannot be reached or written at all; `USAGE` for a bad URL, bad store
/// options or a config file that cannot be used.
pub async fn run(args: CheckStoreFlags) -> anyhow::Result<ExitCode> {
    let usage = |e: &dyn std::fmt::Display| {
        eprintln!("tidemark-archiver check-store: {e}");
        Ok(ExitCode::from(exit::USAGE))
    };
    let (to, store) = match crate::config::check_store_settings(&args) {
        Ok(v) => v,
        Err(e) => return usage(&format!("{:#}", anyhow::Error::new(e))),
    };
    let url = match StoreUrl::parse(&to) {
        Ok(u) => u,
        Err(e) => return usage(&e),
    };
    let s3 = match store.s3_options() {
        Ok(o) => o,
        Err(e) => return usage(&e),
    };
    let report = match probe::check_store(&url, &s3).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark-archiver check-store: cannot probe {to}: {e}");
            let code = if matches!(e, tidemark_manifest::store::StoreError::Config { .. }) {
                exit::USAGE
            } else {
                exit::FAILURE
            };
            return Ok(ExitCode::from(code));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
        print_verdict(&report);
    }
    Ok(ExitCode::from(exit::OK))
}

fn print_verdict(report: &ProbeReport) {
    let unsafe_checks: Vec<&str> = report.unsafe_checks().map(|c| c.name).collect();
    let errors: Vec<&str> = report.errors().map(|c| c.name).collect();
    if !unsafe_checks.is_empty() {
        println!(
            "verdict: UNSAFE for Tidemark ({}); the archiver refuses this store unless \
             started with --allow-unsafe-store",
            unsafe_checks.join(", ")
        );
    } else if !errors.is_empty() {
        println!(
            "verdict: unknown: {} could not be checked (see above); run it again",
            errors.join(", ")
        );
    } else {
        println!("verdict: the store does what Tidemark relies on");
    }
}

/// The start-up check of `run` and `backup`: a create-only write repeated, a race of
/// [`probe::START_RACERS`] create-only writers, and a compare-and-swap, on the store of the
/// repository `to` (below client-side encryption, which binds objects to a repository that
/// may not exist yet). A store that fails one (or where one cannot be completed) is
/// refused, unless `allow_unsafe` (`--allow-unsafe-store`), which logs the same findings as
/// warnings.
pub async fn check_at_start(
    to: &str,
    store: &StoreArgs,
    allow_unsafe: bool,
) -> Result<(), StartCheckError> {
    let url = StoreUrl::parse(to).map_err(StartCheckError::Store)?;
    let options = OpenOptions {
        s3: store.s3_options().map_err(StartCheckError::Store)?,
        create_local_root: true,
        ..OpenOptions::default()
    };
    let raw = open_store_with(&url, &options)
        .await
        .map_err(StartCheckError::Store)?;
    let report = probe::check_conditional_writes(raw.as_ref(), probe::START_RACERS)
        .await
        .map_err(StartCheckError::Store)?;
    let findings = |status: probe::Status| {
        report
            .checks
            .iter()
            .filter(|c| c.status == status)
            .map(|c| format!("{} {}: {}", c.name, c.status, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (unsafe_found, errors) = (
        findings(probe::Status::Unsafe),
        findings(probe::Status::Error),
    );
    if unsafe_found.is_empty() && errors.is_empty() {
        tracing::info!(store = %report.store, "the store's conditional writes work");
        return Ok(());
    }
    if allow_unsafe {
        tracing::warn!(
            store = %report.store,
            findings = %[unsafe_found, errors].join(" "),
            "the store failed the check of conditional writes; going on because of \
             --allow-unsafe-store: two archivers or a sweep may now overwrite each other's work"
        );
        return Ok(());
    }
    let override_hint = "or, if only one archiver can ever write here and you accept the risk, \
                         pass --allow-unsafe-store (allow_unsafe_store = true in the config)";
    if !unsafe_found.is_empty() {
        return Err(StartCheckError::Unsafe(format!(
            "refusing the store {}: {unsafe_found}. Tidemark's lease, manifest generations and \
             segments rely on create-only writes (If-None-Match: *) and compare-and-swap \
             (If-Match), applied atomically; without them two writers can overwrite each \
             other. Use a store that supports them (`tidemark-archiver check-store --to URL` \
             shows what a store does), {override_hint}",
            report.store
        )));
    }
    Err(StartCheckError::Incomplete(format!(
        "cannot check the conditional writes of the store {}: {errors}. Start again once the \
         store answers, {override_hint}",
        report.store
    )))
}

/// What [`check_at_start`] fails with.
#[derive(Debug, thiserror::Error)]
pub enum StartCheckError {
    /// The store could not be written at all.
    #[error(transparent)]
    Store(tidemark_manifest::store::StoreError),
    /// The store failed the check: it ignores conditional writes, or applies them wrongly.
    #[error("{0}")]
    Unsafe(String),
    /// A check could not be completed.
    #[error("{0}")]
    Incomplete(String),
}
