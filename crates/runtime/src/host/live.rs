//! `live`: node-local pushes to the component's browsers (see
//! [`crate::live::LiveHub`]).

use super::WitError;
use crate::live::LiveError;
use crate::state::HostState;
use keel_world::bindings::keel::platform::live;

impl live::Host for HostState {
    async fn publish(
        &mut self,
        channel: String,
        event: String,
        data: String,
    ) -> wasmtime::Result<Result<u32, WitError>> {
        let c = self.component();
        Ok(c.services
            .live
            .publish(c.ns.as_str(), &channel, &event, &data)
            .map_err(|e| match e {
                LiveError::Invalid(m) => WitError::Invalid(m),
                LiveError::Limit(m) => WitError::Limit(m),
            }))
    }
}
