//! The keyring of an encrypted repository, `keyring.json` (FORMAT.md §10.7): envelope
//! encryption and key rotation.
//!
//! Objects are sealed with *data keys*; the keyring holds each data key *wrapped* (sealed)
//! by the repository key, the key-encryption key given with `--encryption-key-file`. A
//! repository starts without a keyring, its objects sealed directly with the repository key
//! (FORMAT.md §10.1–§10.6): that key is then its one data key. The first rotation creates
//! the keyring with that key as a *legacy* data key and a fresh data key for new objects;
//! every rotation after rewraps the data keys and rewrites no object.
//!
//! [`KeyWrapper`] is what wraps and unwraps a data key: [`FileKeyWrapper`] (a key file) here;
//! a KMS implements the same trait. [`rekey`] rotates, crash-safe: it first writes the new
//! key's wraps beside the old ones (a compare-and-swap of the keyring, or its create-only
//! write), then drops every other wrap with a second compare-and-swap, so a repository
//! interrupted at any point opens with the old key or the new one, and the same command run
//! again finishes the rotation.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys;
use crate::model::{self, FORMAT_VERSION, ModelError, RepositoryConfig};
use crate::repo::{RepoError, Repository};
use crate::store::crypt::{self, EncryptionKey};
use crate::store::{ETag, ObjectStore, StoreError};

/// The wrapping scheme of [`FileKeyWrapper`], as written in each wrap.
pub const FILE_SCHEME: &str = "file-xchacha20-poly1305";
/// At most this many data keys in a keyring (one is added per migration; rotations add none).
pub const MAX_DATA_KEYS: usize = 64;
/// At most this many wraps of one data key (two during a rotation).
pub const MAX_WRAPS: usize = 8;
/// At most this many retired key-encryption keys are remembered (for messages).
pub const MAX_RETIRED: usize = 256;
/// At most this many hex digits in one wrapped key (a KMS ciphertext is a few hundred bytes).
pub const MAX_WRAPPED_HEX: usize = 8192;
/// At most this many bytes in an id (a file key's id is 16 hex digits; a KMS key's an ARN).
pub const MAX_ID_LEN: usize = 512;

const WRAP_KEY_INFO: &[u8] = b"tidemark key wrapping key v1";
const WRAP_AAD_DOMAIN: &[u8] = b"tidemark data key v1\0";
const NONCE_LEN: usize = 24;

/// `keyring.json` (FORMAT.md §10.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    pub format_version: u32,
    /// The repository whose data keys these are (`repository_id` of `tidemark.json`).
    pub repository_id: String,
    /// The id of the data key new objects are sealed with.
    pub active: String,
    /// Every data key an object of the repository may be sealed with.
    pub keys: Vec<DataKeyEntry>,
    /// Key-encryption keys a rotation removed, newest last (for messages only).
    #[serde(default)]
    pub retired: Vec<RetiredKek>,
    #[serde(with = "model::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// One data key of a keyring: its id and its wraps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyEntry {
    /// The data key's id (FORMAT.md §10.3), as object headers name it.
    pub id: String,
    /// True for the repository key a repository was created with, which sealed its objects
    /// before the keyring existed.
    #[serde(default)]
    pub legacy: bool,
    pub wraps: Vec<Wrap>,
}

/// A data key sealed by one key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrap {
    /// How it is sealed: [`FILE_SCHEME`], or a KMS's scheme.
    pub scheme: String,
    /// The key-encryption key's id.
    pub kek: String,
    /// The wrapped key, hex.
    pub wrapped: String,
}

/// A key-encryption key that no longer opens the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredKek {
    pub kek: String,
    #[serde(with = "model::rfc3339")]
    pub retired_at: OffsetDateTime,
}

impl Keyring {
    /// Parses and checks `keyring.json` (FORMAT.md §3.1 and §10.7): its checksum, version,
    /// schema and limits.
    pub fn parse(bytes: &[u8]) -> Result<Keyring, ModelError> {
        let ring: Keyring = model::parse_document(keys::KEYRING, bytes)?;
        ring.validate().map_err(|detail| ModelError::Inconsistent {
            key: keys::KEYRING.to_owned(),
            detail,
        })?;
        Ok(ring)
    }

