//! A repository written and read back through the store layer, on real files: the reading
//! rules of FORMAT.md §4.4, the write order of §4.5, and the errors a reader must give.

use bytes::Bytes;
use std::sync::Arc;
use tidemark_manifest::keys;
use tidemark_manifest::model::{self, FORMAT_VERSION, Generation, IndexPage};
use tidemark_manifest::plan::Target;
use tidemark_manifest::repo::{RepoError, Repository};
use tidemark_manifest::segment::EncodedSegment;
use tidemark_manifest::store::{LocalStore, ObjectStore};
use tidemark_manifest::testing::{self, config, write_base};

/// A segment of `n` single-sequence records starting at `first`.
fn segment(first: u64, n: u64) -> EncodedSegment {
    testing::encoded_segment(first, first + n - 1)
}

fn generation(n: u64) -> Generation {
    testing::generation(n, testing::at_secs(0))
}

/// Segments 1..=30 in an index page, 31..=50 only in the tail, one base at 5.
async fn populated() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
    let repo = Repository::new(store);
    repo.create_config(&config()).await.unwrap();
    let segs = [segment(1, 10), segment(11, 20)];
    for s in &segs {
        repo.write_segment(s).await.unwrap();
    }
    let page = IndexPage {
        format_version: FORMAT_VERSION,
        first_seq: 1,
        last_seq: 30,
        segments: segs.iter().map(|s| s.entry()).collect(),
    };
    let page_ref = repo.write_index_page(&page).await.unwrap();
    let base = write_base(&repo, 5).await;
    let mut g = generation(1);
    g.index_pages.push(page_ref);
    g.bases.push(base);
    g.tail_start_seq = 31;
    repo.write_generation(&g).await.unwrap();
    for s in [segment(31, 5), segment(36, 15)] {
        repo.write_segment(&s).await.unwrap();
    }
    (dir, repo)
}

#[tokio::test]
async fn reader_finds_indexed_and_tail_segments_without_listing() {
    let (_dir, repo) = populated().await;
    let state = repo.load().await.unwrap();
    assert_eq!(state.generation.as_ref().unwrap().generation, 1);
    assert_eq!(state.history.segments.len(), 4);
    assert_eq!(state.tail_segments, 2);
    assert_eq!(state.next_seq(), Some(51));
    let plan = state.history.plan(Target::Latest).unwrap();
    assert_eq!(plan.max_seq, 50);
    assert_eq!(plan.segments.len(), 4);
    // Every planned segment downloads and verifies.
    let scratch = tempfile::tempdir().unwrap();
    for s in &plan.segments {
        repo.fetch_segment(s, scratch.path()).await.unwrap();
    }
    let base = repo.read_base(1, &plan.base).await.unwrap();
    assert_eq!(base.files.len(), 1);
}

