//! A repository with something wrong in it, through the real programs: a corrupt manifest
//! generation (list and restore fall back to the generation before it and lose nothing;
//! verify fails naming it), keys that are not Tidemark objects (pruning names them, leaves
//! them alone and goes on), and a flipped byte in a table file (verify reads content on a
//! local directory and names it; on S3 its default says "sizes only", never a plain OK).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use tidemark_manifest::{exit, keys};
use tidemark_tests::harness::with_s3;
use tidemark_tests::harness::{TestStore, raw_s3_client};
use tidemark_tests::setup::Setup;
use tidemark_tests::{Oracle, read_db_state_and_seq};

/// A directory beside `store`, with an archiver that takes a base every second and writes
/// a generation every 200ms.
fn setup(store: TestStore) -> Result<Setup> {
    Ok(Setup::new(store)?
        .checkpoint_interval("200ms")
        .base_interval("1s"))
}

/// Writes for `seconds` while the archiver runs; stops both and returns the oracle.
async fn archived_history(s: &Setup, seconds: &str) -> Result<Oracle> {
    let writes = [
        "--duration",
        seconds,
        "--rate",
        "300",
        "--seed",
        "33",
        "--flush-every",
        "200",
    ];
    s.archive(&writes, &[]).await
}

/// `tidemark-restore restore --from URL ARGS`: exit code, stdout, stderr.
fn restore(s: &Setup, args: &[&str]) -> Result<(i32, String, String)> {
    let mut a = vec!["restore", "--from", &s.store.url];
    a.extend_from_slice(args);
    s.run("tidemark-restore", &a)
}

/// Flips one digit inside a JSON document on disk: still valid JSON, so only its checksum
/// tells.
fn flip_digit(path: &Path) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    let i = bytes
        .iter()
        .rposition(u8::is_ascii_digit)
        .context("no digit")?;
    bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
    std::fs::write(path, bytes)?;
    Ok(())
}

