//! One damaged document does not take a repository down (FORMAT.md §4.4, reader rules): a
//! reader passes over a corrupt newest generation to the newest intact one and finds what
//! was written after it with the tail walk; the latest hint is advisory; a reader that
//! finds an object gone can tell whether the repository was pruned under it.

use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use tidemark_manifest::keys;
use tidemark_manifest::model::{
    self, FORMAT_VERSION, Gap, GapKind, Generation, IndexPage, time_from_micros,
};
use tidemark_manifest::plan::Target;
use tidemark_manifest::repo::{ReadFrom, RepoError, Repository};
use tidemark_manifest::segment::EncodedSegment;
use tidemark_manifest::store::{LocalStore, ObjectStore};
use tidemark_manifest::testing::{
    self, T0_US as T0, config, encoded_segment as segment, write_base,
};

fn generation(n: u64) -> Generation {
    testing::generation(n, testing::at_secs(n as i64))
}

/// Generation 1 indexes 1..=30, generation 2 also 31..=50; segment 51..=60 is only in the
/// tail of generation 2. One base, restorable from 5.
async fn two_generations() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
    let repo = Repository::new(store);
    repo.create_config(&config()).await.unwrap();
    let mut pages = Vec::new();
    for range in [[(1, 10), (11, 30)], [(31, 35), (36, 50)]] {
        let segs: Vec<EncodedSegment> = range.iter().map(|&(a, b)| segment(a, b)).collect();
        for s in &segs {
            repo.write_segment(s).await.unwrap();
        }
        let page = IndexPage {
            format_version: FORMAT_VERSION,
            first_seq: range[0].0,
            last_seq: range[1].1,
            segments: segs.iter().map(EncodedSegment::entry).collect(),
        };
        pages.push(repo.write_index_page(&page).await.unwrap());
    }
    let base = write_base(&repo, 5).await;
    let mut g1 = generation(1);
    g1.index_pages = pages[..1].to_vec();
    g1.bases = vec![base.clone()];
    g1.tail_start_seq = 31;
    repo.write_generation(&g1).await.unwrap();
    let mut g2 = g1.clone();
    g2.generation = 2;
    g2.written_at = generation(2).written_at;
    g2.index_pages = pages.clone();
    g2.tail_start_seq = 51;
    repo.write_generation(&g2).await.unwrap();
    repo.write_segment(&segment(51, 60)).await.unwrap();
    (dir, repo)
}

/// Flips one digit inside a document: still valid JSON, so only its checksum tells.
fn flip_digit(root: &Path, key: &str) {
    let path = root.join(key);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.iter().rposition(|b| b.is_ascii_digit()).unwrap();
    bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
    std::fs::write(&path, &bytes).unwrap();
}

#[tokio::test]
async fn a_corrupt_newest_generation_is_passed_over_and_nothing_after_it_is_lost() {
    let (dir, repo) = two_generations().await;
    let g2 = keys::generation_key(2);
    flip_digit(dir.path(), &g2);

    // A writer must not build on a history it cannot read: it refuses, naming the object.
    let e = repo.load().await.unwrap_err();
    assert!(e.is_damage() && e.to_string().contains(&g2), "{e}");

    // A reader falls back to generation 1 and still finds everything up to 60.
    let state = repo.load_for_reading(ReadFrom::NewestIntact).await.unwrap();
    assert_eq!(state.generation.as_ref().unwrap().generation, 1);
    assert_eq!(state.newest_generation, 2);
    assert!(state.damaged());
    let damage: Vec<_> = state.warnings.iter().filter(|w| w.damage).collect();
    assert_eq!(damage.len(), 1, "{:?}", state.warnings);
    assert_eq!(damage[0].object.as_deref(), Some(g2.as_str()));
    assert!(damage[0].message.contains("corrupt"), "{:?}", damage[0]);
    let plan = state.history.plan(Target::Latest).unwrap();
    assert_eq!(
        plan.max_seq, 60,
        "the tail walk found what generation 2 indexed"
    );
    assert_eq!(state.tail_segments, 3);
    let note = state.warnings.iter().find(|w| !w.damage).unwrap();
    assert!(note.message.contains("up to sequence 60"), "{note:?}");
    assert!(!note.message.contains("out of reach"), "{note:?}");

    // Every generation corrupt: nothing to fall back to, and the error names the newest.
    flip_digit(dir.path(), &keys::generation_key(1));
    let e = repo
        .load_for_reading(ReadFrom::NewestIntact)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&g2), "{e}");
}

