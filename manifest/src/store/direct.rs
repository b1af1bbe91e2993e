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

use std::fs::File;
use std::io::{self, Read, Seek, Write};

use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};

use super::StoreError;

/// Objects at least this large are written around the cache.
pub(crate) const MIN_LEN: u64 = 1 << 20;

/// The alignment direct I/O needs: a multiple of every common logical block size.
const BLOCK: usize = 4096;

/// Bytes written per direct write.
const CHUNK: usize = 1 << 20;

/// Copies `src` to the end of `dst` (a file opened for writing, at offset 0), whole blocks
/// around the page cache where the file system allows it. Returns the bytes copied.
pub(crate) fn copy_uncached(
    src: &mut impl Read,
    dst: &mut File,
    on_read: impl Fn(io::Error) -> StoreError,
    on_write: impl Fn(io::Error) -> StoreError,
) -> Result<u64, StoreError> {
    let mut storage = vec![0u8; CHUNK + BLOCK];
    let start = storage.as_ptr().align_offset(BLOCK);
    let buf = &mut storage[start..start + CHUNK];
    let mut direct = set_direct(dst, true);
    let mut total = 0u64;
    loop {
        let n = fill(src, buf).map_err(&on_read)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        let whole = n - n % BLOCK;
        if direct {
            direct = write_direct(dst, &buf[..whole]).map_err(&on_write)?;
        } else {
            dst.write_all(&buf[..whole]).map_err(&on_write)?;
        }
        if whole < n {
            // The last partial block (only the end of the data is not a whole chunk).
            if direct {
                direct = !set_direct(dst, false);
            }
            dst.write_all(&buf[whole..n]).map_err(&on_write)?;
        }
        if n < CHUNK {
            break;
        }
    }
    if direct {
        set_direct(dst, false);
    }
    Ok(total)
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
            dst.write_all(data)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
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
                let n = copy_uncached(&mut &data[..len], &mut f, other, other).unwrap();
                assert_eq!(n, len as u64);
                let flags = fcntl_getfl(&f).unwrap();
                assert!(!flags.contains(OFlags::DIRECT), "direct I/O is left on");
                f.sync_all().unwrap();
                drop(f);
                let got = std::fs::read(&path).unwrap();
                assert!(got == data[..len], "{}: length {len}", dir.path().display());
            }
        }
    }
}
