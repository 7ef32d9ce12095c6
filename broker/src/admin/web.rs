//! DEV ONLY (`admin.web = true`): the browser chat page and the dev token endpoint.
//!
//! Fixed routes, no file system: the page and its JavaScript client are built into the binary
//! (`broker/web/`, `include_str!`), so no path can reach anything else.
//!
//! * `GET /chat/` (also `/chat/index.html`; `/chat` redirects): the page, `text/html`.
//! * `GET /chat/parley.js`: the dependency-free JavaScript client module, `text/javascript`.
//! * `GET /chat/config.json`: `{"ws":"ws://HOST:PORT"}`, the node's WebSocket listener (when it
//!   listens on an unspecified address, `HOST` is the host the browser asked for).
//! * `GET /dev/token?user=U&device=D`: `{"token":..., "user":..., "device":..., "expires_at":...}`,
//!   an HS256 token signed with the node's secret, valid for [`DEV_TOKEN_SECS`]. It answers
//!   anyone, without the admin bearer token: whoever reaches the admin listener may log in as
//!   any user. That is why it is off by default and meant for a developer's own machine (the
//!   admin listener is on loopback by default). `device` defaults to `web`.
//!
//! No CORS headers are sent: another site's script cannot read these answers.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Sources;
use super::http::{Head, HttpError, JSON, Query, Response};

/// The page.
const INDEX_HTML: &str = include_str!("../../web/index.html");
/// The JavaScript client module.
const PARLEY_JS: &str = include_str!("../../web/parley.js");
/// How long a dev token is valid, in seconds (a day).
pub(super) const DEV_TOKEN_SECS: u64 = 24 * 3600;
/// Longest user or device id accepted, in bytes.
const MAX_ID_BYTES: usize = 128;

/// The answer for the dev-only routes, or `None` for any other path (routed as before).
pub(super) fn route(head: &Head, sources: &Sources) -> Option<Response> {
    let path = head.path.as_str();
    let known = [
        "/chat",
        "/chat/",
        "/chat/index.html",
        "/chat/parley.js",
        "/chat/config.json",
        "/dev/token",
    ];
    if !known.contains(&path) {
        return None;
    }
    if head.method != "GET" {
        return Some(Response::text(405, "only GET is served here\n").with_header("Allow", "GET"));
    }
    // (`write_response` adds `Cache-Control: no-store` to every answer.)
    Some(match path {
        "/chat" => Response::text(301, "see /chat/\n").with_header("Location", "/chat/"),
        "/chat/" | "/chat/index.html" => static_file("text/html; charset=utf-8", INDEX_HTML),
        "/chat/parley.js" => static_file("text/javascript; charset=utf-8", PARLEY_JS),
        "/chat/config.json" => config(head, sources.ws),
        _ => token(head, sources).unwrap_or_else(|e| Response::json(e.status, error_json(&e))),
    })
}

/// A built-in file.
fn static_file(content_type: &'static str, body: &str) -> Response {
    Response {
        status: 200,
        content_type,
        headers: vec![("X-Content-Type-Options", "nosniff".to_owned())],
        body: body.to_owned(),
    }
}

/// `{"error": message}`.
fn error_json(e: &HttpError) -> String {
    serde_json::json!({ "error": e.message.trim_end() }).to_string()
}

