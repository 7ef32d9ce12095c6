//! A `redis-server` of a test's own (Debian's package; `.ci/run` installs it): on a free
//! loopback port, without persistence, in a temporary directory, stopped by PID.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own.
#[derive(Debug)]
pub struct Redis {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts one on a free port.
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("parley-redis-")
            .tempdir()
            .expect("temp dir");
        let mut redis = Redis {
            dir,
            port,
            child: None,
        };
        redis.spawn();
        redis
    }

    /// Starts the server (again) on the same port, empty.
    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (apt-get install redis-server)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command("PING").as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One inline command; its first answer line, or `None` if Redis cannot be reached.
    pub fn command(&self, command: &str) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }

    /// `HGETALL key`: the hash as a map (empty if the key does not exist).
    pub fn hgetall(&self, key: &str) -> BTreeMap<String, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s.write_all(format!("HGETALL {key}\r\n").as_bytes())
            .expect("write");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        let n: usize = line
            .trim_end()
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not an array: {line:?}"));
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            line.clear();
            r.read_line(&mut line).expect("read");
            let len: usize = line
                .trim_end()
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a bulk string: {line:?}"));
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf).expect("read");
            buf.truncate(len);
            items.push(String::from_utf8(buf).expect("utf-8"));
        }
        items
            .chunks_exact(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect()
    }

    /// The nodes the presence index names for `user`'s devices, read from Redis directly:
    /// device → node id.
    pub fn routes_of(&self, user: &str) -> BTreeMap<String, String> {
        self.hgetall(&format!("parley:presence:{user}"))
            .into_iter()
            .map(|(device, value)| {
                let node = value.split(' ').next().unwrap_or_default().to_owned();
                (device, node)
            })
            .collect()
    }

    /// Kills the server with SIGKILL, by PID (its data is lost: it has no persistence).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
    }
}
