//! The writer against a model of Redis shared by three nodes, with faults: runs that fail
//! before or after they are applied, Redis restarting empty, and readers dropping (and
//! spoiling) a paused node's routes. Whatever happened, once the faults stop and each node has
//! flushed and checked, Redis holds exactly every node's logged-in routes, and every login was
//! answered exactly once.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use proptest::prelude::*;

use super::*;
use crate::hooks::Ticket;

/// Redis as the route script sees it.
#[derive(Debug, Default)]
struct Redis {
    /// (user, device) → value.
    routes: BTreeMap<(String, String), String>,
    /// node → (boot, count, xor, spoiled).
    digests: BTreeMap<String, (String, i64, i32, bool)>,
}

/// What the next run of a store does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Fails without applying anything (Redis unreachable).
    Before,
    /// Applies, then fails (the answer was lost).
    After,
}

/// One node's view of the shared model.
struct Store {
    redis: Rc<RefCell<Redis>>,
    node: String,
    boot: String,
    fault: Option<Fault>,
}

impl RouteStore for Store {
    type Error = &'static str;

    fn run(&mut self, writes: &[Write<'_>], reset: bool) -> Result<Digest, &'static str> {
        if self.fault == Some(Fault::Before) {
            self.fault = None;
            return Err("unreachable");
        }
        let mut r = self.redis.borrow_mut();
        let (mut count, mut xor, spoiled) = match r.digests.get(&self.node) {
            _ if reset => (0, 0, false),
            Some((b, c, x, s)) if *b == self.boot => (*c, *x, *s),
            _ => (0, 0, true),
        };
        for w in writes {
            let key = (w.user.to_owned(), w.device.to_owned());
            let value = routes::value(&self.node, &self.boot, w.tag);
            let f = routes::fingerprint(w.user, w.device, w.tag);
            match w.kind {
                Kind::Up => {
                    r.routes.insert(key, value);
                    count += 1;
                    xor ^= f;
                }
                Kind::Down | Kind::Forget => {
                    if r.routes.get(&key) == Some(&value) {
                        r.routes.remove(&key);
                    }
                    if w.kind == Kind::Down {
                        count -= 1;
                        xor ^= f;
                    }
                }
                Kind::Renew => {}
            }
        }
        r.digests
            .insert(self.node.clone(), (self.boot.clone(), count, xor, spoiled));
        drop(r);
        if self.fault == Some(Fault::After) {
            self.fault = None;
            return Err("answer lost");
        }
        let count = if spoiled { -1 } else { count };
        Ok(Digest { count, xor })
    }
}

/// One step of a scenario.
#[derive(Debug, Clone)]
enum Step {
    /// A login of a fresh device of user `user` on node `node`.
    Login { node: usize, user: u8 },
    /// The `which`-th logged-in connection of `node` hangs up.
    Logout { node: usize, which: usize },
    /// `node` writes what it has queued; its first run fails so, if given.
    Flush { node: usize, fault: Option<Fault> },
    /// `node`'s heartbeat check.
    Check { node: usize, fault: Option<Fault> },
    /// Time passes (logins past their deadline are answered UNAVAILABLE).
    Tick { ms: u64 },
    /// Redis restarts empty.
    RedisRestart,
    /// `node` was paused past its lease: a reader drops its routes and spoils its digest.
    Paused { node: usize },
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Fault::Before)),
        1 => Just(Some(Fault::After)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..NODES, 0u8..5).prop_map(|(node, user)| Step::Login { node, user }),
        3 => (0..NODES, 0usize..8).prop_map(|(node, which)| Step::Logout { node, which }),
        5 => (0..NODES, fault()).prop_map(|(node, fault)| Step::Flush { node, fault }),
        2 => (0..NODES, fault()).prop_map(|(node, fault)| Step::Check { node, fault }),
        2 => (0u64..400).prop_map(|ms| Step::Tick { ms }),
        1 => Just(Step::RedisRestart),
        1 => (0..NODES).prop_map(|node| Step::Paused { node }),
    ]
}

const NODES: usize = 3;

/// A login timeout of the writers, ms.
const TIMEOUT_MS: u64 = 300;

/// The writers' queue bound (small, so scenarios reach it).
const MAX_QUEUE: usize = 6;

