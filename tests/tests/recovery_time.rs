//! Bases scheduled by the WAL a restore would replay (`--max-replay`), and predicted restore
//! times: a steady writer (the load generator) and the archiver with a base interval far
//! longer than the run, so that only the replay bound explains the bases it takes; then
//! `list` and `drill` on the repository it leaves, against the local store and S3.

use anyhow::{Context, Result, ensure};
use tidemark_manifest::model::{BaseSummary, SegmentEntry};
use tidemark_manifest::plan::{RestoreCost, RestoreRates, Target};
use tidemark_tests::harness::{TestStore, check_history, with_s3};
use tidemark_tests::setup::Setup;

/// What the bound counts of a segment: stored bytes, or WAL records.
type Measure = fn(&SegmentEntry) -> u64;

fn stored_bytes(s: &SegmentEntry) -> u64 {
    s.stored_size
}

fn records(s: &SegmentEntry) -> u64 {
    u64::from(s.record_count)
}

/// Between consecutive bases `a` and `b` (and after the newest one), the WAL a restore
/// replays beyond `a`'s point stays under the bound, give or take what the trigger cannot
/// see coming. The trigger counts whole segments as they are uploaded, so:
/// - before the upload that crosses the bound, the segments after `a`'s point are at most
///   `limit`;
/// - the crossing segment itself adds one segment;
/// - the base starts at once, and its point is the end of the WAL as its copy reads it:
///   records written meanwhile are in the segment open at the crossing, which a restore to
///   just before `b`'s point downloads whole: one more segment.
///
/// A segment holds at most one sync interval of WAL (it is closed that long after its first
/// record), so the tolerance is the two largest segments of the stretch: at most two sync
/// intervals' worth at the rate the database was written at that moment.
fn check_bound(
    bases: &[BaseSummary],
    segments: &[SegmentEntry],
    limit: u64,
    measure: Measure,
) -> Result<()> {
    let mut points: Vec<u64> = bases.iter().map(|b| b.earliest_seq).collect();
    points.sort_unstable();
    points.push(u64::MAX);
    for w in points.windows(2) {
        let (from, to) = (w[0], w[1]);
        let stretch: Vec<u64> = segments
            .iter()
            .filter(|s| s.last_seq > from && s.first_seq <= to)
            .map(measure)
            .collect();
        let total: u64 = stretch.iter().sum();
        let mut largest = stretch.clone();
        largest.sort_unstable_by(|a, b| b.cmp(a));
        let tolerance: u64 = largest.iter().take(2).sum();
        ensure!(
            total <= limit + tolerance,
            "between the bases at {from} and {to}: {total} replayed beyond the base's point, \
             more than the bound {limit} + {tolerance} (the two largest segments of {}: {:?})",
            stretch.len(),
            &largest[..largest.len().min(2)]
        );
        eprintln!(
            "bases at {from} .. {to}: {total} in {} segments (bound {limit}, tolerance {tolerance})",
            stretch.len()
        );
    }
    Ok(())
}

/// Archives a steady writer with `--max-replay BOUND` and a one-hour base interval; checks
/// the bases it took keep the replay under the bound.
async fn bases_bound_the_replay(
    store: TestStore,
    bound: &str,
    limit: u64,
    measure: Measure,
) -> Result<Setup> {
    eprintln!(
        "archiving into {} with --max-replay {bound}",
        store.describe
    );
    let s = Setup::new(store)?.base_interval("1h");
    let oracle = s
        .archive(
            &["--duration", "10", "--rate", "400", "--seed", "5"],
            &["--max-replay", bound],
        )
        .await?;
    check_history(&s.store, &oracle, 3).await?;
    let state = s.store.open().await?.load().await?;
    let h = &state.history;
    // The first base is taken at start (the repository had none); the schedule's next one
    // is an hour away: the others are the bound's.
    let log = std::fs::read_to_string(s.path("archiver.log"))?;
    let early = log.matches("taking a base backup early").count();
    ensure!(
        early >= 2 && h.bases.len() > early,
        "{} bases, {early} taken for the bound:\n{log}",
        h.bases.len()
    );
    check_bound(&h.bases, &h.segments, limit, measure)?;
    Ok(s)
}

