//! A repository on a store: reading its current state the way FORMAT.md §4.4 says (no LIST),
//! and writing objects in the order §4.5 requires. The archiver and the restore tool both go
//! through here, so neither has its own idea of the layout.

use crate::checksum::{self, ChecksumMismatch};
use crate::keyring::{self, FileKeyWrapper, KeyringError};
use crate::keys;
use crate::model::{
    self, BaseDescriptor, BaseSummary, Encryption, FORMAT_VERSION, Generation, IndexPage,
    IndexPageRef, LatestHint, ModelError, ObjectLock, ObjectRef, RepositoryConfig, SegmentEntry,
};
use crate::plan::{History, HistoryProblem};
use crate::retention::{KeyClass, Protection};
use crate::segment::{EncodedSegment, HEADER_LEN, SegmentError, SegmentHeader, SegmentReader};
use crate::store::crypt::{self, CryptStore, EncryptionKey};
use crate::store::{ObjectStore, StoreError, StoreUrl};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors reading or writing a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "there is no Tidemark repository at {location} ({key} is missing); check the URL, or \
         start the archiver to create one"
    )]
    NoRepository { location: String, key: String },
    #[error(
        "{location} holds a repository for database {found}, not for this database ({expected}); \
         archive this database to its own URL"
    )]
    WrongDatabase {
        location: String,
        expected: String,
        found: String,
    },
    #[error(
        "manifest generation {generation} was created by another writer while this one was \
         writing to {location}; this writer stops so that the history is not forked"
    )]
    LostRace { location: String, generation: u64 },
    #[error("{key} already exists at {location} with different content; refusing to overwrite it")]
    Conflict { location: String, key: String },
    #[error("refusing to delete {key} at {location}: {reason}")]
    NotDeletable {
        location: String,
        key: String,
        reason: String,
    },
    #[error(
        "{location}: manifest generation {generation} references {key}, which is missing: {source}"
    )]
    MissingObject {
        location: String,
        generation: u64,
        key: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("{location}: the history is inconsistent: {}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    History {
        location: String,
        problems: Vec<HistoryProblem>,
    },
    #[error(
        "the repository at {location} is encrypted (key id {key_id}); pass its key with \
         --encryption-key-file PATH (or TIDEMARK_ENCRYPTION_KEY_FILE) or TIDEMARK_ENCRYPTION_KEY"
    )]
    KeyRequired { location: String, key_id: String },
    #[error(
        "the encryption key given (key id {given}) is not the key of the repository at \
         {location} (key id {expected}); pass the key the repository was created with"
    )]
    WrongKey {
        location: String,
        expected: String,
        given: String,
    },
    #[error(
        "the repository at {location} is not encrypted, but an encryption key was given (key id \
         {given}); drop the key to use it, or archive to a new URL to get an encrypted \
         repository (an existing one is never encrypted in place)"
    )]
    NotEncrypted { location: String, given: String },
    #[error(
        "the repository at {location} is encrypted with {algorithm}, which this Tidemark does not \
         support (it knows {known})",
        known = crypt::ALGORITHM
    )]
    UnsupportedEncryption { location: String, algorithm: String },
    #[error(
        "the repository at {location} was created {recorded}, and {requested} was asked for; \
         a repository keeps the object lock it was created with (FORMAT.md §3.2): drop \
         --object-lock-mode and --object-lock-days (and the config file's object_lock_mode \
         and object_lock_days) to follow the recorded one, or archive to a new URL"
    )]
    LockMismatch {
        location: String,
        recorded: String,
        requested: String,
    },
    #[error("the repository at {location}: {source}")]
    Lock {
        location: String,
        #[source]
        source: crate::lock::LockError,
    },
    #[error(
        "{location} has no manifest generation {generation} (the newest is {newest}); \
         `list` shows the generation it reads, and pruning deletes old ones"
    )]
    NoSuchGeneration {
        location: String,
        generation: u64,
        newest: u64,
    },
    #[error(
        "{location}: {corrupt} is corrupt, and reading the generation before it ({generation}) \
         failed too: {source}"
    )]
    FallbackFailed {
        location: String,
        corrupt: String,
        generation: u64,
        #[source]
        source: Box<RepoError>,
    },
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Checksum(#[from] ChecksumMismatch),
}

impl RepoError {
    /// A repository created with the object lock `recorded` (or none) was asked to be
    /// written with `requested`.
    pub fn lock_mismatch(
        location: String,
        recorded: Option<ObjectLock>,
        requested: Option<ObjectLock>,
    ) -> RepoError {
        let shown = |l: Option<ObjectLock>| {
            l.map_or_else(
                || "without an object lock".to_owned(),
                |l| format!("with an object lock ({l})"),
            )
        };
        RepoError::LockMismatch {
            location,
            recorded: shown(recorded),
            requested: shown(requested).replacen("with ", "", 1),
        }
    }

    /// True for errors a person fixes by changing what was given (the URL, the key, the
    /// store settings) rather than by trying again: programs exit with their usage code.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RepoError::NoRepository { .. }
                | RepoError::WrongDatabase { .. }
                | RepoError::KeyRequired { .. }
                | RepoError::WrongKey { .. }
                | RepoError::NotEncrypted { .. }
                | RepoError::UnsupportedEncryption { .. }
                | RepoError::LockMismatch { .. }
                | RepoError::Lock { .. }
                | RepoError::NoSuchGeneration { .. }
                | RepoError::Store(StoreError::Config { .. })
                | RepoError::Keyring(
                    KeyringError::Retired { .. }
                        | KeyringError::WrongOldKey { .. }
                        | KeyringError::SameKey(_)
                        | KeyringError::NotEncrypted { .. }
                        | KeyringError::LegacyNeedsKeyFile { .. }
                )
        )
    }

    /// True when the error says that an object is damaged (a checksum, a document that does
    /// not parse or contradicts its key, an encrypted object that fails authentication),
    /// as opposed to missing, unreadable for now, or of a newer format.
    pub fn is_damage(&self) -> bool {
        match self {
            RepoError::Model(ModelError::UnsupportedVersion { .. }) => false,
            RepoError::Model(_) | RepoError::Checksum(_) | RepoError::Segment(_) => true,
            RepoError::Store(StoreError::Other { source, .. }) => {
                source.downcast_ref::<crypt::CryptError>().is_some_and(|c| {
                    matches!(
                        c,
                        crypt::CryptError::Tampered { .. }
                            | crypt::CryptError::BadSize { .. }
                            | crypt::CryptError::NotEncrypted
                    )
                })
            }
            _ => false,
        }
    }
}

