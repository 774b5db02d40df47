use super::{WitError, wit_error};
use crate::state::HostState;
use keel_world::bindings::keel::platform::kv;

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, WitError>> {
        let c = self.component();
        Ok(c.services.kv.get(&c.ns, &key).map_err(wit_error))
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        Ok(c.services
            .kv
            .set(&c.ns, key, value)
            .await
            .map_err(wit_error))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), WitError>> {
        let c = self.component();
        Ok(c.services.kv.delete(&c.ns, key).await.map_err(wit_error))
    }

    fn exists(&mut self, key: String) -> wasmtime::Result<Result<bool, WitError>> {
        let c = self.component();
        Ok(c.services.kv.exists(&c.ns, &key).map_err(wit_error))
    }

    fn list_keys(
        &mut self,
        prefix: String,
        cursor: Option<String>,
    ) -> wasmtime::Result<Result<kv::KeyPage, WitError>> {
        let c = self.component();
        let page = c.services.limits.list_page;
        // One extra key tells whether another page exists.
        let mut keys = match c
            .services
            .kv
            .list_keys(&c.ns, &prefix, cursor.as_deref(), page + 1)
        {
            Ok(k) => k,
            Err(e) => return Ok(Err(wit_error(e))),
        };
        let next_cursor = if keys.len() > page {
            keys.truncate(page);
            keys.last().cloned()
        } else {
            None
        };
        Ok(Ok(kv::KeyPage { keys, next_cursor }))
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new_value: Vec<u8>,
    ) -> wasmtime::Result<Result<bool, WitError>> {
        let c = self.component();
        Ok(c.services
            .kv
            .compare_and_swap(&c.ns, key, expected, new_value)
            .await
            .map_err(wit_error))
    }
}
