//! The load generator itself: `loadgen` run as a black box against the real broker and against
//! its own relay. Its scenarios run and pass their checks against a correct system, its report
//! adds up, and (the point of a checker) a relay that drops, reorders, duplicates or corrupts one
//! message makes the run fail with exactly that counter. A run that cannot start says so with
//! exit code 2. Groups (`groups`, `fanout --conversation group`) pass their per-member window
//! checks against the real broker with membership churn racing the messages.
//!
//! `pairs` passes over every parley transport: tcp, ws, tls and wss (trusting the certificate of
//! `broker devcert`) and udp.
//!
//! Exit codes: 0 = passed, 1 = checks failed, 2 = could not run. Every run is short (a fraction
//! of a second of warm-up, a second measured) and small (tens of connections).

use std::net::SocketAddr;

use parley_tests::Broker;
use parley_tests::loadgen::{Loadgen, Outcome, Relay, Report, broker_pid};

/// A short traffic run: 0.2 s of warm-up, 1 s measured.
const SHORT: [&str; 4] = ["--warmup", "0.2", "--duration", "1"];

/// A closed-loop `pairs` run of 20 clients with 8 sends in flight each.
const SMALL_PAIRS: [&str; 4] = ["--conns", "20", "--window", "8"];

/// The scenarios `loadgen --help` must list.
const SCENARIOS: [&str; 7] = [
    "pairs", "fanout", "groups", "storm", "idle", "offline", "relay",
];

/// Asserts that a traffic run passed: exit 0, `passed`, no errors, a clean verdict, and every
/// message sent was delivered (and, when the system acknowledges sends, acknowledged).
fn assert_clean_traffic(run: &Outcome, acks: bool) -> Report {
    run.assert_code(0, "a run whose checks pass exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    report.check_eq(report.failures(), (0, 0, 0, 0, 0), "a clean verdict");
    let sent = report.u64("sent");
    report.check(sent > 0, "the run sent messages");
    report.check_eq(
        report.u64("delivered"),
        sent,
        "every message sent was delivered",
    );
    let acked = if acks { sent } else { 0 };
    report.check_eq(
        report.u64("acked"),
        acked,
        "every send is acked (none on a system that does not acknowledge)",
    );
    report
}

/// Runs `pairs` against a relay with `--fault <fault>` and returns the report of the run, which
/// must have failed its checks (exit 1, `passed: false`) without any error.
fn pairs_through_faulty_relay(fault: &str) -> Report {
    let mut relay = Relay::start(Some(fault));
    let run = Loadgen::new(["pairs", "--json", "--system", "relay"])
        .arg("--addr")
        .arg(relay.addr().to_string())
        .args(SMALL_PAIRS)
        .args(SHORT)
        // A lost message never settles: do not wait the default 10 s for it.
        .args(["--drain", "1"])
        .run();
    assert!(
        relay.is_running(),
        "the relay survives a run with a fault ({fault})"
    );
    run.assert_code(
        1,
        &format!("a run through a relay with --fault {fault} fails its checks"),
    );
    let report = run.report();
    report.check(!report.bool("passed"), "the report says failed");
    report.check_eq(
        report.u64("errors"),
        0,
        "a fault in the data is a verdict, not an error",
    );
    report.check(report.u64("sent") > 0, "the run sent messages");
    report
}

#[test]
fn a_short_pairs_run_against_the_broker_passes_its_checks() {
    let broker = Broker::start(&[]);
    let run = Loadgen::against("pairs", &broker)
        .args(SMALL_PAIRS)
        .args(SHORT)
        .run();
    let report = assert_clean_traffic(&run, true);
    report.check_eq(report.str("scenario"), "pairs", "the scenario");
    report.check_eq(report.str("transport"), "tcp", "the transport");
    report.check_eq(report.u64("conns"), 20, "one connection per client");
    report.check_eq(report.str("mode"), "closed window=8", "the load mode");
}

#[test]
fn a_short_pairs_run_over_websocket_passes_its_checks() {
    let broker = Broker::start(&[]);
    let run = Loadgen::new(["pairs", "--json", "--transport", "ws"])
        .args(["--secret", broker.secret()])
        .arg("--addr")
        .arg(broker.ws_addr().to_string())
        .args(SMALL_PAIRS)
        .args(SHORT)
        .run();
    let report = assert_clean_traffic(&run, true);
    report.check_eq(report.str("transport"), "ws", "the transport");
    report.check_eq(report.u64("conns"), 20, "one connection per client");
}

/// A broker with `tls` and `wss` listeners serving a certificate made by `broker devcert`, whose
/// temp dir (holding `cert.pem`, for `--ca`) comes back with it.
fn broker_with_devcert() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temp dir for the certificate");
    let status = std::process::Command::new(parley_tests::broker::broker_bin())
        .arg("devcert")
        .arg("--out")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run broker devcert");
    assert!(status.success(), "broker devcert exits with 0");
    let cert = format!(
        "tls.cert_path=\"{}\"",
        dir.path().join("cert.pem").display()
    );
    let key = format!("tls.key_path=\"{}\"", dir.path().join("key.pem").display());
    let broker = Broker::start(&[
        "listen.tls=\"127.0.0.1:0\"",
        "listen.wss=\"127.0.0.1:0\"",
        cert.as_str(),
        key.as_str(),
    ]);
    (broker, dir)
}

