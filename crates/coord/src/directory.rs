//! The global user directory: user → home region, in one KV bucket on the
//! global bus (`GLOBAL` account), written only by compare-and-set.
//!
//! Invariants:
//! - **One home.** An entry is created only if absent (`kv_create`) and
//!   changed only from the revision its writer read (`kv_update`), so two
//!   concurrent claims or migrations cannot both win.
//! - **Opaque ids, not personal data.** Keys are the user id base64url
//!   encoded (NATS keys allow only `[-/_=.a-zA-Z0-9]`); values are a region
//!   name. Nothing else about a user is kept here.

use base64::Engine as _;
use bytes::Bytes;
use keel_bus::{Bus, BusError, BusResult, KvSpec};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The directory's bucket.
pub const DIRECTORY_BUCKET: &str = "KEEL_DIRECTORY";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    home: String,
}

/// What [`Directory::switch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// The home moved from `from` to `to`.
    Switched,
    /// The home already was `to` (a resumed migration).
    AlreadyThere,
}

/// Why a directory write was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryError {
    /// The user's home is not what the caller expected; it is this (or
    /// the user has none).
    Conflict(Option<String>),
    Bus(BusError),
}

impl std::fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectoryError::Conflict(Some(h)) => write!(f, "the user's home region is {h}"),
            DirectoryError::Conflict(None) => f.write_str("the user has no home region"),
            DirectoryError::Bus(e) => e.fmt(f),
        }
    }
}

impl From<BusError> for DirectoryError {
    fn from(e: BusError) -> Self {
        DirectoryError::Bus(e)
    }
}

/// How long [`Directory::home_cached`] trusts an answer.
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Entries the cache holds before it starts over.
const CACHE_CAPACITY: usize = 100_000;

/// The directory client. Cheap to share (`Arc`).
pub struct Directory {
    bus: Arc<dyn Bus>,
    spec: KvSpec,
    ready: OnceCell<()>,
    /// user → (home, when read), for the per-write residency checks.
    cache:
        std::sync::Mutex<std::collections::HashMap<String, (Option<String>, std::time::Instant)>>,
}

fn key(user: &str) -> String {
    format!(
        "u.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user.as_bytes())
    )
}

fn decode(bytes: &[u8]) -> BusResult<String> {
    serde_json::from_slice::<Entry>(bytes)
        .map(|e| e.home)
        .map_err(|e| BusError::Internal(format!("corrupt directory entry: {e}")))
}

fn encode(home: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&Entry { home: home.into() }).expect("a string serializes"))
}

impl Directory {
    /// The directory on `bus` (the global one), `replicas` copies.
    pub fn new(bus: Arc<dyn Bus>, replicas: usize) -> Directory {
        Directory {
            bus,
            spec: KvSpec {
                bucket: DIRECTORY_BUCKET.into(),
                history: 1,
                max_age: None,
                replicas,
                placement: None,
            },
            ready: OnceCell::new(),
            cache: std::sync::Mutex::default(),
        }
    }

