//! The real sender against a real HTTP server on 127.0.0.1 (a small `httparse` server in this
//! file): signatures, retries with the same key, permanent failures, a full queue, shutdown.
//! The events come from calling the [`Hooks`] observers directly, as a shard would.

use std::collections::VecDeque;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::stats::WebhookCounts;
use super::*;
use crate::config::Secret;
use crate::hooks::{ConversationKind, ConversationRef};

/// The secret every test signs with.
const SECRET: &str = "webhook-test-secret-0123456789";
/// How long a test waits for something that should happen in milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);

/// A request the server received.
#[derive(Debug, Clone)]
struct Request {
    /// Method and path.
    line: String,
    /// Headers, names lower-cased.
    headers: Vec<(String, String)>,
    /// The body.
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    fn event_ids(&self) -> Vec<String> {
        self.json()["events"]
            .as_array()
            .expect("an events array")
            .iter()
            .map(|e| e["id"].as_str().expect("a string id").to_owned())
            .collect()
    }
}

/// How the server answers one request.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
    /// Wait for [`Server::release`] before answering.
    hold: bool,
}

fn status(status: u16) -> Answer {
    Answer {
        status,
        headers: Vec::new(),
        body: "",
        hold: false,
    }
}

/// What the server's thread and the test share.
#[derive(Debug, Default)]
struct State {
    requests: Vec<Request>,
    /// Answers for the next requests, in order; 200 once empty.
    script: VecDeque<Answer>,
    released: bool,
}

/// An HTTP/1.1 server on 127.0.0.1:0 that records what it gets and answers from a script, one
/// connection at a time, each closed after its answer.
struct Server {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, std::sync::Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(script: impl IntoIterator<Item = Answer>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new((
            Mutex::new(State {
                script: script.into_iter().collect(),
                ..State::default()
            }),
            std::sync::Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(s) = stream {
                        serve(s, &state);
                    }
                }
            }
        });
        Server {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/parley", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.state.0.lock().expect("lock").requests.clone()
    }

    /// Waits until the server has received `n` requests.
    fn wait_for_requests(&self, n: usize) -> Vec<Request> {
        let (lock, cv) = &*self.state;
        let end = Instant::now() + PATIENCE;
        let mut s = lock.lock().expect("lock");
        while s.requests.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} requests, expected {n}",
                s.requests.len()
            );
            s = cv.wait_timeout(s, left).expect("lock").0;
        }
        s.requests.clone()
    }

    /// Lets held answers go.
    fn release(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().expect("lock").released = true;
        cv.notify_all();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request from `stream`, records it, answers it as scripted.
fn serve(mut stream: TcpStream, state: &(Mutex<State>, std::sync::Condvar)) {
    let _ = stream.set_read_timeout(Some(PATIENCE));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, request) = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
            let request = Request {
                line: format!("{} {}", req.method.unwrap_or(""), req.path.unwrap_or("")),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                body: Vec::new(),
            };
            break (len, request);
        }
    };
    let mut request = request;
    let length: usize = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_len + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    request.body = buf[head_len..head_len + length].to_vec();
    let (lock, cv) = state;
    let answer = {
        let mut s = lock.lock().expect("lock");
        s.requests.push(request);
        cv.notify_all();
        let answer = s.script.pop_front().unwrap_or_else(|| status(200));
        if answer.hold {
            let end = Instant::now() + PATIENCE;
            while !s.released && Instant::now() < end {
                s = cv
                    .wait_timeout(s, Duration::from_millis(50))
                    .expect("lock")
                    .0;
            }
        }
        answer
    };
    let mut out = format!(
        "HTTP/1.1 {} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.status,
        answer.body.len()
    );
    for (name, value) in &answer.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(answer.body);
    let _ = stream.write_all(out.as_bytes());
}

/// Settings for a test: every kind, quick retries.
fn settings(url: &str) -> WebhookConfig {
    WebhookConfig {
        url: Some(url.to_owned()),
        secret: Some(Secret::new(SECRET)),
        events: WebhookEvent::ALL.to_vec(),
        connect_timeout_ms: 1000,
        timeout_ms: 2000,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        ..WebhookConfig::default()
    }
}