/// A short `pairs` run over `transport` to `addr`, with `extra` arguments.
fn pairs_over(broker: &Broker, transport: &str, addr: SocketAddr, extra: &[String]) -> Report {
    let run = Loadgen::new(["pairs", "--json", "--transport", transport])
        .args(["--secret", broker.secret()])
        .arg("--addr")
        .arg(addr.to_string())
        .args(extra.iter().cloned())
        .args(SMALL_PAIRS)
        .args(SHORT)
        .run();
    let report = assert_clean_traffic(&run, true);
    report.check_eq(report.str("transport"), transport, "the transport");
    report.check_eq(report.u64("conns"), 20, "one connection per client");
    report
}

#[test]
fn a_short_pairs_run_over_tls_passes_its_checks() {
    let (broker, certs) = broker_with_devcert();
    let ca = certs.path().join("cert.pem").display().to_string();
    pairs_over(&broker, "tls", broker.tls_addr(), &["--ca".into(), ca]);
}

#[test]
fn a_short_pairs_run_over_wss_passes_its_checks() {
    let (broker, certs) = broker_with_devcert();
    let ca = certs.path().join("cert.pem").display().to_string();
    pairs_over(&broker, "wss", broker.wss_addr(), &["--ca".into(), ca]);
}

#[test]
fn a_tls_run_without_a_ca_says_so_and_exits_with_2() {
    let (broker, _certs) = broker_with_devcert();
    let run = Loadgen::new(["pairs", "--json", "--transport", "tls"])
        .args(["--secret", broker.secret()])
        .arg("--addr")
        .arg(broker.tls_addr().to_string())
        .args(["--conns", "2"])
        .args(SHORT)
        .run();
    run.assert_code(2, "a TLS run with nothing to trust could not run");
    assert!(run.stderr.contains("--ca"), "stderr names --ca\n{run}");
}

#[test]
fn a_short_pairs_run_over_udp_passes_its_checks() {
    let broker = Broker::start(&["listen.udp=\"127.0.0.1:0\""]);
    let report = pairs_over(&broker, "udp", broker.udp_addr(), &[]);
    // On loopback at this load nothing should need to go twice; the count is reported.
    report.u64("udp/resent");
    report.u64("udp/dropped");
}

#[test]
fn a_pairs_run_over_udp_losing_datagrams_both_ways_still_loses_nothing() {
    let broker = Broker::start(&["listen.udp=\"127.0.0.1:0\""]);
    // 5% of the datagrams loadgen sends and receives vanish (its hidden --udp-loss): lost sends
    // and acks are resent by loadgen, lost deliveries and delivery acks by the broker.
    let report = pairs_over(
        &broker,
        "udp",
        broker.udp_addr(),
        &[
            "--udp-loss".into(),
            "0.05".into(),
            "--drain".into(),
            "30".into(),
        ],
    );
    report.check(
        report.u64("udp/resent") > 0,
        "sends whose datagram or ack was lost went again",
    );
    report.check(
        report.u64("verdict/redelivered") > 0,
        "deliveries whose datagram or ack was lost came again, de-duplicated by seq",
    );
}

