//! Operations, logs: the broker's log lines go to stderr through `tracing`, filtered by
//! `log.level` (or `RUST_LOG`, which replaces it), as text or one JSON object per line
//! (`log.format = "json"`). At `debug` each connection opened, logged in and closed gets a line;
//! no line ever holds a token or a message body.
//!
//! Which stderr lines are plain text whatever the format (scripts and tests read them): the
//! start-up banner, from `parley: effective configuration` through `parley: ready in ...`, and
//! `parley: limits.max_connections ... lowered to ...` (printed only under a low open-file
//! limit). The listening line is on stdout. Every other line is a log event.

use std::time::{Duration, Instant};

use parley_tests::{Broker, TIMEOUT, token};

/// How long a log line may take to reach the stderr file.
const LINE_WITHIN: Duration = Duration::from_secs(5);

/// The harness's marker between runs in the stderr file.
const START_MARKER: &str = "==== broker start #";

/// Waits until the broker's stderr has a line that `pred` accepts; returns it.
fn await_line(broker: &Broker, pred: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = Instant::now() + LINE_WITHIN;
    loop {
        if let Some(line) = broker.stderr_since(0).into_iter().find(|l| pred(l)) {
            return Some(line);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stderr lines that are log events: without the harness's markers and the plain-text
/// start-up lines (see the module documentation).
fn event_lines(broker: &Broker) -> Vec<String> {
    let mut in_banner = false;
    let mut out = Vec::new();
    for line in broker.stderr_since(0) {
        if line.starts_with("parley: effective configuration") {
            in_banner = true;
        }
        if in_banner {
            in_banner = !line.starts_with("parley: ready in ");
            continue;
        }
        if line.starts_with(START_MARKER) || line.starts_with("parley: limits.max_connections") {
            continue;
        }
        out.push(line);
    }
    out
}

/// A logged-in client that sends `body`, and a login refused for a forged token; returns the
/// valid token and the forged one.
fn traffic(broker: &Broker, body: &str) -> (String, String) {
    let mut alice = broker.connect("alice", "phone");
    alice.send("bob", body.to_owned());
    let token = broker.token("alice", "phone");
    let mut refused = broker.tcp();
    let forged = token::mint_valid(b"another secret", "mallory", "laptop");
    let _ = refused.try_login(&forged);
    refused.expect_closed(TIMEOUT);
    drop(alice);
    (token, forged)
}

#[test]
fn with_json_format_every_log_line_is_one_json_object_with_a_level() {
    let mut broker = Broker::start(&["log.format=json", "log.level=debug"]);
    let body = "json-body-that-must-not-be-logged";
    let (token, forged) = traffic(&broker, body);
    await_line(&broker, |l| {
        l.contains("connection closed") && l.contains("alice")
    })
    .expect("a debug line for alice's connection closing");
    broker.terminate();
    let lines = event_lines(&broker);
    assert!(
        lines.len() >= 5,
        "the run logged its connection events and its shutdown: {lines:#?}"
    );
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        let level = value.get("level").and_then(|l| l.as_str());
        assert!(
            matches!(level, Some("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")),
            "a JSON log line has a level: {line}"
        );
    }
    let login = lines
        .iter()
        .find(|l| l.contains("connection logged in"))
        .expect("a login line");
    let login: serde_json::Value = serde_json::from_str(login).expect("JSON");
    assert_eq!(login["level"], "DEBUG");
    assert_eq!(login["fields"]["user"], "alice", "{login}");
    assert_eq!(login["fields"]["device"], "phone", "{login}");
    let output = broker.output();
    for (what, secret) in [("a token", &token), ("a forged token", &forged)] {
        assert!(!output.contains(secret.as_str()), "{what} is never logged");
    }
    assert!(!output.contains(body), "a message body is never logged");
}

#[test]
fn at_debug_a_login_is_a_line_naming_the_user_and_device_and_never_the_token() {
    let broker = Broker::start(&["log.level=debug"]);
    let body = "text-body-that-must-not-be-logged";
    let (token, forged) = traffic(&broker, body);
    let login = await_line(&broker, |l| l.contains("connection logged in"))
        .expect("a debug line for the login");
    assert!(
        login.contains("DEBUG") && login.contains("alice") && login.contains("phone"),
        "the login line names its level, user and device: {login}"
    );
    let closed = await_line(&broker, |l| {
        l.contains("connection closed") && l.contains("alice")
    })
    .expect("a debug line for the close");
    assert!(
        closed.contains("closed by the peer"),
        "the close line says why: {closed}"
    );
    let refused = await_line(&broker, |l| l.contains("BAD_TOKEN"))
        .expect("the refused login's connection closes with its reason");
    assert!(refused.contains("connection closed"), "{refused}");
    let output = broker.output();
    for (what, secret) in [("a token", &token), ("a forged token", &forged)] {
        assert!(!output.contains(secret.as_str()), "{what} is never logged");
    }
    // Not even a part of one: the signature is the secret-bearing part.
    let signature = token.rsplit('.').next().expect("three parts");
    assert!(!output.contains(signature), "no part of a token is logged");
    assert!(!output.contains(body), "a message body is never logged");
}

#[test]
fn rust_log_overrides_log_level() {
    let raised = Broker::start_with_env(&[("RUST_LOG", "debug")], &["log.level=warn"]);
    drop(raised.connect("alice", "phone"));
    assert!(
        await_line(&raised, |l| l.contains("connection logged in")).is_some(),
        "RUST_LOG=debug shows debug lines although log.level=warn:\n{}",
        raised.output()
    );

    let lowered = Broker::start_with_env(&[("RUST_LOG", "warn")], &["log.level=debug"]);
    let mut alice = lowered.connect("alice", "phone");
    alice.ping();
    std::thread::sleep(Duration::from_millis(300));
    let lines = event_lines(&lowered);
    assert!(
        lines.is_empty(),
        "RUST_LOG=warn hides the debug and info lines although log.level=debug: {lines:#?}"
    );
}

#[test]
fn the_default_level_is_info_without_a_line_per_connection() {
    let broker = Broker::start(&[]);
    let mut alice = broker.connect("alice", "phone");
    alice.ping();
    await_line(&broker, |l| {
        l.contains("INFO") && l.contains("running with")
    })
    .expect("the info line that the node runs");
    std::thread::sleep(Duration::from_millis(300));
    let output = broker.output();
    assert!(
        !output.contains("connection logged in") && !output.contains("connection opened"),
        "connection events are debug lines, not shown at info:\n{output}"
    );
}

#[test]
fn a_bad_log_level_or_format_is_a_configuration_error() {
    for (setting, names) in [
        ("log.level=loud", "log.level"),
        ("log.level=info,parley_broker=loud", "log.level"),
        ("log.format=xml", "xml"),
    ] {
        let failed = Broker::start_expecting_failure(&[setting]);
        assert!(
            failed.status.is_some_and(|s| !s.success()),
            "{setting}: the broker refuses to start ({:?})\n{}",
            failed.status,
            failed.output
        );
        assert!(
            failed.output.contains("configuration") && failed.output.contains(names),
            "{setting}: the error says which setting is wrong:\n{}",
            failed.output
        );
    }
}
