//! The audit trail: an append-only hash chain of {actor, operation, subject,
//! outcome, time} records, one key of a [`RecordLog`] (on NATS the global
//! audit stream, on the embedded node a SQLite table).
//!
//! Each record carries its chain sequence, the previous record's hash and
//! its own: HMAC-SHA256 over its canonical encoding, keyed by a key derived
//! from the deployment secret (plain SHA-256 without one). Appends are
//! compare-and-set on the chain's last record, so writers on any node of
//! any region extend one chain without forks. Editing, deleting, reordering
//! or inserting a record breaks the chain at that record; without the key,
//! a record cannot be forged either.

use crate::{AccountKey, LogError, RawRecord, RecordLog};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The log key of the chain.
pub fn audit_key() -> AccountKey {
    // `$` cannot start a component name: no guest account can be this key.
    AccountKey::new("$keel", "audit")
}

/// The `prev` of the first record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const RECORD_VERSION: u8 = 1;

/// What happened: one audited operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Who asked: `<component>@<edge>` for a guest call.
    pub actor: String,
    /// e.g. `search-global-users`, `process-data-deletion`.
    pub operation: String,
    /// What it was about (a user, a period, a query), never a payload.
    pub subject: String,
    /// `ok` or `error: <case>`.
    pub outcome: String,
    pub region: String,
    pub edge: String,
}

/// A record of the chain as stored (JSON, fields in this order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u8,
    /// Position in the chain: 1, 2, 3, ...
    pub seq: u64,
    /// Hash of the previous record (zeros for the first).
    pub prev: String,
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of this record with `hash` empty.
    pub hash: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hash(key: Option<&[u8]>, r: &AuditRecord) -> String {
    let body = serde_json::to_vec(&AuditRecord {
        hash: String::new(),
        ..r.clone()
    })
    .expect("an audit record always serializes");
    match key {
        Some(k) => {
            let mut mac = Hmac::<Sha256>::new_from_slice(k).expect("HMAC takes keys of any length");
            mac.update(&body);
            hex::encode(mac.finalize().into_bytes())
        }
        None => hex::encode(Sha256::digest(&body)),
    }
}

/// The chain head this node last saw: (log position, seq, hash).
type Head = (u64, u64, String);

/// Appends to the chain.
pub struct AuditTrail {
    log: Arc<dyn RecordLog>,
    key: Option<Vec<u8>>,
    head: tokio::sync::Mutex<Option<Head>>,
    writer: String,
    incarnation: u64,
    next_id: AtomicU64,
}

impl AuditTrail {
    /// `key`: the chain's HMAC key (from the deployment secret), if any.
    pub fn new(log: Arc<dyn RecordLog>, key: Option<Vec<u8>>, writer: &str) -> AuditTrail {
        AuditTrail {
            log,
            key,
            head: tokio::sync::Mutex::new(None),
            writer: writer.to_owned(),
            incarnation: now_ms(),
            next_id: AtomicU64::new(1),
        }
    }

    async fn read_head(&self) -> Result<Head, LogError> {
        Ok(match self.log.last(&audit_key()).await? {
            None => (0, 0, GENESIS.to_owned()),
            Some(raw) => {
                let r = decode(&raw).map_err(|why| {
                    LogError::Internal(format!(
                        "the audit chain's last record (at {}) is unreadable: {why}",
                        raw.position
                    ))
                })?;
                (raw.position, r.seq, r.hash)
            }
        })
    }

    /// Appends `event` as the chain's next record; its chain sequence.
    pub async fn append(&self, event: AuditEvent) -> Result<u64, LogError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut head = self.head.lock().await;
        loop {
            let (position, seq, prev) = match head.take() {
                Some(h) => h,
                None => self.read_head().await?,
            };
            let mut record = AuditRecord {
                v: RECORD_VERSION,
                seq: seq + 1,
                prev,
                at_ms: now_ms(),
                event: event.clone(),
                hash: String::new(),
            };
            record.hash = hash(self.key.as_deref(), &record);
            let id = format!(
                "audit.{}.{}.{}",
                self.writer,
                self.incarnation,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            );
            let bytes = serde_json::to_vec(&record).expect("an audit record always serializes");
            match self.log.append(&audit_key(), position, bytes, &id).await {
                Ok(p) => {
                    *head = Some((p, record.seq, record.hash));
                    return Ok(record.seq);
                }
                // Another writer extended the chain (or we may have):
                // read the head again and check.
                Err(LogError::Conflict) | Err(LogError::Uncertain(_)) => {
                    let h = self.read_head().await?;
                    if h.2 == record.hash {
                        *head = Some(h);
                        return Ok(record.seq);
                    }
                    *head = Some(h);
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(LogError::Unavailable(
                    "the audit chain is contended: no append won in 10 s".into(),
                ));
            }
        }
    }
}

fn decode(raw: &RawRecord) -> Result<AuditRecord, String> {
    let r: AuditRecord = serde_json::from_slice(&raw.bytes).map_err(|e| e.to_string())?;
    if r.v != RECORD_VERSION {
        return Err(format!("record version {} is not supported", r.v));
    }
    Ok(r)
}

/// A chain that checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// Hash of the last record (zeros for an empty chain).
    pub head: String,
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record at log position {position} (chain seq {seq}): {reason}")]
pub struct Broken {
    pub position: u64,
    /// The chain sequence the record claims (or should have).
    pub seq: u64,
    pub reason: String,
}

/// Why verification did not finish.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Broken(Broken),
    #[error("cannot read the audit chain: {0}")]
    Log(LogError),
}

/// Reads the whole chain and checks every link: decodable, gapless
/// sequence, `prev` = the previous record's hash, and its own hash.
pub async fn verify(log: &dyn RecordLog, key: Option<&[u8]>) -> Result<Verified, VerifyError> {
    let mut position = 0;
    let mut seq = 0u64;
    let mut prev = GENESIS.to_owned();
    loop {
        let page = log
            .read_after(&audit_key(), position, 512)
            .await
            .map_err(VerifyError::Log)?;
        let n = page.len();
        for raw in page {
            let broken = |reason: String| {
                VerifyError::Broken(Broken {
                    position: raw.position,
                    seq: seq + 1,
                    reason,
                })
            };
            let r = decode(&raw).map_err(|why| broken(format!("unreadable: {why}")))?;
            if r.seq != seq + 1 {
                return Err(broken(format!(
                    "claims chain seq {}; records are missing or out of order",
                    r.seq
                )));
            }
            if r.prev != prev {
                return Err(broken(
                    "its prev hash is not the previous record's hash: a record before it was removed or replaced".into(),
                ));
            }
            if hash(key, &r) != r.hash {
                return Err(broken(
                    "its hash does not match its contents: the record was altered (or forged without the chain key)".into(),
                ));
            }
            position = raw.position;
            seq = r.seq;
            prev = r.hash;
        }
        if n < 512 {
            return Ok(Verified {
                records: seq,
                head: prev,
            });
        }
    }
}
