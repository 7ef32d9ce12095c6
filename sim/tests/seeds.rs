//! The simulation as a test: many seeds, each a whole node or a cluster of two or three, with
//! crashes, broken links, a lossy Redis, slow and silent clients and dropped connections,
//! checked against the broker's promises.

use parley_sim::{Options, Plant, run};

/// Seeds run by `cargo test` (the `parley-sim` binary runs any number).
const SEEDS: u64 = 1000;

fn report(out: &parley_sim::Outcome) -> String {
    let tail = out.trace.len().saturating_sub(40);
    format!(
        "seed {} broke a promise:\n  {}\n{}\nreproduce: cargo run -p parley-sim --release -- --seed {} --trace",
        out.seed,
        out.failures.join("\n  "),
        out.trace[tail..].join("\n"),
        out.seed
    )
}

#[test]
fn every_promise_holds_over_a_thousand_seeds_of_crashes_and_misbehaving_clients() {
    let mut acked = 0;
    let mut crashes = 0;
    let mut clusters = 0;
    let mut counters = parley_broker::Counters::default();
    for seed in 0..SEEDS {
        let out = run(seed, &Options::default());
        if !out.failures.is_empty() {
            // Run it again with the trace on, for the report.
            let traced = run(
                seed,
                &Options {
                    trace: true,
                    ..Options::default()
                },
            );
            panic!("{}", report(&traced));
        }
        acked += out.acked;
        crashes += out.crashes;
        clusters += usize::from(out.nodes > 1);
        counters.add(&out.counters);
    }
    assert!(
        acked > 10_000,
        "the seeds store real traffic ({acked} acked)"
    );
    assert!(
        crashes > 500,
        "the seeds crash the node ({crashes} crashes)"
    );
    // The seeds of several nodes do what a cluster does, faults included.
    assert!(clusters > 300, "{clusters} seeds ran a cluster");
    let c = &counters;
    for (what, n) in [
        ("sessions relayed to their home", c.relays_opened),
        ("mails carried between nodes", c.remote_mail_in),
        ("mails handed back for want of a link", c.unreachable_mail),
        ("connections closed for a lost link", c.closed_for_link),
        ("fills of messages a home missed", c.fills),
        ("requests refused past the lease", c.fenced),
    ] {
        assert!(n > 0, "the seeds had no {what}");
    }
}

#[test]
fn the_same_seed_gives_the_same_history() {
    // Seeds 3 and 10 run clusters of three nodes.
    for seed in [0, 1, 3, 7, 10, 42, 99] {
        let a = run(seed, &Options::default());
        let b = run(seed, &Options::default());
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} ran differently twice"
        );
        assert_eq!((a.acked, a.events), (b.acked, b.events));
    }
    assert_ne!(
        run(1, &Options::default()).trace_hash,
        run(2, &Options::default()).trace_hash
    );
}

/// Runs seeds with `plant` until one fails; checks that it failed for a reason `expected`
/// accepts and that the same seed passes without the bug; returns that run. `bug` says what went
/// unnoticed if no seed fails.
fn caught(plant: Plant, bug: &str, expected: impl Fn(&str) -> bool) -> parley_sim::Outcome {
    let planted = Options {
        plant,
        ..Options::default()
    };
    let Some(out) = (0..SEEDS)
        .map(|seed| run(seed, &planted))
        .find(|o| !o.failures.is_empty())
    else {
        panic!("{bug} went unnoticed over {SEEDS} seeds");
    };
    assert!(
        out.failures.iter().any(|f| expected(f)),
        "seed {} failed for the expected reason: {:?}",
        out.seed,
        out.failures
    );
    // The same seed without the bug passes.
    assert!(run(out.seed, &Options::default()).failures.is_empty());
    out
}

#[test]
fn a_planted_release_before_flush_is_caught_and_its_seed_reported() {
    caught(
        Plant::ReleaseBeforeFlush,
        "acks released before the flush",
        |f| f.contains("missing") || f.contains("holds two messages"),
    );
}

#[test]
fn a_planted_push_after_leave_is_caught_and_its_seed_reported() {
    caught(
        Plant::PushAfterLeave,
        "a removed member pushed the group's later messages",
        |f| f.contains("outside its memberships"),
    );
}

#[test]
fn a_planted_route_never_withdrawn_is_caught_and_its_seed_reported() {
    caught(
        Plant::KeepRoutes,
        "a closed connection's route left in the presence index",
        |f| f.contains("presence index"),
    );
}

#[test]
fn a_planted_link_up_that_tells_the_homes_nothing_is_caught_and_its_seed_reported() {
    let out = caught(
        Plant::MuteLinkUp,
        "homes left without what a lost link carried",
        |f| f.contains("sync"),
    );
    assert!(out.nodes > 1, "seed {} runs a cluster", out.seed);
}
