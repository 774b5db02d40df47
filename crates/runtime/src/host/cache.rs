//! `keel:platform/cache`: the node's [`keel_cache::TieredCache`] in the
//! component's namespace, with the component's `cache-loader` export (if
//! any) as the loader of last resort.

use super::WitError;
use crate::LoadedComponent;
use crate::state::HostState;
use keel_cache::{CacheError, Loaded, Loader, Scope, Target};
use keel_world::bindings::keel::platform::cache as wit;
use keel_world::bindings::keel::platform::types;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn cache_scope(s: types::Scope) -> Scope {
    match s {
        types::Scope::Edge => Scope::Edge,
        types::Scope::Region => Scope::Region,
        types::Scope::Global => Scope::Global,
    }
}

pub(crate) fn cache_error(e: CacheError) -> WitError {
    match e {
        CacheError::Invalid(m) => WitError::Invalid(m),
        CacheError::Limit(m) => WitError::Limit(m),
        CacheError::Unavailable(m) => WitError::Unavailable(m),
    }
}

/// The component's `cache-loader` export.
struct ComponentLoader(Arc<LoadedComponent>);

#[async_trait::async_trait]
impl Loader for ComponentLoader {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, CacheError> {
        self.0.load_cache_entry(key).await
    }
}

impl wit::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, WitError>> {
        let c = self.component();
        let loader = c
            .component
            .upgrade()
            .filter(|me| me.exports_cache_loader())
            .map(ComponentLoader);
        let found = if self.in_cache_loader {
            c.services.cache.get_without_loader(&c.ns, &key).await
        } else {
            c.services
                .cache
                .get(&c.ns, &key, loader.as_ref().map(|l| l as &dyn Loader))
                .await
        };
        Ok(found.map(|v| v.map(|v| v.to_vec())).map_err(cache_error))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_seconds: Option<u32>,
        scope: types::Scope,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        Ok(c.services
            .cache
            .set(
                &c.ns,
                &key,
                value,
                ttl_seconds.map(|s| Duration::from_secs(s.into())),
                cache_scope(scope),
            )
            .await
            .map_err(cache_error))
    }

    async fn invalidate(
        &mut self,
        target: wit::InvalidationTarget,
        scope: types::Scope,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        let target = match target {
            wit::InvalidationTarget::Key(k) => Target::Key(k),
            wit::InvalidationTarget::Prefix(p) => Target::Prefix(p),
        };
        Ok(c.services
            .cache
            .invalidate(&c.ns, target, cache_scope(scope))
            .await
            .map_err(cache_error))
    }
}
