//! Regional and global coordination (DESIGN §5): what moves data between an
//! edge, its region and the globe over the bus.
//!
//! - [`start_forwarder`]: the outbox → region stream forwarder;
//! - [`envelope`]: CloudEvents 1.0 JSON envelopes of everything Keel puts on
//!   shared streams;
//! - [`Dedup`]: exactly-once-in-effect application on the consumer side;
//! - [`start_feed`]: the consumer side of a region's stream, in order, each
//!   write once in effect, into a [`FeedHandler`];
//! - [`views`]: regional views built by feeds ([`UserStateView`],
//!   [`MetricsView`]);
//! - [`directory`]: the global user directory (user → home region, CAS);
//! - [`migration`]: resumable user migrations between regions;
//! - [`shred`]: per-user data keys sealing personal payloads on streams,
//!   destroyed by an erasure (crypto-shredding).

mod dedup;
pub mod directory;
pub mod envelope;
mod feed;
mod forwarder;
pub mod migration;
pub mod shred;
pub mod views;

pub use dedup::Dedup;
pub use feed::{BatchLimit, FeedHandle, FeedHandler, FeedOptions, start_feed};
pub use forwarder::{
    ForwarderOptions, GLOBAL_EVENTS_PREFIX, GlobalRoute, edge_events_subject, global_stream,
    start_forwarder,
};
pub use views::{
    DISPLAY_NAME_ATTRIBUTE, LastActivity, METRIC_TYPE, MetricPoint, MetricsView, USAGE_EVENT_TYPE,
    UsageTotal, UsageView, UserHit, UserSearch, UserState, UserStateView, metric_event_data,
};
