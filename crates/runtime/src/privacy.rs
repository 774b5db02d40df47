//! GDPR: `process-data-deletion` (right to be forgotten) and
//! `export-user-data`, as resumable jobs that fan out to every region and,
//! within a region, to every edge.
//!
//! Flow of a job (both kinds): the asking node writes a job record (a host
//! record, fsynced) and drives it: it asks each region's API
//! (`keel.<region>.api.userdata`, one node of the region answers) until
//! every region is done or failed for good, saving progress after each
//! answer, and resumes unfinished jobs at start. The answering node asks
//! every edge of its region (`keel.<region>.node.<edge>.userdata`, from
//! `regions.toml`), so an edge that is down keeps the region pending and the
//! job retrying until it is back.
//!
//! An erasure in a region: (1) every edge erases in place what it holds
//! about the user: cache entries under the components' declared key
//! prefixes (L1/L2/L3, everywhere), declared SQL rows, CRDT members and
//! map entries (and whole CRDTs named under the declared key prefixes, a
//! counter by cancelling this replica's part), then the store (preferences, activity, events rewritten as
//! erased, outbox entries, declared KV keys, directory copy) with a full
//! compaction, and drops the user from its views; (2) the region's data key
//! of the user is destroyed, which shreds every sealed payload about the
//! user left in the region's stream and its backups; (3) every edge forgets
//! its cached key and views again, and the key is destroyed once more (a
//! forwarder that raced step 1 may have created a new one). The asker then
//! erases the directory entry and audits the completion.
//!
//! An export in a region: the answering node refuses (for good) if the
//! user's residency does not allow the asking region to hold the data;
//! otherwise every edge returns what it holds, and the asker writes one
//! archive (`<data-dir>/exports/<id>.json|ndjson`): a manifest, then one
//! record per item, each naming region, edge and component.
//!
//! Invariants: every step is idempotent, so retries and a restart of any
//! node at any point are safe; a region is `completed` only after every
//! edge of it answered.

use bytes::Bytes;
use keel_bus::Bus;
use keel_config::PersonalData;
use keel_store::{
    HostRecords, Namespace, SqlStore, SqlValue, UserDataStore, UserRecords, UserTable,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Host-record table of the jobs this node started.
const JOBS_TABLE: &str = "user-data-jobs";
/// How long the asker waits for a region (which waits for its edges).
const REGION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a region waits for one of its edges.
const EDGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry backoff of a job whose regions are not all done.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest user id accepted.
const MAX_USER_BYTES: usize = 256;

fn region_subject(region: &str) -> String {
    format!("keel.{region}.api.userdata")
}

fn node_subject(region: &str, edge: &str) -> String {
    format!("keel.{region}.node.{edge}.userdata")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Erase,
    Export,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    Json,
    Ndjson,
}

impl ExportFormat {
    fn extension(self) -> &'static str {
        match self {
            ExportFormat::Json => "json",
            ExportFormat::Ndjson => "ndjson",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionProgress {
    pub state: JobState,
    pub detail: Option<String>,
}

/// A job, as recorded on the node that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub user: String,
    /// The component that asked (for the audit record).
    pub component: String,
    pub format: Option<ExportFormat>,
    pub created_ms: u64,
    pub regions: BTreeMap<String, RegionProgress>,
    /// Export: the archive's size once written.
    pub size_bytes: Option<u64>,
    /// Set once the job reached its end (and was audited).
    pub finished: bool,
}

impl Job {
    /// `completed` when every region completed, `failed` when every region
    /// is done and one failed, `pending` before any region answered,
    /// `running` otherwise.
    pub fn state(&self) -> JobState {
        let states: Vec<JobState> = self.regions.values().map(|p| p.state).collect();
        if states.iter().all(|s| *s == JobState::Completed) {
            if self.kind == JobKind::Export && self.size_bytes.is_none() {
                return JobState::Running;
            }
            return JobState::Completed;
        }
        if states
            .iter()
            .all(|s| matches!(s, JobState::Completed | JobState::Failed))
        {
            return JobState::Failed;
        }
        if states.iter().all(|s| *s == JobState::Pending) {
            return JobState::Pending;
        }
        JobState::Running
    }

    fn open_regions(&self) -> Vec<String> {
        self.regions
            .iter()
            .filter(|(_, p)| matches!(p.state, JobState::Pending | JobState::Running))
            .map(|(r, _)| r.clone())
            .collect()
    }
}

/// Why a job could not start or be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivacyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such job")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Asked of a region.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum RegionRequest {
    Erase {
        job: String,
        user: String,
    },
    Export {
        job: String,
        user: String,
        asker_region: String,
    },
}

/// A region's answer. `permanent` failures are not retried.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
enum RegionReply {
    Done { edges: Vec<EdgePart> },
    Failed { reason: String, permanent: bool },
}

/// Asked of one edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum NodeRequest {
    EraseLocal { user: String },
    Forget { user: String },
    ExportLocal { user: String },
}

