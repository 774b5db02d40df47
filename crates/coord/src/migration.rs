//! User migration between regions (`migrate-user-region`): copy the user's
//! regional state to the target region, flip the directory entry by
//! compare-and-set, tombstone the state left in the source region.
//!
//! Invariants:
//! - **Resumable.** The job is a host record whose phase is persisted
//!   (fsynced) *after* the phase's effect; a node that crashes anywhere
//!   resumes the job at the phase it recorded and redoes that phase's
//!   effect, which is idempotent: the copy and the tombstone are stream
//!   messages with fixed ids (`Nats-Msg-Id` inside the window, the feeds'
//!   `Dedup` on `(keelorigin, keeloutboxseq)` beyond it), and the directory
//!   flip is a compare-and-set that recognises "already moved".
//! - **One home.** Only the directory says where a user lives, and it
//!   changes by compare-and-set from the source region only.
//! - **Residency first.** A move across residency zones is refused before
//!   anything is written, unless `allow_cross_zone_migration`.
//! - **Runs in the source region.** The node that starts a migration must
//!   be in `from-region`: it holds the region's view of the user (the copy)
//!   and writes to the region's stream (the tombstone). The target region
//!   is reached through its API subject (`keel.<to>.api.migrate-in`, a
//!   service every zone imports), answered by any of its nodes.

use crate::directory::{Directory, DirectoryError, Switch};
use crate::envelope::{self, CONTENT_TYPE, CloudEvent};
use crate::shred::UserKeys;
use crate::views::{TOMBSTONE_TYPE, UserStateView};
use bytes::Bytes;
use keel_bus::{Bus, BusError, Headers};
use keel_core::Hlc;
use keel_store::{Activity, ActivityRecord, HostRecords, OutboxEntry};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Host-record table of migration jobs, by id.
pub const MIGRATIONS_TABLE: &str = "migrations";
/// How long the copy waits for the target region to answer.
const COPY_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The API subject a region answers migration copies on.
pub fn migrate_in_subject(region: &str) -> String {
    format!("keel.{region}.api.migrate-in")
}

/// Where a migration is (WIT `migration-phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Pending,
    Copying,
    SwitchingHome,
    TombstoningSource,
    Completed,
    Failed,
}

impl Phase {
    /// The kebab-case name (as in WIT), e.g. for the test crash hook.
    pub fn parse(s: &str) -> Option<Phase> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// One migration job, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub id: String,
    pub user: String,
    pub from: String,
    pub to: String,
    pub phase: Phase,
    pub detail: Option<String>,
}

/// Why a migration could not start. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationError {
    Invalid(String),
    Residency(String),
    Conflict(String),
    Unavailable(String),
}

/// Which regions exist, which residency zone each is in, and which hold
/// users whose data may go anywhere.
#[derive(Debug, Clone, Default)]
pub struct ResidencyRules {
    /// Region → zone (`keel_config::RegionsConfig::zone_of`).
    pub zones: HashMap<String, String>,
    /// Regions of residency class `global`: their users' data may be placed
    /// in any region.
    pub unrestricted: HashSet<String>,
    pub allow_cross_zone_migration: bool,
}

impl ResidencyRules {
    /// May personal data of a user homed in `home` be placed in `target`?
    /// (`keel_config::RegionsConfig::residency_allows`.) Unknown regions:
    /// no.
    pub fn allows(&self, home: &str, target: &str) -> bool {
        match (self.zones.get(home), self.zones.get(target)) {
            (Some(h), Some(t)) => self.unrestricted.contains(home) || h == t,
            _ => false,
        }
    }

    /// May a user homed in `home` publish personal data to every region?
    pub fn allows_everywhere(&self, home: &str) -> bool {
        self.zones.keys().all(|t| self.allows(home, t))
    }
}

/// What the migrations of one node need.
pub struct MigrationOptions {
    pub region: String,
    pub edge: String,
    pub rules: ResidencyRules,
    /// Test hook: abort the process right after this phase's effect,
    /// before its completion is recorded (`KEEL_TEST_CRASH_MIGRATION_AFTER`).
    pub crash_after: Option<Phase>,
}

