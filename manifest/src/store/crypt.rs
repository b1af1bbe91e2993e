//! Client-side authenticated encryption of a repository's objects (FORMAT.md §10).
//!
//! [`CryptStore`] wraps an `Arc<dyn ObjectStore>` like [`RetryStore`](super::RetryStore) does
//! and is transparent to the repository layer: puts encrypt, gets decrypt, and `head` / `list`
//! report the size of the plaintext. Every object except `tidemark.json` is stored as
//!
//! ```text
//! header (40 bytes) ‖ chunk 0 ‖ chunk 1 ‖ … ‖ chunk n-1
//! ```
//!
//! where each chunk is up to [`DEFAULT_CHUNK_SIZE`] plaintext bytes sealed with
//! XChaCha20-Poly1305 under its own nonce (the object's random nonce prefix and the chunk
//! index), with the repository id, the header, the chunk index, a last-chunk flag and the
//! object's key as associated data. So a ranged read fetches and opens only the chunks it
//! needs, large files are encrypted and decrypted as a stream, and a chunk moved within or
//! between objects, a truncated or extended object, one object's content stored under
//! another key, or another repository's object (under the same key) all fail authentication.
//!
//! `tidemark.json` stays readable without the key but is authenticated: on its way to the
//! store this decorator inserts an HMAC-SHA256 of the document under a key derived from the
//! encryption key, and it checks that HMAC whenever it reads the document. The repository
//! id the objects are bound to comes from the authenticated `tidemark.json` (read once, when
//! the first object is sealed or opened, or when the document is written or read).
//!
//! [`EncryptionKey`] is the 32-byte key: read from a file or an environment variable, never
//! shown by `Debug`, never serialized, and wiped from memory when dropped. It is known by its
//! key id, a one-way fingerprint.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use hmac::Mac as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::local::{TempFile, local_temp_path};
use super::{
    ETag, FileDigest, ObjectMeta, ObjectStore, PageCache, StoreError, StoreOp, StoreResult,
};
use crate::checksum::Hasher;

/// Length of an encryption key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the header of an encrypted object.
pub const HEADER_LEN: usize = 40;
/// Length of the authentication tag that follows each chunk's ciphertext.
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk that this implementation writes.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The algorithm's name in `tidemark.json`.
pub const ALGORITHM: &str = "xchacha20-poly1305";
/// The keys that stay plaintext in an encrypted repository: `tidemark.json`, which says
/// that the repository is encrypted and with which key (it is authenticated instead).
pub const PLAINTEXT_KEYS: [&str; 1] = [crate::keys::CONFIG];
/// The keys stored as they are, neither sealed nor authenticated by this store: the
/// keyring, which holds the data keys wrapped (FORMAT.md §10.7).
pub const CLEAR_KEYS: [&str; 1] = [crate::keys::KEYRING];
/// The keys sealed without the repository id: the lease, which a writer takes before it
/// creates `tidemark.json` (FORMAT.md §10.2).
pub const UNBOUND_KEYS: [&str; 1] = [crate::keys::LEASE];

const MAGIC: &[u8; 8] = b"TDMKENC\0";
const VERSION: u8 = 2;
const ALGORITHM_XCHACHA20_POLY1305: u8 = 1;
const KEY_ID_DOMAIN: &[u8] = b"tidemark key id v1\0";
const AAD_DOMAIN: &[u8] = b"tidemark chunk v2\0";
/// The input of the derivation of the key that authenticates `tidemark.json`.
const CONFIG_KEY_INFO: &[u8] = b"tidemark config authentication key v1";
const CONFIG_MAC_DOMAIN: &[u8] = b"tidemark config v1\0";
/// How every repository document starts (FORMAT.md §3.1): this, 64 hex digits, `",`.
const CHECKSUM_PREFIX: &[u8] = b"{\"checksum\":\"";
const CHECKSUM_PREFIX_LEN: usize = CHECKSUM_PREFIX.len() + 64 + 2;
/// What follows the checksum prefix in an authenticated `tidemark.json`: this, 64 hex
/// digits of HMAC-SHA256, `",`.
const AUTH_PREFIX: &[u8] = b"\"authentication\":\"";
const AUTH_PREFIX_LEN: usize = AUTH_PREFIX.len() + 64 + 2;

type HmacSha256 = hmac::Hmac<sha2_hmac::Sha256>;
/// Chunks read and written per step when streaming files (4 MiB with 64 KiB chunks).
const STREAM_CHUNKS: usize = 64;

/// Why a key could not be loaded. Messages say where the key came from and what is wrong,
/// never what the key is.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionKeyError {
    #[error(
        "the encryption key in {source_name} is not a 32-byte key: give 64 hex digits or the \
         base64 of 32 bytes (a key file may also hold the 32 bytes themselves); create one \
         with `openssl rand -hex 32`"
    )]
    Malformed { source_name: String },
    #[error("cannot read the encryption key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the encryption key file {path} can be read or written by other users (mode {mode:04o}); \
         restrict it with `chmod 600 {path}` (or 640 for a group the service runs in)"
    )]
    Permissions { path: String, mode: u32 },
    #[error(
        "the encryption key is given twice (--encryption-key-file / TIDEMARK_ENCRYPTION_KEY_FILE \
         and TIDEMARK_ENCRYPTION_KEY); give it one way"
    )]
    Ambiguous,
}

/// A 32-byte repository encryption key. `Debug` shows only its key id; it has no `Display`
/// and no serde implementation, and its bytes are zeroed when it is dropped.
#[derive(Clone)]
pub struct EncryptionKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("key_id", &self.key_id())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl EncryptionKey {
    /// The key made of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> EncryptionKey {
        EncryptionKey {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// A new random key (from the operating system's generator).
    pub fn generate() -> EncryptionKey {
        let mut bytes = [0u8; KEY_LEN];
        rand::fill(&mut bytes);
        EncryptionKey::from_bytes(bytes)
    }

    /// Parses a key written as text: 64 hex digits (either case), or standard base64 (with
    /// or without padding) of 32 bytes. Surrounding whitespace is ignored. `source_name`
    /// says where the text came from, for the message.
    pub fn parse(text: &str, source_name: &str) -> Result<EncryptionKey, EncryptionKeyError> {
        let text = text.trim();
        let malformed = || EncryptionKeyError::Malformed {
            source_name: source_name.to_owned(),
        };
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode_to_slice(text, bytes.as_mut()).map_err(|_| malformed())?;
            return Ok(EncryptionKey { bytes });
        }
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .map_err(|_| malformed())?,
        );
        if decoded.len() != KEY_LEN {
            return Err(malformed());
        }
        bytes.copy_from_slice(&decoded);
        Ok(EncryptionKey { bytes })
    }

    /// Reads a key file: 32 raw bytes, or the key as text (see [`EncryptionKey::parse`]).
    /// The file must not be readable or writable by other users (its group may read it).
    pub fn from_file(path: &Path) -> Result<EncryptionKey, EncryptionKeyError> {
        let shown = path.display().to_string();
        let read = |source| EncryptionKeyError::Read {
            path: shown.clone(),
            source,
        };
        let mut file = File::open(path).map_err(read)?;
        let mode = {
            use std::os::unix::fs::PermissionsExt as _;
            file.metadata().map_err(read)?.permissions().mode()
        };
        if mode & 0o006 != 0 {
            return Err(EncryptionKeyError::Permissions {
                path: shown,
                mode: mode & 0o7777,
            });
        }
        let mut content = Zeroizing::new(Vec::with_capacity(128));
        // A key file is small; refuse to read a huge one into memory.
        Read::by_ref(&mut file)
            .take(4096)
            .read_to_end(&mut content)
            .map_err(read)?;
        if content.len() == KEY_LEN {
            let mut bytes = [0u8; KEY_LEN];
            bytes.copy_from_slice(&content);
            return Ok(EncryptionKey::from_bytes(bytes));
        }
        let source_name = format!("file {shown}");
        let text = std::str::from_utf8(&content).map_err(|_| EncryptionKeyError::Malformed {
            source_name: source_name.clone(),
        })?;
        EncryptionKey::parse(text, &source_name)
    }

    /// The key id: a one-way fingerprint of the key, 16 hex digits (the first 8 bytes of
    /// `sha256("tidemark key id v1\0" ‖ key)`). Safe to log and to store.
    pub fn key_id(&self) -> String {
        hex::encode(self.key_id_bytes())
    }

    fn key_id_bytes(&self) -> [u8; 8] {
        let mut h = Sha256::new();
        h.update(KEY_ID_DOMAIN);
        h.update(self.bytes.as_ref());
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        id
    }

    /// A 32-byte key for another purpose, named by `info`: the first block of HKDF-Expand
    /// (RFC 5869) with SHA-256, the key as its pseudorandom key (it is uniformly random
    /// already), i.e. `HMAC-SHA256(key, info ‖ 0x01)`.
    pub(crate) fn derive(&self, info: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut mac = HmacSha256::new_from_slice(self.bytes.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(info);
        mac.update(&[1]);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// The key as 64 hex digits, for tooling that writes key files. Handle with care.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.bytes.as_ref()))
    }

    /// The key's bytes. Handle with care.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

/// The key id an encrypted object's header names (FORMAT.md §10.1), from the object's first
/// [`HEADER_LEN`] bytes; `None` when they are not such a header.
pub fn sealed_key_id(header: &[u8]) -> Option<String> {
    (header.len() >= HEADER_LEN && &header[..8] == MAGIC).then(|| hex::encode(&header[16..24]))
}

/// What is wrong with an encrypted object; carried as the source of a
/// [`StoreError::Other`] that names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error(
        "it was encrypted with key id {object_key_id}, but the key given has id {key_id}; \
         pass the repository's key (--encryption-key-file or TIDEMARK_ENCRYPTION_KEY)"
    )]
    WrongKey {
        object_key_id: String,
        key_id: String,
    },
    #[error(
        "it is not an encrypted object (no TDMKENC header) although the repository is \
         encrypted: it was written without the key, or it is damaged"
    )]
    NotEncrypted,
    #[error(
        "its header is not supported: {detail}; it was written by a newer Tidemark, or it is \
         damaged"
    )]
    Unsupported { detail: String },
    #[error(
        "its size, {size} bytes, is not the size of any encrypted object: it was truncated or \
         extended"
    )]
    BadSize { size: u64 },
    #[error(
        "chunk {chunk} failed authentication: the object was modified, truncated or extended, \
         or it holds another object's content, or it was copied from another repository \
         encrypted with the same key"
    )]
    Tampered { chunk: u64 },
    #[error(
        "the repository has no tidemark.json, which holds the repository id every encrypted \
         object is bound to; create the repository (start the archiver) before writing to it"
    )]
    ConfigMissing,
    #[error(
        "tidemark.json carries no authentication: it was written by a Tidemark that did not \
         authenticate it (encrypted objects of version 1) or replaced by hand; this Tidemark \
         reads only encrypted repositories whose tidemark.json it can authenticate (FORMAT.md \
         §10.5)"
    )]
    ConfigUnauthenticated,
    #[error(
        "tidemark.json failed authentication with the key given: it was modified (its \
         repository id, database identity, lineage or encryption settings), or it comes from \
         another repository; restore the original tidemark.json"
    )]
    ConfigTampered,
    #[error("tidemark.json is not a repository config: {detail}")]
    ConfigMalformed { detail: String },
    #[error(
        "tidemark.json now names repository {now}, but this process works on repository {was}: \
         it was replaced while in use"
    )]
    ConfigChanged { was: String, now: String },
}