#[tokio::test]
async fn a_stale_or_missing_hint_still_finds_the_newest_generation() {
    let (_dir, repo) = populated().await;
    let mut g2 = repo.read_generation(1).await.unwrap().unwrap();
    g2.generation = 2;
    repo.write_generation(&g2).await.unwrap();
    // Make the hint stale: it names generation 1 again.
    repo.store()
        .put(
            keys::LATEST_HINT,
            Bytes::from(model::to_document_bytes(&model::LatestHint {
                format_version: FORMAT_VERSION,
                generation: 1,
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        repo.current_generation().await.unwrap().unwrap().generation,
        2
    );
    repo.store().delete(keys::LATEST_HINT).await.unwrap();
    assert_eq!(
        repo.current_generation().await.unwrap().unwrap().generation,
        2
    );
}

#[tokio::test]
async fn a_second_writer_of_the_same_generation_loses() {
    let (_dir, repo) = populated().await;
    let mut g = repo.read_generation(1).await.unwrap().unwrap();
    g.writer.pid += 1;
    let err = repo.write_generation(&g).await.unwrap_err();
    assert!(
        matches!(err, RepoError::LostRace { generation: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("another writer"), "{err}");
}

#[tokio::test]
async fn a_flipped_byte_in_any_object_is_named() {
    let (dir, repo) = populated().await;
    let state = repo.load().await.unwrap();
    let g = state.generation.unwrap();
    let page_key = g.index_pages[0].key.clone();
    let base_key = g.bases[0].descriptor.key.clone();
    for key in [page_key.as_str(), base_key.as_str()] {
        let path = dir.path().join(key);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let err = match key.starts_with("index/") {
            true => repo.load().await.unwrap_err(),
            false => repo.read_base(1, &g.bases[0]).await.unwrap_err(),
        };
        let msg = err.to_string();
        assert!(
            msg.contains(key) && msg.contains("checksum mismatch"),
            "{msg}"
        );
        bytes[i] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
    }
    // A segment, indexed and found by the tail walk.
    let scratch = tempfile::tempdir().unwrap();
    for s in [&state.history.segments[0], &state.history.segments[3]] {
        let path = dir.path().join(&s.key);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 50;
        bytes[i] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = repo.fetch_segment(s, scratch.path()).await.unwrap_err();
        assert!(err.to_string().contains(&s.key), "{err}");
    }
}

#[tokio::test]
async fn a_truncated_segment_is_named() {
    let (dir, repo) = populated().await;
    let state = repo.load().await.unwrap();
    let s = &state.history.segments[3];
    let path = dir.path().join(&s.key);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let err = repo.fetch_segment(s, scratch.path()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&s.key) && msg.contains("truncated"), "{msg}");
    // A segment cut inside its header breaks the tail walk loudly.
    std::fs::write(&path, &bytes[..60]).unwrap();
    let err = repo.load().await.unwrap_err();
    assert!(err.to_string().contains(&s.key), "{err}");
}

#[tokio::test]
async fn unknown_version_missing_object_and_missing_repository_are_clear() {
    let (dir, repo) = populated().await;
    // A manifest that references a missing object.
    let g = repo.read_generation(1).await.unwrap().unwrap();
    std::fs::remove_file(dir.path().join(&g.index_pages[0].key)).unwrap();
    let err = repo.load().await.unwrap_err();
    assert!(matches!(err, RepoError::MissingObject { .. }), "{err}");
    assert!(err.to_string().contains(&g.index_pages[0].key), "{err}");
    // A generation from a newer format.
    let mut g2 = serde_json::to_value(&g).unwrap();
    g2["format_version"] = 2.into();
    g2["generation"] = 2.into();
    repo.store()
        .put(
            &keys::generation_key(2),
            Bytes::from(model::to_document_bytes(&g2)),
        )
        .await
        .unwrap();
    let err = repo.load().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("format version 2") && msg.contains("manifest/"),
        "{msg}"
    );
    // No repository at all.
    let empty = tempfile::tempdir().unwrap();
    let repo = Repository::new(Arc::new(LocalStore::open(empty.path()).unwrap()));
    let err = repo.load().await.unwrap_err();
    assert!(matches!(err, RepoError::NoRepository { .. }), "{err}");
}

#[tokio::test]
async fn a_repository_belongs_to_one_database() {
    let (_dir, repo) = populated().await;
    let mut other = config();
    other.database_identity = "db-2".into();
    let err = repo.create_config(&other).await.unwrap_err();
    assert!(matches!(err, RepoError::WrongDatabase { .. }), "{err}");
    // The same database gets the existing config back.
    let mut same = config();
    same.repository_id = "new-id".into();
    assert_eq!(
        repo.create_config(&same).await.unwrap().repository_id,
        "repo-1"
    );
}

#[tokio::test]
async fn rewriting_an_existing_segment_is_idempotent_but_a_different_one_conflicts() {
    let (_dir, repo) = populated().await;
    repo.write_segment(&segment(31, 5)).await.unwrap();
    let err = repo.write_segment(&segment(31, 6)).await.unwrap_err();
    assert!(matches!(err, RepoError::Conflict { .. }), "{err}");
}

#[tokio::test]
async fn sending_the_same_generation_again_is_not_a_race() {
    let (_dir, repo) = populated().await;
    let mut g2 = repo.read_generation(1).await.unwrap().unwrap();
    g2.generation = 2;
    repo.write_generation(&g2).await.unwrap();
    // A retry of the very same document (its first reply was lost) succeeds.
    repo.write_generation(&g2).await.unwrap();
    // Different content under the same number is another writer.
    g2.tail_start_seq += 1;
    let err = repo.write_generation(&g2).await.unwrap_err();
    assert!(
        matches!(err, RepoError::LostRace { generation: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_flipped_byte_in_a_manifest_generation_is_named() {
    let (dir, repo) = populated().await;
    let key = keys::generation_key(1);
    let path = dir.path().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    // A digit inside the document: still valid JSON, so only the checksum can tell.
    let i = bytes.iter().rposition(|b| b.is_ascii_digit()).unwrap();
    bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
    std::fs::write(&path, &bytes).unwrap();
    let err = repo.load().await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&key) && msg.contains("corrupt"), "{msg}");
}

#[tokio::test]
async fn a_download_for_replay_checks_what_the_reader_will_not() {
    let (dir, repo) = populated().await;
    let state = repo.load().await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // Indexed (sha256 recorded) and found by the tail walk (none recorded): both download.
    let (indexed, tail) = (&state.history.segments[0], &state.history.segments[3]);
    assert!(indexed.sha256.is_some() && tail.sha256.is_none());
    for s in [indexed, tail] {
        repo.fetch_segment_for_replay(s, scratch.path())
            .await
            .unwrap();
    }
    // A flipped bit in a frame: the indexed one fails on its object sha256 before any
    // frame is read; the tail one fails its full decode, since nothing else covers it.
    for s in [indexed, tail] {
        let path = dir.path().join(&s.key);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 50;
        bytes[i] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = repo
            .fetch_segment_for_replay(s, scratch.path())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&s.key), "{err}");
    }
}
