//! Property: over a network that drops, duplicates and reorders frames both ways (UDP), a session
//! with `SessionConfig::retry` against a broker that stores a send once per client message id
//! and retransmits deliveries until acked (and nothing else) gets every send acked exactly once
//! (stored once), shows every message of the peer exactly once and in seq order, and answers
//! every history request once, once the network heals.
//!
//! Run with more cases: `PROPTEST_CASES=5000 cargo test -p parley-client --test lossy`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parley_client::pb::{self, frame::Body};
use parley_client::{Event, RetryConfig, Session, SessionConfig, direct};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The application sends a message.
    Send,
    /// The peer posts a message (the broker stores it and delivers it).
    PeerPost,
    /// The application asks for a history page.
    History,
    /// The frame at this index (modulo) of the way to the broker arrives (twice if `.1`).
    Up(usize, bool),
    /// The frame at this index (modulo) of the way to the client arrives (twice if `.1`).
    Down(usize, bool),
    /// The frame at this index (modulo) of the way to the broker is lost.
    DropUp(usize),
    /// The frame at this index (modulo) of the way to the client is lost.
    DropDown(usize),
    /// Time passes by this many ms (retries, the broker's retransmits).
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Send),
        2 => Just(Op::PeerPost),
        1 => Just(Op::History),
        5 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(i, d)| Op::Up(i, d)),
        5 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(i, d)| Op::Down(i, d)),
        2 => any::<usize>().prop_map(Op::DropUp),
        2 => any::<usize>().prop_map(Op::DropDown),
        2 => (0u64..1500).prop_map(Op::Wait),
    ]
}

/// The session, a fake broker and the lossy network between them.
struct World {
    session: Session,
    now: Instant,
    /// Frames on their way to the broker / to the client.
    up: Vec<pb::Frame>,
    down: Vec<pb::Frame>,
    /// The conversation with bob as the broker stores it: seq - 1 -> (from me?, body).
    log: Vec<(bool, String)>,
    /// client_msg_id -> seq (the broker's de-dup).
    stored: HashMap<u64, u64>,
    /// The client's cumulative ack, as the broker knows it.
    acked_up_to: u64,
    /// Deliveries the broker pushed and retransmits until acked.
    delivered: BTreeSet<u64>,
    /// Sends the application made, and the acks it was told of.
    sent: Vec<u64>,
    acks: Vec<u64>,
    /// History requests made, and their pages shown.
    histories: Vec<u64>,
    pages: Vec<u64>,
    /// Seqs shown, in order; bodies of the peer's shown.
    shown: Vec<u64>,
    peer_bodies: Vec<String>,
    /// Peer messages posted.
    posted: usize,
}

impl World {
    fn new() -> Self {
        let now = Instant::now();
        let config = SessionConfig {
            retry: Some(RetryConfig {
                initial: Duration::from_millis(400),
                max: Duration::from_secs(2),
            }),
            ..SessionConfig::default()
        };
        let mut w = World {
            session: Session::new(config, now),
            now,
            up: Vec::new(),
            down: Vec::new(),
            log: Vec::new(),
            stored: HashMap::new(),
            acked_up_to: 0,
            delivered: BTreeSet::new(),
            sent: Vec::new(),
            acks: Vec::new(),
            histories: Vec::new(),
            pages: Vec::new(),
            shown: Vec::new(),
            peer_bodies: Vec::new(),
            posted: 0,
        };
        w.login();
        w
    }

    /// A new connection (the UDP login itself is the transport's business: reliable here).
    fn login(&mut self) {
        self.up.clear();
        self.down.clear();
        // A history request is lost with its connection (documented): the application asks
        // again after it reconnects, so one unanswered now is not owed.
        let pages = self.pages.clone();
        self.histories.retain(|id| pages.contains(id));
        self.session.connected(self.now, "tok".into());
        let login = self.session.poll_transmit().expect("a login");
        self.session.handle_frame(
            self.now,
            pb::Frame {
                request_id: login.request_id,
                body: Some(Body::LoginResult(pb::LoginResult {
                    heartbeat_interval_ms: 1000,
                    ..pb::LoginResult::default()
                })),
            },
        );
        self.pump();
    }

