//! PEM (RFC 7468) text for the DER both sides exchange: certificates, keys
//! and CSRs. Owns encoding and decoding only; no I/O. Trust boundary: text
//! to decode may come from anyone; decoding never panics and reports what
//! was wrong.

use base64::Engine;

/// Why PEM text does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// No `-----BEGIN …-----` line.
    #[error("no PEM block")]
    NoBlock,
    /// A BEGIN line without its END line.
    #[error("PEM block {0:?} without an END line")]
    Unterminated(String),
    /// The body is not base64.
    #[error("PEM block {label:?}: {reason}")]
    Body {
        /// The block's label.
        label: String,
        /// Why.
        reason: String,
    },
}

/// One PEM block: `-----BEGIN {label}-----`, base64 in 64-column lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::with_capacity(b.len() + b.len() / 64 + 2 * label.len() + 40);
    s.push_str("-----BEGIN ");
    s.push_str(label);
    s.push_str("-----\n");
    for line in b.as_bytes().chunks(64) {
        // base64 output is ASCII, so every 64-byte chunk is UTF-8.
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("-----END ");
    s.push_str(label);
    s.push_str("-----\n");
    s
}

/// Every block in `text`, in order: (label, DER). Text between blocks is
/// ignored.
pub fn decode_all(text: &str) -> Result<Vec<(String, Vec<u8>)>, PemError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find("-----BEGIN ") {
        let after = &rest[b + 11..];
        let close = after
            .find("-----")
            .ok_or_else(|| PemError::Unterminated(String::new()))?;
        let label = after[..close].to_owned();
        let body = &after[close + 5..];
        let end_line = format!("-----END {label}-----");
        let e = body
            .find(&end_line)
            .ok_or_else(|| PemError::Unterminated(label.clone()))?;
        let b64: String = body[..e].chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|err| PemError::Body {
                label: label.clone(),
                reason: err.to_string(),
            })?;
        out.push((label, der));
        rest = &body[e + end_line.len()..];
    }
    if out.is_empty() {
        return Err(PemError::NoBlock);
    }
    Ok(out)
}

/// The DER of the first block in `text`.
pub fn decode_first(text: &str) -> Result<Vec<u8>, PemError> {
    decode_all(text)?
        .into_iter()
        .next()
        .map(|(_, der)| der)
        .ok_or(PemError::NoBlock)
}

/// The DER of every `CERTIFICATE` block in `text` (none if it does not
/// decode).
pub fn certificates(text: &str) -> Vec<Vec<u8>> {
    decode_all(text)
        .unwrap_or_default()
        .into_iter()
        .filter(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_errors() {
        let der: Vec<u8> = (0..=255).collect();
        let two = encode("CERTIFICATE", &der) + "junk\n" + &encode("PRIVATE KEY", &[1, 2, 3]);
        assert_eq!(
            decode_all(&two).unwrap(),
            vec![
                ("CERTIFICATE".into(), der.clone()),
                ("PRIVATE KEY".into(), vec![1, 2, 3])
            ]
        );
        assert_eq!(certificates(&two), vec![der.clone()]);
        assert_eq!(decode_first(&two).unwrap(), der);
        assert!(encode("X", &der)
            .lines()
            .all(|l| l.len() <= 64 || l.starts_with("-----")));
        assert_eq!(decode_all("nothing"), Err(PemError::NoBlock));
        assert!(matches!(
            decode_all("-----BEGIN X-----\nAAAA\n"),
            Err(PemError::Unterminated(_))
        ));
        assert!(matches!(
            decode_all("-----BEGIN X-----\n!!\n-----END X-----\n"),
            Err(PemError::Body { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = decode_all(&s);
            let _ = decode_all(&format!("-----BEGIN {s}"));
        }
    }
}
