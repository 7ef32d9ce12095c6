//! Property: whatever the network does (duplicated, reordered deliveries, own send-acks in any
//! order, reconnects at any point, sync answers late or lost with the connection), the session
//! shows each (conversation, seq) at most once and in strictly increasing seq order, and after a
//! final reconnect and sync every seq is settled and every message of the peers was shown.
//!
//! Run with more cases: `PROPTEST_CASES=5000 cargo test -p parley-client --test ordering`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use parley_client::pb::{self, frame::Body};
use parley_client::{Event, Session, SessionConfig, direct};
use proptest::prelude::*;

/// Messages per conversation.
const N: u64 = 12;
/// The conversations (direct, with these peers).
const PEERS: [&str; 2] = ["bob", "carol"];

#[derive(Debug, Clone)]
enum Op {
    /// The server pushes these seqs of conversation `.0` in one Deliver (any order, repeats).
    Deliver(usize, Vec<u64>),
    /// The server acks this device's own message `.1` of conversation `.0`.
    Ack(usize, u64),
    /// The server answers the oldest sync request still unanswered, in pages of `.0`.
    AnswerSync(usize),
    /// Time passes by this many ms (gap timers, heartbeats).
    Wait(u64),
    /// The connection drops; a new one logs in.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PEERS.len(), prop::collection::vec(1..=N, 1..5)).prop_map(|(c, s)| Op::Deliver(c, s)),
        2 => (0..PEERS.len(), 1..=N).prop_map(|(c, s)| Op::Ack(c, s)),
        2 => (1usize..5).prop_map(Op::AnswerSync),
        1 => (0u64..800).prop_map(Op::Wait),
        1 => Just(Op::Reconnect),
    ]
}

fn message(c: usize, seq: u64, own: bool) -> pb::Message {
    pb::Message {
        conversation: Some(direct(PEERS[c])),
        seq,
        from_user: if own { "me".into() } else { PEERS[c].into() },
        ..pb::Message::default()
    }
}

/// The fake server's side of one connection.
struct World {
    session: Session,
    now: Instant,
    /// Per conversation, which seqs are this device's own.
    own: Vec<BTreeSet<u64>>,
    /// Unanswered sync requests on the current connection: (request id, cursors).
    syncs: Vec<(u64, HashMap<String, u64>)>,
    /// Shown seqs per conversation, in order.
    shown: BTreeMap<String, Vec<u64>>,
}

impl World {
    fn new(own: Vec<BTreeSet<u64>>) -> Self {
        let now = Instant::now();
        let mut w = World {
            session: Session::new(SessionConfig::default(), now),
            now,
            own,
            syncs: Vec::new(),
            shown: BTreeMap::new(),
        };
        w.login();
        w
    }

    fn login(&mut self) {
        self.syncs.clear();
        self.session.connected(self.now, "tok".into());
        let login = self.session.poll_transmit().expect("a login");
        self.feed(pb::Frame {
            request_id: login.request_id,
            body: Some(Body::LoginResult(pb::LoginResult {
                heartbeat_interval_ms: 1000,
                ..pb::LoginResult::default()
            })),
        });
    }

    fn feed(&mut self, frame: pb::Frame) {
        self.session.handle_frame(self.now, frame);
        self.session.flush_acks();
        self.pump();
    }

    /// Takes what the session sent (remembering sync requests) and what it showed (checking
    /// the order on the way).
    fn pump(&mut self) {
        while let Some(f) = self.session.poll_transmit() {
            if let Some(Body::SyncRequest(r)) = f.body {
                let cursors = r
                    .cursors
                    .iter()
                    .map(|c| (c.conversation.clone().unwrap_or_default().id, c.seq))
                    .collect();
                self.syncs.push((f.request_id, cursors));
            }
        }
        while let Some(e) = self.session.poll_event() {
            match e {
                Event::Message(m) => {
                    let id = m.conversation.unwrap_or_default().id;
                    let seqs = self.shown.entry(id.clone()).or_default();
                    assert!(
                        seqs.last().is_none_or(|&last| m.seq > last),
                        "{id}: seq {} shown after {seqs:?}",
                        m.seq
                    );
                    seqs.push(m.seq);
                }
                Event::Skipped { conversation, seqs } => {
                    panic!("an honest server never makes {conversation:?} skip {seqs:?}")
                }
                _ => {}
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Deliver(c, seqs) => {
                let messages = seqs
                    .into_iter()
                    .map(|s| message(c, s, self.own[c].contains(&s)))
                    .collect();
                self.feed(pb::Frame {
                    request_id: 0,
                    body: Some(Body::Deliver(pb::Deliver { messages })),
                });
            }
            Op::Ack(c, seq) => {
                // Acks for sends the session did not make are still acks of own seqs.
                if self.own[c].contains(&seq) {
                    self.feed(pb::Frame {
                        request_id: 0,
                        body: Some(Body::SendAck(pb::SendAck {
                            client_msg_id: 1_000 + seq,
                            seq,
                            conversation: Some(direct(PEERS[c])),
                            ..pb::SendAck::default()
                        })),
                    });
                }
            }
            Op::AnswerSync(page) => {
                if self.syncs.is_empty() {
                    return;
                }
                let (id, cursors) = self.syncs.remove(0);
                let mut all = Vec::new();
                for (c, peer) in PEERS.iter().enumerate() {
                    let from = cursors.get(*peer).copied().unwrap_or(0) + 1;
                    all.extend((from..=N).map(|s| message(c, s, self.own[c].contains(&s))));
                }
                let pages: Vec<Vec<pb::Message>> = all.chunks(page).map(<[_]>::to_vec).collect();
                let n = pages.len().max(1);
                for i in 0..n {
                    self.feed(pb::Frame {
                        request_id: id,
                        body: Some(Body::SyncPage(pb::SyncPage {
                            messages: pages.get(i).cloned().unwrap_or_default(),
                            done: i + 1 == n,
                        })),
                    });
                }
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(ms);
                self.session.handle_timeout(self.now);
                // The fake server keeps talking: no dead-connection timeouts in this model.
                self.feed(pb::Frame {
                    request_id: 0,
                    body: Some(Body::Pong(pb::Pong::default())),
                });
            }
            Op::Reconnect => {
                self.session
                    .disconnected(self.now, parley_client::DisconnectReason::Closed);
                self.login();
            }
        }
    }
}

proptest! {
    #[test]
    fn shown_once_in_order_and_complete_after_a_final_sync(
        own in prop::collection::vec(prop::collection::btree_set(1..=N, 0..4), PEERS.len()),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let mut w = World::new(own.clone());
        for op in ops {
            w.apply(op);
        }
        // Finally: a fresh connection, its sync answered in full.
        w.apply(Op::Reconnect);
        while !w.syncs.is_empty() {
            w.apply(Op::AnswerSync(5));
        }
        for (c, peer) in PEERS.iter().enumerate() {
            prop_assert_eq!(w.session.cursor(&direct(peer)), N);
            let shown = w.shown.get(*peer).cloned().unwrap_or_default();
            for s in 1..=N {
                if !own[c].contains(&s) {
                    prop_assert!(shown.contains(&s), "{}: seq {} never shown: {:?}", peer, s, shown);
                }
            }
        }
        prop_assert_eq!(w.session.held(), 0);
    }
}