    /// Moves what the session sent onto the network and checks what it showed.
    fn pump(&mut self) {
        if self.session.take_close() || self.session.state() == parley_client::State::Disconnected {
            self.login();
            return;
        }
        while let Some(f) = self.session.poll_transmit() {
            self.up.push(f);
        }
        self.session.sent(self.now);
        while let Some(e) = self.session.poll_event() {
            match e {
                Event::Message(m) => {
                    assert!(
                        self.shown.last().is_none_or(|&l| m.seq > l),
                        "seq {} shown after {:?}",
                        m.seq,
                        self.shown
                    );
                    self.shown.push(m.seq);
                    if m.from_user == "bob" {
                        self.peer_bodies
                            .push(String::from_utf8_lossy(&m.body).into_owned());
                    }
                }
                Event::Acked { client_msg_id, .. } => self.acks.push(client_msg_id),
                Event::HistoryPage { request_id, .. } => self.pages.push(request_id),
                Event::Skipped { seqs, .. } => panic!("an honest broker never skips {seqs:?}"),
                _ => {}
            }
        }
    }

    fn message(&self, seq: u64) -> pb::Message {
        let (mine, body) = &self.log[(seq - 1) as usize];
        pb::Message {
            conversation: Some(direct("bob")),
            seq,
            from_user: if *mine { "me".into() } else { "bob".into() },
            body: Bytes::from(body.clone()),
            ..pb::Message::default()
        }
    }

    fn push_down(&mut self, request_id: u64, body: Body) {
        self.down.push(pb::Frame {
            request_id,
            body: Some(body),
        });
    }

    /// The broker takes a frame.
    fn broker(&mut self, f: pb::Frame) {
        let Some(body) = f.body else { return };
        match body {
            Body::Send(s) => {
                let seq = match self.stored.get(&s.client_msg_id) {
                    Some(&seq) => seq,
                    None => {
                        self.log.push((true, format!("own{}", s.client_msg_id)));
                        let seq = self.log.len() as u64;
                        self.stored.insert(s.client_msg_id, seq);
                        seq
                    }
                };
                self.push_down(
                    f.request_id,
                    Body::SendAck(pb::SendAck {
                        client_msg_id: s.client_msg_id,
                        seq,
                        conversation: Some(direct("bob")),
                        ..pb::SendAck::default()
                    }),
                );
            }
            Body::DeliverAck(a) => {
                for c in a.acks {
                    self.acked_up_to = self.acked_up_to.max(c.seq);
                }
                let up_to = self.acked_up_to;
                self.delivered.retain(|&s| s > up_to);
            }
            Body::SyncRequest(r) => {
                let from = r.cursors.iter().map(|c| c.seq).max().unwrap_or(0) + 1;
                let all: Vec<pb::Message> = (from..=self.log.len() as u64)
                    .map(|s| self.message(s))
                    .collect();
                self.push_down(
                    f.request_id,
                    Body::SyncSummary(pb::SyncSummary {
                        total_messages: all.len() as u64,
                        ..pb::SyncSummary::default()
                    }),
                );
                let pages: Vec<Vec<pb::Message>> = all.chunks(3).map(<[_]>::to_vec).collect();
                let n = pages.len().max(1);
                for i in 0..n {
                    self.push_down(
                        f.request_id,
                        Body::SyncPage(pb::SyncPage {
                            messages: pages.get(i).cloned().unwrap_or_default(),
                            done: i + 1 == n,
                        }),
                    );
                }
            }
            Body::HistoryRequest(_) => {
                let messages = (1..=self.log.len() as u64)
                    .map(|s| self.message(s))
                    .collect();
                self.push_down(
                    f.request_id,
                    Body::HistoryPage(pb::HistoryPage {
                        messages,
                        ..pb::HistoryPage::default()
                    }),
                );
            }
            Body::Ping(p) => self.push_down(
                f.request_id,
                Body::Pong(pb::Pong {
                    nonce: p.nonce,
                    time: 0,
                }),
            ),
            _ => {}
        }
    }

