//! `global-coordination`: global events (through the outbox to
//! `KEEL_GLOBAL_EVENTS` on the `GLOBAL` account, delivered to subscribers'
//! `on-global-event`), global queries and reports (every region's API,
//! with a deadline), and the directory.
//!
//! Queries, reports, user search and billing reconciliation are audited;
//! data deletion and export (jobs in [`crate::privacy`]) are audited when
//! asked for and when they end.

use super::{WitError, is_event_type, wit_error};
use crate::global::{RegionAnswer, RegionQuery, Totals, merge_leaderboards};
use crate::privacy::{ExportFormat, JobKind, JobState, PrivacyError};
use crate::regional::{Filter, GlobalFilter, Kind};
use crate::state::HostState;
use keel_world::bindings::keel::platform::global_coordination as gc;
use keel_world::bindings::keel::platform::types;

type R<T> = wasmtime::Result<Result<T, WitError>>;

/// Largest publisher-chosen event id.
const MAX_EVENT_ID_BYTES: usize = 256;

fn unavailable(e: impl std::fmt::Display) -> WitError {
    WitError::Unavailable(e.to_string())
}

impl HostState {
    /// Every region of the deployment (this node's only, without one).
    fn all_regions(&self) -> Vec<String> {
        let c = self.component();
        match &c.services.regions {
            Some(r) => r.regions.iter().map(|g| g.name.clone()).collect(),
            None => vec![c.services.node.region.clone()],
        }
    }
}

impl HostState {
    async fn query_unaudited(&mut self, query: gc::GlobalQuery) -> R<gc::GlobalResult> {
        let c = self.component();
        let s = &c.services;
        let component = c.ns.as_str().to_string();
        Ok(match query {
            gc::GlobalQuery::HomeRegion(user) => s
                .directory
                .home(&user)
                .await
                .map(|h| gc::GlobalResult::HomeRegion(h.map(|(r, _)| r)))
                .map_err(unavailable),
            gc::GlobalQuery::UserCount(region) => s
                .directory
                .count(region.as_deref())
                .await
                .map(gc::GlobalResult::UserCount)
                .map_err(unavailable),
            gc::GlobalQuery::Metric(q) => {
                if q.range.start_ms > q.range.end_ms {
                    return Ok(Err(WitError::Invalid("range starts after it ends".into())));
                }
                let ask = RegionQuery::Metric {
                    component,
                    metric: q.metric_type.clone(),
                    start_ms: q.range.start_ms,
                    end_ms: q.range.end_ms,
                };
                let (answers, _missing) = s.api.scatter(&self.all_regions(), &ask).await;
                let series = answers
                    .into_iter()
                    .filter_map(|(region, a)| match a {
                        RegionAnswer::Metric {
                            resolution_ms,
                            points,
                        } => Some(types::Metrics {
                            metric_type: q.metric_type.clone(),
                            region,
                            range: q.range,
                            resolution_ms,
                            points: points
                                .into_iter()
                                .map(|p| types::MetricPoint {
                                    start_ms: p.start_ms,
                                    count: p.count,
                                    sum: p.sum,
                                    min: p.min,
                                    max: p.max,
                                })
                                .collect(),
                        }),
                        _ => None,
                    })
                    .collect();
                Ok(gc::GlobalResult::Metric(series))
            }
            gc::GlobalQuery::Leaderboard(q) => {
                let ask = RegionQuery::Leaderboard {
                    component,
                    category: q.category,
                };
                let (answers, missing) = s.api.scatter(&self.all_regions(), &ask).await;
                if !missing.is_empty() {
                    // A merged ranking without a region would be wrong, not
                    // just incomplete.
                    return Ok(Err(unavailable(format!(
                        "regions did not answer: {}",
                        missing.join(", ")
                    ))));
                }
                let parts = answers.into_values().filter_map(|a| match a {
                    RegionAnswer::Leaderboard(rows) => Some(rows),
                    _ => None,
                });
                Ok(gc::GlobalResult::Leaderboard(
                    merge_leaderboards(parts, q.limit)
                        .into_iter()
                        .map(|(rank, member, score)| types::LeaderboardEntry {
                            rank,
                            member,
                            score,
                        })
                        .collect(),
                ))
            }
            gc::GlobalQuery::Topology => Ok(gc::GlobalResult::Topology(match &s.regions {
                Some(r) => r
                    .regions
                    .iter()
                    .map(|g| types::RegionInfo {
                        name: g.name.clone(),
                        edges: g.edges.clone(),
                        coordinator: g.coordinator.clone(),
                        data_residency: g.data_residency.as_str().to_string(),
                        compliance: g.compliance.clone(),
                    })
                    .collect(),
                None => vec![types::RegionInfo {
                    name: s.node.region.clone(),
                    edges: vec![s.node.edge.clone()],
                    coordinator: s.node.edge.clone(),
                    data_residency: "global".into(),
                    compliance: vec![],
                }],
            })),
        })
    }

