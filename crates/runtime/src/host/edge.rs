use super::{WitError, event_data_in, hlc, wit_error};
use crate::state::HostState;
use keel_store::Activity;
use keel_world::bindings::keel::platform::edge_operations as edge;
use keel_world::bindings::keel::platform::types;
use std::time::Duration;

fn auth_error(e: keel_auth::AuthError) -> types::AuthError {
    use keel_auth::AuthError as A;
    match e {
        A::Expired => types::AuthError::Expired,
        A::NotYetValid => types::AuthError::NotYetValid,
        A::BadSignature => types::AuthError::BadSignature,
        A::Malformed(m) => types::AuthError::Malformed(m),
        A::UnknownKey(k) => types::AuthError::UnknownKey(k),
        A::UnsupportedAlgorithm(a) => types::AuthError::UnsupportedAlgorithm(a),
        A::ClaimMismatch(m) => types::AuthError::ClaimMismatch(m),
        A::Unavailable(m) => types::AuthError::Unavailable(m),
        A::Revoked => types::AuthError::Revoked,
    }
}

impl edge::Host for HostState {
    fn local_node(&mut self) -> wasmtime::Result<edge::NodeLocation> {
        let c = self.component();
        Ok(edge::NodeLocation {
            edge: c.services.node.edge.clone(),
            region: c.services.node.region.clone(),
        })
    }

    async fn record_local_event(
        &mut self,
        event: types::EventData,
    ) -> wasmtime::Result<Result<String, WitError>> {
        let c = self.component();
        if let Err(e) = super::check_residency(&c.services, event.user.as_deref()).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .events
            .append(&c.ns, event_data_in(event), true)
            .await
            .map(|e| e.id)
            .map_err(wit_error))
    }

    fn get_local_state(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<edge::StateValue, WitError>> {
        let c = self.component();
        Ok(match c.services.edge.get_state(&c.ns, &key) {
            Ok(Some(v)) => Ok(edge::StateValue {
                value: v.value,
                version: v.version,
                updated_at: hlc(v.updated_at),
            }),
            Ok(None) => Err(WitError::NotFound),
            Err(e) => Err(wit_error(e)),
        })
    }

    async fn set_local_state(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<u64, WitError>> {
        let c = self.component();
        Ok(c.services
            .edge
            .set_state(&c.ns, key, value)
            .await
            .map_err(wit_error))
    }

    async fn update_local_cache(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_seconds: u32,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        Ok(c.services
            .cache
            .set(
                &c.ns,
                &key,
                value,
                Some(Duration::from_secs(ttl_seconds.into())),
                keel_cache::Scope::Edge,
            )
            .await
            .map_err(super::cache::cache_error))
    }

    async fn authenticate_user(
        &mut self,
        token: String,
    ) -> wasmtime::Result<Result<edge::UserSession, types::AuthError>> {
        let c = self.component();
        let session = match c.services.auth.authenticate(&token) {
            Ok(s) => s,
            Err(e) => return Ok(Err(auth_error(e))),
        };
        // The global directory names the home region; a user it does not
        // know is homed here (claimed by compare-and-set: the first region
        // wins). Cut off from it, the edge's own copy answers.
        let mut global_home = None;
        if c.services.regions.is_some() {
            let d = &c.services.directory;
            let home = match d.home_cached(&session.user).await {
                Ok(Some(h)) => Ok(h),
                Ok(None) => d.claim(&session.user, &c.services.node.region).await,
                Err(e) => Err(e),
            };
            match home {
                Ok(h) => global_home = Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "directory unreachable; using this edge's copy")
                }
            }
        }
        // The directory copy on this edge names the home region; a user first
        // seen here is homed in this region.
        let home_region = match global_home {
            Some(h) => h,
            None => match c.services.edge.user_region(&session.user) {
                Ok(Some(r)) => r,
                Ok(None) => match c
                    .services
                    .edge
                    .register_user(session.user.clone(), c.services.node.region.clone())
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(types::AuthError::Unavailable(e.to_string()))),
                },
                Err(e) => return Ok(Err(types::AuthError::Unavailable(e.to_string()))),
            },
        };
        Ok(Ok(edge::UserSession {
            user: session.user,
            session_id: session.session_id,
            home_region,
            issued_at_ms: session.issued_at_ms,
            expires_at_ms: session.expires_at_ms,
            scopes: session.scopes,
            claims: session.claims,
        }))
    }

    async fn get_user_region(
        &mut self,
        user: String,
    ) -> wasmtime::Result<Result<String, WitError>> {
        let c = self.component();
        if c.services.regions.is_some()
            && let Ok(Some(home)) = c.services.directory.home_cached(&user).await
        {
            return Ok(Ok(home));
        }
        Ok(match c.services.edge.user_region(&user) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(WitError::NotFound),
            Err(e) => Err(wit_error(e)),
        })
    }

    fn get_user_preferences(
        &mut self,
        user: String,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, WitError>> {
        let c = self.component();
        Ok(c.services.edge.preferences(&c.ns, &user).map_err(wit_error))
    }

    async fn set_user_preference(
        &mut self,
        user: String,
        name: String,
        value: Option<String>,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        if let Err(e) = super::check_residency(&c.services, Some(&user)).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .edge
            .set_preference(&c.ns, user, name, value)
            .await
            .map_err(wit_error))
    }

    async fn record_user_activity(
        &mut self,
        user: String,
        activity: edge::ActivityData,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        if let Err(e) = super::check_residency(&c.services, Some(&user)).await {
            return Ok(Err(e));
        }
        let activity = Activity {
            kind: activity.kind,
            attributes: activity.attributes,
        };
        Ok(c.services
            .edge
            .record_activity(&c.ns, user, activity)
            .await
            .map_err(wit_error))
    }
}
