//! Regional and global coordination (DESIGN §5): what moves data between an
//! edge, its region and the globe over the bus.
//!
//! - [`start_forwarder`]: the outbox → region stream forwarder;
//! - [`envelope`]: CloudEvents 1.0 JSON envelopes of everything Keel puts on
//!   shared streams;
//! - [`Dedup`]: exactly-once-in-effect application on the consumer side.

mod dedup;
pub mod envelope;
mod forwarder;

pub use dedup::Dedup;
pub use forwarder::{ForwarderOptions, edge_events_subject, start_forwarder};
