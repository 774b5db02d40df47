//! The ledger on JetStream: one subject per account
//! (`keel.<region>.ledger.<component>.<hex account>`) in the region's
//! replicated ledger stream; a record is one message, its position the
//! message's stream sequence, and the compare-and-set is the expected last
//! subject sequence.

use crate::{AccountKey, LogError, RawRecord, RecordLog};
use async_trait::async_trait;
use bytes::Bytes;
use keel_bus::{Bus, BusError, StreamMessage, StreamSpec};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Records a catch-up reads one by one before it uses a consumer.
const FEW_RECORDS: usize = 8;

pub struct JetStreamLog {
    bus: Arc<dyn Bus>,
    stream: StreamSpec,
    /// `keel.<region>.ledger`
    prefix: String,
    ensured: AtomicBool,
}

impl JetStreamLog {
    /// `stream` must capture `<prefix>.>`.
    pub fn new(bus: Arc<dyn Bus>, stream: StreamSpec, prefix: String) -> JetStreamLog {
        JetStreamLog {
            bus,
            stream,
            prefix,
            ensured: AtomicBool::new(false),
        }
    }

    fn subject(&self, key: &AccountKey) -> String {
        // Hex keeps any account id a single subject token.
        format!(
            "{}.{}.{}",
            self.prefix,
            key.component,
            hex::encode(key.account.as_bytes())
        )
    }

    /// Creates (or checks) the stream once; again after it went missing.
    pub async fn ensure(&self) -> Result<(), LogError> {
        if self.ensured.load(Ordering::Acquire) {
            return Ok(());
        }
        self.bus.ensure_stream(&self.stream).await.map_err(|e| {
            LogError::Unavailable(format!("ledger stream {}: {e}", self.stream.name))
        })?;
        self.ensured.store(true, Ordering::Release);
        Ok(())
    }

    fn error(&self, e: BusError) -> LogError {
        match e {
            BusError::Conflict(_) => LogError::Conflict,
            BusError::NotFound(m) => {
                self.ensured.store(false, Ordering::Release);
                LogError::Unavailable(m)
            }
            BusError::Unavailable(m) => LogError::Unavailable(m),
            BusError::NoResponders(m) => LogError::Unavailable(format!("no responders on {m}")),
            BusError::Timeout(d) => LogError::Uncertain(format!("no answer within {d:?}")),
            BusError::Invalid(m) | BusError::Internal(m) => LogError::Internal(m),
        }
    }

    fn record(m: StreamMessage) -> RawRecord {
        RawRecord {
            position: m.sequence,
            bytes: m.payload.to_vec(),
        }
    }
}

#[async_trait]
impl RecordLog for JetStreamLog {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    async fn read_after(
        &self,
        account: &AccountKey,
        after: u64,
        max: usize,
    ) -> Result<Vec<RawRecord>, LogError> {
        self.ensure().await?;
        let subject = self.subject(account);
        let mut out = Vec::new();
        let mut from = after + 1;
        // A catch-up after a lost compare-and-set usually misses a record or
        // two: read those one request each, without creating a consumer
        // (servers cap consumers, and creating one costs more than reading
        // a record). A longer read (a cold account) pages through one.
        while out.len() < max.min(FEW_RECORDS) {
            match self
                .bus
                .stream_next(&self.stream.name, &subject, from)
                .await
                .map_err(|e| self.error(e))?
            {
                Some(m) => {
                    from = m.sequence + 1;
                    out.push(Self::record(m));
                }
                None => return Ok(out),
            }
        }
        if out.len() < max {
            let msgs = self
                .bus
                .stream_read(&self.stream.name, &subject, from, max - out.len())
                .await
                .map_err(|e| self.error(e))?;
            out.extend(msgs.into_iter().map(Self::record));
        }
        Ok(out)
    }

    async fn last(&self, account: &AccountKey) -> Result<Option<RawRecord>, LogError> {
        self.ensure().await?;
        Ok(self
            .bus
            .stream_last(&self.stream.name, &self.subject(account))
            .await
            .map_err(|e| self.error(e))?
            .map(Self::record))
    }

    async fn scan(
        &self,
        component: &str,
        after: u64,
        max: usize,
    ) -> Result<Vec<(String, RawRecord)>, LogError> {
        self.ensure().await?;
        let filter = format!("{}.{component}.*", self.prefix);
        let msgs = self
            .bus
            .stream_read(&self.stream.name, &filter, after + 1, max)
            .await
            .map_err(|e| self.error(e))?;
        msgs.into_iter()
            .map(|m| {
                let account = m
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        LogError::Internal(format!(
                            "ledger subject {:?} names no account",
                            m.subject
                        ))
                    })?;
                Ok((account, Self::record(m)))
            })
            .collect()
    }

    async fn append(
        &self,
        account: &AccountKey,
        expected: u64,
        bytes: Vec<u8>,
        id: &str,
    ) -> Result<u64, LogError> {
        self.ensure().await?;
        let ack = self
            .bus
            .stream_append_if(
                &self.subject(account),
                Vec::new(),
                Bytes::from(bytes),
                // A record id is never reused: a duplicate ack means this
                // very record was stored (by an earlier try of this publish).
                Some(id),
                expected,
            )
            .await
            .map_err(|e| match self.error(e) {
                // A lost connection may have delivered the publish.
                LogError::Unavailable(m) => LogError::Uncertain(m),
                other => other,
            })?;
        Ok(ack.sequence)
    }
}
