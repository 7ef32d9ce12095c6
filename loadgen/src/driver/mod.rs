//! Drivers: the client side of every system loadgen can load, sans-IO.
//!
//! A driver turns "log in", "send this body to client j" and "here are the bytes that arrived"
//! into bytes to write and [`Event`]s, for one connection. It never touches a socket or a clock:
//! the engine owns the sockets and the time, so the same scenario code runs against parley (TCP
//! or WebSocket), MQTT 3.1.1, Redis pub/sub and loadgen's own relay, and drivers are unit-tested
//! on byte strings.
//!
//! Clients are numbered `0..n` across the whole run (all processes). Each driver maps a client
//! number to the system's address for it (a parley user, an MQTT topic, a Redis channel, a relay
//! channel), always prefixed with the run's [`Names::prefix`] so runs do not see each other.

pub mod mqtt;
pub mod parley;
pub mod redis;
pub mod relay;

use bytes::{Bytes, BytesMut};

/// What one connection of a client does. Most systems carry both directions on one connection;
/// Redis pub/sub needs two (a subscribed connection cannot publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends and receives.
    Both,
    /// Only sends (publishes).
    Publish,
    /// Only receives (subscribes).
    Subscribe,
}

/// How client numbers become names on the system under test.
#[derive(Debug, Clone)]
pub struct Names {
    /// Prepended to every user id, topic and channel of this run, e.g. `lg7f3a-`.
    pub prefix: String,
    /// A parley cluster's node ids (`--node-ids`, in `--nodes` order) with `--split`: each user
    /// id is chosen so that the user's home is the node its client connects to.
    pub homes: Option<std::sync::Arc<Homes>>,
}

/// Which node each client's user is homed on (see [`Names::homes`]).
#[derive(Debug)]
pub struct Homes {
    /// The node ids, in the order of the addresses.
    pub nodes: Vec<String>,
    /// Clients per pair or fan-out: member `i` of unit `u` is homed on node `u + i`.
    pub group: u32,
}

impl Homes {
    /// The node (an index into `nodes`) of client `client`.
    pub fn node_of(&self, client: u32) -> usize {
        let group = self.group.max(1);
        ((client / group + client % group) as usize) % self.nodes.len().max(1)
    }
}

impl Names {
    /// Names with `prefix` and no placement.
    pub fn new(prefix: impl Into<String>) -> Self {
        Names {
            prefix: prefix.into(),
            homes: None,
        }
    }

    /// The user id / topic suffix / channel name of client `client`: `<prefix>c<client>`, or
    /// with [`Names::homes`] `<prefix>c<client>.<k>` for the smallest `k` that homes the user on
    /// the client's node (`k` = 0 is left out).
    pub fn of(&self, client: u32) -> String {
        let base = format!("{}c{client}", self.prefix);
        let Some(homes) = &self.homes else {
            return base;
        };
        let want = homes.node_of(client);
        if parley_proto::placement::home_node(&homes.nodes, &base) == want {
            return base;
        }
        (1u32..)
            .map(|k| format!("{base}.{k}"))
            .find(|name| parley_proto::placement::home_node(&homes.nodes, name) == want)
            .unwrap_or(base)
    }

    /// The client a user id of this run names (the inverse of [`Names::of`]), if it is one.
    pub fn client(&self, user: &str) -> Option<u32> {
        let rest = user.strip_prefix(self.prefix.as_str())?.strip_prefix('c')?;
        let digits = rest.split_once('.').map_or(rest, |(d, _)| d);
        digits.parse().ok()
    }

    /// The id of parley group number `group`: `<prefix>g<group>`.
    pub fn group(&self, group: u32) -> String {
        format!("{}g{group}", self.prefix)
    }
}

/// Who one connection is, for its driver.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Run-wide naming.
    pub names: Names,
    /// This client's number: its identity on the system (parley user, MQTT client id).
    pub client: u32,
    /// The channel this connection listens on, as a client number: in `pairs` each client
    /// listens on its own number; in `fanout` every subscriber listens on the publisher's
    /// number. `None` for a connection that only publishes. Parley ignores it in `pairs` (a
    /// parley client always receives what is sent to its own user); in `fanout` it names the
    /// room (see [`parley::ParleyDriver::in_room`]); in `groups` (and `fanout --conversation
    /// group`) the group's number ([`Names::group`]).
    pub listen: Option<u32>,
    /// What the connection does.
    pub role: Role,
}

/// A conversation and a seq in it, as the system numbered a message (parley only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvSeq {
    /// A 64-bit FNV-1a hash of the conversation's id as the system names it.
    pub conversation: u64,
    /// The message's seq in that conversation.
    pub seq: u64,
}

/// A change of a group's membership (parley groups), as a request asks for it or as the group's
/// SYSTEM message records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupAction {
    /// CREATE the group with the requester as owner and the users as members
    /// (event `CREATED`).
    Create,
    /// ADD_MEMBERS (event `MEMBERS_ADDED`).
    Add,
    /// REMOVE_MEMBERS (event `MEMBERS_REMOVED`).
    Remove,
    /// Any other event (a member left or joined by itself, a rename, a role change, the group
    /// dissolved): loadgen asks for none of them.
    Other,
}

/// A group request loadgen makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOp {
    /// What to do.
    pub action: GroupAction,
    /// The group id.
    pub group: String,
    /// The users concerned.
    pub users: Vec<String>,
}

/// What a group's SYSTEM message records (parley groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEvent {
    /// What changed.
    pub action: GroupAction,
    /// Who changed it.
    pub actor: String,
    /// The users concerned (for `CREATED`: the members besides the actor).
    pub users: Vec<String>,
}

