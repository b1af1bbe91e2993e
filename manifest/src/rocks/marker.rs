//! Tidemark time markers: a LogData blob an application adds to its WriteBatches
//! (`WriteBatch::put_log_data`) so that the WAL records when the batch was written. RocksDB
//! stores the blob in the WAL, gives it no sequence number and never applies it; Tidemark uses
//! it to restore to a point in time.
//!
//! ```text
//! b"TDMK" | version (u8, = 1) | unix time in microseconds (i64, LE)     13 bytes
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first four bytes of every marker.
pub const MAGIC: [u8; 4] = *b"TDMK";
/// The marker format version written by [`encode`].
pub const VERSION: u8 = 1;
/// The length of a version-1 marker.
pub const LEN: usize = 13;

/// A decoded marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Marker {
    /// Microseconds since the Unix epoch (negative before it).
    pub unix_micros: i64,
}

impl Marker {
    pub fn from_system_time(t: SystemTime) -> Marker {
        let micros = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_micros())
                .map(|m| -m)
                .unwrap_or(i64::MIN),
        };
        Marker {
            unix_micros: micros,
        }
    }

    pub fn system_time(&self) -> SystemTime {
        let magnitude = Duration::from_micros(self.unix_micros.unsigned_abs());
        if self.unix_micros >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5..].copy_from_slice(&self.unix_micros.to_le_bytes());
        out
    }
}

/// A blob that starts with the marker magic but is not a valid marker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    #[error(
        "Tidemark time marker of unsupported version {version} (this build reads version {VERSION})"
    )]
    UnsupportedVersion { version: u8 },
    #[error("Tidemark time marker of {len} bytes; a version {VERSION} marker is {LEN} bytes")]
    WrongLength { len: usize },
}

/// The marker blob for a time (clamped to the range of i64 microseconds).
pub fn encode(t: SystemTime) -> [u8; LEN] {
    Marker::from_system_time(t).encode()
}

/// `None` if the blob is not a Tidemark marker (does not start with the magic); otherwise
/// the marker, or an error if it is malformed.
pub fn decode(blob: &[u8]) -> Option<Result<Marker, MarkerError>> {
    if !blob.starts_with(&MAGIC) {
        return None;
    }
    let Some(&version) = blob.get(4) else {
        return Some(Err(MarkerError::WrongLength { len: blob.len() }));
    };
    if version != VERSION {
        return Some(Err(MarkerError::UnsupportedVersion { version }));
    }
    if blob.len() != LEN {
        return Some(Err(MarkerError::WrongLength { len: blob.len() }));
    }
    let mut micros = [0u8; 8];
    micros.copy_from_slice(&blob[5..]);
    Some(Ok(Marker {
        unix_micros: i64::from_le_bytes(micros),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rocks::log::LogReader;
    use crate::rocks::write_batch::Batch;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let t = UNIX_EPOCH + Duration::from_micros(0x0102_0304_0506);
        let blob = encode(t);
        assert_eq!(blob, [b'T', b'D', b'M', b'K', 1, 6, 5, 4, 3, 2, 1, 0, 0]);
        let m = decode(&blob).unwrap().unwrap();
        assert_eq!(m.unix_micros, 0x0102_0304_0506);
        assert_eq!(m.system_time(), t);
    }

    #[test]
    fn foreign_and_malformed_blobs() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"hello world!!"), None);
        assert_eq!(decode(b"TDM"), None);
        assert_eq!(
            decode(b"TDMK"),
            Some(Err(MarkerError::WrongLength { len: 4 }))
        );
        let mut v2 = encode(SystemTime::now());
        v2[4] = 2;
        assert_eq!(
            decode(&v2),
            Some(Err(MarkerError::UnsupportedVersion { version: 2 }))
        );
        let mut long = encode(SystemTime::now()).to_vec();
        long.push(0);
        assert_eq!(
            decode(&long),
            Some(Err(MarkerError::WrongLength { len: 14 }))
        );
        // Before the epoch.
        let t = UNIX_EPOCH - Duration::from_secs(86_400);
        let m = decode(&encode(t)).unwrap().unwrap();
        assert_eq!(m.unix_micros, -86_400_000_000);
        assert_eq!(m.system_time(), t);
    }

    proptest! {
        #[test]
        fn round_trip(micros in any::<i64>()) {
            let m = Marker { unix_micros: micros };
            prop_assert_eq!(decode(&m.encode()), Some(Ok(m)));
            prop_assert_eq!(Marker::from_system_time(m.system_time()), m);
        }
    }

    #[test]
    fn marker_in_a_real_rocksdb_wal() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir.path()).unwrap();
        let when = UNIX_EPOCH + Duration::from_micros(1_753_000_000_123_456);
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_log_data(encode(when));
        wb.put(b"a", b"1");
        wb.put(b"b", b"2");
        db.write(wb).unwrap();
        let mut wb = rocksdb::WriteBatch::default();
        wb.put_log_data(b"not a marker");
        wb.put(b"c", b"3");
        db.write(wb).unwrap();

        let mut markers = Vec::new();
        let mut foreign = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                for record in LogReader::open(&path).unwrap() {
                    let record = record.unwrap();
                    let batch = Batch::parse(&record.bytes).unwrap();
                    for blob in batch.log_data_blobs().unwrap() {
                        match decode(blob) {
                            Some(m) => markers.push((batch.header().sequence, m.unwrap())),
                            None => foreign += 1,
                        }
                    }
                }
            }
        }
        assert_eq!(foreign, 1);
        assert_eq!(markers.len(), 1);
        let (seq, marker) = markers[0];
        assert_eq!(seq, 1, "the marker batch is the first batch");
        assert_eq!(marker.system_time(), when);
        assert_eq!(
            db.latest_sequence_number(),
            3,
            "log data takes no sequence number"
        );
    }
}