/// Where a reader starts reading a repository's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFrom {
    /// The newest intact generation: newer ones that are corrupt are named and passed over
    /// (FORMAT.md §4.4).
    #[default]
    NewestIntact,
    /// Exactly this generation (an operator's choice: `--generation N`).
    Generation(u64),
}

/// Something a reader found while loading and worked around, naming the object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadWarning {
    /// The object concerned, when there is one.
    pub object: Option<String>,
    pub message: String,
    /// True when an object is damaged (the repository needs repair); false for advisory
    /// findings such as a stale hint.
    pub damage: bool,
}

impl LoadWarning {
    fn new(object: Option<String>, message: String, damage: bool) -> LoadWarning {
        if damage {
            tracing::warn!(object = object.as_deref().unwrap_or(""), "{message}");
        } else {
            tracing::info!(object = object.as_deref().unwrap_or(""), "{message}");
        }
        LoadWarning {
            object,
            message,
            damage,
        }
    }
}

/// What a reader knows about a repository after [`Repository::load`].
#[derive(Debug, Clone)]
pub struct RepoState {
    pub config: RepositoryConfig,
    /// The current generation, `None` if nothing was archived yet.
    pub generation: Option<Generation>,
    /// Bases, segments (indexed and from the tail walk) and gaps.
    pub history: History,
    /// How many segments the tail walk found after the current generation.
    pub tail_segments: usize,
    /// The newest generation that exists (`generation` is older when newer ones are corrupt
    /// or an older one was asked for); 0 if none.
    pub newest_generation: u64,
    /// What the reader found and worked around: corrupt generations passed over, a stale
    /// hint, segments an older generation cannot reach.
    pub warnings: Vec<LoadWarning>,
}

impl RepoState {
    /// The first sequence number not archived yet: where a writer continues.
    pub fn next_seq(&self) -> Option<u64> {
        let from_segments = self
            .history
            .segments
            .last()
            .map(|s| s.last_seq.saturating_add(1));
        let from_generation = self.generation.as_ref().map(|g| g.tail_start_seq);
        from_segments.max(from_generation)
    }

    /// True when a damaged object was found (and worked around) while loading.
    pub fn damaged(&self) -> bool {
        self.warnings.iter().any(|w| w.damage)
    }
}

/// What a listing of `wal/` shows ([`Repository::list_segments`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListedSegments {
    /// `(first sequence, key)` of every segment key, in sequence order.
    pub segments: Vec<(u64, String)>,
    /// Keys under `wal/` that are not segment keys.
    pub foreign: Vec<String>,
}

/// A repository on a store.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// How its objects are encrypted (`store` is then a [`CryptStore`]).
    encryption: Option<Encryption>,
    /// Its URL, when it was opened from one ([`Repository::with_url`]).
    url: Option<String>,
}

impl Repository {
    /// The repository at the root of `store`, its objects in the clear.
    pub fn new(store: Arc<dyn ObjectStore>) -> Repository {
        Repository {
            store,
            encryption: None,
            url: None,
        }
    }

    /// The same repository, known by `url` ([`Repository::url`]).
    pub fn with_url(mut self, url: &StoreUrl) -> Repository {
        self.url = Some(url.to_string());
        self
    }