/// The layout of encrypted objects with one chunk size: offsets and sizes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    chunk: u64,
}

impl Layout {
    fn stored_chunk(&self) -> u64 {
        self.chunk + TAG_LEN as u64
    }

    /// Number of chunks of a plaintext of `plain` bytes (an empty one has one empty chunk).
    fn chunks(&self, plain: u64) -> u64 {
        plain.div_ceil(self.chunk).max(1)
    }

    /// Size of the encrypted object of a plaintext of `plain` bytes (`u64::MAX` where
    /// that does not fit: an unbounded download stays unbounded).
    fn stored_size(&self, plain: u64) -> u64 {
        (HEADER_LEN as u64)
            .saturating_add(plain)
            .saturating_add(self.chunks(plain) * TAG_LEN as u64)
    }

    /// Size of the plaintext of an encrypted object of `stored` bytes, if that is a size an
    /// encrypted object can have.
    fn plain_size(&self, stored: u64) -> Option<u64> {
        let body = stored.checked_sub(HEADER_LEN as u64)?;
        let (full, rest) = (body / self.stored_chunk(), body % self.stored_chunk());
        let tag = TAG_LEN as u64;
        match (full, rest) {
            (0, 0) => None,
            (n, 0) => Some(n * self.chunk),
            (0, r) if r == tag => Some(0),
            (n, r) if r > tag => Some(n * self.chunk + r - tag),
            _ => None,
        }
    }

    /// The plaintext range of chunk `i` of an object of `plain` bytes.
    fn chunk_range(&self, i: u64, plain: u64) -> Range<u64> {
        let start = i * self.chunk;
        start..(start + self.chunk).min(plain)
    }

    /// Where chunk `i` (tag included) is stored.
    fn stored_offset(&self, i: u64) -> u64 {
        HEADER_LEN as u64 + i * self.stored_chunk()
    }
}

/// The parsed header of an encrypted object.
#[derive(Debug, Clone, Copy)]
struct Header {
    bytes: [u8; HEADER_LEN],
}

impl Header {
    fn new(chunk_log2: u8, key_id: [u8; 8]) -> Header {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8] = VERSION;
        bytes[9] = ALGORITHM_XCHACHA20_POLY1305;
        bytes[10] = chunk_log2;
        bytes[16..24].copy_from_slice(&key_id);
        let mut prefix = [0u8; 16];
        rand::fill(&mut prefix);
        bytes[24..40].copy_from_slice(&prefix);
        Header { bytes }
    }

    fn parse(data: &[u8], crypt: &Crypt) -> Result<Header, CryptError> {
        if data.len() < HEADER_LEN || &data[..8] != MAGIC {
            return Err(CryptError::NotEncrypted);
        }
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(&data[..HEADER_LEN]);
        let h = Header { bytes };
        if bytes[8] == 1 {
            return Err(CryptError::Unsupported {
                detail: format!(
                    "version 1, which does not bind an object to its repository (this Tidemark \
                     reads version {VERSION}; FORMAT.md §10.6)"
                ),
            });
        }
        if bytes[8] != VERSION {
            return Err(CryptError::Unsupported {
                detail: format!(
                    "version {} (this Tidemark reads version {VERSION})",
                    bytes[8]
                ),
            });
        }
        if bytes[9] != ALGORITHM_XCHACHA20_POLY1305 {
            return Err(CryptError::Unsupported {
                detail: format!(
                    "algorithm {} (this Tidemark knows 1, {ALGORITHM})",
                    bytes[9]
                ),
            });
        }
        if crypt.cipher(&bytes[16..24]).is_none() {
            return Err(CryptError::WrongKey {
                object_key_id: hex::encode(&bytes[16..24]),
                key_id: crypt.key_ids(),
            });
        }
        if bytes[10] != crypt.chunk_log2 || bytes[11..16] != [0u8; 5] {
            return Err(CryptError::Unsupported {
                detail: format!(
                    "chunk size 2^{} (the repository's is 2^{})",
                    bytes[10], crypt.chunk_log2
                ),
            });
        }
        Ok(h)
    }

    fn nonce(&self, chunk: u64) -> XNonce {
        let mut n = [0u8; 24];
        n[..16].copy_from_slice(&self.bytes[24..40]);
        n[16..].copy_from_slice(&chunk.to_le_bytes());
        XNonce::from(n)
    }
}

/// What a sealed chunk is bound to besides its header and position: the repository and the
/// object's key.
#[derive(Debug, Clone, Copy)]
struct Object<'a> {
    /// The repository id (empty for [`UNBOUND_KEYS`]).
    repository: &'a str,
    key: &'a str,
}

/// The key and layout, shared by the async methods and the blocking file work.
struct Crypt {
    /// Every key objects may be sealed with, by key id (FORMAT.md §10.7): one without a
    /// keyring, the repository's data keys with one.
    ciphers: Vec<([u8; 8], XChaCha20Poly1305)>,
    /// The one of `ciphers` new objects are sealed with.
    active: usize,
    /// The key that authenticates `tidemark.json`, derived from the key it names.
    config_key: Zeroizing<[u8; 32]>,
    chunk_log2: u8,
    layout: Layout,
}

impl Crypt {
    /// The key objects whose header names `key_id` are sealed with.
    fn cipher(&self, key_id: &[u8]) -> Option<&XChaCha20Poly1305> {
        self.ciphers
            .iter()
            .find(|(id, _)| id.as_slice() == key_id)
            .map(|(_, c)| c)
    }

    /// The id of the key new objects are sealed with.
    fn active_id(&self) -> [u8; 8] {
        self.ciphers[self.active].0
    }

    /// The key ids this store opens objects with, for messages.
    fn key_ids(&self) -> String {
        let ids: Vec<String> = self.ciphers.iter().map(|(id, _)| hex::encode(id)).collect();
        ids.join(", ")
    }

    fn aad(header: &Header, chunk: u64, last: bool, obj: Object<'_>) -> Vec<u8> {
        let mut aad = Vec::with_capacity(
            AAD_DOMAIN.len() + 4 + obj.repository.len() + HEADER_LEN + 9 + obj.key.len(),
        );
        aad.extend_from_slice(AAD_DOMAIN);
        let repository_len = u32::try_from(obj.repository.len()).expect("a repository id is short");
        aad.extend_from_slice(&repository_len.to_le_bytes());
        aad.extend_from_slice(obj.repository.as_bytes());
        aad.extend_from_slice(&header.bytes);
        aad.extend_from_slice(&chunk.to_le_bytes());
        aad.push(u8::from(last));
        aad.extend_from_slice(obj.key.as_bytes());
        aad
    }

    /// Appends chunk `i` of `plain` sealed to `out`.
    fn seal(
        &self,
        h: &Header,
        obj: Object<'_>,
        i: u64,
        last: bool,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .cipher(&h.bytes[16..24])
            .expect("objects are sealed with a key of the store")
            .encrypt_inout_detached(
                &h.nonce(i),
                &Self::aad(h, i, last, obj),
                (&mut out[start..]).into(),
            )
            .expect("a 64 KiB chunk is within XChaCha20-Poly1305's limits");
        out.extend_from_slice(tag.as_slice());
    }