#[tokio::test]
async fn segments_beyond_a_gap_only_the_corrupt_generation_records_are_named() {
    let (dir, repo) = two_generations().await;
    // Generation 3 indexes 51..=60 and records 61..=70 as lost; 71..=80 was archived after
    // the gap.
    repo.write_segment(&segment(71, 80)).await.unwrap();
    let mut g3 = repo.read_generation(2).await.unwrap().unwrap();
    g3.generation = 3;
    let page = IndexPage {
        format_version: FORMAT_VERSION,
        first_seq: 51,
        last_seq: 60,
        segments: vec![segment(51, 60).entry()],
    };
    g3.index_pages
        .push(repo.write_index_page(&page).await.unwrap());
    g3.tail_start_seq = 71;
    g3.gaps.push(Gap {
        first_seq: 61,
        last_seq: 70,
        kind: GapKind::MissingWal,
        detected_at: time_from_micros(T0),
        detail: "test".into(),
    });
    repo.write_generation(&g3).await.unwrap();
    let intact = repo.load_for_reading(ReadFrom::NewestIntact).await.unwrap();
    assert_eq!(intact.history.segments.last().unwrap().last_seq, 80);
    flip_digit(dir.path(), &keys::generation_key(3));
    let state = repo.load_for_reading(ReadFrom::NewestIntact).await.unwrap();
    assert_eq!(state.generation.as_ref().unwrap().generation, 2);
    assert_eq!(state.history.segments.last().unwrap().last_seq, 60);
    let note = state.warnings.iter().find(|w| !w.damage).unwrap();
    assert!(
        note.message
            .contains("1 segments after that, from wal/0000000000000047.seg"),
        "{note:?}"
    );
}

#[tokio::test]
async fn a_generation_can_be_chosen_and_a_missing_one_is_bad_input() {
    let (_dir, repo) = two_generations().await;
    let state = repo
        .load_for_reading(ReadFrom::Generation(1))
        .await
        .unwrap();
    assert_eq!(state.generation.as_ref().unwrap().generation, 1);
    assert!(!state.damaged());
    assert_eq!(
        state.history.plan(Target::Latest).unwrap().max_seq,
        60,
        "an older generation loses nothing the tail walk reaches"
    );
    let e = repo
        .load_for_reading(ReadFrom::Generation(7))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RepoError::NoSuchGeneration {
                generation: 7,
                newest: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_usage(), "{e}");
}

#[tokio::test]
async fn the_hint_is_advisory_even_when_it_names_a_missing_generation() {
    let (_dir, repo) = two_generations().await;
    for (bytes, damage) in [
        (
            model::to_document_bytes(&model::LatestHint {
                format_version: FORMAT_VERSION,
                generation: 9,
            }),
            false,
        ),
        (b"{\"checksum\":\"00\", garbage".to_vec(), true),
    ] {
        repo.store()
            .put(keys::LATEST_HINT, Bytes::from(bytes))
            .await
            .unwrap();
        let state = repo.load().await.unwrap();
        assert_eq!(state.generation.as_ref().unwrap().generation, 2);
        let w = &state.warnings[0];
        assert_eq!(w.object.as_deref(), Some(keys::LATEST_HINT), "{w:?}");
        assert_eq!(w.damage, damage, "{w:?}");
        assert_eq!(
            repo.current_generation().await.unwrap().unwrap().generation,
            2
        );
    }
}

#[tokio::test]
async fn a_newer_format_is_never_passed_over() {
    let (_dir, repo) = two_generations().await;
    let mut g3 = serde_json::to_value(repo.read_generation(2).await.unwrap().unwrap()).unwrap();
    g3["format_version"] = 2.into();
    g3["generation"] = 3.into();
    repo.store()
        .put(
            &keys::generation_key(3),
            Bytes::from(model::to_document_bytes(&g3)),
        )
        .await
        .unwrap();
    let e = repo
        .load_for_reading(ReadFrom::NewestIntact)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("format version 2"), "{e}");
}

#[tokio::test]
async fn a_reader_can_tell_that_the_repository_was_pruned_under_it() {
    let (_dir, repo) = two_generations().await;
    let g2 = repo.read_generation(2).await.unwrap().unwrap();
    let page = g2.index_pages[1].key.clone();
    let seg = keys::segment_key(36);
    // Still referenced by the newest generation: a missing object, not pruning.
    assert_eq!(repo.pruned_since(2, &page).await.unwrap(), None);
    assert_eq!(repo.pruned_since(2, &seg).await.unwrap(), None);
    // Generation 3 drops 31..=50 (a pruned hole, its page gone).
    let mut g3 = g2.clone();
    g3.generation = 3;
    g3.index_pages.truncate(1);
    g3.gaps.push(Gap {
        first_seq: 31,
        last_seq: 50,
        kind: GapKind::Pruned,
        detected_at: time_from_micros(T0),
        detail: "test".into(),
    });
    repo.write_generation(&g3).await.unwrap();
    let why = repo.pruned_since(2, &seg).await.unwrap().unwrap();
    assert!(why.contains("generation 3") && why.contains(&seg), "{why}");
    assert!(repo.pruned_since(2, &page).await.unwrap().is_some());
    // What generation 3 still references is not explained away.
    assert_eq!(
        repo.pruned_since(2, &keys::segment_key(11)).await.unwrap(),
        None
    );
    // The planned generation itself deleted.
    repo.store().delete(&keys::generation_key(1)).await.unwrap();
    let why = repo.pruned_since(1, &seg).await.unwrap().unwrap();
    assert!(
        why.contains("generation 1") && why.contains("deleted"),
        "{why}"
    );
}
