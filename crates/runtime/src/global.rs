//! Global queries: every node answers questions about its region on
//! `keel.<region>.api.query` (a service every residency zone imports), and
//! a global query asks every region at once, with a deadline, and says
//! which regions answered.
//!
//! Invariants:
//! - **Nothing personal crosses a zone.** Answers are metric buckets,
//!   leaderboard scores and event counts of the asking component, and user
//!   search hits (pseudonymous ids, as in the global directory) whose
//!   display names the *answering* region leaves out unless the user's
//!   residency allows the asking region to hold them.
//! - **Partial, never silently.** A region that does not answer in time is
//!   listed as missing; the caller decides what a partial answer is worth.

use bytes::Bytes;
use keel_bus::Bus;
use keel_coord::MetricPoint;
use keel_store::Namespace;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a global query waits for each region.
pub const REGION_TIMEOUT: Duration = Duration::from_secs(2);
/// Leaderboard entries one region returns for a global merge.
const MAX_LEADERBOARD_ENTRIES: u32 = 10_000;

/// The API subject of `region`.
pub fn query_subject(region: &str) -> String {
    format!("keel.{region}.api.query")
}

/// A question to one region, about one component's data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "kebab-case")]
pub enum RegionQuery {
    Metric {
        component: String,
        metric: String,
        start_ms: u64,
        end_ms: u64,
    },
    Leaderboard {
        component: String,
        category: String,
    },
    /// Totals per metric (`metrics`) or per event type (`events`) in a range.
    Totals {
        component: String,
        of: Totals,
        start_ms: u64,
        end_ms: u64,
    },
    /// The component's users active in the region (`search-global-users`).
    Users {
        component: String,
        /// The asking node's region: display names go only where the
        /// user's residency allows.
        asker_region: String,
        name_prefix: Option<String>,
        home_region: Option<String>,
        active_since_ms: Option<u64>,
        limit: u32,
    },
    /// Usage and ledger totals per account of the component in a range
    /// (`reconcile-billing`).
    Billing {
        component: String,
        start_ms: u64,
        end_ms: u64,
    },
}

/// One account's side of a reconciliation, as one region sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountBilling {
    pub usage: i64,
    pub usage_events: u64,
    /// Ledger debits as a positive number.
    pub charged: i64,
    pub charges: u64,
    pub credits: i64,
    pub entries: u64,
}

/// A region's answer to [`RegionQuery::Billing`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionBilling {
    pub accounts: BTreeMap<String, AccountBilling>,
    pub malformed_usage_events: u64,
}

/// One user search hit, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserHit {
    pub user: String,
    pub home_region: String,
    pub display_name: Option<String>,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Totals {
    Metrics,
    Events,
}

/// One bucket, as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub start_ms: u64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl From<MetricPoint> for Point {
    fn from(p: MetricPoint) -> Point {
        Point {
            start_ms: p.start_ms,
            count: p.count,
            sum: p.sum,
            min: p.min,
            max: p.max,
        }
    }
}

/// A region's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionAnswer {
    Metric {
        resolution_ms: u64,
        points: Vec<Point>,
    },
    Leaderboard(Vec<(String, i64)>),
    /// Name → (count, sum, min, max) over the range.
    Totals(BTreeMap<String, Point>),
    Users(Vec<UserHit>),
    Billing(RegionBilling),
    Error(String),
}

/// Answers this node's region's queries.
pub struct GlobalApi {
    region: String,
    bus: Arc<dyn Bus>,
}

impl GlobalApi {
    pub fn new(region: &str, bus: Arc<dyn Bus>) -> GlobalApi {
        GlobalApi {
            region: region.to_string(),
            bus,
        }
    }

