//! The admin HTTP listener (`[admin]` settings): `/healthz`, `/readyz` and `/metrics`.
//!
//! It runs on its own threads, never on a shard's: one thread accepts, and each admitted
//! connection is served by a short-lived thread of its own, at most `admin.max_connections` at
//! once (one more is answered 503 by the accepting thread and closed). It only reads what the
//! shards already publish: their [`ShardStats`] snapshots (counters and latency histograms,
//! refreshed about every 100 ms) and the node's shutdown flag.
//!
//! Every request is bounded: its head (request line and headers) may be at most
//! `admin.max_request_bytes` (431 past it), it must arrive within `admin.request_timeout_ms`
//! (408 past it), and a request body is never read. One request per connection
//! (`Connection: close`). The request is parsed by `httparse`; the HTTP server crates we looked at
//! (`tiny_http` 0.12) bound neither the head's size, nor the time to send it, nor their threads.
//!
//! Authorization: `/healthz` and `/readyz` answer anyone (load balancers and orchestrators
//! probe them); everything else needs `Authorization: Bearer <admin.token>`. With no
//! `admin.token` configured, everything else answers 401 saying to set one.

mod metrics;

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Admin, Secret};
use crate::core::ShardStats;
use crate::webhook::WebhookStats;

/// Most headers a request may have (431 past it).
const MAX_HEADERS: usize = 32;

/// What the admin threads read: what the shards publish, and whether the node is stopping.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// Each shard's counters and histograms, as the shards last published them.
    pub(crate) stats: Arc<Mutex<Vec<ShardStats>>>,
    /// Set once the node was asked to shut down.
    pub(crate) stopping: Arc<AtomicBool>,
    /// The node's shards, for the JSON endpoints.
    #[allow(dead_code)] // read by the JSON endpoints (next step)
    pub(crate) control: crate::node::control::Control,
}

/// The settings and sources every connection's thread shares.
#[derive(Debug)]
struct Shared {
    /// The bearer token, if configured.
    token: Option<Secret>,
    /// `admin.max_request_bytes`.
    max_request_bytes: usize,
    /// `admin.request_timeout_ms`.
    timeout: Duration,
    /// `admin.max_connections`.
    max_connections: usize,
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

    /// Starts serving `listener` with `config`'s bounds, reporting `sources`, and the webhook
    /// counters (`parley_webhook_*`) when `webhooks` is given.
    pub(crate) fn start_with_webhooks(
        listener: TcpListener,
        config: &Admin,
        sources: Sources,
        webhooks: Option<WebhookStats>,
    ) -> io::Result<AdminServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            token: config.token.clone(),
            max_request_bytes: config.max_request_bytes,
            timeout: Duration::from_millis(config.request_timeout_ms),
            max_connections: config.max_connections,
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
            let _ = write_response(
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

/// An answer.
#[derive(Debug)]
struct Response {
    /// The status code.
    status: u16,
    /// `Content-Type`.
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    extra_headers: &'static str,
    /// The body.
    body: String,
}

impl Response {
    /// A plain-text answer.
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
            body: body.into(),
        }
    }
}

/// The reason phrase of the status codes used here.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes `response` and closes the writing side.
fn write_response(mut stream: &TcpStream, response: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n{}\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        response.extra_headers,
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Serves one request on `stream`, within the bounds.
fn serve(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(shared.timeout));
    let _ = stream.set_write_timeout(Some(shared.timeout));
    let response = read_and_answer(stream, shared);
    let _ = write_response(stream, &response);
}

