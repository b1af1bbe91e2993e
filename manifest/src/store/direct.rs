//! Writes that bypass the page cache (`O_DIRECT`), for the large objects a local store writes
//! once and nobody reads back soon: WAL segments and base files. Through the cache, each byte
//! is first copied into a page of the host's cache, which costs CPU per byte and pushes the
//! database's own pages out of a cache the archiver shares with it.
//!
//! Direct I/O wants the buffer, the file offset and the length aligned to the device's block:
//! the data goes through an aligned buffer, whole blocks directly, and the last partial block
//! through the cache. A file system that refuses direct I/O (tmpfs, some network and FUSE
//! file systems) gets the same bytes through the cache: the result on disk is the same either
//! way, and the caller fsyncs it as before.

use std::borrow::BorrowMut;
use std::fs::File;
use std::io::{self, Read, Seek, Write};

use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};

use super::{CACHED_WRITE, StoreError};
use crate::checksum::Hasher;

/// Objects at least this large are written around the cache.
pub(crate) const MIN_LEN: u64 = 1 << 20;

/// The alignment direct I/O needs: a multiple of every common logical block size.
const BLOCK: usize = 4096;

/// Bytes written per direct write.
const CHUNK: usize = 1 << 20;

/// Copies `src` to the end of `dst` (a file opened for writing, at offset 0), whole blocks
/// around the page cache where the file system allows it; `seen` is shown every piece read,
/// before it is written. Returns the bytes copied.
pub(crate) fn copy_uncached(
    src: &mut impl Read,
    dst: &mut File,
    on_read: impl Fn(io::Error) -> StoreError,
    on_write: impl Fn(io::Error) -> StoreError,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64, StoreError> {
    let mut out = Writer::new(dst, true);
    loop {
        let space = out.space();
        let n = fill(src, space).map_err(&on_read)?;
        seen(&space[..n]);
        out.filled(n);
        if out.is_full() {
            out.write_full().map_err(&on_write)?;
        } else {
            break;
        }
    }
    let total = out.len();
    out.finish().map_err(&on_write)?;
    Ok(total)
}

/// A file written from pieces of any size: they are gathered in an aligned buffer and
/// written a chunk at a time; when asked, whole blocks around the page cache and the last
/// partial block through it ([`Writer::finish`]). The writes are blocking: an async caller gathers on its
/// task and writes each full chunk off the runtime.
#[derive(Debug)]
pub(crate) struct Writer<F: BorrowMut<File>> {
    file: F,
    storage: Vec<u8>,
    /// Where the aligned chunk starts in `storage`.
    start: usize,
    /// Bytes of the chunk filled.
    filled: usize,
    /// Whether writes still go around the cache.
    direct: bool,
    /// Bytes given so far.
    len: u64,
}

impl<F: BorrowMut<File>> Writer<F> {
    /// Starts writing `file` (opened for writing, at offset 0), around the cache if
    /// `uncached` (and the file system allows it), through it if not.
    pub(crate) fn new(file: F, uncached: bool) -> Writer<F> {
        let storage = vec![0u8; CHUNK + BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        let direct = uncached && set_direct(file.borrow(), true);
        Writer {
            file,
            storage,
            start,
            filled: 0,
            direct,
            len: 0,
        }
    }

    /// The unfilled rest of the chunk, for a reader to fill; say how much with
    /// [`Writer::filled`].
    pub(crate) fn space(&mut self) -> &mut [u8] {
        &mut self.storage[self.start + self.filled..self.start + CHUNK]
    }

    /// Counts `n` more bytes of [`Writer::space`] as filled.
    pub(crate) fn filled(&mut self, n: usize) {
        debug_assert!(self.filled + n <= CHUNK);
        self.filled += n;
        self.len += n as u64;
    }

    /// Copies as much of `data` as the chunk has room for; returns how much that was.
    pub(crate) fn take(&mut self, data: &[u8]) -> usize {
        let space = self.space();
        let n = data.len().min(space.len());
        space[..n].copy_from_slice(&data[..n]);
        self.filled(n);
        n
    }

    /// The bytes gathered and not written yet.
    pub(crate) fn chunk(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.filled]
    }

    /// Whether the chunk is full: write it with [`Writer::write_full`] before taking more.
    pub(crate) fn is_full(&self) -> bool {
        self.filled == CHUNK
    }

    /// All the bytes given so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Writes the full chunk.
    pub(crate) fn write_full(&mut self) -> io::Result<()> {
        debug_assert!(self.is_full());
        let chunk = &self.storage[self.start..self.start + CHUNK];
        let file = self.file.borrow_mut();
        if self.direct {
            self.direct = write_direct(file, chunk)?;
        } else {
            write_cached(file, chunk)?;
        }
        self.filled = 0;
        Ok(())
    }

    /// Writes what is left (whole blocks directly, the last partial block through the cache),
    /// turns direct I/O off and gives the file back, for the caller to sync.
    pub(crate) fn finish(mut self) -> io::Result<F> {
        let rest = &self.storage[self.start..self.start + self.filled];
        let whole = rest.len() - rest.len() % BLOCK;
        let file = self.file.borrow_mut();
        let mut direct = self.direct;
        if direct {
            direct = write_direct(file, &rest[..whole])?;
        } else {
            write_cached(file, &rest[..whole])?;
        }
        if direct {
            set_direct(file, false);
        }
        write_cached(file, &rest[whole..])?;
        Ok(self.file)
    }
}

/// A [`Writer`] fed by an async task (a download): pieces are gathered on the task, and each
/// full chunk is hashed (if asked) and written on tokio's blocking threads: one hand-off
/// per chunk, not per piece as through `tokio::fs::File`.
#[derive(Debug)]
pub(crate) struct AsyncWriter {
    /// `None` once a write failed or a blocking task was lost.
    inner: Option<(Writer<File>, Option<Hasher>)>,
}

impl AsyncWriter {
    /// Starts writing `file` (opened for writing, at offset 0), around the cache if
    /// `uncached`; `hasher` sees every byte.
    pub(crate) fn new(file: File, uncached: bool, hasher: Option<Hasher>) -> AsyncWriter {
        AsyncWriter {
            inner: Some((Writer::new(file, uncached), hasher)),
        }
    }

    /// Appends `data`, writing every chunk it fills.
    pub(crate) async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let (writer, _) = self.inner.as_mut().ok_or_else(failed)?;
            let n = writer.take(data);
            data = &data[n..];
            if writer.is_full() {
                let (mut writer, mut hasher) = self.inner.take().ok_or_else(failed)?;
                let done = tokio::task::spawn_blocking(move || {
                    if let Some(h) = hasher.as_mut() {
                        h.update(writer.chunk());
                    }
                    writer.write_full().map(|()| (writer, hasher))
                })
                .await
                .map_err(io::Error::other)??;
                self.inner = Some(done);
            }
        }
        Ok(())
    }

    /// Writes the rest and syncs the file; returns the hasher, which has seen every byte.
    pub(crate) async fn finish_synced(mut self) -> io::Result<Option<Hasher>> {
        let (writer, mut hasher) = self.inner.take().ok_or_else(failed)?;
        tokio::task::spawn_blocking(move || {
            if let Some(h) = hasher.as_mut() {
                h.update(writer.chunk());
            }
            writer.finish()?.sync_all()?;
            Ok(hasher)
        })
        .await
        .map_err(io::Error::other)?
    }
}

