//! The events a webhook carries: what each observer call becomes, its id, and its JSON.
//!
//! Every event is one JSON object:
//!
//! ```json
//! {"id": "node-1-5f0c1a2b3c4d5e6f-42", "type": "login", "time_ms": 1767225600000,
//!  "data": {"user": "alice", "device": "phone"}}
//! ```
//!
//! * `id`: unique per event, and the same in every attempt to deliver it: the receiver
//!   de-duplicates on it. It is `<node>-<boot>-<counter>`: the node's name (characters other
//!   than ASCII letters, digits, `.`, `_` and `-` replaced by `_`), 16 hex digits drawn at
//!   start-up, and a counter from 1.
//! * `type`: one of the names of [`WebhookEvent`].
//! * `time_ms`: when it happened, in milliseconds since the Unix epoch (for `message.stored`, the
//!   message's own store time).
//! * `data`, by type:
//!   * `message.offline`: `conversation` (a [`ConversationRef`]: `{"kind": "direct"|"group",
//!     "id": ..., "users": [...]}`, a direct conversation's id being its two users sorted and
//!     joined by `:`, and `users` those users exactly; `users` is empty for a group), `seq`,
//!     `sender`, `users` (the recipients with no device online). A group message may give several such events,
//!     one per shard that homes some of those users, each with its own id.
//!   * `message.stored`: `conversation`, `seq`, `msg_id`, `sender`, `device`, `system` (a SYSTEM
//!     message), `body_base64` (the body, standard base64 with padding).
//!   * `login`, `logout`: `user`, `device`.
//!   * `presence`: `user`, `online` (first device came, or last device left).
//!   * `group`: `group`, `seq` (of the event in the group's conversation), `actor`, `what`
//!     (as [`crate::hooks::GroupChange::what`] says), `members` (the users it concerns).

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use serde::{Serialize, Serializer};

use crate::config::WebhookEvent;
use crate::hooks::ConversationRef;

/// One event, as queued by an observer and serialized by a sender.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    /// Unique and stable across attempts (see the module documentation).
    pub(crate) id: String,
    /// The kind, serialized as its name.
    #[serde(rename = "type", serialize_with = "kind_name")]
    pub(crate) kind: WebhookEvent,
    /// When it happened, ms since the Unix epoch.
    pub(crate) time_ms: i64,
    /// What happened.
    pub(crate) data: Data,
}

/// What happened, by kind (serialized without a tag: `type` says which).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub(crate) enum Data {
    /// `message.offline`.
    Offline {
        /// The conversation.
        conversation: ConversationRef,
        /// The message's seq there.
        seq: u64,
        /// Who sent it.
        sender: String,
        /// Recipients with no device online.
        users: Vec<String>,
    },
    /// `message.stored`.
    Stored {
        /// The conversation.
        conversation: ConversationRef,
        /// The message's seq there.
        seq: u64,
        /// Its node-wide id.
        msg_id: u64,
        /// Who sent it.
        sender: String,
        /// From which device.
        device: String,
        /// A SYSTEM message.
        system: bool,
        /// The body (encoded by the sender thread, not the shard).
        #[serde(rename = "body_base64", serialize_with = "base64")]
        body: Bytes,
    },
    /// `login` and `logout`.
    Device {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// `presence`.
    Presence {
        /// The user.
        user: String,
        /// Online now.
        online: bool,
    },
    /// `group`.
    Group {
        /// The group.
        group: String,
        /// The seq of the event in the group's conversation.
        seq: u64,
        /// Who made the change.
        actor: String,
        /// What changed.
        what: String,
        /// The users it concerns.
        members: Vec<String>,
    },
}

/// Serializes a kind as its name.
fn kind_name<S: Serializer>(kind: &WebhookEvent, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(kind.name())
}

/// Serializes bytes as standard base64 with padding.
fn base64<S: Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(body))
}

/// Hands out event ids: `<node>-<boot>-<counter>` (see the module documentation).
#[derive(Debug)]
pub(crate) struct Ids {
    /// `<node>-<boot>-`.
    prefix: String,
    /// The last counter handed out.
    last: AtomicU64,
}

impl Ids {
    /// Ids for node `node` in the boot named by `boot` (random at start-up).
    pub(crate) fn new(node: &str, boot: u64) -> Self {
        let node: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            prefix: format!("{node}-{boot:016x}-"),
            last: AtomicU64::new(0),
        }
    }

    /// The next id.
    pub(crate) fn next(&self) -> String {
        let n = self.last.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}{n}", self.prefix)
    }
}

/// An event serialized, with its id (for the batch's idempotency key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The event's id.
    pub(crate) id: String,
    /// Its JSON object.
    pub(crate) json: Vec<u8>,
}

impl Event {
    /// Serializes the event (its JSON object alone).
    pub(crate) fn encode(&self) -> Result<Encoded, serde_json::Error> {
        Ok(Encoded {
            id: self.id.clone(),
            json: serde_json::to_vec(self)?,
        })
    }
}