    /// The user's home region, from a cache of at most [`CACHE_TTL`] (ten
    /// seconds) when it has one: for checks on every write, where a
    /// round trip to the directory per call would cost more than the write.
    pub async fn home_cached(&self, user: &str) -> BusResult<Option<String>> {
        if let Some((home, at)) = self.cache_lock().get(user)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(home.clone());
        }
        let home = self.home(user).await?.map(|(h, _)| h);
        self.remember(user, home.clone());
        Ok(home)
    }

    fn cache_lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, (Option<String>, std::time::Instant)>,
    > {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, user: &str, home: Option<String>) {
        let mut cache = self.cache_lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(user.to_string(), (home, std::time::Instant::now()));
    }

    async fn ensure(&self) -> BusResult<()> {
        self.ready
            .get_or_try_init(|| self.bus.ensure_kv(&self.spec))
            .await
            .map(|_| ())
    }

    /// The user's home region and the entry's revision.
    pub async fn home(&self, user: &str) -> BusResult<Option<(String, u64)>> {
        self.ensure().await?;
        match self.bus.kv_get(DIRECTORY_BUCKET, &key(user)).await? {
            Some(e) => match e.value {
                Some(v) => Ok(Some((decode(&v)?, e.revision))),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Removes the user's entry (GDPR erasure), with every kept revision,
    /// and forgets it here. Idempotent.
    pub async fn erase(&self, user: &str) -> BusResult<()> {
        self.ensure().await?;
        self.bus.kv_erase(DIRECTORY_BUCKET, &key(user)).await?;
        self.remember(user, None);
        Ok(())
    }

    /// Makes `region` the user's home unless the user has one; returns the
    /// home in effect.
    pub async fn claim(&self, user: &str, region: &str) -> BusResult<String> {
        self.ensure().await?;
        match self
            .bus
            .kv_create(DIRECTORY_BUCKET, &key(user), encode(region))
            .await
        {
            Ok(_) => {
                self.remember(user, Some(region.to_string()));
                Ok(region.to_string())
            }
            Err(BusError::Conflict(_)) => match self.home(user).await? {
                Some((home, _)) => Ok(home),
                // Deleted between the two calls: try once more.
                None => self
                    .bus
                    .kv_create(DIRECTORY_BUCKET, &key(user), encode(region))
                    .await
                    .map(|_| region.to_string()),
            },
            Err(e) => Err(e),
        }
    }

    /// Users whose home is `region` (every user for `None`). Reads every
    /// entry for a region: fine for the directories tests and demos hold,
    /// a per-region counter is the way to scale it.
    pub async fn count(&self, region: Option<&str>) -> BusResult<u64> {
        self.ensure().await?;
        let keys = self.bus.kv_keys(DIRECTORY_BUCKET).await?;
        let Some(region) = region else {
            return Ok(keys.len() as u64);
        };
        let mut n = 0;
        for k in keys {
            if let Some(e) = self.bus.kv_get(DIRECTORY_BUCKET, &k).await?
                && let Some(v) = e.value
                && decode(&v)? == region
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Moves the user's home from `from` to `to` by compare-and-set.
    pub async fn switch(&self, user: &str, from: &str, to: &str) -> Result<Switch, DirectoryError> {
        let Some((home, revision)) = self.home(user).await? else {
            return Err(DirectoryError::Conflict(None));
        };
        if home == to {
            return Ok(Switch::AlreadyThere);
        }
        if home != from {
            return Err(DirectoryError::Conflict(Some(home)));
        }
        match self
            .bus
            .kv_update(DIRECTORY_BUCKET, &key(user), encode(to), revision)
            .await
        {
            Ok(_) => {
                self.remember(user, Some(to.to_string()));
                Ok(Switch::Switched)
            }
            // Someone else wrote in between: report what is there now.
            Err(BusError::Conflict(_)) => match self.home(user).await? {
                Some((h, _)) if h == to => Ok(Switch::AlreadyThere),
                other => Err(DirectoryError::Conflict(other.map(|(h, _)| h))),
            },
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_bus::local::LocalBus;

    fn dir() -> Directory {
        Directory::new(Arc::new(LocalBus::new()), 1)
    }

    #[tokio::test]
    async fn claim_is_first_writer_wins() {
        let d = dir();
        assert_eq!(d.home("alice").await.unwrap(), None);
        assert_eq!(d.claim("alice", "us-east").await.unwrap(), "us-east");
        assert_eq!(d.claim("alice", "eu-central").await.unwrap(), "us-east");
        assert_eq!(d.home("alice").await.unwrap().unwrap().0, "us-east");
        d.claim("bob", "eu").await.unwrap();
        assert_eq!(d.count(None).await.unwrap(), 2);
        assert_eq!(d.count(Some("eu")).await.unwrap(), 1);
        assert_eq!(d.count(Some("mars")).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn switch_is_compare_and_set() {
        let d = dir();
        assert_eq!(
            d.switch("bob", "us-east", "us-west").await,
            Err(DirectoryError::Conflict(None))
        );
        d.claim("bob", "us-east").await.unwrap();
        assert_eq!(
            d.switch("bob", "eu-central", "us-west").await,
            Err(DirectoryError::Conflict(Some("us-east".into())))
        );
        assert_eq!(
            d.switch("bob", "us-east", "us-west").await,
            Ok(Switch::Switched)
        );
        // Resumed after a crash: already done.
        assert_eq!(
            d.switch("bob", "us-east", "us-west").await,
            Ok(Switch::AlreadyThere)
        );
        assert_eq!(d.home("bob").await.unwrap().unwrap().0, "us-west");
    }

    #[tokio::test]
    async fn any_user_id_is_a_valid_key() {
        let d = dir();
        for user in ["a b", "ü/ñ.*>", "x@example.com", &"z".repeat(500)] {
            assert_eq!(d.claim(user, "r").await.unwrap(), "r", "{user}");
        }
    }
}
