//! A small headless Chromium driver over the DevTools protocol (for tests/browser.rs).
//!
//! [`Chromium::start`] runs `chromium --headless=new --remote-debugging-port=0` with a temporary
//! profile, reads the `DevTools listening on ws://...` line from its stderr and connects to that
//! browser endpoint with `tungstenite`. [`Chromium::open`] creates a page (a target) and attaches
//! to it in flattened mode, so every command for the page goes over the one connection with its
//! `sessionId`. [`Page::eval`] runs `Runtime.evaluate` with `awaitPromise` and `returnByValue`.
//! Every wait is bounded; dropping the [`Chromium`] kills the browser by its PID.

use std::io::{BufRead as _, BufReader, ErrorKind};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The browser binary (Debian's `chromium` package), unless `PARLEY_CHROMIUM` names another.
pub const CHROMIUM_ENV: &str = "PARLEY_CHROMIUM";

/// How long the browser may take to print its DevTools address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A running headless Chromium and the DevTools connection to it.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// The browser's profile; removed after the browser is killed.
    _profile: TempDir,
}

/// A page of a [`Chromium`]: its DevTools session.
#[derive(Debug, Clone)]
pub struct Page {
    session: String,
}

impl Chromium {
    /// Starts the browser; Err says why it cannot (binary missing, no DevTools line, ...), with
    /// its output.
    pub fn start() -> Result<Chromium, String> {
        let bin = std::env::var(CHROMIUM_ENV).unwrap_or_else(|_| "chromium".to_owned());
        let profile = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut child = Command::new(&bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {bin:?}: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        // Reads stderr to its end (so the browser never blocks on a full pipe), handing over
        // every line until the DevTools one.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = String::new();
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find("DevTools listening on ") {
                        break line[at + "DevTools listening on ".len()..]
                            .trim()
                            .to_owned();
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("chromium printed no DevTools address:\n{seen}"));
                }
            }
        };
        let (ws, _) = match tungstenite::connect(url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot connect to {url}: {e}"));
            }
        };
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        }
        Ok(Chromium {
            child,
            ws,
            next_id: 1,
            _profile: profile,
        })
    }

    /// Sends `method` with `params` (to the page `session`, or to the browser) and returns its
    /// result; panics on an error answer or after [`COMMAND_TIMEOUT`].
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .unwrap_or_else(|e| panic!("DevTools: cannot send {method}: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "DevTools: no answer to {method} in {COMMAND_TIMEOUT:?}"
            );
            let text = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue;
                }
                Err(e) => panic!("DevTools: connection lost waiting for {method}: {e}"),
            };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            if v["id"].as_u64() != Some(id) {
                continue; // an event, or an answer to someone else
            }
            if let Some(err) = v.get("error") {
                panic!("DevTools: {method} failed: {err}");
            }
            return v["result"].clone();
        }
    }

    /// Opens a new page at `url` and attaches to it.
    pub fn open(&mut self, url: &str) -> Page {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"]
            .as_str()
            .expect("Target.createTarget gives a targetId")
            .to_owned();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("Target.attachToTarget gives a sessionId")
            .to_owned();
        Page { session }
    }

    /// Evaluates `expression` in `page` (awaiting a promise) and returns its value as JSON;
    /// panics if it throws.
    pub fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let r = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page threw evaluating {expression:?}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is `true`, for at most `timeout`; panics with `what` and
    /// the last value of `show` otherwise.
    pub fn wait_until(
        &mut self,
        page: &Page,
        expression: &str,
        timeout: Duration,
        show: &str,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if self.eval(page, expression) == Value::Bool(true) {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                let shown = self.eval(page, show);
                panic!("not true within {timeout:?}: {expression}\n  {show} = {shown}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Ask the browser to close (its helper processes go with it), then make sure by PID.
        let close = json!({ "id": 0, "method": "Browser.close" }).to_string();
        let _ = self.ws.send(Message::Text(close.into()));
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
