//! Per-request store data.

use crate::services::Services;
use keel_config::ComponentConfig;
use keel_store::Namespace;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// What host calls of one component need: its namespace and the node's
/// adapters. Shared by all of the component's requests.
pub struct ComponentContext {
    pub ns: Namespace,
    pub services: Arc<Services>,
    /// The loaded component itself (weak: it owns this context), for host
    /// calls that register it, e.g. subscriptions.
    pub(crate) component: std::sync::Weak<crate::LoadedComponent>,
    /// `[components.<name>.env]`, resolved at load.
    pub(crate) env: Vec<(String, String)>,
}

/// Everything one request's `Store` holds.
pub struct HostState {
    component: Arc<ComponentContext>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: OutboundPolicy,
    pub(crate) limits: StoreLimits,
    /// Wall-clock deadline checked on every epoch tick.
    pub(crate) deadline: Instant,
    /// This instance runs the component's `cache-loader.load`: its own
    /// `cache.get` must not call the loader again (it would wait for itself).
    pub(crate) in_cache_loader: bool,
    /// Host memory held by this instance's open `sql.prepared` statements
    /// (their SQL and column names), capped at [`PREPARED_SQL_BUDGET`].
    pub(crate) prepared_sql_bytes: usize,
}

/// How much host memory one instance's prepared SQL statements may hold.
pub(crate) const PREPARED_SQL_BUDGET: usize = 1 << 20;

impl HostState {
    pub(crate) fn new(
        c: &ComponentConfig,
        component: Arc<ComponentContext>,
        deadline: Instant,
    ) -> Self {
        let limits = StoreLimitsBuilder::new()
            .memory_size(c.limits.memory as usize)
            .table_elements(c.limits.max_table_elements as usize)
            .instances(c.limits.max_core_instances as usize)
            .tables(64)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(100_000);
        // Empty capability context but for the declared environment: no
        // args, preopens or sockets; stdio closed/discarded.
        let wasi = WasiCtx::builder()
            .max_random_size(1 << 20)
            .envs(&component.env)
            .build();
        HostState {
            component,
            wasi,
            http: WasiHttpCtx::new(),
            table,
            outbound: OutboundPolicy {
                allowed: c.allowed_outbound_hosts.clone(),
            },
            limits,
            deadline,
            in_cache_loader: false,
            prepared_sql_bytes: 0,
        }
    }
}

impl HostState {
    /// The calling component's context (cheap clone, so host calls can hold
    /// it across awaits without borrowing the store).
    pub(crate) fn component(&self) -> Arc<ComponentContext> {
        self.component.clone()
    }

    /// The calling component's context and this instance's resources,
    /// borrowed together.
    pub(crate) fn component_and_table(&mut self) -> (&ComponentContext, &mut ResourceTable) {
        (&self.component, &mut self.table)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Outgoing HTTP: refused unless the origin is in `allowed-outbound-hosts`.
struct OutboundPolicy {
    allowed: Vec<String>,
}

impl OutboundPolicy {
    fn permits(&self, uri: &http::Uri) -> bool {
        let scheme = uri.scheme_str().unwrap_or("https");
        let Some(authority) = uri.authority() else {
            return false;
        };
        let origin = format!("{scheme}://{authority}");
        let origin_default_port = format!("{scheme}://{}", authority.host());
        self.allowed.iter().any(|a| {
            a == "*" || *a == origin || (authority.port().is_none() && *a == origin_default_port)
        })
    }
}

impl wasmtime_wasi_http::WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        _ = fut;
        let permitted = self.permits(request.uri());
        Box::new(async move {
            use http_body_util::BodyExt;
            if !permitted {
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            // Clamp the crate's 600 s defaults: a guest must not hold a
            // connection longer than a request may live.
            let cap = std::time::Duration::from_secs(30);
            let mut o = options.unwrap_or_default();
            o.connect_timeout = Some(o.connect_timeout.unwrap_or(cap).min(cap));
            o.first_byte_timeout = Some(o.first_byte_timeout.unwrap_or(cap).min(cap));
            o.between_bytes_timeout = Some(o.between_bytes_timeout.unwrap_or(cap).min(cap));
            let (res, io) = wasmtime_wasi_http::default_send_request(request, Some(o)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}
