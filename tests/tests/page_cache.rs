//! Where a restore's files land: the default restore writes the base's large tables around
//! the page cache (nothing reads them whole before the application does), a restore with
//! `--verify standard` through it (it reads every table back at once). Both restore the
//! same bytes. Needs `fincore` (util-linux) and a temporary directory on a file system that
//! takes direct I/O.

use std::path::Path;

use anyhow::{Result, ensure};
use tidemark_manifest::testing;
use tidemark_tests::harness::TestStore;
use tidemark_tests::setup::Setup;

/// Resident and total bytes of the `.sst` files of 1 MiB or more in `dir`.
fn large_tables_cached(dir: &Path) -> Result<(u64, u64)> {
    let (mut resident, mut total) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let len = std::fs::metadata(&path)?.len();
        if path.extension().is_none_or(|e| e != "sst") || len < 1 << 20 {
            continue;
        }
        resident += testing::bytes_cached(&path);
        total += len;
    }
    Ok((resident, total))
}

/// The `.sst` files of `dir` and their contents, sorted by name.
fn tables(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sst") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read(&path)?));
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_default_restore_writes_the_base_tables_around_the_page_cache() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?;
    let db = s.db().display().to_string();
    // About 40 MB of values: tables of several MiB.
    let (code, _, err) = s.run(
        "tidemark-bench",
        &[
            "load",
            "--db",
            &db,
            "--keys",
            "40000",
            "--value-size",
            "1024",
        ],
    )?;
    ensure!(code == 0, "load: {err}");
    let (code, out, err) = s.run(
        "tidemark-archiver",
        &["backup", "--db", &db, "--to", &s.store.url],
    )?;
    ensure!(code == 0, "backup: {out}{err}");

    let mut restored = Vec::new();
    for (name, verify) in [("quick", "quick"), ("standard", "standard")] {
        let target = s.path(name).display().to_string();
        let args = [
            "restore",
            "--from",
            &s.store.url,
            "--target",
            &target,
            "--latest",
            "--verify",
            verify,
        ];
        let (code, out, err) = s.run("tidemark-restore", &args)?;
        ensure!(code == 0, "restore --verify {verify}: {out}{err}");
        let (resident, total) = large_tables_cached(s.path(name).as_path())?;
        ensure!(
            total >= 8 << 20,
            "expected tables of 1 MiB or more, found {total} bytes"
        );
        let share = resident as f64 / total as f64;
        eprintln!(
            "--verify {verify}: {:.1} % of {total} bytes of large tables cached",
            share * 100.0
        );
        if verify == "quick" {
            // The base check reads the tables' index and filter blocks, not their data.
            ensure!(
                share < 0.25,
                "--verify quick left {:.1} % cached",
                share * 100.0
            );
        } else {
            ensure!(
                share > 0.95,
                "--verify standard left {:.1} % cached",
                share * 100.0
            );
        }
        restored.push(tables(&s.path(name))?);
    }
    ensure!(
        restored[0] == restored[1],
        "the two restores' tables differ"
    );
    Ok(())
}
