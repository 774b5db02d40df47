//! The wasmtime side of Keel: one [`Engine`] per process, components compiled
//! (or loaded from the on-disk artifact cache), linked deny-by-default
//! against their grants, and instantiated fresh for every request.
//!
//! Invariants:
//! - Every request gets a new `Store` and instance from a cached
//!   `InstancePre`; nothing a guest does survives its request.
//! - Limits are always on: memory (limiter + pool cap), epoch deadline,
//!   instance/table counts, concurrent instances per component.
//! - A component loads only if every import is either a WASI 0.2 interface
//!   (linked with an empty capability context) or a granted, implemented
//!   `keel:platform` interface.

mod body;
mod cache;
pub mod cluster;
mod engine;
mod global;
mod host;
mod linking;
pub mod live;
mod privacy;
mod regional;
mod services;
mod state;

pub use body::{BodyLimitFlag, LimitedBody};
pub use regional::{Filter, GlobalFilter, Kind as SubscriptionKind, RegionalTier, UpdateFilter};
pub use services::{Services, verify_audit};
pub use state::{ComponentContext, HostState};
pub use wasmtime_wasi_http::Error as HttpError;
pub use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use bytes::Bytes;
use keel_config::{ComponentConfig, Diagnostic, Diagnostics, KeelConfig};
use keel_telemetry::{ComponentMetrics, Metrics};
use keel_world::bindings::exports::keel::platform::cache_loader::GuestIndices as CacheLoaderIndices;
use keel_world::bindings::exports::keel::platform::subscriber::GuestIndices as SubscriberIndices;
use keel_world::bindings::keel::platform::types as wit;
use sha2::Digest as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

/// After the epoch deadline, how long the host waits for a guest that is
/// blocked in a host call before dropping its store.
const HARD_DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// The loaded runtime: engine plus every component of `keel.toml`.
pub struct Runtime {
    components: Vec<Arc<LoadedComponent>>,
    services: Option<Arc<Services>>,
    _epoch: engine::EpochTicker,
}

/// One component, ready to serve.
pub struct LoadedComponent {
    pub config: ComponentConfig,
    /// sha256 of the `.wasm` file.
    pub digest: String,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Whether the compiled artifact came from the on-disk cache.
    pub from_cache: bool,
    pub load_time: Duration,
    pub metrics: ComponentMetrics,
    pre: ProxyPre<HostState>,
    /// The exported `keel:platform/subscriber`, if any.
    subscriber: Option<SubscriberIndices>,
    /// The exported `keel:platform/cache-loader`, if any.
    cache_loader: Option<CacheLoaderIndices>,
    /// `None` only for `keel check`, which never serves.
    context: Option<Arc<ComponentContext>>,
    permits: Arc<Semaphore>,
}

/// What a subscriber call delivers.
enum Delivery {
    Updates(Vec<wit::Update>),
    Global(Vec<wit::ReceivedGlobalEvent>),
}

/// Why a request did not get a response from the guest: it trapped,
/// panicked, hit a limit or the deadline. The string is for operators (logs),
/// never for clients.
#[derive(Debug)]
pub struct GuestFailure(pub String);

