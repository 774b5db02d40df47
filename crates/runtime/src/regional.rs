//! The regional tier of one node: views built from the region's stream
//! (`KEEL_<REGION>_EVENTS`), and the components' subscriptions to it
//! (regional) and to the global events' stream (`KEEL_GLOBAL_EVENTS`).
//!
//! Invariants:
//! - **One source.** Everything regional is read from the region's stream,
//!   which every edge's outbox forwards to (the embedded node too, to the
//!   stream on its own bus). Views and subscriptions are feeds
//!   (`keel_coord::start_feed`): stream order, once per write.
//! - **Components stay apart.** Views key users and metrics by component;
//!   a subscription delivers only events its own component recorded.
//! - **At least once, in order.** A subscription is a feed whose handler
//!   calls the component's `subscriber.on-updates` (`on-global-events`) in
//!   a fresh instance with the matching events one stream read brought (up
//!   to [`DELIVERY_BATCH`]); an error or trap is retried (with backoff,
//!   same batch) before anything after it. Its cursor (the last delivered
//!   stream sequence) is persisted after each batch on a durable bus, so a
//!   restart resumes after it.

use crate::LoadedComponent;
use async_trait::async_trait;
use keel_bus::{Bus, StreamSpec};
use keel_coord::envelope::CloudEvent;
use keel_coord::shred::UserKeys;
use keel_coord::{
    BatchLimit, FeedHandle, FeedHandler, FeedOptions, MetricsView, UserStateView, start_feed,
};
use keel_store::{GLOBAL_EVENT_RETENTION, HostRecords, HostWrite};
use keel_telemetry::DeliveryMetrics;
use keel_world::bindings::keel::platform::types;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// Subscriptions one component may hold (of each kind).
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// Entries in one filter list, and bytes of one filter string.
const MAX_FILTER_ENTRIES: usize = 64;
const MAX_FILTER_BYTES: usize = 256;

/// Which events a subscription delivers (WIT `update-filter`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateFilter {
    pub kinds: Vec<String>,
    pub key_prefix: Option<String>,
    pub edges: Vec<String>,
}

impl UpdateFilter {
    /// Sorted, deduplicated lists, so equal filters compare equal.
    pub fn normalized(mut self) -> UpdateFilter {
        self.kinds.sort();
        self.kinds.dedup();
        self.edges.sort();
        self.edges.dedup();
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        for (what, list) in [("kinds", &self.kinds), ("edges", &self.edges)] {
            if list.len() > MAX_FILTER_ENTRIES {
                return Err(format!(
                    "{what}: {} entries; at most {MAX_FILTER_ENTRIES}",
                    list.len()
                ));
            }
            if let Some(s) = list
                .iter()
                .find(|s| s.is_empty() || s.len() > MAX_FILTER_BYTES)
            {
                return Err(format!(
                    "{what}: {s:?} must be 1 to {MAX_FILTER_BYTES} bytes"
                ));
            }
        }
        if self
            .key_prefix
            .as_ref()
            .is_some_and(|p| p.len() > MAX_FILTER_BYTES)
        {
            return Err(format!("key-prefix: longer than {MAX_FILTER_BYTES} bytes"));
        }
        Ok(())
    }

    /// Whether `event`, recorded by `component`, is delivered. Only
    /// application events (`record-local-event`, `sync-to-region`) are:
    /// activity and metric samples feed the views.
    pub fn matches(&self, component: &str, event: &CloudEvent) -> bool {
        event.keelsequence.is_some()
            && event.component() == component
            && (self.kinds.is_empty() || self.kinds.contains(&event.event_type))
            && self.key_prefix.as_ref().is_none_or(|p| {
                event
                    .subject
                    .as_deref()
                    .is_some_and(|s| s.starts_with(p.as_str()))
            })
            && (self.edges.is_empty() || self.edges.iter().any(|e| e == event.edge()))
    }
}

/// Which global events a subscription delivers: exact types, or prefixes
/// written `"user.>"` (`">"` alone: every type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalFilter {
    pub types: Vec<String>,
}