    async fn report_unaudited(
        &mut self,
        report_type: String,
        parameters: gc::ReportParams,
    ) -> R<gc::Report> {
        let c = self.component();
        let of = match report_type.as_str() {
            "events" => Totals::Events,
            "metrics" => Totals::Metrics,
            other => {
                return Ok(Err(WitError::Invalid(format!(
                    "unknown report type {other:?}; accepted: events (application events per type), metrics (count, sum, min, max per metric)"
                ))));
            }
        };
        let range = parameters.range;
        if range.start_ms > range.end_ms {
            return Ok(Err(WitError::Invalid("range starts after it ends".into())));
        }
        let all = self.all_regions();
        let regions = if parameters.regions.is_empty() {
            all
        } else {
            if let Some(unknown) = parameters.regions.iter().find(|r| !all.contains(r)) {
                return Ok(Err(WitError::Invalid(format!(
                    "unknown region {unknown:?}; regions: {}",
                    all.join(", ")
                ))));
            }
            parameters.regions
        };
        let ask = RegionQuery::Totals {
            component: c.ns.as_str().to_string(),
            of,
            start_ms: range.start_ms,
            end_ms: range.end_ms,
        };
        let (answers, missing) = c.services.api.scatter(&regions, &ask).await;
        let by_region: serde_json::Map<String, serde_json::Value> = answers
            .iter()
            .filter_map(|(r, a)| match a {
                RegionAnswer::Totals(t) => Some((
                    r.clone(),
                    serde_json::to_value(t).expect("totals serialize"),
                )),
                _ => None,
            })
            .collect();
        let body = serde_json::json!({
            "report_type": report_type,
            "range": {"start_ms": range.start_ms, "end_ms": range.end_ms},
            "regions": by_region,
            "missing_regions": missing,
        });
        Ok(Ok(gc::Report {
            report_type,
            generated_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            regions: answers.keys().cloned().collect(),
            missing_regions: missing,
            content_type: "application/json".into(),
            body: body.to_string().into_bytes(),
        }))
    }

    async fn search_unaudited(&mut self, criteria: gc::SearchCriteria) -> R<gc::UserSearch> {
        if criteria.limit == 0 {
            return Ok(Err(WitError::Invalid("limit must be at least 1".into())));
        }
        let c = self.component();
        let limit = criteria.limit.min(MAX_SEARCH_RESULTS);
        let ask = RegionQuery::Users {
            component: c.ns.as_str().to_string(),
            asker_region: c.services.node.region.clone(),
            name_prefix: criteria.name_prefix.filter(|p| !p.is_empty()),
            home_region: criteria.home_region,
            active_since_ms: criteria.active_since_ms,
            limit,
        };
        let (answers, missing) = c.services.api.scatter(&self.all_regions(), &ask).await;
        let regions: Vec<String> = answers.keys().cloned().collect();
        let parts = answers.into_values().filter_map(|a| match a {
            RegionAnswer::Users(hits) => Some(hits),
            _ => None,
        });
        Ok(Ok(gc::UserSearch {
            users: crate::global::merge_user_hits(parts, limit)
                .into_iter()
                .map(|h| gc::UserSummary {
                    user: h.user,
                    home_region: h.home_region,
                    display_name: h.display_name,
                    last_seen_ms: Some(h.last_seen_ms),
                })
                .collect(),
            regions,
            missing_regions: missing,
        }))
    }
}

