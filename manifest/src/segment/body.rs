//! The writing side of a segment's body (FORMAT.md §6.2): the record stream, stored as is or
//! cut into pieces of [`ZSTD_FRAME_RAW`] bytes, each compressed as a zstd frame of its own.
//!
//! Independent frames are what lets a writer compress in parallel, and a small frame is
//! handed to zstd whole, as one buffer: at level 3 on the benchmark's WAL, 256 KiB frames
//! compress about 2.5 times as fast as a streaming encoder fed record by record, and 1.5
//! times as fast as 1 MiB frames (whose match tables no longer fit the CPU's cache), for
//! 0.2 % more bytes. Frames are compressed [`FRAMES_PER_JOB`] at a time; in parallel, jobs
//! run on rayon's global pool (one thread per core, shared by every segment of the process)
//! while records keep arriving, and their frames are appended in the stream's order whatever
//! order they end in. (On tokio's blocking pool instead, jobs spread over a dozen threads
//! whose allocator arenas each kept several MiB: the archiver's peak RSS grew by 50 MiB.)

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::mpsc;

/// Bytes of the raw record stream per zstd frame (the last frame of a segment may be
/// shorter). A frame's end has nothing to do with the records': one may straddle two.
pub const ZSTD_FRAME_RAW: usize = 256 << 10;

/// Frames compressed by one job (on one thread, one after the other).
const FRAMES_PER_JOB: usize = 4;

/// Jobs running on other threads and not yet appended, at most: bounds the memory held by
/// the stream in flight to a few MiB, and keeps the threads busy on two cores.
const JOBS_IN_FLIGHT: usize = 4;

/// Where a segment's body is written.
pub(super) enum BodyWriter {
    Plain(Vec<u8>),
    Zstd(ZstdFrames),
}

impl BodyWriter {
    /// Room for `raw_len` bytes of stream, set aside at once: a buffer that grows by
    /// doubling copies itself and leaves holes in the allocator's heap.
    pub(super) fn reserve(&mut self, raw_len: usize) {
        match self {
            BodyWriter::Plain(v) => v.reserve(raw_len),
            BodyWriter::Zstd(z) => z.reserve(raw_len),
        }
    }

    /// The buffer the object is built in.
    pub(super) fn object(&mut self) -> &mut Vec<u8> {
        match self {
            BodyWriter::Plain(v) => v,
            BodyWriter::Zstd(z) => &mut z.out,
        }
    }

    /// The stream written so far, for a record's frame to be appended to.
    pub(super) fn raw(&mut self) -> &mut Vec<u8> {
        match self {
            BodyWriter::Plain(v) => v,
            BodyWriter::Zstd(z) => &mut z.piece,
        }
    }

    /// Called after each record: compresses the piece once it is large enough.
    pub(super) fn record_written(&mut self) -> io::Result<()> {
        match self {
            BodyWriter::Plain(_) => Ok(()),
            BodyWriter::Zstd(z) => z.piece_written(),
        }
    }

    /// The whole object so far (the room left for the header, then the body).
    pub(super) fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            BodyWriter::Plain(v) => Ok(v),
            BodyWriter::Zstd(z) => z.finish(),
        }
    }
}

/// A body compressed as a sequence of zstd frames.
pub(super) struct ZstdFrames {
    level: i32,
    /// The object: room for the header, then every frame appended so far.
    out: Vec<u8>,
    /// Raw stream not compressed yet.
    piece: Vec<u8>,
    /// Jobs running elsewhere, oldest first.
    in_flight: VecDeque<mpsc::Receiver<io::Result<Job>>>,
    /// Buffers of ended jobs, for the next ones: a segment's jobs take a few buffers from
    /// the allocator, not two per MiB of stream.
    spare: Vec<Vec<u8>>,
    parallel: bool,
}

/// Whole frames of raw stream, and the room their compressed frames go to.
struct Job {
    raw: Vec<u8>,
    frames: Vec<u8>,
}

impl ZstdFrames {
    /// Frames compressed at `level` after `out` (the header's room). Checks the level now,
    /// so a bad one fails before any record is taken.
    pub(super) fn new(out: Vec<u8>, level: i32) -> io::Result<ZstdFrames> {
        check_level(level)?;
        with_compressor(level, |_| Ok(()))?;
        Ok(ZstdFrames {
            level,
            out,
            piece: Vec::new(),
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            parallel: false,
        })
    }

    /// Frames compressed from now on (those of the stream not handed to a job yet) are at
    /// `level`. Checks the level first.
    pub(super) fn set_level(&mut self, level: i32) -> io::Result<()> {
        if level != self.level {
            check_level(level)?;
            with_compressor(level, |_| Ok(()))?;
            self.level = level;
        }
        Ok(())
    }

    /// Compresses full pieces on rayon's pool.
    pub(super) fn in_parallel(&mut self) {
        self.parallel = true;
    }

    /// Room for the frames of `raw_len` bytes of stream.
    pub(super) fn reserve(&mut self, raw_len: usize) {
        self.out.reserve(frames_bound(raw_len));
    }

    /// Once a job's worth of frames is written, hands the whole frames to a job; the rest
    /// (part of a frame) stays for the next one.
    fn piece_written(&mut self) -> io::Result<()> {
        const JOB_RAW: usize = ZSTD_FRAME_RAW * FRAMES_PER_JOB;
        if self.piece.len() < JOB_RAW {
            return Ok(());
        }
        let whole = self.piece.len() / ZSTD_FRAME_RAW * ZSTD_FRAME_RAW;
        let mut next = self.buffer(JOB_RAW + ZSTD_FRAME_RAW);
        next.extend_from_slice(&self.piece[whole..]);
        self.piece.truncate(whole);
        let job = Job {
            raw: std::mem::replace(&mut self.piece, next),
            frames: self.buffer(frames_bound(whole)),
        };
        self.compress(job)
    }