    /// Serves `keel.<region>.api.query` (queue group: one node of the
    /// region answers each query) until the runtime stops.
    pub fn serve(&self, answerer: Answerer, rt: &tokio::runtime::Handle) {
        let bus = self.bus.clone();
        let subject = query_subject(&self.region);
        rt.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            let mut sub = loop {
                match bus.subscribe(&subject, Some("keel-api")).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot serve the region's API; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            };
            while let Some(msg) = sub.next().await {
                let Some(reply) = msg.reply.clone() else {
                    continue;
                };
                let answer = match serde_json::from_slice::<RegionQuery>(&msg.payload) {
                    Ok(q) => answerer.answer(q).await,
                    Err(e) => RegionAnswer::Error(format!("malformed query: {e}")),
                };
                let body = serde_json::to_vec(&answer).expect("answers serialize");
                if let Err(e) = bus.publish(&reply, Vec::new(), Bytes::from(body)).await {
                    tracing::debug!(error = %e, "cannot answer a region query");
                }
            }
        });
    }

    /// Asks every region in `regions` at once; answers by region, and the
    /// regions that did not answer (in time, or with an error).
    pub async fn scatter(
        &self,
        regions: &[String],
        query: &RegionQuery,
    ) -> (BTreeMap<String, RegionAnswer>, Vec<String>) {
        let payload = Bytes::from(serde_json::to_vec(query).expect("queries serialize"));
        let asks = regions.iter().map(|r| {
            let bus = self.bus.clone();
            let payload = payload.clone();
            let r = r.clone();
            async move {
                let answer = bus
                    .request(&query_subject(&r), Vec::new(), payload, REGION_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        serde_json::from_slice::<RegionAnswer>(&m.payload)
                            .map_err(|e| e.to_string())
                    });
                (r, answer)
            }
        });
        let mut answers = BTreeMap::new();
        let mut missing = Vec::new();
        for (region, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(RegionAnswer::Error(e)) | Err(e) => {
                    tracing::debug!(region, error = %e, "region did not answer a global query");
                    missing.push(region);
                }
                Ok(a) => {
                    answers.insert(region, a);
                }
            }
        }
        (answers, missing)
    }
}

/// What answers a region query: the node's views, its CRDTs, and (for
/// user searches) the directory and the residency rules.
#[derive(Clone)]
pub struct Answerer {
    pub region: String,
    pub metrics: Arc<keel_coord::MetricsView>,
    pub events: Arc<keel_coord::MetricsView>,
    pub users: Arc<keel_coord::UserStateView>,
    pub sync: keel_sync::Sync,
    pub directory: Arc<keel_coord::directory::Directory>,
    pub residency: keel_coord::migration::ResidencyRules,
    pub usage: Arc<keel_coord::UsageView>,
    pub ledger: Arc<keel_ledger::Ledger>,
}

