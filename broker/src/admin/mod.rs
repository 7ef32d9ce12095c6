//! The admin HTTP listener (`[admin]` settings): `/healthz`, `/readyz`, `/metrics`, and the JSON
//! API under `/v1/` ([`api`]).
//!
//! It runs on its own threads, never on a shard's: one thread accepts, and each admitted
//! connection is served by a short-lived thread of its own, at most `admin.max_connections` at
//! once (one more is answered 503 by the accepting thread and closed). The probes and `/metrics`
//! only read what the shards already publish: their [`ShardStats`] snapshots (counters and
//! latency histograms, refreshed about every 100 ms) and the node's shutdown flag. The JSON API
//! asks the shards through the node's [`Control`](crate::node::control::Control), blocking the
//! connection's thread (never a shard's) until they answer, within the control's timeouts.
//!
//! Every request is bounded ([`http`]): its head (request line and headers) may be at most
//! `admin.max_request_bytes` (431 past it); a body is read only by an endpoint that takes one,
//! after the token is checked, and only with a `Content-Length` (411 without one; chunked bodies
//! are not read) of at most `admin.max_body_bytes` (413 past it); the whole request must arrive
//! within `admin.request_timeout_ms` (408 past it). One request per connection
//! (`Connection: close`). The head is parsed by `httparse`; the HTTP server crates we looked at
//! (`tiny_http` 0.12) bound neither the head's size, nor the time to send it, nor their threads.
//!
//! Authorization: `/healthz` and `/readyz` answer anyone (load balancers and orchestrators
//! probe them); everything else, `/metrics` and the whole JSON API, needs
//! `Authorization: Bearer <admin.token>`. With no `admin.token` configured, everything else
//! answers 401 saying to set one: the JSON API is off.
//!
//! DEV ONLY, with `admin.web = true` ([`web`]): the browser chat page under `/chat/` and a token
//! minting endpoint `/dev/token` answer anyone, without the bearer token.

mod api;
mod http;
mod metrics;
mod web;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http::{Head, Request, Response};

use crate::config::{Config, Secret};
use crate::core::ShardStats;
use crate::webhook::WebhookStats;

/// What the admin threads read: what the shards publish, and whether the node is stopping.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Each shard's counters and histograms, as the shards last published them.
    pub(crate) stats: Arc<Mutex<Vec<ShardStats>>>,
    /// Set once the node was asked to shut down.
    pub(crate) stopping: Arc<AtomicBool>,
    /// The node's shards, for the JSON endpoints.
    pub(crate) control: crate::node::control::Control,
    /// The node's WebSocket listener, which the browser page connects to (`admin.web`).
    pub(crate) ws: Option<SocketAddr>,
    /// Signs the dev tokens of `/dev/token` (`admin.web`): the node's HS256 secret, when the
    /// node verifies tokens with one (not with an application's own verifier).
    pub(crate) minter: Option<crate::auth::Hs256>,
    /// The cluster bridge's status (`cluster.redis` set): `parley_cluster_*` and
    /// `GET /v1/cluster`.
    pub(crate) cluster: Option<Arc<crate::cluster::Status>>,
}

#[cfg(test)]
impl Sources {
    /// Sources of a node without shards (every question to one fails as ShuttingDown), for
    /// tests of the listener alone.
    pub(crate) fn detached(ws: Option<SocketAddr>, minter: Option<crate::auth::Hs256>) -> Self {
        let stats = Arc::new(Mutex::new(vec![ShardStats::default()]));
        let stopping = Arc::new(AtomicBool::new(false));
        Sources {
            control: crate::node::control::Control::new(
                Vec::new(),
                Arc::clone(&stopping),
                Arc::clone(&stats),
            ),
            stats,
            stopping,
            ws,
            minter,
            cluster: None,
        }
    }
}