    /// The rules of FORMAT.md §10.7 that the schema does not say.
    pub fn validate(&self) -> Result<(), String> {
        if self.keys.is_empty() || self.keys.len() > MAX_DATA_KEYS {
            return Err(format!(
                "it holds {} data keys (1 to {MAX_DATA_KEYS})",
                self.keys.len()
            ));
        }
        if self.retired.len() > MAX_RETIRED || self.repository_id.len() > MAX_ID_LEN {
            return Err("it is larger than any keyring a writer makes".to_owned());
        }
        let mut ids = BTreeSet::new();
        for k in &self.keys {
            if k.id.len() != 16 || !k.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(format!("data key id {:?} is not 16 hex digits", k.id));
            }
            if !ids.insert(k.id.as_str()) {
                return Err(format!("data key {} is listed twice", k.id));
            }
            if k.wraps.is_empty() || k.wraps.len() > MAX_WRAPS {
                return Err(format!(
                    "data key {} has {} wraps (1 to {MAX_WRAPS})",
                    k.id,
                    k.wraps.len()
                ));
            }
            for w in &k.wraps {
                if w.kek.is_empty() || w.kek.len() > MAX_ID_LEN || w.scheme.len() > MAX_ID_LEN {
                    return Err(format!("data key {} has a wrap with a bad key id", k.id));
                }
                if w.wrapped.len() > MAX_WRAPPED_HEX {
                    return Err(format!("data key {} has an oversized wrap", k.id));
                }
            }
        }
        if !ids.contains(self.active.as_str()) {
            return Err(format!("its active data key {} is not in it", self.active));
        }
        let first = self.kek_ids();
        if self.keys.iter().any(|k| k.kek_ids() != first) {
            return Err("its data keys are not all wrapped by the same keys".to_owned());
        }
        Ok(())
    }

    /// The key-encryption keys that open it (every data key is wrapped by each of them).
    pub fn kek_ids(&self) -> BTreeSet<String> {
        self.keys.first().map(|k| k.kek_ids()).unwrap_or_default()
    }

    /// Whether a rotation retired the key-encryption key `kek`.
    pub fn is_retired(&self, kek: &str) -> bool {
        self.retired.iter().any(|r| r.kek == kek)
    }
}

impl DataKeyEntry {
    fn kek_ids(&self) -> BTreeSet<String> {
        self.wraps.iter().map(|w| w.kek.clone()).collect()
    }
}

/// What a wrap is bound to: the repository and the data key.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub repository_id: &'a str,
    pub data_key_id: &'a str,
}

impl WrapContext<'_> {
    /// The associated data of a wrap by the key-encryption key `kek` (FORMAT.md §10.7).
    pub fn aad(&self, kek: &str) -> Vec<u8> {
        let mut aad = WRAP_AAD_DOMAIN.to_vec();
        for part in [self.repository_id, self.data_key_id, kek] {
            let len = u32::try_from(part.len()).expect("ids are short");
            aad.extend_from_slice(&len.to_le_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }
}

/// Why a data key could not be wrapped or unwrapped.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error(
        "data key {data_key} of keyring.json failed authentication with key id {kek}: the \
         keyring was modified, or copied from another repository"
    )]
    Tampered { data_key: String, kek: String },
    #[error("the key service failed: {0}")]
    Service(String),
}

/// Wraps and unwraps data keys with one key-encryption key: a key file
/// ([`FileKeyWrapper`]) or a KMS key.
#[async_trait]
pub trait KeyWrapper: Send + Sync + fmt::Debug {
    /// The wrapping scheme, written in each wrap.
    fn scheme(&self) -> &str;
    /// The key-encryption key's id (a key file's key id; a KMS key's ARN), safe to show.
    fn kek_id(&self) -> String;
    /// Seals `data_key`, bound to `ctx`.
    async fn wrap(
        &self,
        ctx: WrapContext<'_>,
        data_key: &EncryptionKey,
    ) -> Result<Vec<u8>, WrapError>;
    /// Opens a wrap made by [`KeyWrapper::wrap`] with the same `ctx`.
    async fn unwrap(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &[u8],
    ) -> Result<EncryptionKey, WrapError>;
    /// The key itself, when it may also be a repository's legacy data key (a key file);
    /// `None` for a KMS key, which never leaves the service.
    fn legacy_key(&self) -> Option<&EncryptionKey> {
        None
    }
}

