//! Settings that cannot work are refused at start, by the real binary: exit code 2 and a
//! message naming the key, before anything is written to the repository.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use tidemark_tests::harness::{Proc, bin, run_with_timeout};

fn archiver(args: &[&str]) -> Result<(i32, String)> {
    let (code, out, err) = run_with_timeout(
        &bin("tidemark-archiver")?,
        &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        &[],
        Duration::from_secs(60),
    )?;
    Ok((code, format!("{out}{err}")))
}

fn make_db(dir: &Path) -> Result<std::path::PathBuf> {
    let db = dir.join("db");
    let mut writer = Proc::spawn(
        &bin("tidemark-loadgen")?,
        &[
            "--db",
            &db.display().to_string(),
            "--out",
            &dir.join("oracle").display().to_string(),
            "--duration",
            "1",
        ]
        .map(str::to_owned),
        &[],
        &dir.join("loadgen.log"),
    )?;
    writer.wait_success(Duration::from_secs(60))?;
    Ok(db)
}

#[test]
fn durations_that_cannot_work_are_refused_at_start_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = make_db(dir.path())?;
    let repo = dir.path().join("repo");
    let config = dir.path().join("archiver.toml");
    for (settings, key, says) in [
        (
            "[retention]\npitr_window = \"1000000000y\"\ninterval = \"1s\"\n",
            "retention.pitr_window",
            "longer than 100 years",
        ),
        (
            "[retention]\nkeep_last = 2\ngrace = \"1000000000y\"\n",
            "retention.grace",
            "longer than 100 years",
        ),
        (
            "[retention]\nkeep_last = 2\ngrace = \"0s\"\n",
            "retention.grace",
            "restore under way",
        ),
        ("lease_ttl = \"2s\"\n", "lease_ttl", "shorter than 10s"),
        (
            "poll_interval = \"0s\"\n",
            "poll_interval",
            "longer than zero",
        ),
    ] {
        std::fs::write(
            &config,
            format!(
                "db = \"{}\"\nto = \"file://{}\"\nbase_at_start = true\n{settings}",
                db.display(),
                repo.display()
            ),
        )?;
        let (code, text) = archiver(&["run", "--config", &config.display().to_string()])?;
        ensure!(
            code == 2 && text.contains(key) && text.contains(says),
            "{key}: exit {code}: {text}"
        );
        ensure!(!repo.exists(), "{key}: the repository was touched");
    }
    // `prune` checks the same policy, from its flags.
    let (code, text) = archiver(&[
        "prune",
        "--to",
        &format!("file://{}", repo.display()),
        "--pitr-window",
        "1000000000y",
    ])?;
    ensure!(
        code == 2 && text.contains("retention.pitr_window"),
        "prune: exit {code}: {text}"
    );
    Ok(())
}

/// The replay bound (`max_replay`, `target_recovery_time`) from the config file and from
/// flags: zero, nonsense and both at once are refused at start with the key named, before
/// the repository is touched.
#[test]
fn a_replay_bound_that_cannot_work_is_refused_at_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = make_db(dir.path())?;
    let repo = dir.path().join("repo");
    let config = dir.path().join("archiver.toml");
    let run_with = |settings: &str, flags: &[&str]| -> Result<(i32, String)> {
        std::fs::write(
            &config,
            format!(
                "db = \"{}\"\nto = \"file://{}\"\n{settings}",
                db.display(),
                repo.display()
            ),
        )?;
        let config = config.display().to_string();
        let mut args = vec!["run", "--config", config.as_str()];
        args.extend_from_slice(flags);
        archiver(&args)
    };
    for (settings, flags, says) in [
        (
            "max_replay = \"0B\"\n",
            &[][..],
            "max_replay = \"0B\" must be more than zero",
        ),
        (
            "max_replay = \"0 records\"\n",
            &[],
            "max_replay = \"0 records\" must be more than zero",
        ),
        (
            "max_replay = \"lots\"\n",
            &[],
            "invalid replay bound \"lots\"",
        ),
        ("max_replay = \"64 parsecs\"\n", &[], "unknown unit"),
        (
            "target_recovery_time = \"0s\"\n",
            &[],
            "target_recovery_time = \"0s\" must be longer than zero",
        ),
        ("target_recovery_time = \"soon\"\n", &[], "invalid duration"),
        (
            "max_replay = \"64MiB\"\ntarget_recovery_time = \"5m\"\n",
            &[],
            "is given with target_recovery_time",
        ),
        // One in the file, the other on the command line: both after merging.
        (
            "max_replay = \"64MiB\"\n",
            &["--target-recovery-time", "5m"],
            "is given with target_recovery_time",
        ),
        ("", &["--max-replay", "0MiB"], "must be more than zero"),
        (
            "",
            &["--max-replay", "many"],
            "invalid replay bound \"many\"",
        ),
        (
            "",
            &["--target-recovery-time", "0s"],
            "must be longer than zero",
        ),
        (
            "",
            &["--restore-replay-rate", "0"],
            "restore_replay_rate = \"0\"",
        ),
        (
            "",
            &["--restore-download-rate", "fast"],
            "invalid rate \"fast\"",
        ),
    ] {
        let (code, text) = run_with(settings, flags)?;
        ensure!(
            code == 2 && text.contains(says),
            "{settings:?} {flags:?}: exit {code}: {text}"
        );
        ensure!(
            !repo.exists(),
            "{settings:?} {flags:?}: the repository was touched"
        );
    }
    Ok(())
}
