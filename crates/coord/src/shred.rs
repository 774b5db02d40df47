//! Crypto-shredding of personal payloads (DESIGN §5 "GDPR").
//!
//! A region's stream keeps every event its edges forward, and a stream
//! message cannot be taken out of JetStream's replicated logs and backups
//! reliably. So the payload of every event *about a user* is sealed before
//! it leaves the edge, with that user's data key for the region
//! (ChaCha20-Poly1305, `ring`), and erasing the user destroys the key: what
//! stays in the stream is noise.
//!
//! Keys live in the region's KV bucket `KEEL_<REGION>_USERKEYS` (in the
//! region's residency zone, like the events), one per user, created by the
//! first edge that forwards something about the user (`kv_create`, so
//! concurrent edges agree on one key). Every key has a random id; a sealed
//! payload names it (`keelkey`), so a key created again after an erasure
//! never opens what was sealed before it.
//!
//! Invariant: **a payload sealed with a destroyed key is never opened
//! again.** Nodes cache keys; `forget` (called on every node of the region
//! by the erasure, after `destroy`) drops the cached copy, and a node that
//! missed it restarts with an empty cache.

use bytes::Bytes;
use keel_bus::{Bus, BusError, BusResult, KvSpec, Placement};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Version byte of a sealed payload: `1 ‖ nonce(12) ‖ ciphertext ‖ tag(16)`.
const SEALED_V1: u8 = 1;
const KEY_BYTES: usize = 32;
/// Keys cached per node before the cache starts over.
const CACHE_MAX: usize = 100_000;

/// The bucket holding a region's user data keys.
pub fn user_keys_bucket(region: &str) -> String {
    format!(
        "KEEL_{}_USERKEYS",
        region.to_ascii_uppercase().replace('-', "_")
    )
}

/// The KV spec of [`user_keys_bucket`]: one revision per key, kept until
/// erased, placed on the region's cluster.
pub fn user_keys_spec(region: &str, replicas: usize, placement: Option<Placement>) -> KvSpec {
    KvSpec {
        bucket: user_keys_bucket(region),
        history: 1,
        max_age: None,
        replicas,
        placement,
    }
}

/// A user id as a KV key (`u<hex>`): user ids may hold any character.
fn key_name(user: &str) -> String {
    format!("u{}", hex::encode(user.as_bytes()))
}

/// One user's data key in one region.
pub struct DataKey {
    /// Random; named by every payload sealed with it.
    id: u64,
    key: LessSafeKey,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({:016x})", self.id)
    }
}

impl DataKey {
    fn from_record(bytes: &[u8]) -> Option<DataKey> {
        let (id, key) = bytes.split_at_checked(8)?;
        if key.len() != KEY_BYTES {
            return None;
        }
        let id = u64::from_be_bytes(id.try_into().ok()?);
        let key = UnboundKey::new(&aead::CHACHA20_POLY1305, key).ok()?;
        Some(DataKey {
            id,
            key: LessSafeKey::new(key),
        })
    }

    /// The id a sealed payload names (`keelkey`), as 16 hex digits.
    pub fn id(&self) -> String {
        format!("{:016x}", self.id)
    }

