use super::{WitError, event_data_in, recorded_event, wit_error};
use crate::state::HostState;
use keel_world::bindings::keel::platform::{events, types};

/// Most events one `read` returns, whatever the guest asks for.
const MAX_READ: u32 = 1000;

impl events::Host for HostState {
    async fn append(&mut self, event: types::EventData) -> wasmtime::Result<Result<u64, WitError>> {
        let c = self.component();
        if let Err(e) = super::check_residency(&c.services, event.user.as_deref()).await {
            return Ok(Err(e));
        }
        Ok(c.services
            .events
            .append(&c.ns, event_data_in(event), false)
            .await
            .map(|e| e.sequence)
            .map_err(wit_error))
    }

    fn read(
        &mut self,
        from_sequence: u64,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<types::RecordedEvent>, WitError>> {
        let c = self.component();
        Ok(c.services
            .events
            .read(&c.ns, from_sequence, limit.min(MAX_READ) as usize)
            .map(|v| v.into_iter().map(recorded_event).collect())
            .map_err(wit_error))
    }

    fn last_sequence(&mut self) -> wasmtime::Result<Result<Option<u64>, WitError>> {
        let c = self.component();
        Ok(c.services.events.last_sequence(&c.ns).map_err(wit_error))
    }
}