/// `list` shows the predicted restore time of the newest point and the worst point, and
/// what they are made of, as the format crate predicts it with the rates given.
async fn list_shows_the_prediction(s: &Setup) -> Result<()> {
    let url = &s.programs_store().url;
    let args = [
        "list",
        "--from",
        url,
        "--download-rate",
        "10MB/s",
        "--replay-rate",
        "20000",
    ];
    let (code, out, _) = s.run("tidemark-restore", &args)?;
    ensure!(code == 0, "list: exit {code}");
    ensure!(
        out.contains("Predicted restore time (at 9.5 MiB/s download, 20000 WAL records/s replay):"),
        "{out}"
    );
    let line = |label: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(str::to_owned)
            .with_context(|| format!("no {label} line in\n{out}"))
    };
    for label in ["latest ", "worst "] {
        let l = line(label)?;
        ensure!(
            l.contains("sequence ") && l.contains("of WAL") && l.contains("records to replay"),
            "{l}"
        );
    }

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let (code, out, _) = s.run("tidemark-restore", &json_args)?;
    ensure!(code == 0, "list --json: exit {code}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let t = &v["restore_time"];
    ensure!(t["rates"]["download_bytes_per_sec"] == 10_000_000, "{t}");
    ensure!(t["rates"]["replay_records_per_sec"] == 20_000, "{t}");
    // The same figures as the format crate's own prediction from the same reading.
    let state = s.store.open().await?.load().await?;
    let rates = RestoreRates {
        download_bytes_per_sec: 10_000_000,
        replay_records_per_sec: 20_000,
    };
    let latest = state.history.cost_of(Target::Latest, &rates)?;
    let newest_base = state
        .history
        .bases
        .iter()
        .max_by_key(|b| b.earliest_seq)
        .context("a base")?;
    ensure!(t["latest"]["seq"] == latest.seq, "{t}");
    ensure!(t["latest"]["base"] == newest_base.id.as_str(), "{t}");
    ensure!(t["latest"]["base_bytes"] == newest_base.total_size, "{t}");
    ensure!(t["latest"]["wal_bytes"] == latest.cost.wal_bytes, "{t}");
    ensure!(t["latest"]["wal_records"] == latest.cost.wal_records, "{t}");
    ensure!(t["latest"]["predicted_ms"] == latest.predicted_ms, "{t}");
    ensure!(
        latest.predicted_ms > 0 && latest.cost.wal_records > 0,
        "{t}"
    );
    let worst_ms = t["worst"]["predicted_ms"].as_u64().context("worst")?;
    ensure!(worst_ms >= latest.predicted_ms, "{t}");
    ensure!(
        t["worst"]["wal_records"].as_u64() > Some(0) && t["worst"]["seq"].as_u64() > Some(0),
        "{t}"
    );
    Ok(())
}

