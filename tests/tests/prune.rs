//! Retention with real processes: `tidemark-archiver prune` and the service's `[retention]`
//! against the local-directory store and the S3 server. After pruning, every point the
//! policy keeps restores exactly (compared key by key with the load generator's oracle),
//! points it drops are refused, and the repository holds exactly what its newest manifest
//! generation references: nothing outside it is left behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tidemark_manifest::repo::{RepoState, Repository};
use tidemark_manifest::{exit, keys};
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{
    Proc, TestStore, bin, http_get, logged_metrics_addr, metric_sample, run_with_timeout, wait_for,
    wait_for_database,
};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, read_db_state_and_seq};

/// A directory beside `store`, with an archiver that takes a base every second.
fn setup(store: TestStore) -> Result<Setup> {
    Ok(Setup::new(store)?.base_interval("1s"))
}

/// Writes for `seconds` while an archiver takes a base every second; stops both and
/// returns the oracle.
async fn history_with_many_bases(s: &Setup, seconds: &str, extra: &[&str]) -> Result<Oracle> {
    let writes = [
        "--duration",
        seconds,
        "--rate",
        "300",
        "--seed",
        "21",
        "--flush-every",
        "200",
    ];
    s.archive(&writes, extra).await
}

/// Restores to sequence `seq`: `Ok(None)` when the tool refuses (exit 3), else the
/// restored database's directory.
fn restore(s: &Setup, seq: u64) -> Result<Option<PathBuf>> {
    let dir = s.path(&format!("restore-{seq}"));
    let out = Command::new(bin("tidemark-restore")?)
        .args(["--quiet", "restore", "--json", "--from", &s.store.url])
        .arg("--target")
        .arg(&dir)
        .args(["--seq", &seq.to_string()])
        .envs(s.store.env.iter().map(|(k, v)| (k, v)))
        .output()?;
    match out.status.code() {
        Some(0) => Ok(Some(dir)),
        Some(3) => {
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("refused as expected: {}", err.trim());
            Ok(None)
        }
        code => bail!(
            "restore to {seq} exited {code:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Restores to `seq` and compares with the oracle, key by key.
fn restore_exactly(s: &Setup, oracle: &Oracle, seq: u64) -> Result<()> {
    let dir = restore(s, seq)?.with_context(|| format!("sequence {seq} must be restorable"))?;
    let (state, db_seq) = read_db_state_and_seq(&dir)?;
    ensure!(db_seq == seq, "restored to {db_seq}, asked for {seq}");
    if let Some(d) = oracle.state_at(seq)?.diff(&state) {
        bail!("the database restored to {seq} differs from what was written: {d}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Every key in the store but the lease, which a released holder leaves behind on purpose
/// (expired, marked released) and no sweep ever deletes.
async fn all_keys(repo: &Repository) -> Result<BTreeSet<String>> {
    Ok(repo
        .store()
        .list("")
        .await?
        .into_iter()
        .map(|m| m.key)
        .filter(|k| k != keys::LEASE)
        .collect())
}

/// Every key the current generation references (with its bases' files), plus the
/// repository's own documents.
async fn referenced_keys(repo: &Repository, state: &RepoState) -> Result<BTreeSet<String>> {
    let g = state.generation.as_ref().context("no generation")?;
    let mut out: BTreeSet<String> = [keys::CONFIG, keys::LATEST_HINT]
        .iter()
        .map(|k| k.to_string())
        .collect();
    out.insert(keys::generation_key(g.generation));
    out.extend(g.index_pages.iter().map(|p| p.key.clone()));
    out.extend(state.history.segments.iter().map(|s| s.key.clone()));
    for b in &state.history.bases {
        out.insert(b.descriptor.key.clone());
        let d = repo.read_base(g.generation, b).await?;
        out.extend(d.files.iter().map(|f| f.key.clone()));
    }
    Ok(out)
}

/// A boundary batch end at or after `seq` (restores cut at whole batches).
fn boundary_at_or_after(oracle: &Oracle, seq: u64) -> u64 {
    oracle
        .batches()
        .iter()
        .map(|b| b.first_seq + u64::from(b.count) - 1)
        .find(|&end| end >= seq)
        .unwrap_or(oracle.last_seq())
}

async fn prune_keeps_exactly_what_the_policy_says(store: TestStore) -> Result<()> {
    eprintln!("pruning in {}", store.describe);
    let s = setup(store)?;
    let oracle = history_with_many_bases(&s, "7", &[]).await?;
    let repo = s.store.open().await?;
    let before = repo.load().await?;
    let n = before.history.bases.len();
    ensure!(n >= 4, "expected at least 4 bases to prune from, found {n}");
    let keys_before = all_keys(&repo).await?;

    // Bad policies are refused before anything is touched.
    let (code, _, err) = s.prune(&["--grace", "0s"])?;
    ensure!(
        code == 2 && err.contains("keep_last") && err.contains("pitr_window"),
        "a policy that keeps nothing in particular: exit {code}: {err}"
    );
    let (code, _, err) = s.prune(&["--keep-last", "0"])?;
    ensure!(
        code == 2 && err.contains("at least 1"),
        "keep-last 0: {code}: {err}"
    );

    // A dry run says what would go and changes nothing.
    std::thread::sleep(Duration::from_millis(1500));
    let policy = ["--keep-last", "3", "--pitr-window", "1s", "--grace", "0s"];
    let mut dry = policy.to_vec();
    dry.extend(["--dry-run", "--json"]);
    let (code, out, err) = s.prune(&dry)?;
    ensure!(code == 0, "dry run: exit {code}: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).context("dry run JSON")?;
    ensure!(
        report["mark"]["removed_bases"].as_array().map(Vec::len) == Some(n - 3),
        "the dry run must drop {} bases: {report}",
        n - 3
    );
    ensure!(
        report["sweep"]["deleted"]["WAL segments"]["objects"].as_u64() > Some(0),
        "the dry run must show segments to delete: {report}"
    );
    ensure!(
        all_keys(&repo).await? == keys_before,
        "a dry run changed the repository"
    );

    // The real run: the newest base keeps the window, the two before it their own point.
    let (code, out, err) = s.prune(&policy)?;
    ensure!(code == 0, "prune: exit {code}: {err}");
    eprintln!("{out}");
    let after = repo.load().await.context("the pruned repository loads")?;
    let h = &after.history;
    let mut newest: Vec<_> = before.history.bases.clone();
    newest.sort_by_key(|b| b.created_at);
    let kept_ids: Vec<&str> = newest[n - 3..].iter().map(|b| b.id.as_str()).collect();
    let ids: Vec<&str> = h.bases.iter().map(|b| b.id.as_str()).collect();
    ensure!(
        ids.iter().copied().collect::<BTreeSet<_>>() == kept_ids.iter().copied().collect(),
        "kept {ids:?}, expected the newest three {kept_ids:?}"
    );
    ensure!(
        h.gaps
            .iter()
            .any(|g| g.kind == tidemark_manifest::model::GapKind::Pruned),
        "the holes between the older kept bases are recorded: {:?}",
        h.gaps
    );
    ensure!(
        h.latest_seq() == Some(oracle.last_seq()),
        "the newest point moved"
    );

    // Nothing outside the kept history is left behind.
    let present = all_keys(&repo).await?;
    let referenced = referenced_keys(&repo, &after).await?;
    let extra: Vec<&String> = present.difference(&referenced).collect();
    let missing: Vec<&String> = referenced.difference(&present).collect();
    ensure!(extra.is_empty(), "left behind: {extra:?}");
    ensure!(missing.is_empty(), "referenced but missing: {missing:?}");
    ensure!(present.len() < keys_before.len(), "nothing was deleted");

    // Every kept point restores exactly; dropped points are refused.
    let window = h.window();
    eprintln!("window after pruning: {window}");
    for b in &h.bases {
        restore_exactly(&s, &oracle, b.earliest_seq)?;
    }
    // The continuous range: its ends and points spread over it.
    let last = window.ranges.last().context("no window")?;
    let mut points = vec![last.first_seq, last.last_seq];
    for k in 1..8 {
        let seq = last.first_seq + (last.last_seq - last.first_seq) * k / 8;
        points.push(boundary_at_or_after(&oracle, seq).min(last.last_seq));
    }
    points.sort_unstable();
    points.dedup();
    for seq in points {
        restore_exactly(&s, &oracle, seq)?;
    }
    for g in h.gaps.iter().filter(|g| g.last_seq > g.first_seq) {
        let inside = (g.first_seq + g.last_seq) / 2;
        ensure!(
            restore(&s, inside)?.is_none(),
            "sequence {inside} was pruned but restored"
        );
    }
    let oldest = h.bases.iter().map(|b| b.earliest_seq).min().unwrap();
    if oldest > 2 {
        ensure!(
            restore(&s, oldest / 2)?.is_none(),
            "a point before the oldest kept base restored"
        );
    }

    // Pruning again with the same policy changes nothing.
    let (code, out, err) = s.prune(&policy)?;
    ensure!(code == 0, "second prune: exit {code}: {err}");
    ensure!(
        out.contains("unchanged") && out.contains("deleted now: none"),
        "a second run has nothing to do:\n{out}"
    );
    ensure!(
        all_keys(&repo).await? == present,
        "a second run changed the repository"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_exactly_what_the_policy_says_local() -> Result<()> {
    prune_keeps_exactly_what_the_policy_says(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_exactly_what_the_policy_says_s3() -> Result<()> {
    // Encrypted: pruning reads and deletes through the encryption layer.
    with_s3("prune-policy", |store| {
        prune_keeps_exactly_what_the_policy_says(store.encrypted())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_objects_stay_for_the_grace_period() -> Result<()> {
    let s = setup(TestStore::local()?)?;
    let oracle = history_with_many_bases(&s, "4", &[]).await?;
    let repo = s.store.open().await?;
    let old = repo.load().await?;
    let old_gen = old.generation.clone().context("no generation")?;
    let old_refs = referenced_keys(&repo, &old).await?;
    ensure!(old.history.bases.len() >= 2, "need two bases");

    // Marked, not swept: a restore planned against the old generation finds everything.
    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "1h"])?;
    ensure!(code == 0, "prune: {code}: {err}");
    ensure!(
        out.contains("kept for the grace period"),
        "the report tells what waits for the grace period:\n{out}"
    );
    let present = all_keys(&repo).await?;
    let gone: Vec<&String> = old_refs.difference(&present).collect();
    ensure!(gone.is_empty(), "deleted within the grace period: {gone:?}");
    ensure!(
        repo.read_generation(old_gen.generation).await?.is_some(),
        "the superseded generation is kept for the grace period"
    );
    let now = repo.load().await?;
    ensure!(now.history.bases.len() == 1, "one base is kept");
    restore_exactly(&s, &oracle, oracle.last_seq())?;

    // Once the grace period is over (here: a run with none), they go.
    let (code, _, err) = s.prune(&["--keep-last", "1", "--grace", "0s"])?;
    ensure!(code == 0, "second prune: {code}: {err}");
    let present = all_keys(&repo).await?;
    ensure!(
        present == referenced_keys(&repo, &repo.load().await?).await?,
        "after the grace period only what the newest generation references is left"
    );
    ensure!(repo.read_generation(old_gen.generation).await?.is_none());
    restore_exactly(&s, &oracle, oracle.last_seq())?;

    // `status` and `prune` find one database's repository in a config that lists several.
    let config = s.path("many.toml");
    std::fs::write(
        &config,
        format!(
            "[[databases]]\nname = \"orders\"\ndb = \"{}\"\nto = \"{}\"\n\
             [[databases]]\nname = \"other\"\ndb = \"/nonexistent/other\"\n\
             to = \"file:///nonexistent/other\"\n",
            s.db().display(),
            s.store.url
        ),
    )?;
    let config = config.display().to_string();
    let status = |extra: &[&str]| -> Result<(i32, String, String)> {
        let mut a: Vec<String> = ["status", "--config", &config, "--json"]
            .map(String::from)
            .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        run_with_timeout(
            &bin("tidemark-archiver")?,
            &a,
            &s.store.env,
            Duration::from_secs(60),
        )
    };
    let (code, out, err) = status(&["--database", "orders"])?;
    ensure!(code == 0, "status --database orders: exit {code}: {err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(report["bases"].as_u64() == Some(1), "{report}");
    let (code, _, err) = status(&[])?;
    ensure!(
        code == 2 && err.contains("--database NAME"),
        "status without --database: exit {code}: {err}"
    );
    let (code, _, err) = s.prune(&[
        "--config",
        &config,
        "--database",
        "orders",
        "--dry-run",
        "--keep-last",
        "1",
    ])?;
    ensure!(code == 0, "prune --database orders: exit {code}: {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_applies_its_retention_policy_and_prune_refuses_while_it_runs() -> Result<()> {
    let s = setup(TestStore::local()?)?;
    let config = s.path("archiver.toml");
    std::fs::write(
        &config,
        "[retention]\nkeep_last = 2\ninterval = \"1s\"\ngrace = \"1s\"\n",
    )?;
    let config_arg = config.display().to_string();
    let mut writer = s.loadgen(&["--duration", "8", "--rate", "300"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver(
        "service.log",
        &["--config", &config_arg, "--metrics-addr", "127.0.0.1:0"],
    )?;
    let root = s.store.local_root().context("local store")?;
    wait_for(Duration::from_secs(90), "the lease", || {
        root.join(keys::LEASE).exists().then_some(())
    })
    .with_context(|| arch.log_tail())?;

    // While the service holds the repository, `prune` refuses (a dry run is fine).
    let (code, _, err) = s.prune(&["--keep-last", "1"])?;
    ensure!(
        code == i32::from(exit::LEASE_HELD)
            && err.contains("another archiver")
            && err.contains("[retention]"),
        "prune beside a running archiver: exit {code}: {err}"
    );
    let (code, out, err) = s.prune(&["--keep-last", "1", "--dry-run"])?;
    ensure!(
        code == 0,
        "a dry run beside a running archiver: exit {code}: {err}"
    );
    ensure!(
        out.contains("is writing to this repository"),
        "a dry run beside a running archiver says so:\n{out}"
    );

    writer.wait_success(Duration::from_secs(90))?;
    let oracle = s.oracle()?;
    let repo = s.store.open().await?;
    // Wait for the newest point, then for one more retention run after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(st) = repo.load().await
            && st.history.latest_seq() == Some(oracle.last_seq())
            && st.history.bases.len() <= 2
            && st
                .generation
                .as_ref()
                .is_some_and(|g| g.retention.last_prune.is_some())
        {
            break;
        }
        ensure!(
            arch.running() && std::time::Instant::now() < deadline,
            "the service did not prune to two bases; log:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The metrics tell that retention runs and what it deleted.
    // (The sweep runs in the background after the mark: wait for its first report.)
    let addr = logged_metrics_addr(&s.path("service.log")).context("the metrics address")?;
    wait_for(Duration::from_secs(90), "retention metrics", || {
        let (_, _, body) = http_get(addr, "/metrics").ok()?;
        let deleted = metric_sample(&body, "tidemark_pruned_objects_total")?;
        let last = metric_sample(&body, "tidemark_last_prune_timestamp_seconds")?;
        (deleted > 0.0 && last > 0.0).then_some(())
    })
    .with_context(|| arch.log_tail())?;
    // The service deletes what it dropped: once the sweeps after the last mark have run,
    // the store holds a directory for each kept base and no other. (A base still running
    // or a sweep still in its grace period makes a moment's difference: wait for it to
    // settle rather than sample once.)
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let kept = repo.load().await?.history.bases.len();
        let dirs = std::fs::read_dir(root.join("bases"))?.count();
        if dirs == kept {
            break;
        }
        ensure!(
            arch.running() && std::time::Instant::now() < deadline,
            "{dirs} base directories for {kept} bases: dropped bases were not deleted; log:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    arch.stop(Duration::from_secs(30))?;
    let log = std::fs::read_to_string(s.path("service.log"))?;
    ensure!(log.contains("retention applied"), "no retention run logged");
    let state = repo.load().await?;
    ensure!(
        state.history.bases.len() <= 3,
        "{} bases",
        state.history.bases.len()
    );
    restore_exactly(&s, &oracle, oracle.last_seq())?;
    let oldest = state
        .history
        .bases
        .iter()
        .map(|b| b.earliest_seq)
        .min()
        .unwrap();
    restore_exactly(&s, &oracle, oldest)?;
    Ok(())
}

/// Rewrites every table file of the stopped database with a full compaction (its data and
/// sequence numbers stay; the new files are in no base), then stores their contents under
/// their keys, as a base backup abandoned after its uploads leaves them. Returns the keys.
async fn tables_of_an_abandoned_base(s: &Setup, repo: &Repository) -> Result<Vec<String>> {
    {
        let db = tidemark_tests::open_db(&s.db())?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for name in tidemark_tests::COLUMN_FAMILIES {
            let cf = db.cf_handle(name).context("a column family")?;
            db.compact_range_cf_opt(&cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
    }
    let referenced = referenced_keys(repo, &repo.load().await?).await?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(s.db())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sst") {
            let (sha, _) = tidemark_manifest::checksum::sha256_file(&path)?;
            let key = keys::sst_key(&sha);
            if !referenced.contains(&key) {
                repo.store().put_file(&key, &path).await?;
                out.push(key);
            }
        }
    }
    ensure!(
        !out.is_empty(),
        "the compaction made table files no base lists"
    );
    Ok(out)
}

/// Every object the newest base lists is in the store, with the content it names.
async fn newest_base_is_whole(repo: &Repository) -> Result<()> {
    let state = repo.load().await?;
    let g = state.generation.as_ref().context("no generation")?;
    let newest = g
        .bases
        .iter()
        .max_by_key(|b| b.created_at)
        .context("no base")?;
    let d = repo.read_base(g.generation, newest).await?;
    for f in &d.files {
        let bytes = repo
            .store()
            .get(&f.key)
            .await
            .with_context(|| format!("the newest base {} lists {}", newest.id, f.key))?;
        ensure!(
            tidemark_manifest::checksum::sha256_hex(&bytes) == f.sha256,
            "{} does not hold what the newest base {} lists",
            f.key,
            newest.id
        );
    }
    Ok(())
}

/// A history, objects of an abandoned base, and `prune` holding still between its listing
/// (which finds them unreferenced) and its deletions. Lease time to live: 10 s, the shortest
/// the archiver accepts.
struct HeldSweep {
    s: Setup,
    oracle: Oracle,
    repo: Repository,
    config: String,
    hold: PathBuf,
    prune: Proc,
}

impl HeldSweep {
    async fn start() -> Result<HeldSweep> {
        let s = setup(TestStore::local()?)?;
        let oracle = history_with_many_bases(&s, "3", &[]).await?;
        let repo = s.store.open().await?;
        tables_of_an_abandoned_base(&s, &repo).await?;
        let config = s.path("short-lease.toml");
        std::fs::write(
            &config,
            "lease_ttl = \"10s\"\nbase_at_start = true\nexit_when_caught_up = true\n",
        )?;
        let config = config.display().to_string();
        let hold = s.path("sweep-hold");
        let mut env = s.store.env.clone();
        env.push((
            "TIDEMARK_DRILL_SWEEP_HOLD".into(),
            hold.display().to_string(),
        ));
        let args = [
            "prune",
            "--to",
            &s.store.url,
            "--config",
            &config,
            "--keep-last",
            "100",
            "--grace",
            "0s",
        ]
        .map(String::from);
        let prune = Proc::spawn(
            &bin("tidemark-archiver")?,
            &args,
            &env,
            &s.path("prune.log"),
        )?;
        wait_for(Duration::from_secs(60), "the sweep's listing", || {
            hold.exists().then_some(())
        })
        .with_context(|| prune.log_tail())?;
        Ok(HeldSweep {
            s,
            oracle,
            repo,
            config,
            hold,
            prune,
        })
    }

    /// A one-shot archiver run that takes a base backup: exit code and stderr.
    fn base_backup(&self) -> Result<(i32, String)> {
        let a = [
            "run",
            "--db",
            &self.s.db().display().to_string(),
            "--to",
            &self.s.store.url,
            "--config",
            &self.config,
        ];
        let (code, _, err) = self.s.run("tidemark-archiver", &a)?;
        Ok((code, err))
    }

    /// The newest base holds together and restores exactly.
    async fn check_newest_base(&self) -> Result<()> {
        newest_base_is_whole(&self.repo).await?;
        restore_exactly(&self.s, &self.oracle, self.oracle.last_seq())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_base_backup_runs_while_prune_sweeps_however_long_it_takes() -> Result<()> {
    let mut h = HeldSweep::start().await?;
    // More than a lease lifetime passes while the sweep holds its listing.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (code, err) = h.base_backup()?;
    ensure!(
        code == i32::from(exit::LEASE_HELD) && err.contains("another archiver"),
        "a base backup started while prune was sweeping (exit {code}): {err}"
    );
    std::fs::remove_file(&h.hold)?;
    ensure!(
        h.prune.wait_timeout(Duration::from_secs(60))?.success(),
        "prune:\n{}",
        h.prune.log_tail()
    );
    // The sweep deleted the abandoned objects; the next base uploads its files again.
    let (code, err) = h.base_backup()?;
    ensure!(code == 0, "base backup after the sweep: exit {code}: {err}");
    h.check_newest_base().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_that_lost_its_lease_deletes_nothing_more() -> Result<()> {
    let mut h = HeldSweep::start().await?;
    // The pruner stalls (a paused process, a partition) past its lease's expiry; an
    // archiver takes the lease over and takes a base that needs the abandoned base's files.
    h.prune.signal("STOP")?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let taken = h.base_backup();
    h.prune.signal("CONT")?;
    let (code, err) = taken?;
    ensure!(
        code == 0,
        "base backup after the lease expired: exit {code}: {err}"
    );
    std::fs::remove_file(&h.hold)?;
    let status = h.prune.wait_timeout(Duration::from_secs(60))?;
    ensure!(
        status.code() == Some(exit::LEASE_HELD.into()),
        "prune must stop deleting once its lease is lost ({status}):\n{}",
        h.prune.log_tail()
    );
    h.check_newest_base().await
}

#[test]
fn the_config_examples_parse() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("scripts/archiver.example.toml"))?;
    ensure!(
        text.contains("[retention]"),
        "the example shows a retention policy"
    );
    let out = Command::new(bin("tidemark-archiver")?)
        .args(["prune", "--config"])
        .arg(root.join("scripts/archiver.example.toml"))
        .args(["--to", "file:///nonexistent/tidemark-example", "--dry-run"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    // The policy parses and validates; then the repository is found missing.
    ensure!(
        !err.contains("invalid") && err.contains("/nonexistent/tidemark-example"),
        "the example config: {err}"
    );
    Ok(())
}
