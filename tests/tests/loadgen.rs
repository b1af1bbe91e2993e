//! The load generator and its oracle against real RocksDB databases.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rocksdb::checkpoint::Checkpoint;
use tidemark_tests::state::show_key;
use tidemark_tests::{
    Generator, Oracle, RunOptions, State, Summary, WorkloadConfig, count_db_files, open_db,
    open_db_read_only, read_db_state, read_db_state_and_seq, read_times, run,
};

fn config(seed: u64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        max_batch_ops: 24,
        flush_every: 250,
        large_value_every: 40,
        marker_every: 10,
        keys_per_cf: 1000,
        once_keys_per_cf: 100,
    }
}

fn run_batches(root: &Path, seed: u64, batches: u64) -> Result<(PathBuf, PathBuf, Summary)> {
    let db = root.join("db");
    let out = root.join("oracle");
    let opts = RunOptions {
        db: db.clone(),
        out: out.clone(),
        workload: config(seed),
        batches: Some(batches),
        duration: None,
        rate: 0.0,
    };
    let summary = run(&opts, &AtomicBool::new(false))?;
    Ok((db, out, summary))
}

fn assert_same(expected: &State, actual: &State, what: &str) {
    if let Some(difference) = expected.diff(actual) {
        panic!("{what}: {difference}");
    }
    assert_eq!(expected.digest(), actual.digest(), "{what}: digests");
}