impl GlobalFilter {
    pub fn normalized(mut self) -> GlobalFilter {
        self.types.sort();
        self.types.dedup();
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.types.is_empty() {
            return Err("name at least one event type (or \">\" for all)".into());
        }
        if self.types.len() > MAX_FILTER_ENTRIES {
            return Err(format!(
                "{} event types; at most {MAX_FILTER_ENTRIES}",
                self.types.len()
            ));
        }
        for t in &self.types {
            let exact = t.strip_suffix(".>").unwrap_or(t);
            if t != ">" && !crate::host::is_event_type(exact) {
                return Err(format!(
                    "{t:?} is not an event type (dot-separated tokens of [A-Za-z0-9_-]) or a prefix pattern like \"user.>\""
                ));
            }
        }
        Ok(())
    }

    /// Whether the global `event`, published by `component`, is delivered.
    pub fn matches(&self, component: &str, event: &CloudEvent) -> bool {
        event.component() == component
            && self.types.iter().any(|t| {
                t == ">"
                    || *t == event.event_type
                    || t.strip_suffix('>')
                        .is_some_and(|p| p.ends_with('.') && event.event_type.starts_with(p))
            })
    }
}

/// A subscription's filter; its case says which stream it follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Filter {
    Regional(UpdateFilter),
    Global(GlobalFilter),
}

/// The two kinds of subscriptions (separate ids, tables and streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Regional,
    Global,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Regional => 0,
            Kind::Global => 1,
        }
    }
}

impl Filter {
    fn kind(&self) -> Kind {
        match self {
            Filter::Regional(_) => Kind::Regional,
            Filter::Global(_) => Kind::Global,
        }
    }

    fn normalized(self) -> Filter {
        match self {
            Filter::Regional(f) => Filter::Regional(f.normalized()),
            Filter::Global(f) => Filter::Global(f.normalized()),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Filter::Regional(f) => f.validate(),
            Filter::Global(f) => f.validate(),
        }
    }

    fn matches(&self, component: &str, event: &CloudEvent) -> bool {
        match self {
            Filter::Regional(f) => f.matches(component, event),
            Filter::Global(f) => f.matches(component, event),
        }
    }
}

/// The stream one kind of subscription follows, and where its records go.
struct Source {
    bus: Arc<dyn Bus>,
    stream: String,
    subject_filter: String,
    /// Host-record table: `<component>/<id:020>` → [`SubscriptionRecord`].
    table: &'static str,
    /// Host-record table of the last id given out per component: ids are
    /// never reused, so a handler's dedup on (id, sequence) stays sound.
    ids_table: &'static str,
    /// Cursors survive a restart only where the stream does.
    durable_cursors: bool,
    /// Opens sealed payloads (the region's stream; global events are
    /// never sealed).
    keys: Option<Arc<UserKeys>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubscriptionRecord {
    filter: Filter,
    /// Last stream sequence delivered (0: none).
    cursor: u64,
}

fn record_key(component: &str, id: u64) -> String {
    format!("{component}/{id:020}")
}

fn parse_record_key(key: &str) -> Option<(&str, u64)> {
    let (component, id) = key.rsplit_once('/')?;
    Some((component, id.parse().ok()?))
}

/// Why a subscription call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeError {
    NotFound,
    Invalid(String),
    Limit(String),
    Unavailable(String),
}

impl From<SubscribeError> for types::Error {
    fn from(e: SubscribeError) -> types::Error {
        match e {
            SubscribeError::NotFound => types::Error::NotFound,
            SubscribeError::Invalid(m) => types::Error::Invalid(m),
            SubscribeError::Limit(m) => types::Error::Limit(m),
            SubscribeError::Unavailable(m) => types::Error::Unavailable(m),
        }
    }
}

struct Active {
    filter: Filter,
    /// Cleared (under the lock) by unsubscribe before the record is
    /// deleted, so a delivery in flight cannot write the record back.
    alive: Arc<Mutex<bool>>,
    _feed: FeedHandle,
}

