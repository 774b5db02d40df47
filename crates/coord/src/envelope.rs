//! CloudEvents 1.0 (JSON, structured mode) envelopes for everything Keel puts
//! on regional and global streams, so any NATS client in any language can
//! consume them. Keel's own attributes are CloudEvents extensions
//! (lowercase alphanumeric names, `keel…`).

use crate::shred::DataKey;
use base64::Engine as _;
use keel_core::Hlc;
use keel_store::{OutboxEntry, StoredEvent};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// `content-type` header of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// CloudEvents `type` of a user-activity record forwarded from an edge.
pub const ACTIVITY_TYPE: &str = "keel.user.activity";

/// One CloudEvent as Keel writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    /// `keel://<region>/<edge>/<component>`.
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// W3C trace context of the write (`00-<trace>-<span>-01`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Replica that forwarded it: `<edge>.<incarnation>`; with
    /// `keeloutboxseq` the consumer-side deduplication key.
    pub keelorigin: String,
    pub keeloutboxseq: u64,
    /// Position in the component's local log (events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keelsequence: Option<u64>,
    /// HLC of the write at its origin: `<physical-ms>.<logical>.<node>`.
    pub keelhlc: String,
    /// The user the data concerns (personal data: stays in the user's zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeluser: Option<String>,
    /// Id of the user's data key that sealed `data_base64`
    /// ([`crate::shred`]); absent for plaintext data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keelkey: Option<String>,
}

impl CloudEvent {
    pub fn data(&self) -> Vec<u8> {
        self.data_base64
            .as_deref()
            .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
            .unwrap_or_default()
    }

