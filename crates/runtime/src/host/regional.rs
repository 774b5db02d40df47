//! `regional-coordination`: the region as this node's views of its stream
//! see it (eventual), subscriptions, the outbox for `sync-to-region`,
//! leaderboards as region-scoped CRDTs, and migrations.

use super::{WitError, event_data_in, hlc, wit_error};
use crate::regional::{Filter, Kind, UpdateFilter};
use crate::state::HostState;
use keel_coord::migration::{MigrationError, Phase};
use keel_store::StoreError;
use keel_sync::Scope;
use keel_world::bindings::keel::platform::regional_coordination as rc;
use keel_world::bindings::keel::platform::types;

type R<T> = wasmtime::Result<Result<T, WitError>>;

/// `<incarnation:016x>-<outbox seq>`: the outbox position of a batch's last
/// event on this node. A wiped node (new incarnation) knows none of the old.
fn sync_id(incarnation: u64, seq: u64) -> String {
    format!("{incarnation:016x}-{seq}")
}

fn parse_sync_id(id: &str) -> Option<(u64, u64)> {
    let (inc, seq) = id.split_once('-')?;
    if inc.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(inc, 16).ok()?, seq.parse().ok()?))
}

fn phase(p: Phase) -> rc::MigrationPhase {
    match p {
        Phase::Pending => rc::MigrationPhase::Pending,
        Phase::Copying => rc::MigrationPhase::Copying,
        Phase::SwitchingHome => rc::MigrationPhase::SwitchingHome,
        Phase::TombstoningSource => rc::MigrationPhase::TombstoningSource,
        Phase::Completed => rc::MigrationPhase::Completed,
        Phase::Failed => rc::MigrationPhase::Failed,
    }
}

fn unavailable(e: impl std::fmt::Display) -> WitError {
    WitError::Unavailable(e.to_string())
}

impl rc::Host for HostState {
    async fn sync_to_region(&mut self, events: Vec<types::EventData>) -> R<String> {
        let c = self.component();
        if events.is_empty() {
            return Ok(Err(WitError::Invalid("no events to sync".into())));
        }
        for e in &events {
            if let Err(e) = super::check_residency(&c.services, e.user.as_deref()).await {
                return Ok(Err(e));
            }
        }
        let events = events.into_iter().map(event_data_in).collect();
        let batch = match c.services.events.append_batch(&c.ns, events, true).await {
            Ok(b) => b,
            Err(e) => return Ok(Err(wit_error(e))),
        };
        Ok(match batch.last_outbox_seq {
            Some(seq) => Ok(sync_id(c.services.outbox.outbox_incarnation(), seq)),
            None => Err(wit_error(StoreError::Internal(
                "the batch was not queued for the region".into(),
            ))),
        })
    }

    async fn get_sync_status(&mut self, id: String) -> R<rc::SyncState> {
        let c = self.component();
        let outbox = &c.services.outbox;
        let Some((inc, seq)) = parse_sync_id(&id) else {
            return Ok(Err(WitError::NotFound));
        };
        if inc != outbox.outbox_incarnation() || seq == 0 {
            return Ok(Err(WitError::NotFound));
        }
        Ok(match outbox.outbox_positions() {
            Ok((last, _)) if seq > last => Err(WitError::NotFound),
            Ok((_, acked)) if seq <= acked => Ok(rc::SyncState::Forwarded),
            Ok(_) => Ok(rc::SyncState::Queued),
            Err(e) => Err(wit_error(e)),
        })
    }

    async fn subscribe_regional_updates(&mut self, filter: rc::UpdateFilter) -> R<u64> {
        let filter = Filter::Regional(UpdateFilter {
            kinds: filter.kinds,
            key_prefix: filter.key_prefix,
            edges: filter.edges,
        });
        Ok(super::subscribe(self.component(), filter).await)
    }

    async fn unsubscribe_regional_updates(&mut self, id: u64) -> R<()> {
        let c = self.component();
        Ok(c.services
            .regional
            .unsubscribe(Kind::Regional, c.ns.as_str(), id)
            .await
            .map_err(Into::into))
    }