/// The node's regional tier. Lives in `Services`.
pub struct RegionalTier {
    pub region: String,
    /// [regional, global] (see [`Kind::index`]).
    sources: [Source; 2],
    records: Arc<dyn HostRecords>,
    deliveries: DeliveryMetrics,
    rt: tokio::runtime::Handle,
    pub users: Arc<UserStateView>,
    pub metrics: Arc<MetricsView>,
    /// Application events per component and type, as samples of 1.
    pub events: Arc<MetricsView>,
    /// Billing usage events (`reconcile-billing`).
    pub usage: Arc<keel_coord::UsageView>,
    pub views_feed: Arc<FeedHandle>,
    /// Running subscriptions by (kind, component, id). A tokio mutex:
    /// subscribe and unsubscribe hold it across the record's fsync, so ids
    /// and records never race.
    active: tokio::sync::Mutex<BTreeMap<(Kind, String, u64), Active>>,
}

/// Applies every event of the region to the views.
struct Views {
    users: Arc<UserStateView>,
    metrics: Arc<MetricsView>,
    events: Arc<MetricsView>,
    usage: Arc<keel_coord::UsageView>,
}

#[async_trait]
impl FeedHandler for Views {
    async fn apply(&self, _seq: u64, event: &CloudEvent) -> Result<(), String> {
        self.users.record(event);
        self.metrics.record(event);
        self.usage.record(event);
        if event.keelsequence.is_some()
            && let Some(at) = event.hlc()
        {
            // Application events, counted per type (the "events" report).
            self.events
                .record_sample(event.component(), &event.event_type, at.physical_ms, 1.0);
        }
        Ok(())
    }
}

