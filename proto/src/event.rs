//! The runtime-log event: a canonical, deterministic binary encoding, its
//! digest, and PCR replay (the extend chain).
//!
//! Owns the format that vouchd appends to its persisted log and extends into
//! the runtime PCR, and that the verifier replays. Trust boundary: events
//! arrive at the verifier from the node and are untrusted until they replay
//! to a PCR value inside a verified quote; [`Event::decode`] therefore
//! rejects every non-canonical encoding, so one event has exactly one byte
//! string and one digest.
//!
//! # Byte layout (all integers big-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `"VLE1"` (0x56 0x4c 0x45 0x31) |
//! | 4 | 2 | kind ([`EventKind`]) |
//! | 6 | 8 | sequence number (0 for the first event of a boot) |
//! | 14 | 8 | time, nanoseconds since the Unix epoch |
//! | 22 | 4 | body length `n` |
//! | 26 | n | body: a record |
//!
//! A *record* is zero or more fields, tags strictly increasing:
//! `tag: u16 | type: u8 | len: u32 | value[len]`. Types:
//!
//! | type | name | value |
//! |---|---|---|
//! | 0x01 | u64 | 8 bytes |
//! | 0x02 | bytes | raw bytes |
//! | 0x03 | str | UTF-8 |
//! | 0x04 | bool | 1 byte, 0 or 1 |
//! | 0x05 | record | a nested record |
//! | 0x06 | list | items, each `type: u8 | len: u32 | value[len]` |
//!
//! Limits: an event is at most [`MAX_EVENT_LEN`] bytes; records and lists
//! nest at most [`MAX_DEPTH`] deep. Nothing may follow the body.
//!
//! # Digest and replay
//! `digest(e) = SHA-256(encoding of e)`; the runtime PCR (SHA-256 bank)
//! evolves as `PCR' = SHA-256(PCR || digest(e))`, the TPM2_PCR_Extend rule,
//! starting from the value the PCR held when the log began.

use std::collections::BTreeMap;
use thiserror::Error;

/// Magic at the start of every event.
pub const MAGIC: [u8; 4] = *b"VLE1";
/// Largest encoded event accepted.
pub const MAX_EVENT_LEN: usize = 1 << 20;
/// Deepest nesting of records and lists.
pub const MAX_DEPTH: usize = 8;
const HEADER_LEN: usize = 26;

/// Why bytes are not a canonical event.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    /// Input shorter than a field it declares.
    #[error("event truncated at byte {offset}")]
    Truncated {
        /// Offset of the field that did not fit.
        offset: usize,
    },
    /// Wrong magic.
    #[error("event magic is {0:02x?}, not \"VLE1\"")]
    BadMagic([u8; 4]),
    /// Unknown event kind.
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    /// Event larger than [`MAX_EVENT_LEN`].
    #[error("event of {0} bytes exceeds the limit of {MAX_EVENT_LEN}")]
    TooLarge(usize),
    /// Bytes after the body.
    #[error("{0} bytes follow the event body")]
    TrailingBytes(usize),
    /// Tags out of order or repeated.
    #[error("field tag {tag} at byte {offset} is not greater than the previous tag")]
    TagOrder {
        /// The offending tag.
        tag: u16,
        /// Its offset.
        offset: usize,
    },
    /// An unknown value type.
    #[error("unknown value type 0x{ty:02x} at byte {offset}")]
    UnknownType {
        /// The type byte.
        ty: u8,
        /// Its offset.
        offset: usize,
    },
    /// A value whose length does not fit its type.
    #[error("value of type 0x{ty:02x} at byte {offset} has invalid length {len}")]
    BadLength {
        /// The type byte.
        ty: u8,
        /// Its offset.
        offset: usize,
        /// The declared length.
        len: usize,
    },
    /// A bool that is neither 0 nor 1.
    #[error("bool at byte {offset} is {value}, not 0 or 1")]
    BadBool {
        /// Its offset.
        offset: usize,
        /// The value.
        value: u8,
    },
    /// A string that is not UTF-8.
    #[error("string at byte {offset} is not UTF-8")]
    BadUtf8 {
        /// Its offset.
        offset: usize,
    },
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("records nest deeper than {MAX_DEPTH} at byte {offset}")]
    TooDeep {
        /// Its offset.
        offset: usize,
    },
}

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u16)]
pub enum EventKind {
    /// First event of a boot: the PCR value found, TPM boot counters, and
    /// vouchd's own executable digest.
    BootStart = 1,
    /// vouchd restarted within a boot and continued the log.
    DaemonStart = 2,
    /// A daprd instance and its measurements.
    InstanceMeasured = 3,
    /// A daprd instance exited.
    InstanceExited = 4,
    /// A measured file changed and was re-measured.
    FileChanged = 5,
    /// Something that should not happen: a second daprd, a foreign listener…
    Anomaly = 6,
}

