//! A repository someone tampered with, against the real programs: symbolic links planted
//! in a local-directory repository never lead `tidemark-archiver prune` to files outside it.

use anyhow::{Result, ensure};
use tidemark_tests::harness::{TestStore, with_s3};
use tidemark_tests::setup::Setup;

#[tokio::test(flavor = "multi_thread")]
async fn prune_never_deletes_through_a_link_planted_in_the_repository() -> Result<()> {
    // Writes for a few seconds while an archiver takes a base every second.
    let s = Setup::new(TestStore::local()?)?.base_interval("1s");
    let writes = [
        "--duration",
        "2",
        "--rate",
        "300",
        "--seed",
        "5",
        "--flush-every",
        "200",
    ];
    s.archive(&writes, &[]).await?;
    let root = s.local_root()?;

    // "The live database": files outside the repository.
    let live = s.path("live-db");
    std::fs::create_dir(&live)?;
    for name in ["CURRENT", "MANIFEST-000005", "000009.sst"] {
        std::fs::write(live.join(name), format!("live {name}"))?;
    }
    let lone = s.path("lone-file");
    std::fs::write(&lone, b"live too")?;
    // An unreferenced base whose files directory is a link to it, and a base file that is
    // a link to a file outside.
    std::fs::create_dir_all(root.join("bases/planted"))?;
    let dir_link = root.join("bases/planted/files");
    std::os::unix::fs::symlink(&live, &dir_link)?;
    std::fs::create_dir_all(root.join("bases/planted2/files"))?;
    let file_link = root.join("bases/planted2/files/CURRENT");
    std::os::unix::fs::symlink(&lone, &file_link)?;

    let (code, out, err) = s.prune(&["--keep-last", "1", "--grace", "0s"])?;
    ensure!(code == 0, "prune exited {code}:\n{out}\n{err}");

    for name in ["CURRENT", "MANIFEST-000005", "000009.sst"] {
        ensure!(
            std::fs::read(live.join(name))? == format!("live {name}").as_bytes(),
            "{name} outside the repository was touched by prune:\n{err}"
        );
    }
    ensure!(
        std::fs::read(&lone)? == b"live too",
        "the lone file was touched"
    );
    for link in [&dir_link, &file_link] {
        ensure!(
            std::fs::symlink_metadata(link)?.is_symlink(),
            "the link {} was removed",
            link.display()
        );
        ensure!(
            err.contains("symbolic link") && err.contains(&link.display().to_string()),
            "prune does not report the link {}:\n{err}",
            link.display()
        );
    }
    Ok(())
}

/// A download of an object whose size the repository records stops once the object proves
/// longer, on every store: nothing is left at the destination. A read into memory stops
/// the same way.
async fn bounded_downloads_stop_at_the_recorded_size(store: TestStore) -> Result<()> {
    use tidemark_manifest::store::StoreError;
    let raw = store.open_raw().await?;
    raw.put(
        "bases/b/files/000009.sst",
        bytes::Bytes::from(vec![3u8; 300_000]),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("000009.sst");
    let key = "bases/b/files/000009.sst";
    ensure!(raw.get_to_file_max(key, &dest, 300_000).await? == 300_000);
    ensure!(raw.get_to_file_max(key, &dest, 400_000).await? == 300_000);
    std::fs::remove_file(&dest)?;
    match raw.get_to_file_max(key, &dest, 299_999).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            ensure!(e.to_string().contains(key), "{e}");
        }
        other => anyhow::bail!("{}: expected TooLarge, got {other:?}", store.describe),
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())?.collect();
    ensure!(left.is_empty(), "{}: left behind {left:?}", store.describe);

    // The same, hashed as it is written: the digest is of the bytes at the destination.
    let want = tidemark_manifest::checksum::sha256_hex(&[3u8; 300_000]);
    for max in [300_000, 400_000] {
        let got = raw.get_to_file_max_hashed(key, &dest, max).await?;
        ensure!(got.len == 300_000 && got.sha256 == want, "{got:?}");
        let (on_disk, _) = tidemark_manifest::checksum::sha256_file(&dest)?;
        ensure!(
            on_disk == want,
            "{}: the file holds other bytes",
            store.describe
        );
    }
    std::fs::remove_file(&dest)?;
    match raw.get_to_file_max_hashed(key, &dest, 299_999).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            ensure!(e.to_string().contains(key), "{e}");
        }
        other => anyhow::bail!("{}: expected TooLarge, got {other:?}", store.describe),
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())?.collect();
    ensure!(left.is_empty(), "{}: left behind {left:?}", store.describe);

    // Read whole into memory: the same bound.
    for max in [300_000, 400_000] {
        ensure!(raw.get_max(key, max).await?.len() == 300_000);
    }
    match raw.get_max(key, 299_999).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            ensure!(e.to_string().contains(key), "{e}");
        }
        other => anyhow::bail!(
            "{}: expected TooLarge, got {:?}",
            store.describe,
            other.map(|b| b.len())
        ),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bounded_downloads_stop_at_the_recorded_size_local() -> Result<()> {
    let store = TestStore::local()?;
    std::fs::create_dir_all(store.local_root().expect("local"))?;
    bounded_downloads_stop_at_the_recorded_size(store).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bounded_downloads_stop_at_the_recorded_size_s3() -> Result<()> {
    with_s3(
        "bounded-downloads",
        bounded_downloads_stop_at_the_recorded_size,
    )
    .await
}