impl RegionalTier {
    /// Starts the views' feed over the region's stream (`regional`: its
    /// bus and spec).
    pub fn start(
        region: &str,
        regional: (Arc<dyn Bus>, &StreamSpec),
        keys: Arc<UserKeys>,
        global: (Arc<dyn Bus>, &StreamSpec),
        records: Arc<dyn HostRecords>,
        deliveries: DeliveryMetrics,
        rt: &tokio::runtime::Handle,
    ) -> RegionalTier {
        let users = Arc::new(UserStateView::default());
        let metrics = Arc::new(MetricsView::default());
        let events = Arc::new(MetricsView::default());
        let usage = Arc::new(keel_coord::UsageView::default());
        let (bus, stream) = regional;
        let filter = format!("keel.{region}.edge.*.events");
        let views_feed = Arc::new(start_feed(
            bus.clone(),
            FeedOptions::new(&stream.name, &filter),
            Some(keys.clone()),
            Arc::new(Views {
                users: users.clone(),
                metrics: metrics.clone(),
                events: events.clone(),
                usage: usage.clone(),
            }),
            rt,
        ));
        let (global_bus, global_stream) = global;
        RegionalTier {
            region: region.to_string(),
            sources: [
                Source {
                    durable_cursors: bus.kind() != "local",
                    bus,
                    stream: stream.name.clone(),
                    subject_filter: filter,
                    table: "regional-subscriptions",
                    ids_table: "regional-subscription-ids",
                    keys: Some(keys),
                },
                Source {
                    durable_cursors: global_bus.kind() != "local",
                    bus: global_bus,
                    stream: global_stream.name.clone(),
                    subject_filter: format!("{}.>", keel_coord::GLOBAL_EVENTS_PREFIX),
                    table: "global-subscriptions",
                    ids_table: "global-subscription-ids",
                    keys: None,
                },
            ],
            records,
            deliveries,
            rt: rt.clone(),
            users,
            metrics,
            events,
            usage,
            views_feed,
            active: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Subscribes `component`; an equal filter returns the existing id.
    pub async fn subscribe(
        &self,
        component: &Arc<LoadedComponent>,
        filter: Filter,
    ) -> Result<u64, SubscribeError> {
        if !component.exports_subscriber() {
            return Err(SubscribeError::Invalid(format!(
                "component {:?} does not export keel:platform/subscriber; deliveries go to its handlers",
                component.name()
            )));
        }
        let filter = filter.normalized();
        filter.validate().map_err(SubscribeError::Invalid)?;
        let kind = filter.kind();
        let source = &self.sources[kind.index()];
        let name = component.name().to_string();
        let mut active = self.active.lock().await;
        let mine = || active.range((kind, name.clone(), 0)..=(kind, name.clone(), u64::MAX));
        if let Some(((_, _, id), _)) = mine().find(|(_, a)| a.filter == filter) {
            return Ok(*id);
        }
        if mine().count() >= MAX_SUBSCRIPTIONS {
            return Err(SubscribeError::Limit(format!(
                "component {name:?} already has {MAX_SUBSCRIPTIONS} {kind:?} subscriptions"
            )));
        }
        let unavailable = |e: keel_store::StoreError| SubscribeError::Unavailable(e.to_string());
        let last_given = self
            .records
            .host_record(source.ids_table, &name)
            .map_err(unavailable)?
            .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let id = mine()
            .map(|((_, _, id), _)| *id)
            .max()
            .unwrap_or(0)
            .max(last_given)
            + 1;
        self.records
            .put_host_record(source.ids_table, name.clone(), id.to_string().into_bytes())
            .await
            .map_err(unavailable)?;
        let record = SubscriptionRecord {
            filter: filter.clone(),
            cursor: 0,
        };
        self.records
            .put_host_record(source.table, record_key(&name, id), encode(&record))
            .await
            .map_err(unavailable)?;
        let a = self.start_delivery(component, id, record);
        active.insert((kind, name, id), a);
        Ok(id)
    }

    /// Ends a subscription of `component`.
    pub async fn unsubscribe(
        &self,
        kind: Kind,
        component: &str,
        id: u64,
    ) -> Result<(), SubscribeError> {
        let mut active = self.active.lock().await;
        let a = active
            .remove(&(kind, component.to_string(), id))
            .ok_or(SubscribeError::NotFound)?;
        let delete = {
            let mut alive = lock(&a.alive);
            *alive = false;
            self.records
                .delete_host_record(self.sources[kind.index()].table, record_key(component, id))
        };
        drop(a);
        delete
            .await
            .map_err(|e| SubscribeError::Unavailable(e.to_string()))
    }

    /// Restarts the persisted subscriptions of `components` (at load).
    /// Records of components that are gone, or no longer export the
    /// handler, are kept (the component may come back) and logged.
    pub async fn restore(&self, components: &[Arc<LoadedComponent>]) {
        let mut active = self.active.lock().await;
        for source in &self.sources {
            let records = match self.records.host_records(source.table) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, table = source.table, "cannot read subscriptions");
                    continue;
                }
            };
            for (key, value) in records {
                let parsed = parse_record_key(&key)
                    .zip(serde_json::from_slice::<SubscriptionRecord>(&value).ok());
                let Some(((name, id), mut record)) = parsed else {
                    tracing::error!(
                        key,
                        table = source.table,
                        "corrupt subscription record; skipped"
                    );
                    continue;
                };
                let Some(c) = components
                    .iter()
                    .find(|c| c.name() == name && c.exports_subscriber())
                else {
                    tracing::warn!(
                        component = name,
                        id,
                        table = source.table,
                        "subscription of a component that is not loaded (or no longer exports subscriber); kept, not delivered"
                    );
                    continue;
                };
                if !source.durable_cursors {
                    // The in-process stream starts empty after a restart.
                    record.cursor = 0;
                }
                let kind = record.filter.kind();
                let a = self.start_delivery(c, id, record);
                active.insert((kind, name.to_string(), id), a);
            }
        }
    }

    fn start_delivery(
        &self,
        component: &Arc<LoadedComponent>,
        id: u64,
        record: SubscriptionRecord,
    ) -> Active {
        let source = &self.sources[record.filter.kind().index()];
        let alive = Arc::new(Mutex::new(true));
        let delivery = Delivery {
            component: Arc::downgrade(component),
            name: component.name().to_string(),
            id,
            filter: record.filter.clone(),
            alive: alive.clone(),
            records: source
                .durable_cursors
                .then(|| (self.records.clone(), source.table)),
            metrics: self.deliveries.clone(),
        };
        let mut opts = FeedOptions::new(&source.stream, &source.subject_filter);
        opts.start_after = record.cursor;
        Active {
            filter: record.filter,
            alive,
            _feed: start_feed(
                source.bus.clone(),
                opts,
                source.keys.clone(),
                Arc::new(delivery),
                &self.rt,
            ),
        }
    }
}