impl Answerer {
    pub async fn answer(&self, q: RegionQuery) -> RegionAnswer {
        match q {
            RegionQuery::Metric {
                component,
                metric,
                start_ms,
                end_ms,
            } => {
                let view = &self.metrics;
                RegionAnswer::Metric {
                    resolution_ms: view.resolution_ms(),
                    points: view
                        .query(&component, &metric, start_ms, end_ms)
                        .into_iter()
                        .map(Point::from)
                        .collect(),
                }
            }
            RegionQuery::Leaderboard {
                component,
                category,
            } => {
                let Some(ns) = Namespace::new(&component) else {
                    return RegionAnswer::Error(format!("bad component name {component:?}"));
                };
                match self.sync.leaderboard_top(
                    &ns,
                    keel_sync::Scope::Region,
                    &category,
                    MAX_LEADERBOARD_ENTRIES,
                ) {
                    Ok(rows) => RegionAnswer::Leaderboard(
                        rows.into_iter().map(|(_, m, score)| (m, score)).collect(),
                    ),
                    Err(e) => RegionAnswer::Error(e.to_string()),
                }
            }
            RegionQuery::Totals {
                component,
                of,
                start_ms,
                end_ms,
            } => {
                let view = match of {
                    Totals::Metrics => &self.metrics,
                    Totals::Events => &self.events,
                };
                let mut totals = BTreeMap::new();
                for name in view.names(&component) {
                    let points = view.query(&component, &name, start_ms, end_ms);
                    if let Some(total) = total(&points) {
                        totals.insert(name, total);
                    }
                }
                RegionAnswer::Totals(totals)
            }
            RegionQuery::Users {
                component,
                asker_region,
                name_prefix,
                home_region,
                active_since_ms,
                limit,
            } => {
                let search = keel_coord::UserSearch {
                    name_prefix,
                    active_since_ms,
                    // Without a home filter the first `limit` hits are the
                    // answer; with one, look further (homes are checked
                    // below, one directory read per hit, cached).
                    limit: if home_region.is_some() {
                        MAX_USER_SCAN
                    } else {
                        limit as usize
                    },
                };
                let mut out = Vec::new();
                for hit in self.users.search(&component, &search) {
                    if out.len() >= limit as usize {
                        break;
                    }
                    // A user the directory does not know lives where seen.
                    let home = match self.directory.home_cached(&hit.user).await {
                        Ok(Some(h)) => h,
                        Ok(None) => self.region.clone(),
                        Err(e) => return RegionAnswer::Error(format!("directory: {e}")),
                    };
                    if home_region.as_ref().is_some_and(|r| *r != home) {
                        continue;
                    }
                    let shown = self.residency.allows(&home, &asker_region);
                    out.push(UserHit {
                        display_name: hit.display_name.filter(|_| shown),
                        user: hit.user,
                        home_region: home,
                        last_seen_ms: hit.last_seen_ms,
                    });
                }
                RegionAnswer::Users(out)
            }
            RegionQuery::Billing {
                component,
                start_ms,
                end_ms,
            } => {
                let ledger = match self
                    .ledger
                    .period_totals(&component, start_ms, end_ms)
                    .await
                {
                    Ok(t) => t,
                    Err(e) => return RegionAnswer::Error(format!("ledger: {e}")),
                };
                let (usage, malformed) = self.usage.totals(&component, start_ms, end_ms);
                let mut accounts: BTreeMap<String, AccountBilling> = BTreeMap::new();
                for (account, u) in usage {
                    let a = accounts.entry(account).or_default();
                    a.usage = u.amount;
                    a.usage_events = u.events;
                }
                for (account, t) in ledger {
                    let a = accounts.entry(account).or_default();
                    a.charged = t.debits.saturating_neg();
                    a.charges = t.debit_entries;
                    a.credits = t.credits;
                    a.entries = t.entries;
                }
                RegionAnswer::Billing(RegionBilling {
                    accounts,
                    malformed_usage_events: malformed,
                })
            }
        }
    }
}

/// Users one region scans at most for a search filtered by home region.
const MAX_USER_SCAN: usize = 10_000;

/// Search hits of several regions: one per user (the most recent sighting;
/// a display name from any region that could show it), most recently seen
/// first, then by id, the first `limit`.
pub fn merge_user_hits(parts: impl IntoIterator<Item = Vec<UserHit>>, limit: u32) -> Vec<UserHit> {
    let mut by_user: BTreeMap<String, UserHit> = BTreeMap::new();
    for hit in parts.into_iter().flatten() {
        match by_user.get_mut(&hit.user) {
            None => {
                by_user.insert(hit.user.clone(), hit);
            }
            Some(known) => {
                let name = known.display_name.take();
                let fresher = hit.last_seen_ms > known.last_seen_ms;
                let (newer_name, older_name) = if fresher {
                    (hit.display_name.clone(), name)
                } else {
                    (name, hit.display_name.clone())
                };
                if fresher {
                    *known = hit;
                }
                known.display_name = newer_name.or(older_name);
            }
        }
    }
    let mut hits: Vec<UserHit> = by_user.into_values().collect();
    hits.sort_by(|a, b| {
        b.last_seen_ms
            .cmp(&a.last_seen_ms)
            .then_with(|| a.user.cmp(&b.user))
    });
    hits.truncate(limit as usize);
    hits
}

