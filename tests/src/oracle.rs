//! The oracle: a log of every batch the generator wrote, replayable up to any sequence
//! number at a batch boundary to give the state the database had then.
//!
//! `oracle.log` format (all integers little-endian):
//! - header: `b"TDMKORC1"`, `u32` column family count, then each name as `u16` length + bytes
//!   (the order of [`COLUMN_FAMILIES`]; ops name a column family by its index);
//! - records: `u32` payload length, `u32` CRC-32C of the payload, payload:
//!   `u64` batch index, `u64` first sequence number, `i64` wall time (unix micros),
//!   `u8` flags (bit 0: the batch carries a time marker), `u32` op count, then each op as
//!   `u8` kind (1 put, 2 delete, 3 single delete, 4 merge, 5 delete range), `u8` column
//!   family index, then varint-length-prefixed key (or range start) and, for put, merge and
//!   delete range, a varint-length-prefixed value (operand, range end).
//!
//! Batch `i` takes sequence numbers `first_seq ..= first_seq + op_count - 1` (log data takes
//! none). Records are appended after the batch is in the database and flushed batch by
//! batch; an incomplete last record (a writer killed mid-append, or still writing) is
//! ignored by readers.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::state::{COLUMN_FAMILIES, Op, State};

/// File name of the batch log in the output directory.
pub const ORACLE_LOG: &str = "oracle.log";
/// File name of the (wall time, sequence) log: one JSON [`TimePoint`] per marker batch.
pub const TIMES_LOG: &str = "times.jsonl";
/// File name of the final run summary.
pub const SUMMARY_FILE: &str = "summary.json";

const MAGIC: &[u8; 8] = b"TDMKORC1";
const FLAG_MARKER: u8 = 1;
const FRAME: usize = 8;
/// Fixed part of a record payload: index, first seq, micros, flags, op count.
const FIXED: usize = 8 + 8 + 8 + 1 + 4;

/// One batch as logged: where it sits in the sequence and what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRecord {
    /// 0-based position in the run.
    pub index: u64,
    /// Sequence number of the first op.
    pub first_seq: u64,
    /// Wall time the batch was written (unix micros, non-decreasing over a run); for a batch
    /// with a marker, the time in the marker.
    pub unix_micros: i64,
    /// Whether the batch begins with a `put_log_data` time marker.
    pub marker: bool,
    pub ops: Vec<Op>,
}

impl BatchRecord {
    /// Sequence number of the last op (every batch has at least one op).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.ops.len() as u64 - 1
    }
}

/// A line of `times.jsonl`: at `unix_micros` the generator wrote the batch `batch`, which
/// starts with a time marker carrying `unix_micros` and takes sequence numbers
/// `first_seq ..= last_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimePoint {
    pub batch: u64,
    pub unix_micros: i64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Reads every line of a `times.jsonl` file (a torn last line is ignored).
pub fn read_times(out_dir: &Path) -> Result<Vec<TimePoint>> {
    let path = out_dir.join(TIMES_LOG);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        points.push(
            serde_json::from_str(line.trim_end())
                .with_context(|| format!("parsing {}", path.display()))?,
        );
    }
    Ok(points)
}

// ---------------------------------------------------------------------------------------
// Encoding

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends the payload of `batch` to `out`.
pub fn encode_batch(batch: &BatchRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&batch.index.to_le_bytes());
    out.extend_from_slice(&batch.first_seq.to_le_bytes());
    out.extend_from_slice(&batch.unix_micros.to_le_bytes());
    out.push(if batch.marker { FLAG_MARKER } else { 0 });
    out.extend_from_slice(&(batch.ops.len() as u32).to_le_bytes());
    for op in &batch.ops {
        let (tag, first, second): (u8, &[u8], Option<&[u8]>) = match op {
            Op::Put { key, value, .. } => (1, key, Some(value)),
            Op::Delete { key, .. } => (2, key, None),
            Op::SingleDelete { key, .. } => (3, key, None),
            Op::Merge { key, operand, .. } => (4, key, Some(operand)),
            Op::DeleteRange { start, end, .. } => (5, start, Some(end)),
        };
        out.push(tag);
        out.push(op.cf() as u8);
        put_bytes(out, first);
        if let Some(second) = second {
            put_bytes(out, second);
        }
    }
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.data.len() >= n, "record truncated");
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint too long")
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = usize::try_from(self.varint()?)?;
        Ok(self.take(len)?.to_vec())
    }
}

