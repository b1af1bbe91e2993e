//! The archiver's metrics endpoint, scraped over plain TCP while the load generator writes
//! to the database in another process: every metric is declared with HELP and TYPE, the
//! counters and sequences move with the writes, the lag is consistent with what is read and
//! durable in every scrape and returns to 0 once everything written is archived, and the
//! final numbers agree with what the repository holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tidemark_archiver::metrics::{FAMILIES, Kind, Scope};
use tidemark_manifest::model::micros_from_time;
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{
    TestStore, bin, http_get, logged_metrics_addr, wait_for, wait_for_database,
};
use tidemark_tests::setup::Setup;

/// A scrape: the samples by series (`name` or `name{labels}`).
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from the scrape"))
    }
}

/// Scrapes `/metrics` and checks the exposition: the content type, HELP and TYPE for every
/// family the archiver exports, no sample outside a declared family.
fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let (status, head, body) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}: {head}\n{body}");
    ensure!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "not the text exposition format: {head}"
    );
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE line")?;
            types.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with("# HELP ") {
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("sample line {line:?}"))?;
            let name = series.split('{').next().unwrap_or(series);
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            ensure!(
                types.contains_key(family),
                "sample {line:?} before its TYPE line"
            );
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().with_context(|| format!("value in {line:?}"))?,
            };
            samples.insert(series.to_owned(), v);
        }
    }
    // Every family of one database's archiver (the fleet's are shown with several).
    for family in FAMILIES.iter().filter(|f| f.scope != Scope::Fleet) {
        let (name, kind) = (family.name, family.kind.as_str());
        ensure!(
            body.contains(&format!("\n# HELP {name} "))
                || body.starts_with(&format!("# HELP {name} ")),
            "no HELP line for {name}"
        );
        ensure!(
            types.get(name).map(String::as_str) == Some(kind),
            "{name} must be a {kind}, TYPE says {:?}",
            types.get(name)
        );
    }
    Ok(Scrape { samples })
}

/// Sequence numbers, counters and the lag must agree with each other in every scrape, and
/// never go back between two scrapes of the same process.
fn check_consistent(s: &Scrape, before: Option<&Scrape>) -> Result<()> {
    let lag = s.get("tidemark_archive_lag_seconds");
    let read = s.get("tidemark_newest_read_sequence");
    let durable = s.get("tidemark_newest_durable_sequence");
    ensure!(lag >= 0.0, "negative lag {lag}");
    ensure!(durable <= read, "durable {durable} beyond read {read}");
    // The lag counts the oldest record read but not durable: none waits when all is durable.
    ensure!(
        lag == 0.0 || read > durable,
        "lag {lag} while everything read ({read}) is durable ({durable})"
    );
    ensure!(s.get("tidemark_lease_held") == 1.0, "the lease is held");
    ensure!(s.get("tidemark_gaps_detected_total") == 0.0);
    ensure!(s.get("tidemark_upload_failures_total") == 0.0);
    if let Some(b) = before {
        for name in [
            "tidemark_newest_read_sequence",
            "tidemark_newest_durable_sequence",
            "tidemark_archived_records_total",
            "tidemark_archived_bytes_total",
            "tidemark_segments_uploaded_total",
            "tidemark_manifest_generation",
        ] {
            ensure!(
                s.get(name) >= b.get(name),
                "{name} went back from {} to {}",
                b.get(name),
                s.get(name)
            );
        }
    }
    Ok(())
}