/// `tidemark-archiver status` with the newest generation overwritten with garbage: it shows
/// what it can read (the generation before, the newest point, the lease) and the damage,
/// and exits `VERIFICATION_FAILED`, never 0.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_a_garbage_newest_generation_and_fails() -> Result<()> {
    let s = setup(TestStore::local()?)?;
    let oracle = archived_history(&s, "2").await?;
    let root = s.local_root()?;
    let url = s.store.url.clone();
    let (code, out, err) = s.run("tidemark-archiver", &["status", "--to", &url, "--json"])?;
    ensure!(code == 0, "an intact repository is healthy: {out}{err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    let newest = j["generation"].as_u64().context("generation")?;
    ensure!(newest >= 2 && j["damage"] == serde_json::json!([]), "{j}");
    let key = keys::generation_key(newest);
    std::fs::write(
        root.join(&key),
        b"\x00not a manifest generation\xff garbage",
    )?;

    let (code, out, err) = s.run("tidemark-archiver", &["status", "--to", &url, "--json"])?;
    ensure!(
        code == i32::from(exit::VERIFICATION_FAILED),
        "a damaged repository must fail status (exit 4): {code}\n{out}{err}"
    );
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        j["generation"] == newest - 1 && j["newest_generation"] == newest,
        "{j}"
    );
    ensure!(j["newest_seq"] == oracle.last_seq(), "{j}");
    ensure!(
        j["lease"]["released_at"].is_string(),
        "the lease is shown: {j}"
    );
    ensure!(
        j["damage"]
            .as_array()
            .is_some_and(|d| d.len() == 1 && d[0]["object"] == key.as_str()),
        "{j}"
    );
    ensure!(err.contains("DAMAGED") && err.contains(&key), "{err}");

    let (code, out, err) = s.run("tidemark-archiver", &["status", "--to", &url])?;
    ensure!(code == i32::from(exit::VERIFICATION_FAILED), "{out}{err}");
    ensure!(
        out.contains(&format!("DAMAGED:      {key}")) && out.contains("REPAIR NEEDED"),
        "{out}"
    );
    // A threshold that holds does not hide the damage.
    let (code, _, err) = s.run(
        "tidemark-archiver",
        &["status", "--to", &url, "--max-base-age", "1000h"],
    )?;
    ensure!(code == i32::from(exit::VERIFICATION_FAILED), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_newest_generation_is_passed_over_loudly_and_nothing_is_lost() -> Result<()> {
    let s = setup(TestStore::local()?)?;
    let oracle = archived_history(&s, "3").await?;
    let root = s.store.local_root().context("local")?;
    let repo = s.store.open().await?;
    let newest = repo
        .load()
        .await?
        .generation
        .context("no generation")?
        .generation;
    ensure!(newest >= 3, "expected several generations, found {newest}");
    let key = keys::generation_key(newest);
    flip_digit(&root.join(&key))?;
    let url = s.store.url.clone();

    // list: reads the generation before it, says so, and still ends at the last sequence.
    let (code, out, err) = s.run("tidemark-restore", &["list", "--from", &url, "--json"])?;
    ensure!(code == 0, "list must work: {err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        j["generation"] == newest - 1 && j["newest_generation"] == newest,
        "{j}"
    );
    ensure!(j["latest"]["seq"] == oracle.last_seq(), "{j}");
    ensure!(
        j["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w["object"] == key.as_str() && w["damage"] == true)),
        "{j}"
    );
    ensure!(
        err.contains(&key),
        "the log names the corrupt object: {err}"
    );
    let (code, out, _) = s.run("tidemark-restore", &["list", "--from", &url])?;
    ensure!(
        code == 0 && out.contains(&format!("DAMAGED: {key}")),
        "{out}"
    );

    // restore --latest: every record up to the last one, exactly.
    let target = s.path("restored");
    let (code, out, err) = restore(
        &s,
        &[
            "--target",
            &target.display().to_string(),
            "--latest",
            "--json",
        ],
    )?;
    ensure!(code == 0, "restore must work: {err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(j["cutoff"]["seq"] == oracle.last_seq(), "{j}");
    let (state, seq) = read_db_state_and_seq(&target)?;
    ensure!(seq == oracle.last_seq());
    if let Some(d) = oracle.state_at(seq)?.diff(&state) {
        bail!("restored past a corrupt generation: {d}");
    }

    // verify: fails, naming the object.
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url])?;
    ensure!(
        code == 4 && out.contains(&key),
        "verify must fail naming {key}: {out}"
    );

    // --generation: an older one works, one that does not exist is bad input.
    let older = (newest - 2).to_string();
    let (code, out, err) = s.run(
        "tidemark-restore",
        &["list", "--from", &url, "--generation", &older, "--json"],
    )?;
    ensure!(code == 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        j["generation"] == newest - 2 && j["latest"]["seq"] == oracle.last_seq(),
        "{j}"
    );
    let target = s.path("restored-older");
    let (code, _, err) = restore(
        &s,
        &[
            "--target",
            &target.display().to_string(),
            "--latest",
            "--generation",
            &older,
        ],
    )?;
    ensure!(code == 0, "{err}");
    ensure!(read_db_state_and_seq(&target)?.1 == oracle.last_seq());
    let (code, out, err) = s.run(
        "tidemark-restore",
        &["verify", "--from", &url, "--generation", &older],
    )?;
    ensure!(
        code == 0 && out.contains("OK: no problems found"),
        "{out}{err}"
    );
    let (code, _, err) = s.run(
        "tidemark-restore",
        &["list", "--from", &url, "--generation", "999999"],
    )?;
    ensure!(
        code == 2 && err.contains("no manifest generation 999999"),
        "{err}"
    );

    // A hint naming a generation that does not exist is advisory.
    std::fs::write(
        root.join(keys::LATEST_HINT),
        tidemark_manifest::model::to_document_bytes(&tidemark_manifest::model::LatestHint {
            format_version: 1,
            generation: newest + 50,
        }),
    )?;
    let (code, out, err) = s.run("tidemark-restore", &["list", "--from", &url, "--json"])?;
    ensure!(code == 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        j["generation"] == newest - 1 && j["latest"]["seq"] == oracle.last_seq(),
        "{j}"
    );
    Ok(())
}

/// A generation and the latest-generation hint replaced by 16 GiB objects (sparse files):
/// list, verify and restore run with their address space limited to 2 GiB, so reading
/// either whole would fail. Each is refused as corrupt once it proves longer than a document
/// may be (FORMAT.md §3.1), and the reader goes on from the generation before, as for any
/// corrupt generation.
#[tokio::test(flavor = "multi_thread")]
async fn a_giant_document_is_refused_without_being_read() -> Result<()> {
    const GIANT: u64 = 16 << 30;
    let s = setup(TestStore::local()?)?;
    let oracle = archived_history(&s, "2").await?;
    let root = s.store.local_root().context("local")?;
    let repo = s.store.open().await?;
    let newest = repo
        .load()
        .await?
        .generation
        .context("no generation")?
        .generation;
    ensure!(newest >= 2, "expected several generations, found {newest}");
    let key = keys::generation_key(newest);
    for k in [key.as_str(), keys::LATEST_HINT] {
        std::fs::File::create(root.join(k))?.set_len(GIANT)?;
    }
    let url = s.store.url.clone();
    let too_long = format!(
        "more than the {} bytes",
        tidemark_manifest::model::MAX_DOCUMENT_LEN
    );

    let (code, out, err) = s.run_within_memory(
        2048,
        "tidemark-restore",
        &["list", "--from", &url, "--json"],
    )?;
    ensure!(code == 0, "list must work: {err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(j["generation"] == newest - 1, "{j}");
    ensure!(j["latest"]["seq"] == oracle.last_seq(), "{j}");
    for k in [key.as_str(), keys::LATEST_HINT] {
        ensure!(
            j["warnings"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["object"] == k
                    && w["message"].as_str().is_some_and(|m| m.contains(&too_long)))),
            "no warning about {k}: {j}"
        );
    }

    let (code, out, err) =
        s.run_within_memory(2048, "tidemark-restore", &["verify", "--from", &url])?;
    ensure!(
        code == i32::from(exit::VERIFICATION_FAILED) && out.contains(&key),
        "verify must fail naming {key}: {out}{err}"
    );

    let target = s.path("restored");
    let t = target.display().to_string();
    let args = ["restore", "--from", &url, "--target", &t, "--latest"];
    let (code, _, err) = s.run_within_memory(2048, "tidemark-restore", &args)?;
    ensure!(code == 0, "restore must work: {err}");
    let (state, seq) = read_db_state_and_seq(&target)?;
    ensure!(seq == oracle.last_seq());
    if let Some(d) = oracle.state_at(seq)?.diff(&state) {
        bail!("restored past a giant generation: {d}");
    }
    Ok(())
}

/// Puts `bytes` under `key` in the S3 store directly, as another program could.
async fn s3_put_raw(store: &TestStore, key: &str, bytes: Vec<u8>) -> Result<()> {
    let rest = store.url.strip_prefix("s3://").context("not S3")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoint = store.s3.endpoint_url.as_deref().context("endpoint")?;
    let client = raw_s3_client(endpoint).await;
    client
        .put_object()
        .bucket(bucket)
        .key(format!("{prefix}/{key}"))
        .body(bytes.into())
        .send()
        .await
        .with_context(|| format!("cannot put {key}"))?;
    Ok(())
}

async fn foreign_keys_do_not_stop_pruning(store: TestStore) -> Result<()> {
    let s = setup(store)?;
    let oracle = archived_history(&s, "4").await?;
    let repo = s.store.open().await?;
    let before = repo.load().await?;
    ensure!(before.history.bases.len() >= 3, "need bases to prune");
    // Keys of no layout row: under a base that pruning drops, and elsewhere; and one that
    // no store accepts as a key.
    let dropped = &before.history.bases[0].id;
    let mut foreign = vec![
        format!("bases/{dropped}/notes.txt"),
        format!("bases/{dropped}/files/000001.log"),
        "wal/README".to_owned(),
        "stray.txt".to_owned(),
    ];
    let invalid = match s.store.local_root() {
        Some(root) => {
            for k in &foreign {
                let path = root.join(k);
                std::fs::create_dir_all(path.parent().unwrap())?;
                std::fs::write(path, b"not tidemark")?;
            }
            // A backslash: a file name, but no valid key.
            let name = format!("bases/{dropped}/files/odd\\name");
            std::fs::write(root.join(&name), b"x")?;
            name
        }
        None => {
            for k in &foreign {
                s3_put_raw(&s.store, k, b"not tidemark".to_vec()).await?;
            }
            let name = "bases/x//y".to_owned();
            s3_put_raw(&s.store, &name, b"x".to_vec()).await?;
            name
        }
    };
    foreign.push(invalid.clone());

    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "0s"])?;
    ensure!(
        code == 0,
        "prune must not stop at a foreign key: {code}: {err}"
    );
    ensure!(
        out.contains(&format!(
            "not Tidemark objects, left alone ({})",
            foreign.len()
        )),
        "{out}"
    );
    for k in &foreign {
        ensure!(
            out.contains(k.as_str()) || foreign.len() > 10,
            "the report names {k}: {out}"
        );
        ensure!(err.contains(k.as_str()), "the log names {k}: {err}");
    }
    // They are all still there; the dropped base is gone; the newest point restores.
    let listed: Vec<String> = repo
        .store()
        .list("")
        .await?
        .into_iter()
        .map(|m| m.key)
        .collect();
    for k in &foreign {
        ensure!(listed.contains(k), "{k} was deleted: {listed:?}");
    }
    ensure!(
        !listed.contains(&keys::base_descriptor_key(dropped)),
        "the dropped base was not swept"
    );
    let after = repo.load().await?;
    ensure!(after.history.bases.len() == 1);
    ensure!(after.history.latest_seq() == Some(oracle.last_seq()));
    // A second sweep goes on the same way.
    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "0s"])?;
    ensure!(code == 0 && out.contains("left alone"), "{out}{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_keys_do_not_stop_pruning_local() -> Result<()> {
    foreign_keys_do_not_stop_pruning(TestStore::local()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_keys_do_not_stop_pruning_s3() -> Result<()> {
    with_s3("hostile-foreign", foreign_keys_do_not_stop_pruning).await
}

/// The first table file of the newest base, and its bytes.
async fn an_sst(s: &Setup) -> Result<(String, Vec<u8>)> {
    let repo = s.store.open().await?;
    let state = repo.load().await?;
    let g = state.generation.context("no generation")?;
    let base = state.history.bases.last().context("no base")?;
    let d = repo.read_base(g.generation, base).await?;
    let f = d
        .files
        .iter()
        .find(|f| f.key.starts_with(keys::SST_PREFIX))
        .context("the base has no table file")?;
    let bytes = s.store.open_raw().await?.get(&f.key).await?.to_vec();
    Ok((f.key.clone(), bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reads_content_on_a_local_store_and_names_a_flipped_byte() -> Result<()> {
    let s = setup(TestStore::local()?)?;
    archived_history(&s, "3").await?;
    let url = s.store.url.clone();
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url])?;
    ensure!(code == 0 && out.contains("every object read"), "{out}");
    ensure!(out.contains("OK: no problems found"), "{out}");

    let (key, mut bytes) = an_sst(&s).await?;
    let i = bytes.len() / 2;
    bytes[i] ^= 0x04;
    std::fs::write(s.store.local_root().unwrap().join(&key), &bytes)?;
    for scope in [&[][..], &["--all"][..]] {
        let mut args = vec!["verify", "--from", &url];
        args.extend_from_slice(scope);
        let (code, out, _) = s.run("tidemark-restore", &args)?;
        ensure!(code == 4, "a flipped byte in {key} must fail verify: {out}");
        ensure!(out.contains(&key) && !out.contains("OK:"), "{out}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_on_s3_says_sizes_only_unless_deep() -> Result<()> {
    let Some(store) = TestStore::s3("hostile-verify").await? else {
        return Ok(());
    };
    let s = setup(store)?;
    archived_history(&s, "3").await?;
    let url = s.store.url.clone();
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url])?;
    ensure!(code == 6, "sizes only has its own exit code: {out}");
    ensure!(
        out.contains("sizes only") && out.contains("NOT VERIFIED") && !out.contains("OK:"),
        "{out}"
    );
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url, "--deep"])?;
    ensure!(code == 0 && out.contains("OK: no problems found"), "{out}");

    // A flipped byte of the same size: the default cannot see it and does not say OK;
    // --deep names it.
    let (key, mut bytes) = an_sst(&s).await?;
    let i = bytes.len() / 2;
    bytes[i] ^= 0x04;
    s3_put_raw(&s.store, &key, bytes).await?;
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url])?;
    ensure!(code == 6 && !out.contains("OK:"), "{out}");
    let (code, out, _) = s.run("tidemark-restore", &["verify", "--from", &url, "--deep"])?;
    ensure!(code == 4 && out.contains(&key), "{out}");
    Ok(())
}