/// What a migration service works with.
pub struct MigrationServices {
    pub bus: Arc<dyn Bus>,
    /// The target region's user keys (copies are sealed like activity).
    pub keys: Arc<UserKeys>,
    pub directory: Arc<Directory>,
    pub users: Arc<UserStateView>,
    pub users_feed: Arc<crate::FeedHandle>,
    pub records: Arc<dyn HostRecords>,
}

/// The migration service of one node.
pub struct Migrations {
    opts: MigrationOptions,
    bus: Arc<dyn Bus>,
    /// The target region's user keys (copies are sealed like activity).
    keys: Arc<UserKeys>,
    directory: Arc<Directory>,
    users: Arc<UserStateView>,
    /// The feed that builds `users`: a copy waits until it caught up, so a
    /// job resumed right after a restart does not copy a half-built view.
    users_feed: Arc<crate::FeedHandle>,
    records: Arc<dyn HostRecords>,
    rt: tokio::runtime::Handle,
    running: Mutex<HashSet<String>>,
    next: AtomicU64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CopyRequest {
    migration: String,
    user: String,
    from: String,
    to: String,
    states: Vec<CopiedState>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CopiedState {
    component: String,
    edge: String,
    hlc: String,
    kind: String,
    attributes: Vec<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CopyReply {
    error: Option<String>,
}

fn migration_origin(id: &str) -> String {
    format!("migration.{id}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Migrations {
    pub fn new(
        opts: MigrationOptions,
        services: MigrationServices,
        rt: &tokio::runtime::Handle,
    ) -> Arc<Migrations> {
        let MigrationServices {
            bus,
            keys,
            directory,
            users,
            users_feed,
            records,
        } = services;
        Arc::new(Migrations {
            opts,
            bus,
            keys,
            directory,
            users,
            users_feed,
            records,
            rt: rt.clone(),
            running: Mutex::new(HashSet::new()),
            next: AtomicU64::new(0),
        })
    }

    /// Answers copies into this node's region and resumes unfinished jobs.
    pub fn start(self: &Arc<Self>) {
        let this = self.clone();
        self.rt.spawn(async move { this.serve_copies().await });
        match self.records.host_records(MIGRATIONS_TABLE) {
            Ok(all) => {
                for (key, value) in all {
                    match serde_json::from_slice::<Migration>(&value) {
                        Ok(m) if !matches!(m.phase, Phase::Completed | Phase::Failed) => {
                            tracing::info!(id = %m.id, phase = ?m.phase, "resuming migration");
                            self.drive(m);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(key, error = %e, "corrupt migration record"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read migration jobs"),
        }
    }

    /// Starts moving `user` from `from` to `to`; returns the job id.
    pub async fn begin(
        self: &Arc<Self>,
        user: &str,
        from: &str,
        to: &str,
    ) -> Result<String, MigrationError> {
        let rules = &self.opts.rules;
        let zone = |r: &str| {
            rules.zones.get(r).ok_or_else(|| {
                let mut known: Vec<&str> = rules.zones.keys().map(String::as_str).collect();
                known.sort_unstable();
                MigrationError::Invalid(format!(
                    "unknown region {r:?}; regions: {}",
                    known.join(", ")
                ))
            })
        };
        if user.is_empty() {
            return Err(MigrationError::Invalid("user must not be empty".into()));
        }
        let (from_zone, to_zone) = (zone(from)?, zone(to)?);
        if from == to {
            return Err(MigrationError::Invalid(format!(
                "the user is already homed in {from}; from-region and to-region must differ"
            )));
        }
        if !rules.allows(from, to) && !rules.allow_cross_zone_migration {
            return Err(MigrationError::Residency(format!(
                "moving a user from {from} (residency zone {from_zone}) to {to} (zone {to_zone}) crosses residency zones; regions.toml [coordination] allow_cross_zone_migration is false"
            )));
        }
        if from != self.opts.region {
            return Err(MigrationError::Invalid(format!(
                "a migration runs in its source region: start it on an edge of {from} (this edge is in {})",
                self.opts.region
            )));
        }
        let unavailable = |e: BusError| MigrationError::Unavailable(e.to_string());
        let home = match self.directory.home(user).await.map_err(unavailable)? {
            Some((home, _)) => home,
            // A user the directory has not seen lives where it was seen.
            None => self
                .directory
                .claim(user, from)
                .await
                .map_err(unavailable)?,
        };
        if home != from {
            return Err(MigrationError::Conflict(format!(
                "the user's home region is {home}, not {from}"
            )));
        }
        let id = format!(
            "{}-{:x}-{}",
            self.opts.edge,
            now_ms(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let m = Migration {
            id: id.clone(),
            user: user.into(),
            from: from.into(),
            to: to.into(),
            phase: Phase::Pending,
            detail: None,
        };
        self.save(&m)
            .await
            .map_err(|e| MigrationError::Unavailable(e.to_string()))?;
        self.drive(m);
        Ok(id)
    }

    /// The job's current record; `None` for an id this node never started.
    pub fn status(&self, id: &str) -> Result<Option<Migration>, String> {
        match self.records.host_record(MIGRATIONS_TABLE, id) {
            Ok(Some(v)) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| format!("corrupt migration record: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn save(&self, m: &Migration) -> keel_store::StoreResult<()> {
        let value = serde_json::to_vec(m).expect("a record of strings serializes");
        self.records
            .put_host_record(MIGRATIONS_TABLE, m.id.clone(), value)
            .await
    }

    fn drive(self: &Arc<Self>, m: Migration) {
        if !lock(&self.running).insert(m.id.clone()) {
            return;
        }
        let this = self.clone();
        self.rt.spawn(async move {
            let id = m.id.clone();
            this.run(m).await;
            lock(&this.running).remove(&id);
        });
    }

    async fn run(&self, mut m: Migration) {
        let mut backoff = RETRY_MIN;
        loop {
            let step = match m.phase {
                Phase::Pending => Ok(Phase::Copying),
                Phase::Copying => self.copy(&m).await.map(|()| Phase::SwitchingHome),
                Phase::SwitchingHome => {
                    match self.directory.switch(&m.user, &m.from, &m.to).await {
                        Ok(Switch::Switched | Switch::AlreadyThere) => Ok(Phase::TombstoningSource),
                        Err(DirectoryError::Conflict(home)) => {
                            m.detail = Some(format!(
                                "the directory changed under the migration: {}",
                                DirectoryError::Conflict(home)
                            ));
                            Ok(Phase::Failed)
                        }
                        Err(DirectoryError::Bus(e)) => Err(e.to_string()),
                    }
                }
                Phase::TombstoningSource => self.tombstone(&m).await.map(|()| Phase::Completed),
                Phase::Completed | Phase::Failed => return,
            };
            match step {
                Ok(next) => {
                    if self.opts.crash_after == Some(m.phase) {
                        tracing::error!(id = %m.id, phase = ?m.phase, "test hook: aborting after the phase's effect");
                        std::process::abort();
                    }
                    let previous = m.phase;
                    m.phase = next;
                    if next != Phase::Failed {
                        m.detail = None;
                    }
                    // Persisted after the effect: a crash before this line
                    // redoes the (idempotent) effect.
                    while let Err(e) = self.save(&m).await {
                        tracing::warn!(id = %m.id, error = %e, "cannot record migration progress; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                    tracing::info!(id = %m.id, from = ?previous, to = ?next, "migration phase");
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    tracing::warn!(id = %m.id, phase = ?m.phase, error = %e, "migration step failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Sends the user's state in this region to the target region.
    async fn copy(&self, m: &Migration) -> Result<(), String> {
        if !self.users_feed.caught_up() {
            return Err("the region's user view is still catching up".into());
        }
        let states = self
            .users
            .snapshot(&m.user)
            .into_iter()
            .map(|(component, s)| CopiedState {
                component,
                edge: s.last_seen_edge,
                hlc: envelope::format_hlc(&s.last_seen),
                kind: s.last_activity.kind,
                attributes: s.last_activity.attributes,
            })
            .collect();
        let req = CopyRequest {
            migration: m.id.clone(),
            user: m.user.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            states,
        };
        let payload = Bytes::from(serde_json::to_vec(&req).map_err(|e| e.to_string())?);
        let reply = self
            .bus
            .request(
                &migrate_in_subject(&m.to),
                Headers::new(),
                payload,
                COPY_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        let reply: CopyReply =
            serde_json::from_slice(&reply.payload).map_err(|e| format!("bad copy reply: {e}"))?;
        match reply.error {
            None => Ok(()),
            Some(e) => Err(format!("{} refused the copy: {e}", m.to)),
        }
    }

    /// Marks the user's state in this region as moved away.
    async fn tombstone(&self, m: &Migration) -> Result<(), String> {
        let origin = format!("{}.tombstone", migration_origin(&m.id));
        let at = Hlc {
            physical_ms: now_ms(),
            logical: 0,
            node: self.opts.edge.clone(),
        };
        let event = CloudEvent {
            specversion: "1.0".into(),
            id: envelope::outbox_msg_id(&origin, 1),
            source: format!("keel://{}/{}/keel", m.from, self.opts.edge),
            event_type: TOMBSTONE_TYPE.into(),
            subject: Some(m.user.clone()),
            time: envelope::rfc3339_ms(at.physical_ms),
            datacontenttype: None,
            data_base64: None,
            traceparent: None,
            keelorigin: origin.clone(),
            keeloutboxseq: 1,
            keelsequence: None,
            keelhlc: envelope::format_hlc(&at),
            keeluser: Some(m.user.clone()),
            keelkey: None,
        };
        self.append(&m.from, &event).await
    }

    async fn append(&self, region: &str, event: &CloudEvent) -> Result<(), String> {
        let headers = vec![("content-type".into(), CONTENT_TYPE.into())];
        self.bus
            .stream_append(
                &crate::edge_events_subject(region, &self.opts.edge),
                headers,
                Bytes::from(event.to_json()),
                Some(&event.id),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Answers `keel.<region>.api.migrate-in`: appends the copied states to
    /// this region's stream as activity events with fixed ids.
    async fn serve_copies(self: Arc<Self>) {
        let subject = migrate_in_subject(&self.opts.region);
        let mut backoff = RETRY_MIN;
        let mut sub = loop {
            match self.bus.subscribe(&subject, Some("keel-migrate-in")).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to migration copies; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        };
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let error = match serde_json::from_slice::<CopyRequest>(&msg.payload) {
                Ok(req) if req.to == self.opts.region => self.apply_copy(&req).await.err(),
                Ok(req) => Some(format!("this is {}, not {}", self.opts.region, req.to)),
                Err(e) => Some(format!("malformed copy request: {e}")),
            };
            let body = serde_json::to_vec(&CopyReply { error }).expect("serializes");
            if let Err(e) = self
                .bus
                .publish(&reply, Headers::new(), Bytes::from(body))
                .await
            {
                tracing::warn!(error = %e, "cannot answer a migration copy");
            }
        }
    }

    async fn apply_copy(&self, req: &CopyRequest) -> Result<(), String> {
        let origin = migration_origin(&req.migration);
        for (i, s) in req.states.iter().enumerate() {
            let at = envelope::parse_hlc(&s.hlc).ok_or("bad hlc in copy")?;
            let entry = OutboxEntry::Activity {
                component: s.component.clone(),
                user: req.user.clone(),
                record: ActivityRecord {
                    activity: Activity {
                        kind: s.kind.clone(),
                        attributes: s.attributes.clone(),
                    },
                    edge: s.edge.clone(),
                    at,
                },
            };
            let mut event =
                envelope::outbox_event(&self.opts.region, &origin, i as u64 + 1, &entry);
            // Personal like any activity: sealed with the user's key here.
            let key = self
                .keys
                .for_writing(&req.user)
                .await
                .map_err(|e| e.to_string())?;
            event.seal(&key);
            self.append(&self.opts.region, &event).await?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residency_rules_follow_the_zones() {
        let rules = ResidencyRules {
            zones: [
                ("us-east", "us"),
                ("us-west", "us"),
                ("eu", "gdpr"),
                ("anywhere", "anywhere"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
            unrestricted: ["anywhere".to_string()].into(),
            allow_cross_zone_migration: false,
        };
        assert!(rules.allows("us-east", "us-west"));
        assert!(!rules.allows("us-east", "eu"));
        assert!(!rules.allows("eu", "us-west"));
        assert!(rules.allows("anywhere", "eu"));
        assert!(!rules.allows("us-east", "mars"));
        assert!(rules.allows_everywhere("anywhere"));
        assert!(!rules.allows_everywhere("us-east"));
    }

    #[test]
    fn phases_use_the_wit_names() {
        assert_eq!(Phase::parse("switching-home"), Some(Phase::SwitchingHome));
        assert_eq!(Phase::parse("copying"), Some(Phase::Copying));
        assert_eq!(Phase::parse("nope"), None);
    }
}