/// A key file as key-encryption key: data keys are sealed with XChaCha20-Poly1305 under a
/// key derived from it (FORMAT.md §10.7).
#[derive(Debug, Clone)]
pub struct FileKeyWrapper {
    key: EncryptionKey,
}

impl FileKeyWrapper {
    pub fn new(key: EncryptionKey) -> FileKeyWrapper {
        FileKeyWrapper { key }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        let k = self.key.derive(WRAP_KEY_INFO);
        XChaCha20Poly1305::new_from_slice(k.as_ref()).expect("a derived key is 32 bytes")
    }
}

#[async_trait]
impl KeyWrapper for FileKeyWrapper {
    fn scheme(&self) -> &str {
        FILE_SCHEME
    }

    fn kek_id(&self) -> String {
        self.key.key_id()
    }

    async fn wrap(
        &self,
        ctx: WrapContext<'_>,
        data_key: &EncryptionKey,
    ) -> Result<Vec<u8>, WrapError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let aad = ctx.aad(&self.kek_id());
        let sealed = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: data_key.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("a 32-byte key is within XChaCha20-Poly1305's limits");
        Ok([nonce.as_slice(), &sealed].concat())
    }

    async fn unwrap(
        &self,
        ctx: WrapContext<'_>,
        wrapped: &[u8],
    ) -> Result<EncryptionKey, WrapError> {
        let tampered = || WrapError::Tampered {
            data_key: ctx.data_key_id.to_owned(),
            kek: self.kek_id(),
        };
        if wrapped.len() != NONCE_LEN + crypt::KEY_LEN + crypt::TAG_LEN {
            return Err(tampered());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| tampered())?;
        let aad = ctx.aad(&self.kek_id());
        let plain = zeroize::Zeroizing::new(
            self.cipher()
                .decrypt(
                    &nonce,
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| tampered())?,
        );
        let mut bytes = [0u8; crypt::KEY_LEN];
        bytes.copy_from_slice(&plain);
        let key = EncryptionKey::from_bytes(bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        Ok(key)
    }

    fn legacy_key(&self) -> Option<&EncryptionKey> {
        Some(&self.key)
    }
}

/// The data keys of a repository, unwrapped: what [`crate::store::CryptStore`] seals and
/// opens objects with.
#[derive(Debug, Clone)]
pub struct DataKeys {
    /// Every data key.
    pub keys: Vec<EncryptionKey>,
    /// The id of the key new objects are sealed with.
    pub active: String,
    /// The id of the key that authenticates `tidemark.json` (its `encryption.key_id`).
    pub config: String,
}

impl DataKeys {
    /// The key with id `id`.
    pub fn get(&self, id: &str) -> Option<&EncryptionKey> {
        self.keys.iter().find(|k| k.key_id() == id)
    }
}

/// Why a keyring cannot be used or a rotation cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(
        "the encryption key given (key id {given}) was retired by a key rotation of the \
         repository at {location}; it opens it no more: pass its current key (key id \
         {current})"
    )]
    Retired {
        location: String,
        given: String,
        current: String,
    },
    #[error(
        "the old key given to rekey (key id {given}) does not open the repository at \
         {location} (its key id is {current}); nothing was changed: pass the repository's \
         current key as --old-key-file"
    )]
    WrongOldKey {
        location: String,
        given: String,
        current: String,
    },
    #[error(
        "the old and the new key are the same key (key id {0}); create a new key with `openssl rand -hex 32`"
    )]
    SameKey(String),
    #[error(
        "the repository at {location} is not encrypted; there is no key to rotate (an \
         existing repository is never encrypted in place)"
    )]
    NotEncrypted { location: String },
    #[error(
        "keyring.json at {location} changed while it was being rotated (another rekey ran at \
         the same time); run the same command again"
    )]
    Changed { location: String },
    #[error("keyring.json at {location} does not fit the repository: {detail}")]
    Inconsistent { location: String, detail: String },
    #[error(
        "the repository at {location} was created with key id {key_id} and has no keyring; \
         the first rotation needs that key as a key file (--old-key-file), not a key \
         service key"
    )]
    LegacyNeedsKeyFile { location: String, key_id: String },
    #[error(
        "the repository at {location} has no keyring: it opens only with the key file it was \
         created with (key id {key_id}); rotate it to this key with `tidemark-archiver rekey` \
         first"
    )]
    NoKeyring { location: String, key_id: String },
    #[error(
        "the repository at {location} has no keyring.json, but {object} is sealed with data \
         key {key_id}, which only a keyring holds: the keyring was lost (deleted, or hidden by \
         a delete marker in a versioned bucket). Restore its newest version (e.g. with `aws \
         s3api list-object-versions`) and run the rotation again; a new keyring now would \
         leave every object sealed with that data key unreadable"
    )]
    Lost {
        location: String,
        object: String,
        key_id: String,
    },
    #[error("keyring.json at {location}: {source}")]
    Wrap {
        location: String,
        #[source]
        source: WrapError,
    },
}

