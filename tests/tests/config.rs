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