/// The points of a series folded into one (start of the first bucket).
fn total(points: &[MetricPoint]) -> Option<Point> {
    let first = points.first()?;
    Some(points.iter().skip(1).fold(Point::from(*first), |mut t, p| {
        t.count += p.count;
        t.sum += p.sum;
        t.min = t.min.min(p.min);
        t.max = t.max.max(p.max);
        t
    }))
}

/// Leaderboards of several regions merged: scores summed per member, ranked
/// (ties share a rank), the first `limit`.
pub fn merge_leaderboards(
    parts: impl IntoIterator<Item = Vec<(String, i64)>>,
    limit: u32,
) -> Vec<(u32, String, i64)> {
    let mut sum: BTreeMap<String, i64> = BTreeMap::new();
    for part in parts {
        for (member, score) in part {
            let s = sum.entry(member).or_default();
            *s = s.saturating_add(score);
        }
    }
    let mut rows: Vec<(String, i64)> = sum.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out = Vec::new();
    let mut rank = 0u32;
    for (i, (member, score)) in rows.into_iter().enumerate() {
        if out.len() >= limit as usize {
            break;
        }
        if i == 0 || out.last().is_some_and(|(_, _, s)| *s != score) {
            rank = u32::try_from(i + 1).unwrap_or(u32::MAX);
        }
        out.push((rank, member, score));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaderboards_merge_by_summing_and_rank_with_ties() {
        let merged = merge_leaderboards(
            [
                vec![("ann".into(), 5), ("bob".into(), 7)],
                vec![("ann".into(), 2), ("cy".into(), 1)],
            ],
            10,
        );
        assert_eq!(
            merged,
            [
                (1, "ann".to_string(), 7),
                (1, "bob".to_string(), 7),
                (3, "cy".to_string(), 1)
            ]
        );
        assert_eq!(merge_leaderboards([vec![("a".into(), 1)]], 0), []);
    }

    #[test]
    fn user_hits_merge_per_user_freshest_first() {
        let hit = |user: &str, name: Option<&str>, seen: u64| UserHit {
            user: user.into(),
            home_region: "eu".into(),
            display_name: name.map(Into::into),
            last_seen_ms: seen,
        };
        let merged = merge_user_hits(
            [
                vec![hit("ann", Some("Ann"), 5), hit("bob", None, 9)],
                vec![hit("ann", None, 7), hit("cy", Some("Cy"), 1)],
            ],
            10,
        );
        assert_eq!(
            merged,
            [
                hit("bob", None, 9),
                hit("ann", Some("Ann"), 7),
                hit("cy", Some("Cy"), 1)
            ]
        );
        assert_eq!(merge_user_hits([merged], 1).len(), 1);
    }

    #[test]
    fn totals_fold_buckets() {
        let p = |start_ms, count, sum, min, max| MetricPoint {
            start_ms,
            count,
            sum,
            min,
            max,
        };
        let t = total(&[p(0, 2, 3.0, 1.0, 2.0), p(60, 1, -5.0, -5.0, -5.0)]).unwrap();
        assert_eq!((t.count, t.sum, t.min, t.max), (3, -2.0, -5.0, 2.0));
        assert_eq!(total(&[]), None);
    }

    #[test]
    fn queries_round_trip_as_json() {
        let q = RegionQuery::Totals {
            component: "c".into(),
            of: Totals::Events,
            start_ms: 1,
            end_ms: 2,
        };
        let text = serde_json::to_string(&q).unwrap();
        assert!(text.contains("\"query\":\"totals\""), "{text}");
        let back: RegionQuery = serde_json::from_str(&text).unwrap();
        assert!(matches!(
            back,
            RegionQuery::Totals {
                of: Totals::Events,
                ..
            }
        ));
    }
}