    /// Opens chunk `i` in place (`sealed` is ciphertext ‖ tag) and returns the plaintext.
    fn open<'a>(
        &self,
        h: &Header,
        obj: Object<'_>,
        i: u64,
        last: bool,
        sealed: &'a mut [u8],
    ) -> Result<&'a [u8], CryptError> {
        let n = sealed
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(CryptError::Tampered { chunk: i })?;
        let (msg, tag) = sealed.split_at_mut(n);
        let tag = Tag::try_from(&*tag).map_err(|_| CryptError::Tampered { chunk: i })?;
        self.cipher(&h.bytes[16..24])
            .ok_or(CryptError::Tampered { chunk: i })?
            .decrypt_inout_detached(&h.nonce(i), &Self::aad(h, i, last, obj), msg.into(), &tag)
            .map_err(|_| CryptError::Tampered { chunk: i })?;
        Ok(msg)
    }

    /// The HMAC of the part of `tidemark.json` after its checksum and authentication.
    fn config_mac(&self, rest: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(self.config_key.as_ref())
            .expect("HMAC takes a key of any length");
        mac.update(CONFIG_MAC_DOMAIN);
        mac.update(rest);
        mac
    }

    /// Inserts the authentication into a `tidemark.json` written as FORMAT.md §3.1 says,
    /// and returns the new document and the repository id it names.
    fn authenticate_config(&self, doc: &[u8]) -> Result<(Vec<u8>, String), CryptError> {
        let rest = config_rest(doc)?;
        if rest.starts_with(AUTH_PREFIX) {
            return Err(CryptError::ConfigMalformed {
                detail: "it is authenticated already".to_owned(),
            });
        }
        let repository = config_repository_id(doc)?;
        let mac = hex::encode(self.config_mac(rest).finalize().into_bytes());
        let mut body = Vec::with_capacity(AUTH_PREFIX_LEN + rest.len());
        body.extend_from_slice(AUTH_PREFIX);
        body.extend_from_slice(mac.as_bytes());
        body.extend_from_slice(b"\",");
        body.extend_from_slice(rest);
        let mut out = Vec::with_capacity(CHECKSUM_PREFIX_LEN + body.len());
        out.extend_from_slice(CHECKSUM_PREFIX);
        out.extend_from_slice(crate::checksum::sha256_hex(&body).as_bytes());
        out.extend_from_slice(b"\",");
        out.extend_from_slice(&body);
        Ok((out, repository))
    }

    /// Checks the authentication of a `tidemark.json` and returns the repository id it
    /// names. (Its checksum is the document parser's to check.)
    fn verify_config(&self, doc: &[u8]) -> Result<String, CryptError> {
        let body = config_rest(doc)?;
        let Some(hex_mac) = body
            .strip_prefix(AUTH_PREFIX)
            .and_then(|b| b.get(..66))
            .filter(|b| b.ends_with(b"\","))
            .map(|b| &b[..64])
        else {
            return Err(CryptError::ConfigUnauthenticated);
        };
        let mut mac = [0u8; 32];
        hex::decode_to_slice(hex_mac, &mut mac).map_err(|_| CryptError::ConfigTampered)?;
        self.config_mac(&body[AUTH_PREFIX_LEN..])
            .verify_slice(&mac)
            .map_err(|_| CryptError::ConfigTampered)?;
        config_repository_id(doc)
    }

    fn encrypt(&self, obj: Object<'_>, plain: &[u8]) -> Vec<u8> {
        let h = Header::new(self.chunk_log2, self.active_id());
        let size = plain.len() as u64;
        let mut out = Vec::with_capacity(self.layout.stored_size(size) as usize);
        out.extend_from_slice(&h.bytes);
        let n = self.layout.chunks(size);
        for i in 0..n {
            let r = self.layout.chunk_range(i, size);
            self.seal(
                &h,
                obj,
                i,
                i + 1 == n,
                &plain[r.start as usize..r.end as usize],
                &mut out,
            );
        }
        out
    }

    fn decrypt(&self, obj: Object<'_>, mut stored: Vec<u8>) -> Result<Vec<u8>, CryptError> {
        let h = Header::parse(&stored, self)?;
        let size = stored.len() as u64;
        let plain = self
            .layout
            .plain_size(size)
            .ok_or(CryptError::BadSize { size })?;
        let n = self.layout.chunks(plain);
        let mut out = Vec::with_capacity(plain as usize);
        for i in 0..n {
            let r = self.layout.chunk_range(i, plain);
            let start = self.layout.stored_offset(i) as usize;
            let end = start + (r.end - r.start) as usize + TAG_LEN;
            out.extend_from_slice(self.open(&h, obj, i, i + 1 == n, &mut stored[start..end])?);
        }
        Ok(out)
    }

    /// Encrypts the file `src` into `dst` (created), chunk by chunk.
    fn encrypt_file(&self, obj: Object<'_>, src: &Path, dst: &Path) -> io::Result<()> {
        let mut input = File::open(src)?;
        let size = input.metadata()?.len();
        let mut output = io::BufWriter::with_capacity(super::CACHED_WRITE, File::create_new(dst)?);
        let h = Header::new(self.chunk_log2, self.active_id());
        output.write_all(&h.bytes)?;
        let n = self.layout.chunks(size);
        let mut plain = vec![0u8; self.layout.chunk as usize];
        let mut sealed = Vec::with_capacity(self.layout.stored_chunk() as usize);
        for i in 0..n {
            let r = self.layout.chunk_range(i, size);
            let buf = &mut plain[..(r.end - r.start) as usize];
            input.read_exact(buf).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the file changed while it was being encrypted: {e}"),
                )
            })?;
            sealed.clear();
            self.seal(&h, obj, i, i + 1 == n, buf, &mut sealed);
            output.write_all(&sealed)?;
        }
        let mut probe = [0u8; 1];
        if input.read(&mut probe)? != 0 {
            return Err(io::Error::other(
                "the file grew while it was being encrypted",
            ));
        }
        output.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Decrypts the encrypted file `src` into `dst` (created), chunk by chunk, showing
    /// `hasher` (if any) the plaintext it writes; returns the plaintext size.
    fn decrypt_file(
        &self,
        obj: Object<'_>,
        src: &Path,
        dst: &Path,
        mut hasher: Option<&mut Hasher>,
    ) -> Result<u64, Result<CryptError, io::Error>> {
        let mut input = io::BufReader::with_capacity(1 << 20, File::open(src).map_err(Err)?);
        let size = input.get_ref().metadata().map_err(Err)?.len();
        let mut head = [0u8; HEADER_LEN];
        if size < HEADER_LEN as u64 {
            return Err(Ok(CryptError::BadSize { size }));
        }
        input.read_exact(&mut head).map_err(Err)?;
        let h = Header::parse(&head, self).map_err(Ok)?;
        let plain = self
            .layout
            .plain_size(size)
            .ok_or(Ok(CryptError::BadSize { size }))?;
        let mut output = File::create_new(dst).map_err(Err)?;
        let n = self.layout.chunks(plain);
        let mut buf = vec![0u8; STREAM_CHUNKS * self.layout.stored_chunk() as usize];
        let mut out = Vec::with_capacity(STREAM_CHUNKS * self.layout.chunk as usize);
        let mut i = 0;
        while i < n {
            out.clear();
            let batch_end = (i + STREAM_CHUNKS as u64).min(n);
            let stored_len =
                (self.layout.stored_offset(batch_end) - self.layout.stored_offset(i)) as usize;
            let stored_len = if batch_end == n {
                (size - self.layout.stored_offset(i)) as usize
            } else {
                stored_len
            };
            let batch = &mut buf[..stored_len];
            input.read_exact(batch).map_err(Err)?;
            let mut at = 0;
            for j in i..batch_end {
                let r = self.layout.chunk_range(j, plain);
                let len = (r.end - r.start) as usize + TAG_LEN;
                out.extend_from_slice(
                    self.open(&h, obj, j, j + 1 == n, &mut batch[at..at + len])
                        .map_err(Ok)?,
                );
                at += len;
            }
            output.write_all(&out).map_err(Err)?;
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&out);
            }
            i = batch_end;
        }
        output.sync_all().map_err(Err)?;
        Ok(plain)
    }
}

/// The part of a repository document after its checksum prefix (FORMAT.md §3.1).
fn config_rest(doc: &[u8]) -> Result<&[u8], CryptError> {
    let well_formed = doc.len() > CHECKSUM_PREFIX_LEN
        && doc.starts_with(CHECKSUM_PREFIX)
        && &doc[CHECKSUM_PREFIX_LEN - 2..CHECKSUM_PREFIX_LEN] == b"\",";
    if !well_formed {
        return Err(CryptError::ConfigMalformed {
            detail: "it does not start with its checksum (FORMAT.md §3.1)".to_owned(),
        });
    }
    Ok(&doc[CHECKSUM_PREFIX_LEN..])
}

/// The `repository_id` a `tidemark.json` names.
fn config_repository_id(doc: &[u8]) -> Result<String, CryptError> {
    #[derive(serde::Deserialize)]
    struct Id {
        repository_id: String,
    }
    let id: Id = serde_json::from_slice(doc).map_err(|e| CryptError::ConfigMalformed {
        detail: e.to_string(),
    })?;
    if id.repository_id.is_empty() {
        return Err(CryptError::ConfigMalformed {
            detail: "its repository_id is empty".to_owned(),
        });
    }
    Ok(id.repository_id)
}

/// The encryption decorator: see the module documentation.
pub struct CryptStore {
    inner: Arc<dyn ObjectStore>,
    crypt: Arc<Crypt>,
    /// The repository id objects are bound to, from the authenticated `tidemark.json`.
    repository: tokio::sync::OnceCell<Arc<str>>,
}

impl fmt::Debug for CryptStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CryptStore")
            .field("inner", &self.inner)
            .field("key_id", &self.crypt.key_ids())
            .field("chunk_size", &self.crypt.layout.chunk)
            .field("repository", &self.repository.get())
            .finish()
    }
}