/// Reads the request head (bounded in size and time) and answers it.
fn read_and_answer(mut stream: &TcpStream, shared: &Shared) -> Response {
    let deadline = Instant::now() + shared.timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return route(&request, shared),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Response::text(431, format!("at most {MAX_HEADERS} headers\n"));
            }
            Err(e) => return Response::text(400, format!("bad request: {e}\n")),
        }
        if buf.len() >= shared.max_request_bytes {
            return Response::text(
                431,
                format!(
                    "the request head exceeds admin.max_request_bytes ({})\n",
                    shared.max_request_bytes
                ),
            );
        }
        let now = Instant::now();
        if now >= deadline {
            return Response::text(
                408,
                "request not received within admin.request_timeout_ms\n",
            );
        }
        let _ = stream.set_read_timeout(Some(deadline - now));
        let room = (shared.max_request_bytes - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Response::text(400, "connection closed mid-request\n"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                return Response::text(
                    408,
                    "request not received within admin.request_timeout_ms\n",
                );
            }
        }
    }
}

/// Answers a complete request.
fn route(request: &httparse::Request<'_, '_>, shared: &Shared) -> Response {
    let path = request.path.unwrap_or("/").split('?').next().unwrap_or("/");
    if request.method != Some("GET") {
        return Response {
            extra_headers: "Allow: GET\r\n",
            ..Response::text(405, "only GET is served\n")
        };
    }
    match path {
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
    if let Some(refused) = authorize(request, shared.token.as_ref()) {
        return refused;
    }
    match path {
        "/metrics" => {
            let shards = shared
                .sources
                .stats
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default();
            let webhooks = shared.webhooks.as_ref().map(WebhookStats::snapshot);
            match metrics::encode(&shards, webhooks.as_ref()) {
                Ok(body) => Response {
                    status: 200,
                    content_type: metrics::CONTENT_TYPE,
                    extra_headers: "",
                    body,
                },
                Err(_) => Response::text(500, "cannot encode the metrics\n"),
            }
        }
        _ => Response::text(404, "not found: try /healthz, /readyz or /metrics\n"),
    }
}

/// `None` if `request` carries the bearer `token`; else the 401 to answer.
fn authorize(request: &httparse::Request<'_, '_>, token: Option<&Secret>) -> Option<Response> {
    let Some(token) = token else {
        return Some(Response::text(
            401,
            "the admin API has no token: set admin.token (e.g. PARLEY_ADMIN__TOKEN) and send \
             `Authorization: Bearer <token>`\n",
        ));
    };
    let presented = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.expose().as_bytes()) => None,
        _ => Some(Response {
            extra_headers: "WWW-Authenticate: Bearer realm=\"parley-admin\"\r\n",
            ..Response::text(401, "missing or wrong bearer token\n")
        }),
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
    use super::*;

    fn shared(token: Option<&str>) -> Shared {
        Shared {
            token: token.map(Secret::new),
            max_request_bytes: 512,
            timeout: Duration::from_millis(200),
            max_connections: 2,
            active: AtomicUsize::new(0),
            sources: {
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
                }
            },
            webhooks: None,
        }
    }

    fn answer(raw: &str, shared: &Shared) -> Response {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        assert!(matches!(
            request.parse(raw.as_bytes()),
            Ok(httparse::Status::Complete(_))
        ));
        route(&request, shared)
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
        let s = shared(Some("sesame-sesame-sesame"));
        assert_eq!(answer("GET /metrics HTTP/1.1\r\n\r\n", &s).status, 401);
        let wrong = "GET /metrics HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n";
        assert_eq!(answer(wrong, &s).status, 401);
        let right = "GET /metrics HTTP/1.1\r\nauthorization: Bearer sesame-sesame-sesame\r\n\r\n";
        let ok = answer(right, &s);
        assert_eq!(ok.status, 200);
        assert!(ok.body.contains("parley_node_messages_stored_total 0"));
        assert_eq!(answer("POST /healthz HTTP/1.1\r\n\r\n", &s).status, 405);
    }

    #[test]
    fn a_request_head_past_max_request_bytes_is_refused_with_431() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = shared(None);
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(
                format!("GET /healthz HTTP/1.1\r\nX: {}\r\n", "a".repeat(600)).as_bytes(),
            );
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        });
        let (stream, _) = listener.accept().expect("accept");
        serve(&stream, &s);
        drop(stream);
        let out = client.join().expect("client");
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
}