impl HostState {
    /// Every region's usage and ledger totals of this component over the
    /// period, compared per (region, account); stored in
    /// [`RECONCILIATIONS_BUCKET`] (latest per component and period).
    async fn reconcile_unaudited(
        &mut self,
        period: gc::BillingPeriod,
    ) -> Result<gc::Reconciliation, WitError> {
        if period.start_ms > period.end_ms {
            return Err(WitError::Invalid("the period starts after it ends".into()));
        }
        let c = self.component();
        let component = c.ns.as_str().to_string();
        let ask = RegionQuery::Billing {
            component: component.clone(),
            start_ms: period.start_ms,
            end_ms: period.end_ms,
        };
        let (answers, missing) = c.services.api.scatter(&self.all_regions(), &ask).await;
        let mut r = gc::Reconciliation {
            period,
            regions: answers.keys().cloned().collect(),
            missing_regions: missing,
            accounts_checked: 0,
            usage_events: 0,
            entries_checked: 0,
            total_usage: 0,
            total_credits: 0,
            total_debits: 0,
            malformed_usage_events: 0,
            mismatches: Vec::new(),
        };
        for (region, answer) in answers {
            let RegionAnswer::Billing(b) = answer else {
                continue;
            };
            r.malformed_usage_events += b.malformed_usage_events;
            for (account, a) in b.accounts {
                r.accounts_checked += 1;
                r.usage_events += a.usage_events;
                r.entries_checked += a.entries;
                r.total_usage = r.total_usage.saturating_add(a.usage);
                r.total_credits = r.total_credits.saturating_add(a.credits);
                r.total_debits = r.total_debits.saturating_sub(a.charged);
                if a.usage != a.charged {
                    r.mismatches.push(gc::BillingMismatch {
                        detail: format!(
                            "usage {} in {} events, charged {} in {} entries",
                            a.usage, a.usage_events, a.charged, a.charges
                        ),
                        account,
                        region: region.clone(),
                        usage: a.usage,
                        charged: a.charged,
                    });
                }
            }
        }
        store_reconciliation(&c.services, &component, &r)
            .await
            .map_err(|e| {
                WitError::Unavailable(format!("the reconciliation could not be stored: {e}"))
            })?;
        Ok(r)
    }
}

/// Global KV bucket of the latest reconciliation per component and period
/// (key `<component>.<start-ms>-<end-ms>`, JSON).
pub const RECONCILIATIONS_BUCKET: &str = "KEEL_RECONCILIATIONS";