impl CryptStore {
    /// Encrypts everything written to `inner` (but `tidemark.json`) with `key`, in chunks of
    /// `chunk_size` plaintext bytes: a power of two from 4 KiB to 16 MiB.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        key: &EncryptionKey,
        chunk_size: u32,
    ) -> StoreResult<CryptStore> {
        CryptStore::build(inner, std::slice::from_ref(key), key, key, chunk_size)
    }

    /// Encrypts with the data keys of a repository's keyring (FORMAT.md §10.7): objects are
    /// opened with the key their header names, sealed with the active one, and
    /// `tidemark.json` is authenticated with the key it names.
    pub fn with_data_keys(
        inner: Arc<dyn ObjectStore>,
        keys: &crate::keyring::DataKeys,
        chunk_size: u32,
    ) -> StoreResult<CryptStore> {
        let missing =
            |id: &str| StoreError::config(format!("the repository's keyring lacks data key {id}"));
        let active = keys
            .get(&keys.active)
            .ok_or_else(|| missing(&keys.active))?;
        let config = keys
            .get(&keys.config)
            .ok_or_else(|| missing(&keys.config))?;
        CryptStore::build(inner, &keys.keys, active, config, chunk_size)
    }

    fn build(
        inner: Arc<dyn ObjectStore>,
        keys: &[EncryptionKey],
        active: &EncryptionKey,
        config: &EncryptionKey,
        chunk_size: u32,
    ) -> StoreResult<CryptStore> {
        if !chunk_size.is_power_of_two() || !(4096..=16 << 20).contains(&chunk_size) {
            return Err(StoreError::config(format!(
                "the encryption chunk size {chunk_size} is not supported: it must be a power of \
                 two from 4096 to 16777216"
            )));
        }
        let ciphers = keys
            .iter()
            .map(|k| {
                let cipher = XChaCha20Poly1305::new_from_slice(k.as_bytes())
                    .expect("an encryption key is 32 bytes");
                (k.key_id_bytes(), cipher)
            })
            .collect::<Vec<_>>();
        let active = ciphers
            .iter()
            .position(|(id, _)| *id == active.key_id_bytes())
            .expect("the active key is one of the keys");
        Ok(CryptStore {
            inner,
            repository: tokio::sync::OnceCell::new(),
            crypt: Arc::new(Crypt {
                ciphers,
                active,
                config_key: config.derive(CONFIG_KEY_INFO),
                chunk_log2: chunk_size.trailing_zeros() as u8,
                layout: Layout {
                    chunk: u64::from(chunk_size),
                },
            }),
        })
    }

    /// The store this one encrypts for.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The size an object of `plain` bytes takes in the store.
    pub fn stored_size(&self, plain: u64) -> u64 {
        self.crypt.layout.stored_size(plain)
    }

    fn plaintext(key: &str) -> bool {
        PLAINTEXT_KEYS.contains(&key)
    }

    fn clear(key: &str) -> bool {
        CLEAR_KEYS.contains(&key)
    }

    fn location(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.describe().trim_end_matches('/'))
    }

    fn fail(&self, op: StoreOp, key: &str, e: CryptError) -> StoreError {
        StoreError::Other {
            op,
            key: key.to_owned(),
            location: self.location(key),
            source: Box::new(e),
        }
    }

    fn local(op: StoreOp, key: &str, path: &Path, source: io::Error) -> StoreError {
        StoreError::LocalFile {
            op,
            key: key.to_owned(),
            path: path.display().to_string(),
            source,
        }
    }

    /// The plaintext size of an object of `stored` bytes, or the error for a size no
    /// encrypted object has.
    fn plain_size(&self, op: StoreOp, key: &str, stored: u64) -> StoreResult<u64> {
        self.crypt
            .layout
            .plain_size(stored)
            .ok_or_else(|| self.fail(op, key, CryptError::BadSize { size: stored }))
    }

    fn meta(&self, op: StoreOp, meta: ObjectMeta) -> StoreResult<ObjectMeta> {
        if Self::plaintext(&meta.key) || Self::clear(&meta.key) {
            return Ok(meta);
        }
        let size = self.plain_size(op, &meta.key, meta.size)?;
        Ok(ObjectMeta { size, ..meta })
    }

    /// The repository id the object at `key` is bound to: read from `tidemark.json` (and
    /// authenticated) the first time it is needed.
    async fn bound(&self, op: StoreOp, key: &str) -> StoreResult<Arc<str>> {
        if UNBOUND_KEYS.contains(&key) {
            return Ok(Arc::from(""));
        }
        let id = self
            .repository
            .get_or_try_init(|| async {
                let config = crate::keys::CONFIG;
                let doc = match self.inner.get(config).await {
                    Ok(doc) => doc,
                    Err(e) if e.is_not_found() => {
                        return Err(self.fail(op, key, CryptError::ConfigMissing));
                    }
                    Err(e) => return Err(e),
                };
                let id = self
                    .crypt
                    .verify_config(&doc)
                    .map_err(|e| self.fail(StoreOp::Get, config, e))?;
                Ok(Arc::from(id))
            })
            .await?;
        Ok(Arc::clone(id))
    }

    /// Records the repository id of a `tidemark.json` read or written, refusing one that
    /// differs from the id objects were already bound to.
    fn bind(&self, op: StoreOp, id: String) -> StoreResult<()> {
        if self.repository.get().is_none() {
            // A concurrent first binding may win; it is compared below like any other.
            let _ = self.repository.set(Arc::from(id.as_str()));
        }
        match self.repository.get() {
            Some(known) if **known != *id => Err(self.fail(
                op,
                crate::keys::CONFIG,
                CryptError::ConfigChanged {
                    was: known.to_string(),
                    now: id,
                },
            )),
            _ => Ok(()),
        }
    }

    /// Checks a `tidemark.json` read from the store and binds its repository id.
    fn check_config(&self, op: StoreOp, doc: &[u8]) -> StoreResult<()> {
        let id = self
            .crypt
            .verify_config(doc)
            .map_err(|e| self.fail(op, crate::keys::CONFIG, e))?;
        self.bind(op, id)
    }

    /// The bytes to store for `data` at `key`: sealed, or for `tidemark.json`
    /// authenticated (with the repository id it names, bound once the write succeeds).
    async fn seal(
        &self,
        op: StoreOp,
        key: &str,
        data: Bytes,
    ) -> StoreResult<(Bytes, Option<String>)> {
        if Self::plaintext(key) {
            let (doc, id) = self
                .crypt
                .authenticate_config(&data)
                .map_err(|e| self.fail(op, key, e))?;
            if let Some(known) = self.repository.get()
                && **known != *id
            {
                let e = CryptError::ConfigChanged {
                    was: known.to_string(),
                    now: id,
                };
                return Err(self.fail(op, key, e));
            }
            return Ok((Bytes::from(doc), Some(id)));
        }
        let repository = self.bound(op, key).await?;
        let obj = Object {
            repository: &repository,
            key,
        };
        Ok((Bytes::from(self.crypt.encrypt(obj, &data)), None))
    }

    /// `get_to_file`, and with `max_len` `get_to_file_max`: the encrypted object is
    /// downloaded with the bound its plaintext bound gives (so the wrapped store stops one
    /// byte past it), then decrypted chunk by chunk into a temporary file renamed to `path`.
    /// With `hash`, also the sha256 of what was written to `path`: the plaintext, which is
    /// what the repository's checksums are of (FORMAT.md §10).
    async fn download(
        &self,
        key: &str,
        path: &Path,
        max_len: Option<u64>,
        hash: bool,
    ) -> StoreResult<(u64, Option<String>)> {
        super::validate_key(key)?;
        let op = StoreOp::GetToFile;
        let local = |e| Self::local(op, key, path, e);
        if Self::plaintext(key) {
            return self.download_config(key, path, max_len, hash).await;
        }
        if Self::clear(key) {
            return match (max_len, hash) {
                (None, _) => Ok((self.inner.get_to_file(key, path).await?, None)),
                (Some(max), false) => Ok((self.inner.get_to_file_max(key, path, max).await?, None)),
                (Some(max), true) => {
                    let d = self.inner.get_to_file_max_hashed(key, path, max).await?;
                    Ok((d.len, Some(d.sha256)))
                }
            };
        }
        let repository = self.bound(op, key).await?;
        let (dir, sealed) = local_temp_path(path).map_err(local)?;
        let sealed = TempFile(sealed);
        let stored = match max_len {
            None => self.inner.get_to_file(key, &sealed.0).await,
            Some(max) => {
                let limit = self.crypt.layout.stored_size(max);
                let got = self.inner.get_to_file_max(key, &sealed.0, limit).await;
                got.map_err(|e| self.too_large(e, StoreOp::GetToFile, key, max))
            }
        }?;
        if let Some(max) = max_len {
            // A size no encrypted object has is refused by decryption, with its reason.
            if self
                .crypt
                .layout
                .plain_size(stored)
                .is_some_and(|n| n > max)
            {
                return Err(self.too_large_error(StoreOp::GetToFile, key, max));
            }
        }
        let (_, plain) = local_temp_path(path).map_err(local)?;
        let plain = TempFile(plain);
        let crypt = Arc::clone(&self.crypt);
        let (k, src, dst) = (key.to_owned(), sealed.0.clone(), plain.0.clone());
        let (size, sha256) = blocking(move || {
            let obj = Object {
                repository: &repository,
                key: &k,
            };
            let mut hasher = hash.then(Hasher::new);
            let size = crypt.decrypt_file(obj, &src, &dst, hasher.as_mut())?;
            Ok((size, hasher.map(|h| h.finish().0)))
        })
        .await
        .map_err(|e| match e {
            Ok(c) => self.fail(op, key, c),
            Err(io) => local(io),
        })?;
        fs::rename(&plain.0, path).map_err(local)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok((size, sha256))
    }

    /// `tidemark.json` to a file: checked whole (it is small), then written as every
    /// download is: a synced temporary file renamed into place.
    async fn download_config(
        &self,
        key: &str,
        path: &Path,
        max_len: Option<u64>,
        hash: bool,
    ) -> StoreResult<(u64, Option<String>)> {
        let local = |e| Self::local(StoreOp::GetToFile, key, path, e);
        let doc = self.get(key).await?;
        if let Some(max) = max_len.filter(|&max| doc.len() as u64 > max) {
            return Err(self.too_large_error(StoreOp::GetToFile, key, max));
        }
        let (_, temp) = local_temp_path(path).map_err(local)?;
        let temp = TempFile(temp);
        let (t, p, d) = (temp.0.clone(), path.to_owned(), doc.clone());
        blocking(move || {
            let mut f = File::create_new(&t)?;
            f.write_all(&d)?;
            f.sync_all()?;
            fs::rename(&t, &p)
        })
        .await
        .map_err(local)?;
        // A small document, and in memory already: hashed at once.
        let sha256 = hash.then(|| crate::checksum::sha256_hex(&doc));
        Ok((doc.len() as u64, sha256))
    }

    /// The wrapped store's [`StoreError::TooLarge`] (about the encrypted size) restated
    /// about the plaintext bound the caller gave; other errors unchanged.
    fn too_large(&self, e: StoreError, op: StoreOp, key: &str, max_len: u64) -> StoreError {
        match e {
            StoreError::TooLarge { .. } => self.too_large_error(op, key, max_len),
            other => other,
        }
    }

    fn too_large_error(&self, op: StoreOp, key: &str, max_len: u64) -> StoreError {
        StoreError::TooLarge {
            op,
            key: key.to_owned(),
            location: self.location(key),
            limit: max_len,
        }
    }

    /// A written object's tag, binding the repository id of a `tidemark.json` written.
    fn written(&self, op: StoreOp, id: Option<String>, etag: ETag) -> StoreResult<ETag> {
        if let Some(id) = id {
            self.bind(op, id)?;
        }
        Ok(etag)
    }
}

/// Runs encryption work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("encryption work does not panic")
}

