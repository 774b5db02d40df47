//! Key layouts. Namespaces never contain byte 0 (see `Namespace::new`), so
//! `<namespace>\0` is an unambiguous prefix: no key of one component can
//! fall inside another component's range. Variable-length parts that are
//! followed by more key material are length-prefixed.

use keel_store::{Namespace, StoreError, StoreResult};

pub fn ns_prefix(ns: &Namespace) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.as_str().len() + 1);
    k.extend_from_slice(ns.as_str().as_bytes());
    k.push(0);
    k
}

/// `<ns>\0<key>` (kv, state).
pub fn ns_key(ns: &Namespace, key: &str) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(key.as_bytes());
    k
}

/// `<ns>\0<id>` with a binary id (crdt).
pub fn ns_bytes_key(ns: &Namespace, id: &[u8]) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(id);
    k
}

/// Inverse of [`ns_bytes_key`].
pub fn split_ns_key(k: &[u8]) -> StoreResult<(Namespace, &[u8])> {
    let corrupt = || StoreError::Internal("corrupt namespaced key".into());
    let zero = k.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
    let ns = std::str::from_utf8(&k[..zero]).map_err(|_| corrupt())?;
    let ns = Namespace::new(ns).ok_or_else(corrupt)?;
    Ok((ns, &k[zero + 1..]))
}

/// `<ns>\0<seq:be64>`: events of one component in sequence order.
pub fn event_key(ns: &Namespace, seq: u64) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn u64_key(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

pub fn decode_u64(b: &[u8]) -> StoreResult<u64> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| StoreError::Internal(format!("corrupt u64 of {} bytes", b.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// Tag of preference keys in the `users` column family.
pub const PREF_TAG: &[u8] = b"p\0";
/// Tag of last-activity keys in the `users` column family.
pub const ACTIVITY_TAG: &[u8] = b"a\0";

/// `<tag><ns>\0<len><user>` with `ns_prefix` = `<ns>\0` (see [`ns_prefix`]).
/// The user id is length-prefixed, so one user's keys never fall inside
/// another's range ("bo" vs "bob").
pub fn user_record_prefix(tag: &[u8], ns_prefix: &[u8], user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tag.len() + ns_prefix.len() + 4 + user.len());
    k.extend_from_slice(tag);
    k.extend_from_slice(ns_prefix);
    // Callers check user ids against `max_key_bytes`; saturate regardless.
    k.extend_from_slice(&u32::try_from(user.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k
}

/// `p\0<ns>\0<len><user>` + name: one user's preferences in one component.
pub fn pref_prefix(ns: &Namespace, user: &str) -> Vec<u8> {
    user_record_prefix(PREF_TAG, &ns_prefix(ns), user)
}

/// `a\0<ns>\0<len><user>`: last activity.
pub fn activity_key(ns: &Namespace, user: &str) -> Vec<u8> {
    user_record_prefix(ACTIVITY_TAG, &ns_prefix(ns), user)
}

/// The `<ns>\0` part of a key that starts with `<tag><ns>\0`, if any.
pub fn tagged_ns_prefix<'k>(tag: &[u8], k: &'k [u8]) -> Option<&'k [u8]> {
    let rest = k.strip_prefix(tag)?;
    let zero = rest.iter().position(|&b| b == 0)?;
    rest.get(..=zero)
}

/// The first key after every key starting with `<prefix>` = `...<ns>\0`:
/// `...<ns>\x01` (namespace bytes are all above 1).
pub fn after_ns(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    if let Some(last) = k.last_mut() {
        *last = 1;
    }
    k
}

/// `d\0<user>`: home region (node-wide: the directory is not per component).
pub fn directory_key(user: &str) -> Vec<u8> {
    let mut k = b"d\0".to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

pub fn meta_event_seq(ns: &Namespace) -> Vec<u8> {
    let mut k = b"evseq\0".to_vec();
    k.extend_from_slice(ns.as_str().as_bytes());
    k
}

/// `h\0<table>\0`: the host's own records (`HostRecords`). Table names are
/// host constants without byte 0.
pub fn host_table_prefix(table: &str) -> Vec<u8> {
    let mut k = b"h\0".to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k
}

pub fn host_record_key(table: &str, key: &str) -> Vec<u8> {
    let mut k = host_table_prefix(table);
    k.extend_from_slice(key.as_bytes());
    k
}

/// `x\0<table>\0<key>`: an expiring host record. Value: expires-at ms
/// (u64 BE), then the record.
pub fn expiring_record_key(table: &str, key: &str) -> Vec<u8> {
    let mut k = b"x\0".to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Prefix of the expiry index, ordered by expiry time.
pub const EXPIRY_INDEX_PREFIX: &[u8] = b"X\0";

/// `X\0<expires-at ms, u64 BE><table>\0<key>`: one expiring record, in
/// expiry order (pruning reads it from the start).
pub fn expiry_index_key(expires_at_ms: u64, table: &str, key: &str) -> Vec<u8> {
    let mut k = EXPIRY_INDEX_PREFIX.to_vec();
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// (expires-at, record key) of an expiry index key.
pub fn parse_expiry_index_key(k: &[u8]) -> Option<(u64, Vec<u8>)> {
    let rest = k.strip_prefix(EXPIRY_INDEX_PREFIX)?;
    let (at, table_key) = rest.split_at_checked(8)?;
    let at = u64::from_be_bytes(at.try_into().ok()?);
    let mut record = b"x\0".to_vec();
    record.extend_from_slice(table_key);
    Some((at, record))
}

pub fn meta_incarnation() -> Vec<u8> {
    b"incarnation".to_vec()
}

pub fn meta_node_seq() -> &'static [u8] {
    b"nodeseq"
}

/// Last outbox sequence handed out (gapless, forwarded writes only).
pub fn meta_outbox_seq() -> &'static [u8] {
    b"outboxseq"
}

/// Highest outbox sequence the region acknowledged.
pub fn meta_outbox_acked() -> &'static [u8] {
    b"outboxacked"
}