/// Decodes the fixed part of a payload: (index, first seq, micros, marker, op count).
fn decode_fixed(payload: &[u8]) -> Result<(u64, u64, i64, bool, u32)> {
    let mut c = Cursor { data: payload };
    let index = c.u64()?;
    let first_seq = c.u64()?;
    let micros = c.u64()? as i64;
    let flags = c.u8()?;
    let count = c.u32()?;
    Ok((index, first_seq, micros, flags & FLAG_MARKER != 0, count))
}

/// Decodes a payload written by [`encode_batch`].
pub fn decode_batch(payload: &[u8]) -> Result<BatchRecord> {
    let (index, first_seq, unix_micros, marker, count) = decode_fixed(payload)?;
    let mut c = Cursor {
        data: &payload[FIXED..],
    };
    let mut ops = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let tag = c.u8()?;
        let cf = usize::from(c.u8()?);
        ensure!(
            cf < COLUMN_FAMILIES.len(),
            "column family index {cf} out of range"
        );
        let key = c.bytes()?;
        ops.push(match tag {
            1 => Op::Put {
                cf,
                key,
                value: c.bytes()?,
            },
            2 => Op::Delete { cf, key },
            3 => Op::SingleDelete { cf, key },
            4 => Op::Merge {
                cf,
                key,
                operand: c.bytes()?,
            },
            5 => Op::DeleteRange {
                cf,
                start: key,
                end: c.bytes()?,
            },
            other => bail!("unknown op kind {other}"),
        });
    }
    ensure!(
        c.data.is_empty(),
        "{} trailing bytes in record",
        c.data.len()
    );
    Ok(BatchRecord {
        index,
        first_seq,
        unix_micros,
        marker,
        ops,
    })
}

// ---------------------------------------------------------------------------------------
// Writing

/// Appends batch records to `oracle.log`.
#[derive(Debug)]
pub struct OracleWriter {
    file: BufWriter<File>,
    buf: Vec<u8>,
}

impl OracleWriter {
    /// Creates `dir/oracle.log`; fails if it exists.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(ORACLE_LOG);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut file = BufWriter::with_capacity(256 * 1024, file);
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&(COLUMN_FAMILIES.len() as u32).to_le_bytes());
        for name in COLUMN_FAMILIES {
            header.extend_from_slice(&(name.len() as u16).to_le_bytes());
            header.extend_from_slice(name.as_bytes());
        }
        file.write_all(&header)?;
        file.flush()?;
        Ok(Self {
            file,
            buf: Vec::new(),
        })
    }

    /// Appends one record (buffered; see [`OracleWriter::flush`]).
    pub fn append(&mut self, batch: &BatchRecord) -> Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; FRAME]);
        encode_batch(batch, &mut self.buf);
        let payload_len =
            u32::try_from(self.buf.len() - FRAME).context("batch record over 4 GiB")?;
        let crc = crc32c::crc32c(&self.buf[FRAME..]);
        self.buf[..4].copy_from_slice(&payload_len.to_le_bytes());
        self.buf[4..FRAME].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all(&self.buf)?;
        Ok(())
    }

    /// Hands buffered records to the operating system.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush()?;
        Ok(())
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Reading