/// Something a driver saw on its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Log-in / connect / subscribe is complete: the connection may now carry messages.
    Ready,
    /// The system acknowledged the send tagged `tag` (parley SendAck, MQTT PUBACK, the reply to
    /// a Redis PUBLISH). `seq` is the seq the system gave it, where it numbers messages.
    Acked {
        /// The tag given to [`Driver::send`].
        tag: u64,
        /// Where the system stored it, if it says.
        seq: Option<ConvSeq>,
    },
    /// A message arrived for this client. `body` is exactly the body that was sent.
    Delivered {
        /// The body.
        body: Bytes,
        /// Where the system stored it, if it says.
        seq: Option<ConvSeq>,
    },
    /// An offline catch-up (parley sync) finished: everything missed has been delivered.
    Synced,
    /// The system said the client reads too slowly and stopped pushing (parley `Behind`).
    Behind,
    /// The system dropped `count` messages for this connection because it read too slowly, and
    /// said so (parley `RoomLag`: rooms are at-most-once). Reported, not a failure: the messages
    /// skipped right before the next arrival are counted as dropped, not lost.
    Dropped {
        /// How many.
        count: u64,
        /// Where the system numbered the first of them, if it numbers messages (the rest follow
        /// it, one seq each).
        first: Option<ConvSeq>,
    },
    /// The answer to the group request tagged `request` ([`Driver::group`]): the seq of the event
    /// it stored (0 if it changed nothing), or the system's refusal.
    GroupResult {
        /// The tag given to [`Driver::group`].
        request: u64,
        /// The event's seq, or the refusal's code and words.
        result: Result<u64, String>,
    },
    /// A message of a group arrived (pushed live or in a sync page), the receiver's own ones
    /// included (a sync carries them). [`Event::Delivered`] is not used for groups.
    GroupMessage {
        /// The group ([`parley::group_key`]) and the message's seq in it.
        at: ConvSeq,
        /// A user's message: exactly the body that was sent (empty for a SYSTEM message).
        body: Bytes,
        /// A SYSTEM message: the change it records.
        event: Option<GroupEvent>,
        /// It came in a sync page, not pushed live.
        synced: bool,
    },
    /// The system reported an error. If `fatal`, it is closing the connection.
    Error {
        /// Whether the connection is over.
        fatal: bool,
        /// The system's words.
        text: String,
    },
}

/// A protocol violation by the system under test (or garbage on the wire): the connection is
/// closed and the error counted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// The client side of one connection to a system under test.
pub trait Driver: Send {
    /// Writes what opens the session (handshake, login, connect, subscribe) into `out`.
    fn start(&mut self, out: &mut BytesMut);

    /// Consumes whatever complete units `input` holds (leaving a partial one in place), pushes
    /// the events they carry, and writes any answers the protocol requires (pongs, PUBACKs)
    /// into `out`.
    fn receive(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError>;

    /// Writes a message carrying `body` to client `to` into `out`. `tag` is unique per sending
    /// client and non-zero; it comes back in [`Event::Acked`] if [`Driver::acks_sends`].
    fn send(&mut self, to: u32, tag: u64, body: &[u8], out: &mut BytesMut);

    /// Writes a keep-alive into `out` (called about once per heartbeat interval while idle).
    fn heartbeat(&mut self, out: &mut BytesMut);

    /// Called once per engine turn after `receive`: writes anything batched, such as cumulative
    /// delivery acks.
    fn flush(&mut self, _out: &mut BytesMut) {}

    /// Whether sends are acknowledged by the system ([`Event::Acked`]).
    fn acks_sends(&self) -> bool;

    /// Asks for everything missed while offline (parley sync); [`Event::Synced`] follows.
    /// Systems without offline storage return an error.
    fn sync(&mut self, _out: &mut BytesMut) -> Result<(), DriverError> {
        Err(DriverError(
            "this system keeps nothing for offline clients".into(),
        ))
    }

    /// Writes group request `op` tagged `request` (non-zero) into `out`;
    /// [`Event::GroupResult`] answers it. Systems without groups return an error.
    fn group(
        &mut self,
        _request: u64,
        _op: &GroupOp,
        _out: &mut BytesMut,
    ) -> Result<(), DriverError> {
        Err(DriverError("this system has no groups".into()))
    }
}

/// FNV-1a, 64 bits: a stable hash of a conversation id for [`ConvSeq`].
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_user_id_names_it_back_and_other_ids_name_no_client() {
        let names = Names {
            prefix: "lg1-".into(),
            homes: None,
        };
        assert_eq!(names.client(&names.of(42)), Some(42));
        assert_eq!(names.client("lg2-c42"), None, "another run");
        assert_eq!(names.client(&names.group(3)), None, "a group");
        assert_eq!(names.client("lg1-cx"), None);
    }

    #[test]
    fn with_homes_each_user_is_homed_on_its_clients_node_and_names_back() {
        let mut names = Names::new("lg1-");
        names.homes = Some(std::sync::Arc::new(Homes {
            nodes: vec!["a".into(), "b".into(), "c".into()],
            group: 2,
        }));
        let homes = names.homes.clone().expect("set");
        for client in 0..200 {
            let user = names.of(client);
            assert_eq!(names.client(&user), Some(client), "{user}");
            assert_eq!(
                parley_proto::placement::home_node(&homes.nodes, &user),
                homes.node_of(client)
            );
        }
        assert_ne!(homes.node_of(0), homes.node_of(1), "a pair is split");
    }
}