    /// The broker retransmits every delivery not acked.
    fn retransmit(&mut self) {
        let unacked: Vec<u64> = self.delivered.iter().copied().collect();
        if !unacked.is_empty() {
            let messages = unacked.iter().map(|&s| self.message(s)).collect();
            self.push_down(0, Body::Deliver(pb::Deliver { messages }));
        }
    }

    fn client(&mut self, f: pb::Frame) {
        self.session.handle_frame(self.now, f);
        self.session.flush_acks();
        self.pump();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send => {
                let id = self
                    .session
                    .send_text("bob", &format!("s{}", self.sent.len()))
                    .expect("send");
                self.sent.push(id);
                self.pump();
            }
            Op::PeerPost => {
                self.posted += 1;
                self.log.push((false, format!("p{}", self.posted)));
                let seq = self.log.len() as u64;
                self.delivered.insert(seq);
                let m = self.message(seq);
                self.push_down(0, Body::Deliver(pb::Deliver { messages: vec![m] }));
            }
            Op::History => {
                let id = self.session.history(direct("bob"), 0, None, 100);
                self.histories.push(id);
                self.pump();
            }
            Op::Up(i, twice) => {
                if !self.up.is_empty() {
                    let f = self.up.remove(i % self.up.len());
                    if twice {
                        self.broker(f.clone());
                    }
                    self.broker(f);
                }
            }
            Op::Down(i, twice) => {
                if !self.down.is_empty() {
                    let f = self.down.remove(i % self.down.len());
                    if twice {
                        self.client(f.clone());
                    }
                    self.client(f);
                }
            }
            Op::DropUp(i) => {
                if !self.up.is_empty() {
                    self.up.remove(i % self.up.len());
                }
            }
            Op::DropDown(i) => {
                if !self.down.is_empty() {
                    self.down.remove(i % self.down.len());
                }
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(ms);
                self.session.handle_timeout(self.now);
                self.pump();
                if ms >= 300 {
                    self.retransmit();
                }
            }
        }
    }

    /// The network heals: everything arrives in order, time passes, until all is settled.
    fn heal(&mut self) {
        for _ in 0..200 {
            while !self.up.is_empty() || !self.down.is_empty() {
                let up = std::mem::take(&mut self.up);
                for f in up {
                    self.broker(f);
                }
                let down = std::mem::take(&mut self.down);
                for f in down {
                    self.client(f);
                }
            }
            let settled = self.session.unacked().is_empty()
                && self.session.cursor(&direct("bob")) == self.log.len() as u64
                && !self.session.syncing()
                && self.pages.len() == self.histories.len();
            if settled {
                return;
            }
            self.apply(Op::Wait(500));
        }
        panic!(
            "not settled: unacked {:?}, cursor {} of {}, syncing {}, pages {:?} of {:?}",
            self.session.unacked(),
            self.session.cursor(&direct("bob")),
            self.log.len(),
            self.session.syncing(),
            self.pages,
            self.histories
        );
    }
}

proptest! {
    #[test]
    fn over_a_lossy_network_everything_happens_exactly_once(
        ops in prop::collection::vec(op(), 0..120),
    ) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        w.heal();
        // Every send acked once, stored once.
        prop_assert_eq!(w.acks.len(), w.sent.len(), "acks {:?} for sends {:?}", &w.acks, &w.sent);
        prop_assert_eq!(
            w.acks.iter().collect::<BTreeSet<_>>(),
            w.sent.iter().collect::<BTreeSet<_>>()
        );
        let own_stored = w.log.iter().filter(|(mine, _)| *mine).count();
        prop_assert_eq!(own_stored, w.sent.len(), "a send stored twice");
        // Every peer message shown once, in order (the order is checked as they come).
        let want: Vec<String> = (1..=w.posted).map(|i| format!("p{i}")).collect();
        prop_assert_eq!(&w.peer_bodies, &want);
        // Every history request answered once.
        let mut pages = w.pages.clone();
        pages.sort_unstable();
        let mut asked = w.histories.clone();
        asked.sort_unstable();
        prop_assert_eq!(pages, asked);
    }
}
