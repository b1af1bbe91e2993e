//! The writer lease under races, on the S3 server (whose conditional create is atomic) and
//! on the local store: of many archivers starting at once on one repository, exactly one
//! gets the lease; the others are refused with a message naming the holder.

use std::time::Duration;

use anyhow::{Result, ensure};
use tidemark_archiver::lease::{LeaseError, LeaseHandle};
use tidemark_tests::harness::TestStore;

async fn race(store: TestStore) -> Result<()> {
    if let Some(root) = store.local_root() {
        std::fs::create_dir_all(root)?;
    }
    let repo = store.open().await?;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            LeaseHandle::acquire(&repo, Duration::from_secs(60)).await
        }));
    }
    let mut winners = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await? {
            Ok(h) => winners.push(h),
            Err(e @ LeaseError::Held { .. }) => {
                ensure!(e.to_string().contains("another archiver"), "{e}");
                refused += 1;
            }
            Err(e) => anyhow::bail!("unexpected lease error on {}: {e}", store.describe),
        }
    }
    ensure!(
        winners.len() == 1 && refused == 11,
        "{} winners, {refused} refused on {}",
        winners.len(),
        store.describe
    );
    eprintln!(
        "lease race on {}: 1 winner, {refused} refused",
        store.describe
    );
    let winner = winners.pop().unwrap();
    winner.release().await?;
    // Released: the next one gets it at once.
    let again = LeaseHandle::acquire(&repo, Duration::from_secs(60)).await?;
    again.release().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_lease_holder_among_racers_on_s3() -> Result<()> {
    match TestStore::s3("lease-race").await? {
        Some(store) => race(store).await,
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_lease_holder_among_racers_on_the_local_store() -> Result<()> {
    race(TestStore::local()?).await
}