impl EventKind {
    /// Maps the wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::BootStart,
            2 => Self::DaemonStart,
            3 => Self::InstanceMeasured,
            4 => Self::InstanceExited,
            5 => Self::FileChanged,
            6 => Self::Anomaly,
            _ => return None,
        })
    }
}

/// A typed value inside a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Unsigned integer.
    U64(u64),
    /// Raw bytes (digests, inode numbers as bytes…).
    Bytes(Vec<u8>),
    /// UTF-8 text.
    Str(String),
    /// Boolean.
    Bool(bool),
    /// A nested record.
    Record(Record),
    /// A list of values.
    List(Vec<Value>),
}

/// Fields keyed by tag; encoding order is ascending tag order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record(pub BTreeMap<u16, Value>);

impl Record {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets field `tag` and returns the record (builder style).
    pub fn with(mut self, tag: u16, v: Value) -> Self {
        self.0.insert(tag, v);
        self
    }

    /// The value of field `tag`.
    pub fn get(&self, tag: u16) -> Option<&Value> {
        self.0.get(&tag)
    }
}

/// One runtime-log event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What it records.
    pub kind: EventKind,
    /// Position in the boot's log, from 0.
    pub seq: u64,
    /// Wall-clock time of the event (informational; not trusted).
    pub time_unix_ns: u64,
    /// Kind-specific fields.
    pub body: Record,
}

fn type_of(v: &Value) -> u8 {
    match v {
        Value::U64(_) => 1,
        Value::Bytes(_) => 2,
        Value::Str(_) => 3,
        Value::Bool(_) => 4,
        Value::Record(_) => 5,
        Value::List(_) => 6,
    }
}

fn put_len(out: &mut [u8], at: usize) {
    // Values are bounded by MAX_EVENT_LEN when decoded; an encoder caller
    // building > 4 GiB values is out of contract, saturate rather than wrap.
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn encode_value(v: &Value, out: &mut Vec<u8>) {
    out.push(type_of(v));
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    match v {
        Value::U64(n) => out.extend_from_slice(&n.to_be_bytes()),
        Value::Bytes(b) => out.extend_from_slice(b),
        Value::Str(s) => out.extend_from_slice(s.as_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Record(r) => encode_record(r, out),
        Value::List(items) => {
            for i in items {
                encode_value(i, out);
            }
        }
    }
    put_len(out, at);
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    for (tag, v) in &r.0 {
        out.extend_from_slice(&tag.to_be_bytes());
        encode_value(v, out);
    }
}

struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&self, pos: &mut usize, n: usize) -> Result<&'a [u8], EventError> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(EventError::Truncated { offset: *pos })?;
        let out = &self.buf[*pos..end];
        *pos = end;
        Ok(out)
    }

    fn u16(&self, pos: &mut usize) -> Result<u16, EventError> {
        let b = self.take(pos, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&self, pos: &mut usize) -> Result<u32, EventError> {
        let b = self.take(pos, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, pos: &mut usize) -> Result<u64, EventError> {
        let b = self.take(pos, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Decodes one typed value (type byte, length, value).
    fn value(&self, pos: &mut usize, depth: usize) -> Result<Value, EventError> {
        let offset = *pos;
        let ty = self.take(pos, 1)?[0];
        let len = self.u32(pos)? as usize;
        let start = *pos;
        let body = self.take(pos, len)?;
        let bad_len = EventError::BadLength { ty, offset, len };
        Ok(match ty {
            1 => {
                let mut a = [0u8; 8];
                if len != 8 {
                    return Err(bad_len);
                }
                a.copy_from_slice(body);
                Value::U64(u64::from_be_bytes(a))
            }
            2 => Value::Bytes(body.to_vec()),
            3 => Value::Str(
                std::str::from_utf8(body)
                    .map_err(|_| EventError::BadUtf8 { offset })?
                    .to_owned(),
            ),
            4 => match body {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [v] => return Err(EventError::BadBool { offset, value: *v }),
                _ => return Err(bad_len),
            },
            5 | 6 => {
                if depth >= MAX_DEPTH {
                    return Err(EventError::TooDeep { offset });
                }
                let end = start + len;
                let mut p = start;
                if ty == 5 {
                    Value::Record(self.record(&mut p, end, depth + 1)?)
                } else {
                    let mut items = Vec::new();
                    while p < end {
                        items.push(self.sub(end).value(&mut p, depth + 1)?);
                    }
                    Value::List(items)
                }
            }
            _ => return Err(EventError::UnknownType { ty, offset }),
        })
    }

    /// A decoder that cannot read past `end`.
    fn sub(&self, end: usize) -> Dec<'a> {
        Dec {
            buf: &self.buf[..end],
        }
    }

    fn record(&self, pos: &mut usize, end: usize, depth: usize) -> Result<Record, EventError> {
        let d = self.sub(end);
        let mut out = BTreeMap::new();
        let mut last: Option<u16> = None;
        while *pos < end {
            let offset = *pos;
            let tag = d.u16(pos)?;
            if last.is_some_and(|l| tag <= l) {
                return Err(EventError::TagOrder { tag, offset });
            }
            last = Some(tag);
            out.insert(tag, d.value(pos, depth)?);
        }
        Ok(Record(out))
    }
}

impl Event {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(self.kind as u16).to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_unix_ns.to_be_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode_record(&self.body, &mut out);
        put_len(&mut out, at);
        out
    }

    /// Decodes a canonical encoding; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, EventError> {
        if bytes.len() > MAX_EVENT_LEN {
            return Err(EventError::TooLarge(bytes.len()));
        }
        let d = Dec { buf: bytes };
        let mut pos = 0;
        let magic = d.take(&mut pos, 4)?;
        if magic != MAGIC {
            let mut m = [0u8; 4];
            m.copy_from_slice(magic);
            return Err(EventError::BadMagic(m));
        }
        let kind_raw = d.u16(&mut pos)?;
        let kind = EventKind::from_u16(kind_raw).ok_or(EventError::UnknownKind(kind_raw))?;
        let seq = d.u64(&mut pos)?;
        let time_unix_ns = d.u64(&mut pos)?;
        let body_len = d.u32(&mut pos)? as usize;
        debug_assert_eq!(pos, HEADER_LEN);
        let end = pos
            .checked_add(body_len)
            .filter(|e| *e <= bytes.len())
            .ok_or(EventError::Truncated { offset: pos })?;
        let body = d.record(&mut pos, end, 0)?;
        if end != bytes.len() {
            return Err(EventError::TrailingBytes(bytes.len() - end));
        }
        Ok(Self {
            kind,
            seq,
            time_unix_ns,
            body,
        })
    }

    /// SHA-256 of the canonical encoding.
    pub fn digest(&self) -> [u8; 32] {
        digest(&self.encode())
    }
}

