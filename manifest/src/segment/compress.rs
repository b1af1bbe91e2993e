//! The zstd stream of a segment's body (FORMAT.md §6.2), written through a compression
//! context that outlives the segment: the next segment reuses its buffers, and, when it
//! compresses on worker threads, its threads. The workers are zstd's own (its multithreaded
//! mode): the input is cut into jobs compressed side by side and written out in order, as
//! one frame, which any zstd reader reads as it reads a frame compressed on one thread.

use std::io;

use zstd::zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer, ResetDirective, zstd_sys};

/// How much input one worker compresses at a time: small enough that a 32 MiB segment keeps
/// two workers busy and little memory is held, large enough that the ratio does not suffer.
const JOB_SIZE: u32 = 2 << 20;

/// The output buffer grows by at least this much when it runs short.
const OUT_GROWTH: usize = 1 << 20;

/// A zstd compression context kept from segment to segment.
pub struct Compressor {
    cctx: CCtx<'static>,
    level: i32,
    workers: u32,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Compressor {
    /// A context compressing at `level` with a checksum in each frame: on the calling
    /// thread with `workers` 0, else on that many threads of its own.
    pub fn new(level: i32, workers: u32) -> io::Result<Compressor> {
        let mut cctx = CCtx::try_create()
            .ok_or_else(|| io::Error::other("cannot create a zstd compression context"))?;
        let mut set = |p| cctx.set_parameter(p).map(drop).map_err(zstd_error);
        set(CParameter::CompressionLevel(level))?;
        set(CParameter::ChecksumFlag(true))?;
        if workers > 0 {
            set(CParameter::NbWorkers(workers))?;
            set(CParameter::JobSize(JOB_SIZE))?;
        }
        Ok(Compressor {
            cctx,
            level,
            workers,
        })
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// How many worker threads it compresses on (0: the calling thread).
    pub fn workers(&self) -> u32 {
        self.workers
    }
}

/// One frame being written after the bytes `out` holds already.
pub(super) struct FrameWriter {
    compressor: Compressor,
    out: Vec<u8>,
}

impl FrameWriter {
    /// Starts a frame after `out` (whatever an earlier frame left unfinished is dropped).
    pub fn new(mut compressor: Compressor, out: Vec<u8>) -> io::Result<FrameWriter> {
        compressor
            .cctx
            .reset(ResetDirective::SessionOnly)
            .map_err(zstd_error)?;
        Ok(FrameWriter { compressor, out })
    }

    /// How many threads compress the frame (0: the writing one).
    pub fn workers(&self) -> u32 {
        self.compressor.workers
    }

    /// Ends the frame: every byte written is compressed and out. Returns the bytes and the
    /// context, for the next frame.
    pub fn finish(mut self) -> io::Result<(Vec<u8>, Compressor)> {
        loop {
            let left = self.step(
                &mut InBuffer::around(&[]),
                zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
            )?;
            if left == 0 {
                return Ok((self.out, self.compressor));
            }
        }
    }

    /// One call of the streaming compressor; returns what it says is left to flush.
    fn step(
        &mut self,
        input: &mut InBuffer<'_>,
        directive: zstd_sys::ZSTD_EndDirective,
    ) -> io::Result<usize> {
        if self.out.capacity() - self.out.len() < OUT_GROWTH / 2 {
            self.out.reserve(OUT_GROWTH.max(self.out.len() / 4));
        }
        let pos = self.out.len();
        let mut output = OutBuffer::around_pos(&mut self.out, pos);
        self.compressor
            .cctx
            .compress_stream2(&mut output, input, directive)
            .map_err(zstd_error)
    }
}

impl io::Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut input = InBuffer::around(buf);
        while input.pos() < buf.len() {
            self.step(&mut input, zstd_sys::ZSTD_EndDirective::ZSTD_e_continue)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Bytes that compress about 2:1, as WAL batches of half-random values do.
    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let half: Vec<u8> = (0..2048)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            v.extend_from_slice(&half);
            v.extend_from_slice(&half);
        }
        v.truncate(len);
        v
    }

    /// On the calling thread or on workers, frame after frame through one context: each
    /// frame is one zstd frame holding exactly what was written, after the bytes that came
    /// before it, with its checksum.
    #[test]
    fn frames_through_one_context_read_back_exactly() {
        for workers in [0, 2] {
            let mut compressor = Compressor::new(3, workers).unwrap();
            for len in [0, 1, 100_000, 7 << 20] {
                let input = data(len);
                let mut w = FrameWriter::new(compressor, b"head".to_vec()).unwrap();
                for piece in input.chunks(40_000) {
                    w.write_all(piece).unwrap();
                }
                let (out, back) = w.finish().unwrap();
                compressor = back;
                assert_eq!(&out[..4], b"head");
                let mut got = Vec::new();
                zstd::stream::read::Decoder::new(&out[4..])
                    .unwrap()
                    .single_frame()
                    .read_to_end(&mut got)
                    .unwrap();
                assert!(got == input, "workers {workers}, {len} bytes");
                // The frame carries its checksum: a flipped byte is caught.
                if len > 0 {
                    let mut bad = out[4..].to_vec();
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    let mut sink = Vec::new();
                    let read = zstd::stream::read::Decoder::new(&bad[..])
                        .unwrap()
                        .read_to_end(&mut sink);
                    assert!(read.is_err(), "workers {workers}, {len} bytes");
                }
            }
            assert_eq!(compressor.workers(), workers);
        }
    }

    /// A frame left unfinished (its writer dropped mid-way, as when a segment is abandoned)
    /// does not leak into the next frame of the context.
    #[test]
    fn an_abandoned_frame_leaves_nothing_behind() {
        for workers in [0, 2] {
            let mut c = Compressor::new(3, workers).unwrap();
            // Take the context back out of an unfinished frame by finishing another one.
            let mut w = FrameWriter::new(c, Vec::new()).unwrap();
            w.write_all(&data(3 << 20)).unwrap();
            let FrameWriter { compressor, .. } = w;
            c = compressor;
            let mut w = FrameWriter::new(c, Vec::new()).unwrap();
            w.write_all(b"only this").unwrap();
            let (out, _) = w.finish().unwrap();
            let got = zstd::stream::decode_all(&out[..]).unwrap();
            assert_eq!(got, b"only this", "workers {workers}");
        }
    }
}