/// One edge's answer: what it erased (counts) or exported (records).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EdgePart {
    edge: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    records: Vec<Value>,
    #[serde(default)]
    erased: Option<Value>,
}

/// Where one component keeps a user's data (from its `personal-data`).
#[derive(Debug, Clone)]
pub struct ComponentData {
    pub ns: Namespace,
    pub declared: PersonalData,
}

/// What the GDPR jobs of one node need.
pub struct Privacy {
    pub region: String,
    pub edge: String,
    /// Every region of the deployment (this node's only, without one).
    pub all_regions: Vec<String>,
    /// The edges of this node's region.
    pub region_edges: Vec<String>,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn UserDataStore>,
    pub sql: Arc<dyn SqlStore>,
    pub cache: keel_cache::TieredCache,
    pub sync: keel_sync::Sync,
    pub users: Arc<keel_coord::UserStateView>,
    pub keys: Arc<keel_coord::shred::UserKeys>,
    pub directory: Arc<keel_coord::directory::Directory>,
    pub residency: keel_coord::migration::ResidencyRules,
    pub records: Arc<dyn HostRecords>,
    pub audit: Arc<keel_ledger::audit::AuditTrail>,
    pub components: Vec<ComponentData>,
    pub exports_dir: PathBuf,
    pub rt: tokio::runtime::Handle,
    /// Jobs driven by a task right now.
    pub running: Mutex<HashSet<String>>,
}