impl Runtime {
    /// Compiles (or loads from cache) and links every component. Errors are
    /// diagnostics pointing into `keel.toml`. `services` is `None` only when
    /// checking without serving.
    pub fn load(
        config: &KeelConfig,
        metrics: &Metrics,
        services: Option<Arc<Services>>,
    ) -> Result<Runtime, Diagnostics> {
        let engine = engine::build(config).map_err(|e| {
            Diagnostics::one(Diagnostic::file(
                &config.path,
                format!("cannot configure the wasm engine: {e:#}"),
            ))
        })?;
        let cache = cache::ArtifactCache::new(&engine, &config.server.data_dir);
        let mut diags = Vec::new();
        let mut components = Vec::new();
        for c in &config.components {
            match load_component(&engine, &cache, c, metrics, services.as_ref()) {
                Ok(lc) => components.push(lc),
                Err(mut d) => diags.append(&mut d),
            }
        }
        if !diags.is_empty() {
            return Err(Diagnostics(diags));
        }
        let epoch = engine::EpochTicker::start(&engine);
        if let Some(s) = &services {
            let source = cluster::SnapshotSource::new(
                s,
                metrics,
                components
                    .iter()
                    .map(|c| (c.config.name.clone(), c.metrics.clone()))
                    .collect(),
            );
            s.cluster
                .start(source, s.global_bus.clone(), s.background());
            let (s, all) = (s.clone(), components.clone());
            s.clone()
                .background()
                .spawn(async move { s.regional.restore(&all).await });
        }
        Ok(Runtime {
            components,
            services,
            _epoch: epoch,
        })
    }

    pub fn components(&self) -> &[Arc<LoadedComponent>] {
        &self.components
    }

    /// The node's adapters (`None` for `keel check`).
    pub fn services(&self) -> Option<&Arc<Services>> {
        self.services.as_ref()
    }

    /// The component serving `path`: exact routes win over prefixes, longer
    /// prefixes over shorter ones.
    pub fn route(&self, path: &str) -> Option<&Arc<LoadedComponent>> {
        self.components
            .iter()
            .filter(|c| c.config.route.matches(path))
            .max_by_key(|c| (!c.config.route.wildcard, c.config.route.path.len()))
    }
}

