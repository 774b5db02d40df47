//! Versioned binary encoding and stable digests.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Current wire format: byte 0 of every encoding. Bumped on incompatible
/// changes so old nodes refuse new payloads instead of misreading them.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all (not even the version byte).
    #[error("empty input")]
    Empty,
    /// The version byte is not [`FORMAT_VERSION`].
    #[error("unsupported format version {0} (expected {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// The payload did not parse as the requested type.
    #[error("malformed payload: {0}")]
    Malformed(#[from] postcard::Error),
    /// A valid payload was followed by extra bytes; rejected so one state
    /// has exactly one encoding.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
}

/// Why a value could not be encoded (never for this crate's types).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode: {0}")]
pub struct EncodeError(#[from] postcard::Error);

/// Encodes `value` as [`FORMAT_VERSION`] followed by its postcard encoding.
///
/// For this crate's (canonical) types, logically equal states encode to
/// identical bytes.
///
/// # Panics
/// If `T`'s `Serialize` fails, which postcard only does for sequences of
/// unknown length or custom serializer errors — never for this crate's
/// types. Use [`try_encode`] for arbitrary types.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    match try_encode(value) {
        Ok(bytes) => bytes,
        Err(e) => panic!("keel_crdt::encode: {e}"),
    }
}

/// Fallible [`encode`].
pub fn try_encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(postcard::to_extend(value, vec![FORMAT_VERSION])?)
}

/// Decodes bytes produced by [`encode`]. Rejects empty input, unknown
/// versions and trailing bytes. Safe on hostile input: postcard never
/// panics, and length prefixes are checked against the remaining input
/// before allocating.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, payload) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let (value, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Stable 64-bit digest of `value`'s canonical encoding (FNV-1a over
/// [`encode`]'s bytes). Same on every process and platform — unlike std's
/// randomized hasher — so replicas can compare digests for anti-entropy:
/// equal states ⇒ equal digests (the converse holds only probabilistically).
pub fn digest<T: Serialize + ?Sized>(value: &T) -> u64 {
    digest_encoded(&encode(value))
}

/// [`digest`] of a value already [`encode`]d, for callers that keep the
/// bytes anyway (sync persists them) and should not encode twice.
pub fn digest_encoded(encoded: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    encoded
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Crdt, OrSet, ReplicaId};

    #[test]
    fn round_trip_and_rejections() {
        let mut s = OrSet::new();
        s.add(&ReplicaId::from("a"), 7u8);
        let bytes = encode(&s);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<OrSet<u8>>(&bytes), Ok(s.clone()));
        assert_eq!(decode::<OrSet<u8>>(&[]), Err(DecodeError::Empty));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            decode::<OrSet<u8>>(&v2),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut long = bytes.clone();
        long.extend([0, 0]);
        assert_eq!(
            decode::<OrSet<u8>>(&long),
            Err(DecodeError::TrailingBytes(2))
        );
        assert!(matches!(
            decode::<OrSet<u8>>(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn digest_is_stable_and_order_independent() {
        // `()` encodes to just the version byte 0x01; pinning FNV-1a of it
        // keeps digests comparable across builds of this crate.
        assert_eq!(encode(&()), [FORMAT_VERSION]);
        assert_eq!(digest(&()), 0xaf63_bc4c_8601_b62c);
        let (ra, rb) = (ReplicaId::from("a"), ReplicaId::from("b"));
        let mut a = OrSet::new();
        let da = a.add(&ra, 1u8);
        let mut b = OrSet::new();
        let db = b.add(&rb, 2u8);
        a.merge(&db);
        b.merge(&da);
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&OrSet::<u8>::new()));
    }
}