#[async_trait]
impl ObjectStore for CryptStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        super::validate_key(key)?;
        if Self::clear(key) {
            return self.inner.put(key, data).await;
        }
        let op = StoreOp::Put;
        let (sealed, id) = self.seal(op, key, data).await?;
        let etag = self.inner.put(key, sealed).await?;
        self.written(op, id, etag)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<ETag> {
        super::validate_key(key)?;
        if Self::clear(key) {
            return self.inner.put_if_absent(key, data).await;
        }
        let op = StoreOp::PutIfAbsent;
        let (sealed, id) = self.seal(op, key, data).await?;
        let etag = self.inner.put_if_absent(key, sealed).await?;
        self.written(op, id, etag)
    }

    async fn put_if_match(&self, key: &str, data: Bytes, etag: &ETag) -> StoreResult<ETag> {
        super::validate_key(key)?;
        if Self::clear(key) {
            return self.inner.put_if_match(key, data, etag).await;
        }
        let op = StoreOp::PutIfMatch;
        let (sealed, id) = self.seal(op, key, data).await?;
        let etag = self.inner.put_if_match(key, sealed, etag).await?;
        self.written(op, id, etag)
    }

    async fn put_file(&self, key: &str, path: &Path) -> StoreResult<ETag> {
        super::validate_key(key)?;
        if Self::clear(key) {
            return self.inner.put_file(key, path).await;
        }
        if Self::plaintext(key) {
            // `tidemark.json` is small and must be authenticated on its way.
            let data = tokio::fs::read(path)
                .await
                .map_err(|e| Self::local(StoreOp::PutFile, key, path, e))?;
            return self.put(key, Bytes::from(data)).await;
        }
        let repository = self.bound(StoreOp::PutFile, key).await?;
        // Encrypt to a temporary file beside the source (the same file system, which holds
        // the source already), falling back to the system's temporary directory.
        let op = StoreOp::PutFile;
        let temp = {
            let crypt = Arc::clone(&self.crypt);
            let (k, src) = (key.to_owned(), path.to_owned());
            blocking(move || {
                let obj = Object {
                    repository: &repository,
                    key: &k,
                };
                let mut last = None;
                let beside = local_temp_path(&src).map(|(_, t)| t);
                let fallback = std::env::temp_dir()
                    .join(format!(".tidemark-enc-{:016x}", rand::random::<u64>()));
                for dst in beside.into_iter().chain([fallback]) {
                    let guard = TempFile(dst.clone());
                    match crypt.encrypt_file(obj, &src, &dst) {
                        Ok(()) => return Ok(guard),
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                            ) =>
                        {
                            last = Some(e)
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(last.expect("at least one place was tried"))
            })
            .await
            .map_err(|e| Self::local(op, key, path, e))?
        };
        self.inner.put_file(key, &temp.0).await
    }

    async fn get_with_meta_max(&self, key: &str, max_len: u64) -> StoreResult<(Bytes, ObjectMeta)> {
        super::validate_key(key)?;
        if Self::clear(key) || Self::plaintext(key) {
            let (data, meta) = self.inner.get_with_meta_max(key, max_len).await?;
            if Self::plaintext(key) {
                self.check_config(StoreOp::Get, &data)?;
            }
            return Ok((data, meta));
        }
        let op = StoreOp::Get;
        let limit = self.crypt.layout.stored_size(max_len);
        let got = self.inner.get_with_meta_max(key, limit).await;
        let (data, meta) = got.map_err(|e| self.too_large(e, op, key, max_len))?;
        if self
            .crypt
            .layout
            .plain_size(data.len() as u64)
            .is_some_and(|n| n > max_len)
        {
            return Err(self.too_large_error(op, key, max_len));
        }
        let repository = self.bound(StoreOp::Get, key).await?;
        let obj = Object {
            repository: &repository,
            key,
        };
        let plain = self
            .crypt
            .decrypt(obj, Vec::from(data))
            .map_err(|e| self.fail(StoreOp::Get, key, e))?;
        let meta = ObjectMeta {
            size: plain.len() as u64,
            ..meta
        };
        Ok((Bytes::from(plain), meta))
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> StoreResult<u64> {
        Ok(self.download(key, path, None, false).await?.0)
    }

    async fn get_to_file_max(&self, key: &str, path: &Path, max_len: u64) -> StoreResult<u64> {
        Ok(self.download(key, path, Some(max_len), false).await?.0)
    }

    async fn get_to_file_hashed(
        &self,
        key: &str,
        path: &Path,
        max_len: u64,
        _cache: PageCache,
    ) -> StoreResult<FileDigest> {
        let (len, sha256) = self.download(key, path, Some(max_len), true).await?;
        let sha256 = sha256.expect("a hashed download returns the digest of what it wrote");
        Ok(FileDigest { len, sha256 })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        super::validate_key(key)?;
        let op = StoreOp::GetRange;
        if Self::clear(key) {
            return self.inner.get_range(key, range).await;
        }
        if Self::plaintext(key) {
            // Only the whole document can be authenticated.
            let doc = self.get(key).await?;
            let size = doc.len() as u64;
            if range.start > range.end || range.end > size {
                return Err(StoreError::InvalidRange {
                    op,
                    key: key.to_owned(),
                    location: self.location(key),
                    start: range.start,
                    end: range.end,
                    size: Some(size),
                });
            }
            return Ok(doc.slice(range.start as usize..range.end as usize));
        }
        let repository = self.bound(op, key).await?;
        let obj = Object {
            repository: &repository,
            key,
        };
        let stored = self
            .inner
            .head(key)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                op,
                key: key.to_owned(),
                location: self.location(key),
            })?
            .size;
        let plain = self.plain_size(op, key, stored)?;
        if range.start > range.end || range.end > plain {
            return Err(StoreError::InvalidRange {
                op,
                key: key.to_owned(),
                location: self.location(key),
                start: range.start,
                end: range.end,
                size: Some(plain),
            });
        }
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        let layout = self.crypt.layout;
        let n = layout.chunks(plain);
        let first = range.start / layout.chunk;
        let last = (range.end - 1) / layout.chunk;
        let end = if last + 1 == n {
            stored
        } else {
            layout.stored_offset(last + 1)
        };
        // The header and the chunks: one read when the range starts in the first chunk.
        let (header, mut chunks) = if first == 0 {
            let all = self.inner.get_range(key, 0..end).await?;
            (all.slice(..HEADER_LEN), Vec::from(all.slice(HEADER_LEN..)))
        } else {
            let (h, c) = futures::try_join!(
                self.inner.get_range(key, 0..HEADER_LEN as u64),
                self.inner.get_range(key, layout.stored_offset(first)..end)
            )?;
            (h, Vec::from(c))
        };
        let h = Header::parse(&header, &self.crypt).map_err(|e| self.fail(op, key, e))?;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut at = 0usize;
        for i in first..=last {
            let r = layout.chunk_range(i, plain);
            let len = (r.end - r.start) as usize + TAG_LEN;
            let Some(sealed) = chunks.get_mut(at..at + len) else {
                return Err(self.fail(op, key, CryptError::Tampered { chunk: i }));
            };
            let opened = self
                .crypt
                .open(&h, obj, i, i + 1 == n, sealed)
                .map_err(|e| self.fail(op, key, e))?;
            let from = range.start.max(r.start) - r.start;
            let to = range.end.min(r.end) - r.start;
            out.extend_from_slice(&opened[from as usize..to as usize]);
            at += len;
        }
        Ok(Bytes::from(out))
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        super::validate_key(key)?;
        match self.inner.head(key).await? {
            Some(meta) => Ok(Some(self.meta(StoreOp::Head, meta)?)),
            None => Ok(None),
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        // A listing reports every object: one whose size no sealed object can have (a
        // foreign file, a truncated object) keeps its stored size, and reading it fails
        // with a message that names it. Maintenance (pruning, `verify --all`) thus sees it
        // instead of stopping at it.
        Ok(self
            .inner
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| match self.meta(StoreOp::List, m.clone()) {
                Ok(plain) => plain,
                Err(e) => {
                    tracing::warn!(key = %m.key, error = %e, "listed an object that is not sealed with this repository's format");
                    m
                }
            })
            .collect())
    }

    async fn check_object_lock(&self) -> StoreResult<()> {
        self.inner.check_object_lock().await
    }

    fn set_object_lock(&self, lock: Option<crate::model::ObjectLock>) {
        self.inner.set_object_lock(lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const CHUNK: u32 = 4096;

    fn key(n: u8) -> EncryptionKey {
        EncryptionKey::from_bytes([n; KEY_LEN])
    }

    /// The repository's object lock set on the outermost decorator reaches the store below
    /// all of them, which locks the stored (sealed) object; the lease stays unlocked.
    #[tokio::test]
    async fn the_object_lock_reaches_the_store_through_every_decorator() {
        use crate::model::{LockMode, ObjectLock};
        use crate::store::fault::FaultStore;
        use crate::store::{Rate, RateLimiter, RetryPolicy, RetryStore, ThrottleStore};
        let raw = Arc::new(MemoryStore::new());
        let fault: Arc<dyn ObjectStore> = Arc::new(FaultStore::new(raw.clone()));
        let limiter = RateLimiter::new(Rate::bytes_per_sec(1 << 30).unwrap());
        let throttle: Arc<dyn ObjectStore> = Arc::new(ThrottleStore::new(fault, limiter));
        let retry: Arc<dyn ObjectStore> =
            Arc::new(RetryStore::new(throttle, RetryPolicy::default()));
        let crypt = CryptStore::new(retry, &key(1), CHUNK).unwrap();
        crypt.repository.set(Arc::from("r")).unwrap();
        crypt.check_object_lock().await.unwrap();
        crypt.set_object_lock(Some(ObjectLock::new(LockMode::Governance, 3).unwrap()));
        let seg = "wal/0000000000000001.seg";
        let before = time::OffsetDateTime::now_utc();
        crypt
            .put(seg, Bytes::from_static(b"records"))
            .await
            .unwrap();
        crypt
            .put(crate::keys::LEASE, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let until = raw.retain_until(seg).expect("the segment is locked");
        assert!(until >= before + time::Duration::days(3), "{until}");
        assert!(until <= time::OffsetDateTime::now_utc() + time::Duration::days(3));
        assert!(raw.retain_until(crate::keys::LEASE).is_none());
        let err = crypt.delete(seg).await.unwrap_err();
        assert!(matches!(err, StoreError::AccessDenied { .. }), "{err}");
        crypt.delete(crate::keys::LEASE).await.unwrap();
    }

    /// A store on `raw` bound to repository `id` without a `tidemark.json`.
    fn bound_store(raw: Arc<MemoryStore>, k: &EncryptionKey, id: &str) -> CryptStore {
        let crypt = CryptStore::new(raw, k, CHUNK).unwrap();
        crypt.repository.set(Arc::from(id)).unwrap();
        crypt
    }

    fn stores(k: &EncryptionKey) -> (Arc<MemoryStore>, CryptStore) {
        let raw = Arc::new(MemoryStore::new());
        let crypt = bound_store(raw.clone(), k, "r");
        (raw, crypt)
    }

    /// A `tidemark.json` for repository `id`, as the repository layer writes it.
    fn config_doc(id: &str, k: &EncryptionKey) -> Bytes {
        use crate::model::{Compression, Encryption, FORMAT_VERSION, Lineage, RepositoryConfig};
        let config = RepositoryConfig {
            format_version: FORMAT_VERSION,
            repository_id: id.into(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            database_identity: "db".into(),
            lineage: Lineage {
                id: "l".into(),
                parent: None,
            },
            segment_compression: Compression::Zstd,
            encryption: Some(Encryption {
                algorithm: ALGORITHM.into(),
                chunk_size: CHUNK,
                key_id: k.key_id(),
            }),
            object_lock: None,
        };
        Bytes::from(crate::model::to_document_bytes(&config))
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    const SIZES: [usize; 9] = [0, 1, 100, 4095, 4096, 4097, 8192, 3 * 4096 + 5, 70_000];

    #[test]
    fn sizes_map_both_ways() {
        for chunk in [4096u64, 65536] {
            let l = Layout { chunk };
            for plain in (0..3 * chunk + 40).chain([10 * chunk, 10 * chunk + 1]) {
                let stored = l.stored_size(plain);
                assert_eq!(l.plain_size(stored), Some(plain), "{plain}");
            }
            // Sizes no encrypted object has: too short, or a partial last chunk without
            // a byte of plaintext.
            for stored in [0, 1, 40, 55, 40 + chunk + 16 + 16, 40 + chunk + 16 + 3] {
                assert_eq!(l.plain_size(stored), None, "{stored}");
            }
        }
    }

    #[tokio::test]
    async fn round_trip_and_sizes() {
        let (raw, s) = stores(&key(1));
        for len in SIZES {
            let k = format!("wal/{len:016x}.seg");
            let plain = data(len);
            s.put(&k, Bytes::from(plain.clone())).await.unwrap();
            let stored = raw.get(&k).await.unwrap();
            assert_eq!(stored.len() as u64, s.stored_size(len as u64));
            assert_eq!(&stored[..8], MAGIC);
            if len >= 16 {
                assert!(
                    !stored.windows(16).any(|w| w == &plain[..16]),
                    "plaintext visible at rest ({len} bytes)"
                );
            }
            assert_eq!(s.get(&k).await.unwrap(), plain);
            let (got, meta) = s.get_with_meta(&k).await.unwrap();
            assert_eq!(got, plain);
            assert_eq!(meta.size, len as u64);
            assert_eq!(s.head(&k).await.unwrap().unwrap().size, len as u64);
        }
        let listed = s.list("wal/").await.unwrap();
        let mut sizes: Vec<u64> = listed.iter().map(|m| m.size).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, SIZES.map(|n| n as u64).to_vec());
    }

    #[tokio::test]
    async fn a_foreign_object_is_listed_and_refused_when_read() {
        let (raw, s) = stores(&key(1));
        s.put("wal/a.seg", Bytes::from(data(100))).await.unwrap();
        raw.put("notes.txt", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let listed = s.list("").await.unwrap();
        let keys: Vec<(&str, u64)> = listed.iter().map(|m| (m.key.as_str(), m.size)).collect();
        assert_eq!(keys, vec![("notes.txt", 5), ("wal/a.seg", 100)]);
        let e = s.get("notes.txt").await.unwrap_err().to_string();
        assert!(e.contains("notes.txt"), "{e}");
    }

    #[tokio::test]
    async fn the_config_stays_readable_and_is_authenticated() {
        let k = key(1);
        let raw = Arc::new(MemoryStore::new());
        let s = CryptStore::new(raw.clone(), &k, CHUNK).unwrap();
        // Nothing is sealed before tidemark.json names the repository.
        let msg = s.put("wal/a", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(msg.to_string().contains("'wal/a'"), "{msg}");
        assert!(format!("{:?}", msg).contains("ConfigMissing"), "{msg:?}");
        let doc = config_doc("repo-a", &k);
        s.put_if_absent(crate::keys::CONFIG, doc.clone())
            .await
            .unwrap();
        let stored = raw.get(crate::keys::CONFIG).await.unwrap();
        // Readable without the key, as the same config, with its authentication in front.
        let text = std::str::from_utf8(&stored).unwrap();
        assert!(text.contains("\"authentication\":\""), "{text}");
        assert!(text.contains("repo-a"), "{text}");
        let parsed: crate::model::RepositoryConfig =
            crate::model::parse_document(crate::keys::CONFIG, &stored).unwrap();
        let original: crate::model::RepositoryConfig =
            crate::model::parse_document(crate::keys::CONFIG, &doc).unwrap();
        assert_eq!(parsed, original);
        assert_eq!(s.get(crate::keys::CONFIG).await.unwrap(), stored);
        assert_eq!(
            s.get_range(crate::keys::CONFIG, 0..13).await.unwrap(),
            &stored[..13]
        );
        s.put("wal/a", Bytes::from_static(b"x")).await.unwrap();

        // A fresh reader binds to the id the authenticated config names.
        let fresh = CryptStore::new(raw.clone(), &k, CHUNK).unwrap();
        assert_eq!(fresh.get("wal/a").await.unwrap(), &b"x"[..]);
        assert_eq!(fresh.repository.get().map(|r| &**r), Some("repo-a"));
    }

    /// The message of reading `wal/a` through a fresh store over `raw`, whose
    /// `tidemark.json` is `doc`.
    async fn read_with_config(raw: &Arc<MemoryStore>, k: &EncryptionKey, doc: &[u8]) -> String {
        raw.put(crate::keys::CONFIG, Bytes::copy_from_slice(doc))
            .await
            .unwrap();
        let fresh = CryptStore::new(raw.clone(), k, CHUNK).unwrap();
        let direct = fresh
            .get(crate::keys::CONFIG)
            .await
            .unwrap_err()
            .to_string();
        let e = fresh.get("wal/a").await.unwrap_err();
        let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(msg.contains("'tidemark.json'"), "{msg}");
        assert!(direct.contains("'tidemark.json'"), "{direct}");
        msg
    }

    #[tokio::test]
    async fn a_changed_config_is_refused() {
        let k = key(1);
        let raw = Arc::new(MemoryStore::new());
        let s = CryptStore::new(raw.clone(), &k, CHUNK).unwrap();
        s.put_if_absent(crate::keys::CONFIG, config_doc("repo-a", &k))
            .await
            .unwrap();
        s.put("wal/a", Bytes::from_static(b"x")).await.unwrap();
        let stored = raw.get(crate::keys::CONFIG).await.unwrap().to_vec();
        let body = std::str::from_utf8(&stored[CHECKSUM_PREFIX_LEN..]).unwrap();
        // Edited fields, each with a correct checksum (so only the authentication fails).
        let rechecksummed = |body: String| {
            let mut doc = CHECKSUM_PREFIX.to_vec();
            doc.extend_from_slice(crate::checksum::sha256_hex(body.as_bytes()).as_bytes());
            doc.extend_from_slice(b"\",");
            doc.extend_from_slice(body.as_bytes());
            doc
        };
        for (from, to) in [
            ("repo-a", "repo-b"),
            ("\"chunk_size\": 4096", "\"chunk_size\": 8192"),
            (
                "\"database_identity\": \"db\"",
                "\"database_identity\": \"xx\"",
            ),
            (&k.key_id(), &key(9).key_id()),
        ] {
            assert!(body.contains(from), "{from} in {body}");
            let doc = rechecksummed(body.replace(from, to));
            let msg = read_with_config(&raw, &k, &doc).await;
            assert!(msg.contains("tidemark.json failed authentication"), "{msg}");
        }
        // Without its authentication (as an older Tidemark wrote it).
        let doc = rechecksummed(body[AUTH_PREFIX_LEN..].to_owned());
        let msg = read_with_config(&raw, &k, &doc).await;
        assert!(msg.contains("carries no authentication"), "{msg}");
        // Authenticated with another key.
        let other = CryptStore::new(Arc::new(MemoryStore::new()), &key(2), CHUNK).unwrap();
        let (doc, _) = other
            .crypt
            .authenticate_config(&config_doc("repo-a", &k))
            .unwrap();
        let msg = read_with_config(&raw, &k, &doc).await;
        assert!(msg.contains("tidemark.json failed authentication"), "{msg}");
        // The original still works.
        raw.put(crate::keys::CONFIG, Bytes::from(stored))
            .await
            .unwrap();
        let fresh = CryptStore::new(raw.clone(), &k, CHUNK).unwrap();
        assert_eq!(fresh.get("wal/a").await.unwrap(), &b"x"[..]);
        // A store bound to one repository refuses a config naming another.
        let msg = fresh
            .put(crate::keys::CONFIG, config_doc("repo-b", &k))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("tidemark.json"), "{msg}");
    }

    #[tokio::test]
    async fn objects_are_bound_to_their_repository() {
        let k = key(3);
        let raw_a = Arc::new(MemoryStore::new());
        let a = bound_store(raw_a.clone(), &k, "repo-a");
        let raw_b = Arc::new(MemoryStore::new());
        let b = bound_store(raw_b.clone(), &k, "repo-b");
        for (name, len) in [("wal/0000000000000001.seg", 5000), ("sst/x", 10)] {
            a.put(name, Bytes::from(data(len))).await.unwrap();
            b.put(name, Bytes::from(data(len))).await.unwrap();
            assert_eq!(b.get(name).await.unwrap(), data(len));
            // A's object under the same key in B.
            raw_b
                .put(name, raw_a.get(name).await.unwrap())
                .await
                .unwrap();
            for msg in read_error(&b, name).await {
                assert!(msg.contains("chunk 0 failed authentication"), "{msg}");
                assert!(msg.contains("another repository"), "{msg}");
            }
        }
        // The lease is not bound (a writer takes it before tidemark.json exists).
        a.put(crate::keys::LEASE, Bytes::from_static(b"lease"))
            .await
            .unwrap();
        raw_b
            .put(
                crate::keys::LEASE,
                raw_a.get(crate::keys::LEASE).await.unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(b.get(crate::keys::LEASE).await.unwrap(), &b"lease"[..]);
    }

    #[tokio::test]
    async fn version_1_objects_are_refused() {
        let (raw, s) = stores(&key(1));
        s.put("wal/a", Bytes::from(data(100))).await.unwrap();
        let mut stored = raw.get("wal/a").await.unwrap().to_vec();
        stored[8] = 1;
        raw.put("wal/a", Bytes::from(stored)).await.unwrap();
        for msg in read_error(&s, "wal/a").await {
            assert!(
                msg.contains("version 1, which does not bind an object to its repository"),
                "{msg}"
            );
        }
    }

    #[tokio::test]
    async fn ranges_across_chunk_boundaries() {
        let (_raw, s) = stores(&key(2));
        let plain = data(3 * 4096 + 100);
        s.put("o", Bytes::from(plain.clone())).await.unwrap();
        let n = plain.len() as u64;
        let mut ranges = vec![
            0..128,
            0..n,
            4000..4200,
            4095..4097,
            4096..8192,
            100..12000,
            n - 1..n,
            n - 100..n,
            8191..8193,
            12_288..n,
        ];
        for _ in 0..200 {
            let a = rand::random_range(0..n);
            let b = rand::random_range(a..=n);
            ranges.push(a..b);
        }
        for r in ranges {
            let got = s.get_range("o", r.clone()).await.unwrap();
            assert_eq!(got, plain[r.start as usize..r.end as usize], "{r:?}");
        }
        assert!(s.get_range("o", 5..5).await.unwrap().is_empty());
        let err = s.get_range("o", 10..n + 1).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRange { size: Some(s), .. } if s == n),
            "{err}"
        );
        assert!(
            s.get_range("missing", 0..1)
                .await
                .unwrap_err()
                .is_not_found()
        );
        // An empty object.
        s.put("e", Bytes::new()).await.unwrap();
        assert!(s.get_range("e", 0..0).await.unwrap().is_empty());
        assert!(matches!(
            s.get_range("e", 0..1).await.unwrap_err(),
            StoreError::InvalidRange { .. }
        ));
    }

    #[tokio::test]
    async fn files_stream_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, s) = stores(&key(3));
        for len in SIZES.into_iter().chain([64 * 4096 + 3, 200 * 4096]) {
            let src = dir.path().join(format!("src-{len}"));
            let plain = data(len);
            fs::write(&src, &plain).unwrap();
            let k = format!("sst/{len}");
            s.put_file(&k, &src).await.unwrap();
            assert_eq!(
                raw.head(&k).await.unwrap().unwrap().size,
                s.stored_size(len as u64)
            );
            let dst = dir.path().join(format!("dst-{len}"));
            assert_eq!(s.get_to_file(&k, &dst).await.unwrap(), len as u64);
            assert_eq!(fs::read(&dst).unwrap(), plain);
            assert_eq!(s.get(&k).await.unwrap(), plain);
        }
        // No temporary files are left beside the sources and destinations.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// The messages of failed reads (whole, to a file, ranged), which must name the object.
    async fn read_error(s: &CryptStore, k: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        // A ranged read checks the chunks it reads: read them all.
        let whole_range = match s.head(k).await {
            Ok(meta) => s.get_range(k, 0..meta.unwrap().size).await,
            Err(e) => Err(e),
        };
        let errors = vec![
            s.get(k).await.unwrap_err(),
            s.get_to_file(k, &dst).await.unwrap_err(),
            whole_range.unwrap_err(),
        ];
        assert!(!dst.exists(), "a failed download left {}", dst.display());
        errors
            .into_iter()
            .map(|e| {
                let msg = e.to_string();
                let full = format!("{msg}: {}", std::error::Error::source(&e).unwrap());
                assert!(msg.contains(&format!("'{k}'")), "{msg}");
                full
            })
            .collect()
    }

    /// Downloads `len` plaintext bytes with the bound `max` through a crypt store over a
    /// recording store; checks the outcome, that nothing but the result is left in the
    /// directory, and returns the bounds the wrapped store saw.
    /// With `hashed`, through the hashed download, whose digest must be the plaintext's.
    async fn bounded_download(len: usize, max: u64, hashed: bool) -> Vec<Option<u64>> {
        let raw = Arc::new(crate::testing::SpyStore::new(Arc::new(MemoryStore::new())));
        let s = CryptStore::new(raw.clone(), &key(4), CHUNK).unwrap();
        s.repository.set(Arc::from("r")).unwrap();
        let plain = data(len);
        s.put("sst/x", Bytes::from(plain.clone())).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        let got = if hashed {
            s.get_to_file_max_hashed("sst/x", &dst, max).await.map(|d| {
                assert_eq!(d.sha256, crate::checksum::sha256_hex(&plain));
                d.len
            })
        } else {
            s.get_to_file_max("sst/x", &dst, max).await
        };
        match got {
            Ok(n) => {
                assert!(len as u64 <= max, "{len} bytes passed the bound {max}");
                assert_eq!(n, len as u64);
                assert_eq!(fs::read(&dst).unwrap(), plain);
            }
            Err(e) => {
                assert!(len as u64 > max, "{len} bytes within {max} refused: {e}");
                assert!(
                    matches!(&e, StoreError::TooLarge { limit, key, .. } if *limit == max && key == "sst/x"),
                    "{e:?}"
                );
                assert!(!dst.exists());
            }
        }
        let left = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, usize::from(dst.exists()), "temporary files left");
        raw.bounds()
    }

    #[tokio::test]
    async fn bounded_downloads_stop_one_byte_past_the_bound() {
        for (len, max) in [
            (5000, 5000),
            (5000, 4999),
            (5000, 4096),
            (0, 0),
            (1, 0),
            (5000, u64::MAX),
        ] {
            for hashed in [false, true] {
                let bounds = bounded_download(len, max, hashed).await;
                // The wrapped store is asked for the encrypted bound, never for everything.
                assert_eq!(bounds, [Some(s_bound(max))], "{len} bytes, bound {max}");
            }
        }
    }

    fn s_bound(max: u64) -> u64 {
        Layout {
            chunk: u64::from(CHUNK),
        }
        .stored_size(max)
    }

    #[tokio::test]
    async fn an_extended_object_is_too_large_not_decrypted() {
        // Whole sealed chunks appended (a size an encrypted object can have): the bound
        // stops the download before decryption, and says so.
        let (raw, s) = stores(&key(5));
        s.put("sst/y", Bytes::from(data(5000))).await.unwrap();
        let mut stored = raw.get("sst/y").await.unwrap().to_vec();
        stored.extend(std::iter::repeat_n(7u8, CHUNK as usize + TAG_LEN));
        raw.put("sst/y", Bytes::from(stored)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        let e = s.get_to_file_max("sst/y", &dst, 5000).await.unwrap_err();
        assert!(
            matches!(e, StoreError::TooLarge { limit: 5000, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("5000 bytes"), "{e}");
        assert!(!dst.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// The hashed download's digest is of the plaintext written to the file (what the
    /// repository's checksums are of), for sealed objects of every size, the keyring kept
    /// as it is and the authenticated `tidemark.json`.
    #[tokio::test]
    async fn hashed_downloads_give_the_sha256_of_the_plaintext() {
        use crate::store::testkit::{Spy, check_bounded_reads, check_hashed_downloads};
        let (raw, s) = stores(&key(6));
        check_hashed_downloads(&s).await;
        check_bounded_reads(&s).await;
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        for len in SIZES.into_iter().chain([64 * 4096 + 3, 200 * 4096]) {
            let k = format!("sst/{len}");
            let plain = data(len);
            s.put(&k, Bytes::from(plain.clone())).await.unwrap();
            let d = s
                .get_to_file_max_hashed(&k, &dst, len as u64)
                .await
                .unwrap();
            assert_eq!(fs::read(&dst).unwrap(), plain);
            assert_eq!(d.len, len as u64);
            assert_eq!(d.sha256, crate::checksum::sha256_hex(&plain), "{len}");
            let sealed = raw.get(&k).await.unwrap();
            assert_ne!(d.sha256, crate::checksum::sha256_hex(&sealed));
        }

        // The keyring, stored as it is: the wrapped store's own hashed download.
        let spy = Arc::new(Spy::new(Arc::new(MemoryStore::new())));
        let s = CryptStore::new(spy.clone(), &key(6), CHUNK).unwrap();
        s.repository.set(Arc::from("r")).unwrap();
        let ring = Bytes::from_static(b"{\"keys\":[]}");
        s.put(crate::keys::KEYRING, ring.clone()).await.unwrap();
        let d = s
            .get_to_file_max_hashed(crate::keys::KEYRING, &dst, 100)
            .await
            .unwrap();
        assert_eq!(d.sha256, crate::checksum::sha256_hex(&ring));
        assert_eq!(spy.counts(), (1, 0));
        let e = s
            .get_to_file_max_hashed(crate::keys::KEYRING, &dst, 3)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { limit: 3, .. }), "{e}");

        // `tidemark.json`, authenticated and kept in plaintext.
        let raw = Arc::new(MemoryStore::new());
        let s = CryptStore::new(raw.clone(), &key(6), CHUNK).unwrap();
        s.put_if_absent(crate::keys::CONFIG, config_doc("r", &key(6)))
            .await
            .unwrap();
        let doc = raw.get(crate::keys::CONFIG).await.unwrap();
        let d = s
            .get_to_file_max_hashed(crate::keys::CONFIG, &dst, 1 << 16)
            .await
            .unwrap();
        assert_eq!(fs::read(&dst).unwrap(), doc);
        assert_eq!(d.len, doc.len() as u64);
        assert_eq!(d.sha256, crate::checksum::sha256_hex(&doc));
        fs::remove_file(&dst).unwrap();
        let e = s
            .get_to_file_max_hashed(crate::keys::CONFIG, &dst, 10)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { limit: 10, .. }), "{e}");
        assert!(!dst.exists());
    }

    /// A tampered object is refused by the hashed download as by the plain one, and
    /// leaves nothing behind.
    #[tokio::test]
    async fn a_tampered_object_is_refused_by_the_hashed_download() {
        let (raw, s) = stores(&key(7));
        s.put("sst/t", Bytes::from(data(9000))).await.unwrap();
        let mut stored = raw.get("sst/t").await.unwrap().to_vec();
        stored[HEADER_LEN + 5] ^= 1;
        raw.put("sst/t", Bytes::from(stored)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        let e = s
            .get_to_file_max_hashed("sst/t", &dst, 9000)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("'sst/t'"), "{e}");
        assert!(!matches!(e, StoreError::TooLarge { .. }), "{e}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn bounded_downloads_keep_exactly_what_fits(len in 0usize..20_000, slack in -9_000i64..9_000) {
            let max = (len as i64 + slack).max(0) as u64;
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for hashed in [false, true] {
                let bounds = rt.block_on(bounded_download(len, max, hashed));
                proptest::prop_assert_eq!(bounds, vec![Some(s_bound(max))]);
            }
        }
    }

    #[tokio::test]
    async fn tampering_is_detected() {
        let (raw, s) = stores(&key(4));
        let plain = data(3 * 4096 + 10);
        s.put("wal/a", Bytes::from(plain.clone())).await.unwrap();
        let stored = raw.get("wal/a").await.unwrap().to_vec();
        // One flipped bit anywhere after the magic: in the header, a chunk or a tag.
        for at in [
            9usize,
            20,
            30,
            40,
            41,
            4096,
            40 + 4096 + 16,
            stored.len() - 1,
        ] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            raw.put("wal/a", Bytes::from(bad)).await.unwrap();
            for msg in read_error(&s, "wal/a").await {
                assert!(
                    msg.contains("failed authentication")
                        || msg.contains("not supported")
                        || msg.contains("key id"),
                    "byte {at}: {msg}"
                );
            }
        }
        // Truncated at a chunk boundary (the last chunk dropped): the new last chunk was
        // not sealed as the last one.
        let cut = 40 + 3 * (4096 + 16);
        raw.put("wal/a", Bytes::from(stored[..cut].to_vec()))
            .await
            .unwrap();
        for msg in read_error(&s, "wal/a").await {
            assert!(msg.contains("chunk 2 failed authentication"), "{msg}");
        }
        // Truncated inside a chunk, and extended.
        for bad in [stored[..stored.len() - 5].to_vec(), {
            let mut v = stored.clone();
            v.extend_from_slice(&[0; 7]);
            v
        }] {
            raw.put("wal/a", Bytes::from(bad)).await.unwrap();
            for msg in read_error(&s, "wal/a").await {
                assert!(msg.contains("failed authentication"), "{msg}");
            }
        }
        // Two chunks swapped.
        let mut swapped = stored.clone();
        let c = 4096 + 16;
        let (a, b) = swapped[40..40 + 2 * c].split_at_mut(c);
        a.swap_with_slice(b);
        raw.put("wal/a", Bytes::from(swapped)).await.unwrap();
        for msg in read_error(&s, "wal/a").await {
            assert!(msg.contains("chunk 0 failed authentication"), "{msg}");
        }
        // An object stored in the clear.
        raw.put("wal/a", Bytes::from(plain)).await.unwrap();
        for msg in read_error(&s, "wal/a").await {
            assert!(msg.contains("not an encrypted object"), "{msg}");
        }
    }

    #[tokio::test]
    async fn objects_cannot_be_swapped() {
        let (raw, s) = stores(&key(5));
        s.put("wal/0000000000000001.seg", Bytes::from(data(5000)))
            .await
            .unwrap();
        s.put("wal/0000000000000064.seg", Bytes::from(data(5000)))
            .await
            .unwrap();
        let other = raw.get("wal/0000000000000001.seg").await.unwrap();
        raw.put("wal/0000000000000064.seg", other).await.unwrap();
        for msg in read_error(&s, "wal/0000000000000064.seg").await {
            assert!(msg.contains("chunk 0 failed authentication"), "{msg}");
        }
        assert_eq!(s.get("wal/0000000000000001.seg").await.unwrap(), data(5000));
    }

    #[tokio::test]
    async fn a_wrong_key_is_named() {
        let (raw, s) = stores(&key(6));
        s.put("manifest/x.json", Bytes::from_static(b"secret"))
            .await
            .unwrap();
        let other = bound_store(raw, &key(7), "r");
        for msg in read_error(&other, "manifest/x.json").await {
            assert!(msg.contains(&key(6).key_id()), "{msg}");
            assert!(msg.contains(&key(7).key_id()), "{msg}");
        }
    }

    #[tokio::test]
    async fn conditional_writes_keep_working() {
        let (_raw, s) = stores(&key(8));
        let e1 = s
            .put_if_absent("lease.json", Bytes::from_static(b"one"))
            .await
            .unwrap();
        assert!(
            s.put_if_absent("lease.json", Bytes::from_static(b"two"))
                .await
                .unwrap_err()
                .is_precondition_failed()
        );
        let (got, meta) = s.get_with_meta("lease.json").await.unwrap();
        assert_eq!(got, &b"one"[..]);
        assert_eq!(meta.etag, e1);
        assert_eq!(s.head("lease.json").await.unwrap().unwrap().etag, e1);
        let e2 = s
            .put_if_match("lease.json", Bytes::from_static(b"three"), &e1)
            .await
            .unwrap();
        assert!(
            s.put_if_match("lease.json", Bytes::from_static(b"four"), &e1)
                .await
                .unwrap_err()
                .is_precondition_failed()
        );
        assert_eq!(s.get("lease.json").await.unwrap(), &b"three"[..]);
        assert_eq!(s.head("lease.json").await.unwrap().unwrap().etag, e2);
    }

    #[test]
    fn keys_parse_from_hex_base64_and_raw_files() {
        let k = EncryptionKey::generate();
        let hex = k.to_hex();
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.as_bytes());
        for text in [
            hex.to_string(),
            hex.to_uppercase(),
            format!("  {}\n", *hex),
            b64.clone(),
            b64.trim_end_matches('=').to_owned(),
        ] {
            assert_eq!(
                EncryptionKey::parse(&text, "test").unwrap().as_bytes(),
                k.as_bytes()
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let chmod = |p: &Path, mode| {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        };
        for (name, content) in [
            ("raw", k.as_bytes().to_vec()),
            ("hex", format!("{}\n", *hex).into_bytes()),
            ("b64", b64.clone().into_bytes()),
        ] {
            let p = dir.path().join(name);
            fs::write(&p, &content).unwrap();
            chmod(&p, 0o600);
            assert_eq!(
                EncryptionKey::from_file(&p).unwrap().as_bytes(),
                k.as_bytes()
            );
            chmod(&p, 0o640);
            assert!(EncryptionKey::from_file(&p).is_ok());
            chmod(&p, 0o644);
            let msg = EncryptionKey::from_file(&p).unwrap_err().to_string();
            assert!(msg.contains("chmod 600") && msg.contains("0644"), "{msg}");
        }
        // Malformed keys: the message says what is accepted and never echoes the input.
        for text in [
            &hex[..63],
            "zz",
            "",
            &format!("{}00", *hex),
            &b64[..40],
            "not a key at all, but a passphrase",
        ] {
            let msg = EncryptionKey::parse(text, "TIDEMARK_ENCRYPTION_KEY")
                .unwrap_err()
                .to_string();
            assert!(msg.contains("64 hex digits"), "{msg}");
            assert!(msg.contains("TIDEMARK_ENCRYPTION_KEY"), "{msg}");
            if text.len() > 3 {
                assert!(!msg.contains(text), "{msg}");
            }
        }
        let missing = EncryptionKey::from_file(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("none"), "{missing}");
    }

    #[test]
    fn the_key_never_shows() {
        let k = EncryptionKey::generate();
        let shown = format!("{k:?} {:?}", stores(&k).1);
        assert!(!shown.contains(k.to_hex().as_str()), "{shown}");
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.as_bytes());
        assert!(!shown.contains(&b64), "{shown}");
        assert!(shown.contains(&k.key_id()), "{shown}");
        assert_eq!(k.key_id().len(), 16);
        assert_ne!(k.key_id(), EncryptionKey::generate().key_id());
        assert!(!k.to_hex().starts_with(&k.key_id()));
    }

    #[test]
    fn unsupported_chunk_sizes_are_refused() {
        let raw: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        for bad in [0, 1000, 2048, 4097, 32 << 20] {
            assert!(CryptStore::new(raw.clone(), &key(1), bad).is_err(), "{bad}");
        }
        CryptStore::new(raw, &key(1), DEFAULT_CHUNK_SIZE).unwrap();
    }
}

#[cfg(test)]
mod repository_tests {
    use super::*;
    use crate::model::RepositoryConfig;
    use crate::repo::{RepoError, Repository};
    use crate::store::MemoryStore;

    fn config(repo: &Repository) -> RepositoryConfig {
        RepositoryConfig {
            encryption: repo.encryption().cloned(),
            object_lock: None,
            ..crate::testing::config()
        }
    }

    #[tokio::test]
    async fn opening_checks_the_key_against_the_config() {
        let raw: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let (k, wrong) = (EncryptionKey::generate(), EncryptionKey::generate());
        let repo = Repository::open(raw.clone(), Some(&k)).await.unwrap();
        let created = repo.create_config(&config(&repo)).await.unwrap();
        let recorded = created.encryption.unwrap();
        assert_eq!(recorded.key_id, k.key_id());
        assert_eq!(recorded.algorithm, ALGORITHM);
        assert_eq!(recorded.chunk_size, DEFAULT_CHUNK_SIZE);
        // tidemark.json is readable without the key and never holds it.
        let text = String::from_utf8(raw.get(crate::keys::CONFIG).await.unwrap().to_vec()).unwrap();
        assert!(text.contains(&k.key_id()), "{text}");
        assert!(!text.contains(k.to_hex().as_str()), "{text}");

        Repository::open(raw.clone(), Some(&k)).await.unwrap();
        let err = Repository::open(raw.clone(), None).await.unwrap_err();
        assert!(matches!(err, RepoError::KeyRequired { .. }), "{err}");
        assert!(err.to_string().contains("--encryption-key-file"), "{err}");
        let err = Repository::open(raw.clone(), Some(&wrong))
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&k.key_id()) && msg.contains(&wrong.key_id()),
            "{msg}"
        );

        // A plain repository refuses a key.
        let plain: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::open(plain.clone(), None).await.unwrap();
        repo.create_config(&config(&repo)).await.unwrap();
        let err = Repository::open(plain, Some(&k)).await.unwrap_err();
        assert!(matches!(err, RepoError::NotEncrypted { .. }), "{err}");
    }
}