/// Sequential reader of records; stops quietly at an incomplete last record.
struct LogReader {
    file: BufReader<File>,
    path: PathBuf,
    offset: u64,
    payload: Vec<u8>,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on end of file before that.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl LogReader {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut file = BufReader::with_capacity(256 * 1024, file);
        let mut magic = [0u8; 8];
        ensure!(
            read_full(&mut file, &mut magic)? && &magic == MAGIC,
            "{} is not an oracle log",
            path.display()
        );
        let mut n = [0u8; 4];
        ensure!(
            read_full(&mut file, &mut n)?,
            "{}: truncated header",
            path.display()
        );
        let mut names = Vec::new();
        for _ in 0..u32::from_le_bytes(n) {
            let mut len = [0u8; 2];
            ensure!(
                read_full(&mut file, &mut len)?,
                "{}: truncated header",
                path.display()
            );
            let mut name = vec![0u8; usize::from(u16::from_le_bytes(len))];
            ensure!(
                read_full(&mut file, &mut name)?,
                "{}: truncated header",
                path.display()
            );
            names.push(String::from_utf8(name)?);
        }
        ensure!(
            names == COLUMN_FAMILIES,
            "{}: column families {names:?}, expected {COLUMN_FAMILIES:?}",
            path.display()
        );
        let offset = file.stream_position()?;
        Ok(Self {
            file,
            path: path.to_owned(),
            offset,
            payload: Vec::new(),
        })
    }

    /// Reads the next complete record into `self.payload`; returns its file offset, or
    /// `None` at the end (including an incomplete last record).
    fn next_payload(&mut self) -> Result<Option<u64>> {
        let mut frame = [0u8; FRAME];
        if !read_full(&mut self.file, &mut frame)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes(frame[..4].try_into()?) as usize;
        let crc = u32::from_le_bytes(frame[4..].try_into()?);
        self.payload.resize(len, 0);
        if !read_full(&mut self.file, &mut self.payload)? {
            return Ok(None);
        }
        ensure!(
            crc32c::crc32c(&self.payload) == crc && len >= FIXED,
            "{}: corrupt record at offset {}",
            self.path.display(),
            self.offset
        );
        let at = self.offset;
        self.offset += (FRAME + len) as u64;
        Ok(Some(at))
    }

    fn next_batch(&mut self) -> Result<Option<BatchRecord>> {
        match self.next_payload()? {
            None => Ok(None),
            Some(at) => decode_batch(&self.payload)
                .with_context(|| format!("{}: record at offset {at}", self.path.display()))
                .map(Some),
        }
    }
}

/// Where one logged batch sits, without its ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    pub index: u64,
    pub first_seq: u64,
    /// Number of ops, hence of sequence numbers.
    pub count: u32,
    pub unix_micros: i64,
    pub marker: bool,
    offset: u64,
}

impl BatchInfo {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count) - 1
    }
}

/// An opened oracle log: an index of its batches, from which states are replayed.
#[derive(Debug)]
pub struct Oracle {
    path: PathBuf,
    batches: Vec<BatchInfo>,
}

impl Oracle {
    /// Reads the index of `out_dir/oracle.log` (batches complete at the time of the call)
    /// and checks that batches are numbered in order with contiguous sequence numbers.
    pub fn open(out_dir: &Path) -> Result<Self> {
        let path = out_dir.join(ORACLE_LOG);
        let mut reader = LogReader::open(&path)?;
        let mut batches: Vec<BatchInfo> = Vec::new();
        while let Some(offset) = reader.next_payload()? {
            let (index, first_seq, unix_micros, marker, count) = decode_fixed(&reader.payload)?;
            ensure!(count > 0, "{}: empty batch {index}", path.display());
            let (expected_index, expected_seq) = batches
                .last()
                .map_or((0, 1), |b| (b.index + 1, b.last_seq() + 1));
            ensure!(
                index == expected_index && first_seq == expected_seq,
                "{}: batch {index} starts at seq {first_seq}, expected batch {expected_index} at seq {expected_seq}",
                path.display()
            );
            batches.push(BatchInfo {
                index,
                first_seq,
                count,
                unix_micros,
                marker,
                offset,
            });
        }
        Ok(Self { path, batches })
    }