    /// Compresses a job: here, or on rayon's pool when parallel (its frames are appended in
    /// order as the jobs end).
    fn compress(&mut self, job: Job) -> io::Result<()> {
        if !self.parallel {
            return self.append(compress_frames(self.level, job));
        }
        // Room for this job first: at most JOBS_IN_FLIGHT run at once.
        self.append_done(JOBS_IN_FLIGHT - 1)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let level = self.level;
        rayon::spawn(move || {
            // A panic in zstd's bindings would abort the process on rayon's thread: it
            // becomes this segment's error instead.
            let compressed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compress_frames(level, job)
            }))
            .unwrap_or_else(|_| {
                forget_compressor();
                Err(stopped())
            });
            // The receiver is gone only when the segment was dropped unfinished.
            let _ = tx.send(compressed);
        });
        self.in_flight.push_back(rx);
        self.append_done(JOBS_IN_FLIGHT)
    }

    /// An empty buffer with room for `len` bytes: a spare one if there is one.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.reserve(len);
        b
    }

    /// Appends the frames of the jobs that ended, in order; waits for the oldest while more
    /// than `most` run.
    fn append_done(&mut self, most: usize) -> io::Result<()> {
        while let Some(rx) = self.in_flight.front() {
            let job = if self.in_flight.len() > most {
                rx.recv().map_err(|_| stopped())?
            } else {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Err(stopped()),
                }
            };
            self.in_flight.pop_front();
            self.append(job)?;
        }
        Ok(())
    }

    fn append(&mut self, job: io::Result<Job>) -> io::Result<()> {
        let job = job?;
        self.out.extend_from_slice(&job.frames);
        self.spare.extend([job.raw, job.frames]);
        Ok(())
    }

    fn finish(mut self) -> io::Result<Vec<u8>> {
        // The last piece goes to the pool too: the thread finishing a segment need not be
        // one that keeps a compression context (a blocking thread of the archiver's).
        if !self.piece.is_empty() {
            let job = Job {
                frames: self.buffer(frames_bound(self.piece.len())),
                raw: std::mem::take(&mut self.piece),
            };
            self.compress(job)?;
        }
        while let Some(rx) = self.in_flight.pop_front() {
            self.append(rx.recv().map_err(|_| stopped())?)?;
        }
        Ok(self.out)
    }
}

/// The zstd levels segments may be compressed at, but 0 ([`check_zstd_level`]). zstd itself
/// would take any number, and use the nearest of these.
pub fn zstd_levels() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

/// Refuses a level zstd would not use as given: one outside [`zstd_levels`], or 0 (which
/// zstd reads as its default, 3). The message says what to give instead.
pub fn check_zstd_level(level: i32) -> Result<(), String> {
    let levels = zstd_levels();
    if level == 0 {
        return Err(
            "is zstd's default level, 3, in disguise: give 3 (or the level you mean)".into(),
        );
    }
    if !levels.contains(&level) {
        return Err(format!(
            "is not a zstd level: give {} to {} (higher compresses smaller and slower; \
             negative levels are the fastest)",
            levels.start(),
            levels.end()
        ));
    }
    Ok(())
}

fn check_level(level: i32) -> io::Result<()> {
    check_zstd_level(level).map_err(|problem| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("zstd level {level} {problem}"),
        )
    })
}

fn stopped() -> io::Error {
    io::Error::other("a compression thread failed before returning its frames")
}

/// Drops this thread's compression context (after a panic left it in an unknown state).
fn forget_compressor() {
    COMPRESSOR.with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            slot.take();
        }
    });
}

thread_local! {
    /// One compression context per thread, kept from frame to frame: setting one up costs
    /// more than compressing a small frame. A change of level keeps the context (and its
    /// memory), with the new level's parameters.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> io::Result<T>,
) -> io::Result<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut() {
            Some((l, _)) if *l == level => {}
            Some((l, c)) => {
                c.set_compression_level(level)?;
                *l = level;
            }
            None => {
                let mut c = zstd::bulk::Compressor::new(level)?;
                c.include_checksum(true)?;
                *slot = Some((level, c));
            }
        }
        let (_, c) = slot.as_mut().expect("set above");
        f(c)
    })
}

/// The most bytes `raw_len` bytes of stream take as frames.
fn frames_bound(raw_len: usize) -> usize {
    raw_len.div_ceil(ZSTD_FRAME_RAW) * zstd::zstd_safe::compress_bound(ZSTD_FRAME_RAW)
}

/// The job's raw stream cut into frames of [`ZSTD_FRAME_RAW`] bytes, each compressed with
/// its content checksum, appended to its `frames`.
fn compress_frames(level: i32, job: Job) -> io::Result<Job> {
    let Job { raw, frames } = job;
    with_compressor(level, |c| {
        // Each frame goes after the last, into the room set aside (never zeroed first).
        let mut out = io::Cursor::new(frames);
        for frame in raw.chunks(ZSTD_FRAME_RAW) {
            out.get_mut()
                .reserve(zstd::zstd_safe::compress_bound(frame.len()));
            let n = c.compress_to_buffer(frame, &mut out)?;
            out.set_position(out.position() + n as u64);
        }
        Ok(Job {
            raw,
            frames: out.into_inner(),
        })
    })
}