/// The settings and sources every connection's thread shares.
#[derive(Debug)]
struct Shared {
    /// The bearer token, if configured.
    token: Option<Secret>,
    /// `admin.max_request_bytes`.
    max_request_bytes: usize,
    /// `admin.max_body_bytes`.
    max_body_bytes: usize,
    /// `presence.max_users_per_request`: most users `GET /v1/presence` may name.
    max_presence_users: usize,
    /// `admin.request_timeout_ms`.
    timeout: Duration,
    /// `admin.max_connections`.
    max_connections: usize,
    /// `admin.web`: the dev-only browser page and token endpoint are served.
    web: bool,
    /// Connections being served now.
    active: AtomicUsize,
    /// What the endpoints report.
    sources: Sources,
    /// The webhook counters, when webhooks are on.
    webhooks: Option<WebhookStats>,
}

/// The running admin listener.
#[derive(Debug)]
pub(crate) struct AdminServer {
    /// Where it listens (port 0 resolved).
    addr: SocketAddr,
    /// Tells the accepting thread to stop.
    stop: Arc<AtomicBool>,
    /// The accepting thread.
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds the admin listener on `addr` (before the node serves, so a taken port stops the
    /// start).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        TcpListener::bind(addr)
    }

    /// Starts serving `listener` with the bounds of `config` (its `[admin]` section, and the
    /// presence limit), reporting `sources`, and the webhook counters (`parley_webhook_*`) when
    /// `webhooks` is given.
    pub(crate) fn start_with_webhooks(
        listener: TcpListener,
        config: &Config,
        sources: Sources,
        webhooks: Option<WebhookStats>,
    ) -> io::Result<AdminServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let admin = &config.admin;
        let shared = Arc::new(Shared {
            token: admin.token.clone(),
            max_request_bytes: admin.max_request_bytes,
            max_body_bytes: admin.max_body_bytes,
            max_presence_users: usize::try_from(config.presence.max_users_per_request)
                .unwrap_or(usize::MAX),
            timeout: Duration::from_millis(admin.request_timeout_ms),
            max_connections: admin.max_connections,
            web: admin.web,
            active: AtomicUsize::new(0),
            sources,
            webhooks,
        });
        let thread = std::thread::Builder::new()
            .name("parley-admin".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || accept_loop(&listener, &shared, &stop)
            })?;
        Ok(AdminServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accepting thread (connections being served finish on
    /// their own, within the request timeout).
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`, handing each connection to a thread of its own within the bound.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                eprintln!("parley: admin: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.max_connections {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            // A fresh socket's send buffer takes this small answer without blocking.
            let _ = stream.set_nonblocking(true);
            let _ = http::write_response(
                &stream,
                &Response::text(503, "too many admin connections; retry\n"),
            );
            continue;
        }
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("parley-admin-conn".into())
            .spawn(move || {
                serve(&stream, &conn_shared);
                conn_shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            eprintln!("parley: admin: cannot start a connection thread: {e}");
        }
    }
}

/// Serves one request on `stream`, within the bounds.
fn serve(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(shared.timeout));
    let _ = stream.set_write_timeout(Some(shared.timeout));
    let limits = http::Limits {
        max_head_bytes: shared.max_request_bytes,
        timeout: shared.timeout,
    };
    match http::read_request(stream, limits) {
        Ok(mut request) => {
            let response = route(&mut request, shared);
            let _ = http::write_response(stream, &response);
            if request.body_unread() {
                http::linger(stream, shared.timeout);
            }
        }
        Err(e) => {
            let _ = http::write_response(stream, &Response::text(e.status, e.message + "\n"));
            if e.status != 408 {
                // The client may be mid-request: let it finish, so that it reads this answer.
                http::linger(stream, shared.timeout);
            }
        }
    }
}

/// Answers a request (reading its body only if the endpoint takes one).
fn route(request: &mut Request<'_>, shared: &Shared) -> Response {
    let path = request.head.path.clone();
    let api = path == "/v1" || path.starts_with("/v1/");
    if !api {
        let get_only = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
        if get_only && request.head.method != "GET" {
            return Response::text(405, "only GET is served here\n").with_header("Allow", "GET");
        }
        match path.as_str() {
            "/healthz" => return Response::text(200, "ok\n"),
            "/readyz" => {
                return if shared.sources.stopping.load(Ordering::SeqCst) {
                    Response::text(503, "shutting down\n")
                } else {
                    Response::text(200, "ready\n")
                };
            }
            _ => {}
        }
        if shared.web
            && let Some(response) = web::route(&request.head, &shared.sources)
        {
            return response;
        }
    }
    if let Err(refused) = authorize(&request.head, shared.token.as_ref()) {
        let response = if api {
            api::ApiError::http(401, refused).response()
        } else {
            Response::text(401, refused + "\n")
        };
        return response.with_header("WWW-Authenticate", "Bearer realm=\"parley-admin\"");
    }
    if api {
        return api::handle(request, shared);
    }
    match path.as_str() {
        "/metrics" => {
            let shards = shared
                .sources
                .stats
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            let webhooks = shared.webhooks.as_ref().map(WebhookStats::snapshot);
            let cluster = shared.sources.cluster.as_ref().map(|c| c.snapshot());
            match metrics::encode(&shards, webhooks.as_ref(), cluster.as_ref()) {
                Ok(body) => Response {
                    status: 200,
                    content_type: metrics::CONTENT_TYPE,
                    headers: Vec::new(),
                    body,
                },
                Err(_) => Response::text(500, "cannot encode the metrics\n"),
            }
        }
        _ => Response::text(
            404,
            "not found: try /healthz, /readyz, /metrics or the JSON API under /v1/\n",
        ),
    }
}
/// `Ok` if `head` carries the bearer `token`; else why not.
fn authorize(head: &Head, token: Option<&Secret>) -> Result<(), String> {
    let Some(token) = token else {
        return Err(
            "the admin API has no token: set admin.token (e.g. PARLEY_ADMIN__TOKEN) and send \
             `Authorization: Bearer <token>`"
                .to_owned(),
        );
    };
    let presented = head
        .header("authorization")
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err("missing or wrong bearer token".to_owned()),
    }
}

/// Compares `a` and `b` in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::time::Instant;

    use super::*;

    /// The token of the tests that configure one.
    const TOKEN: &str = "sesame-sesame-sesame";

    fn shared(token: Option<&str>) -> Shared {
        Shared {
            token: token.map(Secret::new),
            max_request_bytes: 512,
            max_body_bytes: 300,
            max_presence_users: 2,
            timeout: Duration::from_millis(200),
            max_connections: 2,
            web: false,
            active: AtomicUsize::new(0),
            sources: Sources::detached(None, None),
            webhooks: None,
        }
    }

    fn answer(raw: &str, shared: &Shared) -> Response {
        let mut request = Request::from_bytes(raw.as_bytes()).expect("a complete request");
        route(&mut request, shared)
    }

    /// `method path` with the token and `body` (with its Content-Length unless `headers` has one).
    fn call(method: &str, path: &str, headers: &str, body: &str, shared: &Shared) -> Response {
        let length = if headers.to_ascii_lowercase().contains("content-length")
            || headers.to_ascii_lowercase().contains("transfer-encoding")
            || method == "GET"
        {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        answer(
            &format!(
                "{method} {path} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n{headers}{length}\r\n{body}"
            ),
            shared,
        )
    }

    /// The `error.code` of a JSON error answer.
    fn error_code(r: &Response) -> String {
        assert_eq!(r.content_type, http::JSON, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        v["error"]["code"].as_str().expect("a code").to_owned()
    }

    /// Runs `serve` on one connection whose client writes each of `parts` in turn (then closes
    /// its writing side) and returns what the client read.
    fn over_a_socket(parts: Vec<Vec<u8>>, shared: &Shared) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut out = Vec::new();
            for part in parts {
                let _ = c.write_all(&part);
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = c.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        });
        let (stream, _) = listener.accept().expect("accept");
        serve(&stream, shared);
        drop(stream);
        client.join().expect("client")
    }

    #[test]
    fn probes_answer_without_a_token_and_readyz_fails_while_stopping() {
        let s = shared(None);
        assert_eq!(answer("GET /healthz HTTP/1.1\r\n\r\n", &s).status, 200);
        assert_eq!(answer("GET /readyz HTTP/1.1\r\n\r\n", &s).status, 200);
        s.sources.stopping.store(true, Ordering::SeqCst);
        assert_eq!(answer("GET /readyz HTTP/1.1\r\n\r\n", &s).status, 503);
    }

    #[test]
    fn metrics_need_the_configured_bearer_token() {
        let none = answer("GET /metrics HTTP/1.1\r\n\r\n", &shared(None));
        assert_eq!(none.status, 401);
        assert!(none.body.contains("admin.token"), "{}", none.body);
        let s = shared(Some(TOKEN));
        assert_eq!(answer("GET /metrics HTTP/1.1\r\n\r\n", &s).status, 401);
        let wrong = "GET /metrics HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n";
        assert_eq!(answer(wrong, &s).status, 401);
        let right = format!("GET /metrics HTTP/1.1\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
        let ok = answer(&right, &s);
        assert_eq!(ok.status, 200);
        assert!(ok.body.contains("parley_node_messages_stored_total 0"));
        let post = answer("POST /healthz HTTP/1.1\r\n\r\n", &s);
        assert_eq!((post.status, post.header("Allow")), (405, Some("GET")));
    }

    #[test]
    fn the_json_api_is_off_without_a_token_and_refuses_a_wrong_one_in_json() {
        let off = answer("GET /v1/online HTTP/1.1\r\n\r\n", &shared(None));
        assert_eq!(
            (off.status, error_code(&off).as_str()),
            (401, "UNAUTHORIZED")
        );
        assert!(off.body.contains("admin.token"), "{}", off.body);
        let s = shared(Some(TOKEN));
        let wrong = answer(
            "GET /v1/online HTTP/1.1\r\nAuthorization: Bearer sesame-sesame-sesamE\r\n\r\n",
            &s,
        );
        assert_eq!(wrong.status, 401);
        assert!(wrong.header("WWW-Authenticate").is_some());
        let unknown = answer("GET /v1/nothing HTTP/1.1\r\n\r\n", &s);
        assert_eq!(
            unknown.status, 401,
            "paths are not told apart before the token"
        );
    }

    #[test]
    fn api_paths_are_routed_by_path_then_method() {
        let s = shared(Some(TOKEN));
        let online = call("GET", "/v1/online", "", "", &s);
        assert_eq!(online.status, 200, "{}", online.body);
        assert_eq!(online.body, r#"{"users":[],"next":null}"#);
        let unknown = call("GET", "/v1/nothing", "", "", &s);
        assert_eq!(
            (unknown.status, error_code(&unknown).as_str()),
            (404, "NOT_FOUND")
        );
        let wrong = call("POST", "/v1/online", "", "{}", &s);
        assert_eq!((wrong.status, wrong.header("Allow")), (405, Some("GET")));
        assert_eq!(error_code(&wrong), "METHOD_NOT_ALLOWED");
        let text = call("GET", "/nothing", "", "", &s);
        assert_eq!(
            (text.status, text.content_type),
            (404, "text/plain; charset=utf-8")
        );
    }

    #[test]
    fn bad_query_parameters_are_400() {
        let s = shared(Some(TOKEN));
        for path in [
            "/v1/online?limit=0",
            "/v1/online?limt=5",
            "/v1/online?after=a&after=b",
            "/v1/online?after=%zz",
            "/v1/presence",
            "/v1/presence?users=a,b,c",
            "/v1/conversations?limit=5",
            "/v1/conversation?type=room&id=x",
            "/v1/messages?x=1",
        ] {
            let method = if path.starts_with("/v1/messages") {
                "POST"
            } else {
                "GET"
            };
            let r = call(method, path, "", "", &s);
            assert_eq!(
                (r.status, error_code(&r).as_str()),
                (400, "BAD_REQUEST"),
                "{path}"
            );
        }
    }

    #[test]
    fn a_post_body_needs_a_content_length_within_max_body_bytes_and_valid_json() {
        let s = shared(Some(TOKEN));
        let no_length = answer(
            &format!("POST /v1/kick HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"),
            &s,
        );
        assert_eq!(
            (no_length.status, error_code(&no_length).as_str()),
            (411, "LENGTH_REQUIRED")
        );
        let chunked = call("POST", "/v1/kick", "Transfer-Encoding: chunked\r\n", "", &s);
        assert_eq!(chunked.status, 411);
        let big = call("POST", "/v1/kick", "Content-Length: 301\r\n", "", &s);
        assert_eq!(
            (big.status, error_code(&big).as_str()),
            (413, "PAYLOAD_TOO_LARGE")
        );
        assert!(big.body.contains("admin.max_body_bytes"), "{}", big.body);
        let not_json = call("POST", "/v1/kick", "", "{\"user\":", &s);
        assert_eq!(
            (not_json.status, error_code(&not_json).as_str()),
            (400, "BAD_REQUEST")
        );
        let wrong_shape = call("POST", "/v1/kick", "", r#"{"user":"bob","why":"x"}"#, &s);
        assert_eq!(wrong_shape.status, 400, "{}", wrong_shape.body);
        let long_reason = format!(r#"{{"user":"bob","reason":"{}"}}"#, "x".repeat(257));
        assert!(long_reason.len() <= 300);
        assert_eq!(call("POST", "/v1/kick", "", &long_reason, &s).status, 400);
        let bad_body = call(
            "POST",
            "/v1/messages",
            "",
            r#"{"from":"a","to":{"type":"DIRECT","id":"b"}}"#,
            &s,
        );
        assert_eq!(bad_body.status, 400, "neither body nor body_base64");
    }

    #[test]
    fn without_the_token_a_body_is_not_considered() {
        let r = answer(
            "POST /v1/kick HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            &shared(Some(TOKEN)),
        );
        assert_eq!(r.status, 401);
    }

    #[test]
    fn a_stopping_node_answers_503_with_retry_after() {
        let s = shared(Some(TOKEN));
        s.sources.stopping.store(true, Ordering::SeqCst);
        let r = call(
            "POST",
            "/v1/kick",
            "",
            r#"{"user":"bob","device":null}"#,
            &s,
        );
        assert_eq!((r.status, error_code(&r).as_str()), (503, "SHUTTING_DOWN"));
        assert_eq!(r.header("Retry-After"), Some("1"));
        let r = call("GET", "/v1/conversation?type=group&id=team", "", "", &s);
        assert_eq!(r.status, 503);
    }

    #[test]
    fn a_body_sent_after_the_head_is_read_from_the_socket() {
        let s = shared(Some(TOKEN));
        s.sources.stopping.store(true, Ordering::SeqCst);
        let body = r#"{"user":"bob"}"#;
        let head = format!(
            "POST /v1/kick HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\n\r\n",
            body.len()
        );
        let out = over_a_socket(vec![head.into_bytes(), body.as_bytes().to_vec()], &s);
        assert!(
            out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503"),
            "{out}"
        );
        assert!(
            out.contains("SHUTTING_DOWN"),
            "the body was read and parsed: {out}"
        );
    }

    #[test]
    fn an_oversized_body_is_answered_413_and_the_client_reads_it() {
        let s = shared(Some(TOKEN));
        let body = vec![b'x'; 64 * 1024];
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let out = over_a_socket(vec![head.into_bytes(), body], &s);
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    }

    #[test]
    fn a_request_head_past_max_request_bytes_is_refused_with_431() {
        let s = shared(None);
        let head = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n", "a".repeat(600));
        let out = over_a_socket(vec![head.into_bytes()], &s);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[test]
    fn a_request_not_sent_in_time_is_answered_408() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = shared(None);
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(b"GET /heal");
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        });
        let (stream, _) = listener.accept().expect("accept");
        let started = Instant::now();
        serve(&stream, &s);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(stream);
        let out = client.join().expect("client");
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    #[test]
    fn a_body_not_sent_in_time_is_answered_408() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = shared(Some(TOKEN));
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(
                format!(
                    "POST /v1/kick HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                     Content-Length: 50\r\n\r\n{{\"user\""
                )
                .as_bytes(),
            );
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        });
        let (stream, _) = listener.accept().expect("accept");
        let started = Instant::now();
        serve(&stream, &s);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(stream);
        let out = client.join().expect("client");
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }
}