    /// Every logged batch, in order.
    pub fn batches(&self) -> &[BatchInfo] {
        &self.batches
    }

    /// Sequence number after the last logged batch (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.batches.last().map_or(0, BatchInfo::last_seq)
    }

    /// Whether `seq` is a state the database went through: 0 or the last seq of a batch.
    pub fn is_boundary(&self, seq: u64) -> bool {
        seq == 0 || self.batch_ending_at(seq).is_ok()
    }

    /// Index (into [`Oracle::batches`]) of the batch whose last sequence number is `seq`.
    fn batch_ending_at(&self, seq: u64) -> Result<usize> {
        let i = self.batches.partition_point(|b| b.last_seq() < seq);
        match self.batches.get(i) {
            Some(b) if b.last_seq() == seq => Ok(i),
            Some(b) if b.first_seq <= seq => {
                bail!(
                    "seq {seq} is inside batch {} (seqs {}..={})",
                    b.index,
                    b.first_seq,
                    b.last_seq()
                )
            }
            _ => bail!(
                "seq {seq} is beyond the oracle log (last seq {})",
                self.last_seq()
            ),
        }
    }

    /// The last sequence number whose batch was written at or before `unix_micros`
    /// (0 if none): the expected cutoff of a restore to that time, by wall time.
    pub fn seq_at_time(&self, unix_micros: i64) -> u64 {
        let i = self
            .batches
            .partition_point(|b| b.unix_micros <= unix_micros);
        if i == 0 {
            0
        } else {
            self.batches[i - 1].last_seq()
        }
    }

    /// Reads one batch with its ops.
    pub fn read_batch(&self, position: usize) -> Result<BatchRecord> {
        let info = self.batches.get(position).context("no such batch")?;
        let mut reader = LogReader::open(&self.path)?;
        reader.file.seek(SeekFrom::Start(info.offset))?;
        reader.offset = info.offset;
        reader
            .next_batch()?
            .context("batch vanished from the oracle log")
    }

    /// A replay from the empty state, to be advanced through increasing sequence numbers.
    pub fn replay(&self) -> Result<Replay<'_>> {
        Ok(Replay {
            oracle: self,
            reader: LogReader::open(&self.path)?,
            state: State::empty_generator(),
            applied: 0,
        })
    }

    /// The state after the batch ending at `seq` (0: the empty state). Errors if `seq` is
    /// inside a batch or beyond the log.
    pub fn state_at(&self, seq: u64) -> Result<State> {
        let mut replay = self.replay()?;
        replay.advance_to(seq)?;
        Ok(replay.into_state())
    }

    /// [`State::digest`] of [`Oracle::state_at`].
    pub fn digest_at(&self, seq: u64) -> Result<String> {
        Ok(self.state_at(seq)?.digest())
    }
}