    /// Seals the data with `key`, the data key of the event's user (no-op
    /// for an event about no user).
    pub fn seal(&mut self, key: &DataKey) {
        let Some(user) = &self.keeluser else {
            return;
        };
        let sealed = key.seal(user, &self.data());
        self.data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(sealed));
        self.keelkey = Some(key.id());
    }

    /// Opens data sealed with `key`; `false` (and the data dropped) if it
    /// does not open.
    pub fn open(&mut self, key: &DataKey) -> bool {
        let opened = self
            .keeluser
            .as_deref()
            .and_then(|user| key.open(user, &self.data()));
        self.data_base64 = opened
            .as_deref()
            .map(|d| base64::engine::general_purpose::STANDARD.encode(d));
        self.keelkey = None;
        opened.is_some()
    }

    /// Whether the data is sealed with a user's data key.
    pub fn is_sealed(&self) -> bool {
        self.keelkey.is_some()
    }

    pub fn hlc(&self) -> Option<Hlc> {
        parse_hlc(&self.keelhlc)
    }

    /// The component that wrote it (last segment of `source`).
    pub fn component(&self) -> &str {
        self.source.rsplit('/').next().unwrap_or_default()
    }

    /// The region it was written in (first segment of `source`).
    pub fn region(&self) -> &str {
        self.source
            .strip_prefix("keel://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
    }

    /// The edge that wrote it (second-to-last segment of `source`).
    pub fn edge(&self) -> &str {
        self.source.rsplit('/').nth(1).unwrap_or_default()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<CloudEvent, String> {
        let ce: CloudEvent =
            serde_json::from_slice(bytes).map_err(|e| format!("not a Keel CloudEvent: {e}"))?;
        if ce.specversion != "1.0" {
            return Err(format!("unsupported specversion {:?}", ce.specversion));
        }
        Ok(ce)
    }
}

/// `<edge>.<incarnation>`: who forwarded an outbox entry. Incarnation in hex.
pub fn origin_id(edge: &str, incarnation: u64) -> String {
    format!("{edge}.{incarnation:016x}")
}

/// JetStream `Nats-Msg-Id` of outbox entry `seq`: `<origin>:<seq>`.
pub fn outbox_msg_id(origin: &str, seq: u64) -> String {
    format!("{origin}:{seq}")
}

/// `Nats-Msg-Id` of a global event: the publisher's id, per component, so
/// publishing an id again is dropped inside the stream's window.
pub fn global_msg_id(component: &str, id: &str) -> String {
    format!("global:{component}:{id}")
}

/// The envelope of one outbox entry.
pub fn outbox_event(region: &str, origin: &str, seq: u64, entry: &OutboxEntry) -> CloudEvent {
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    match entry {
        OutboxEntry::Event { component, event } => {
            let StoredEvent {
                id,
                sequence,
                origin: edge,
                at,
                data,
                ..
            } = event;
            CloudEvent {
                specversion: "1.0".into(),
                id: id.clone(),
                source: format!("keel://{region}/{edge}/{component}"),
                event_type: data.kind.clone(),
                subject: Some(data.key.clone()),
                time: rfc3339_ms(at.physical_ms),
                datacontenttype: data.content_type.clone(),
                data_base64: Some(b64(&data.payload)),
                traceparent: Some(traceparent(origin, seq)),
                keelorigin: origin.to_string(),
                keeloutboxseq: seq,
                keelsequence: Some(*sequence),
                keelhlc: format_hlc(at),
                keeluser: data.user.clone(),
                keelkey: None,
            }
        }
        OutboxEntry::Activity {
            component,
            user,
            record,
        } => {
            let body = serde_json::json!({
                "kind": record.activity.kind,
                "attributes": record.activity.attributes,
                "edge": record.edge,
            });
            CloudEvent {
                specversion: "1.0".into(),
                id: outbox_msg_id(origin, seq),
                source: format!("keel://{region}/{}/{component}", record.edge),
                event_type: ACTIVITY_TYPE.into(),
                subject: Some(user.clone()),
                time: rfc3339_ms(record.at.physical_ms),
                datacontenttype: Some("application/json".into()),
                data_base64: Some(b64(body.to_string().as_bytes())),
                traceparent: Some(traceparent(origin, seq)),
                keelorigin: origin.to_string(),
                keeloutboxseq: seq,
                keelsequence: None,
                keelhlc: format_hlc(&record.at),
                keeluser: Some(user.clone()),
                keelkey: None,
            }
        }
        OutboxEntry::Global {
            component,
            event,
            edge,
            at,
        } => CloudEvent {
            specversion: "1.0".into(),
            id: event.id.clone(),
            source: format!("keel://{region}/{edge}/{component}"),
            event_type: event.event_type.clone(),
            subject: event.subject.clone(),
            time: rfc3339_ms(at.physical_ms),
            datacontenttype: event.content_type.clone(),
            data_base64: Some(b64(&event.data)),
            traceparent: Some(traceparent(origin, seq)),
            keelorigin: origin.to_string(),
            keeloutboxseq: seq,
            keelsequence: None,
            keelhlc: format_hlc(at),
            keeluser: event.user.clone(),
            keelkey: None,
        },
        OutboxEntry::Metric {
            component,
            metric,
            value,
            edge,
            at,
        } => CloudEvent {
            specversion: "1.0".into(),
            id: outbox_msg_id(origin, seq),
            source: format!("keel://{region}/{edge}/{component}"),
            event_type: crate::views::METRIC_TYPE.into(),
            subject: Some(metric.clone()),
            time: rfc3339_ms(at.physical_ms),
            datacontenttype: Some("application/json".into()),
            data_base64: Some(b64(&crate::views::metric_event_data(metric, *value))),
            traceparent: Some(traceparent(origin, seq)),
            keelorigin: origin.to_string(),
            keeloutboxseq: seq,
            keelsequence: None,
            keelhlc: format_hlc(at),
            keeluser: None,
            keelkey: None,
        },
    }
}

/// A trace context derived from the write's identity, so a replayed entry
/// carries the same one.
fn traceparent(origin: &str, seq: u64) -> String {
    let h = Sha256::digest(format!("{origin}:{seq}").as_bytes());
    format!(
        "00-{}-{}-01",
        hex::encode(&h[..16]),
        hex::encode(&h[16..24])
    )
}

pub fn format_hlc(h: &Hlc) -> String {
    format!("{}.{}.{}", h.physical_ms, h.logical, h.node)
}

pub fn parse_hlc(s: &str) -> Option<Hlc> {
    let mut parts = s.splitn(3, '.');
    let physical_ms = parts.next()?.parse().ok()?;
    let logical = parts.next()?.parse().ok()?;
    let node = parts.next()?.to_string();
    Some(Hlc {
        physical_ms,
        logical,
        node,
    })
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (`2026-11-26T01:02:03.004Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant), valid for every u64 day count we produce.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::EventData;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        // Checked against Python's datetime.
        assert_eq!(rfc3339_ms(1_795_650_123_456), "2026-11-25T23:42:03.456Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn event_round_trips_through_json() {
        let at = Hlc {
            physical_ms: 1_795_650_123_456,
            logical: 7,
            node: "fra".into(),
        };
        let entry = OutboxEntry::Event {
            component: "chat".into(),
            event: StoredEvent {
                id: "fra:42".into(),
                sequence: 9,
                origin: "fra".into(),
                region: "eu-central".into(),
                at: at.clone(),
                data: EventData {
                    kind: "chat.message".into(),
                    key: "room-1".into(),
                    payload: b"hello \x00 bytes".to_vec(),
                    content_type: Some("text/plain".into()),
                    user: Some("u1".into()),
                },
            },
        };
        let origin = origin_id("fra", 0xabc);
        let ce = outbox_event("eu-central", &origin, 3, &entry);
        let json = ce.to_json();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "chat.message");
        assert_eq!(v["source"], "keel://eu-central/fra/chat");
        assert_eq!(v["keelorigin"], "fra.0000000000000abc");
        assert!(v["traceparent"].as_str().unwrap().starts_with("00-"));
        let back = CloudEvent::from_json(&json).unwrap();
        assert_eq!(back, ce);
        assert_eq!(back.data(), b"hello \x00 bytes");
        assert_eq!(back.hlc(), Some(at));
        assert_eq!((back.edge(), back.component()), ("fra", "chat"));
        assert!(CloudEvent::from_json(b"{}").is_err());
    }
}
