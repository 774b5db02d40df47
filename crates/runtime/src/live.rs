//! Live delivery to browsers: the node-local hub behind `live.publish` and
//! `GET /_keel/live/<component>` (server-sent events; see `wit/live.wit`).
//!
//! Invariants:
//! - **Never waits for a browser.** A publish queues the encoded event on
//!   each subscribed connection without blocking; a connection whose queue
//!   is full is closed (the browser reconnects and re-reads history), so a
//!   slow reader costs nobody else anything.
//! - **Node-local, at most once.** Nothing here crosses the bus: components
//!   replicate through events and state and publish on each node.
//! - **Bounded.** Connections per node, per (component, user) and channels
//!   per connection are capped; a refused connection changes nothing.
//! - **Components stay apart.** Channels are keyed by component: one
//!   component can neither publish to nor read another's channels.

use bytes::Bytes;
use keel_config::{MAX_LIVE_CHANNEL_BYTES, is_live_channel_byte};
use keel_telemetry::LiveMetrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Open connections on one node.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Open connections of one user to one component (tabs, devices).
pub const MAX_CONNECTIONS_PER_USER: usize = 16;
/// Channels one connection subscribes to.
pub const MAX_CHANNELS_PER_CONNECTION: usize = 32;
/// Events queued for one connection before it counts as too slow.
pub const QUEUE_EVENTS: usize = 256;
/// Bytes of one event's data.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
const MAX_EVENT_NAME_BYTES: usize = 64;

/// Why a publish or a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Limit(String),
}

/// Checks a channel name (also used for the ones a browser asks for).
pub fn check_channel(channel: &str) -> Result<(), LiveError> {
    if channel.is_empty()
        || channel.len() > MAX_LIVE_CHANNEL_BYTES
        || !channel.bytes().all(is_live_channel_byte)
    {
        return Err(LiveError::Invalid(format!(
            "channel {channel:?}: accepted: 1-{MAX_LIVE_CHANNEL_BYTES} bytes of A-Z a-z 0-9 _ . : @ / -"
        )));
    }
    Ok(())
}

fn check_event(event: &str) -> Result<(), LiveError> {
    if event.is_empty()
        || event.len() > MAX_EVENT_NAME_BYTES
        || !event
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(LiveError::Invalid(format!(
            "event name {event:?}: accepted: 1-{MAX_EVENT_NAME_BYTES} bytes of A-Z a-z 0-9 _ . -"
        )));
    }
    Ok(())
}

/// One SSE event on the wire: `event:` then one `data:` line per line of
/// `data` (SSE joins them back with newlines).
pub fn encode_event(event: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(event.len() + data.len() + 16);
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

type ChannelKey = (String, String);

struct Connection {
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Registry {
    channels: HashMap<ChannelKey, Vec<Arc<Connection>>>,
    /// Channels of each open connection (to unregister it).
    connections: HashMap<u64, (ChannelKey, Vec<ChannelKey>)>,
    per_user: HashMap<ChannelKey, usize>,
}

impl Registry {
    /// Forgets a connection (its sender is dropped: the stream ends).
    fn remove(&mut self, id: u64) -> bool {
        let Some((user_key, channels)) = self.connections.remove(&id) else {
            return false;
        };
        for key in channels {
            if let Some(list) = self.channels.get_mut(&key) {
                list.retain(|c| c.id != id);
                if list.is_empty() {
                    self.channels.remove(&key);
                }
            }
        }
        if let Some(n) = self.per_user.get_mut(&user_key) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&user_key);
            }
        }
        true
    }
}

/// The live hub of one node.
pub struct LiveHub {
    registry: Mutex<Registry>,
    next_id: AtomicU64,
    metrics: LiveMetrics,
}

/// An open connection's registration: dropping it (the browser went away,
/// the response body was dropped) unregisters the connection.
pub struct LiveSubscription {
    hub: Arc<LiveHub>,
    id: u64,
}

impl Drop for LiveSubscription {
    fn drop(&mut self) {
        self.hub.close(self.id);
    }
}

