//! `parley-sim`: runs the whole-node simulation over many seeds.
//!
//! ```text
//! parley-sim [--seeds N] [--from S] [--seed S] [--plant release-before-flush|push-after-leave|keep-routes|mute-link-up] [--trace]
//! ```
//!
//! Runs seeds `S..S+N` (default 0..1000) and stops at the first that breaks a promise: it prints
//! the seed, what broke, and the last events of its trace (run that seed again with `--seed S
//! --trace` for the whole trace). Exit status 0 if every seed passed, 1 if one failed, 2 on bad
//! arguments.

use std::process::ExitCode;
use std::time::Instant;

use parley_sim::{Options, Plant, run};

fn main() -> ExitCode {
    let mut from = 0u64;
    let mut seeds = 1000u64;
    let mut opts = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{name} needs a number");
            }
            v
        };
        match a.as_str() {
            "--seeds" => match num("--seeds") {
                Some(n) => seeds = n,
                None => return ExitCode::from(2),
            },
            "--from" => match num("--from") {
                Some(n) => from = n,
                None => return ExitCode::from(2),
            },
            "--seed" => match num("--seed") {
                Some(n) => {
                    from = n;
                    seeds = 1;
                }
                None => return ExitCode::from(2),
            },
            "--trace" => opts.trace = true,
            "--plant" => match args.next().as_deref() {
                Some("release-before-flush") => opts.plant = Plant::ReleaseBeforeFlush,
                Some("push-after-leave") => opts.plant = Plant::PushAfterLeave,
                Some("keep-routes") => opts.plant = Plant::KeepRoutes,
                Some("mute-link-up") => opts.plant = Plant::MuteLinkUp,
                other => {
                    eprintln!(
                        "unknown bug to plant: {other:?} (known: release-before-flush, push-after-leave, keep-routes, mute-link-up)"
                    );
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "parley-sim [--seeds N] [--from S] [--seed S] [--plant release-before-flush|push-after-leave|keep-routes|mute-link-up] [--trace]"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let started = Instant::now();
    let (mut acked, mut crashes, mut events) = (0usize, 0u32, 0u64);
    let mut counters = parley_broker::Counters::default();
    for seed in from..from.saturating_add(seeds) {
        let out = run(seed, &opts);
        acked += out.acked;
        crashes += out.crashes;
        events += out.events;
        counters.add(&out.counters);
        if !out.failures.is_empty() {
            println!(
                "seed {seed} FAILED ({} nodes of {} shards, {} devices, {} crashes, {} acked, {} ms virtual):",
                out.nodes, out.shards, out.clients, out.crashes, out.acked, out.virtual_ms
            );
            for f in &out.failures {
                println!("  {f}");
            }
            // One seed asked for: its whole trace; otherwise the end of it.
            let tail = if seeds == 1 {
                0
            } else {
                out.trace.len().saturating_sub(60)
            };
            for line in &out.trace[tail..] {
                println!("  | {line}");
            }
            println!("reproduce: cargo run -p parley-sim --release -- --seed {seed} --trace");
            return ExitCode::from(1);
        }
        if seeds == 1 {
            // One seed asked for, with --trace: its whole trace even though it passed.
            for line in &out.trace {
                println!("  | {line}");
            }
        }
    }
    println!(
        "{seeds} seeds from {from} passed: {acked} messages acked, {crashes} crashes, {events} events, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "the cores: {} logins, {} stored, {} retries answered from the de-dup ring, {} deliveries, {} retransmits, {} behinds, {} syncs, {} flushes, {} checkpoints, {} holds at the budget, {} group events, {} group deliveries, {} room messages, {} room deliveries, {} room drops, {} sends parked on the hook",
        counters.logins,
        counters.messages_stored,
        counters.retries_deduplicated,
        counters.deliveries,
        counters.retransmits,
        counters.behinds,
        counters.syncs,
        counters.flushes,
        counters.checkpoints,
        counters.holds,
        counters.group_events,
        counters.group_deliveries,
        counters.room_messages,
        counters.room_deliveries,
        counters.room_drops,
        counters.hooks_parked,
    );
    println!(
        "the presence index: {} logins waited for their route, {} refused UNAVAILABLE, {} routes of logins gone meanwhile withdrawn",
        counters.routes_asked, counters.routes_failed, counters.routes_orphaned
    );
    println!(
        "the cluster: {} sessions relayed to their home, {} mails out and {} in, {} handed back for want of a link, {} connections closed for a lost link, {} fills of missed messages, {} requests refused past the lease",
        counters.relays_opened,
        counters.remote_mail_out,
        counters.remote_mail_in,
        counters.unreachable_mail,
        counters.closed_for_link,
        counters.fills,
        counters.fenced,
    );
    ExitCode::SUCCESS
}
