//! Big-endian reader and writer for TPM 2.0 wire structures.
//!
//! Owns bounds checking for every TPM structure parsed in this crate. Trust
//! boundary: the input is untrusted bytes from a node (or from a TPM we do not
//! trust yet); every read is checked and returns [`CodecError`] instead of
//! panicking, and TPM2B sizes are capped by the caller-supplied maximum.

use thiserror::Error;

/// What went wrong while decoding a TPM wire structure.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// The input ended before the structure did.
    #[error("{what}: truncated at byte {offset} (needed {needed} more bytes)")]
    Truncated {
        /// Which field was being read.
        what: &'static str,
        /// Offset in the input where the read started.
        offset: usize,
        /// Bytes that were needed beyond the end of the input.
        needed: usize,
    },
    /// A TPM2B size field exceeds what the structure allows.
    #[error("{what}: size {size} exceeds the maximum of {max}")]
    TooLarge {
        /// Which field was being read.
        what: &'static str,
        /// The declared size.
        size: usize,
        /// The maximum the field allows.
        max: usize,
    },
    /// A field holds a value this implementation does not accept.
    #[error("{what}: unsupported value 0x{value:x}")]
    Unsupported {
        /// Which field was being read.
        what: &'static str,
        /// The offending value.
        value: u32,
    },
    /// Bytes remain after the structure ended.
    #[error("{what}: {extra} trailing bytes after the structure")]
    TrailingBytes {
        /// Which structure was being read.
        what: &'static str,
        /// Count of unread bytes.
        extra: usize,
    },
}

/// A bounds-checked cursor over big-endian TPM bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Current offset from the start of the input.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let rest = self.remaining();
        if n > rest {
            return Err(CodecError::Truncated {
                what,
                offset: self.pos,
                needed: n - rest,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// Reads a TPM2B: a u16 size followed by that many bytes, at most `max`.
    pub fn tpm2b(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let size = usize::from(self.u16(what)?);
        if size > max {
            return Err(CodecError::TooLarge { what, size, max });
        }
        self.bytes(size, what)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(CodecError::TrailingBytes { what, extra }),
        }
    }
}

/// Appends big-endian TPM fields to a byte vector.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends a TPM2B (u16 size + bytes). Bytes beyond 65535 are a caller
    /// bug; they are truncated to keep the output well-formed.
    pub fn tpm2b(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(usize::from(u16::MAX));
        // n <= u16::MAX by construction.
        self.u16(n as u16);
        self.bytes(&b[..n])
    }

    /// The bytes written so far.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_reports_offset() {
        let mut r = Reader::new(&[0, 5, 1]);
        assert_eq!(
            r.tpm2b(64, "x"),
            Err(CodecError::Truncated {
                what: "x",
                offset: 2,
                needed: 4
            })
        );
    }

    #[test]
    fn tpm2b_cap() {
        let mut r = Reader::new(&[0, 5, 1, 2, 3, 4, 5]);
        assert!(matches!(
            r.tpm2b(4, "x"),
            Err(CodecError::TooLarge { size: 5, .. })
        ));
    }
}
