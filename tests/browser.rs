//! The browser page (`admin.web = true`) in two real headless Chromium pages: they log in with
//! dev tokens, chat, reconnect by themselves across a broker restart (a line typed meanwhile is
//! sent once it is back), every message arrives exactly once and in order, and a freshly opened
//! page sees the history.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it; `PARLEY_CHROMIUM` names another binary).

use std::time::{Duration, Instant};

use parley_tests::broker::Broker;
use parley_tests::chromium::{Chromium, Page};
use parley_tests::http;
use serde_json::Value;

/// How long a page may take to show what the test waits for.
const WAIT: Duration = Duration::from_secs(30);

/// The bodies of `page`'s open chat, in order, and checks their seqs are 1, 2, 3, ...
fn bodies(chrome: &mut Chromium, page: &Page) -> Vec<String> {
    let messages = chrome.eval(page, "window.parley.messages()");
    let list = messages.as_array().expect("messages() gives an array");
    for (i, m) in list.iter().enumerate() {
        assert_eq!(
            m["seq"].as_u64(),
            Some(i as u64 + 1),
            "seqs in order without gaps or repeats: {messages}"
        );
    }
    list.iter()
        .map(|m| {
            format!(
                "{}: {}",
                m["from"].as_str().unwrap_or("?"),
                m["body"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// Waits until `page` shows exactly `expected`.
fn wait_for(chrome: &mut Chromium, page: &Page, expected: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = bodies(chrome, page);
        if got == expected {
            return;
        }
        assert!(
            got.len() <= expected.len() && got[..] == expected[..got.len()],
            "the page shows more or other than expected:\n  got {got:?}\n  expected {expected:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the page did not show {expected:?} within {WAIT:?}; it shows {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Logs `page` in as `user` on `device` and opens the chat with `peer`.
fn login(chrome: &mut Chromium, page: &Page, user: &str, device: &str, peer: &str) {
    chrome.wait_until(
        page,
        "typeof window.parley === 'object'",
        WAIT,
        "document.readyState",
    );
    chrome.eval(
        page,
        &format!("window.parley.login({user:?}, {device:?}).then(() => true)"),
    );
    chrome.eval(page, &format!("window.parley.pick({peer:?}); true"));
}

#[test]
fn two_pages_chat_survive_a_restart_and_a_fresh_page_sees_the_history() {
    let started = Instant::now();
    let mut broker = Broker::start(&["admin.web=true", "admin.listen=127.0.0.1:0"]);
    let mut chrome = match Chromium::start() {
        Ok(c) => c,
        Err(e) => panic!("Chromium cannot run here: {e}"),
    };
    let url = format!("http://{}/chat/", broker.admin_addr());
    let alice = chrome.open(&url);
    let bob = chrome.open(&url);
    login(&mut chrome, &alice, "alice", "web", "bob");
    login(&mut chrome, &bob, "bob", "web", "alice");

    chrome.eval(&alice, "window.parley.send('hello bob')");
    wait_for(&mut chrome, &bob, &["alice: hello bob"]);
    chrome.eval(&bob, "window.parley.send('hi alice')");
    let both = ["alice: hello bob", "bob: hi alice"];
    wait_for(&mut chrome, &alice, &both);
    wait_for(&mut chrome, &bob, &both);

    // The broker goes away; a line typed meanwhile waits in alice's outbox.
    broker.kill9();
    chrome.wait_until(
        &alice,
        "window.parley.state() !== 'ready'",
        WAIT,
        "window.parley.state()",
    );
    let queued = chrome.eval(&alice, "window.parley.send('typed while down')");
    assert!(queued.is_string(), "a client message id: {queued}");
    assert_eq!(
        chrome.eval(&alice, "window.parley.unacked().length"),
        Value::from(1)
    );
    broker.restart_on_same_ports();
    let down = Instant::now();
    for page in [&alice, &bob] {
        chrome.wait_until(
            page,
            "window.parley.state() === 'ready'",
            WAIT,
            "window.parley.state()",
        );
    }
    eprintln!(
        "both pages reconnected {:?} after the restart",
        down.elapsed()
    );
    let after_restart = [
        "alice: hello bob",
        "bob: hi alice",
        "alice: typed while down",
    ];
    wait_for(&mut chrome, &bob, &after_restart);
    wait_for(&mut chrome, &alice, &after_restart);
    chrome.eval(&bob, "window.parley.send('after the restart')");
    chrome.eval(&alice, "window.parley.send('me too')");
    let all = [
        "alice: hello bob",
        "bob: hi alice",
        "alice: typed while down",
        "bob: after the restart",
        "alice: me too",
    ];
    // The two last sends race: each page shows them in the broker's (seq) order.
    for page in [&alice, &bob] {
        let deadline = Instant::now() + WAIT;
        while bodies(&mut chrome, page).len() < all.len() {
            assert!(Instant::now() < deadline, "{:?}", bodies(&mut chrome, page));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let seen_by_alice = bodies(&mut chrome, &alice);
    assert_eq!(seen_by_alice, bodies(&mut chrome, &bob));
    let mut sorted = seen_by_alice.clone();
    sorted.sort();
    let mut expected: Vec<String> = all.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(sorted, expected, "every message exactly once");
    assert_eq!(
        chrome.eval(&alice, "window.parley.unacked().length"),
        Value::from(0)
    );

    // A fresh page (bob on another device, served by the restarted broker) sees the history.
    let url = format!("http://{}/chat/", broker.admin_addr());
    let fresh = chrome.open(&url);
    login(&mut chrome, &fresh, "bob", "laptop", "alice");
    let wanted: Vec<&str> = seen_by_alice.iter().map(String::as_str).collect();
    wait_for(&mut chrome, &fresh, &wanted);
    // Nothing arrives twice later on (late sync pages, retransmits).
    std::thread::sleep(Duration::from_millis(700));
    for page in [&alice, &bob, &fresh] {
        assert_eq!(bodies(&mut chrome, page), seen_by_alice);
    }
    drop(chrome);
    eprintln!("tests/browser.rs took {:?}", started.elapsed());
}

#[test]
fn the_page_and_dev_tokens_are_served_only_with_admin_web_and_the_tokens_log_in() {
    // Off by default: the routes do not exist (and without an admin token, everything but the
    // probes is refused).
    let off = Broker::start(&["admin.listen=127.0.0.1:0"]);
    for path in ["/chat/", "/chat/parley.js", "/dev/token?user=mallory"] {
        let a = http::get(off.admin_addr(), path, None);
        assert_eq!(a.status, 401, "{path}: {a:?}");
        assert!(!a.body.contains("token\":"), "{path}: {a:?}");
    }
    drop(off);

    let broker = Broker::start(&["admin.web=true", "admin.listen=127.0.0.1:0"]);
    assert!(
        broker.output().contains("admin.web is on: DEV ONLY"),
        "a warning at start: {}",
        broker.output()
    );
    let admin = broker.admin_addr();
    let page = http::get(admin, "/chat/", None);
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    let js = http::get(admin, "/chat/parley.js", None);
    assert_eq!(js.status, 200);
    assert_eq!(
        js.header("Content-Type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(js.body.contains("export class Client"));
    let config = http::get(admin, "/chat/config.json", None);
    assert_eq!(config.header("Content-Type"), Some("application/json"));
    assert_eq!(
        config.json()["ws"],
        Value::from(format!("ws://{}", broker.ws_addr()))
    );
    for path in [
        "/chat/../secret",
        "/chat/%2e%2e/secret",
        "/chat/index.htm",
        "/dev/tokens",
    ] {
        let a = http::get(admin, path, None);
        assert_eq!(a.status, 401, "{path}: not a route: {a:?}");
    }
    let minted = http::get(admin, "/dev/token?user=carol&device=tab", None);
    assert_eq!(minted.status, 200, "{minted:?}");
    let token = minted.json()["token"].as_str().expect("a token").to_owned();
    let mut client = broker.ws();
    let result = client.try_login(&token).expect("the dev token logs in");
    assert_eq!(
        (result.user.as_str(), result.device.as_str()),
        ("carol", "tab")
    );
    assert_eq!(
        http::get(admin, "/dev/token?device=tab", None).status,
        400,
        "a user is required"
    );
}

/// The JavaScript client's inbox and outbox, fed frames directly (no broker connection): it
/// shows each message once and in order, acks cumulatively, resends the outbox with the same
/// id at login before syncing, and a sync page settles a gap.
const CLIENT_SCENARIO: &str = r#"(async () => {
  const m = await import('/chat/parley.js');
  const out = [];
  const c = new m.Client({ url: 'ws://127.0.0.1:9', token: 't', onEvent: (e) => out.push(e) });
  c.stop();
  const sent = [];
  c.transmit = (id, body) => sent.push(Object.assign(id ? { requestId: id } : {}, body));
  const conv = { type: 'DIRECT', id: 'bob' };
  const msg = (seq, text) =>
    ({ conversation: conv, seq: String(seq), fromUser: 'bob', body: m.textToBase64(text) });
  const id = c.sendText('bob', 'queued é');
  c.state = 'logging-in';
  c.requests.set('L', 'login');
  c.handleFrame({ requestId: 'L', loginResult: { user: 'alice', device: 'web' } });
  const afterLogin = sent.map((f) => Object.keys(f).filter((k) => k !== 'requestId')[0]);
  const resent = sent[0].send.clientMsgId === id && sent[0].requestId === id;
  c.handleFrame({ requestId: c.sync, syncPage: { done: true } });
  for (const batch of [[msg(2, 'two')], [msg(1, 'one'), msg(1, 'one')], [msg(2, 'two')]]) {
    c.handleFrame({ deliver: { messages: batch } });
    c.flushAcks();
  }
  c.handleFrame({ sendAck: { clientMsgId: id, seq: '3', conversation: conv } });
  c.handleFrame({ deliver: { messages: [msg(5, 'five')] } });
  c.flushAcks();
  c.startSync();
  c.handleFrame({ requestId: c.sync, syncPage: { messages: [msg(5, 'five'), msg(6, 'six')], done: true } });
  c.handleFrame({ deliver: { messages: [msg(8, 'eight')] } });
  c.flushAcks();
  c.startSync();
  c.handleFrame({ requestId: c.sync, syncPage: { done: true } });
  return {
    afterLogin,
    resent,
    shown: out.filter((e) => e.type === 'message').map((e) => e.seq + ':' + e.from + ':' + e.body),
    acks: sent.filter((f) => f.deliverAck).map((f) => f.deliverAck.acks.map((a) => a.seq).join(',')),
    synced: out.filter((e) => e.type === 'synced').length,
    unacked: c.unacked().length,
  };
})()"#;

#[test]
fn the_javascript_client_dedups_orders_acks_and_resends_with_the_same_id() {
    let broker = Broker::start(&["admin.web=true", "admin.listen=127.0.0.1:0"]);
    let mut chrome = match Chromium::start() {
        Ok(c) => c,
        Err(e) => panic!("Chromium cannot run here: {e}"),
    };
    let page = chrome.open(&format!("http://{}/chat/", broker.admin_addr()));
    chrome.wait_until(
        &page,
        "typeof window.parley === 'object'",
        WAIT,
        "document.readyState",
    );
    let r = chrome.eval(&page, CLIENT_SCENARIO);
    assert_eq!(
        r["afterLogin"],
        serde_json::json!(["send", "syncRequest"]),
        "{r}"
    );
    assert_eq!(r["resent"], Value::Bool(true), "{r}");
    assert_eq!(
        r["shown"],
        serde_json::json!([
            "1:bob:one",
            "2:bob:two",
            "3:alice:queued é",
            "5:bob:five",
            "6:bob:six",
            "8:bob:eight"
        ]),
        "{r}"
    );
    // Nothing settled after the first batch (seq 2 is above a gap); then cumulative cursors; a
    // delivery above a gap acks only what is settled; a finished sync skips the gaps left.
    assert_eq!(r["acks"], serde_json::json!(["2", "2", "3", "6"]), "{r}");
    assert_eq!(r["synced"], Value::from(3), "{r}");
    assert_eq!(r["unacked"], Value::from(0), "{r}");
}
