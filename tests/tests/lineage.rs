//! Lineage after a restore, end to end with the real programs: a database written by the
//! load generator is archived, and restored to a point in the middle of its history. The
//! restored database carries its origin (`tidemark-origin.json`: the repository, its id and
//! lineage, the sequence and time restored to). The archiver refuses to archive it into the
//! repository it came from (`run` and `backup` exit 2, say why and what to do, and write
//! nothing there: the repository's objects are the same before and after). Into a new URL
//! it creates a repository whose `tidemark.json` names the parent; `list` and `status` show
//! it; archiving there again is accepted. Writes made to the restored database after the
//! restore are archived there, and a restore from the new repository equals what was
//! written, key by key. Locally the new repository is encrypted, so its authenticated
//! `tidemark.json` carries the parent.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tidemark_manifest::exit;
use tidemark_manifest::model::LineageParent;
use tidemark_manifest::origin::{ORIGIN_FILE, Origin};
use tidemark_manifest::plan::fmt_time;
use tidemark_manifest::store::StoreUrl;
use tidemark_tests::harness::{TestStore, bin, run_with_timeout, with_s3};
use tidemark_tests::setup::Setup;
use tidemark_tests::{COLUMN_FAMILIES, Op, Oracle, State, open_db, read_db_state_and_seq};

/// Batches written to the restored database before it is archived again.
const NEW_BATCHES: u64 = 50;

/// Runs `program ARGS` with `store`'s environment: exit code and stdout + stderr.
fn run(store: &TestStore, program: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let mut env = store.env.clone();
    env.push(("TIDEMARK_LOG".into(), "info,aws=warn".into()));
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, out, err) = run_with_timeout(&bin(program)?, &args, &env, Duration::from_secs(180))?;
    eprintln!("$ {program} {}\n-> {code}\n{out}\n{err}", args.join(" "));
    Ok((code, out, err))
}

/// `tidemark-restore restore --json` from `store` into `target` (to `point`, e.g.
/// `["--seq", "N"]`); the report.
fn restore(store: &TestStore, target: &Path, point: &[&str]) -> Result<Value> {
    let t = target.display().to_string();
    let mut args = vec![
        "--quiet", "restore", "--json", "--from", &store.url, "--target", &t,
    ];
    args.extend_from_slice(point);
    let (code, out, _) = run(store, "tidemark-restore", &args)?;
    ensure!(code == 0, "restore from {} exited {code}", store.url);
    Ok(serde_json::from_str(&out)?)
}

/// Every object of the store as it lies there: key, size and ETag.
async fn objects(store: &TestStore) -> Result<Vec<(String, u64, String)>> {
    let mut all: Vec<_> = store
        .open_raw()
        .await?
        .list("")
        .await?
        .into_iter()
        .map(|o| (o.key, o.size, format!("{:?}", o.etag)))
        .collect();
    all.sort();
    Ok(all)
}

/// A sequence number in the middle of the restorable window that ends a batch.
async fn middle_point(store: &TestStore, oracle: &Oracle) -> Result<u64> {
    let state = store.open().await?.load().await?;
    let window = state.history.window();
    let first = window
        .ranges
        .first()
        .context("nothing restorable")?
        .first_seq;
    let last = oracle.last_seq();
    let mid = first + (last - first) / 2;
    oracle
        .batches()
        .iter()
        .map(|b| b.last_seq())
        .filter(|&s| s >= first && s <= mid)
        .max()
        .with_context(|| format!("no batch ends in {first}..={mid}"))
}

/// The restored database's origin names `parent` at `seq`, as the restore report says.
async fn check_origin(restored: &Path, parent: &TestStore, report: &Value) -> Result<Origin> {
    let origin = Origin::read(restored)?
        .with_context(|| format!("{} has no {ORIGIN_FILE}", restored.display()))?;
    let config = parent
        .open()
        .await?
        .read_config()
        .await?
        .context("no config")?;
    let cutoff = &report["cutoff"];
    let p = &origin.parent;
    ensure!(
        p.repository == StoreUrl::parse(&parent.url)?.to_string(),
        "{origin:?}"
    );
    ensure!(p.repository_id == config.repository_id, "{origin:?}");
    ensure!(p.lineage == config.lineage.id, "{origin:?}");
    ensure!(
        Some(p.sequence) == cutoff["seq"].as_u64(),
        "{origin:?} {cutoff}"
    );
    ensure!(
        Some(fmt_time(p.time).as_str()) == cutoff["time"].as_str(),
        "{origin:?} {cutoff}"
    );
    ensure!(origin.format_version == 1 && origin.lineage != p.lineage);
    ensure!(report["origin"]["lineage"] == Value::from(origin.lineage.clone()));
    Ok(origin)
}

/// Opens the restored database as an application would, writes [`NEW_BATCHES`] batches to
/// it, and returns what it must hold afterwards and its last sequence.
fn write_after_restore(db: &Path, mut expected: State) -> Result<(State, u64)> {
    let handle = open_db(db)?;
    let cf = handle
        .cf_handle(COLUMN_FAMILIES[1])
        .context("no users column family")?;
    for i in 0..NEW_BATCHES {
        let (key, value) = (
            format!("after-restore-{i:04}").into_bytes(),
            format!("new lineage value {i}").into_bytes(),
        );
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(&cf, &key, &value);
        handle.write(batch)?;
        expected.apply(&Op::Put { cf: 1, key, value });
    }
    Ok((expected, handle.latest_sequence_number()))
}