fn failed() -> io::Error {
    io::Error::other("an earlier write to this file failed")
}

/// Writes `data` (whole blocks) directly; if the file system refuses, through the cache.
/// Returns whether direct writes go on.
fn write_direct(dst: &mut File, data: &[u8]) -> io::Result<bool> {
    let at = dst.stream_position()?;
    match dst.write_all(data) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            set_direct(dst, false);
            dst.seek(io::SeekFrom::Start(at))?;
            write_cached(dst, data)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Writes `data` through the page cache, [`CACHED_WRITE`] bytes at a time.
fn write_cached(dst: &mut File, data: &[u8]) -> io::Result<()> {
    data.chunks(CACHED_WRITE)
        .try_for_each(|piece| dst.write_all(piece))
}

/// Turns direct I/O on or off for `file`; true when it is now as asked.
fn set_direct(file: &File, on: bool) -> bool {
    let Ok(flags) = fcntl_getfl(file) else {
        return false;
    };
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    fcntl_setfl(file, flags).is_ok()
}

/// Reads from `src` until `buf` is full or the data ends; returns the bytes read.
fn fill(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(e: io::Error) -> StoreError {
        StoreError::config(e.to_string())
    }

    /// Every length around the block and chunk sizes comes out byte for byte, on the file
    /// system of the temporary directory (direct I/O or not) and on one that refuses it when
    /// the machine has one (/dev/shm is tmpfs).
    #[test]
    fn the_bytes_written_are_the_bytes_given() {
        let data: Vec<u8> = (0..(3 * CHUNK + 2 * BLOCK + 17))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let lens = [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK + BLOCK,
            data.len(),
        ];
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            for len in lens {
                let path = dir.path().join(format!("f{len}"));
                let mut f = File::create_new(&path).unwrap();
                let mut seen = Vec::new();
                let n = copy_uncached(&mut &data[..len], &mut f, other, other, |b| {
                    seen.extend_from_slice(b)
                })
                .unwrap();
                assert_eq!(n, len as u64);
                assert!(seen == data[..len], "every byte is seen once, in order");
                let flags = fcntl_getfl(&f).unwrap();
                assert!(!flags.contains(OFlags::DIRECT), "direct I/O is left on");
                f.sync_all().unwrap();
                drop(f);
                let got = std::fs::read(&path).unwrap();
                assert!(got == data[..len], "{}: length {len}", dir.path().display());
            }
        }
    }

    /// Pieces of every size, through the async writer, come out byte for byte, hashed as
    /// given, on the temporary directory's file system and on tmpfs when there is one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_of_any_size_are_written_and_hashed_in_order() {
        let data: Vec<u8> = (0..(2 * CHUNK + 3 * BLOCK + 5))
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            for (i, piece) in [
                1,
                7,
                BLOCK - 1,
                BLOCK,
                65_536 + 3,
                CHUNK,
                CHUNK + 1,
                data.len(),
            ]
            .into_iter()
            .enumerate()
            {
                let path = dir.path().join(format!("f{i}"));
                let file = File::create_new(&path).unwrap();
                let mut out = AsyncWriter::new(file, i % 2 == 0, Some(Hasher::new()));
                for p in data.chunks(piece) {
                    out.write_all(p).await.unwrap();
                }
                let (sha, len) = out.finish_synced().await.unwrap().unwrap().finish();
                assert_eq!(len, data.len() as u64);
                assert_eq!(sha, crate::checksum::sha256_hex(&data));
                let got = std::fs::read(&path).unwrap();
                assert!(got == data, "{}: pieces of {piece}", dir.path().display());
            }
        }
    }
    /// Written uncached, a file's pages are not left in the page cache (but for its last
    /// partial block); written cached, they are. Needs a file system that takes direct I/O:
    /// the temporary directory's, here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uncached_writes_leave_the_page_cache_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 3 * CHUNK + 100];
        let probe = File::create_new(dir.path().join("probe")).unwrap();
        assert!(
            set_direct(&probe, true),
            "{} refuses direct I/O: run the tests with TMPDIR on a disk file system",
            dir.path().display()
        );
        for uncached in [true, false] {
            let path = dir.path().join(format!("f{uncached}"));
            let file = File::create_new(&path).unwrap();
            let mut out = AsyncWriter::new(file, uncached, None);
            out.write_all(&data).await.unwrap();
            out.finish_synced().await.unwrap();
            let cached = crate::testing::share_cached(&path);
            if uncached {
                assert!(
                    cached < 0.01,
                    "{:.1} % of the pages are cached",
                    cached * 100.0
                );
            } else {
                assert!(
                    cached > 0.99,
                    "{:.1} % of the pages are cached",
                    cached * 100.0
                );
            }
        }
    }
}