async fn store_reconciliation(
    services: &crate::Services,
    component: &str,
    r: &gc::Reconciliation,
) -> Result<(), keel_bus::BusError> {
    let bus = &services.global_bus;
    bus.ensure_kv(&keel_bus::KvSpec {
        bucket: RECONCILIATIONS_BUCKET.into(),
        history: 1,
        max_age: None,
        replicas: services
            .regions
            .as_deref()
            .map_or(1, |g| keel_topology::replicas(g, &services.node.region)),
        placement: None,
    })
    .await?;
    let mismatches: Vec<serde_json::Value> = r
        .mismatches
        .iter()
        .map(|m| {
            serde_json::json!({
                "account": m.account, "region": m.region, "usage": m.usage,
                "charged": m.charged, "detail": m.detail,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "component": component,
        "period": {"start_ms": r.period.start_ms, "end_ms": r.period.end_ms},
        "regions": r.regions,
        "missing_regions": r.missing_regions,
        "accounts_checked": r.accounts_checked,
        "usage_events": r.usage_events,
        "entries_checked": r.entries_checked,
        "total_usage": r.total_usage,
        "total_credits": r.total_credits,
        "total_debits": r.total_debits,
        "malformed_usage_events": r.malformed_usage_events,
        "mismatches": mismatches,
    });
    let key = format!("{component}.{}-{}", r.period.start_ms, r.period.end_ms);
    bus.kv_put(RECONCILIATIONS_BUCKET, &key, doc.to_string().into())
        .await
        .map(|_| ())
}

/// Most users one `search-global-users` returns.
const MAX_SEARCH_RESULTS: u32 = 1000;

impl gc::Host for HostState {
    async fn publish_global_event(&mut self, event: types::GlobalEvent) -> R<()> {
        let c = self.component();
        let s = &c.services;
        if event.id.is_empty() || event.id.len() > MAX_EVENT_ID_BYTES {
            return Ok(Err(WitError::Invalid(format!(
                "event id must be 1 to {MAX_EVENT_ID_BYTES} bytes"
            ))));
        }
        if !is_event_type(&event.event_type) {
            return Ok(Err(WitError::Invalid(format!(
                "event type {:?} must be dot-separated tokens of [A-Za-z0-9_-], at most 128 bytes",
                event.event_type
            ))));
        }
        if let Some(user) = &event.user {
            let home = match s.directory.home_cached(user).await {
                Ok(h) => h.unwrap_or_else(|| s.node.region.clone()),
                Err(e) => return Ok(Err(unavailable(e))),
            };
            if !s.residency.allows_everywhere(&home) {
                return Ok(Err(WitError::Residency(format!(
                    "user {user:?} is homed in {home}, whose residency class keeps personal data in its zone; a global event about them would reach every region (publish it without `user`, pseudonymised)"
                ))));
            }
        }
        let event = keel_store::GlobalEvent {
            id: event.id,
            event_type: event.event_type,
            subject: event.subject,
            content_type: event.content_type,
            data: event.data,
            user: event.user,
        };
        let f = s.edge.queue_global_event(&c.ns, event);
        Ok(f.await.map_err(wit_error))
    }

    async fn subscribe_global_events(&mut self, event_types: Vec<String>) -> R<u64> {
        let filter = Filter::Global(GlobalFilter { types: event_types });
        Ok(super::subscribe(self.component(), filter).await)
    }

    async fn unsubscribe_global_events(&mut self, id: u64) -> R<()> {
        let c = self.component();
        Ok(c.services
            .regional
            .unsubscribe(Kind::Global, c.ns.as_str(), id)
            .await
            .map_err(Into::into))
    }

    async fn query_global_state(&mut self, query: gc::GlobalQuery) -> R<gc::GlobalResult> {
        let subject = match &query {
            gc::GlobalQuery::HomeRegion(user) => format!("home-region user={user}"),
            gc::GlobalQuery::UserCount(r) => {
                format!("user-count region={}", r.as_deref().unwrap_or("*"))
            }
            gc::GlobalQuery::Metric(m) => format!("metric {}", m.metric_type),
            gc::GlobalQuery::Leaderboard(l) => format!("leaderboard {}", l.category),
            gc::GlobalQuery::Topology => "topology".into(),
        };
        let result = self.query_unaudited(query).await?;
        Ok(super::audited(&self.component(), "query-global-state", subject, result).await)
    }

    async fn generate_global_report(
        &mut self,
        report_type: String,
        parameters: gc::ReportParams,
    ) -> R<gc::Report> {
        let subject = format!(
            "{report_type} {}..{}",
            parameters.range.start_ms, parameters.range.end_ms
        );
        let result = self.report_unaudited(report_type, parameters).await?;
        Ok(super::audited(&self.component(), "generate-global-report", subject, result).await)
    }

    async fn search_global_users(&mut self, criteria: gc::SearchCriteria) -> R<gc::UserSearch> {
        // The shape of the question, not its text: the trail is global.
        let subject = format!(
            "name-prefix={} home-region={} limit={}",
            criteria
                .name_prefix
                .as_ref()
                .map_or(0, |p| p.chars().count()),
            criteria.home_region.as_deref().unwrap_or("*"),
            criteria.limit
        );
        let result = self.search_unaudited(criteria).await?;
        Ok(super::audited(&self.component(), "search-global-users", subject, result).await)
    }

    async fn reconcile_billing(&mut self, period: gc::BillingPeriod) -> R<gc::Reconciliation> {
        let subject = format!("period={}..{}", period.start_ms, period.end_ms);
        let result = self.reconcile_unaudited(period).await;
        let c = self.component();
        Ok(super::audited(&c, "reconcile-billing", subject, result).await)
    }

    async fn process_data_deletion(&mut self, user: String, regions: Vec<String>) -> R<String> {
        let c = self.component();
        let subject = format!("user={user} regions=[{}]", regions.join(","));
        if let Err(e) = super::audit_request(&c, "process-data-deletion", subject).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .privacy
            .begin(JobKind::Erase, &user, regions, c.ns.as_str(), None)
            .await
            .map_err(privacy_error))
    }

    async fn get_deletion_status(&mut self, id: String) -> R<gc::DeletionStatus> {
        let c = self.component();
        Ok(
            own_job(&c, &id, JobKind::Erase).map(|job| gc::DeletionStatus {
                state: job_state(job.state()),
                regions: region_progress(&job),
                id: job.id,
                user: job.user,
            }),
        )
    }

    async fn export_user_data(&mut self, user: String, format: gc::ExportFormat) -> R<String> {
        let c = self.component();
        let format = match format {
            gc::ExportFormat::Json => ExportFormat::Json,
            gc::ExportFormat::Ndjson => ExportFormat::Ndjson,
        };
        let subject = format!("user={user} format={format:?}");
        if let Err(e) = super::audit_request(&c, "export-user-data", subject).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .privacy
            .begin(
                JobKind::Export,
                &user,
                Vec::new(),
                c.ns.as_str(),
                Some(format),
            )
            .await
            .map_err(privacy_error))
    }

    async fn get_export_status(&mut self, id: String) -> R<gc::ExportStatus> {
        let c = self.component();
        Ok(
            own_job(&c, &id, JobKind::Export).map(|job| gc::ExportStatus {
                state: job_state(job.state()),
                regions: region_progress(&job),
                format: match job.format {
                    Some(ExportFormat::Ndjson) => gc::ExportFormat::Ndjson,
                    _ => gc::ExportFormat::Json,
                },
                size_bytes: job.size_bytes,
                id: job.id,
                user: job.user,
            }),
        )
    }

    async fn read_export(&mut self, id: String, offset: u64, max_bytes: u32) -> R<Vec<u8>> {
        let c = self.component();
        if let Err(e) = own_job(&c, &id, JobKind::Export) {
            return Ok(Err(e));
        }
        Ok(c.services
            .privacy
            .read_export(&id, offset, max_bytes)
            .map_err(privacy_error))
    }
}

