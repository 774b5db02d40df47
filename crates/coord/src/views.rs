//! Regional views: in-memory state built from a region's stream by a
//! [`Feed`](crate::start_feed), each a [`FeedHandler`] with query methods.
//!
//! - [`UserStateView`]: per user, the last activity (by HLC, not by arrival)
//!   and the edges the user was active on recently;
//! - [`MetricsView`]: `keel.metric` samples aggregated into time buckets.
//!
//! Both are pure state behind a `Mutex` (no I/O, and no clock reads except
//! [`UserStateView::get`], which has the pure [`UserStateView::get_at`]).
//! An event of the view's type whose data cannot be used (malformed JSON, no
//! HLC, no user, a non-finite metric value) is counted in `ignored()` and
//! acknowledged: returning `Err` would make the feed retry it forever.

use crate::envelope::{ACTIVITY_TYPE, CloudEvent};
use crate::feed::FeedHandler;
use async_trait::async_trait;
use keel_core::Hlc;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// CloudEvents `type` of a metric sample; data is [`metric_event_data`].
pub const METRIC_TYPE: &str = "keel.metric";

/// CloudEvents `type` of a user's tombstone in a region (a migration moved
/// the user away): the region's views forget the user's state written up to
/// the tombstone's HLC. Subject and `keeluser` are the user.
pub const TOMBSTONE_TYPE: &str = "keel.user.tombstone";

/// Default bucket width of [`MetricsView`].
pub const DEFAULT_RESOLUTION_MS: u64 = 60_000;

/// Default window of [`UserStateView::get`]'s `online_edges`.
pub const DEFAULT_ONLINE_WINDOW_MS: u64 = 5 * 60_000;

/// The data of a [`METRIC_TYPE`] event: `{"metric": "...", "value": f64}`.
/// The sample's time is the event's HLC (physical milliseconds), so it is
/// not repeated here. A NaN or infinite `value` is encoded as `null` (JSON
/// has no such numbers) and [`MetricsView`] ignores it.
pub fn metric_event_data(metric_type: &str, value: f64) -> Vec<u8> {
    serde_json::json!({ "metric": metric_type, "value": value })
        .to_string()
        .into_bytes()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent (plain inserts and
    // compares), so a panic elsewhere does not make it unusable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// User state

/// What the user did (the WIT `activity-data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastActivity {
    pub kind: String,
    pub attributes: Vec<(String, String)>,
}

/// The activity attribute that names a user for `search-global-users`.
pub const DISPLAY_NAME_ATTRIBUTE: &str = "display-name";

/// What [`UserStateView::search`] looks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSearch {
    /// Case-insensitive prefix of the user id or display name.
    pub name_prefix: Option<String>,
    pub active_since_ms: Option<u64>,
    pub limit: usize,
}

/// One user [`UserStateView::search`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserHit {
    pub user: String,
    pub display_name: Option<String>,
    pub last_seen_ms: u64,
}

/// A user's state in the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserState {
    /// HLC of the latest activity (the maximum seen, whatever the arrival
    /// order).
    pub last_seen: Hlc,
    pub last_seen_edge: String,
    pub last_activity: LastActivity,
    /// Edges with activity within the window, most recent first.
    pub online_edges: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ActivityData {
    kind: String,
    #[serde(default)]
    attributes: Vec<(String, String)>,
    #[serde(default)]
    edge: Option<String>,
}

#[derive(Debug)]
struct UserEntry {
    last_seen: Hlc,
    last_seen_edge: String,
    last_activity: LastActivity,
    /// The [`DISPLAY_NAME_ATTRIBUTE`] of the latest activity that had one.
    display_name: Option<(Hlc, String)>,
    /// Latest activity per edge.
    edges: HashMap<String, Hlc>,
}