/// SHA-256 of an encoded event (the value extended into the PCR).
///
/// `sha2` (SHA-NI where the CPU has it) rather than ring here: for these
/// short inputs it avoids ring's per-call block-buffer copying.
pub fn digest(encoded: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(encoded).into()
}

/// One TPM2_PCR_Extend in the SHA-256 bank.
pub fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// The PCR value after extending `digests` in order, starting from `start`.
pub fn replay<'a>(start: [u8; 32], digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    digests.into_iter().fold(start, |pcr, d| extend(&pcr, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<u64>().prop_map(Value::U64),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
            ".{0,8}".prop_map(Value::Str),
            any::<bool>().prop_map(Value::Bool),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
                proptest::collection::btree_map(any::<u16>(), inner, 0..4)
                    .prop_map(|m| Value::Record(Record(m))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Event::decode(&bytes);
        }

        #[test]
        fn decode_with_valid_header_never_panics(
            kind in 0u16..8, tail in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b.extend_from_slice(&(tail.len() as u32).to_be_bytes());
            b.extend_from_slice(&tail);
            if let Ok(e) = Event::decode(&b) {
                prop_assert_eq!(e.encode(), b);
            }
        }

        #[test]
        fn roundtrip(
            seq in any::<u64>(), t in any::<u64>(),
            fields in proptest::collection::btree_map(any::<u16>(), arb_value(), 0..6)
        ) {
            let e = Event { kind: EventKind::InstanceMeasured, seq, time_unix_ns: t, body: Record(fields) };
            let enc = e.encode();
            let back = Event::decode(&enc);
            prop_assert_eq!(back.as_ref(), Ok(&e));
        }
    }

    #[test]
    fn non_canonical_rejected() {
        let e = Event {
            kind: EventKind::Anomaly,
            seq: 1,
            time_unix_ns: 2,
            body: Record::new()
                .with(1, Value::U64(5))
                .with(2, Value::Bool(true)),
        };
        let mut b = e.encode();
        // Swap tags 1 and 2 -> out of order.
        b[HEADER_LEN + 1] = 3;
        assert!(matches!(
            Event::decode(&b),
            Err(EventError::TagOrder { tag: 2, .. })
        ));
        let mut b = e.encode();
        b.push(0);
        assert!(Event::decode(&b).is_err());
    }
}