/// `keel check`: everything `Runtime::load` verifies, without serving.
/// Compiles each component (using and filling the artifact cache).
pub fn check(config: &KeelConfig) -> Result<Vec<String>, Diagnostics> {
    keel_auth::Authenticator::from_config(&config.auth)?;
    let metrics = Metrics::new();
    let rt = Runtime::load(config, &metrics, None)?;
    Ok(rt
        .components
        .iter()
        .map(|c| {
            format!(
                "{}: {} -> {} ({} imports, grants [{}])",
                c.config.name,
                c.config.route,
                c.config.wasm.display(),
                c.imports.len(),
                c.config
                    .grants
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect())
}

fn load_component(
    engine: &Engine,
    cache: &cache::ArtifactCache,
    c: &ComponentConfig,
    metrics: &Metrics,
    services: Option<&Arc<Services>>,
) -> Result<Arc<LoadedComponent>, Vec<Diagnostic>> {
    let started = Instant::now();
    let at_wasm = |msg: String| {
        vec![Diagnostic::new(
            c.wasm_location.clone(),
            format!("components.{}.wasm", c.name),
            msg,
        )]
    };
    let bytes = std::fs::read(&c.wasm)
        .map_err(|e| at_wasm(format!("cannot read {}: {e}", c.wasm.display())))?;
    if wasmparser::Parser::is_core_wasm(&bytes) {
        return Err(at_wasm(format!(
            "{} is a core wasm module, not a component; componentize it (`make guests` does this for components/)",
            c.wasm.display()
        )));
    }
    if !wasmparser::Parser::is_component(&bytes) {
        return Err(at_wasm(format!(
            "{} is not a WebAssembly component (bad magic/version header)",
            c.wasm.display()
        )));
    }
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    let (component, from_cache) = cache
        .load_or_compile(&digest, &bytes)
        .map_err(|e| at_wasm(format!("invalid component {}: {e:#}", c.wasm.display())))?;

    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();

    let mut diags = linking::check_grants(c);
    diags.extend(linking::check_imports(c, &imports));
    let env = resolve_env(c).map_err(|d| {
        diags.push(d);
    });
    if !diags.is_empty() {
        return Err(diags);
    }
    let env = env.unwrap_or_default();
    if !exports
        .iter()
        .any(|e| e.starts_with("wasi:http/incoming-handler@0.2"))
    {
        return Err(at_wasm(format!(
            "{} does not export wasi:http/incoming-handler@0.2.x (it exports: {}); Keel serves HTTP components",
            c.wasm.display(),
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        )));
    }
    let linker = linking::linker_for(engine, c).map_err(|e| at_wasm(format!("{e:#}")))?;
    let pre = linker
        .instantiate_pre(&component)
        .and_then(ProxyPre::new)
        .map_err(|e| at_wasm(format!("cannot link {}: {e:#}", c.wasm.display())))?;
    // The typed callers of the keel interfaces the component exports.
    let exported = |name: &str| {
        exports
            .iter()
            .any(|e| keel_world::interface_short_name(e) == Some(name))
    };
    let indices_error =
        |name: &str, e: wasmtime::Error| at_wasm(format!("keel:platform/{name} export: {e:#}"));
    let subscriber = exported("subscriber")
        .then(|| SubscriberIndices::new(pre.instance_pre()))
        .transpose()
        .map_err(|e| indices_error("subscriber", e))?;
    let cache_loader = exported("cache-loader")
        .then(|| CacheLoaderIndices::new(pre.instance_pre()))
        .transpose()
        .map_err(|e| indices_error("cache-loader", e))?;
    Ok(Arc::new_cyclic(|this| LoadedComponent {
        config: c.clone(),
        digest,
        imports,
        exports,
        from_cache,
        load_time: started.elapsed(),
        metrics: metrics.component(&c.name),
        pre,
        subscriber,
        cache_loader,
        context: services.map(|s| {
            Arc::new(ComponentContext {
                ns: keel_store::Namespace::new(&c.name)
                    .expect("config validated the component name as [a-z0-9_-]+"),
                services: s.clone(),
                component: this.clone(),
                env,
            })
        }),
        permits: Arc::new(Semaphore::new(c.limits.max_instances as usize)),
    }))
}

/// `[components.<name>.env]` with host variables read (now, at load: a
/// missing one is a load error naming where it is declared).
fn resolve_env(c: &ComponentConfig) -> Result<Vec<(String, String)>, Diagnostic> {
    c.env
        .iter()
        .map(|v| match &v.source {
            keel_config::EnvSource::Value(value) => Ok((v.name.clone(), value.clone())),
            keel_config::EnvSource::Host(host) => std::env::var(host)
                .map(|value| (v.name.clone(), value))
                .map_err(|e| {
                    Diagnostic::new(
                        v.location.clone(),
                        format!("components.{}.env.{}", c.name, v.name),
                        format!("host environment variable {host}: {e}; set it or write the value inline"),
                    )
                }),
        })
        .collect()
}

impl LoadedComponent {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the component exports `keel:platform/subscriber`.
    pub fn exports_subscriber(&self) -> bool {
        self.subscriber.is_some()
    }

    /// A fresh store for one call started at `started`: limits, deadline,
    /// and the epoch callback that enforces it.
    fn new_store(&self, started: Instant) -> Result<Store<HostState>, GuestFailure> {
        let deadline = started + self.config.limits.timeout;
        let context = self
            .context
            .clone()
            .ok_or_else(|| GuestFailure("runtime loaded without services".into()))?;
        let mut store = Store::new(
            self.pre.engine(),
            HostState::new(&self.config, context, deadline),
        );
        if !engine::limits_disabled() {
            store.limiter(|s| &mut s.limits);
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|cx| {
                if Instant::now() >= cx.data().deadline {
                    Ok(wasmtime::UpdateDeadline::Interrupt)
                } else {
                    // Yield every tick so one busy guest cannot starve the
                    // other requests of this worker thread. tokio's
                    // yield_now defers the wake-up until the I/O driver has
                    // been polled; wasmtime's plain `Yield` would not, and a
                    // spinning guest would delay new connections by ~60 ticks.
                    Ok(wasmtime::UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(tokio::task::yield_now()),
                    ))
                }
            });
        }
        Ok(store)
    }

    /// Calls the exported `subscriber.on-updates` in a fresh instance.
    pub(crate) async fn deliver_updates(
        self: &Arc<Self>,
        subscription: u64,
        updates: Vec<wit::Update>,
    ) -> Result<(), String> {
        let sequence = updates.first().map_or(0, |u| u.sequence);
        self.deliver(subscription, sequence, Delivery::Updates(updates))
            .await
    }

    /// Calls the exported `subscriber.on-global-events` in a fresh instance.
    pub(crate) async fn deliver_global_events(
        self: &Arc<Self>,
        subscription: u64,
        events: Vec<wit::ReceivedGlobalEvent>,
    ) -> Result<(), String> {
        self.deliver(subscription, 0, Delivery::Global(events))
            .await
    }

    /// One call of the exported `subscriber` in a fresh instance, under the
    /// component's limits (it waits for an instance slot). `Err` says why
    /// the delivery failed: a returned error, a trap, the deadline.
    async fn deliver(
        self: &Arc<Self>,
        subscription: u64,
        sequence: u64,
        delivery: Delivery,
    ) -> Result<(), String> {
        let indices = self
            .subscriber
            .as_ref()
            .ok_or("the component does not export keel:platform/subscriber")?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let outcome = self
            .call_export(Some(permit), false, async |store, instance| {
                let guest = indices.load(&mut *store, &instance)?;
                match &delivery {
                    Delivery::Updates(u) => guest.call_on_updates(store, subscription, u).await,
                    Delivery::Global(g) => {
                        guest.call_on_global_events(store, subscription, g).await
                    }
                }
            })
            .await
            .and_then(|r| r.map_err(|e| format!("the handler returned {e:?}")));
        self.metrics
            .observe_duration(started.elapsed().as_secs_f64());
        if let Err(reason) = &outcome {
            let events = match &delivery {
                Delivery::Updates(u) => u.len(),
                Delivery::Global(g) => g.len(),
            };
            tracing::warn!(component = %self.config.name, subscription, first_sequence = sequence, events, reason, "delivery failed; will retry");
        }
        outcome
    }

    /// Runs `call` on a fresh instance of the component, under its limits
    /// and deadline, then frees the pool slot, then `permit` (the instance
    /// slot, if the caller holds one for this call). `Err` is a trap or the
    /// deadline, described for operators and counted as a trap.
    async fn call_export<T>(
        &self,
        permit: Option<OwnedSemaphorePermit>,
        in_cache_loader: bool,
        call: impl AsyncFnOnce(
            &mut Store<HostState>,
            wasmtime::component::Instance,
        ) -> wasmtime::Result<T>,
    ) -> Result<T, String> {
        let mut store = self.new_store(Instant::now()).map_err(|f| f.0)?;
        store.data_mut().in_cache_loader = in_cache_loader;
        let timeout = self.config.limits.timeout;
        self.metrics.in_flight.inc();
        let run = async {
            let instance = self
                .pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await?;
            call(&mut store, instance).await
        };
        let outcome = tokio::time::timeout(timeout + HARD_DEADLINE_GRACE, run).await;
        drop(store);
        drop(permit);
        self.metrics.in_flight.dec();
        match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(trap)) => {
                self.metrics.traps.inc();
                Err(describe_guest_error(&trap, timeout))
            }
            Err(_) => {
                self.metrics.traps.inc();
                Err(format!(
                    "deadline of {timeout:?} exceeded while blocked in a host call; instance dropped"
                ))
            }
        }
    }

    /// Whether the component exports `keel:platform/cache-loader`.
    pub fn exports_cache_loader(&self) -> bool {
        self.cache_loader.is_some()
    }

    /// Calls the exported `cache-loader.load` in a fresh instance under the
    /// component's limits. It takes no instance slot: it runs on behalf of
    /// a call that holds one (waiting for another could deadlock a
    /// component limited to one instance). `Err` says why it failed.
    pub(crate) async fn load_cache_entry(
        self: &Arc<Self>,
        key: &str,
    ) -> Result<Option<keel_cache::Loaded>, keel_cache::CacheError> {
        use keel_cache::CacheError;
        let indices = self.cache_loader.as_ref().ok_or_else(|| {
            CacheError::Invalid("the component does not export keel:platform/cache-loader".into())
        })?;
        let outcome = self
            .call_export(None, true, async |store, instance| {
                indices
                    .load(&mut *store, &instance)?
                    .call_load(store, key)
                    .await
            })
            .await;
        match outcome {
            Ok(Ok(loaded)) => Ok(loaded.map(|l| keel_cache::Loaded {
                value: l.value,
                ttl: l.ttl_seconds.map(|s| Duration::from_secs(s.into())),
                scope: host::cache_scope(l.scope),
            })),
            Ok(Err(e)) => Err(CacheError::Unavailable(format!(
                "cache-loader returned an error: {e:?}"
            ))),
            Err(reason) => {
                tracing::warn!(component = %self.config.name, key, reason, "cache-loader failed");
                Err(CacheError::Unavailable(format!(
                    "cache-loader failed: {reason}"
                )))
            }
        }
    }

    /// Reserve one instance slot, or `None` when all are busy.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Runs one request in a fresh instance. The returned response may still
    /// be streaming its body from the guest; the guest task stays bounded by
    /// the component's deadline.
    pub async fn handle<B>(
        self: &Arc<Self>,
        req: hyper::Request<B>,
        permit: OwnedSemaphorePermit,
    ) -> Result<hyper::Response<HyperOutgoingBody>, GuestFailure>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<HttpError>,
    {
        let started = Instant::now();
        let mut store = self.new_store(started)?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let setup = (|| -> wasmtime::Result<_> {
            let req = store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, req)?;
            let out = store.data_mut().http().new_response_outparam(sender)?;
            Ok((req, out))
        })();
        let (req, out) = setup.map_err(|e| GuestFailure(format!("{e:#}")))?;

        let this = self.clone();
        let timeout = self.config.limits.timeout;
        let guest = tokio::spawn(async move {
            this.metrics.in_flight.inc();
            let run = async {
                let t = Instant::now();
                let proxy = this.pre.instantiate_async(&mut store).await?;
                this.metrics
                    .instantiation
                    .observe(t.elapsed().as_secs_f64());
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            let res = match tokio::time::timeout(timeout + HARD_DEADLINE_GRACE, run).await {
                Ok(r) => r.map_err(|e| describe_guest_error(&e, timeout)),
                Err(_) => Err(format!(
                    "deadline of {timeout:?} exceeded while blocked in a host call; instance dropped"
                )),
            };
            // Return the pool slot, then the instance permit, before the
            // gauge says the instance is gone.
            drop(store);
            drop(permit);
            this.metrics.in_flight.dec();
            res
        });

        match receiver.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(GuestFailure(format!(
                "guest answered with an error code: {code:?}"
            ))),
            // The sender went away with the store: the guest ended without
            // calling `response-outparam.set`. The task says why.
            Err(_) => Err(GuestFailure(match guest.await {
                Ok(Ok(())) => "guest returned without setting a response".to_string(),
                Ok(Err(msg)) => msg,
                Err(join) => format!("guest task failed: {join}"),
            })),
        }
    }
}

/// A trap message an operator can act on.
fn describe_guest_error(e: &wasmtime::Error, timeout: Duration) -> String {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!("deadline of {timeout:?} exceeded; guest interrupted"),
        Some(Trap::UnreachableCodeReached) => {
            format!("guest trapped (panic or abort): {e:#}")
        }
        _ => {
            let s = format!("{e:#}");
            if s.contains("forcing trap when growing memory")
                || s.contains("memory minimum size")
                || s.contains("growing memory")
            {
                format!("memory limit reached: {s}")
            } else {
                format!("guest trapped: {s}")
            }
        }
    }
}