/// Per user: the last activity and recent edges, from [`ACTIVITY_TYPE`]
/// events (subject and `keeluser` = the user; data `{"kind", "attributes",
/// "edge"}`; `keelhlc` = when).
///
/// An edge is *online* at `now_ms` for a window `w` if its latest activity
/// is less than `w` old: `physical_ms + w > now_ms` (activity stamped ahead
/// of `now_ms`, from a clock slightly ahead, counts as online).
#[derive(Debug)]
pub struct UserStateView {
    online_window_ms: u64,
    users: Mutex<HashMap<String, UserEntry>>,
    ignored: AtomicU64,
}

impl Default for UserStateView {
    fn default() -> Self {
        UserStateView::new(DEFAULT_ONLINE_WINDOW_MS)
    }
}

impl UserStateView {
    /// A view whose [`get`](Self::get) reports edges active within
    /// `online_window_ms`.
    pub fn new(online_window_ms: u64) -> UserStateView {
        UserStateView {
            online_window_ms,
            users: Mutex::new(HashMap::new()),
            ignored: AtomicU64::new(0),
        }
    }

    /// Folds one event in; `true` if it was a usable activity event. Other
    /// event types are left alone (`false`); unusable activity events are
    /// counted in [`ignored`](Self::ignored). Idempotent: applying an event
    /// again changes nothing.
    pub fn record(&self, event: &CloudEvent) -> bool {
        if event.event_type == TOMBSTONE_TYPE {
            return self.tombstone(event);
        }
        if event.event_type != ACTIVITY_TYPE {
            return false;
        }
        let parsed = (|| {
            let user = event.keeluser.clone().or_else(|| event.subject.clone())?;
            let at = event.hlc()?;
            let data: ActivityData = serde_json::from_slice(&event.data()).ok()?;
            Some((user, at, data))
        })();
        let Some((user, at, data)) = parsed else {
            self.ignored.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let user = scoped(event.component(), &user);
        let edge = data.edge.unwrap_or_else(|| event.edge().to_string());
        let display_name = data
            .attributes
            .iter()
            .find(|(k, _)| k == DISPLAY_NAME_ATTRIBUTE)
            .map(|(_, v)| (at.clone(), v.clone()));
        let activity = LastActivity {
            kind: data.kind,
            attributes: data.attributes,
        };
        let mut users = lock(&self.users);
        match users.get_mut(&user) {
            None => {
                users.insert(
                    user,
                    UserEntry {
                        last_seen: at.clone(),
                        last_seen_edge: edge.clone(),
                        last_activity: activity,
                        display_name,
                        edges: HashMap::from([(edge, at)]),
                    },
                );
            }
            Some(entry) => {
                if at > entry.last_seen {
                    entry.last_seen = at.clone();
                    entry.last_seen_edge = edge.clone();
                    entry.last_activity = activity;
                }
                if let Some((named_at, name)) = display_name
                    && entry
                        .display_name
                        .as_ref()
                        .is_none_or(|(t, _)| named_at > *t)
                {
                    entry.display_name = Some((named_at, name));
                }
                match entry.edges.get_mut(&edge) {
                    Some(latest) if *latest >= at => {}
                    Some(latest) => *latest = at,
                    None => {
                        entry.edges.insert(edge, at);
                    }
                }
            }
        }
        true
    }

    /// The user's state, with `online_edges` for the view's window at the
    /// current wall-clock time.
    pub fn get(&self, component: &str, user: &str) -> Option<UserState> {
        self.get_at(component, user, wall_clock_ms())
    }

    /// [`get`](Self::get) at `now_ms`.
    pub fn get_at(&self, component: &str, user: &str, now_ms: u64) -> Option<UserState> {
        let users = lock(&self.users);
        let entry = users.get(&scoped(component, user))?;
        Some(UserState {
            last_seen: entry.last_seen.clone(),
            last_seen_edge: entry.last_seen_edge.clone(),
            last_activity: entry.last_activity.clone(),
            online_edges: online(entry, now_ms, self.online_window_ms),
        })
    }

    /// Edges where `user` was active less than `window_ms` before `now_ms`,
    /// most recent first (empty for an unknown user).
    pub fn online_edges(
        &self,
        component: &str,
        user: &str,
        now_ms: u64,
        window_ms: u64,
    ) -> Vec<String> {
        lock(&self.users)
            .get(&scoped(component, user))
            .map(|e| online(e, now_ms, window_ms))
            .unwrap_or_default()
    }

    /// Forgets the user's state (every component's) seen at or before the
    /// tombstone's HLC; later activity survives.
    fn tombstone(&self, event: &CloudEvent) -> bool {
        let (Some(user), Some(at)) = (event.keeluser.as_deref(), event.hlc()) else {
            self.ignored.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        lock(&self.users).retain(|k, e| {
            let of_user = k.split_once('\0').is_some_and(|(_, u)| u == user);
            !(of_user && e.last_seen <= at)
        });
        true
    }

    /// Drops the user from the view in every component (an erasure; the
    /// events that built it no longer open, so a rebuilt view agrees).
    pub fn forget(&self, user: &str) -> usize {
        let mut users = lock(&self.users);
        let before = users.len();
        users.retain(|k, _| k.split_once('\0').is_none_or(|(_, u)| u != user));
        before - users.len()
    }

    /// The user's state in every component that has one, by component
    /// name (what a migration copies).
    pub fn snapshot(&self, user: &str) -> Vec<(String, UserState)> {
        let now_ms = wall_clock_ms();
        let mut out: Vec<(String, UserState)> = lock(&self.users)
            .iter()
            .filter_map(|(k, e)| {
                let (component, u) = k.split_once('\0')?;
                (u == user).then(|| {
                    (
                        component.to_string(),
                        UserState {
                            last_seen: e.last_seen.clone(),
                            last_seen_edge: e.last_seen_edge.clone(),
                            last_activity: e.last_activity.clone(),
                            online_edges: online(e, now_ms, self.online_window_ms),
                        },
                    )
                })
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A component's users matching `search`, most recently seen first
    /// (then by id), at most `search.limit`.
    pub fn search(&self, component: &str, search: &UserSearch) -> Vec<UserHit> {
        let prefix = search.name_prefix.as_deref().map(str::to_lowercase);
        let mut hits: Vec<UserHit> = lock(&self.users)
            .iter()
            .filter_map(|(k, e)| {
                let (c, user) = k.split_once('\0')?;
                if c != component {
                    return None;
                }
                if search
                    .active_since_ms
                    .is_some_and(|since| e.last_seen.physical_ms < since)
                {
                    return None;
                }
                let name = e.display_name.as_ref().map(|(_, n)| n.as_str());
                if let Some(p) = &prefix {
                    let matches = |s: &str| s.to_lowercase().starts_with(p.as_str());
                    if !matches(user) && !name.is_some_and(matches) {
                        return None;
                    }
                }
                Some(UserHit {
                    user: user.to_string(),
                    display_name: name.map(str::to_string),
                    last_seen_ms: e.last_seen.physical_ms,
                })
            })
            .collect();
        hits.sort_by(|a, b| {
            b.last_seen_ms
                .cmp(&a.last_seen_ms)
                .then_with(|| a.user.cmp(&b.user))
        });
        hits.truncate(search.limit);
        hits
    }

    /// Users known.
    pub fn users(&self) -> usize {
        lock(&self.users).len()
    }

    /// Activity events that could not be used.
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }
}

fn online(entry: &UserEntry, now_ms: u64, window_ms: u64) -> Vec<String> {
    let mut edges: Vec<(&String, &Hlc)> = entry
        .edges
        .iter()
        .filter(|(_, at)| at.physical_ms.saturating_add(window_ms) > now_ms)
        .collect();
    edges.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    edges.into_iter().map(|(e, _)| e.clone()).collect()
}

/// Views keep each component's users and metrics apart (a component sees
/// only what it wrote): keys are `<component>\0<name>`.
fn scoped(component: &str, name: &str) -> String {
    format!("{component}\0{name}")
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[async_trait]
impl FeedHandler for UserStateView {
    async fn apply(&self, _stream_sequence: u64, event: &CloudEvent) -> Result<(), String> {
        self.record(event);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// One bucket of a metric: samples with time in `[start_ms, start_ms +
/// resolution)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    pub start_ms: u64,
    pub count: u64,
    /// Plain `f64` sum: finite samples can still add up to ±infinity.
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Deserialize)]
struct MetricData {
    metric: String,
    /// `null` for a non-finite value (see [`metric_event_data`]).
    value: Option<f64>,
}

/// [`METRIC_TYPE`] samples per metric name, in buckets of `resolution_ms`
/// aligned to the Unix epoch. Non-finite values (NaN, ±infinity, JSON
/// `null`) are refused: [`record_sample`](Self::record_sample) returns
/// `false` and events carrying them count in [`ignored`](Self::ignored).
/// Not idempotent (a count): the feed's dedup is what applies each sample
/// once.
#[derive(Debug)]
pub struct MetricsView {
    resolution_ms: u64,
    series: Mutex<HashMap<String, BTreeMap<u64, MetricPoint>>>,
    ignored: AtomicU64,
}

impl Default for MetricsView {
    fn default() -> Self {
        MetricsView::new(DEFAULT_RESOLUTION_MS)
    }
}

impl MetricsView {
    /// Buckets of `resolution_ms` (at least 1).
    pub fn new(resolution_ms: u64) -> MetricsView {
        MetricsView {
            resolution_ms: resolution_ms.max(1),
            series: Mutex::new(HashMap::new()),
            ignored: AtomicU64::new(0),
        }
    }

    pub fn resolution_ms(&self) -> u64 {
        self.resolution_ms
    }

    /// Folds one event in; `true` if it was a usable metric sample. Other
    /// event types are left alone; unusable metric events are counted in
    /// [`ignored`](Self::ignored).
    pub fn record(&self, event: &CloudEvent) -> bool {
        if event.event_type != METRIC_TYPE {
            return false;
        }
        let sample = (|| {
            let at = event.hlc()?;
            let data: MetricData = serde_json::from_slice(&event.data()).ok()?;
            Some((data.metric, at.physical_ms, data.value?))
        })();
        let recorded = match sample {
            Some((metric, at_ms, value)) => {
                self.record_sample(event.component(), &metric, at_ms, value)
            }
            None => false,
        };
        if !recorded {
            self.ignored.fetch_add(1, Ordering::Relaxed);
        }
        recorded
    }

    /// Adds one sample at `at_ms`; `false` (nothing changed) if `value` is
    /// NaN or infinite.
    pub fn record_sample(&self, component: &str, metric: &str, at_ms: u64, value: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        let metric = &scoped(component, metric);
        let start_ms = at_ms - at_ms % self.resolution_ms;
        let mut series = lock(&self.series);
        let buckets = match series.get_mut(metric) {
            Some(b) => b,
            None => series.entry(metric.to_string()).or_default(),
        };
        buckets
            .entry(start_ms)
            .and_modify(|p| {
                p.count += 1;
                p.sum += value;
                p.min = p.min.min(value);
                p.max = p.max.max(value);
            })
            .or_insert(MetricPoint {
                start_ms,
                count: 1,
                sum: value,
                min: value,
                max: value,
            });
        true
    }

    /// The buckets of `metric` that overlap the half-open range
    /// `[start_ms, end_ms)`, in time order; buckets without samples are
    /// omitted. With bucket-aligned bounds that is exactly the buckets
    /// starting in the range; an unaligned `start_ms` includes the bucket
    /// containing it (whole: buckets are the resolution).
    pub fn query(
        &self,
        component: &str,
        metric: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> Vec<MetricPoint> {
        if start_ms >= end_ms {
            return Vec::new();
        }
        let first = start_ms - start_ms % self.resolution_ms;
        lock(&self.series)
            .get(&scoped(component, metric))
            .map(|b| b.range(first..end_ms).map(|(_, p)| *p).collect())
            .unwrap_or_default()
    }

    /// The metric names `component` has samples of, sorted.
    pub fn names(&self, component: &str) -> Vec<String> {
        let prefix = format!("{component}\0");
        let mut names: Vec<String> = lock(&self.series)
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// Drops buckets that end at or before `ms` (retention); returns how
    /// many.
    pub fn prune_before(&self, ms: u64) -> usize {
        // A bucket starting at `b` ends at `b + resolution`: it ended iff
        // `b <= ms - resolution`; before `resolution` none has.
        let Some(last_ended) = ms.checked_sub(self.resolution_ms) else {
            return 0;
        };
        let keep_from = last_ended + 1;
        let mut removed = 0;
        let mut series = lock(&self.series);
        for buckets in series.values_mut() {
            let kept = buckets.split_off(&keep_from);
            removed += buckets.len();
            *buckets = kept;
        }
        series.retain(|_, b| !b.is_empty());
        removed
    }

    /// Metric events that could not be used.
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl FeedHandler for MetricsView {
    async fn apply(&self, _stream_sequence: u64, event: &CloudEvent) -> Result<(), String> {
        self.record(event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{origin_id, outbox_event};
    use keel_store::{Activity, ActivityRecord, EventData, OutboxEntry, StoredEvent};

    fn hlc(ms: u64, logical: u32, node: &str) -> Hlc {
        Hlc {
            physical_ms: ms,
            logical,
            node: node.into(),
        }
    }

    fn activity(user: &str, edge: &str, kind: &str, at: Hlc) -> CloudEvent {
        activity_with(
            user,
            edge,
            kind,
            at,
            vec![("page".into(), format!("/{kind}"))],
        )
    }

    fn activity_with(
        user: &str,
        edge: &str,
        kind: &str,
        at: Hlc,
        attributes: Vec<(String, String)>,
    ) -> CloudEvent {
        let entry = OutboxEntry::Activity {
            component: "app".into(),
            user: user.into(),
            record: ActivityRecord {
                activity: Activity {
                    kind: kind.into(),
                    attributes,
                },
                edge: edge.into(),
                at,
            },
        };
        outbox_event("eu-central", &origin_id(edge, 1), 1, &entry)
    }

    fn metric(name: &str, at_ms: u64, value: f64) -> CloudEvent {
        let entry = OutboxEntry::Event {
            component: "app".into(),
            event: StoredEvent {
                id: format!("fra:app:{at_ms}"),
                sequence: 1,
                origin: "fra".into(),
                region: "eu-central".into(),
                at: hlc(at_ms, 0, "fra"),
                data: EventData {
                    kind: METRIC_TYPE.into(),
                    key: name.into(),
                    payload: metric_event_data(name, value),
                    content_type: Some("application/json".into()),
                    user: None,
                },
            },
        };
        outbox_event("eu-central", &origin_id("fra", 1), 1, &entry)
    }

    #[test]
    fn last_activity_is_the_max_hlc_not_the_last_arrival() {
        let v = UserStateView::default();
        assert!(v.record(&activity("u1", "par", "late", hlc(2_000, 0, "par"))));
        // Arrives later but happened earlier.
        assert!(v.record(&activity("u1", "fra", "early", hlc(1_000, 5, "fra"))));
        // Same millisecond, higher logical counter: newer.
        assert!(v.record(&activity("u1", "ams", "tie", hlc(2_000, 1, "ams"))));
        let s = v.get_at("app", "u1", 2_500).unwrap();
        assert_eq!(s.last_seen, hlc(2_000, 1, "ams"));
        assert_eq!(s.last_seen_edge, "ams");
        assert_eq!(s.last_activity.kind, "tie");
        assert_eq!(
            s.last_activity.attributes,
            vec![("page".to_string(), "/tie".to_string())]
        );
        // Re-applying an older event (or the same one) changes nothing.
        v.record(&activity("u1", "par", "late", hlc(2_000, 0, "par")));
        assert_eq!(v.get_at("app", "u1", 2_500).unwrap(), s);
        assert!(v.get_at("app", "nobody", 2_500).is_none());
        assert_eq!(v.users(), 1);
    }

    #[test]
    fn online_edges_are_those_active_within_the_window() {
        let v = UserStateView::new(1_000);
        v.record(&activity("u1", "fra", "a", hlc(10_000, 0, "fra")));
        v.record(&activity("u1", "par", "a", hlc(10_500, 0, "par")));
        // An older event from fra does not move fra's latest back.
        v.record(&activity("u1", "fra", "a", hlc(5_000, 0, "fra")));
        v.record(&activity("u2", "ams", "a", hlc(10_900, 0, "ams")));
        // Most recent first; the boundary: age must be < window.
        assert_eq!(v.online_edges("app", "u1", 10_999, 1_000), ["par", "fra"]);
        assert_eq!(v.online_edges("app", "u1", 11_000, 1_000), ["par"]);
        assert_eq!(v.online_edges("app", "u1", 11_499, 1_000), ["par"]);
        assert!(v.online_edges("app", "u1", 11_500, 1_000).is_empty());
        // Stamped slightly ahead of the reader's clock: still online.
        assert_eq!(v.online_edges("app", "u1", 9_000, 1_000), ["par", "fra"]);
        assert!(v.online_edges("app", "nobody", 10_000, 1_000).is_empty());
        // `get_at` uses the view's window.
        assert_eq!(v.get_at("app", "u1", 11_000).unwrap().online_edges, ["par"]);
        assert_eq!(v.get_at("app", "u2", 11_000).unwrap().online_edges, ["ams"]);
        // `get` reads the wall clock: these are decades old.
        assert!(v.get("app", "u1").unwrap().online_edges.is_empty());
    }

    #[test]
    fn unusable_activity_events_are_ignored_and_counted() {
        let v = UserStateView::default();
        let mut bad_data = activity("u1", "fra", "a", hlc(1, 0, "fra"));
        bad_data.data_base64 = Some("bm90IGpzb24=".into()); // "not json"
        let mut bad_hlc = activity("u1", "fra", "a", hlc(1, 0, "fra"));
        bad_hlc.keelhlc = "yesterday".into();
        let mut no_user = activity("u1", "fra", "a", hlc(1, 0, "fra"));
        no_user.keeluser = None;
        no_user.subject = None;
        for e in [&bad_data, &bad_hlc, &no_user] {
            assert!(!v.record(e));
        }
        assert_eq!(v.ignored(), 3);
        assert_eq!(v.users(), 0);
        // Other types are not this view's business (and not counted).
        assert!(!v.record(&metric("cpu", 1, 1.0)));
        assert_eq!(v.ignored(), 3);
    }

    #[test]
    fn metric_samples_land_in_half_open_buckets() {
        let v = MetricsView::new(60_000);
        for (at, value) in [
            (0, 1.0),
            (59_999, 3.0),
            (60_000, 10.0), // first instant of the second bucket
            (60_001, -2.0),
            (180_000, 7.5),
        ] {
            assert!(v.record(&metric("latency", at, value)));
        }
        assert!(v.record(&metric("other", 0, 100.0)));
        let all = v.query("app", "latency", 0, u64::MAX);
        assert_eq!(
            all,
            vec![
                MetricPoint {
                    start_ms: 0,
                    count: 2,
                    sum: 4.0,
                    min: 1.0,
                    max: 3.0
                },
                MetricPoint {
                    start_ms: 60_000,
                    count: 2,
                    sum: 8.0,
                    min: -2.0,
                    max: 10.0
                },
                // 120_000 has no samples: omitted.
                MetricPoint {
                    start_ms: 180_000,
                    count: 1,
                    sum: 7.5,
                    min: 7.5,
                    max: 7.5
                },
            ]
        );
        let starts = |s, e| -> Vec<u64> {
            v.query("app", "latency", s, e)
                .into_iter()
                .map(|p| p.start_ms)
                .collect()
        };
        // End is exclusive, start inclusive.
        assert_eq!(starts(0, 60_000), [0]);
        assert_eq!(starts(0, 60_001), [0, 60_000]);
        assert_eq!(starts(60_000, 180_000), [60_000]);
        assert_eq!(starts(60_000, 180_001), [60_000, 180_000]);
        // An unaligned start includes the bucket containing it.
        assert_eq!(starts(59_999, 60_000), [0]);
        assert_eq!(starts(119_999, 180_000), [60_000]);
        assert!(starts(120_000, 180_000).is_empty());
        assert!(starts(60_000, 60_000).is_empty());
        assert!(starts(70_000, 10_000).is_empty());
        assert!(v.query("app", "missing", 0, u64::MAX).is_empty());
        assert_eq!(v.query("app", "other", 0, 1)[0].sum, 100.0);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let v = MetricsView::default();
        assert_eq!(v.resolution_ms(), DEFAULT_RESOLUTION_MS);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            // Encoded as null, ignored by the view.
            let data: serde_json::Value =
                serde_json::from_slice(&metric_event_data("cpu", bad)).unwrap();
            assert!(data["value"].is_null());
            assert!(!v.record(&metric("cpu", 1_000, bad)));
            assert!(!v.record_sample("app", "cpu", 1_000, bad));
        }
        let mut not_json = metric("cpu", 1_000, 1.0);
        not_json.data_base64 = None;
        assert!(!v.record(&not_json));
        assert_eq!(v.ignored(), 4);
        assert!(v.query("app", "cpu", 0, u64::MAX).is_empty());
        assert!(v.record(&metric("cpu", 1_000, 0.5)));
        assert_eq!(v.query("app", "cpu", 0, u64::MAX).len(), 1);
        // Activity events are not metrics.
        assert!(!v.record(&activity("u1", "fra", "a", hlc(1, 0, "fra"))));
        assert_eq!(v.ignored(), 4);
    }

    #[test]
    fn prune_drops_buckets_that_ended() {
        let v = MetricsView::new(10);
        for at in [0, 10, 20, 35] {
            v.record_sample("app", "m", at, 1.0);
        }
        v.record_sample("app", "n", 5, 1.0);
        // Buckets [0,10) and [10,20) ended by 20; [20,30) has not.
        assert_eq!(v.prune_before(20), 3);
        let starts: Vec<u64> = v
            .query("app", "m", 0, u64::MAX)
            .into_iter()
            .map(|p| p.start_ms)
            .collect();
        assert_eq!(starts, [20, 30]);
        assert!(v.query("app", "n", 0, u64::MAX).is_empty());
        assert_eq!(v.prune_before(0), 0);
        // Nothing has ended before the first bucket's end.
        let w = MetricsView::new(10);
        w.record_sample("app", "m", 0, 1.0);
        assert_eq!(w.prune_before(9), 0);
        assert_eq!(w.prune_before(10), 1);
    }

    #[test]
    fn search_matches_ids_and_display_names_newest_first() {
        let v = UserStateView::default();
        let named = |n: &str| vec![(DISPLAY_NAME_ATTRIBUTE.to_string(), n.to_string())];
        v.record(&activity_with(
            "u1",
            "fra",
            "in",
            hlc(1_000, 0, "fra"),
            named("Alice"),
        ));
        // A later activity without a name keeps the name.
        v.record(&activity("u1", "fra", "click", hlc(3_000, 0, "fra")));
        // An older name arriving late does not replace the newer one.
        v.record(&activity_with(
            "u1",
            "fra",
            "in",
            hlc(500, 0, "fra"),
            named("Old"),
        ));
        v.record(&activity_with(
            "alfred",
            "fra",
            "in",
            hlc(2_000, 0, "fra"),
            named("Bob"),
        ));
        v.record(&activity("zed", "fra", "in", hlc(4_000, 0, "fra")));
        let search = |prefix: Option<&str>, since: Option<u64>, limit: usize| {
            v.search(
                "app",
                &UserSearch {
                    name_prefix: prefix.map(str::to_string),
                    active_since_ms: since,
                    limit,
                },
            )
        };
        let users = |hits: Vec<UserHit>| hits.into_iter().map(|h| h.user).collect::<Vec<_>>();
        assert_eq!(users(search(None, None, 10)), ["zed", "u1", "alfred"]);
        // "al": alice by name, alfred by id; case-insensitive.
        assert_eq!(users(search(Some("AL"), None, 10)), ["u1", "alfred"]);
        assert_eq!(users(search(None, Some(2_500), 10)), ["zed", "u1"]);
        assert_eq!(users(search(None, None, 1)), ["zed"]);
        let hit = &search(Some("alice"), None, 10)[0];
        assert_eq!(
            (hit.display_name.as_deref(), hit.last_seen_ms),
            (Some("Alice"), 3_000)
        );
        assert!(
            v.search(
                "other",
                &UserSearch {
                    limit: 10,
                    ..UserSearch::default()
                }
            )
            .is_empty()
        );
    }
}

/// Event type of billing usage (`reconcile-billing`): key the ledger
/// account, payload the amount in minor units as decimal text.
pub const USAGE_EVENT_TYPE: &str = "billing.usage";

/// One usage event: (at ms, amount).
type UsageSample = (u64, i64);

/// Usage of one account over a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotal {
    pub amount: i64,
    pub events: u64,
}

/// The region's billing usage: every `billing.usage` event's (time, amount)
/// per component and account, as recorded where it was written. Not
/// idempotent (the feed's dedup applies each event once).
#[derive(Debug, Default)]
pub struct UsageView {
    /// (component, account) → (at ms, amount), in arrival order.
    usage: Mutex<BTreeMap<(String, String), Vec<UsageSample>>>,
    /// component → usage events whose key or payload was unusable.
    malformed: Mutex<BTreeMap<String, Vec<u64>>>,
}

impl UsageView {
    /// Folds one event in; `true` if it was a usable usage event.
    pub fn record(&self, event: &CloudEvent) -> bool {
        if event.event_type != USAGE_EVENT_TYPE || event.keelsequence.is_none() {
            return false;
        }
        let Some(at) = event.hlc() else {
            return false;
        };
        let amount = String::from_utf8(event.data())
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|a| *a > 0);
        match (event.subject.as_deref().filter(|k| !k.is_empty()), amount) {
            (Some(account), Some(amount)) => {
                lock(&self.usage)
                    .entry((event.component().to_owned(), account.to_owned()))
                    .or_default()
                    .push((at.physical_ms, amount));
                true
            }
            _ => {
                lock(&self.malformed)
                    .entry(event.component().to_owned())
                    .or_default()
                    .push(at.physical_ms);
                false
            }
        }
    }

    /// Usage per account of `component` in `[start_ms, end_ms)`, and the
    /// number of malformed usage events there.
    pub fn totals(
        &self,
        component: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> (BTreeMap<String, UsageTotal>, u64) {
        let in_range = |at: u64| at >= start_ms && at < end_ms;
        let mut out = BTreeMap::new();
        for ((c, account), samples) in lock(&self.usage).iter() {
            if c != component {
                continue;
            }
            let mut t = UsageTotal::default();
            for (at, amount) in samples {
                if in_range(*at) {
                    t.amount = t.amount.saturating_add(*amount);
                    t.events += 1;
                }
            }
            if t.events > 0 {
                out.insert(account.clone(), t);
            }
        }
        let malformed = lock(&self.malformed).get(component).map_or(0, |ats| {
            ats.iter().filter(|at| in_range(**at)).count() as u64
        });
        (out, malformed)
    }
}
