//! Host sides of the `keel:platform` interfaces. Each call runs in the
//! calling component's namespace; expected failures are WIT `error`s, and a
//! `wasmtime::Error` (which traps the guest) is reserved for host bugs.

mod cache;
mod edge;
mod events;
mod global;
mod kv;
mod ledger;
mod live;
mod regional;
mod sql;
mod state;

pub(crate) use cache::cache_scope;

use crate::state::HostState;
use keel_store::StoreError;
use keel_world::bindings::keel::platform::types;

pub(crate) use types::Error as WitError;

impl types::Host for HostState {}

pub(crate) fn wit_error(e: StoreError) -> WitError {
    match e {
        StoreError::Invalid(m) => WitError::Invalid(m),
        StoreError::Limit(m) => WitError::Limit(m),
        StoreError::Unavailable(m) => WitError::Unavailable(m),
        StoreError::Conflict(m) => WitError::Conflict(m),
        StoreError::Internal(m) => {
            tracing::error!(error = %m, "store internal error");
            WitError::Internal(m)
        }
    }
}

/// Appends `operation`'s outcome (called by component `c`) to the audit
/// trail and returns `result` — or, if the trail cannot be written,
/// `unavailable`: no audited operation answers without its record.
pub(crate) async fn audited<T>(
    c: &crate::state::ComponentContext,
    operation: &str,
    subject: String,
    result: Result<T, WitError>,
) -> Result<T, WitError> {
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {}", error_case(e)),
    };
    audit(c, operation, subject, outcome).await?;
    result
}

/// Records that `operation` is about to run (outcome `requested`): for
/// operations that change things, so none starts without its record.
pub(crate) async fn audit_request(
    c: &crate::state::ComponentContext,
    operation: &str,
    subject: String,
) -> Result<(), WitError> {
    audit(c, operation, subject, "requested".into()).await
}

async fn audit(
    c: &crate::state::ComponentContext,
    operation: &str,
    subject: String,
    outcome: String,
) -> Result<(), WitError> {
    let event = keel_ledger::audit::AuditEvent {
        actor: format!("{}@{}", c.ns, c.services.node.edge),
        operation: operation.to_string(),
        subject,
        outcome,
        region: c.services.node.region.clone(),
        edge: c.services.node.edge.clone(),
    };
    c.services
        .audit
        .append(event)
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::error!(operation, error = %e, "audit trail append failed");
            WitError::Unavailable(format!("the audit trail could not be written: {e}"))
        })
}

/// The WIT case name of an error.
fn error_case(e: &WitError) -> &'static str {
    match e {
        WitError::NotFound => "not-found",
        WitError::Denied(_) => "denied",
        WitError::Invalid(_) => "invalid",
        WitError::Unavailable(_) => "unavailable",
        WitError::Conflict(_) => "conflict",
        WitError::Residency(_) => "residency",
        WitError::Limit(_) => "limit",
        WitError::Internal(_) => "internal",
    }
}

/// A global event type: dot-separated tokens of `[A-Za-z0-9_-]` (it becomes
/// the NATS subject `keel.global.events.<type>`), at most 128 bytes.
pub(crate) fn is_event_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `error.residency` if `user`'s personal data may not be placed in this
/// node's region: the user's home (global directory, cached for seconds)
/// keeps data in its residency zone. A user the directory does not know
/// lives where it is seen. When the directory cannot be reached (a
/// partition) the write goes ahead: edge operations keep working cut off,
/// and users are placed (authenticated, migrated) through their home region.
pub(crate) async fn check_residency(
    services: &crate::Services,
    user: Option<&str>,
) -> Result<(), WitError> {
    let Some(user) = user else {
        return Ok(());
    };
    if services.regions.is_none() {
        return Ok(());
    }
    let here = &services.node.region;
    match services.directory.home_cached(user).await {
        Ok(Some(home)) if !services.residency.allows(&home, here) => {
            Err(WitError::Residency(format!(
                "user {user:?} is homed in {home}; their personal data may not be placed in {here}"
            )))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::debug!(user, error = %e, "directory unreachable; residency not checked");
            Ok(())
        }
    }
}

/// Subscribes the calling component (regional or global, by the filter).
pub(crate) async fn subscribe(
    c: std::sync::Arc<crate::ComponentContext>,
    filter: crate::regional::Filter,
) -> Result<u64, WitError> {
    let Some(me) = c.component.upgrade() else {
        return Err(WitError::Unavailable("the node is shutting down".into()));
    };
    c.services
        .regional
        .subscribe(&me, filter)
        .await
        .map_err(Into::into)
}

pub(crate) fn hlc(h: keel_core::Hlc) -> types::HlcTimestamp {
    types::HlcTimestamp {
        physical_ms: h.physical_ms,
        logical: h.logical,
        node: h.node,
    }
}

pub(crate) fn event_data_in(e: types::EventData) -> keel_store::EventData {
    keel_store::EventData {
        kind: e.kind,
        key: e.key,
        payload: e.payload,
        content_type: e.content_type,
        user: e.user,
    }
}

pub(crate) fn recorded_event(e: keel_store::StoredEvent) -> types::RecordedEvent {
    types::RecordedEvent {
        id: e.id,
        sequence: e.sequence,
        origin: e.origin,
        region: e.region,
        at: hlc(e.at),
        data: types::EventData {
            kind: e.data.kind,
            key: e.data.key,
            payload: e.data.payload,
            content_type: e.data.content_type,
            user: e.data.user,
        },
    }
}

/// Adds the host side of one granted interface to `linker`.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
    interface: &str,
) -> wasmtime::Result<()> {
    use keel_world::bindings::keel::platform as p;
    use wasmtime::component::HasSelf;
    match interface {
        "cache" => p::cache::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "kv" => p::kv::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "ledger" => p::ledger::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "live" => p::live::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "sql" => p::sql::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "events" => p::events::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "state" => p::state::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s),
        "global-coordination" => {
            p::global_coordination::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s)
        }
        "regional-coordination" => {
            p::regional_coordination::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s)
        }
        "edge-operations" => {
            p::edge_operations::add_to_linker::<_, HasSelf<HostState>>(linker, |s| s)
        }
        other => Err(wasmtime::Error::msg(format!(
            "no host implementation for keel:platform/{other}"
        ))),
    }
}