async fn metrics_follow_a_live_database(store: TestStore) -> Result<()> {
    eprintln!("archiving into {}", store.describe);
    // A segment stays open a second after its first record: records wait that long.
    let s = Setup::new(store)?.sync_interval("1s");
    // Writes slowly until told to stop.
    let mut writer = s.loadgen(&["--rate", "40", "--seed", "13"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &["--metrics-addr", "127.0.0.1:0"])?;
    let log = arch.log.clone();
    let addr = wait_for(
        Duration::from_secs(30),
        "\"metrics listening on\" in the archiver's log",
        || logged_metrics_addr(&log),
    )
    .with_context(|| arch.log_tail())?;
    ensure!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    // Healthy once running.
    wait_for(Duration::from_secs(30), "/health to answer 200", || {
        http_get(addr, "/health")
            .ok()
            .filter(|(status, _, body)| *status == 200 && body == "ok\n")
    })
    .with_context(|| arch.log_tail())?;
    let (status, _, _) = http_get(addr, "/nothing-here")?;
    ensure!(status == 404, "an unknown path answered {status}");

    // While the writer writes: scrape until records and sequences have moved and a record
    // was seen waiting. The writer goes on until then, so all three come.
    let first = scrape(addr)?;
    check_consistent(&first, None)?;
    let mut last = first;
    let (mut records_moved, mut durable_moved, mut lag_seen) = (false, false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut scrapes = 1;
    while !(records_moved && durable_moved && lag_seen) {
        ensure!(
            arch.running(),
            "the archiver exited; its log:\n{}",
            arch.log_tail()
        );
        ensure!(
            writer.running(),
            "the load generator exited; its log:\n{}",
            writer.log_tail()
        );
        ensure!(
            std::time::Instant::now() < deadline,
            "after {scrapes} scrapes: records moved {records_moved}, durable sequence moved \
             {durable_moved}, lag seen {lag_seen}; archiver log:\n{}",
            arch.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
        let s = scrape(addr)?;
        scrapes += 1;
        check_consistent(&s, Some(&last)).with_context(|| format!("scrape {scrapes}"))?;
        records_moved |= s.get("tidemark_archived_records_total")
            > last.get("tidemark_archived_records_total")
            && last.get("tidemark_archived_records_total") > 0.0;
        durable_moved |= s.get("tidemark_newest_durable_sequence")
            > last.get("tidemark_newest_durable_sequence")
            && last.get("tidemark_newest_durable_sequence") > 0.0;
        lag_seen |= s.get("tidemark_archive_lag_seconds") > 0.0;
        last = s;
    }
    eprintln!("metrics moved with the writes after {scrapes} scrapes");

    // The writer stops; everything it wrote becomes durable and nothing waits any more.
    writer.stop(Duration::from_secs(60))?;
    let oracle = s.oracle()?;
    let last_seq = oracle.last_seq() as f64;
    let done = {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let s = scrape(addr)?;
            check_consistent(&s, Some(&last))?;
            if s.get("tidemark_newest_durable_sequence") == last_seq
                && s.get("tidemark_base_backups_total") >= 1.0
            {
                break s;
            }
            ensure!(
                s.get("tidemark_newest_durable_sequence") < last_seq,
                "durable sequence {} beyond the writer's last {last_seq}",
                s.get("tidemark_newest_durable_sequence")
            );
            ensure!(
                std::time::Instant::now() < deadline,
                "the durable sequence did not reach {last_seq}: {:?}; archiver log:\n{}",
                s.samples,
                arch.log_tail()
            );
            last = s;
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    ensure!(
        done.get("tidemark_archive_lag_seconds") == 0.0,
        "lag {} with everything written durable",
        done.get("tidemark_archive_lag_seconds")
    );
    ensure!(done.get("tidemark_newest_read_sequence") == last_seq);

    // The numbers agree with the repository (every segment in it was uploaded by this
    // process, and none is uploaded after the last sequence).
    let repo = s.store.open().await?;
    let state = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state = repo.load().await?;
            if state.history.segments.last().map(|s| s.last_seq as f64) == Some(last_seq)
                && !state.history.bases.is_empty()
            {
                break state;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "the repository does not show sequence {last_seq} and a base"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let segments = &state.history.segments;
    let sum = |f: fn(&tidemark_manifest::model::SegmentEntry) -> u64| -> f64 {
        segments.iter().map(f).sum::<u64>() as f64
    };
    for (name, expected) in [
        (
            "tidemark_archived_records_total",
            sum(|s| u64::from(s.record_count)),
        ),
        ("tidemark_archived_bytes_total", sum(|s| s.raw_size)),
        ("tidemark_stored_bytes_total", sum(|s| s.stored_size)),
        ("tidemark_segments_uploaded_total", segments.len() as f64),
        (
            "tidemark_segment_upload_duration_seconds_count",
            segments.len() as f64,
        ),
        (
            "tidemark_newest_durable_record_timestamp_seconds",
            micros_from_time(segments.last().unwrap().last_time) as f64 / 1e6,
        ),
    ] {
        ensure!(
            done.get(name) == expected,
            "{name} is {}, the repository says {expected}",
            done.get(name)
        );
    }
    let generation = state.generation.as_ref().map_or(0, |g| g.generation) as f64;
    ensure!(
        (1.0..=generation).contains(&done.get("tidemark_manifest_generation")),
        "manifest generation {} scraped before the repository showed {generation}",
        done.get("tidemark_manifest_generation")
    );
    // The base the repository shows was taken by this process, before it was recorded.
    let after = scrape(addr)?;
    let newest_base = state.history.bases.iter().map(|b| b.created_at).max();
    ensure!(
        after.get("tidemark_last_base_backup_timestamp_seconds")
            == micros_from_time(newest_base.unwrap()) as f64 / 1e6,
        "last base backup at {}, the repository's newest is {newest_base:?}",
        after.get("tidemark_last_base_backup_timestamp_seconds")
    );
    let newest_base_seq = state.history.bases.iter().map(|b| b.earliest_seq).max();
    ensure!(
        Some(after.get("tidemark_last_base_backup_sequence") as u64) == newest_base_seq,
        "last base backup sequence {}, the repository's newest is {newest_base_seq:?}",
        after.get("tidemark_last_base_backup_sequence")
    );
    ensure!(after.get("tidemark_base_backup_duration_seconds") > 0.0);
    ensure!(after.get("tidemark_last_segment_upload_timestamp_seconds") > 0.0);
    // The WAL since the newest base and the newest point's predicted restore time are the
    // repository's, by the format crate's rule (the archiver predicts with the defaults).
    let base_seq = newest_base_seq.context("a base")?;
    let since = segments.iter().filter(|s| s.last_seq > base_seq);
    let since_bytes: u64 = since.clone().map(|s| s.stored_size).sum();
    let since_records: u64 = since.map(|s| u64::from(s.record_count)).sum();
    ensure!(
        after.get("tidemark_wal_bytes_since_base") == since_bytes as f64
            && after.get("tidemark_wal_records_since_base") == since_records as f64,
        "WAL since the base: {} bytes, {} records scraped; the repository has {since_bytes}, \
         {since_records}",
        after.get("tidemark_wal_bytes_since_base"),
        after.get("tidemark_wal_records_since_base")
    );
    let predicted = state
        .history
        .latest_cost(&tidemark_manifest::plan::RestoreRates::default())
        .context("a restorable point")?;
    let scraped_ms = after.get("tidemark_predicted_restore_seconds") * 1000.0;
    ensure!(
        scraped_ms > 0.0 && (scraped_ms - predicted.predicted_ms as f64).abs() <= 1.0,
        "predicted restore time {scraped_ms} ms scraped, the repository's is {predicted:?}"
    );

    let (status, _, body) = http_get(addr, "/health")?;
    ensure!(status == 200 && body == "ok\n", "/health: {status} {body}");
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_live_database_local() -> Result<()> {
    metrics_follow_a_live_database(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_live_database_s3() -> Result<()> {
    with_s3("metrics-live", metrics_follow_a_live_database).await
}

/// A database writing a thousand small batches a second does not wake the archiver once
/// per batch: while a segment is open, changes are gathered for 100 ms (the sync interval
/// when it is shorter). Over a few seconds the WAL is read a few dozen times a second at
/// most (the window, the poll interval and each segment's start and close), while
/// thousands of batches are archived.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_database_wakes_the_archiver_a_few_times_a_window_not_per_write() -> Result<()> {
    busy_database_wakes("1s", 30.0).await
}

/// The same with a 100 ms sync interval: a few times per segment (its start, around its
/// close) and at the poll ticks, about 30 times a second. A window of a tenth of the
/// interval read it about a hundred times a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_sync_interval_gathers_changes_for_its_whole_length() -> Result<()> {
    busy_database_wakes("100ms", 60.0).await
}

async fn busy_database_wakes(sync_interval: &str, max_reads_per_sec: f64) -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.sync_interval(sync_interval);
    let mut writer = s.loadgen(&["--rate", "1000", "--seed", "17"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver("archiver.log", &["--metrics-addr", "127.0.0.1:0"])?;
    let log = arch.log.clone();
    let addr = wait_for(Duration::from_secs(30), "the metrics address", || {
        logged_metrics_addr(&log)
    })
    .with_context(|| arch.log_tail())?;
    wait_for(Duration::from_secs(30), "records archived", || {
        scrape(addr)
            .ok()
            .filter(|s| s.get("tidemark_archived_records_total") > 0.0)
    })
    .with_context(|| arch.log_tail())?;
    let before = scrape(addr)?;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = scrape(addr)?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        writer.running(),
        "the load generator stopped:\n{}",
        writer.log_tail()
    );
    let reads = after.get("tidemark_wal_reads_total") - before.get("tidemark_wal_reads_total");
    let seqs =
        after.get("tidemark_newest_read_sequence") - before.get("tidemark_newest_read_sequence");
    eprintln!("{reads} reads of the WAL for {seqs} sequence numbers in {seconds:.1} s");
    ensure!(
        seqs >= 1000.0,
        "the writer wrote too little to tell ({seqs} sequence numbers in {seconds:.1} s)"
    );
    ensure!(
        reads <= max_reads_per_sec * seconds,
        "{reads} reads of the WAL in {seconds:.1} s for {seqs} sequence numbers: changes are \
         not gathered while a segment is open"
    );
    arch.stop(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn a_metrics_address_in_use_is_refused_with_exit_code_2() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(bin("tidemark-archiver")?)
        .args([
            "run",
            "--db",
            &dir.path().join("db").display().to_string(),
            "--to",
            &format!("file://{}", dir.path().join("repo").display()),
            "--metrics-addr",
            &addr.to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && text.contains(&addr.to_string()),
        "{:?}: {text}",
        out.status
    );
    Ok(())
}

/// The metric names the README and the operations guide mention (the table of metrics, the
/// alert rules) are the names the archiver exports, with the type the table gives: a
/// renamed metric cannot leave a documented alert querying nothing.
#[test]
fn the_documented_metric_names_are_the_exported_ones() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let guide = std::fs::read_to_string(root.join("docs/operations.md"))?;
    let mut documented = BTreeSet::new();
    for text in [&readme, &guide] {
        for (at, _) in text.match_indices("tidemark_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // A Rust path (`tidemark_manifest::…`) is no metric.
            if !text[at + name.len()..].starts_with("::") {
                documented.insert(name);
            }
        }
    }
    let exported = |name: &str| {
        FAMILIES.iter().any(|f| {
            f.name == name
                || (f.kind == Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.name)))
        })
    };
    // The warm standby (`tidemark-restore follow`) exports its own families.
    let standby: BTreeSet<String> = tidemark_restore::metrics::FollowMetrics::default()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next())
        .map(str::to_owned)
        .collect();
    ensure!(
        !standby.is_empty(),
        "the standby's metrics rendered no sample"
    );
    for name in &documented {
        if name.starts_with("tidemark_standby_") {
            ensure!(
                standby.contains(name),
                "{name} is documented but the standby does not export it"
            );
            continue;
        }
        ensure!(exported(name), "{name} is documented but not exported");
    }
    for name in &standby {
        ensure!(
            documented.contains(name),
            "{name} is exported by the standby but not documented"
        );
    }
    for family in FAMILIES {
        ensure!(
            documented.contains(family.name),
            "{} is exported but not documented",
            family.name
        );
        if family.scope == Scope::Fleet {
            continue; // described in the text on several databases, not in the table
        }
        let row = readme
            .lines()
            .find(|l| l.starts_with("| ") && l.contains(&format!("`{}`", family.name)))
            .with_context(|| format!("no row for {} in the README's table", family.name))?;
        let kind = row.split('|').nth(2).map(str::trim);
        ensure!(
            kind == Some(family.kind.as_str()),
            "the README says {} is a {kind:?}, it is a {}",
            family.name,
            family.kind.as_str()
        );
    }
    Ok(())
}