    /// Seals `plaintext`; `user` is bound as associated data, so a payload
    /// moved to another user's event does not open.
    pub fn seal(&self, user: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        // The system RNG does not fail on the platforms we build for; a
        // failure would leave a zero nonce, so refuse to go on instead.
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random number generator failed");
        let mut out = Vec::with_capacity(1 + nonce.len() + plaintext.len() + 16);
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs beyond 256 GiB.
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(user.as_bytes()),
                &mut body,
            )
            .expect("payload too large to seal");
        out.extend_from_slice(&body);
        out
    }

    /// Opens a payload sealed by [`DataKey::seal`] for `user`; `None` if it
    /// was not sealed with this key for this user, or was altered.
    pub fn open(&self, user: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 {
            return None;
        }
        let (nonce, body) = rest.split_at_checked(aead::NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(user.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// A region's user data keys, as one node sees them.
pub struct UserKeys {
    bus: Arc<dyn Bus>,
    spec: KvSpec,
    bucket: String,
    /// Set once the bucket is known to exist (created on first use).
    ready: tokio::sync::OnceCell<()>,
    cache: Mutex<HashMap<String, Arc<DataKey>>>,
}

impl UserKeys {
    /// Keys in the bucket of `spec` (see [`user_keys_spec`]).
    pub fn new(bus: Arc<dyn Bus>, spec: KvSpec) -> UserKeys {
        UserKeys {
            bus,
            bucket: spec.bucket.clone(),
            spec,
            ready: tokio::sync::OnceCell::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn ensure(&self) -> BusResult<()> {
        self.ready
            .get_or_try_init(|| self.bus.ensure_kv(&self.spec))
            .await
            .map(|_| ())
    }

    fn cached(&self, user: &str) -> Option<Arc<DataKey>> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
    }

    fn remember(&self, user: &str, key: Arc<DataKey>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(user.to_owned(), key);
    }

    async fn stored(&self, user: &str) -> BusResult<Option<Arc<DataKey>>> {
        self.ensure().await?;
        let Some(entry) = self.bus.kv_get(&self.bucket, &key_name(user)).await? else {
            return Ok(None);
        };
        let key = entry
            .value
            .as_deref()
            .and_then(DataKey::from_record)
            .ok_or_else(|| BusError::Internal(format!("corrupt data key of user {user:?}")))?;
        let key = Arc::new(key);
        self.remember(user, key.clone());
        Ok(Some(key))
    }

    /// The user's key, created if the region has none yet.
    pub async fn for_writing(&self, user: &str) -> BusResult<Arc<DataKey>> {
        if let Some(k) = self.cached(user) {
            return Ok(k);
        }
        if let Some(k) = self.stored(user).await? {
            return Ok(k);
        }
        let mut record = vec![0u8; 8 + KEY_BYTES];
        SystemRandom::new()
            .fill(&mut record)
            .map_err(|_| BusError::Internal("the system random number generator failed".into()))?;
        match self
            .bus
            .kv_create(&self.bucket, &key_name(user), Bytes::from(record.clone()))
            .await
        {
            Ok(_) => {
                let key =
                    Arc::new(DataKey::from_record(&record).ok_or_else(|| {
                        BusError::Internal("a fresh data key does not parse".into())
                    })?);
                self.remember(user, key.clone());
                Ok(key)
            }
            // Another node created it first: use theirs.
            Err(BusError::Conflict(_)) => self.stored(user).await?.ok_or_else(|| {
                BusError::Unavailable(format!("the data key of user {user:?} is being erased"))
            }),
            Err(e) => Err(e),
        }
    }

    /// The key with id `key_id` (hex, from `keelkey`) of `user`, if it still
    /// exists: `None` once the user was erased.
    pub async fn for_reading(&self, user: &str, key_id: &str) -> BusResult<Option<Arc<DataKey>>> {
        if let Some(k) = self.cached(user)
            && k.id() == key_id
        {
            return Ok(Some(k));
        }
        Ok(self.stored(user).await?.filter(|k| k.id() == key_id))
    }

    /// Destroys the user's key in the region (securely, see
    /// [`Bus::kv_erase`]) and forgets it here. Idempotent.
    pub async fn destroy(&self, user: &str) -> BusResult<()> {
        self.ensure().await?;
        self.bus.kv_erase(&self.bucket, &key_name(user)).await?;
        self.forget(user);
        Ok(())
    }

    /// Drops this node's cached copy of the user's key.
    pub fn forget(&self, user: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_bus::local::LocalBus;

    async fn keys() -> UserKeys {
        let bus: Arc<dyn Bus> = Arc::new(LocalBus::new());
        UserKeys::new(bus, user_keys_spec("eu-central", 1, None))
    }

    #[tokio::test]
    async fn seal_open_and_shred() {
        let keys = keys().await;
        let k = keys.for_writing("alice").await.unwrap();
        let sealed = k.seal("alice", b"MARKER plaintext");
        assert!(!sealed.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(k.open("alice", &sealed).unwrap(), b"MARKER plaintext");
        // Bound to the user; tampering is detected.
        assert_eq!(k.open("bob", &sealed), None);
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(k.open("alice", &bad), None);
        assert_eq!(k.open("alice", b""), None);
        // One key per user, the same from every reader.
        let again = keys.for_writing("alice").await.unwrap();
        assert_eq!(again.id(), k.id());
        let other = keys.for_writing("bob").await.unwrap();
        assert_ne!(other.id(), k.id());
        let read = keys.for_reading("alice", &k.id()).await.unwrap().unwrap();
        assert_eq!(read.open("alice", &sealed).unwrap(), b"MARKER plaintext");

        keys.destroy("alice").await.unwrap();
        assert!(keys.for_reading("alice", &k.id()).await.unwrap().is_none());
        // A new key after the erasure never opens the old payloads.
        let fresh = keys.for_writing("alice").await.unwrap();
        assert_ne!(fresh.id(), k.id());
        assert!(keys.for_reading("alice", &k.id()).await.unwrap().is_none());
        assert_eq!(fresh.open("alice", &sealed), None);
        // Bob is untouched.
        assert!(
            keys.for_reading("bob", &other.id())
                .await
                .unwrap()
                .is_some()
        );
    }
}