fn start(config: &WebhookConfig) -> (Arc<Webhooks>, WebhookStats) {
    Webhooks::start(config, "node-7")
        .expect("starts")
        .expect("a url is set")
}

/// Waits until `done` holds for the counters.
fn wait_counts(stats: &WebhookStats, done: impl Fn(&WebhookCounts) -> bool) -> WebhookCounts {
    let end = Instant::now() + PATIENCE;
    loop {
        let c = stats.snapshot();
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < end, "gave up waiting; counters: {c:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn login(hooks: &Webhooks, user: &str) {
    hooks.connected(&DeviceEvent {
        user: user.into(),
        device: "phone".into(),
    });
}

/// The HMAC the receiver computes, with the `hmac` crate directly.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[test]
fn no_url_means_no_webhooks() {
    let none = Webhooks::start(&WebhookConfig::default(), "n").expect("valid");
    assert!(none.is_none());
    let mut bad = settings("http://127.0.0.1:1/");
    bad.secret = Some(Secret::new("short"));
    assert!(matches!(
        Webhooks::start(&bad, "n"),
        Err(Error::Config(m)) if m.contains("16 bytes")
    ));
}

#[test]
fn a_post_is_signed_json_carrying_the_events_with_their_ids() {
    let server = Server::start([]);
    let (hooks, stats) = start(&settings(&server.url()));
    login(&hooks, "alice");
    hooks.message_stored(&StoredMessage {
        conversation: ConversationRef {
            kind: ConversationKind::Direct,
            id: "alice:bob".into(),
            users: vec!["alice".into(), "bob".into()],
        },
        seq: 4,
        msg_id: 99,
        sender: "alice".into(),
        device: "phone".into(),
        time_ms: 1_767_225_600_123,
        body: Bytes::from_static(b"hello \xff"),
        system: false,
    });
    wait_counts(&stats, |c| c.delivered == 2);
    let requests = server.requests();
    let mut events = Vec::new();
    for r in &requests {
        assert_eq!(r.line, "POST /hooks/parley");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("x-parley-signature"),
            Some(expected_signature(&r.body).as_str()),
            "the signature is the HMAC of the exact body"
        );
        assert_eq!(r.header("x-parley-attempt"), Some("1"));
        let ts: u64 = r
            .header("x-parley-timestamp")
            .and_then(|t| t.parse().ok())
            .expect("a timestamp in seconds");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(ts.abs_diff(now) < 60, "{ts} vs {now}");
        let ids = r.event_ids();
        let key = r.header("idempotency-key").expect("a key");
        if let [id] = ids.as_slice() {
            assert_eq!(key, id);
        } else {
            assert_eq!(key, sign::idempotency_key(ids.iter().map(String::as_str)));
        }
        events.extend(r.json()["events"].as_array().expect("events").clone());
    }
    assert_eq!(events.len(), 2, "{events:?}");
    let (login_event, stored) = (&events[0], &events[1]);
    assert_eq!(login_event["type"], "login");
    assert_eq!(login_event["data"]["user"], "alice");
    assert_eq!(login_event["data"]["device"], "phone");
    assert!(login_event["time_ms"].as_i64().is_some_and(|t| t > 0));
    assert_eq!(stored["type"], "message.stored");
    assert_eq!(stored["time_ms"], 1_767_225_600_123_i64);
    assert_eq!(stored["data"]["conversation"]["kind"], "direct");
    assert_eq!(
        stored["data"]["conversation"]["users"],
        serde_json::json!(["alice", "bob"])
    );
    assert_eq!(stored["data"]["seq"], 4);
    let body = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["body_base64"].as_str().expect("base64"))
        .expect("valid base64");
    assert_eq!(body, b"hello \xff");
    let (a, b) = (
        login_event["id"].as_str().expect("id"),
        stored["id"].as_str().expect("id"),
    );
    assert!(
        a.starts_with("node-7-") && b.starts_with("node-7-"),
        "{a} {b}"
    );
    assert_ne!(a, b);
    hooks.shutdown(Instant::now() + Duration::from_secs(2));
    let c = stats.snapshot();
    assert_eq!((c.queued, c.delivered, c.failed, c.retried), (2, 2, 0, 0));
}