/// Every `TDMK` time marker found verbatim in the WAL files of `db` (and its `archive/`).
fn markers_in_wal(db: &Path) -> Result<Vec<i64>> {
    let mut found = Vec::new();
    for dir in [db.to_path_buf(), db.join("archive")] {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") {
                let bytes = std::fs::read(&path)?;
                for window in bytes.windows(13) {
                    if let Some(Ok(m)) = tidemark_manifest::rocks::marker::decode(window) {
                        let micros = m.unix_micros;
                        found.push(micros);
                    }
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn database_equals_oracle_after_a_busy_run() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (db, out, summary) = run_batches(root.path(), 7, 3000)?;
    assert_eq!(summary.batches, 3000);
    assert!(!summary.stopped);
    let ops = summary.ops;
    for (kind, n) in [
        ("put", ops.put),
        ("delete", ops.delete),
        ("single_delete", ops.single_delete),
        ("merge", ops.merge),
        ("delete_range", ops.delete_range),
    ] {
        assert!(n >= 100, "only {n} {kind} ops: {summary:?}");
    }
    assert_eq!(summary.last_seq, ops.total());
    assert_eq!(summary.large_values, 75);
    assert_eq!(summary.markers, 300);
    assert_eq!(summary.flushes, 12);

    // The database, reopened, holds exactly what the oracle replays to.
    let (db_state, seq) = read_db_state_and_seq(&db)?;
    assert_eq!(seq, summary.last_seq);
    let oracle = Oracle::open(&out)?;
    assert_eq!(oracle.batches().len(), 3000);
    assert_eq!(oracle.last_seq(), seq);
    let expected = oracle.state_at(seq)?;
    assert_same(&expected, &db_state, "reopened database");
    assert_eq!(expected.digest(), summary.digest);
    for name in tidemark_tests::COLUMN_FAMILIES {
        assert!(
            expected.cf(name).unwrap().len() > 50,
            "column family {name} nearly empty"
        );
    }
    let largest = expected
        .cf("users")
        .unwrap()
        .values()
        .chain(expected.cf("events").unwrap().values());
    assert!(largest.map(Vec::len).max().unwrap() > 32 * 1024);

    // Flushes, compactions and WAL rotations really happened.
    let (ssts, _, archived) = count_db_files(&db)?;
    assert!(ssts > 4, "{ssts} SST files");
    assert!(archived > 1, "{archived} WAL files in archive/");
    let live = open_db_read_only(&db)?.live_files()?;
    assert!(
        live.iter().any(|f| f.level > 0),
        "no file below L0: no compaction ran"
    );

    // Time markers: logged, in the oracle, and in the WAL as put_log_data.
    let times = read_times(&out)?;
    assert_eq!(times.len(), 300);
    let marker_batches: Vec<u64> = oracle
        .batches()
        .iter()
        .filter(|b| b.marker)
        .map(|b| b.index)
        .collect();
    assert_eq!(
        marker_batches,
        times.iter().map(|t| t.batch).collect::<Vec<_>>()
    );
    for point in &times {
        let batch = oracle.batches()[point.batch as usize];
        assert_eq!(
            (batch.first_seq, batch.last_seq()),
            (point.first_seq, point.last_seq)
        );
        assert!(oracle.seq_at_time(point.unix_micros) >= point.last_seq);
    }
    let logged: BTreeSet<i64> = times.iter().map(|t| t.unix_micros).collect();
    let in_wal = markers_in_wal(&db)?;
    assert!(
        in_wal.len() >= times.len() * 9 / 10,
        "{} markers in the WAL",
        in_wal.len()
    );
    assert!(in_wal.iter().all(|m| logged.contains(m)));
    Ok(())
}

#[test]
fn checkpoints_mid_run_equal_oracle_state_at_their_seq() -> Result<()> {
    let root = tempfile::tempdir()?;
    let out = root.path().join("oracle");
    let mut generator = Generator::create(&root.path().join("db"), &out, config(11))?;
    let mut checkpoints = Vec::new();
    let mut remembered = Vec::new();
    for n in 1..=1500u64 {
        generator.step()?;
        if n.is_multiple_of(400) {
            let path = root.path().join(format!("checkpoint-{n}"));
            Checkpoint::new(generator.db())?.create_checkpoint(&path)?;
            checkpoints.push((path, generator.last_seq()));
        }
        if n.is_multiple_of(250) {
            remembered.push((generator.last_seq(), generator.state().clone()));
        }
    }
    let final_seq = generator.last_seq();
    let summary = generator.finish(false)?;
    assert_eq!(summary.last_seq, final_seq);

    let oracle = Oracle::open(&out)?;
    let final_state = oracle.state_at(final_seq)?;
    for (path, seq) in &checkpoints {
        let (state, db_seq) = read_db_state_and_seq(path)?;
        assert_eq!(db_seq, *seq, "checkpoint {}", path.display());
        let expected = oracle.state_at(*seq)?;
        assert_same(&expected, &state, &format!("checkpoint at seq {seq}"));
        assert!(
            expected.diff(&final_state).is_some(),
            "state at {seq} equals the final state"
        );
    }
    // One forward replay through every remembered point.
    let mut replay = oracle.replay()?;
    for (seq, state) in &remembered {
        assert_same(
            state,
            replay.advance_to(*seq)?,
            &format!("in-memory state at seq {seq}"),
        );
    }
    Ok(())
}

#[test]
fn same_seed_same_history() -> Result<()> {
    let a = tempfile::tempdir()?;
    let b = tempfile::tempdir()?;
    let c = tempfile::tempdir()?;
    let (db_a, out_a, sum_a) = run_batches(a.path(), 42, 800)?;
    let (_, out_b, sum_b) = run_batches(b.path(), 42, 800)?;
    let (_, _, sum_c) = run_batches(c.path(), 43, 800)?;
    assert_eq!(sum_a.last_seq, sum_b.last_seq);
    assert_eq!(sum_a.ops, sum_b.ops);
    assert_eq!(sum_a.digest, sum_b.digest);
    assert_ne!(sum_a.digest, sum_c.digest);

    let oracle_a = Oracle::open(&out_a)?;
    let oracle_b = Oracle::open(&out_b)?;
    let mid = oracle_a.batches()[399].last_seq();
    assert_eq!(oracle_a.digest_at(mid)?, oracle_b.digest_at(mid)?);
    for i in [0, 1, 399, 799] {
        assert_eq!(
            oracle_a.read_batch(i)?.ops,
            oracle_b.read_batch(i)?.ops,
            "batch {i}"
        );
    }
    assert_eq!(read_db_state(&db_a)?.digest(), sum_b.digest);
    Ok(())
}

#[test]
fn diff_names_a_mutated_key() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (db, out, summary) = run_batches(root.path(), 5, 400)?;
    let expected = Oracle::open(&out)?.state_at(summary.last_seq)?;
    assert_same(&expected, &read_db_state(&db)?, "untouched database");

    let users = expected.cf("users").unwrap();
    let (key, value) = users.iter().nth(users.len() / 2).unwrap();
    {
        let handle = open_db(&db)?;
        let cf = handle.cf_handle("users").context("users")?;
        let mut changed = value.clone();
        changed.push(b'!');
        handle.put_cf(&cf, key, changed)?;
    }
    let actual = read_db_state(&db)?;
    assert_ne!(expected.digest(), actual.digest());
    let difference = expected
        .diff(&actual)
        .context("the change went unnoticed")?;
    assert!(
        difference.contains("`users`") && difference.contains(&show_key(key)),
        "{difference}"
    );

    // A vanished counter is named as missing.
    let (counter, _) = expected.cf("counters").unwrap().iter().next().unwrap();
    {
        let handle = open_db(&db)?;
        let cf = handle.cf_handle("counters").context("counters")?;
        handle.delete_cf(&cf, counter)?;
    }
    let difference = expected
        .diff(&read_db_state(&db)?)
        .context("the delete went unnoticed")?;
    assert!(
        difference.contains("`counters`")
            && difference.contains(&format!("key {} is missing", show_key(counter))),
        "{difference}"
    );
    Ok(())
}

#[test]
fn loadgen_binary_stops_cleanly_on_sigterm() -> Result<()> {
    let root = tempfile::tempdir()?;
    let db = root.path().join("db");
    let out = root.path().join("oracle");
    let child = Command::new(env!("CARGO_BIN_EXE_tidemark-loadgen"))
        .args([
            "--seed",
            "3",
            "--rate",
            "400",
            "--duration",
            "60",
            "--marker-every",
            "5",
        ])
        .arg("--db")
        .arg(&db)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;

    // The oracle can be read while the generator appends to it.
    let started = Instant::now();
    let live = loop {
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no batches after 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(oracle) = Oracle::open(&out)
            && oracle.batches().len() >= 100
        {
            break oracle;
        }
    };
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    ensure!(status.success(), "kill failed");
    let output = child.wait_with_output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["stopped"], true);
    let last_seq = summary["last_seq"].as_u64().context("last_seq")?;
    let batches = summary["batches"].as_u64().context("batches")?;
    assert!(batches >= live.batches().len() as u64);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "did not stop promptly"
    );

    let oracle = Oracle::open(&out)?;
    assert_eq!(oracle.batches().len() as u64, batches);
    assert_eq!(oracle.last_seq(), last_seq);
    let (state, seq) = read_db_state_and_seq(&db)?;
    assert_eq!(seq, last_seq);
    assert_same(&oracle.state_at(seq)?, &state, "database after SIGTERM");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    assert_eq!(written, summary);
    Ok(())
}