    /// The repository at the root of `store`, with the encryption key the caller has (or
    /// none). An existing repository's `tidemark.json` decides: an encrypted one needs its
    /// own key, an unencrypted one takes none. Where there is no repository yet, one created
    /// through the result is encrypted exactly when a key is given (FORMAT.md §10).
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        key: Option<&EncryptionKey>,
    ) -> Result<Repository, RepoError> {
        let plain = Repository::new(Arc::clone(&store));
        let config = match plain.get_optional(keys::CONFIG).await? {
            Some(b) => Some(model::parse_document::<RepositoryConfig>(keys::CONFIG, &b)?),
            None => None,
        };
        let recorded = config.as_ref().map(|c| c.encryption.clone());
        let location = plain.location();
        let encryption = match (recorded, key) {
            (Some(None) | None, None) => return Ok(plain),
            (Some(Some(e)), None) => {
                let key_id = match plain.read_keyring().await? {
                    Some((ring, _)) => ring.kek_ids().into_iter().collect::<Vec<_>>().join(", "),
                    None => e.key_id,
                };
                return Err(RepoError::KeyRequired { location, key_id });
            }
            (Some(None), Some(k)) => {
                return Err(RepoError::NotEncrypted {
                    location,
                    given: k.key_id(),
                });
            }
            (Some(Some(e)), Some(_)) => e,
            (None, Some(k)) => Encryption {
                algorithm: crypt::ALGORITHM.to_owned(),
                chunk_size: crypt::DEFAULT_CHUNK_SIZE,
                key_id: k.key_id(),
            },
        };
        let key = key.expect("only a key reaches here");
        let ring = match &config {
            Some(_) if encryption.algorithm == crypt::ALGORITHM => plain.read_keyring().await?,
            _ => None,
        };
        let crypt = match (ring, &config) {
            (Some((ring, _)), Some(config)) => {
                let kek = FileKeyWrapper::new(key.clone());
                let data = keyring::open_data_keys(&location, &ring, config, &kek).await?;
                CryptStore::with_data_keys(store, &data, encryption.chunk_size)?
            }
            _ => {
                check_key(&location, Some(&encryption), Some(key))?;
                CryptStore::new(store, key, encryption.chunk_size)?
            }
        };
        Ok(Repository {
            store: Arc::new(crypt),
            encryption: Some(encryption),
            url: None,
        })
    }

    /// The encrypted repository at the root of `store`, opened with a key-encryption key
    /// that `kek` holds (FORMAT.md §10.7): a key file ([`Repository::open`] with its key),
    /// or a key service's key, which opens only a repository whose keyring it wraps.
    pub async fn open_wrapped(
        store: Arc<dyn ObjectStore>,
        kek: &dyn keyring::KeyWrapper,
    ) -> Result<Repository, RepoError> {
        if let Some(key) = kek.legacy_key() {
            return Repository::open(store, Some(key)).await;
        }
        let plain = Repository::new(Arc::clone(&store));
        let location = plain.location();
        let config = plain.read_config_unchecked().await?;
        let Some(encryption) = config.encryption.clone() else {
            return Err(KeyringError::NotEncrypted { location }.into());
        };
        check_algorithm(&location, &encryption)?;
        let Some((ring, _)) = plain.read_keyring().await? else {
            return Err(KeyringError::NoKeyring {
                location,
                key_id: encryption.key_id,
            }
            .into());
        };
        let data = keyring::open_data_keys(&location, &ring, &config, kek).await?;
        Ok(Repository {
            store: Arc::new(CryptStore::with_data_keys(
                store,
                &data,
                encryption.chunk_size,
            )?),
            encryption: Some(encryption),
            url: None,
        })
    }

    /// How the repository's objects are encrypted, `None` when they are not. A new
    /// repository's `tidemark.json` must record exactly this.
    pub fn encryption(&self) -> Option<&Encryption> {
        self.encryption.as_ref()
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.store.describe()
    }

    /// The repository's URL (`s3://bucket/prefix`, `file:///dir`), as recorded in a
    /// restored database's origin (FORMAT.md §11); [`Repository::location`] when it was
    /// not opened from a URL.
    pub fn url(&self) -> String {
        self.url.clone().unwrap_or_else(|| self.location())
    }

    /// Reads a whole document, `None` if there is none. One longer than a document may be
    /// is corrupt, refused once that many bytes arrived (FORMAT.md §3.1).
    async fn get_optional(&self, key: &str) -> Result<Option<Bytes>, RepoError> {
        match self.store.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(document_error(key, e)),
        }
    }

    /// Reads `tidemark.json` without checking it against the key the repository was opened
    /// with (a key rotation reads it before it has any); [`RepoError::NoRepository`] when
    /// there is none.
    pub(crate) async fn read_config_unchecked(&self) -> Result<RepositoryConfig, RepoError> {
        let Some(b) = self.get_optional(keys::CONFIG).await? else {
            return Err(RepoError::NoRepository {
                location: self.location(),
                key: keys::CONFIG.to_owned(),
            });
        };
        Ok(model::parse_document(keys::CONFIG, &b)?)
    }

    /// Reads `tidemark.json`, or `None` if there is no repository yet.
    pub async fn read_config(&self) -> Result<Option<RepositoryConfig>, RepoError> {
        let Some(b) = self.get_optional(keys::CONFIG).await? else {
            return Ok(None);
        };
        let config: RepositoryConfig = model::parse_document(keys::CONFIG, &b)?;
        self.check_encryption(&config)?;
        if config.object_lock.is_some() {
            self.store.set_object_lock(config.object_lock);
        }
        Ok(Some(config))
    }

    /// The object lock a writer follows (FORMAT.md §3.2), and the store set to write with
    /// it: an existing repository's recorded one (`requested`, when given, must equal it),
    /// else `requested`, for the repository the writer is about to create. A lock is
    /// refused on a store that cannot keep objects locked, saying why.
    pub async fn writer_object_lock(
        &self,
        requested: Option<ObjectLock>,
    ) -> Result<Option<ObjectLock>, RepoError> {
        let location = self.location();
        let lock = match self.read_config().await? {
            Some(config) => {
                if requested.is_some() && requested != config.object_lock {
                    return Err(RepoError::lock_mismatch(
                        location,
                        config.object_lock,
                        requested,
                    ));
                }
                config.object_lock
            }
            None => requested,
        };
        let Some(lock) = lock else {
            return Ok(None);
        };
        lock.validate().map_err(|source| RepoError::Lock {
            location: location.clone(),
            source,
        })?;
        self.store.check_object_lock().await?;
        self.store.set_object_lock(Some(lock));
        Ok(Some(lock))
    }

    /// Checks that a config records the encryption this repository was opened with.
    fn check_encryption(&self, config: &RepositoryConfig) -> Result<(), RepoError> {
        let location = self.location();
        match (&config.encryption, &self.encryption) {
            (None, None) => Ok(()),
            (Some(e), None) => Err(RepoError::KeyRequired {
                location,
                key_id: e.key_id.clone(),
            }),
            (None, Some(ours)) => Err(RepoError::NotEncrypted {
                location,
                given: ours.key_id.clone(),
            }),
            (Some(e), Some(ours)) if e != ours => {
                if e.algorithm != ours.algorithm {
                    Err(RepoError::UnsupportedEncryption {
                        location,
                        algorithm: e.algorithm.clone(),
                    })
                } else if e.key_id != ours.key_id {
                    Err(RepoError::WrongKey {
                        location,
                        expected: e.key_id.clone(),
                        given: ours.key_id.clone(),
                    })
                } else {
                    Err(ModelError::Inconsistent {
                        key: keys::CONFIG.to_owned(),
                        detail: format!(
                            "its encryption chunk size changed from {} to {} since the \
                             repository was opened",
                            ours.chunk_size, e.chunk_size
                        ),
                    }
                    .into())
                }
            }
            (Some(_), Some(_)) => Ok(()),
        }
    }

    /// Creates `tidemark.json` (create-only). If a config already exists it is returned
    /// instead, provided it belongs to the same database.
    pub async fn create_config(
        &self,
        config: &RepositoryConfig,
    ) -> Result<RepositoryConfig, RepoError> {
        self.check_encryption(config)?;
        if config.object_lock.is_some() {
            // `tidemark.json` is locked like every object of the layout.
            self.store.set_object_lock(config.object_lock);
        }
        let bytes = Bytes::from(model::to_document_bytes(config));
        match self.store.put_if_absent(keys::CONFIG, bytes).await {
            Ok(_) => Ok(config.clone()),
            Err(StoreError::PreconditionFailed { .. }) => {
                let existing = self
                    .read_config()
                    .await?
                    .ok_or_else(|| RepoError::Conflict {
                        location: self.location(),
                        key: keys::CONFIG.to_owned(),
                    })?;
                if existing.database_identity != config.database_identity {
                    return Err(RepoError::WrongDatabase {
                        location: self.location(),
                        expected: config.database_identity.clone(),
                        found: existing.database_identity,
                    });
                }
                Ok(existing)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Finds and reads the current generation (FORMAT.md §4.4 steps 2–3): the newest one,
    /// which must be intact.
    pub async fn current_generation(&self) -> Result<Option<Generation>, RepoError> {
        let newest = self.newest_generation_number(&mut Vec::new()).await?;
        self.read_newest(newest).await
    }

    async fn read_newest(&self, newest: u64) -> Result<Option<Generation>, RepoError> {
        if newest == 0 {
            return Ok(None);
        }
        let g = self
            .read_generation(newest)
            .await?
            .ok_or_else(|| RepoError::NoSuchGeneration {
                location: self.location(),
                generation: newest,
                newest,
            })?;
        Ok(Some(g))
    }

    /// The number of the newest generation that exists, 0 if there is none (FORMAT.md §4.4
    /// steps 2–3). The hint is advisory: one that is missing, unreadable or names a
    /// generation that does not exist is noted, and a listing finds where to probe from.
    async fn newest_generation_number(
        &self,
        warnings: &mut Vec<LoadWarning>,
    ) -> Result<u64, RepoError> {
        let hint_key = keys::LATEST_HINT;
        let parsed = match self.get_optional(hint_key).await {
            Ok(None) => None,
            Ok(Some(b)) => Some(model::parse_document::<LatestHint>(hint_key, &b)),
            Err(RepoError::Model(e)) => Some(Err(e)),
            Err(e) => return Err(e),
        };
        let hint = match parsed {
            None => None,
            Some(Ok(h)) => Some(h.generation),
            Some(Err(e)) => {
                warnings.push(LoadWarning::new(
                    Some(hint_key.to_owned()),
                    format!(
                        "{e}; the hint is advisory: the newest generation was found by listing"
                    ),
                    !matches!(e, ModelError::UnsupportedVersion { .. }),
                ));
                None
            }
        };
        let start = match hint {
            Some(0) => 0,
            Some(n) if self.generation_exists(n).await? => n,
            Some(n) => {
                let listed = self.generation_from_listing().await?;
                warnings.push(LoadWarning::new(
                    Some(hint_key.to_owned()),
                    format!(
                        "it names generation {n}, which does not exist; the hint is advisory: \
                         the newest generation was found by listing"
                    ),
                    false,
                ));
                listed
            }
            None => {
                let listed = self.generation_from_listing().await?;
                if listed > 0 && warnings.is_empty() {
                    warnings.push(LoadWarning::new(
                        Some(hint_key.to_owned()),
                        "it is missing although manifest generations exist; the newest was \
                         found by listing"
                            .to_owned(),
                        false,
                    ));
                }
                listed
            }
        };
        let mut newest = start;
        while self.generation_exists(newest + 1).await? {
            newest += 1;
        }
        Ok(newest)
    }

    async fn generation_exists(&self, n: u64) -> Result<bool, RepoError> {
        Ok(self.store.head(&keys::generation_key(n)).await?.is_some())
    }

    /// The newest generation a listing shows (the loud fallback of FORMAT.md §4.4).
    async fn generation_from_listing(&self) -> Result<u64, RepoError> {
        let listed = self.store.list(keys::MANIFEST_PREFIX).await?;
        Ok(listed
            .iter()
            .filter_map(|m| keys::parse_generation_key(&m.key))
            .max()
            .unwrap_or(0))
    }

    /// The newest intact generation at or below `newest`. Corrupt ones are passed over,
    /// each named in `warnings`; if no intact one is left, the first damage is the error.
    async fn newest_intact(
        &self,
        newest: u64,
        warnings: &mut Vec<LoadWarning>,
    ) -> Result<Option<Generation>, RepoError> {
        let mut first_damage = None;
        let mut n = newest;
        while n > 0 {
            match self.read_generation(n).await {
                Ok(Some(g)) => return Ok(Some(g)),
                Ok(None) => break,
                Err(e) if e.is_damage() => {
                    warnings.push(LoadWarning::new(
                        Some(keys::generation_key(n)),
                        format!(
                            "manifest generation {n} is corrupt ({e}); it was passed over and \
                             the repository read from the generation before it, whose \
                             segments after it are found by the tail walk"
                        ),
                        true,
                    ));
                    first_damage.get_or_insert(e);
                    n -= 1;
                }
                Err(e) => return Err(e),
            }
        }
        match first_damage {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Reads generation `n`, or `None` if it does not exist.
    pub async fn read_generation(&self, n: u64) -> Result<Option<Generation>, RepoError> {
        let key = keys::generation_key(n);
        let Some(bytes) = self.get_optional(&key).await? else {
            return Ok(None);
        };
        let g: Generation = model::parse_document(&key, &bytes)?;
        if g.generation != n {
            return Err(ModelError::Inconsistent {
                key,
                detail: format!("it says it is generation {}", g.generation),
            }
            .into());
        }
        Ok(Some(g))
    }

    /// Reads and verifies an object a generation references.
    async fn get_referenced(&self, generation: u64, r: &ObjectRef) -> Result<Bytes, RepoError> {
        let bytes = self.store.get(&r.key).await.map_err(|e| match e {
            StoreError::NotFound { .. } => RepoError::MissingObject {
                location: self.location(),
                generation,
                key: r.key.clone(),
                source: Box::new(e),
            },
            other => document_error(&r.key, other),
        })?;
        checksum::check_bytes(&r.key, &r.sha256, r.size, &bytes)?;
        Ok(bytes)
    }

    /// Reads and verifies an index page.
    pub async fn read_index_page(
        &self,
        generation: u64,
        r: &IndexPageRef,
    ) -> Result<IndexPage, RepoError> {
        let obj = ObjectRef {
            key: r.key.clone(),
            size: r.size,
            sha256: r.sha256.clone(),
        };
        let bytes = self.get_referenced(generation, &obj).await?;
        let page: IndexPage = model::parse_document(&r.key, &bytes)?;
        if page.first_seq != r.first_seq
            || page.last_seq != r.last_seq
            || page.segments.len() as u64 != r.segment_count
        {
            return Err(ModelError::Inconsistent {
                key: r.key.clone(),
                detail: "the page does not cover what the manifest says it covers".to_owned(),
            }
            .into());
        }
        Ok(page)
    }

    /// Reads and verifies a base descriptor.
    pub async fn read_base(
        &self,
        generation: u64,
        summary: &BaseSummary,
    ) -> Result<BaseDescriptor, RepoError> {
        keys::check_base_id(&summary.id).map_err(|e| ModelError::Inconsistent {
            key: keys::generation_key(generation),
            detail: e.to_string(),
        })?;
        let bytes = self.get_referenced(generation, &summary.descriptor).await?;
        let d: BaseDescriptor = model::parse_document(&summary.descriptor.key, &bytes)?;
        d.check(&summary.descriptor.key, summary)?;
        Ok(d)
    }

    /// Reads the header of the segment starting at `first_seq`, or `None` if there is none.
    pub async fn read_segment_header(
        &self,
        first_seq: u64,
    ) -> Result<Option<SegmentHeader>, RepoError> {
        let key = keys::segment_key(first_seq);
        match self.store.get_range(&key, 0..HEADER_LEN as u64).await {
            Ok(bytes) => {
                let h = SegmentHeader::decode(&key, &bytes)?;
                if h.first_seq != first_seq {
                    return Err(SegmentError::Inconsistent {
                        key,
                        detail: format!("its header says it starts at sequence {}", h.first_seq),
                    }
                    .into());
                }
                Ok(Some(h))
            }
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(StoreError::InvalidRange { size, .. }) => Err(SegmentError::WrongLength {
                key,
                expected: HEADER_LEN as u64,
                found: size.unwrap_or(0),
            }
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Walks segments from `from_seq` on while they exist (FORMAT.md §4.4 step 5).
    pub async fn walk_tail(&self, from_seq: u64) -> Result<Vec<SegmentEntry>, RepoError> {
        let mut out = Vec::new();
        let mut next = from_seq;
        while let Some(h) = self.read_segment_header(next).await? {
            out.push(h.entry(&keys::segment_key(next), None));
            next = h.last_seq.saturating_add(1);
        }
        Ok(out)
    }

    /// Loads the repository's current state: config, the newest generation, its index
    /// pages, the tail. Fails if the newest generation is corrupt or the history does not
    /// hold together: what a writer needs before it adds to the history.
    pub async fn load(&self) -> Result<RepoState, RepoError> {
        let config = self.require_config().await?;
        let mut warnings = Vec::new();
        let newest = self.newest_generation_number(&mut warnings).await?;
        let generation = self.read_newest(newest).await?;
        self.state_from(config, generation, newest, warnings).await
    }

    /// Loads the repository's state for reading (list, restore, verify): from the newest
    /// intact generation, or from the one `from` names (FORMAT.md §4.4, reader rules).
    /// Everything passed over is in [`RepoState::warnings`], and logged.
    pub async fn load_for_reading(&self, from: ReadFrom) -> Result<RepoState, RepoError> {
        let config = self.require_config().await?;
        let mut warnings = Vec::new();
        let newest = self.newest_generation_number(&mut warnings).await?;
        let generation = match from {
            ReadFrom::NewestIntact => self.newest_intact(newest, &mut warnings).await?,
            ReadFrom::Generation(n) => {
                let g = self.read_generation(n).await?;
                Some(g.ok_or_else(|| RepoError::NoSuchGeneration {
                    location: self.location(),
                    generation: n,
                    newest,
                })?)
            }
        };
        let fell_back = warnings
            .iter()
            .find(|w| w.damage)
            .and_then(|w| w.object.clone());
        let read = generation.as_ref().map(|g| g.generation);
        let result = self.state_from(config, generation, newest, warnings).await;
        match (result, fell_back, read) {
            (Err(e), Some(corrupt), Some(generation)) if generation < newest => {
                Err(RepoError::FallbackFailed {
                    location: self.location(),
                    corrupt,
                    generation,
                    source: Box::new(e),
                })
            }
            (result, _, _) => result,
        }
    }

    /// Reads `tidemark.json`; there being none is [`RepoError::NoRepository`].
    pub async fn require_config(&self) -> Result<RepositoryConfig, RepoError> {
        self.read_config()
            .await?
            .ok_or_else(|| RepoError::NoRepository {
                location: self.location(),
                key: keys::CONFIG.to_owned(),
            })
    }

    /// The state `generation` describes: its index pages, then the tail walk from its
    /// `tail_start_seq`.
    async fn state_from(
        &self,
        config: RepositoryConfig,
        generation: Option<Generation>,
        newest: u64,
        mut warnings: Vec<LoadWarning>,
    ) -> Result<RepoState, RepoError> {
        let mut history = History::default();
        let mut tail_from = 1;
        if let Some(g) = &generation {
            if g.repository_id != config.repository_id {
                return Err(ModelError::Inconsistent {
                    key: keys::generation_key(g.generation),
                    detail: format!(
                        "it belongs to repository {}, not {}",
                        g.repository_id, config.repository_id
                    ),
                }
                .into());
            }
            for r in &g.index_pages {
                let page = self.read_index_page(g.generation, r).await?;
                history.segments.extend(page.segments);
            }
            history.bases = g.bases.clone();
            history.gaps = g.gaps.clone();
            tail_from = g.tail_start_seq;
        }
        let tail = self.walk_tail(tail_from).await?;
        let tail_segments = tail.len();
        history.segments.extend(tail);
        let problems = history.problems();
        if !problems.is_empty() {
            return Err(RepoError::History {
                location: self.location(),
                problems,
            });
        }
        let read = generation.as_ref().map_or(0, |g| g.generation);
        if read < newest {
            let walked_to = history
                .segments
                .last()
                .map_or(tail_from, |s| s.last_seq.saturating_add(1));
            warnings.push(self.older_generation_note(read, newest, walked_to).await);
        }
        Ok(RepoState {
            config,
            generation,
            history,
            tail_segments,
            newest_generation: newest,
            warnings,
        })
    }

    /// What reading generation `read` rather than the newest, `newest`, leaves out: the walk
    /// found every segment up to `walked_to`; segments after a gap or a pruned hole that a
    /// newer generation recorded are found only by listing, and named here.
    async fn older_generation_note(&self, read: u64, newest: u64, walked_to: u64) -> LoadWarning {
        let mut message = format!(
            "read from manifest generation {read}, not the newest ({newest}); the tail walk \
             found the segments written after it, up to sequence {}",
            walked_to.saturating_sub(1)
        );
        match self.list_segments().await {
            Ok(listed) => {
                let beyond: Vec<(u64, String)> = listed
                    .segments
                    .into_iter()
                    .filter(|&(s, _)| s >= walked_to)
                    .collect();
                // One starting right there continues the walk: uploaded since, not cut off.
                let continues = beyond.first().is_some_and(|&(s, _)| s == walked_to);
                if let Some((_, first)) = beyond.first().filter(|_| !continues) {
                    message.push_str(&format!(
                        "; {} segments after that, from {first}, are out of reach without a \
                         newer generation (it records the gap before them)",
                        beyond.len()
                    ));
                }
            }
            Err(e) => message.push_str(&format!(
                "; whether segments exist after that could not be checked: {e}"
            )),
        }
        LoadWarning::new(None, message, false)
    }

    /// Whether the repository was pruned under a reader that planned from generation
    /// `planned` and then found `key`, which that generation references, missing.
    /// `Some(what happened)` when the planned generation has been deleted since, or a newer
    /// generation no longer references `key` (pruning then deletes it once the grace period
    /// is over); `None` when `key` should still exist, so that it is missing or damaged.
    pub async fn pruned_since(&self, planned: u64, key: &str) -> Result<Option<String>, RepoError> {
        if !self.generation_exists(planned).await? {
            return Ok(Some(format!(
                "manifest generation {planned}, which it planned from, has been deleted since"
            )));
        }
        let newest = self.newest_generation_number(&mut Vec::new()).await?;
        let Some(g) = self.newest_intact(newest, &mut Vec::new()).await? else {
            return Ok(None);
        };
        if g.generation <= planned {
            return Ok(None);
        }
        let mut p = Protection::new();
        p.add_generation(&g);
        if key.starts_with(keys::SST_PREFIX) {
            for b in &g.bases {
                match self.read_base(g.generation, b).await {
                    Ok(d) => p.add_base(&d),
                    Err(_) => return Ok(None),
                }
            }
        }
        Ok(match p.classify(key) {
            KeyClass::Unreferenced(_) => Some(format!(
                "manifest generation {}, written at {} after generation {planned} it planned \
                 from, no longer references {key}",
                g.generation,
                g.written_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            )),
            KeyClass::Protected | KeyClass::Foreign => None,
        })
    }

    /// Uploads a segment (create-only). If the same segment is already there (a retry after
    /// a crash), that is success; a different one is a conflict.
    pub async fn write_segment(&self, seg: &EncodedSegment) -> Result<(), RepoError> {
        let key = seg.key();
        match self.store.put_if_absent(&key, seg.bytes.clone()).await {
            Ok(_) => Ok(()),
            Err(StoreError::PreconditionFailed { .. }) => {
                // Longer than this segment: another one (read no further).
                let existing = match self.store.get_max(&key, seg.bytes.len() as u64).await {
                    Err(StoreError::TooLarge { .. }) => Bytes::new(),
                    other => other?,
                };
                if checksum::sha256_hex(&existing) == seg.sha256 {
                    Ok(())
                } else {
                    Err(RepoError::Conflict {
                        location: self.location(),
                        key,
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a base's descriptor, `bases/<id>/base.json` (create-only; FORMAT.md §4.5:
    /// after every file it lists), and returns the reference a generation holds for it. Its
    /// id and files are checked as a reader checks them first. A descriptor already there is
    /// [`RepoError::Conflict`]: two bases were given the same id.
    pub async fn put_base_descriptor(&self, d: &BaseDescriptor) -> Result<ObjectRef, RepoError> {
        let key = keys::base_descriptor_key(&d.id);
        let bad = |detail: String| ModelError::Inconsistent {
            key: key.clone(),
            detail,
        };
        keys::check_base_id(&d.id).map_err(|e| bad(e.to_string()))?;
        model::check_base_files(&d.files).map_err(|e| bad(e.to_string()))?;
        let bytes = model::to_document_bytes(d);
        let r = ObjectRef {
            key: key.clone(),
            size: bytes.len() as u64,
            sha256: checksum::sha256_hex(&bytes),
        };
        match self.store.put_if_absent(&key, Bytes::from(bytes)).await {
            Ok(_) => Ok(r),
            Err(StoreError::PreconditionFailed { .. }) => Err(RepoError::Conflict {
                location: self.location(),
                key,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads a base's file from `path` to `key`, which must be a key of a base's data
    /// ([`keys::base_object_key`]). A plain put: whatever was under the key is replaced, as
    /// FORMAT.md §4.6 requires of an object no base of the current generation lists.
    pub async fn put_base_file(&self, key: &str, path: &Path) -> Result<(), RepoError> {
        match keys::parse_listed_key(key) {
            Ok(keys::LayoutKey::Table { .. } | keys::LayoutKey::BaseFile { .. }) => {}
            _ => {
                return Err(ModelError::Inconsistent {
                    key: key.to_owned(),
                    detail: "a base's files go under sst/<sha256> or bases/<id>/files/<name>"
                        .to_owned(),
                }
                .into());
            }
        }
        self.store.put_file(key, path).await?;
        Ok(())
    }

    /// Deletes `key`, an object a pruning sweep found unreferenced (FORMAT.md §4.6). Only
    /// keys of the layout are deleted, and never `tidemark.json`, `lease.json` or the hint:
    /// anything else is [`RepoError::NotDeletable`], and nothing is deleted.
    pub async fn delete_unreferenced(&self, key: &str) -> Result<(), RepoError> {
        let refuse = |reason: String| RepoError::NotDeletable {
            location: self.location(),
            key: key.to_owned(),
            reason,
        };
        match keys::parse_listed_key(key) {
            Err(e) => return Err(refuse(e.reason)),
            Ok(
                keys::LayoutKey::Config
                | keys::LayoutKey::Lease
                | keys::LayoutKey::Keyring
                | keys::LayoutKey::LatestHint,
            ) => {
                return Err(refuse(
                    "the repository config, the lease, the keyring and the hint are never \
                     deleted"
                        .to_owned(),
                ));
            }
            Ok(_) => {}
        }
        self.store.delete(key).await?;
        Ok(())
    }

    /// The segments a listing of `wal/` shows, by first sequence, in order, with the keys
    /// that are not segment keys apart. A LIST: for maintenance and `verify --all`, never
    /// for finding the current state.
    pub async fn list_segments(&self) -> Result<ListedSegments, RepoError> {
        let mut out = ListedSegments::default();
        for meta in self.store.list(keys::WAL_PREFIX).await? {
            match keys::parse_segment_key(&meta.key) {
                Some(first) => out.segments.push((first, meta.key)),
                None => out.foreign.push(meta.key),
            }
        }
        out.segments.sort();
        Ok(out)
    }

    /// Uploads an index page and returns the reference a generation holds for it.
    pub async fn write_index_page(&self, page: &IndexPage) -> Result<IndexPageRef, RepoError> {
        let bytes = model::to_document_bytes(page);
        let r = page.reference(Some(&bytes))?;
        let key = r.key.clone();
        self.store.put(&key, Bytes::from(bytes)).await?;
        Ok(r)
    }

    /// Creates generation `g.generation` (create-only), then updates the hint. Losing the
    /// create to another writer is [`RepoError::LostRace`].
    pub async fn write_generation(&self, g: &Generation) -> Result<(), RepoError> {
        let key = keys::generation_key(g.generation);
        let bytes = Bytes::from(model::to_document_bytes(g));
        match self.store.put_if_absent(&key, bytes.clone()).await {
            Ok(_) => {}
            Err(StoreError::PreconditionFailed { .. }) => {
                // Ours already, if an earlier attempt landed but its reply was lost (one
                // longer than ours is not: read no further).
                let existing = match self.store.get_max(&key, bytes.len() as u64).await {
                    Err(StoreError::TooLarge { .. }) => Bytes::new(),
                    other => other?,
                };
                if existing != bytes {
                    return Err(RepoError::LostRace {
                        location: self.location(),
                        generation: g.generation,
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        let hint = LatestHint {
            format_version: FORMAT_VERSION,
            generation: g.generation,
        };
        self.store
            .put(
                keys::LATEST_HINT,
                Bytes::from(model::to_document_bytes(&hint)),
            )
            .await?;
        Ok(())
    }

    /// Downloads a segment to `dir` and verifies it completely (sha256 if indexed, then the
    /// trailer and every frame), returning the verified file.
    pub async fn fetch_segment(
        &self,
        entry: &SegmentEntry,
        dir: &Path,
    ) -> Result<PathBuf, RepoError> {
        self.fetch_segment_checked(entry, dir, SegmentCheck::Full)
            .await
    }

    /// Downloads a segment to `dir` for a reader that decodes it whole anyway (a replay):
    /// a segment whose object sha256 the manifest records is checked against it and not
    /// decoded here, since [`SegmentReader`] checks every frame and the trailer again as it
    /// reads; one found by the tail walk (no sha256 recorded) is decoded completely, as
    /// [`Repository::fetch_segment`] does, so that no record of an unchecked object is used
    /// before the whole object has been read.
    pub async fn fetch_segment_for_replay(
        &self,
        entry: &SegmentEntry,
        dir: &Path,
    ) -> Result<PathBuf, RepoError> {
        let check = match entry.sha256 {
            Some(_) => SegmentCheck::Sha256,
            None => SegmentCheck::Full,
        };
        self.fetch_segment_checked(entry, dir, check).await
    }

    async fn fetch_segment_checked(
        &self,
        entry: &SegmentEntry,
        dir: &Path,
        check: SegmentCheck,
    ) -> Result<PathBuf, RepoError> {
        let first =
            keys::parse_segment_key(&entry.key).ok_or_else(|| ModelError::Inconsistent {
                key: entry.key.clone(),
                detail: "not a segment key".to_owned(),
            })?;
        let path = dir.join(format!("{first:016x}.seg"));
        // The header declares the object's length: a longer object stops there, not at a full disk.
        let size = self
            .store
            .get_to_file_max(&entry.key, &path, entry.stored_size)
            .await?;
        let key = entry.key.clone();
        let expected_sha = entry.sha256.clone();
        let stored_size = entry.stored_size;
        let checked = path.clone();
        tokio::task::spawn_blocking(move || match check {
            SegmentCheck::Full => {
                verify_segment_file(&key, &checked, size, expected_sha, stored_size).map(|_| ())
            }
            SegmentCheck::Sha256 => check_segment_sha256(&key, &checked, expected_sha, stored_size),
        })
        .await
        .expect("segment verification does not panic")?;
        Ok(path)
    }
}

/// How much of a downloaded segment is checked before it is handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentCheck {
    /// The object's sha256 (when recorded), then a full decode.
    Full,
    /// The object's sha256 only: the reader checks the frames.
    Sha256,
}

/// A store error reading document `key`: one longer than a document may be is corrupt.
pub(crate) fn document_error(key: &str, e: StoreError) -> RepoError {
    match e {
        StoreError::TooLarge { limit, .. } => {
            model::too_long(key, &format!("it is longer than {limit} bytes")).into()
        }
        other => other.into(),
    }
}

/// Checks a downloaded segment file against the sha256 and size the manifest records.
fn check_segment_sha256(
    key: &str,
    path: &Path,
    expected_sha256: Option<String>,
    expected_size: u64,
) -> Result<(), RepoError> {
    let Some(sha) = expected_sha256 else {
        return Err(SegmentError::Inconsistent {
            key: key.to_owned(),
            detail: "no sha256 is recorded for it, so it must be decoded whole".to_owned(),
        }
        .into());
    };
    let (found, len) = checksum::sha256_file(path).map_err(|source| SegmentError::Io {
        key: key.to_owned(),
        source,
    })?;
    checksum::check(key, &sha, expected_size, &found, len)?;
    Ok(())
}

/// Verifies a downloaded segment file: its whole-object sha256 when known, then a full
/// decode (header, frames, trailer).
pub fn verify_segment_file(
    key: &str,
    path: &Path,
    size: u64,
    expected_sha256: Option<String>,
    expected_size: u64,
) -> Result<SegmentHeader, RepoError> {
    let io = |source| SegmentError::Io {
        key: key.to_owned(),
        source,
    };
    if let Some(sha) = expected_sha256 {
        let (found, len) = checksum::sha256_file(path).map_err(io)?;
        checksum::check(key, &sha, expected_size, &found, len)?;
    }
    let file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut reader = SegmentReader::new(key, file, Some(size))?;
    while reader.next_record()?.is_some() {}
    Ok(*reader.header())
}

/// Checks that this Tidemark knows a repository's encryption algorithm.
pub(crate) fn check_algorithm(location: &str, e: &Encryption) -> Result<(), RepoError> {
    if e.algorithm != crypt::ALGORITHM {
        return Err(RepoError::UnsupportedEncryption {
            location: location.to_owned(),
            algorithm: e.algorithm.clone(),
        });
    }
    Ok(())
}

/// Checks a key against the encryption a repository records.
fn check_key(
    location: &str,
    recorded: Option<&Encryption>,
    key: Option<&EncryptionKey>,
) -> Result<(), RepoError> {
    if let (Some(e), Some(k)) = (recorded, key) {
        check_algorithm(location, e)?;
        let given = k.key_id();
        if e.key_id != given {
            return Err(RepoError::WrongKey {
                location: location.to_owned(),
                expected: e.key_id.clone(),
                given,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BaseFile, FORMAT_VERSION};
    use crate::store::MemoryStore;

    fn repo() -> Repository {
        Repository::new(Arc::new(MemoryStore::new()))
    }

    fn descriptor(id: &str, files: Vec<BaseFile>) -> BaseDescriptor {
        let t = time::OffsetDateTime::UNIX_EPOCH;
        BaseDescriptor {
            format_version: FORMAT_VERSION,
            id: id.to_owned(),
            created_at: t,
            database_identity: "db".to_owned(),
            min_log_number: 1,
            replay_from_seq: 1,
            earliest_seq: 1,
            earliest_time: t,
            next_file_number: 2,
            column_families: Vec::new(),
            files,
        }
    }

    fn current(id: &str) -> BaseFile {
        BaseFile {
            name: "CURRENT".to_owned(),
            size: 16,
            sha256: "ab".repeat(32),
            key: keys::base_file_key(id, "CURRENT"),
        }
    }

    #[tokio::test]
    async fn a_base_descriptor_is_checked_created_once_and_read_back() {
        let r = repo();
        let d = descriptor("b1", vec![current("b1")]);
        let obj = r.put_base_descriptor(&d).await.unwrap();
        assert_eq!(obj.key, "bases/b1/base.json");
        let stored = r.store().get(&obj.key).await.unwrap();
        checksum::check_bytes(&obj.key, &obj.sha256, obj.size, &stored).unwrap();
        let e = r.put_base_descriptor(&d).await.unwrap_err();
        assert!(matches!(e, RepoError::Conflict { .. }), "{e}");
        // What a reader would refuse is never written.
        let no_current = descriptor("b2", Vec::new());
        let e = r.put_base_descriptor(&no_current).await.unwrap_err();
        assert!(e.to_string().contains("no CURRENT"), "{e}");
        let bad_id = descriptor("b/3", vec![current("b3")]);
        assert!(r.put_base_descriptor(&bad_id).await.is_err());
        assert!(
            r.store()
                .head("bases/b2/base.json")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn only_base_data_keys_take_a_base_file() {
        let r = repo();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let sst = keys::base_object_key("b1", "000001.sst", &"cd".repeat(32));
        r.put_base_file(&sst, &path).await.unwrap();
        r.put_base_file(&keys::base_object_key("b1", "CURRENT", "-"), &path)
            .await
            .unwrap();
        for key in [keys::LEASE, keys::CONFIG, "bases/b1/base.json", "wal/x"] {
            let e = r.put_base_file(key, &path).await.unwrap_err();
            assert!(
                e.to_string().contains("a base's files go under"),
                "{key}: {e}"
            );
        }
        assert!(r.store().head(keys::LEASE).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_sweep_deletes_only_layout_objects_and_never_the_config_lease_keyring_or_hint() {
        let r = repo();
        let seg = keys::segment_key(7);
        for key in [
            keys::CONFIG,
            keys::LEASE,
            keys::KEYRING,
            keys::LATEST_HINT,
            "notes.txt",
            &seg,
        ] {
            r.store().put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        r.delete_unreferenced(&seg).await.unwrap();
        assert!(r.store().head(&seg).await.unwrap().is_none());
        for key in [
            keys::CONFIG,
            keys::LEASE,
            keys::KEYRING,
            keys::LATEST_HINT,
            "notes.txt",
        ] {
            let e = r.delete_unreferenced(key).await.unwrap_err();
            assert!(matches!(e, RepoError::NotDeletable { .. }), "{key}: {e}");
            assert!(
                r.store().head(key).await.unwrap().is_some(),
                "{key} deleted"
            );
        }
    }

    #[tokio::test]
    async fn listed_segments_are_in_sequence_order_with_foreign_keys_apart() {
        let r = repo();
        for key in [
            keys::segment_key(0x100),
            keys::segment_key(3),
            "wal/README".into(),
        ] {
            r.store().put(&key, Bytes::from_static(b"x")).await.unwrap();
        }
        let listed = r.list_segments().await.unwrap();
        assert_eq!(
            listed.segments,
            vec![(3, keys::segment_key(3)), (0x100, keys::segment_key(0x100))]
        );
        assert_eq!(listed.foreign, vec!["wal/README".to_owned()]);
    }
}