/// An in-memory replay of the oracle log, moving forward only.
#[derive(Debug)]
pub struct Replay<'a> {
    oracle: &'a Oracle,
    reader: LogReader,
    state: State,
    /// Batches applied so far.
    applied: usize,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("path", &self.path)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Replay<'_> {
    /// Sequence number of the current state.
    pub fn seq(&self) -> u64 {
        match self.applied {
            0 => 0,
            n => self.oracle.batches[n - 1].last_seq(),
        }
    }

    /// Applies batches up to and including the one ending at `seq`; returns the state there.
    pub fn advance_to(&mut self, seq: u64) -> Result<&State> {
        ensure!(
            seq >= self.seq(),
            "replay is at seq {}, cannot go back to {seq}",
            self.seq()
        );
        let target = if seq == 0 {
            0
        } else {
            self.oracle.batch_ending_at(seq)? + 1
        };
        while self.applied < target {
            let batch = self
                .reader
                .next_batch()?
                .context("oracle log shrank during replay")?;
            let info = &self.oracle.batches[self.applied];
            ensure!(
                batch.index == info.index && batch.first_seq == info.first_seq,
                "oracle log changed during replay"
            );
            for op in &batch.ops {
                self.state.apply(op);
            }
            self.applied += 1;
        }
        Ok(&self.state)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn into_state(self) -> State {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::encode_counter;

    fn sample(index: u64, first_seq: u64) -> BatchRecord {
        BatchRecord {
            index,
            first_seq,
            unix_micros: 1_700_000_000_000_000 + index as i64,
            marker: index.is_multiple_of(2),
            ops: vec![
                Op::Put {
                    cf: 1,
                    key: format!("k{index}").into_bytes(),
                    value: vec![7; 300],
                },
                Op::Merge {
                    cf: 2,
                    key: b"c".to_vec(),
                    operand: encode_counter(index + 1),
                },
                Op::DeleteRange {
                    cf: 0,
                    start: b"a".to_vec(),
                    end: b"b".to_vec(),
                },
                Op::Delete {
                    cf: 3,
                    key: b"x".to_vec(),
                },
                Op::SingleDelete {
                    cf: 3,
                    key: b"y".to_vec(),
                },
            ],
        }
    }

    #[test]
    fn records_round_trip() {
        let batch = sample(3, 41);
        let mut buf = Vec::new();
        encode_batch(&batch, &mut buf);
        assert_eq!(decode_batch(&buf).unwrap(), batch);
        assert!(decode_batch(&buf[..buf.len() - 1]).is_err());
    }

    #[test]
    fn replay_stops_at_boundaries_and_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = OracleWriter::create(dir.path()).unwrap();
        let mut seq = 1;
        for i in 0..4 {
            let batch = sample(i, seq);
            seq = batch.last_seq() + 1;
            writer.append(&batch).unwrap();
        }
        writer.sync().unwrap();
        assert!(
            OracleWriter::create(dir.path()).is_err(),
            "must not overwrite a log"
        );

        let oracle = Oracle::open(dir.path()).unwrap();
        assert_eq!(oracle.batches().len(), 4);
        assert_eq!(oracle.last_seq(), 20);
        assert!(oracle.is_boundary(0) && oracle.is_boundary(5) && !oracle.is_boundary(6));
        assert!(
            oracle
                .state_at(7)
                .unwrap_err()
                .to_string()
                .contains("inside batch 1")
        );
        assert!(
            oracle
                .state_at(21)
                .unwrap_err()
                .to_string()
                .contains("beyond")
        );
        assert_eq!(oracle.state_at(0).unwrap(), State::empty_generator());

        let s10 = oracle.state_at(10).unwrap();
        let counter = &s10.cf("counters").unwrap()[b"c".as_slice()];
        assert_eq!(crate::state::decode_counter(counter), 3);
        assert_eq!(s10.cf("users").unwrap().len(), 2);
        assert_eq!(oracle.read_batch(2).unwrap(), sample(2, 11));
        assert_eq!(oracle.seq_at_time(1_700_000_000_000_001), 10);
        assert_eq!(oracle.seq_at_time(0), 0);

        let mut replay = oracle.replay().unwrap();
        assert_eq!(replay.advance_to(10).unwrap(), &s10);
        assert!(replay.advance_to(5).is_err());

        // Cut the last record short: it disappears, the rest stays readable.
        let path = dir.path().join(ORACLE_LOG);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let oracle = Oracle::open(dir.path()).unwrap();
        assert_eq!(oracle.last_seq(), 15);
        assert_eq!(oracle.state_at(10).unwrap(), s10);

        // A flipped byte inside a complete record is an error, not a silent stop.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(
            Oracle::open(dir.path())
                .unwrap_err()
                .to_string()
                .contains("corrupt")
        );
    }
}
