//! Key rotation of encrypted repositories (`tidemark-archiver rekey`, FORMAT.md §10.7),
//! end to end against the local-directory store and the S3 server.
//!
//! A repository written by `tidemark-archiver` with a key (objects sealed directly with it,
//! no keyring: the format before rotation) is rotated twice while the archiver keeps
//! writing under the load generator; restores before, between and after the rotations, with
//! the newest key only, are exact against what the writer recorded; the old keys are
//! refused with a message that says they were retired; an archiver restarted with the
//! newest key goes on, sealing new objects with the keyring's active data key.
//!
//! Rotations interrupted between their writes (a store failure injected before and after
//! each keyring write, and a write whose reply is lost) leave a repository that opens with
//! the old key or the new one, and running the same command again completes them. A wrong
//! old key is refused and changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidemark_manifest::keyring::{self, FileKeyWrapper};
use tidemark_manifest::keys;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::fault::{Fault, FaultRule, FaultStore};
use tidemark_manifest::store::{EncryptionKey, ObjectStore, StoreOp};
use tidemark_tests::harness::{Proc, TestStore, bin, run_with_timeout, wait_for_database, with_s3};
use tidemark_tests::read_db_state_and_seq;
use tidemark_tests::setup::Setup;

struct Keys {
    keys: Vec<EncryptionKey>,
    files: Vec<PathBuf>,
}

impl Keys {
    fn new(dir: &Path, n: usize) -> Result<Keys> {
        let keys: Vec<EncryptionKey> = (0..n).map(|_| EncryptionKey::generate()).collect();
        let files = keys
            .iter()
            .enumerate()
            .map(|(i, k)| write_key_file(dir, &format!("key{i}"), k))
            .collect::<Result<_>>()?;
        Ok(Keys { keys, files })
    }

    fn file(&self, i: usize) -> String {
        self.files[i].display().to_string()
    }
}

fn write_key_file(dir: &Path, name: &str, key: &EncryptionKey) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", key.to_hex().as_str()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The store's environment without any key (the programs get keys by flag only).
fn env(store: &TestStore) -> Vec<(String, String)> {
    store
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("TIDEMARK_ENCRYPTION_KEY"))
        .cloned()
        .collect()
}

/// Runs a program of the workspace with the store's environment and no key in it.
fn run(store: &TestStore, program: &str, args: &[String]) -> Result<(i32, String)> {
    let mut e = env(store);
    e.push(("TIDEMARK_LOG".into(), "warn".into()));
    let (code, out, err) = run_with_timeout(&bin(program)?, args, &e, Duration::from_secs(180))?;
    eprintln!("$ {program} {}\n-> {code}\n{out}\n{err}", args.join(" "));
    Ok((code, format!("{out}{err}")))
}

fn rekey(store: &TestStore, keys: &Keys, old: usize, new: usize) -> Result<(i32, String)> {
    let args = [
        "rekey",
        "--to",
        &store.url,
        "--old-key-file",
        &keys.file(old),
        "--new-key-file",
        &keys.file(new),
    ]
    .map(String::from);
    let started = Instant::now();
    let out = run(store, "tidemark-archiver", &args)?;
    eprintln!("rekey {old} -> {new} took {:?}", started.elapsed());
    Ok(out)
}

/// Restores `--seq N` (or `--latest`) with the key file `key` into `dir`: exit code and
/// output.
fn restore(store: &TestStore, key: &str, seq: Option<u64>, dir: &Path) -> Result<(i32, String)> {
    let mut args: Vec<String> = [
        "restore",
        "--from",
        &store.url,
        "--encryption-key-file",
        key,
    ]
    .map(String::from)
    .to_vec();
    match seq {
        Some(n) => args.extend(["--seq".to_owned(), n.to_string()]),
        None => args.push("--latest".to_owned()),
    }
    args.extend(["--target".to_owned(), dir.display().to_string()]);
    run(store, "tidemark-restore", &args)
}

/// Restores `seq` (or the latest point) with `key` and compares the database with what the
/// writer recorded at the sequence it was restored to.
fn restore_exact(s: &Setup, key: &str, seq: Option<u64>, name: &str) -> Result<u64> {
    let dir = s.path(name);
    let (code, out) = restore(&s.store, key, seq, &dir)?;
    ensure!(code == 0, "restore {name} failed ({code}):\n{out}");
    let (state, got) = read_db_state_and_seq(&dir)?;
    if let Some(want) = seq {
        ensure!(got == want, "{name}: restored to {got}, asked for {want}");
    }
    let expected = s.oracle()?.state_at(got)?;
    if let Some(diff) = expected.diff(&state) {
        anyhow::bail!("{name}: the restored database differs from the writer's at {got}: {diff}");
    }
    eprintln!("{name}: restored to sequence {got}, exact");
    Ok(got)
}