/// One node of the scenario.
struct Node {
    writer: RouteWriter,
    store: Store,
    /// Connections logged in (answered Ok, not hung up): tag → (user, device).
    online: BTreeMap<RouteTag, (String, String)>,
    next_slot: u32,
}

fn run_scenario(steps: &[Step]) -> Result<(), TestCaseError> {
    let redis = Rc::new(RefCell::new(Redis::default()));
    let start = Instant::now();
    let mut now = start;
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| Node {
            writer: RouteWriter::new(Duration::from_millis(TIMEOUT_MS), 100, MAX_QUEUE),
            store: Store {
                redis: Rc::clone(&redis),
                node: format!("n{i}"),
                boot: format!("boot{i}"),
                fault: None,
            },
            online: BTreeMap::new(),
            next_slot: 0,
        })
        .collect();
    // Every ticket (node, serial) asked, and the answers each got.
    let mut answers: BTreeMap<(usize, u64), Vec<bool>> = BTreeMap::new();
    let mut device = 0u64;
    let take =
        |node: usize, n: &mut Node, got: Vec<Routed>, answers: &mut BTreeMap<_, Vec<bool>>| {
            for a in got {
                answers
                    .entry((node, a.ticket.serial))
                    .or_default()
                    .push(a.result.is_ok());
                if a.result.is_ok() {
                    n.online
                        .insert(a.tag, (a.user.to_string(), a.device.to_string()));
                }
            }
        };
    for s in steps {
        match *s {
            Step::Login { node, user } => {
                let n = &mut nodes[node];
                n.next_slot += 1;
                device += 1;
                let ticket = Ticket {
                    shard: 0,
                    slot: n.next_slot,
                    generation: 1,
                    serial: u64::from(n.next_slot),
                };
                answers.entry((node, ticket.serial)).or_default();
                let refused = n.writer.push(
                    RouteOp::Up {
                        ticket: Some(ticket),
                        user: format!("u{user}").into(),
                        device: format!("d{device}").into(),
                        tag: RouteTag {
                            shard: 0,
                            slot: n.next_slot,
                            generation: 1,
                        },
                    },
                    now,
                );
                take(node, n, refused.into_iter().collect(), &mut answers);
            }
            Step::Logout { node, which } => {
                let n = &mut nodes[node];
                if n.online.is_empty() {
                    continue;
                }
                let tag = *n
                    .online
                    .keys()
                    .nth(which % n.online.len())
                    .expect("in range");
                let (user, device) = n.online.remove(&tag).expect("online");
                let refused = n.writer.push(
                    RouteOp::Down {
                        user: user.into(),
                        device: device.into(),
                        tag,
                    },
                    now,
                );
                prop_assert!(refused.is_none(), "a withdrawal is never refused");
            }
            Step::Flush { node, fault } => {
                let n = &mut nodes[node];
                n.store.fault = fault;
                let (got, _, _) = n.writer.flush(&mut n.store);
                n.store.fault = None;
                take(node, n, got, &mut answers);
            }
            Step::Check { node, fault } => {
                let n = &mut nodes[node];
                n.store.fault = fault;
                let _ = n.writer.check(&mut n.store, 2);
                n.store.fault = None;
            }
            Step::Tick { ms } => {
                now += Duration::from_millis(ms);
                for (i, n) in nodes.iter_mut().enumerate() {
                    let got = n.writer.expire(now);
                    take(i, n, got, &mut answers);
                }
            }
            Step::RedisRestart => *redis.borrow_mut() = Redis::default(),
            Step::Paused { node } => {
                let mut r = redis.borrow_mut();
                let name = format!("n{node} ");
                r.routes.retain(|_, v| !v.starts_with(&name));
                if let Some(d) = r.digests.get_mut(&format!("n{node}")) {
                    d.3 = true;
                }
            }
        }
    }
    // The faults stop: every node writes what it has and checks, twice.
    for _ in 0..2 {
        for (i, n) in nodes.iter_mut().enumerate() {
            let (got, _, e) = n.writer.flush(&mut n.store);
            prop_assert!(e.is_none());
            take(i, n, got, &mut answers);
            let (_, r) = n.writer.check(&mut n.store, 0);
            prop_assert!(r.is_ok());
        }
    }
    for ((node, serial), got) in &answers {
        prop_assert_eq!(
            got.len(),
            1,
            "login {} of node {} answered {:?}",
            serial,
            node,
            got
        );
    }
    let r = redis.borrow();
    for (i, n) in nodes.iter().enumerate() {
        let name = format!("n{i}");
        let held: BTreeSet<(String, String, String)> = r
            .routes
            .iter()
            .filter(|(_, v)| v.split(' ').next() == Some(name.as_str()))
            .map(|((u, d), v)| (u.clone(), d.clone(), v.clone()))
            .collect();
        let expected: BTreeSet<(String, String, String)> = n
            .online
            .iter()
            .map(|(tag, (u, d))| {
                (
                    u.clone(),
                    d.clone(),
                    routes::value(&name, &format!("boot{i}"), *tag),
                )
            })
            .collect();
        prop_assert_eq!(&held, &expected, "node {}", i);
        prop_assert_eq!(n.writer.routes(), n.online.len());
    }
    Ok(())
}

