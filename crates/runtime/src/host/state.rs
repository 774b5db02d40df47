use super::{WitError, wit_error};
use crate::state::HostState;
use keel_sync::Scope;
use keel_world::bindings::keel::platform::{state, types};

fn scope(s: types::Scope) -> Scope {
    match s {
        types::Scope::Edge => Scope::Edge,
        types::Scope::Region => Scope::Region,
        types::Scope::Global => Scope::Global,
    }
}

type R<T> = wasmtime::Result<Result<T, WitError>>;

impl state::Host for HostState {
    async fn counter_inc(&mut self, name: String, s: types::Scope, by: u64) -> R<i64> {
        let c = self.component();
        let f = c.services.sync.counter_inc(&c.ns, scope(s), &name, by);
        Ok(f.await.map_err(wit_error))
    }

    async fn counter_dec(&mut self, name: String, s: types::Scope, by: u64) -> R<i64> {
        let c = self.component();
        let f = c.services.sync.counter_dec(&c.ns, scope(s), &name, by);
        Ok(f.await.map_err(wit_error))
    }

    fn counter_value(&mut self, name: String, s: types::Scope) -> R<i64> {
        let c = self.component();
        Ok(c.services
            .sync
            .counter_value(&c.ns, scope(s), &name)
            .map_err(wit_error))
    }

    async fn set_add(&mut self, name: String, s: types::Scope, member: String) -> R<bool> {
        let c = self.component();
        let f = c.services.sync.set_add(&c.ns, scope(s), &name, member);
        Ok(f.await.map_err(wit_error))
    }

    async fn set_remove(&mut self, name: String, s: types::Scope, member: String) -> R<bool> {
        let c = self.component();
        let f = c.services.sync.set_remove(&c.ns, scope(s), &name, member);
        Ok(f.await.map_err(wit_error))
    }

    fn set_contains(&mut self, name: String, s: types::Scope, member: String) -> R<bool> {
        let c = self.component();
        Ok(c.services
            .sync
            .set_contains(&c.ns, scope(s), &name, &member)
            .map_err(wit_error))
    }

    fn set_members(&mut self, name: String, s: types::Scope) -> R<Vec<String>> {
        let c = self.component();
        Ok(c.services
            .sync
            .set_members(&c.ns, scope(s), &name)
            .map_err(wit_error))
    }

    async fn register_set(&mut self, name: String, s: types::Scope, value: Vec<u8>) -> R<()> {
        let c = self.component();
        let f = c.services.sync.register_set(&c.ns, scope(s), &name, value);
        Ok(f.await.map_err(wit_error))
    }

    fn register_get(&mut self, name: String, s: types::Scope) -> R<Option<Vec<u8>>> {
        let c = self.component();
        Ok(c.services
            .sync
            .register_get(&c.ns, scope(s), &name)
            .map_err(wit_error))
    }

    async fn map_set(
        &mut self,
        name: String,
        s: types::Scope,
        key: String,
        value: Vec<u8>,
    ) -> R<()> {
        let c = self.component();
        let f = c.services.sync.map_set(&c.ns, scope(s), &name, key, value);
        Ok(f.await.map_err(wit_error))
    }

    fn map_get(&mut self, name: String, s: types::Scope, key: String) -> R<Option<Vec<u8>>> {
        let c = self.component();
        Ok(c.services
            .sync
            .map_get(&c.ns, scope(s), &name, &key)
            .map_err(wit_error))
    }

    async fn map_remove(&mut self, name: String, s: types::Scope, key: String) -> R<bool> {
        let c = self.component();
        let f = c.services.sync.map_remove(&c.ns, scope(s), &name, key);
        Ok(f.await.map_err(wit_error))
    }

    fn map_keys(&mut self, name: String, s: types::Scope) -> R<Vec<String>> {
        let c = self.component();
        Ok(c.services
            .sync
            .map_keys(&c.ns, scope(s), &name)
            .map_err(wit_error))
    }

    fn map_entries(&mut self, name: String, s: types::Scope) -> R<Vec<(String, Vec<u8>)>> {
        let c = self.component();
        Ok(c.services
            .sync
            .map_entries(&c.ns, scope(s), &name)
            .map_err(wit_error))
    }
}