/// The body of one POST: `{"events":[...]}`, the events in order.
pub(crate) fn batch_body(events: &[Encoded]) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"events\":[";
    const TAIL: &[u8] = b"]}";
    let len = HEAD.len() + TAIL.len() + events.iter().map(|e| e.json.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(HEAD);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.json);
    }
    body.extend_from_slice(TAIL);
    body
}

/// The size of [`batch_body`] of `events` and one more event of `extra` bytes.
pub(crate) fn body_len_with(events: &[Encoded], extra: usize) -> usize {
    let wrapper = b"{\"events\":[]}".len();
    wrapper + events.iter().map(|e| e.json.len() + 1).sum::<usize>() + extra
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::hooks::ConversationKind;

    fn event(kind: WebhookEvent, data: Data) -> Event {
        Event {
            id: "n-0000000000000001-7".into(),
            kind,
            time_ms: 1_767_225_600_000,
            data,
        }
    }

    fn to_value(e: &Event) -> Value {
        serde_json::from_slice(&e.encode().expect("encodes").json).expect("valid JSON")
    }

    fn direct() -> ConversationRef {
        ConversationRef {
            kind: ConversationKind::Direct,
            id: "alice:bob".into(),
            users: vec!["alice".into(), "bob".into()],
        }
    }

    #[test]
    fn every_kind_has_id_type_time_and_its_data() {
        let cases = [
            (
                event(
                    WebhookEvent::MessageOffline,
                    Data::Offline {
                        conversation: direct(),
                        seq: 5,
                        sender: "alice".into(),
                        users: vec!["bob".into()],
                    },
                ),
                json!({"conversation": {"kind": "direct", "id": "alice:bob", "users": ["alice", "bob"]},
                       "seq": 5,
                       "sender": "alice", "users": ["bob"]}),
            ),
            (
                event(
                    WebhookEvent::MessageStored,
                    Data::Stored {
                        conversation: ConversationRef {
                            kind: ConversationKind::Group,
                            id: "g1".into(),
                            users: Vec::new(),
                        },
                        seq: 9,
                        msg_id: 77,
                        sender: "alice".into(),
                        device: "phone".into(),
                        system: false,
                        body: Bytes::from_static(b"hi\x00\xff"),
                    },
                ),
                json!({"conversation": {"kind": "group", "id": "g1", "users": []}, "seq": 9,
                       "msg_id": 77,
                       "sender": "alice", "device": "phone", "system": false,
                       "body_base64": "aGkA/w=="}),
            ),
            (
                event(
                    WebhookEvent::Login,
                    Data::Device {
                        user: "alice".into(),
                        device: "phone".into(),
                    },
                ),
                json!({"user": "alice", "device": "phone"}),
            ),
            (
                event(
                    WebhookEvent::Presence,
                    Data::Presence {
                        user: "alice".into(),
                        online: false,
                    },
                ),
                json!({"user": "alice", "online": false}),
            ),
            (
                event(
                    WebhookEvent::Group,
                    Data::Group {
                        group: "g1".into(),
                        seq: 3,
                        actor: "alice".into(),
                        what: "member_joined".into(),
                        members: vec!["carol".into()],
                    },
                ),
                json!({"group": "g1", "seq": 3, "actor": "alice", "what": "member_joined",
                       "members": ["carol"]}),
            ),
        ];
        for (e, data) in cases {
            assert_eq!(
                to_value(&e),
                json!({"id": "n-0000000000000001-7", "type": e.kind.name(),
                       "time_ms": 1_767_225_600_000_i64, "data": data}),
                "{:?}",
                e.kind
            );
        }
    }

    #[test]
    fn a_batch_is_an_events_array_and_its_length_is_known_before_it_is_built() {
        let a = event(
            WebhookEvent::Logout,
            Data::Device {
                user: "a".into(),
                device: "d".into(),
            },
        )
        .encode()
        .expect("encodes");
        let b = Encoded {
            id: "x".into(),
            json: b"{\"id\":\"x\"}".to_vec(),
        };
        for events in [vec![], vec![a.clone()], vec![a.clone(), b.clone()]] {
            let body = batch_body(&events);
            let v: Value = serde_json::from_slice(&body).expect("valid JSON");
            assert_eq!(v["events"].as_array().map(Vec::len), Some(events.len()));
            if let Some((last, rest)) = events.split_last() {
                assert_eq!(body_len_with(rest, last.json.len()), body.len());
            }
        }
        let v: Value = serde_json::from_slice(&batch_body(&[a, b])).expect("valid");
        assert_eq!(v["events"][0]["type"], "logout");
        assert_eq!(v["events"][1]["id"], "x");
    }

    #[test]
    fn ids_are_unique_and_safe_in_a_header() {
        let ids = Ids::new("edge 7/ü", 0xabc);
        assert_eq!(ids.next(), "edge_7__-0000000000000abc-1");
        assert_eq!(ids.next(), "edge_7__-0000000000000abc-2");
        let other_boot = Ids::new("edge 7/ü", 0xabd);
        assert_ne!(other_boot.next(), "edge_7__-0000000000000abc-1");
    }
}