proptest! {
    // The default number of cases (256, or `PROPTEST_CASES` for long runs).

    #[test]
    fn redis_ends_up_holding_exactly_the_logged_in_routes_whatever_failed(
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        run_scenario(&steps)?;
    }
}

#[test]
fn a_login_past_its_deadline_is_answered_unavailable_once_and_its_route_withdrawn() {
    let redis = Rc::new(RefCell::new(Redis::default()));
    let mut store = Store {
        redis: Rc::clone(&redis),
        node: "n0".into(),
        boot: "b".into(),
        fault: None,
    };
    let mut w = RouteWriter::new(Duration::from_millis(100), 7, 1000);
    let t0 = Instant::now();
    // bob's route, written: the boot's digest starts.
    let bob_tag = RouteTag {
        shard: 0,
        slot: 1,
        generation: 1,
    };
    let _ = w.push(
        RouteOp::Up {
            ticket: None,
            user: "bob".into(),
            device: "d".into(),
            tag: bob_tag,
        },
        t0,
    );
    let (_, _, e) = w.flush(&mut store);
    assert!(e.is_none());
    store.fault = Some(Fault::After);
    let ticket = Ticket {
        shard: 1,
        slot: 3,
        generation: 1,
        serial: 9,
    };
    let _ = w.push(
        RouteOp::Up {
            ticket: Some(ticket),
            user: "alice".into(),
            device: "phone".into(),
            tag: RouteTag {
                shard: 1,
                slot: 3,
                generation: 1,
            },
        },
        t0,
    );
    // Written, but the answer was lost: nothing is answered yet.
    let (got, _, e) = w.flush(&mut store);
    assert!(got.is_empty() && e.is_some());
    assert_eq!(redis.borrow().routes.len(), 2);
    // Past the deadline: UNAVAILABLE with the hint, and the route (written after all) goes.
    let expired = w.expire(t0 + Duration::from_millis(100));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].result, Err(7));
    let (got, outcome, e) = w.flush(&mut store);
    assert!(got.is_empty() && e.is_none());
    let only_bob: Vec<String> = redis
        .borrow()
        .routes
        .keys()
        .map(|(u, _)| u.clone())
        .collect();
    assert_eq!(only_bob, ["bob"]);
    // The digest had counted the lost write: the difference was seen at once and replayed.
    assert_eq!(outcome.replays, 1);
    assert_eq!(redis.borrow().digests["n0"].1, 1);
    let (outcome, r) = w.check(&mut store, 0);
    assert!(r.is_ok());
    assert_eq!(outcome.replays, 0);
}

#[test]
fn a_login_finding_the_queue_full_is_refused_at_once_and_withdrawals_still_queue() {
    let mut w = RouteWriter::new(Duration::from_secs(3), 5, 2);
    let now = Instant::now();
    let up = |slot: u32| RouteOp::Up {
        ticket: Some(Ticket {
            shard: 0,
            slot,
            generation: 1,
            serial: u64::from(slot),
        }),
        user: "u".into(),
        device: format!("d{slot}").into(),
        tag: RouteTag {
            shard: 0,
            slot,
            generation: 1,
        },
    };
    assert!(w.push(up(1), now).is_none());
    assert!(w.push(up(2), now).is_none());
    let refused = w.push(up(3), now).expect("refused at once");
    assert_eq!((refused.ticket.serial, refused.result), (3, Err(5)));
    let down = RouteOp::Down {
        user: "u".into(),
        device: "d9".into(),
        tag: RouteTag {
            shard: 0,
            slot: 9,
            generation: 1,
        },
    };
    assert!(w.push(down, now).is_none());
}