/// `/chat/config.json`: where the page's WebSocket connects.
fn config(head: &Head, ws: Option<SocketAddr>) -> Response {
    let Some(ws) = ws else {
        let body = serde_json::json!({ "error": "the node has no WebSocket listener (listen.ws)" });
        return Response::json(503, body.to_string());
    };
    let host = if ws.ip().is_unspecified() {
        head.header("host")
            .and_then(host_name)
            .unwrap_or_else(|| "127.0.0.1".to_owned())
    } else {
        match ws {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    let url = format!("ws://{host}:{}", ws.port());
    Response::json(200, serde_json::json!({ "ws": url }).to_string())
}

/// The host part of a `Host` header (without its port), if it looks like a host name or an IP
/// address; anything else is not echoed back.
fn host_name(header: &str) -> Option<String> {
    let header = header.trim();
    let host = if let Some(rest) = header.strip_prefix('[') {
        let end = rest.find(']')?;
        &header[..end + 2]
    } else {
        header.split(':').next()?
    };
    let fine = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    fine.then(|| host.to_owned())
}

/// `/dev/token`: a token for the user and device asked for.
fn token(head: &Head, sources: &Sources) -> Result<Response, HttpError> {
    let query = Query::parse(&head.query, &["user", "device"])?;
    let user = query.required("user")?;
    let device = query.get("device")?.unwrap_or_else(|| "web".to_owned());
    for (name, value) in [("user", &user), ("device", &device)] {
        if value.is_empty() || value.len() > MAX_ID_BYTES {
            return Err(HttpError::new(
                400,
                format!("{name} must be 1 to {MAX_ID_BYTES} bytes"),
            ));
        }
    }
    let Some(minter) = &sources.minter else {
        return Err(HttpError::new(
            501,
            "this node verifies tokens with the application's own scheme: no dev tokens",
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let expires_at = now.saturating_add(DEV_TOKEN_SECS);
    let token = minter.mint(&user, &device, expires_at);
    let body = serde_json::json!({
        "token": token,
        "user": user,
        "device": device,
        "expires_at": expires_at,
    });
    Ok(Response {
        status: 200,
        content_type: JSON,
        headers: Vec::new(),
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::auth::{Hs256, TokenVerifier as _};

    fn sources(ws: Option<SocketAddr>, minter: Option<Hs256>) -> Sources {
        Sources::detached(ws, minter)
    }

    fn get(raw: &str, s: &Sources) -> Option<Response> {
        let request = super::super::http::Request::from_bytes(raw.as_bytes()).expect("request");
        route(&request.head, s)
    }

    #[test]
    fn fixed_routes_only_with_the_right_content_types() {
        let s = sources(None, None);
        let page = get("GET /chat/ HTTP/1.1\r\n\r\n", &s).expect("routed");
        assert_eq!(
            (page.status, page.content_type),
            (200, "text/html; charset=utf-8")
        );
        assert!(page.body.contains("parley.js"));
        let js = get("GET /chat/parley.js HTTP/1.1\r\n\r\n", &s).expect("routed");
        assert_eq!(
            (js.status, js.content_type),
            (200, "text/javascript; charset=utf-8")
        );
        let redirect = get("GET /chat HTTP/1.1\r\n\r\n", &s).expect("routed");
        assert_eq!(
            (redirect.status, redirect.header("Location")),
            (301, Some("/chat/"))
        );
        for other in [
            "/chat/../admin/mod.rs",
            "/chat/%2e%2e/x",
            "/chat/web/index.html",
            "/chat//parley.js",
            "/dev/",
            "/metrics",
        ] {
            assert!(
                get(&format!("GET {other} HTTP/1.1\r\n\r\n"), &s).is_none(),
                "{other}"
            );
        }
        let post = get("POST /dev/token?user=a HTTP/1.1\r\n\r\n", &s).expect("routed");
        assert_eq!(post.status, 405);
    }

    #[test]
    fn config_names_the_ws_listener_and_the_asked_host_when_unspecified() {
        let s = sources(Some(SocketAddr::from(([127, 0, 0, 1], 7401))), None);
        let c = get("GET /chat/config.json HTTP/1.1\r\n\r\n", &s).expect("routed");
        assert_eq!((c.status, c.content_type), (200, JSON));
        assert_eq!(c.body, r#"{"ws":"ws://127.0.0.1:7401"}"#);
        let any = sources(Some(SocketAddr::from(([0, 0, 0, 0], 9))), None);
        let c = get(
            "GET /chat/config.json HTTP/1.1\r\nHost: box.local:7402\r\n\r\n",
            &any,
        )
        .expect("routed");
        assert_eq!(c.body, r#"{"ws":"ws://box.local:9"}"#);
        let c = get(
            "GET /chat/config.json HTTP/1.1\r\nHost: <script>\r\n\r\n",
            &any,
        )
        .expect("routed");
        assert_eq!(c.body, r#"{"ws":"ws://127.0.0.1:9"}"#);
        let none = get(
            "GET /chat/config.json HTTP/1.1\r\n\r\n",
            &sources(None, None),
        );
        assert_eq!(none.expect("routed").status, 503);
    }

    #[test]
    fn dev_tokens_verify_with_the_node_secret_and_bad_queries_are_400() {
        let secret = Hs256::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let s = sources(None, Some(secret.clone()));
        let r = get(
            "GET /dev/token?user=al%20ice&device=d1 HTTP/1.1\r\n\r\n",
            &s,
        )
        .expect("ok");
        assert_eq!((r.status, r.content_type), (200, JSON), "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        let token = v["token"].as_str().expect("a token");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .as_secs();
        let id = secret.verify(token, now).expect("verifies");
        assert_eq!((id.user.as_str(), id.device.as_str()), ("al ice", "d1"));
        let web = get("GET /dev/token?user=bob HTTP/1.1\r\n\r\n", &s).expect("ok");
        assert!(web.body.contains(r#""device":"web""#), "{}", web.body);
        for bad in ["", "?user=", "?user=a&x=1", "?device=d"] {
            let r = get(&format!("GET /dev/token{bad} HTTP/1.1\r\n\r\n"), &s).expect("routed");
            assert_eq!((r.status, r.content_type), (400, JSON), "{bad}");
        }
        let long = format!("GET /dev/token?user={} HTTP/1.1\r\n\r\n", "u".repeat(129));
        assert_eq!(get(&long, &s).expect("routed").status, 400);
        let no_secret = get(
            "GET /dev/token?user=a HTTP/1.1\r\n\r\n",
            &sources(None, None),
        );
        assert_eq!(no_secret.expect("routed").status, 501);
    }
}