/// The archiver refuses the parent's URL (`run` and `backup`), exit 2, saying why and what
/// to do, and writes nothing there.
async fn parent_is_refused(db: &Path, parent: &TestStore, origin: &Origin) -> Result<()> {
    let before = objects(parent).await?;
    let d = db.display().to_string();
    let file = db.join(ORIGIN_FILE).display().to_string();
    let seq = origin.parent.sequence.to_string();
    for command in ["run", "backup"] {
        let (code, out, err) = run(
            parent,
            "tidemark-archiver",
            &[command, "--db", &d, "--to", &parent.url],
        )?;
        let text = format!("{out}{err}");
        ensure!(
            code == i32::from(exit::USAGE),
            "{command} on the parent's URL: exit {code}, expected {}",
            exit::USAGE
        );
        for part in [
            &format!("it is a copy restored on {}", fmt_time(origin.restored_at)),
            &format!("diverges from the repository's after sequence {seq}"),
            &origin.parent.repository,
            "new repository URL",
            &format!("remove {file}"),
        ] {
            ensure!(
                text.contains(part),
                "{command}: `{part}` missing from:\n{text}"
            );
        }
    }
    ensure!(
        objects(parent).await? == before,
        "the refused archiver changed the parent repository"
    );
    Ok(())
}

/// The new repository names the parent, in `tidemark.json`, `list` (text and JSON) and
/// `status`.
async fn new_repository_names_parent(new: &TestStore, origin: &Origin) -> Result<()> {
    let config = new
        .open()
        .await?
        .read_config()
        .await?
        .context("no config")?;
    let parent = LineageParent {
        repository: origin.parent.repository.clone(),
        lineage: origin.parent.lineage.clone(),
        sequence: origin.parent.sequence,
    };
    ensure!(config.lineage.id == origin.lineage, "{config:?}");
    ensure!(
        config.lineage.parent.as_ref() == Some(&parent),
        "{config:?}"
    );
    ensure!(
        config.encryption.is_some() == new.key.is_some(),
        "{config:?}"
    );
    let line = format!(
        "restored from {} (lineage {}) at sequence {}",
        parent.repository, parent.lineage, parent.sequence
    );
    let (code, out, _) = run(new, "tidemark-restore", &["list", "--from", &new.url])?;
    ensure!(code == 0 && out.contains(&line), "list: `{line}` missing");
    let (code, out, _) = run(
        new,
        "tidemark-restore",
        &["list", "--json", "--from", &new.url],
    )?;
    let listed: Value = serde_json::from_str(&out)?;
    ensure!(code == 0 && listed["parent"] == serde_json::to_value(&parent)?);
    ensure!(listed["lineage"] == Value::from(origin.lineage.clone()));
    let (code, out, _) = run(new, "tidemark-archiver", &["status", "--to", &new.url])?;
    ensure!(code == 0 && out.contains(&line), "status: `{line}` missing");
    Ok(())
}

/// `tidemark-archiver backup` of the restored database into `new`: archives it and takes a
/// base, then exits 0.
fn backup(db: &Path, new: &TestStore) -> Result<()> {
    let d = db.display().to_string();
    let (code, _, _) = run(
        new,
        "tidemark-archiver",
        &["backup", "--db", &d, "--to", &new.url],
    )?;
    ensure!(code == 0, "backup into the new repository exited {code}");
    Ok(())
}

async fn lineage_after_a_restore(parent: TestStore, new: TestStore) -> Result<()> {
    let s = Setup::new(parent)?.base_interval("1s");
    let oracle = s
        .archive(&["--duration", "3", "--rate", "300", "--seed", "7"], &[])
        .await?;
    let seq = middle_point(&s.store, &oracle).await?;
    let restored = s.path("restored");
    let report = restore(&s.store, &restored, &["--seq", &seq.to_string()])?;
    let origin = check_origin(&restored, &s.store, &report).await?;
    ensure!(origin.parent.sequence == seq);
    let (state, at) = read_db_state_and_seq(&restored)?;
    ensure!(at == seq, "restored to {at}, asked for {seq}");
    if let Some(d) = oracle.state_at(seq)?.diff(&state) {
        bail!("the restored database differs from what was written: {d}");
    }

    // The application opens it and writes: a new history after `seq`.
    let (expected, last) = write_after_restore(&restored, state)?;
    let identity = |db: &Path| std::fs::read_to_string(db.join("IDENTITY"));
    ensure!(
        identity(&restored)? == identity(&s.db())?,
        "the restored database kept its source's IDENTITY, so only its origin tells them apart"
    );

    parent_is_refused(&restored, &s.store, &origin).await?;
    backup(&restored, &new)?;
    new_repository_names_parent(&new, &origin).await?;
    // Its own repository is accepted again; the parent still is not.
    backup(&restored, &new)?;
    parent_is_refused(&restored, &s.store, &origin).await?;

    let again = s.path("restored-again");
    let report = restore(&new, &again, &["--latest"])?;
    let (state, at) = read_db_state_and_seq(&again)?;
    ensure!(
        at == last,
        "restored from the new repository to {at}, wrote up to {last}"
    );
    if let Some(d) = expected.diff(&state) {
        bail!("the database restored from the new repository differs from what was written: {d}");
    }
    let second = Origin::read(&again)?.context("no origin in the second restore")?;
    ensure!(second.parent.lineage == origin.lineage, "{second:?}");
    ensure!(report["origin"]["parent"]["sequence"] == Value::from(last));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_database_is_archived_into_a_new_repository_naming_its_parent_local()
-> Result<()> {
    lineage_after_a_restore(TestStore::local()?, TestStore::local()?.encrypted()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_database_is_archived_into_a_new_repository_naming_its_parent_s3() -> Result<()>
{
    with_s3("lineage-parent", |parent| async move {
        let new = TestStore::s3("lineage-new")
            .await?
            .context("the S3 server went away")?;
        lineage_after_a_restore(parent, new).await
    })
    .await
}