#[test]
fn answered_500_twice_then_200_the_same_batch_is_retried_and_delivered_once() {
    let server = Server::start([status(500), status(500), status(200)]);
    let (hooks, stats) = start(&settings(&server.url()));
    login(&hooks, "alice");
    let c = wait_counts(&stats, |c| c.delivered > 0 || c.failed > 0);
    let requests = server.wait_for_requests(3);
    assert_eq!(requests.len(), 3);
    let first = &requests[0];
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r.body, first.body, "attempt {i}: the same body");
        assert_eq!(r.event_ids(), first.event_ids());
        assert_eq!(r.header("idempotency-key"), first.header("idempotency-key"));
        assert_eq!(
            r.header("x-parley-signature"),
            Some(expected_signature(&r.body).as_str())
        );
        let attempt = (i + 1).to_string();
        assert_eq!(r.header("x-parley-attempt"), Some(attempt.as_str()));
    }
    assert_eq!(first.event_ids().len(), 1);
    assert_eq!(
        first.header("idempotency-key"),
        first.event_ids().first().map(String::as_str)
    );
    assert_eq!((c.delivered, c.retried, c.failed), (1, 2, 0));
    hooks.shutdown(Instant::now() + Duration::from_secs(2));
    assert_eq!(server.requests().len(), 3, "nothing more after the 200");
    assert_eq!(stats.snapshot().delivered, 1, "delivered exactly once");
}

#[test]
fn a_400_is_final_and_not_retried() {
    let server = Server::start([Answer {
        body: "unknown event type\r\n",
        ..status(400)
    }]);
    let (hooks, stats) = start(&settings(&server.url()));
    login(&hooks, "alice");
    let c = wait_counts(&stats, |c| c.failed == 1);
    // Longer than any retry would have waited (backoff_max_ms = 50).
    std::thread::sleep(Duration::from_millis(300));
    hooks.shutdown(Instant::now() + Duration::from_secs(2));
    assert_eq!(server.requests().len(), 1);
    assert_eq!((c.delivered, c.retried), (0, 0));
    assert_eq!(stats.snapshot().failed, 1);
}

#[test]
fn retries_stop_after_max_attempts_and_retry_after_is_cut_to_backoff_max() {
    let asks_an_hour = Answer {
        headers: vec![("Retry-After", "3600".into())],
        ..status(429)
    };
    let server = Server::start([asks_an_hour, status(503), status(502), status(200)]);
    let mut config = settings(&server.url());
    config.max_attempts = 3;
    let (hooks, stats) = start(&config);
    let began = Instant::now();
    login(&hooks, "alice");
    let c = wait_counts(&stats, |c| c.failed == 1);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "Retry-After: 3600 was cut to backoff_max_ms"
    );
    assert_eq!((c.delivered, c.retried), (0, 2));
    hooks.shutdown(Instant::now() + Duration::from_secs(2));
    assert_eq!(server.requests().len(), 3, "three attempts, no fourth");
}