impl Privacy {
    /// Serves the region's and this node's requests and resumes this
    /// node's unfinished jobs.
    pub fn start(self: &Arc<Self>) {
        let subject = region_subject(&self.region);
        self.rt
            .spawn(self.clone().serve(subject, Some("keel-api"), true));
        let subject = node_subject(&self.region, &self.edge);
        self.rt.spawn(self.clone().serve(subject, None, false));
        match self.records.host_records(JOBS_TABLE) {
            Ok(jobs) => {
                for (_, bytes) in jobs {
                    match serde_json::from_slice::<Job>(&bytes) {
                        Ok(job) if !job.finished => self.drive(job),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "unreadable user-data job record"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the user-data jobs"),
        }
    }

    /// Starts a job over `regions` (empty: every region). Returns its id.
    pub async fn begin(
        self: &Arc<Self>,
        kind: JobKind,
        user: &str,
        regions: Vec<String>,
        component: &str,
        format: Option<ExportFormat>,
    ) -> Result<String, PrivacyError> {
        if user.is_empty() || user.len() > MAX_USER_BYTES {
            return Err(PrivacyError::Invalid(format!(
                "a user id is 1 to {MAX_USER_BYTES} bytes"
            )));
        }
        let regions = if regions.is_empty() {
            self.all_regions.clone()
        } else {
            if let Some(r) = regions.iter().find(|r| !self.all_regions.contains(r)) {
                return Err(PrivacyError::Invalid(format!(
                    "unknown region {r:?}; the deployment has {}",
                    self.all_regions.join(", ")
                )));
            }
            regions
        };
        let mut random = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| PrivacyError::Unavailable("no randomness for a job id".into()))?;
        let prefix = match kind {
            JobKind::Erase => "erase",
            JobKind::Export => "export",
        };
        let job = Job {
            id: format!("{prefix}-{}-{}", self.edge, hex::encode(random)),
            kind,
            user: user.to_string(),
            component: component.to_string(),
            format,
            created_ms: now_ms(),
            regions: regions
                .into_iter()
                .map(|r| {
                    (
                        r,
                        RegionProgress {
                            state: JobState::Pending,
                            detail: None,
                        },
                    )
                })
                .collect(),
            size_bytes: None,
            finished: false,
        };
        self.save(&job)
            .await
            .map_err(|e| PrivacyError::Unavailable(format!("cannot record the job: {e}")))?;
        let id = job.id.clone();
        self.drive(job);
        Ok(id)
    }

    /// A job this node started.
    pub fn status(&self, id: &str) -> Result<Job, PrivacyError> {
        let bytes = self
            .records
            .host_record(JOBS_TABLE, id)
            .map_err(|e| PrivacyError::Unavailable(e.to_string()))?
            .ok_or(PrivacyError::NotFound)?;
        serde_json::from_slice(&bytes).map_err(|e| PrivacyError::Unavailable(e.to_string()))
    }

    /// Reads up to `max` bytes of a finished export's archive at `offset`.
    pub fn read_export(&self, id: &str, offset: u64, max: u32) -> Result<Vec<u8>, PrivacyError> {
        use std::io::{Read, Seek, SeekFrom};
        let job = self.status(id)?;
        let Some(format) = job.format.filter(|_| job.kind == JobKind::Export) else {
            return Err(PrivacyError::NotFound);
        };
        if job.state() != JobState::Completed {
            return Err(PrivacyError::Conflict(format!(
                "export {id} is {:?}, not completed",
                job.state()
            )));
        }
        let path = self.archive_path(id, format);
        let mut f = std::fs::File::open(&path)
            .map_err(|e| PrivacyError::Unavailable(format!("{}: {e}", path.display())))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| PrivacyError::Unavailable(e.to_string()))?;
        let mut out = Vec::new();
        f.take(u64::from(max.min(4 << 20)))
            .read_to_end(&mut out)
            .map_err(|e| PrivacyError::Unavailable(e.to_string()))?;
        Ok(out)
    }

    fn archive_path(&self, id: &str, format: ExportFormat) -> PathBuf {
        self.exports_dir
            .join(format!("{id}.{}", format.extension()))
    }

    fn part_path(&self, id: &str, region: &str) -> PathBuf {
        self.exports_dir.join(format!("{id}.{region}.part.json"))
    }

    async fn save(&self, job: &Job) -> keel_store::StoreResult<()> {
        let bytes = serde_json::to_vec(job).expect("a job serializes");
        self.records
            .put_host_record(JOBS_TABLE, job.id.clone(), bytes)
            .await
    }

    fn drive(self: &Arc<Self>, job: Job) {
        if !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone())
        {
            return;
        }
        let me = self.clone();
        self.rt.spawn(async move {
            let id = job.id.clone();
            me.run(job).await;
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    async fn run(&self, mut job: Job) {
        let mut backoff = RETRY_MIN;
        loop {
            let open = job.open_regions();
            if open.is_empty() {
                break;
            }
            let job_ref = &job;
            let asks = open.iter().map(|region| async move {
                let job = job_ref;
                let started = std::time::Instant::now();
                let answer = self.ask_region(job, region).await;
                tracing::debug!(job = %job.id, region, ok = answer.is_ok(), elapsed_ms = started.elapsed().as_millis() as u64, "user-data job: region answered");
                answer
            });
            let answers = futures::future::join_all(asks).await;
            for (region, answer) in open.iter().zip(answers) {
                let progress = match answer {
                    Ok(edges) => match self.keep_part(&job, region, edges) {
                        Ok(()) => RegionProgress {
                            state: JobState::Completed,
                            detail: None,
                        },
                        Err(e) => RegionProgress {
                            state: JobState::Running,
                            detail: Some(format!("cannot keep the region's part: {e}")),
                        },
                    },
                    Err((reason, true)) => RegionProgress {
                        state: JobState::Failed,
                        detail: Some(reason),
                    },
                    Err((reason, false)) => RegionProgress {
                        state: JobState::Running,
                        detail: Some(format!("retrying: {reason}")),
                    },
                };
                job.regions.insert(region.clone(), progress);
            }
            if let Err(e) = self.save(&job).await {
                tracing::error!(job = %job.id, error = %e, "cannot save a user-data job's progress");
            }
            if job.open_regions().is_empty() {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        // The end: directory entry (erase) or archive (export), audit.
        let started = std::time::Instant::now();
        loop {
            match self.finish(&mut job).await {
                Ok(()) => {
                    tracing::debug!(job = %job.id, elapsed_ms = started.elapsed().as_millis() as u64, "user-data job finished");
                    break;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "cannot finish a user-data job; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn finish(&self, job: &mut Job) -> Result<(), String> {
        let all_done = job.regions.values().all(|p| p.state == JobState::Completed);
        match job.kind {
            JobKind::Erase if all_done => {
                self.directory
                    .erase(&job.user)
                    .await
                    .map_err(|e| format!("directory: {e}"))?;
            }
            JobKind::Export if all_done && job.size_bytes.is_none() => {
                let size = self.write_archive(job)?;
                job.size_bytes = Some(size);
            }
            _ => {}
        }
        let outcome = match job.state() {
            JobState::Completed => "completed".to_string(),
            _ => format!(
                "failed: {}",
                job.regions
                    .iter()
                    .filter(|(_, p)| p.state == JobState::Failed)
                    .map(|(r, p)| format!("{r}: {}", p.detail.as_deref().unwrap_or("failed")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        self.audit
            .append(keel_ledger::audit::AuditEvent {
                actor: format!("{}@{}", job.component, self.edge),
                operation: match job.kind {
                    JobKind::Erase => "process-data-deletion",
                    JobKind::Export => "export-user-data",
                }
                .into(),
                subject: format!("user={} job={}", job.user, job.id),
                outcome,
                region: self.region.clone(),
                edge: self.edge.clone(),
            })
            .await
            .map_err(|e| format!("audit: {e}"))?;
        job.finished = true;
        self.save(job).await.map_err(|e| e.to_string())
    }

    /// One region's part of a job: `Err((reason, permanent))`.
    async fn ask_region(&self, job: &Job, region: &str) -> Result<Vec<EdgePart>, (String, bool)> {
        let request = match job.kind {
            JobKind::Erase => RegionRequest::Erase {
                job: job.id.clone(),
                user: job.user.clone(),
            },
            JobKind::Export => RegionRequest::Export {
                job: job.id.clone(),
                user: job.user.clone(),
                asker_region: self.region.clone(),
            },
        };
        let payload = Bytes::from(serde_json::to_vec(&request).expect("requests serialize"));
        let reply = self
            .bus
            .request(&region_subject(region), Vec::new(), payload, REGION_TIMEOUT)
            .await
            .map_err(|e| (format!("region {region}: {e}"), false))?;
        match serde_json::from_slice::<RegionReply>(&reply.payload) {
            Ok(RegionReply::Done { edges }) => Ok(edges),
            Ok(RegionReply::Failed { reason, permanent }) => Err((reason, permanent)),
            Err(e) => Err((format!("region {region}: malformed reply: {e}"), false)),
        }
    }

    /// Keeps an export's region part on disk until the archive is written
    /// (so a restart does not ask the region again).
    fn keep_part(&self, job: &Job, region: &str, edges: Vec<EdgePart>) -> Result<(), String> {
        if job.kind != JobKind::Export {
            return Ok(());
        }
        std::fs::create_dir_all(&self.exports_dir).map_err(|e| e.to_string())?;
        write_synced(
            &self.part_path(&job.id, region),
            &serde_json::to_vec(&edges).expect("parts serialize"),
        )
    }

    /// Writes the archive from the region parts; returns its size.
    fn write_archive(&self, job: &Job) -> Result<u64, String> {
        let format = job.format.unwrap_or(ExportFormat::Json);
        let mut records = Vec::new();
        let mut regions = Vec::new();
        let mut seen_shared_state = HashSet::new();
        for region in job.regions.keys() {
            let path = self.part_path(&job.id, region);
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let edges: Vec<EdgePart> =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut edge_names = Vec::new();
            for part in edges {
                edge_names.push(part.edge.clone());
                for mut r in part.records {
                    // Region- and global-scope CRDTs are on every edge: one
                    // copy per region (global: one in all).
                    if r["type"] == "state" && r["scope"] != "edge" {
                        let place = if r["scope"] == "global" {
                            String::new()
                        } else {
                            region.clone()
                        };
                        let id = (
                            place,
                            r["component"].to_string(),
                            r["kind"].to_string(),
                            r["name"].to_string(),
                        );
                        if !seen_shared_state.insert(id) {
                            continue;
                        }
                    }
                    r["region"] = json!(region);
                    r["edge"] = json!(part.edge);
                    records.push(r);
                }
            }
            regions.push(json!({ "region": region, "edges": edge_names }));
        }
        let manifest = json!({
            "type": "manifest",
            "job": job.id,
            "user": job.user,
            "format": format.extension(),
            "requested_at_ms": job.created_ms,
            "generated_at_ms": now_ms(),
            "regions": regions,
            "records": records.len(),
        });
        let mut out = Vec::new();
        match format {
            ExportFormat::Json => {
                serde_json::to_writer_pretty(
                    &mut out,
                    &json!({ "manifest": manifest, "records": records }),
                )
                .map_err(|e| e.to_string())?;
                out.push(b'\n');
            }
            ExportFormat::Ndjson => {
                for line in std::iter::once(&manifest).chain(records.iter()) {
                    serde_json::to_writer(&mut out, line).map_err(|e| e.to_string())?;
                    out.push(b'\n');
                }
            }
        }
        write_synced(&self.archive_path(&job.id, format), &out)?;
        for region in job.regions.keys() {
            let _ = std::fs::remove_file(self.part_path(&job.id, region));
        }
        Ok(out.len() as u64)
    }

    /// Serves region requests (`region`) or this node's (`!region`).
    async fn serve(self: Arc<Self>, subject: String, queue: Option<&'static str>, region: bool) {
        let mut backoff = Duration::from_millis(50);
        let mut sub = loop {
            match self.bus.subscribe(&subject, queue).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, subject, "cannot serve user-data requests; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            // Each request on its own task: an erasure waits for edges.
            let me = self.clone();
            self.rt.spawn(async move {
                let body = if region {
                    let answer = match serde_json::from_slice::<RegionRequest>(&msg.payload) {
                        Ok(r) => me.answer_region(r).await,
                        Err(e) => RegionReply::Failed {
                            reason: format!("malformed request: {e}"),
                            permanent: true,
                        },
                    };
                    serde_json::to_vec(&answer)
                } else {
                    let part = match serde_json::from_slice::<NodeRequest>(&msg.payload) {
                        Ok(r) => me.answer_node(r).await,
                        Err(e) => EdgePart {
                            edge: me.edge.clone(),
                            error: Some(format!("malformed request: {e}")),
                            records: Vec::new(),
                            erased: None,
                        },
                    };
                    serde_json::to_vec(&part)
                };
                let body = body.expect("replies serialize");
                if let Err(e) = me.bus.publish(&reply, Vec::new(), Bytes::from(body)).await {
                    tracing::debug!(error = %e, "cannot answer a user-data request");
                }
            });
        }
    }

    /// Asks every edge of the region; the parts, or why not all answered.
    async fn each_edge(&self, request: NodeRequest) -> Result<Vec<EdgePart>, String> {
        let payload = Bytes::from(serde_json::to_vec(&request).expect("requests serialize"));
        let asks = self.region_edges.iter().map(|edge| {
            let payload = payload.clone();
            async move {
                let part = self
                    .bus
                    .request(
                        &node_subject(&self.region, edge),
                        Vec::new(),
                        payload,
                        EDGE_TIMEOUT,
                    )
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        serde_json::from_slice::<EdgePart>(&m.payload).map_err(|e| e.to_string())
                    })
                    .and_then(|p| match &p.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(p),
                    });
                (edge, part)
            }
        });
        let mut parts = Vec::new();
        let mut failed = Vec::new();
        for (edge, part) in futures::future::join_all(asks).await {
            match part {
                Ok(p) => parts.push(p),
                Err(e) => failed.push(format!("{edge}: {e}")),
            }
        }
        if failed.is_empty() {
            Ok(parts)
        } else {
            Err(format!("edges not done: {}", failed.join("; ")))
        }
    }

    async fn answer_region(&self, request: RegionRequest) -> RegionReply {
        let transient = |reason: String| RegionReply::Failed {
            reason: format!("{}: {reason}", self.region),
            permanent: false,
        };
        match request {
            RegionRequest::Erase { user, job } => {
                let started = std::time::Instant::now();
                let step = |what: &str| {
                    tracing::debug!(
                        job,
                        what,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "erasure step done"
                    );
                };
                let parts = match self
                    .each_edge(NodeRequest::EraseLocal { user: user.clone() })
                    .await
                {
                    Ok(p) => p,
                    Err(e) => return transient(e),
                };
                step("edges erased");
                if let Err(e) = self.keys.destroy(&user).await {
                    return transient(format!("cannot destroy the data key: {e}"));
                }
                step("key destroyed");
                if let Err(e) = self
                    .each_edge(NodeRequest::Forget { user: user.clone() })
                    .await
                {
                    return transient(e);
                }
                step("edges forgot");
                if let Err(e) = self.keys.destroy(&user).await {
                    return transient(format!("cannot destroy the data key: {e}"));
                }
                step("key destroyed again");
                RegionReply::Done { edges: parts }
            }
            RegionRequest::Export {
                user, asker_region, ..
            } => {
                let home = match self.directory.home(&user).await {
                    Ok(h) => h.map(|(r, _)| r).unwrap_or_else(|| self.region.clone()),
                    Err(e) => return transient(format!("directory: {e}")),
                };
                if !self.residency.allows(&home, &asker_region) {
                    return RegionReply::Failed {
                        reason: format!(
                            "residency: the data of a user homed in {home} may not go to {asker_region}; export from a region of the user's zone"
                        ),
                        permanent: true,
                    };
                }
                match self.each_edge(NodeRequest::ExportLocal { user }).await {
                    Ok(edges) => RegionReply::Done { edges },
                    Err(e) => transient(e),
                }
            }
        }
    }

    async fn answer_node(&self, request: NodeRequest) -> EdgePart {
        let mut part = EdgePart {
            edge: self.edge.clone(),
            error: None,
            records: Vec::new(),
            erased: None,
        };
        let result = match request {
            NodeRequest::EraseLocal { user } => self.erase_local(&user).await.map(|counts| {
                part.erased = Some(counts);
            }),
            NodeRequest::Forget { user } => {
                self.keys.forget(&user);
                self.users.forget(&user);
                Ok(())
            }
            NodeRequest::ExportLocal { user } => self.export_local(&user).map(|records| {
                part.records = records;
            }),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "user-data request failed on this edge");
            part.error = Some(e);
        }
        part
    }

    fn key_prefixes(&self, user: &str) -> Vec<(Namespace, Vec<String>)> {
        self.components
            .iter()
            .filter(|c| !c.declared.keys.is_empty())
            .map(|c| (c.ns.clone(), c.declared.key_prefixes(user)))
            .collect()
    }

    fn tables(c: &ComponentData) -> Vec<UserTable> {
        c.declared
            .sql
            .iter()
            .map(|t| UserTable {
                table: t.table.clone(),
                column: t.column.clone(),
            })
            .collect()
    }

    /// Erases what this node holds about `user` (see the module docs).
    async fn erase_local(&self, user: &str) -> Result<Value, String> {
        let started = std::time::Instant::now();
        let step = |what: &str| {
            tracing::debug!(
                what,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "local erasure step done"
            );
        };
        let mut cache_prefixes = 0u64;
        let mut sql_rows = 0u64;
        for c in &self.components {
            for prefix in c.declared.key_prefixes(user) {
                self.cache
                    .invalidate(
                        &c.ns,
                        keel_cache::Target::Prefix(prefix),
                        keel_cache::Scope::Global,
                    )
                    .await
                    .map_err(|e| format!("cache of {}: {e}", c.ns))?;
                cache_prefixes += 1;
            }
            if !c.declared.sql.is_empty() {
                sql_rows += self
                    .sql
                    .erase_user_rows(&c.ns, Self::tables(c), user.to_string())
                    .await
                    .map_err(|e| format!("SQL of {}: {e}", c.ns))?;
            }
        }
        step("cache and SQL");
        let crdts = self
            .sync
            .erase_user(user, &self.key_prefixes(user))
            .await
            .map_err(|e| format!("CRDTs: {e}"))?;
        step("CRDTs");
        // Last: its compaction also drops the CRDT states saved above.
        let store = self
            .store
            .erase_user(user.to_string(), self.key_prefixes(user))
            .await
            .map_err(|e| format!("store: {e}"))?;
        step("store");
        self.keys.forget(user);
        self.users.forget(user);
        let exports = self.erase_exports(user).await?;
        Ok(json!({
            "exports": exports,
            "store": store,
            "sql_rows": sql_rows,
            "crdts": crdts,
            "cache_prefixes": cache_prefixes,
        }))
    }

    /// Deletes this node's export archives of `user` and their jobs (an
    /// archive is a copy of everything about the user).
    async fn erase_exports(&self, user: &str) -> Result<u64, String> {
        let jobs = self
            .records
            .host_records(JOBS_TABLE)
            .map_err(|e| format!("jobs: {e}"))?;
        let mut erased = 0;
        for (id, bytes) in jobs {
            let Ok(job) = serde_json::from_slice::<Job>(&bytes) else {
                continue;
            };
            if job.kind != JobKind::Export || job.user != user {
                continue;
            }
            for format in [ExportFormat::Json, ExportFormat::Ndjson] {
                remove_if_present(&self.archive_path(&id, format))?;
            }
            for region in job.regions.keys() {
                remove_if_present(&self.part_path(&id, region))?;
            }
            self.records
                .delete_host_record(JOBS_TABLE, id)
                .await
                .map_err(|e| format!("jobs: {e}"))?;
            erased += 1;
        }
        Ok(erased)
    }

    /// Everything this node holds about `user`, one record per item.
    fn export_local(&self, user: &str) -> Result<Vec<Value>, String> {
        let UserRecords {
            preferences,
            activities,
            events,
            kv,
            home_region,
        } = self
            .store
            .export_user(user, &self.key_prefixes(user))
            .map_err(|e| format!("store: {e}"))?;
        let mut out = Vec::new();
        if let Some(home) = home_region {
            out.push(json!({ "type": "home-region", "home_region": home }));
        }
        for (component, prefs) in preferences {
            for (name, value) in prefs {
                out.push(json!({ "type": "preference", "component": component, "name": name, "value": value }));
            }
        }
        for (component, a) in activities {
            out.push(json!({
                "type": "activity",
                "component": component,
                "kind": a.activity.kind,
                "attributes": a.activity.attributes,
                "at_ms": a.at.physical_ms,
            }));
        }
        for (component, e) in events {
            out.push(json!({
                "type": "event",
                "component": component,
                "id": e.id,
                "sequence": e.sequence,
                "kind": e.data.kind,
                "key": e.data.key,
                "content_type": e.data.content_type,
                "payload": bytes_json(&e.data.payload),
                "at_ms": e.at.physical_ms,
            }));
        }
        for (component, key, value) in kv {
            out.push(json!({ "type": "kv", "component": component, "key": key, "value": bytes_json(&value) }));
        }
        for c in &self.components {
            if c.declared.sql.is_empty() {
                continue;
            }
            let tables = Self::tables(c);
            let rows = self
                .sql
                .export_user_rows(&c.ns, &tables, user)
                .map_err(|e| format!("SQL of {}: {e}", c.ns))?;
            for (table, result) in rows {
                for row in result.rows {
                    let columns: serde_json::Map<String, Value> = result
                        .columns
                        .iter()
                        .cloned()
                        .zip(row.iter().map(sql_json))
                        .collect();
                    out.push(json!({ "type": "sql-row", "component": c.ns.as_str(), "table": table, "row": columns }));
                }
            }
        }
        for s in self
            .sync
            .export_user(user, &self.key_prefixes(user))
            .map_err(|e| format!("CRDTs: {e}"))?
        {
            let entry = match s.entry {
                keel_sync::UserCrdtValue::Member => json!({ "member": true }),
                keel_sync::UserCrdtValue::MapValue(v) => json!({ "value": bytes_json(&v) }),
                keel_sync::UserCrdtValue::Score(n) => json!({ "score": n }),
                keel_sync::UserCrdtValue::Count(n) => json!({ "count": n }),
                keel_sync::UserCrdtValue::Members(m) => json!({ "members": m }),
                keel_sync::UserCrdtValue::Value(v) => json!({ "value": bytes_json(&v) }),
                keel_sync::UserCrdtValue::Entries(e) => json!({
                    "entries": e.iter().map(|(k, v)| json!({ "key": k, "value": bytes_json(v) })).collect::<Vec<_>>()
                }),
                keel_sync::UserCrdtValue::Scores(s) => json!({
                    "scores": s.iter().map(|(m, n)| json!({ "member": m, "score": n })).collect::<Vec<_>>()
                }),
            };
            out.push(json!({
                "type": "state",
                "component": s.component,
                "scope": format!("{:?}", s.scope).to_lowercase(),
                "kind": format!("{:?}", s.kind).to_lowercase(),
                "name": s.name,
                "entry": entry,
            }));
        }
        Ok(out)
    }
}

/// Bytes as JSON: a string if they are UTF-8, else `{"base64": ...}`.
fn bytes_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => {
            use base64::Engine as _;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

fn sql_json(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => json!(i),
        SqlValue::Real(f) => json!(f),
        SqlValue::Text(s) => json!(s),
        SqlValue::Blob(b) => {
            use base64::Engine as _;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

fn remove_if_present(path: &std::path::Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically and durably.
fn write_synced(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