impl Repository {
    /// Reads `keyring.json` with its ETag, or `None` when the repository has none.
    pub async fn read_keyring(&self) -> Result<Option<(Keyring, ETag)>, RepoError> {
        match self.store().get_with_meta(keys::KEYRING).await {
            Ok((bytes, meta)) => Ok(Some((Keyring::parse(&bytes)?, meta.etag))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `keyring.json`: create-only without `etag`, else a compare-and-swap on it.
    /// `None` when the precondition failed (another writer's keyring is there).
    async fn write_keyring(
        &self,
        ring: &Keyring,
        etag: Option<&ETag>,
    ) -> Result<Option<ETag>, RepoError> {
        let bytes = Bytes::from(model::to_document_bytes(ring));
        let written = match etag {
            None => self.store().put_if_absent(keys::KEYRING, bytes).await,
            Some(etag) => self.store().put_if_match(keys::KEYRING, bytes, etag).await,
        };
        match written {
            Ok(etag) => Ok(Some(etag)),
            Err(StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn wrap_error(location: &str) -> impl Fn(WrapError) -> KeyringError + '_ {
    move |source| KeyringError::Wrap {
        location: location.to_owned(),
        source,
    }
}

/// The ids of a keyring's key-encryption keys, for messages.
fn shown(ids: &BTreeSet<String>) -> String {
    ids.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Unwraps every data key of `ring` with `kek`, checking each against its id and the
/// repository `config`: the data keys an encrypted repository with a keyring is opened with.
pub async fn open_data_keys(
    location: &str,
    ring: &Keyring,
    config: &RepositoryConfig,
    kek: &dyn KeyWrapper,
) -> Result<DataKeys, KeyringError> {
    let given = kek.kek_id();
    let current = ring.kek_ids();
    if !current.contains(&given) {
        let current = shown(&current);
        let location = location.to_owned();
        return Err(if ring.is_retired(&given) {
            KeyringError::Retired {
                location,
                given,
                current,
            }
        } else {
            KeyringError::WrongOldKey {
                location,
                given,
                current,
            }
        });
    }
    let inconsistent = |detail: String| KeyringError::Inconsistent {
        location: location.to_owned(),
        detail,
    };
    if ring.repository_id != config.repository_id {
        return Err(inconsistent(format!(
            "it is the keyring of repository {}, not of {}",
            ring.repository_id, config.repository_id
        )));
    }
    let config_key = config
        .encryption
        .as_ref()
        .map(|e| e.key_id.clone())
        .ok_or_else(|| KeyringError::NotEncrypted {
            location: location.to_owned(),
        })?;
    let mut keys = Vec::with_capacity(ring.keys.len());
    for entry in &ring.keys {
        let wrap = entry
            .wraps
            .iter()
            .find(|w| w.kek == given)
            .expect("every data key is wrapped by every current key");
        keys.push(unwrap_one(location, &config.repository_id, entry, wrap, kek).await?);
    }
    let data = DataKeys {
        keys,
        active: ring.active.clone(),
        config: config_key,
    };
    if data.get(&data.config).is_none() {
        return Err(inconsistent(format!(
            "it lacks data key {}, the key tidemark.json names",
            data.config
        )));
    }
    Ok(data)
}

async fn unwrap_one(
    location: &str,
    repository_id: &str,
    entry: &DataKeyEntry,
    wrap: &Wrap,
    kek: &dyn KeyWrapper,
) -> Result<EncryptionKey, KeyringError> {
    let ctx = WrapContext {
        repository_id,
        data_key_id: &entry.id,
    };
    let tampered = || {
        wrap_error(location)(WrapError::Tampered {
            data_key: entry.id.clone(),
            kek: kek.kek_id(),
        })
    };
    if wrap.scheme != kek.scheme() {
        return Err(tampered());
    }
    let bytes = hex::decode(&wrap.wrapped).map_err(|_| tampered())?;
    let key = kek
        .unwrap(ctx, &bytes)
        .await
        .map_err(wrap_error(location))?;
    if key.key_id() != entry.id {
        return Err(tampered());
    }
    Ok(key)
}

async fn wrap_one(
    location: &str,
    repository_id: &str,
    key: &EncryptionKey,
    kek: &dyn KeyWrapper,
) -> Result<Wrap, KeyringError> {
    let id = key.key_id();
    let ctx = WrapContext {
        repository_id,
        data_key_id: &id,
    };
    let wrapped = kek.wrap(ctx, key).await.map_err(wrap_error(location))?;
    Ok(Wrap {
        scheme: kek.scheme().to_owned(),
        kek: kek.kek_id(),
        wrapped: hex::encode(wrapped),
    })
}

/// What [`rekey`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RekeyReport {
    /// The repository's key-encryption keys before.
    pub from: Vec<String>,
    /// Its key-encryption key after: the new key.
    pub to: String,
    /// How many data keys were rewrapped.
    pub data_keys: usize,
    /// The id of the data key new objects are sealed with.
    pub active: String,
    /// True when this rotation created the keyring (the repository had none).
    pub created_keyring: bool,
    /// True when the rotation was complete already (the same command run again).
    pub already_done: bool,
}

/// Rotates the key-encryption key of the repository on `store` from `old` to `new`: the
/// data keys are rewrapped, no object is rewritten (FORMAT.md §10.7). Crash-safe and
/// idempotent: see the module documentation. A wrong `old` changes nothing.
pub async fn rekey(
    store: Arc<dyn ObjectStore>,
    old: &dyn KeyWrapper,
    new: &dyn KeyWrapper,
    now: OffsetDateTime,
) -> Result<RekeyReport, RepoError> {
    let repo = Repository::new(store);
    let location = repo.location();
    if old.kek_id() == new.kek_id() {
        return Err(KeyringError::SameKey(old.kek_id()).into());
    }
    let config = repo.read_config_unchecked().await?;
    let Some(encryption) = config.encryption.clone() else {
        return Err(KeyringError::NotEncrypted { location }.into());
    };
    crate::repo::check_algorithm(&location, &encryption)?;
    if let Some(lock) = config.object_lock {
        // The keyring is written locked like every object of the layout (FORMAT.md §3.2):
        // losing it would lose every data key.
        repo.store().check_object_lock().await?;
        repo.store().set_object_lock(Some(lock));
    }
    let (ring, etag, created) = match repo.read_keyring().await? {
        Some((ring, etag)) => (ring, etag, false),
        None => {
            let (ring, etag) = create_keyring(&repo, &config, old, new, now).await?;
            (ring, etag, true)
        }
    };
    let from: Vec<String> = ring.kek_ids().into_iter().collect();
    let wrappers = ring.kek_ids();
    if !wrappers.contains(&old.kek_id()) {
        if wrappers == BTreeSet::from([new.kek_id()]) && ring.is_retired(&old.kek_id()) {
            open_data_keys(&location, &ring, &config, new).await?;
            return Ok(RekeyReport {
                from: vec![old.kek_id()],
                to: new.kek_id(),
                data_keys: ring.keys.len(),
                active: ring.active,
                created_keyring: false,
                already_done: true,
            });
        }
        return Err(KeyringError::WrongOldKey {
            location,
            given: old.kek_id(),
            current: shown(&wrappers),
        }
        .into());
    }
    let data = open_data_keys(&location, &ring, &config, old).await?;
    // Step 1: the new key's wraps beside the old ones.
    let (ring, etag) = if wrappers.contains(&new.kek_id()) {
        (ring, etag)
    } else {
        let mut next = ring;
        for (entry, key) in next.keys.iter_mut().zip(&data.keys) {
            entry
                .wraps
                .push(wrap_one(&location, &config.repository_id, key, new).await?);
        }
        next.updated_at = now;
        let etag = cas(&repo, &next, &etag).await?;
        (next, etag)
    };
    // Step 2: every other wrap dropped; their keys retired.
    let mut next = ring;
    let new_id = new.kek_id();
    for entry in &mut next.keys {
        entry.wraps.retain(|w| w.kek == new_id);
    }
    for kek in wrappers.iter().filter(|k| **k != new_id) {
        next.retired.retain(|r| r.kek != *kek);
        next.retired.push(RetiredKek {
            kek: kek.clone(),
            retired_at: now,
        });
    }
    let excess = next.retired.len().saturating_sub(MAX_RETIRED);
    next.retired.drain(..excess);
    next.updated_at = now;
    cas(&repo, &next, &etag).await?;
    tracing::info!(from = %shown(&wrappers), to = %new_id, data_keys = next.keys.len(), "rotated the repository key");
    Ok(RekeyReport {
        from,
        to: new_id,
        data_keys: next.keys.len(),
        active: next.active,
        created_keyring: created,
        already_done: false,
    })
}

async fn cas(repo: &Repository, ring: &Keyring, etag: &ETag) -> Result<ETag, RepoError> {
    repo.write_keyring(ring, Some(etag)).await?.ok_or_else(|| {
        KeyringError::Changed {
            location: repo.location(),
        }
        .into()
    })
}

/// Before a first keyring, every object must be sealed with the legacy key. The objects
/// writers rewrite (the hint after every generation, the lease at every renewal) name the key
/// the newest writer sealed with: another one there means a keyring existed and is gone, and
/// a new keyring would leave every object sealed since then unreadable for good.
async fn check_sealed_with(repo: &Repository, legacy: &EncryptionKey) -> Result<(), RepoError> {
    for object in [keys::LATEST_HINT, keys::LEASE] {
        let range = 0..crypt::HEADER_LEN as u64;
        let header = match repo.store().get_range(object, range).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(key_id) = crypt::sealed_key_id(&header)
            && key_id != legacy.key_id()
        {
            return Err(KeyringError::Lost {
                location: repo.location(),
                object: object.to_owned(),
                key_id,
            }
            .into());
        }
    }
    Ok(())
}

/// The first rotation of a repository without a keyring: creates it (create-only) with
/// the repository key as legacy data key and a fresh data key for new objects, both wrapped
/// by `old` and `new`. Returns the keyring (read back when another rotation created it
/// first) and its ETag.
async fn create_keyring(
    repo: &Repository,
    config: &RepositoryConfig,
    old: &dyn KeyWrapper,
    new: &dyn KeyWrapper,
    now: OffsetDateTime,
) -> Result<(Keyring, ETag), RepoError> {
    let location = repo.location();
    let key_id = config
        .encryption
        .as_ref()
        .map(|e| e.key_id.clone())
        .unwrap_or_default();
    let Some(legacy) = old.legacy_key() else {
        return Err(KeyringError::LegacyNeedsKeyFile { location, key_id }.into());
    };
    if legacy.key_id() != key_id {
        return Err(KeyringError::WrongOldKey {
            location,
            given: old.kek_id(),
            current: key_id,
        }
        .into());
    }
    check_sealed_with(repo, legacy).await?;
    let fresh = EncryptionKey::generate();
    let mut keys = Vec::new();
    for (key, is_legacy) in [(legacy, true), (&fresh, false)] {
        let mut wraps = Vec::new();
        for kek in [old, new] {
            wraps.push(wrap_one(&location, &config.repository_id, key, kek).await?);
        }
        keys.push(DataKeyEntry {
            id: key.key_id(),
            legacy: is_legacy,
            wraps,
        });
    }
    let ring = Keyring {
        format_version: FORMAT_VERSION,
        repository_id: config.repository_id.clone(),
        active: fresh.key_id(),
        keys,
        retired: Vec::new(),
        updated_at: now,
    };
    match repo.write_keyring(&ring, None).await? {
        Some(etag) => Ok((ring, etag)),
        None => repo
            .read_keyring()
            .await?
            .ok_or_else(|| KeyringError::Changed { location }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Compression, Encryption, Lineage};
    use crate::store::MemoryStore;

    fn config(key: &EncryptionKey) -> RepositoryConfig {
        RepositoryConfig {
            format_version: FORMAT_VERSION,
            repository_id: "repo-1".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            database_identity: "db".into(),
            lineage: Lineage {
                id: "l".into(),
                parent: None,
            },
            segment_compression: Compression::Zstd,
            encryption: Some(Encryption {
                algorithm: crypt::ALGORITHM.into(),
                chunk_size: crypt::DEFAULT_CHUNK_SIZE,
                key_id: key.key_id(),
            }),
            object_lock: None,
        }
    }

    async fn repository(k0: &EncryptionKey) -> (Arc<MemoryStore>, Repository) {
        let raw = Arc::new(MemoryStore::new());
        let repo = Repository::open(raw.clone(), Some(k0)).await.unwrap();
        repo.create_config(&config(k0)).await.unwrap();
        repo.store()
            .put("manifest/x.json", Bytes::from_static(b"legacy object"))
            .await
            .unwrap();
        (raw, repo)
    }

    fn file(k: &EncryptionKey) -> FileKeyWrapper {
        FileKeyWrapper::new(k.clone())
    }

    async fn rotate(raw: &Arc<MemoryStore>, a: &EncryptionKey, b: &EncryptionKey) -> RekeyReport {
        rekey(raw.clone(), &file(a), &file(b), OffsetDateTime::now_utc())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn rotations_keep_objects_and_retire_old_keys() {
        let (k0, k1, k2) = (
            EncryptionKey::generate(),
            EncryptionKey::generate(),
            EncryptionKey::generate(),
        );
        let (raw, _) = repository(&k0).await;
        let first = rotate(&raw, &k0, &k1).await;
        assert!(first.created_keyring && !first.already_done);
        assert_eq!(first.data_keys, 2);
        let r1 = Repository::open(raw.clone(), Some(&k1)).await.unwrap();
        assert_eq!(
            r1.store().get("manifest/x.json").await.unwrap(),
            &b"legacy object"[..]
        );
        r1.store()
            .put("manifest/y.json", Bytes::from_static(b"after"))
            .await
            .unwrap();
        let stored = raw.get("manifest/y.json").await.unwrap();
        assert_eq!(&stored[16..24], &hex::decode(&first.active).unwrap()[..]);
        let again = rotate(&raw, &k0, &k1).await;
        assert!(again.already_done, "{again:?}");
        rotate(&raw, &k1, &k2).await;
        let r2 = Repository::open(raw.clone(), Some(&k2)).await.unwrap();
        for (key, want) in [
            ("manifest/x.json", &b"legacy object"[..]),
            ("manifest/y.json", b"after"),
        ] {
            assert_eq!(r2.store().get(key).await.unwrap(), want);
        }
        for old in [&k0, &k1] {
            let e = Repository::open(raw.clone(), Some(old)).await.unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("retired") && msg.contains(&k2.key_id()),
                "{msg}"
            );
        }
        let ring = r2.read_keyring().await.unwrap().unwrap().0;
        assert_eq!(ring.kek_ids(), BTreeSet::from([k2.key_id()]));
        assert_eq!(ring.retired.len(), 2);
        // The keyring holds no key in the clear.
        let text = String::from_utf8(raw.get(keys::KEYRING).await.unwrap().to_vec()).unwrap();
        for k in [&k0, &k1, &k2] {
            assert!(!text.contains(k.to_hex().as_str()));
        }
    }

    #[tokio::test]
    async fn a_wrong_old_key_changes_nothing() {
        let (k0, k1, wrong) = (
            EncryptionKey::generate(),
            EncryptionKey::generate(),
            EncryptionKey::generate(),
        );
        let (raw, _) = repository(&k0).await;
        let now = OffsetDateTime::now_utc();
        for _ in 0..2 {
            let before = raw.list("").await.unwrap();
            let e = rekey(raw.clone(), &file(&wrong), &file(&k1), now)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("nothing was changed"), "{e}");
            assert!(e.is_usage());
            assert_eq!(raw.list("").await.unwrap(), before);
            rotate(&raw, &k0, &k1).await;
        }
        let e = rekey(raw.clone(), &file(&k1), &file(&k1), now)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("same key"), "{e}");
    }

    #[tokio::test]
    async fn a_keyring_of_another_repository_does_not_open() {
        let (k0, k1) = (EncryptionKey::generate(), EncryptionKey::generate());
        let (raw, _) = repository(&k0).await;
        rotate(&raw, &k0, &k1).await;
        let ring = raw.get(keys::KEYRING).await.unwrap();
        let mut parsed = Keyring::parse(&ring).unwrap();
        parsed.repository_id = "repo-2".into();
        let mut other_config = config(&k0);
        other_config.repository_id = "repo-2".into();
        let e = open_data_keys("x", &parsed, &other_config, &file(&k1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
    }

    /// A stand-in for a key service: its key never leaves it, its scheme and key id are its
    /// own (an ARN), and it counts its calls.
    #[derive(Debug)]
    struct StandIn {
        inside: FileKeyWrapper,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl StandIn {
        fn new() -> StandIn {
            StandIn {
                inside: file(&EncryptionKey::generate()),
                calls: Default::default(),
            }
        }
        fn called(&self) {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[async_trait]
    impl KeyWrapper for StandIn {
        fn scheme(&self) -> &str {
            "stand-in-kms"
        }
        fn kek_id(&self) -> String {
            "arn:aws:kms:eu-west-1:000000000000:key/stand-in".to_owned()
        }
        async fn wrap(
            &self,
            ctx: WrapContext<'_>,
            key: &EncryptionKey,
        ) -> Result<Vec<u8>, WrapError> {
            self.called();
            self.inside.wrap(ctx, key).await
        }
        async fn unwrap(
            &self,
            ctx: WrapContext<'_>,
            wrapped: &[u8],
        ) -> Result<EncryptionKey, WrapError> {
            self.called();
            self.inside.unwrap(ctx, wrapped).await
        }
    }

    #[tokio::test]
    async fn a_key_service_behind_the_trait_rotates_and_opens() {
        let (k0, k1) = (EncryptionKey::generate(), EncryptionKey::generate());
        let kms = StandIn::new();
        let now = OffsetDateTime::now_utc();
        let (raw, _) = repository(&k0).await;
        // A repository without a keyring opens only with its key file.
        let e = Repository::open_wrapped(raw.clone(), &kms)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no keyring"), "{e}");
        let e = rekey(raw.clone(), &kms, &file(&k1), now).await.unwrap_err();
        assert!(e.to_string().contains("key file"), "{e}");

        rekey(raw.clone(), &file(&k0), &kms, now).await.unwrap();
        let r = Repository::open_wrapped(raw.clone(), &kms).await.unwrap();
        assert_eq!(
            r.store().get("manifest/x.json").await.unwrap(),
            &b"legacy object"[..]
        );
        r.store()
            .put(
                "manifest/y.json",
                Bytes::from_static(b"sealed via the service"),
            )
            .await
            .unwrap();
        let ring = r.read_keyring().await.unwrap().unwrap().0;
        assert!(
            ring.keys
                .iter()
                .all(|k| k.wraps[0].scheme == "stand-in-kms")
        );
        let e = Repository::open(raw.clone(), Some(&k0)).await.unwrap_err();
        assert!(e.to_string().contains("retired"), "{e}");

        rekey(raw.clone(), &kms, &file(&k1), now).await.unwrap();
        let r = Repository::open(raw.clone(), Some(&k1)).await.unwrap();
        assert_eq!(
            r.store().get("manifest/y.json").await.unwrap(),
            &b"sealed via the service"[..]
        );
        let e = Repository::open_wrapped(raw.clone(), &kms)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("retired"), "{e}");
        assert!(kms.calls.load(std::sync::atomic::Ordering::Relaxed) >= 6);
    }

    fn sample() -> Keyring {
        let w = |kek: &str| Wrap {
            scheme: FILE_SCHEME.into(),
            kek: kek.into(),
            wrapped: "00".repeat(72),
        };
        Keyring {
            format_version: FORMAT_VERSION,
            repository_id: "r".into(),
            active: "00112233445566ff".into(),
            keys: vec![
                DataKeyEntry {
                    id: "0011223344556677".into(),
                    legacy: true,
                    wraps: vec![w("aaaaaaaaaaaaaaaa"), w("bbbbbbbbbbbbbbbb")],
                },
                DataKeyEntry {
                    id: "00112233445566ff".into(),
                    legacy: false,
                    wraps: vec![w("aaaaaaaaaaaaaaaa"), w("bbbbbbbbbbbbbbbb")],
                },
            ],
            retired: vec![],
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_sample_is_valid_and_limits_hold() {
        let ring = sample();
        Keyring::parse(&model::to_document_bytes(&ring)).unwrap();
        let mut big = ring.clone();
        big.keys[0].wraps[0].wrapped = "0".repeat(MAX_WRAPPED_HEX + 2);
        assert!(big.validate().is_err());
        let mut uneven = ring.clone();
        uneven.keys[1].wraps.pop();
        assert!(uneven.validate().is_err());
        let mut inactive = ring;
        inactive.active = "ffffffffffffffff".into();
        assert!(inactive.validate().is_err());
    }
}