#[test]
fn a_short_fanout_run_against_the_broker_uses_rooms_and_every_subscriber_gets_every_message() {
    const SUBSCRIBERS: u64 = 10;
    let broker = Broker::start(&["shards=2", "storage.durability=never"]);
    let run = Loadgen::against("fanout", &broker)
        .args(["--subscribers", "10", "--publishers", "2", "--window", "8"])
        .args(SHORT)
        .run();
    run.assert_code(0, "a fan-out run whose checks pass exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    report.check_eq(report.failures(), (0, 0, 0, 0, 0), "a clean verdict");
    report.check_eq(
        report.u64("verdict/dropped"),
        0,
        "subscribers that keep up lose nothing",
    );
    let sent = report.u64("sent");
    report.check(sent > 0, "the publishers sent messages");
    report.check_eq(report.u64("acked"), sent, "every room send is acked");
    report.check_eq(
        report.u64("delivered"),
        sent * SUBSCRIBERS,
        "every subscriber got every message of its publisher's room",
    );
    report.check_eq(
        report.u64("conns"),
        2 * (SUBSCRIBERS + 1),
        "one connection per client",
    );
}

/// Asserts the group checks of `report` are all clean: no failure counter, nothing outside a
/// membership window, nothing misplaced.
fn assert_clean_group_views(report: &Report) {
    report.check_eq(report.failures(), (0, 0, 0, 0, 0), "a clean verdict");
    report.check_eq(
        report.u64("verdict/outside_window"),
        0,
        "no member got a message outside its membership windows",
    );
    report.check_eq(
        report.u64("verdict/misplaced"),
        0,
        "every member's copy of a seq is what the ack or the change's result named",
    );
}

#[test]
fn a_short_groups_run_with_churn_against_the_broker_passes_its_window_checks() {
    let broker = Broker::start(&["storage.durability=never"]);
    let run = Loadgen::against("groups", &broker)
        .args(["--groups", "3", "--members", "12", "--online", "0.75"])
        .args(["--publishers", "2", "--churn", "5", "--window", "8"])
        .args(["--warmup", "0.2", "--duration", "2"])
        .run();
    run.assert_code(0, "a groups run whose checks pass exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    assert_clean_group_views(&report);
    report.check_eq(report.str("scenario"), "groups", "the scenario");
    report.check_eq(
        report.u64("conns"),
        3 * 9,
        "the online members connect (9 of 12 per group), the others never do",
    );
    let sent = report.u64("sent");
    report.check(sent > 0, "the publishers sent messages");
    report.check_eq(report.u64("acked"), sent, "every group send is acked");
    // Each message reaches the other 8 online members, but those removed at its seq.
    let delivered = report.u64("delivered");
    report.check(
        delivered > sent && delivered <= sent * 8,
        &format!("between 1 and 8 copies per message: {delivered} for {sent} sent"),
    );
    let changes = report.u64("membership_changes");
    report.check(
        changes >= 10,
        &format!("5 changes/s per group over 2.2 s race the messages, made {changes}"),
    );
}

#[test]
fn a_group_fanout_gets_every_message_to_every_subscriber() {
    const SUBSCRIBERS: u64 = 10;
    let broker = Broker::start(&["storage.durability=never"]);
    let run = Loadgen::against("fanout", &broker)
        .args(["--conversation", "group"])
        .args(["--subscribers", "10", "--publishers", "2", "--window", "8"])
        .args(SHORT)
        .run();
    run.assert_code(0, "a group fan-out whose checks pass exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    assert_clean_group_views(&report);
    let sent = report.u64("sent");
    report.check(sent > 0, "the publishers sent messages");
    report.check_eq(report.u64("acked"), sent, "every group send is acked");
    report.check_eq(
        report.u64("delivered"),
        sent * SUBSCRIBERS,
        "a group is complete, unlike a room: every subscriber got every message",
    );
    report.check_eq(
        report.u64("membership_changes"),
        0,
        "a fan-out makes no changes",
    );
}

#[test]
fn a_groups_run_larger_than_the_brokers_member_limit_says_so_and_exits_with_2() {
    let broker = Broker::start(&["groups.max_members=5"]);
    let run = Loadgen::against("groups", &broker)
        .args(["--groups", "1", "--members", "8", "--churn", "0"])
        .args(SHORT)
        .run();
    run.assert_code(2, "a run that cannot make its groups could not run");
    assert!(
        run.stderr.contains("GROUP_FULL") && run.stderr.contains("groups.max_members=8"),
        "stderr names the refusal and the setting to raise\n{run}"
    );
}

#[test]
fn an_open_loop_run_sends_on_schedule_and_passes() {
    let broker = Broker::start(&[]);
    let run = Loadgen::against("pairs", &broker)
        .args(["--conns", "20", "--rate", "2000"])
        .args(SHORT)
        .run();
    let report = assert_clean_traffic(&run, true);
    // 2000/s over 0.2 s of warm-up and 1 s measured: 2400 messages are due.
    let sent = report.u64("sent");
    report.check(
        (2000..=2700).contains(&sent),
        &format!(
            "an open loop sends about rate × (warm-up + duration) = 2400 messages, sent {sent}"
        ),
    );
    report.check_eq(report.str("mode"), "open rate=2000/s", "the load mode");
}

#[test]
fn a_run_over_two_processes_passes_and_merges_their_counts() {
    let broker = Broker::start(&[]);
    let run = Loadgen::against("pairs", &broker)
        .args(SMALL_PAIRS)
        .args(SHORT)
        .args(["--procs", "2"])
        .run();
    let report = assert_clean_traffic(&run, true);
    report.check_eq(report.u64("procs"), 2, "two worker processes");
    report.check_eq(report.u64("clients"), 20, "the clients of both workers");
    report.check_eq(
        report.u64("conns"),
        20,
        "the connections of both workers add up to one per client",
    );
    // Each worker's set-up is counted once in the merged latency histogram.
    report.check_eq(
        report.u64("connect_latency/count"),
        20,
        "every connection's connect latency is merged in, once",
    );
}

#[test]
fn a_login_storm_against_the_broker_passes_and_reports_its_rate() {
    let broker = Broker::start(&[]);
    let run = Loadgen::against("storm", &broker)
        .args(["--conns", "200"])
        .run();
    run.assert_code(0, "a storm whose logins all succeed exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    report.check_eq(report.u64("conns"), 200, "every connection came up");
    let rate = report.f64("logins_per_s");
    report.check(
        rate > 0.0,
        &format!("a storm reports its logins per second, got {rate}"),
    );
    report.check_eq(report.u64("sent"), 0, "a storm sends no messages");
}

#[test]
fn an_offline_run_delivers_every_message_through_sync() {
    let broker = Broker::start(&[]);
    let run = Loadgen::against("offline", &broker)
        .args(["--conns", "20", "--messages", "50"])
        .run();
    run.assert_code(0, "an offline run whose checks pass exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("errors"), 0, "no errors");
    report.check_eq(report.failures(), (0, 0, 0, 0, 0), "a clean verdict");
    report.check_eq(report.u64("sent"), 10 * 50, "10 senders × 50 messages");
    report.check_eq(report.u64("acked"), 10 * 50, "every send acked");
    report.check_eq(
        report.u64("delivered"),
        10 * 50,
        "10 receivers each catch up on their partner's 50",
    );
    let sync_s = report.f64("sync_s");
    report.check(
        sync_s >= 0.0,
        &format!("the catch-up time is reported, got {sync_s}"),
    );
}

#[test]
fn an_idle_run_reports_the_brokers_memory_per_connection() {
    let broker = Broker::start(&[]);
    let pid = broker_pid(&broker).expect("find the harness broker's pid in /proc");
    let run = Loadgen::against("idle", &broker)
        .args(["--conns", "20", "--duration", "0.5"])
        .args(["--broker-pid", &pid.to_string()])
        .run();
    run.assert_code(0, "an idle run that holds its connections exits with 0");
    let report = run.report();
    report.check(report.bool("passed"), "the report says passed");
    report.check_eq(report.u64("conns"), 20, "every connection held");
    report.check_eq(report.u64("broker/pid"), u64::from(pid), "the broker's pid");
    report.f64("broker/rss_per_conn");
    report.check(
        report.u64("broker/rss_after") > 0,
        "the broker's resident memory is read",
    );
}

#[test]
fn a_pairs_run_through_a_clean_relay_passes() {
    let mut relay = Relay::start(None);
    let run = Loadgen::new(["pairs", "--json", "--system", "relay"])
        .arg("--addr")
        .arg(relay.addr().to_string())
        .args(SMALL_PAIRS)
        .args(SHORT)
        .run();
    assert!(relay.is_running(), "the relay survives the run");
    let report = assert_clean_traffic(&run, false);
    report.check_eq(report.str("system"), "relay", "the system");
}

#[test]
fn a_relay_that_drops_one_message_fails_the_run_with_one_lost() {
    let report = pairs_through_faulty_relay("drop:5");
    report.check_eq(
        report.failures(),
        (1, 0, 0, 0, 0),
        "(lost, duplicated, out_of_order, corrupt, gaps): exactly one message lost",
    );
    report.check_eq(
        report.u64("delivered") + 1,
        report.u64("sent"),
        "all but the dropped message delivered",
    );
}

#[test]
fn a_relay_that_reorders_one_message_fails_the_run_with_one_out_of_order() {
    let report = pairs_through_faulty_relay("reorder:5");
    report.check_eq(
        report.failures(),
        (0, 0, 1, 0, 0),
        "(lost, duplicated, out_of_order, corrupt, gaps): one late message, none lost",
    );
    report.check_eq(
        report.u64("delivered"),
        report.u64("sent"),
        "the late message still counts as delivered",
    );
}

#[test]
fn a_relay_that_duplicates_one_message_fails_the_run_with_one_duplicated() {
    let report = pairs_through_faulty_relay("duplicate:5");
    report.check_eq(
        report.failures(),
        (0, 1, 0, 0, 0),
        "(lost, duplicated, out_of_order, corrupt, gaps): one duplicate",
    );
    report.check_eq(
        report.u64("delivered"),
        report.u64("sent"),
        "the copy is not counted as a second delivery",
    );
}

#[test]
fn a_relay_that_corrupts_one_message_fails_the_run_with_one_corrupt_and_one_lost() {
    let report = pairs_through_faulty_relay("corrupt:5");
    // The corrupt copy is not an arrival of the message it claims to be, so that message also
    // never arrived intact: it is lost as well.
    report.check_eq(
        report.failures(),
        (1, 0, 0, 1, 0),
        "(lost, duplicated, out_of_order, corrupt, gaps): one corrupt, hence one lost",
    );
    report.check_eq(
        report.u64("delivered") + 1,
        report.u64("sent"),
        "the corrupt copy is not counted as delivered",
    );
}

#[test]
fn a_run_against_a_port_where_nothing_listens_exits_with_2() {
    // A socket bound but not listening: the port is ours for the test, and connects are refused.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("create a socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind a loopback port");
    let addr = socket
        .local_addr()
        .expect("the bound address")
        .as_socket()
        .expect("an inet address");
    let run = Loadgen::new(["pairs", "--json", "--secret", "no-broker-here"])
        .arg("--addr")
        .arg(addr.to_string())
        .args(["--conns", "4"])
        .args(SHORT)
        .run();
    run.assert_code(2, "a run that cannot connect exits with 2 (could not run)");
    assert!(
        run.stdout.trim().is_empty(),
        "no report is printed for a run that never ran\n{run}"
    );
    assert!(
        run.stderr.contains("connect failed") && run.stderr.contains("refused"),
        "stderr says the connection was refused\n{run}"
    );
}

#[test]
fn help_lists_every_scenario() {
    let run = Loadgen::new(["--help"]).run();
    run.assert_code(0, "--help exits with 0");
    let commands: Vec<&str> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for scenario in SCENARIOS {
        assert!(
            commands.contains(&scenario),
            "`loadgen --help` lists `{scenario}` among its commands {commands:?}\n{run}"
        );
    }
}
