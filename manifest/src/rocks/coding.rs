//! Little-endian fixed-width integers, varints and length-prefixed slices as RocksDB encodes
//! them (`util/coding.h`), shared by the WriteBatch and VersionEdit decoders.

/// A read position over a byte slice. Every getter returns `None` when the input is too short
/// (or a varint is malformed) and then leaves the position where the failed read began, so the
/// caller can report the offset of the field it could not read.
#[derive(Debug, Clone)]
pub(crate) struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub(crate) fn at(data: &'a [u8], pos: usize) -> Self {
        Input { data, pos }
    }

    /// Offset of the next unread byte within the whole slice.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub(crate) fn fixed32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn fixed64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    /// A varint of at most 5 bytes (RocksDB's `GetVarint32`; like RocksDB, bits beyond the 32nd
    /// in the fifth byte are dropped).
    pub(crate) fn varint32(&mut self) -> Option<u32> {
        let start = self.pos;
        let mut result: u32 = 0;
        for shift in (0..=28).step_by(7) {
            let Some(byte) = self.u8() else {
                self.pos = start;
                return None;
            };
            result |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(result);
            }
        }
        self.pos = start;
        None
    }

    /// A varint of at most 10 bytes (RocksDB's `GetVarint64`).
    pub(crate) fn varint64(&mut self) -> Option<u64> {
        let start = self.pos;
        let mut result: u64 = 0;
        for shift in (0..=63).step_by(7) {
            let Some(byte) = self.u8() else {
                self.pos = start;
                return None;
            };
            result |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(result);
            }
        }
        self.pos = start;
        None
    }

    /// A varint32 length followed by that many bytes (RocksDB's `GetLengthPrefixedSlice`).
    pub(crate) fn length_prefixed(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        let len = self.varint32()?;
        match self.bytes(len as usize) {
            Some(s) => Some(s),
            None => {
                self.pos = start;
                None
            }
        }
    }
}

pub(crate) fn put_varint32(dst: &mut Vec<u8>, v: u32) {
    put_varint64(dst, u64::from(v));
}

pub(crate) fn put_varint64(dst: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        dst.push((v as u8) | 0x80);
        v >>= 7;
    }
    dst.push(v as u8);
}

pub(crate) fn put_length_prefixed(dst: &mut Vec<u8>, s: &[u8]) {
    let len = u32::try_from(s.len()).expect("slice longer than 4 GiB cannot be length-prefixed");
    put_varint32(dst, len);
    dst.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_known_encodings() {
        let mut v = Vec::new();
        put_varint32(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut i = Input::new(&v);
        assert_eq!(i.varint32(), Some(300));
        assert!(i.is_empty());

        let mut v = Vec::new();
        put_varint64(&mut v, u64::MAX);
        assert_eq!(v.len(), 10);
        assert_eq!(Input::new(&v).varint64(), Some(u64::MAX));
        // A 64-bit value does not fit a varint32.
        assert_eq!(Input::new(&v).varint32(), None);
    }

    #[test]
    fn truncated_reads_leave_position_unchanged() {
        let mut i = Input::new(&[0x80, 0x80]);
        assert_eq!(i.varint32(), None);
        assert_eq!(i.pos(), 0);
        let mut i = Input::new(&[0x05, b'a', b'b']);
        assert_eq!(i.length_prefixed(), None);
        assert_eq!(i.pos(), 0);
    }

    proptest! {
        #[test]
        fn varint64_round_trip(x in any::<u64>()) {
            let mut v = Vec::new();
            put_varint64(&mut v, x);
            let mut i = Input::new(&v);
            prop_assert_eq!(i.varint64(), Some(x));
            prop_assert!(i.is_empty());
        }

        #[test]
        fn varint32_round_trip(x in any::<u32>()) {
            let mut v = Vec::new();
            put_varint32(&mut v, x);
            let mut i = Input::new(&v);
            prop_assert_eq!(i.varint32(), Some(x));
            prop_assert!(i.is_empty());
        }
    }
}