fn encode(r: &SubscriptionRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("a record of strings and integers serializes")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One subscription's feed handler.
struct Delivery {
    component: Weak<LoadedComponent>,
    name: String,
    id: u64,
    filter: Filter,
    alive: Arc<Mutex<bool>>,
    /// Where the cursor is persisted (`None`: not durable).
    records: Option<(Arc<dyn HostRecords>, &'static str)>,
    metrics: DeliveryMetrics,
}

impl Delivery {
    /// Counts a delivered batch whose newest event is `newest`.
    fn delivered(&self, events: usize, newest: &CloudEvent) {
        self.metrics.events.inc_by(events as u64);
        self.metrics.batches.inc();
        if let Some(at) = newest.hlc() {
            let lag = now_ms().saturating_sub(at.physical_ms);
            self.metrics
                .lag_ms
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
    }
}

/// Expiring table of the global event ids delivered to each global
/// subscription (`<component>/<subscription>/<event id>`): an id published
/// again, on another node and after JetStream's duplicate window, is not
/// delivered twice while the stream keeps the event.
const GLOBAL_DELIVERED: &str = "global-delivered";

/// Most events per `subscriber` call, and most stream payload bytes (so a
/// batch fits a guest's memory; one larger event still goes alone). Stated
/// in `wit/exports.wit`.
const DELIVERY_BATCH: BatchLimit = BatchLimit {
    events: 64,
    bytes: 1 << 20,
};

#[async_trait]
impl FeedHandler for Delivery {
    async fn apply(&self, stream_sequence: u64, event: &CloudEvent) -> Result<(), String> {
        self.apply_batch(&[(stream_sequence, event.clone())]).await
    }

    fn batch_limit(&self) -> BatchLimit {
        DELIVERY_BATCH
    }

    /// One `subscriber` call with the batch's matching events (global
    /// events already delivered to this subscription left out), then one
    /// write of the cursor and the delivered ids.
    async fn apply_batch(&self, events: &[(u64, CloudEvent)]) -> Result<(), String> {
        let matching: Vec<&(u64, CloudEvent)> = events
            .iter()
            .filter(|(_, e)| self.filter.matches(&self.name, e))
            .collect();
        let Some((last_sequence, _)) = matching.last() else {
            return Ok(());
        };
        let component = self
            .component
            .upgrade()
            .ok_or_else(|| "component unloaded".to_string())?;
        let mut delivered_keys = Vec::new();
        match &self.filter {
            Filter::Regional(_) => {
                let updates = matching.iter().map(|(s, e)| update_of(*s, e)).collect();
                component.deliver_updates(self.id, updates).await?;
                self.delivered(matching.len(), &matching[matching.len() - 1].1);
            }
            Filter::Global(_) => {
                let mut unseen = Vec::with_capacity(matching.len());
                let mut newest = None;
                for (_, e) in &matching {
                    let key = format!("{}/{}/{}", self.name, self.id, e.id);
                    let seen = match &self.records {
                        Some((records, _)) => records
                            .expiring_host_record(GLOBAL_DELIVERED, &key)
                            .map_err(|e| format!("reading delivered ids: {e}"))?
                            .is_some(),
                        None => false,
                    };
                    // The same id twice in one batch is delivered once.
                    if !seen && !delivered_keys.contains(&key) {
                        unseen.push(global_event_of(e));
                        delivered_keys.push(key);
                        newest = Some(e);
                    }
                }
                if let Some(newest) = newest {
                    let n = unseen.len();
                    component.deliver_global_events(self.id, unseen).await?;
                    self.delivered(n, newest);
                }
            }
        }
        let Some((records, table)) = &self.records else {
            return Ok(());
        };
        let save = {
            let alive = lock(&self.alive);
            if !*alive {
                return Ok(());
            }
            let record = SubscriptionRecord {
                filter: self.filter.clone(),
                cursor: *last_sequence,
            };
            let mut writes = vec![HostWrite::Put {
                table,
                key: record_key(&self.name, self.id),
                value: encode(&record),
            }];
            let expires_at_ms = now_ms().saturating_add(GLOBAL_EVENT_RETENTION.as_millis() as u64);
            writes.extend(
                delivered_keys
                    .into_iter()
                    .map(|key| HostWrite::PutExpiring {
                        table: GLOBAL_DELIVERED,
                        key,
                        value: Vec::new(),
                        expires_at_ms,
                    }),
            );
            records.write_host_records(writes)
        };
        // Delivered: a failed save only means a redelivery after a restart.
        if let Err(e) = save.await {
            tracing::warn!(component = %self.name, id = self.id, error = %e, "cannot save a subscription cursor");
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The WIT `received-global-event` of one global stream message.
fn global_event_of(e: &CloudEvent) -> types::ReceivedGlobalEvent {
    let at = e.hlc().unwrap_or(keel_core::Hlc {
        physical_ms: 0,
        logical: 0,
        node: e.edge().to_string(),
    });
    types::ReceivedGlobalEvent {
        event: types::GlobalEvent {
            id: e.id.clone(),
            event_type: e.event_type.clone(),
            subject: e.subject.clone(),
            content_type: e.datacontenttype.clone(),
            data: e.data(),
            user: e.keeluser.clone(),
        },
        source: e.source.clone(),
        origin_region: e.region().to_string(),
        published_at: crate::host::hlc(at),
    }
}

/// The WIT `update` of one stream message.
fn update_of(stream_sequence: u64, e: &CloudEvent) -> types::Update {
    let at = e.hlc().unwrap_or(keel_core::Hlc {
        physical_ms: 0,
        logical: 0,
        node: e.edge().to_string(),
    });
    types::Update {
        sequence: stream_sequence,
        event: types::RecordedEvent {
            id: e.id.clone(),
            sequence: e.keelsequence.unwrap_or_default(),
            origin: e.edge().to_string(),
            region: e.region().to_string(),
            at: crate::host::hlc(at),
            data: types::EventData {
                kind: e.event_type.clone(),
                key: e.subject.clone().unwrap_or_default(),
                payload: e.data(),
                content_type: e.datacontenttype.clone(),
                user: e.keeluser.clone(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip() {
        let k = record_key("chat-app", 7);
        assert_eq!(k, "chat-app/00000000000000000007");
        assert_eq!(parse_record_key(&k), Some(("chat-app", 7)));
        assert_eq!(parse_record_key("nope"), None);
    }

    #[test]
    fn filters_normalize_and_validate() {
        let f = UpdateFilter {
            kinds: vec!["b".into(), "a".into(), "b".into()],
            key_prefix: None,
            edges: vec![],
        }
        .normalized();
        assert_eq!(f.kinds, ["a", "b"]);
        assert!(f.validate().is_ok());
        let bad = UpdateFilter {
            kinds: vec![String::new()],
            key_prefix: None,
            edges: vec![],
        };
        assert!(bad.validate().unwrap_err().starts_with("kinds: "));
        let long = UpdateFilter {
            kinds: vec![],
            key_prefix: Some("x".repeat(300)),
            edges: vec![],
        };
        assert!(long.validate().is_err());
        let many = UpdateFilter {
            kinds: vec![],
            key_prefix: None,
            edges: (0..65).map(|i| i.to_string()).collect(),
        };
        assert!(
            many.validate()
                .unwrap_err()
                .starts_with("edges: 65 entries")
        );
    }
}