/// A job of `kind` that the calling component started (`not-found`
/// otherwise: components do not see each other's jobs).
fn own_job(
    c: &crate::state::ComponentContext,
    id: &str,
    kind: JobKind,
) -> Result<crate::privacy::Job, WitError> {
    match c.services.privacy.status(id) {
        Ok(job) if job.kind == kind && job.component == c.ns.as_str() => Ok(job),
        Ok(_) => Err(WitError::NotFound),
        Err(e) => Err(privacy_error(e)),
    }
}

fn privacy_error(e: PrivacyError) -> WitError {
    match e {
        PrivacyError::Invalid(m) => WitError::Invalid(m),
        PrivacyError::NotFound => WitError::NotFound,
        PrivacyError::Conflict(m) => WitError::Conflict(m),
        PrivacyError::Unavailable(m) => WitError::Unavailable(m),
    }
}

fn job_state(s: JobState) -> types::JobState {
    match s {
        JobState::Pending => types::JobState::Pending,
        JobState::Running => types::JobState::Running,
        JobState::Completed => types::JobState::Completed,
        JobState::Failed => types::JobState::Failed,
    }
}

fn region_progress(job: &crate::privacy::Job) -> Vec<types::RegionProgress> {
    job.regions
        .iter()
        .map(|(region, p)| types::RegionProgress {
            region: region.clone(),
            state: job_state(p.state),
            detail: p.detail.clone(),
        })
        .collect()
}
