//! sha256 of every object: one helper for bytes, one for readers and files, and one
//! comparison that names the object on a mismatch.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// An object whose content does not match what the repository recorded for it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{key}: checksum mismatch: expected sha256 {expected} ({expected_size} bytes), \
     found {found} ({found_size} bytes); the object is corrupt or was replaced"
)]
pub struct ChecksumMismatch {
    pub key: String,
    pub expected: String,
    pub expected_size: u64,
    pub found: String,
    pub found_size: u64,
}

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A sha256 computed piece by piece, as bytes go by (a download hashes what it writes),
/// with the number of bytes it saw.
#[derive(Debug, Clone, Default)]
pub struct Hasher {
    sha256: Sha256,
    len: u64,
}

impl Hasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Hasher {
        Hasher::default()
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// How many bytes it has seen.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has seen no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hex sha256 and the length of everything it saw.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.sha256.finalize()), self.len)
    }
}

/// Hex sha256 and length of everything a reader yields, read in 1 MiB pieces.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

/// Hex sha256 and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    sha256_reader(std::fs::File::open(path)?)
}

/// Checks a computed digest and size against the recorded ones.
pub fn check(
    key: &str,
    expected_sha256: &str,
    expected_size: u64,
    found_sha256: &str,
    found_size: u64,
) -> Result<(), ChecksumMismatch> {
    if expected_sha256 == found_sha256 && expected_size == found_size {
        Ok(())
    } else {
        Err(ChecksumMismatch {
            key: key.to_owned(),
            expected: expected_sha256.to_owned(),
            expected_size,
            found: found_sha256.to_owned(),
            found_size,
        })
    }
}

/// Checks bytes against the recorded digest and size.
pub fn check_bytes(
    key: &str,
    expected_sha256: &str,
    expected_size: u64,
    bytes: &[u8],
) -> Result<(), ChecksumMismatch> {
    check(
        key,
        expected_sha256,
        expected_size,
        &sha256_hex(bytes),
        bytes.len() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_mismatch_message() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (d, n) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!((d.as_str(), n), (sha256_hex(b"abc").as_str(), 3));
        let err = check_bytes("sst/x", &sha256_hex(b"abc"), 3, b"abd").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sst/x") && msg.contains("checksum mismatch"),
            "{msg}"
        );
        check_bytes("k", &sha256_hex(b"abc"), 3, b"abc").unwrap();
        assert!(check_bytes("k", &sha256_hex(b"abc"), 4, b"abc").is_err());
    }

    #[test]
    fn a_hasher_fed_in_pieces_gives_the_digest_of_the_whole() {
        let data: Vec<u8> = (0..=255u8).cycle().take(200_003).collect();
        for piece in [1, 7, 4096, 65_536, 200_003] {
            let mut h = Hasher::new();
            for chunk in data.chunks(piece) {
                h.update(chunk);
            }
            assert_eq!(h.len(), data.len() as u64);
            assert_eq!(
                h.finish(),
                (sha256_hex(&data), data.len() as u64),
                "{piece}"
            );
        }
        let empty = Hasher::new();
        assert!(empty.is_empty());
        assert_eq!(empty.finish(), (sha256_hex(b""), 0));
    }
}