/// A drill reports its prediction beside what it achieved, and the rates it measured.
fn drill_reports_predicted_and_achieved(s: &Setup) -> Result<()> {
    let scratch = s.path("drill");
    std::fs::create_dir_all(&scratch)?;
    let url = &s.programs_store().url;
    let scratch = scratch.display().to_string();
    let args = ["drill", "--from", url, "--scratch", &scratch, "--json"];
    let (code, out, _) = s.run("tidemark-restore", &args)?;
    ensure!(code == 0, "drill: exit {code}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let p = &v["prediction"];
    let positive = |x: &serde_json::Value| x.as_f64().is_some_and(|x| x > 0.0);
    ensure!(positive(&p["predicted"]["predicted_ms"]), "{p}");
    ensure!(positive(&p["achieved_ms"]), "{p}");
    ensure!(positive(&p["achieved_over_predicted"]), "{p}");
    ensure!(positive(&p["measured"]["download_bytes_per_sec"]), "{p}");
    ensure!(positive(&p["measured"]["replay_records_per_sec"]), "{p}");
    ensure!(
        p["rates"]["download_bytes_per_sec"] == RestoreRates::DEFAULT_DOWNLOAD_BYTES_PER_SEC,
        "{p}"
    );
    ensure!(
        p["predicted"]["seq"] == v["rpo"]["restored_seq"],
        "the prediction is of the restored point: {v}"
    );
    let (code, out, _) = s.run("tidemark-restore", &args[..5])?;
    ensure!(code == 0, "drill: exit {code}");
    ensure!(
        out.contains("  predicted     ") && out.contains("achieved") && out.contains("  measured"),
        "{out}"
    );
    Ok(())
}

async fn bounded_by_bytes(store: TestStore) -> Result<()> {
    let s = bases_bound_the_replay(store, "1MiB", 1 << 20, stored_bytes).await?;
    list_shows_the_prediction(&s).await?;
    drill_reports_predicted_and_achieved(&s)
}

#[tokio::test(flavor = "multi_thread")]
async fn bases_bound_the_replay_in_bytes_local() -> Result<()> {
    bounded_by_bytes(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bases_bound_the_replay_in_bytes_s3() -> Result<()> {
    with_s3("rto-bytes", bounded_by_bytes).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bases_bound_the_replay_in_records_local() -> Result<()> {
    bases_bound_the_replay(TestStore::local()?, "1000 records", 1000, records).await?;
    Ok(())
}

/// `--target-recovery-time`: with a slow replay rate given (500 records/s), bases come as
/// soon as the newest point's predicted restore time passes 5 s. Between consecutive bases,
/// the point just before the newer one (the slowest of the window there) is predicted at
/// most 5 s plus what the two segments the trigger cannot see coming add (as for
/// `check_bound`).
#[tokio::test(flavor = "multi_thread")]
async fn bases_bound_the_predicted_restore_time_local() -> Result<()> {
    let target_ms = 5000;
    let rates = RestoreRates {
        download_bytes_per_sec: 1_000_000_000,
        replay_records_per_sec: 500,
    };
    let s = Setup::new(TestStore::local()?)?.base_interval("1h");
    let oracle = s
        .archive(
            &["--duration", "15", "--rate", "400", "--seed", "6"],
            &[
                "--target-recovery-time",
                "5s",
                "--restore-download-rate",
                "1GB/s",
                "--restore-replay-rate",
                "500",
            ],
        )
        .await?;
    check_history(&s.store, &oracle, 2).await?;
    let state = s.store.open().await?.load().await?;
    let h = &state.history;
    let log = std::fs::read_to_string(s.path("archiver.log"))?;
    let early = log.matches("taking a base backup early").count();
    ensure!(
        early >= 1 && h.bases.len() > early,
        "{} bases, {early} taken for the target:\n{log}",
        h.bases.len()
    );
    let mut bases = h.bases.clone();
    bases.sort_by_key(|b| b.earliest_seq);
    for w in bases.windows(2) {
        let before_next = w[1].earliest_seq - 1;
        let cost = h.cost_of(Target::Seq(before_next), &rates)?;
        // What the two largest segments of the stretch add to a prediction.
        let mut stretch: Vec<u64> = h
            .segments
            .iter()
            .filter(|s| s.last_seq > w[0].earliest_seq && s.first_seq <= w[1].earliest_seq)
            .map(|s| {
                let mut c = RestoreCost::default();
                c.add_wal(s.stored_size, u64::from(s.record_count));
                c.transfer_time(&rates).as_millis() as u64
            })
            .collect();
        stretch.sort_unstable_by(|a, b| b.cmp(a));
        let tolerance: u64 = stretch.iter().take(2).sum();
        eprintln!(
            "sequence {before_next}: predicted {} ms ({:?}), target {target_ms} ms, tolerance \
             {tolerance} ms",
            cost.predicted_ms, cost.cost
        );
        ensure!(
            cost.predicted_ms <= target_ms + tolerance,
            "sequence {before_next} is predicted at {} ms: over the target {target_ms} ms + \
             {tolerance} ms ({:?})",
            cost.predicted_ms,
            cost.cost
        );
    }
    Ok(())
}
