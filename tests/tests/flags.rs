//! The command lines of both programs, run for real: each command shows only the flags it
//! uses, and boolean flags' environment variables take what operators write.

use std::process::{Command, Output};

use anyhow::{Result, ensure};
use tidemark_manifest::exit;
use tidemark_tests::harness::bin;

/// The flags that only matter when objects are written.
const WRITE_FLAGS: [&str; 6] = [
    "--storage-class",
    "--base-storage-class",
    "--wal-storage-class",
    "--max-upload-rate",
    "--sse",
    "--sse-kms-key-id",
];

/// The flags every command needs to reach and read the store.
const ACCESS_FLAGS: [&str; 5] = [
    "--endpoint-url",
    "--region",
    "--path-style",
    "--request-timeout",
    "--encryption-key-file",
];

/// Runs a program with `env` set and every other `TIDEMARK_*` variable of the test's own
/// environment removed.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(bin(program)?);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TIDEMARK_") {
            cmd.env_remove(name);
        }
    }
    Ok(cmd.args(args).envs(env.iter().copied()).output()?)
}

/// The long flags a help text lists (`--name`, at the start of a line).
fn flags_in(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").unwrap_or(l);
            let l = l.split_once(", ").map_or(
                l,
                |(short, long)| {
                    if short.len() == 2 { long } else { l }
                },
            );
            l.starts_with("--")
                .then(|| l.split([' ', '=', '<']).next().unwrap_or(l).to_owned())
        })
        .collect()
}

fn help(program: &str, command: &str) -> Result<Vec<String>> {
    let out = run(program, &[command, "--help"], &[])?;
    ensure!(
        out.status.success(),
        "{program} {command} --help: {:?}",
        out.status
    );
    Ok(flags_in(&String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn read_only_commands_show_no_write_flags() -> Result<()> {
    let read_only = [
        ("tidemark-restore", "list"),
        ("tidemark-restore", "restore"),
        ("tidemark-restore", "verify"),
        ("tidemark-restore", "drill"),
        ("tidemark-restore", "follow"),
        ("tidemark-archiver", "status"),
    ];
    for (program, command) in read_only {
        let flags = help(program, command)?;
        for f in WRITE_FLAGS {
            ensure!(
                !flags.iter().any(|g| g == f),
                "{program} {command} --help shows {f}, which only writes use: {flags:?}"
            );
        }
        for f in ACCESS_FLAGS {
            ensure!(
                flags.iter().any(|g| g == f),
                "{program} {command} --help lacks {f}: {flags:?}"
            );
        }
    }
    // The commands that write keep every store flag.
    for command in ["run", "backup", "prune"] {
        let flags = help("tidemark-archiver", command)?;
        for f in WRITE_FLAGS.iter().chain(&ACCESS_FLAGS) {
            ensure!(
                flags.iter().any(|g| g == f),
                "tidemark-archiver {command} --help lacks {f}: {flags:?}"
            );
        }
    }
    // A write flag given to a read-only command is refused as unknown, not ignored.
    let out = run(
        "tidemark-restore",
        &["list", "--from", "file:///nowhere", "--sse", "AES256"],
        &[],
    )?;
    ensure!(out.status.code() == Some(exit::USAGE.into()), "{out:?}");
    Ok(())
}

const YES: [&str; 8] = ["1", "true", "TRUE", "yes", "Yes", "on", "ON", "True"];
const NO: [&str; 7] = ["0", "false", "FALSE", "no", "No", "off", "OFF"];

/// `TIDEMARK_LOG_JSON`: the archiver's logs are JSON exactly when it says yes.
#[test]
fn log_json_takes_yes_and_no_words() -> Result<()> {
    let repo = tempfile::tempdir()?;
    let url = format!("file://{}", repo.path().display());
    for (words, json) in [(&YES[..], true), (&NO[..], false)] {
        for word in words {
            let out = run(
                "tidemark-archiver",
                &["status", "--to", &url],
                &[("TIDEMARK_LOG_JSON", word), ("TIDEMARK_LOG", "debug")],
            )?;
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().next().unwrap_or_default();
            // The store is opened (logged at debug), then the empty directory is refused as
            // bad usage (no repository at the URL), as the restore tool does.
            ensure!(
                out.status.code() == Some(exit::USAGE.into())
                    && err.contains("no Tidemark repository"),
                "TIDEMARK_LOG_JSON={word}: {:?} {err}",
                out.status
            );
            ensure!(
                first.starts_with('{') == json,
                "TIDEMARK_LOG_JSON={word} must log {}: {first}",
                if json { "JSON" } else { "text" }
            );
        }
    }
    Ok(())
}

/// `TIDEMARK_PATH_STYLE` (both programs) and `TIDEMARK_LOG_JSON` take the same words, and
/// anything else is refused naming the flag and the accepted words.
#[test]
fn boolean_variables_take_what_operators_write_and_refuse_the_rest() -> Result<()> {
    let missing = "file:///nonexistent-tidemark-flags-test";
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "tidemark-restore",
            &["list", "--from", missing],
            "TIDEMARK_PATH_STYLE",
        ),
        (
            "tidemark-archiver",
            &["status", "--to", missing],
            "TIDEMARK_PATH_STYLE",
        ),
        (
            "tidemark-archiver",
            &["status", "--to", missing],
            "TIDEMARK_LOG_JSON",
        ),
    ];
    for (program, args, var) in cases {
        for word in YES.iter().chain(&NO) {
            let out = run(program, args, &[(var, word)])?;
            let err = String::from_utf8_lossy(&out.stderr);
            // Accepted: the command runs, and fails only on the missing repository.
            ensure!(
                !err.contains("invalid value") && err.contains("nonexistent-tidemark-flags-test"),
                "{program} with {var}={word}: {err}"
            );
        }
        for word in ["maybe", "2", "y e s", ""] {
            let out = run(program, args, &[(var, word)])?;
            let err = String::from_utf8_lossy(&out.stderr);
            if word.is_empty() {
                // An empty variable is as if unset.
                ensure!(!err.contains("invalid value"), "{var}=: {err}");
                continue;
            }
            ensure!(
                out.status.code() == Some(exit::USAGE.into())
                    && err.contains(&format!("invalid value '{word}'"))
                    && err.contains("1/0, true/false, yes/no or on/off"),
                "{program} with {var}={word}: {:?} {err}",
                out.status
            );
        }
    }
    Ok(())
}