    async fn migrate_user_region(
        &mut self,
        user: String,
        from_region: String,
        to_region: String,
    ) -> R<String> {
        let c = self.component();
        let subject = format!("user={user} {from_region}->{to_region}");
        if let Err(e) = super::audit_request(&c, "migrate-user-region", subject).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .migrations
            .begin(&user, &from_region, &to_region)
            .await
            .map_err(|e| match e {
                MigrationError::Invalid(m) => WitError::Invalid(m),
                MigrationError::Residency(m) => WitError::Residency(m),
                MigrationError::Conflict(m) => WitError::Conflict(m),
                MigrationError::Unavailable(m) => WitError::Unavailable(m),
            }))
    }

    async fn get_migration_status(&mut self, id: String) -> R<rc::MigrationStatus> {
        let c = self.component();
        Ok(match c.services.migrations.status(&id) {
            Ok(Some(m)) => Ok(rc::MigrationStatus {
                id: m.id,
                user: m.user,
                from_region: m.from,
                to_region: m.to,
                phase: phase(m.phase),
                detail: m.detail,
            }),
            Ok(None) => Err(WitError::NotFound),
            Err(e) => Err(WitError::Internal(e)),
        })
    }

    async fn get_regional_user_state(&mut self, user: String) -> R<rc::UserState> {
        let c = self.component();
        let s = &c.services;
        let state = s.regional.users.get(c.ns.as_str(), &user);
        let home = match s.directory.home(&user).await {
            Ok(h) => h.map(|(region, _)| region),
            Err(e) => return Ok(Err(unavailable(e))),
        };
        let (home_region, state) = match (home, state) {
            (None, None) => return Ok(Err(WitError::NotFound)),
            (Some(h), st) => (h, st),
            // Seen here, never placed: it lives where it is seen.
            (None, st) => (s.regional.region.clone(), st),
        };
        Ok(Ok(match state {
            Some(st) => rc::UserState {
                user,
                home_region,
                online_edges: st.online_edges,
                last_seen: Some(hlc(st.last_seen)),
                last_seen_edge: Some(st.last_seen_edge),
                last_activity: Some(st.last_activity.kind),
            },
            None => rc::UserState {
                user,
                home_region,
                online_edges: vec![],
                last_seen: None,
                last_seen_edge: None,
                last_activity: None,
            },
        }))
    }

    async fn record_metric(&mut self, metric_type: String, value: f64) -> R<()> {
        let c = self.component();
        let f = c.services.edge.record_metric(&c.ns, metric_type, value);
        Ok(f.await.map_err(wit_error))
    }

    async fn get_regional_metrics(
        &mut self,
        metric_type: String,
        range: types::TimeRange,
    ) -> R<types::Metrics> {
        let c = self.component();
        if range.start_ms > range.end_ms {
            return Ok(Err(WitError::Invalid(format!(
                "range starts ({}) after it ends ({})",
                range.start_ms, range.end_ms
            ))));
        }
        let view = &c.services.regional.metrics;
        let points = view
            .query(c.ns.as_str(), &metric_type, range.start_ms, range.end_ms)
            .into_iter()
            .map(|p| types::MetricPoint {
                start_ms: p.start_ms,
                count: p.count,
                sum: p.sum,
                min: p.min,
                max: p.max,
            })
            .collect();
        Ok(Ok(types::Metrics {
            metric_type,
            region: c.services.regional.region.clone(),
            range,
            resolution_ms: view.resolution_ms(),
            points,
        }))
    }

    async fn update_regional_leaderboard(
        &mut self,
        category: String,
        updates: Vec<rc::ScoreUpdate>,
    ) -> R<()> {
        let c = self.component();
        let updates = updates.into_iter().map(|u| (u.member, u.delta)).collect();
        let f = c
            .services
            .sync
            .leaderboard_update(&c.ns, Scope::Region, &category, updates);
        Ok(f.await.map_err(wit_error))
    }

    async fn get_regional_leaderboard(
        &mut self,
        category: String,
        limit: u32,
    ) -> R<Vec<types::LeaderboardEntry>> {
        let c = self.component();
        Ok(c.services
            .sync
            .leaderboard_top(&c.ns, Scope::Region, &category, limit)
            .map(|rows| {
                rows.into_iter()
                    .map(|(rank, member, score)| types::LeaderboardEntry {
                        rank,
                        member,
                        score,
                    })
                    .collect()
            })
            .map_err(wit_error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_ids_round_trip_and_reject_garbage() {
        let id = sync_id(0xabc, 42);
        assert_eq!(id, "0000000000000abc-42");
        assert_eq!(parse_sync_id(&id), Some((0xabc, 42)));
        for bad in [
            "",
            "42",
            "abc-42",
            "0000000000000abc-",
            "zzzzzzzzzzzzzzzz-1",
        ] {
            assert_eq!(parse_sync_id(bad), None, "{bad}");
        }
    }
}