impl LiveHub {
    pub fn new(metrics: LiveMetrics) -> Arc<LiveHub> {
        Arc::new(LiveHub {
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Never held across a panic point that could poison it.
        self.registry.lock().expect("live registry lock")
    }

    /// Registers a connection of `user` to `channels` of `component`
    /// (already authorized); events arrive on the receiver.
    pub fn subscribe(
        self: &Arc<Self>,
        component: &str,
        user: &str,
        channels: &[String],
    ) -> Result<(LiveSubscription, mpsc::Receiver<Bytes>), LiveError> {
        if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_CONNECTION {
            return Err(LiveError::Invalid(format!(
                "{} channels; accepted: 1 to {MAX_CHANNELS_PER_CONNECTION} per connection",
                channels.len()
            )));
        }
        for c in channels {
            check_channel(c)?;
        }
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let user_key = (component.to_string(), user.to_string());
        let mut reg = self.registry();
        if reg.connections.len() >= MAX_CONNECTIONS {
            return Err(LiveError::Limit(format!(
                "this node has {MAX_CONNECTIONS} live connections open; retry later"
            )));
        }
        let n = reg.per_user.entry(user_key.clone()).or_default();
        if *n >= MAX_CONNECTIONS_PER_USER {
            return Err(LiveError::Limit(format!(
                "user {user:?} has {MAX_CONNECTIONS_PER_USER} live connections to {component} open; close one"
            )));
        }
        *n += 1;
        let conn = Arc::new(Connection { id, tx });
        let mut keys = Vec::with_capacity(channels.len());
        for c in channels {
            let key = (component.to_string(), c.clone());
            if keys.contains(&key) {
                continue;
            }
            reg.channels
                .entry(key.clone())
                .or_default()
                .push(conn.clone());
            keys.push(key);
        }
        reg.connections.insert(id, (user_key, keys));
        drop(reg);
        self.metrics.connections.inc();
        Ok((
            LiveSubscription {
                hub: self.clone(),
                id,
            },
            rx,
        ))
    }

    fn close(&self, id: u64) {
        if self.registry().remove(id) {
            self.metrics.connections.dec();
        }
    }

    /// Queues one event for every connection on `channel` of `component`;
    /// returns how many it was queued for. A full queue closes that
    /// connection instead of waiting.
    pub fn publish(
        &self,
        component: &str,
        channel: &str,
        event: &str,
        data: &str,
    ) -> Result<u32, LiveError> {
        check_channel(channel)?;
        check_event(event)?;
        if data.len() > MAX_DATA_BYTES {
            return Err(LiveError::Invalid(format!(
                "data is {} bytes; at most {MAX_DATA_BYTES}",
                data.len()
            )));
        }
        let key = (component.to_string(), channel.to_string());
        let conns: Vec<Arc<Connection>> = match self.registry().channels.get(&key) {
            Some(list) => list.clone(),
            None => return Ok(0),
        };
        let bytes = encode_event(event, data);
        let mut queued = 0u32;
        for c in conns {
            match c.tx.try_send(bytes.clone()) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.slow_disconnects.inc();
                    tracing::debug!(
                        component,
                        connection = c.id,
                        "live connection too slow; closing it"
                    );
                    self.close(c.id);
                }
                // The browser is gone; its subscription is being dropped.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.metrics.events.inc_by(u64::from(queued));
        Ok(queued)
    }

    /// Closes every connection (draining: their streams end, so a graceful
    /// shutdown does not wait for browsers that would never leave).
    pub fn close_all(&self) {
        let ids: Vec<u64> = self.registry().connections.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.registry().connections.len()
    }

    /// Counts a connection refused before it reached the hub.
    pub fn refused(&self) {
        self.metrics.refused.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<LiveHub> {
        LiveHub::new(LiveMetrics::default())
    }

    #[test]
    fn events_encode_one_data_line_per_line() {
        assert_eq!(
            encode_event("message", "a\nb\r\nc"),
            Bytes::from("event: message\ndata: a\ndata: b\ndata: c\n\n")
        );
    }

    #[tokio::test]
    async fn publish_reaches_the_channel_of_its_component_only() {
        let hub = hub();
        let (_s1, mut a) = hub.subscribe("chat", "alice", &["room/x".into()]).unwrap();
        let (_s2, mut b) = hub.subscribe("other", "alice", &["room/x".into()]).unwrap();
        assert_eq!(hub.publish("chat", "room/x", "message", "hi").unwrap(), 1);
        assert_eq!(a.recv().await.unwrap(), encode_event("message", "hi"));
        assert!(b.try_recv().is_err());
        assert_eq!(hub.publish("chat", "room/y", "message", "hi").unwrap(), 0);
    }

    #[tokio::test]
    async fn a_slow_connection_is_closed_not_waited_for() {
        let hub = hub();
        let (_slow, mut slow) = hub.subscribe("chat", "a", &["c".into()]).unwrap();
        let (_fast, mut fast) = hub.subscribe("chat", "b", &["c".into()]).unwrap();
        for i in 0..QUEUE_EVENTS {
            hub.publish("chat", "c", "m", &i.to_string()).unwrap();
            fast.recv().await.unwrap();
        }
        // The slow one's queue is full: the next publish closes it.
        assert_eq!(hub.publish("chat", "c", "m", "x").unwrap(), 1);
        assert_eq!(hub.connections(), 1);
        let mut n = 0;
        while slow.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(
            n, QUEUE_EVENTS,
            "queued events are still delivered, then the stream ends"
        );
        assert_eq!(fast.recv().await.unwrap(), encode_event("m", "x"));
    }

    #[test]
    fn dropping_a_subscription_unregisters_it_and_limits_hold() {
        let hub = hub();
        let subs: Vec<_> = (0..MAX_CONNECTIONS_PER_USER)
            .map(|_| hub.subscribe("chat", "a", &["c".into()]).unwrap())
            .collect();
        assert!(matches!(
            hub.subscribe("chat", "a", &["c".into()]),
            Err(LiveError::Limit(_))
        ));
        assert!(hub.subscribe("chat", "b", &["c".into()]).is_ok());
        drop(subs);
        assert_eq!(hub.connections(), 0);
        assert!(hub.subscribe("chat", "a", &["c".into()]).is_ok());
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        let hub = hub();
        for (channel, event, data) in [
            ("", "m", "x"),
            ("room x", "m", "x"),
            ("r", "", "x"),
            ("r", "bad name", "x"),
            ("r", "m", &"x".repeat(MAX_DATA_BYTES + 1) as &str),
        ] {
            assert!(matches!(
                hub.publish("chat", channel, event, data),
                Err(LiveError::Invalid(_))
            ));
        }
        assert!(hub.subscribe("chat", "a", &[]).is_err());
        let many: Vec<String> = (0..=MAX_CHANNELS_PER_CONNECTION)
            .map(|i| i.to_string())
            .collect();
        assert!(hub.subscribe("chat", "a", &many).is_err());
    }
}