#[test]
fn a_full_queue_drops_and_counts_at_once_and_shutdown_drains_the_rest_in_one_batch() {
    let server = Server::start([Answer {
        hold: true,
        ..status(200)
    }]);
    let mut config = settings(&server.url());
    config.queue_capacity = 4;
    let (hooks, stats) = start(&config);
    login(&hooks, "first");
    // The sender is now stuck in the first POST: the queue fills.
    server.wait_for_requests(1);
    let began = Instant::now();
    for i in 0..7 {
        login(&hooks, &format!("u{i}"));
    }
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "observers never wait: {:?}",
        began.elapsed()
    );
    let c = stats.snapshot();
    assert_eq!(
        (c.queued, c.dropped_queue_full, c.queue_len),
        (5, 3, 4),
        "{c:?}"
    );
    server.release();
    hooks.shutdown(Instant::now() + Duration::from_secs(5));
    let c = stats.snapshot();
    assert_eq!((c.delivered, c.dropped_shutdown, c.queue_len), (5, 0, 0));
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "the four queued went in one batch");
    let batch = &requests[1];
    let ids = batch.event_ids();
    assert_eq!(ids.len(), 4);
    let users: Vec<Value> = batch.json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["data"]["user"].clone())
        .collect();
    assert_eq!(users, ["u0", "u1", "u2", "u3"], "in the order observed");
    let key = batch.header("idempotency-key").expect("key");
    assert!(key.starts_with("batch-"), "{key}");
    assert_eq!(key, sign::idempotency_key(ids.iter().map(String::as_str)));
    // After shutdown, events are dropped and counted, not queued.
    login(&hooks, "late");
    let c = stats.snapshot();
    assert_eq!((c.queued, c.dropped_shutdown), (5, 1));
}

#[test]
fn shutdown_is_bounded_when_the_endpoint_is_down_and_counts_what_is_left() {
    // A port nobody listens on: every attempt is refused.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut config = settings(&format!("http://{addr}/"));
    config.max_attempts = 100;
    config.backoff_base_ms = 100;
    config.backoff_max_ms = 2000;
    let (hooks, stats) = start(&config);
    for i in 0..3 {
        login(&hooks, &format!("u{i}"));
    }
    wait_counts(&stats, |c| c.retried > 0);
    let began = Instant::now();
    hooks.shutdown(Instant::now() + Duration::from_millis(300));
    assert!(
        began.elapsed() < Duration::from_millis(300) + JOIN_GRACE,
        "{:?}",
        began.elapsed()
    );
    let c = stats.snapshot();
    assert_eq!((c.queued, c.delivered, c.failed), (3, 0, 0), "{c:?}");
    assert_eq!(c.dropped_shutdown, 3, "{c:?}");
    hooks.shutdown(Instant::now());
}

#[test]
fn only_the_configured_kinds_are_sent_and_offline_is_asked_for_only_if_configured() {
    let server = Server::start([]);
    let mut config = settings(&server.url());
    config.events = vec![WebhookEvent::Group, WebhookEvent::MessageOffline];
    let (hooks, stats) = start(&config);
    assert!(hooks.observes().offline);
    assert!(!hooks.observes().stored);
    assert_eq!(
        hooks.gates(),
        crate::hooks::Gates::default(),
        "gates nothing"
    );
    login(&hooks, "alice");
    hooks.disconnected(&DeviceEvent {
        user: "alice".into(),
        device: "phone".into(),
    });
    hooks.presence_changed(&PresenceChange {
        user: "alice".into(),
        online: true,
    });
    hooks.group_changed(&GroupChange {
        group: "g1".into(),
        seq: 2,
        actor: "alice".into(),
        what: "member_joined".into(),
        members: vec!["bob".into()],
    });
    hooks.stored_for_offline(&OfflineDelivery {
        conversation: ConversationRef {
            kind: ConversationKind::Group,
            id: "g1".into(),
            users: Vec::new(),
        },
        seq: 3,
        sender: "alice".into(),
        users: vec!["bob".into(), "carol".into()],
    });
    wait_counts(&stats, |c| c.delivered == 2);
    hooks.shutdown(Instant::now() + Duration::from_secs(2));
    let types: Vec<Value> = server
        .requests()
        .iter()
        .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(types, ["group", "message.offline"]);
    assert_eq!(stats.snapshot().queued, 2);

    let mut no_offline = settings(&server.url());
    no_offline.events = vec![WebhookEvent::Login];
    let (hooks, _) = start(&no_offline);
    assert!(!hooks.observes().offline);
    hooks.shutdown(Instant::now());
}