/// The store as the bytes lie in it (a local root is created first, as the archiver would).
async fn open_raw(store: &TestStore) -> Result<Arc<dyn ObjectStore>> {
    if let Some(root) = store.local_root() {
        std::fs::create_dir_all(root)?;
    }
    store.open_raw().await
}

/// The newest archived sequence, reading the repository with `key`.
async fn archived(raw: &Arc<dyn ObjectStore>, key: &EncryptionKey) -> Option<u64> {
    let repo = Repository::open(Arc::clone(raw), Some(key)).await.ok()?;
    let state = repo.load().await.ok()?;
    state.history.segments.last().map(|s| s.last_seq)
}

/// Waits until the repository, read with `key`, holds more than `after` (and, with
/// `until`, exactly that sequence and a base), while the archiver runs.
async fn wait_archived(
    raw: &Arc<dyn ObjectStore>,
    key: &EncryptionKey,
    after: u64,
    until: Option<u64>,
    arch: &mut Proc,
) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(seq) = archived(raw, key).await
            && seq > after
            && until.is_none_or(|u| seq == u)
        {
            return Ok(seq);
        }
        ensure!(arch.running(), "the archiver exited:\n{}", arch.log_tail());
        ensure!(
            Instant::now() < deadline,
            "the repository did not get past {after} (until {until:?}):\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rotate_twice_while_archiving(store: TestStore) -> Result<()> {
    eprintln!("rotations while archiving into {}", store.describe);
    let s = Setup::new(store)?.base_interval("3s");
    let keys = Keys::new(&s.path(""), 3)?;
    let raw = open_raw(&s.store).await?;
    let mut writer = s.loadgen(&[
        "--duration",
        "14",
        "--rate",
        "300",
        "--seed",
        "41",
        "--flush-every",
        "500",
    ])?;
    wait_for_database(&s.db())?;
    let key0 = keys.file(0);
    let mut arch = s.archiver_with_env("archiver.log", &["--encryption-key-file", &key0], &[])?;

    let before = wait_archived(&raw, &keys.keys[0], 0, None, &mut arch).await?;
    let (code, out) = rekey(&s.store, &keys, 0, 1)?;
    ensure!(
        code == 0 && out.contains("rotated"),
        "first rotation:\n{out}"
    );
    let between = wait_archived(&raw, &keys.keys[1], before, None, &mut arch).await?;
    let (code, out) = rekey(&s.store, &keys, 1, 2)?;
    ensure!(
        code == 0 && out.contains("rotated"),
        "second rotation:\n{out}"
    );
    let after_rotations = wait_archived(&raw, &keys.keys[2], between, None, &mut arch).await?;
    writer.wait_success(Duration::from_secs(90))?;
    let last = s.oracle()?.last_seq();
    wait_archived(&raw, &keys.keys[2], 0, Some(last), &mut arch).await?;
    ensure!(
        after_rotations < last,
        "the writer stopped before the rotations were done ({after_rotations} of {last}): \
         nothing was written after them"
    );
    arch.stop(Duration::from_secs(30))?;

    // Before, between and after the rotations, with the newest key only.
    let newest = keys.file(2);
    restore_exact(&s, &newest, Some(before), "before")?;
    restore_exact(&s, &newest, Some(between), "between")?;
    let got = restore_exact(&s, &newest, None, "latest")?;
    ensure!(got == last, "the latest restore reached {got}, not {last}");

    // The old keys are refused, saying they were retired; nothing is written.
    for old in [0, 1] {
        let dir = s.path(&format!("refused{old}"));
        let (code, out) = restore(&s.store, &keys.file(old), None, &dir)?;
        ensure!(
            code == 2,
            "restore with retired key {old} exited {code}:\n{out}"
        );
        ensure!(
            out.contains("retired") && out.contains(&keys.keys[2].key_id()),
            "the refusal does not say the key was retired:\n{out}"
        );
        ensure!(!dir.exists(), "a refused restore created {}", dir.display());
    }
    // Running the completed rotation again changes nothing.
    let ring_before = raw.get(keys::KEYRING).await?;
    let (code, out) = rekey(&s.store, &keys, 1, 2)?;
    ensure!(code == 0 && out.contains("nothing to do"), "re-run:\n{out}");
    ensure!(
        raw.get(keys::KEYRING).await? == ring_before,
        "a re-run rewrote the keyring"
    );

    // An archiver restarted with the newest key goes on: the objects it writes are sealed
    // with the keyring's active data key, not with a key a retired key holder had.
    let repo = Repository::open(Arc::clone(&raw), Some(&keys.keys[2])).await?;
    let ring = repo.read_keyring().await?.context("no keyring")?.0;
    let bases = repo.load().await?.history.bases.len();
    let mut arch =
        s.archiver_with_env("archiver2.log", &["--encryption-key-file", &newest], &[])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let newest_base = loop {
        let state = repo.load().await?;
        if state.history.bases.len() > bases {
            break state.history.bases.last().cloned().context("a base")?;
        }
        ensure!(arch.running(), "the archiver exited:\n{}", arch.log_tail());
        ensure!(
            Instant::now() < deadline,
            "no new base:\n{}",
            arch.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    arch.stop(Duration::from_secs(30))?;
    let key = keys::base_descriptor_key(&newest_base.id);
    let stored = raw.get(&key).await?;
    ensure!(
        hex::encode(&stored[16..24]) == ring.active,
        "{key} is sealed with key id {}, not the active data key {}",
        hex::encode(&stored[16..24]),
        ring.active
    );
    restore_exact(&s, &newest, None, "after-restart")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_twice_while_archiving_local() -> Result<()> {
    rotate_twice_while_archiving(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_twice_while_archiving_s3() -> Result<()> {
    with_s3("rekey-live", rotate_twice_while_archiving).await
}

/// Whether the repository opens with `key` and its history loads and reads.
async fn opens(raw: &Arc<dyn ObjectStore>, key: &EncryptionKey) -> bool {
    let Ok(repo) = Repository::open(Arc::clone(raw), Some(key)).await else {
        return false;
    };
    let Ok(state) = repo.load().await else {
        return false;
    };
    let Some(seg) = state.history.segments.first() else {
        return false;
    };
    let key = keys::segment_key(seg.first_seq);
    repo.store().get(&key).await.is_ok()
}

/// One rotation from `old` to `new` through a store failing as `rule` says (it must fail),
/// then checks that the old or the new key opens the repository.
async fn interrupted(
    raw: &Arc<dyn ObjectStore>,
    keys: &Keys,
    (old, new): (usize, usize),
    rule: FaultRule,
) -> Result<()> {
    let faulty = Arc::new(FaultStore::new(Arc::clone(raw)));
    faulty.inject(rule.clone());
    let result = keyring::rekey(
        faulty.clone(),
        &FileKeyWrapper::new(keys.keys[old].clone()),
        &FileKeyWrapper::new(keys.keys[new].clone()),
        time::OffsetDateTime::now_utc(),
    )
    .await;
    ensure!(faulty.injected() > 0, "{rule:?} never hit");
    ensure!(result.is_err(), "the rotation passed the failure {rule:?}");
    let (o, n) = (
        opens(raw, &keys.keys[old]).await,
        opens(raw, &keys.keys[new]).await,
    );
    eprintln!("interrupted by {rule:?}: old key opens: {o}, new key opens: {n}");
    ensure!(o || n, "after {rule:?} neither key opens the repository");
    Ok(())
}

fn keyring_write(op: StoreOp, fault: Fault) -> FaultRule {
    FaultRule::new(fault)
        .on(op)
        .key_prefix(keys::KEYRING)
        .times(1)
}

async fn interrupted_rotations_resume(store: TestStore) -> Result<()> {
    eprintln!("interrupted rotations on {}", store.describe);
    let s = Setup::new(store)?.base_interval("2s");
    let keys = Keys::new(&s.path(""), 4)?;
    let key0 = keys.file(0);
    let raw = open_raw(&s.store).await?;
    let mut writer = s.loadgen(&["--duration", "3", "--rate", "200", "--seed", "7"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver_with_env("archiver.log", &["--encryption-key-file", &key0], &[])?;
    writer.wait_success(Duration::from_secs(90))?;
    let last = s.oracle()?.last_seq();
    wait_archived(&raw, &keys.keys[0], 0, Some(last), &mut arch).await?;
    arch.stop(Duration::from_secs(30))?;

    // A wrong old key: refused, nothing written.
    let listed = |raw: Arc<dyn ObjectStore>| async move {
        let mut v: Vec<_> = raw
            .list("")
            .await?
            .into_iter()
            .map(|m| (m.key, format!("{:?}", m.etag)))
            .collect();
        v.sort();
        anyhow::Ok(v)
    };
    let before = listed(Arc::clone(&raw)).await?;
    let (code, out) = rekey(&s.store, &keys, 3, 1)?;
    ensure!(
        code == 2 && out.contains("nothing was changed"),
        "wrong old key:\n{out}"
    );
    ensure!(
        listed(Arc::clone(&raw)).await? == before,
        "a refused rotation changed the store"
    );

    // The first rotation (it creates the keyring), interrupted at each write.
    interrupted(
        &raw,
        &keys,
        (0, 1),
        keyring_write(StoreOp::PutIfAbsent, Fault::Transient),
    )
    .await?;
    ensure!(
        raw.head(keys::KEYRING).await?.is_none(),
        "a failed create left a keyring"
    );
    interrupted(
        &raw,
        &keys,
        (0, 1),
        keyring_write(StoreOp::PutIfAbsent, Fault::LostReply),
    )
    .await?;
    interrupted(
        &raw,
        &keys,
        (0, 1),
        keyring_write(StoreOp::PutIfMatch, Fault::Transient),
    )
    .await?;
    ensure!(
        opens(&raw, &keys.keys[0]).await && opens(&raw, &keys.keys[1]).await,
        "half-way through, both keys must open the repository"
    );
    let (code, out) = rekey(&s.store, &keys, 0, 1)?;
    ensure!(
        code == 0 && out.contains("rotated"),
        "re-run of the first rotation:\n{out}"
    );
    ensure!(!opens(&raw, &keys.keys[0]).await, "the old key still opens");

    // The second: interrupted before its first write, after it, and at its second.
    interrupted(
        &raw,
        &keys,
        (1, 2),
        keyring_write(StoreOp::PutIfMatch, Fault::Transient),
    )
    .await?;
    interrupted(
        &raw,
        &keys,
        (1, 2),
        keyring_write(StoreOp::PutIfMatch, Fault::LostReply),
    )
    .await?;
    interrupted(
        &raw,
        &keys,
        (1, 2),
        keyring_write(StoreOp::PutIfMatch, Fault::Transient),
    )
    .await?;
    let (code, out) = rekey(&s.store, &keys, 1, 2)?;
    ensure!(code == 0, "re-run of the second rotation:\n{out}");
    ensure!(
        opens(&raw, &keys.keys[2]).await && !opens(&raw, &keys.keys[1]).await,
        "after the second rotation only the newest key opens"
    );
    let newest = keys.file(2);
    let got = restore_exact(&s, &newest, None, "latest")?;
    ensure!(got == last, "restored to {got}, not {last}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rotations_resume_local() -> Result<()> {
    interrupted_rotations_resume(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rotations_resume_s3() -> Result<()> {
    with_s3("rekey-interrupted", interrupted_rotations_resume).await
}

/// A keyring that disappears (deleted, or hidden by a delete marker) is not replaced by a
/// new one that lacks the data keys objects were sealed with since the first rotation.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_keyring_is_not_replaced_local() -> Result<()> {
    let s = Setup::new(TestStore::local()?)?.base_interval("2s");
    let keys = Keys::new(&s.path(""), 3)?;
    let raw = open_raw(&s.store).await?;
    let mut writer = s.loadgen(&["--duration", "2", "--rate", "200", "--seed", "8"])?;
    wait_for_database(&s.db())?;
    let mut arch = s.archiver_with_env(
        "archiver.log",
        &["--encryption-key-file", &keys.file(0)],
        &[],
    )?;
    writer.wait_success(Duration::from_secs(90))?;
    let last = s.oracle()?.last_seq();
    wait_archived(&raw, &keys.keys[0], 0, Some(last), &mut arch).await?;
    arch.stop(Duration::from_secs(30))?;
    let (code, out) = rekey(&s.store, &keys, 0, 1)?;
    ensure!(code == 0, "rotation:\n{out}");
    // An archiver started with the new key seals with the rotation's data key.
    let mut arch = s.archiver_with_env(
        "archiver2.log",
        &[
            "--encryption-key-file",
            &keys.file(1),
            "--exit-when-caught-up",
        ],
        &[],
    )?;
    arch.wait_success(Duration::from_secs(90))?;
    raw.delete(keys::KEYRING).await?;
    let (code, out) = rekey(&s.store, &keys, 0, 2)?;
    ensure!(
        code != 0 && out.contains("keyring was lost"),
        "a rotation over a lost keyring: exit {code}:\n{out}"
    );
    ensure!(
        raw.get(keys::KEYRING).await.is_err(),
        "a new keyring replaced the lost one"
    );
    Ok(())
}
