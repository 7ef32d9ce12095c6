//! The broker under test: the real `broker` binary as a child process, on ephemeral loopback
//! ports, with a temporary data directory.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::{Client, UdpClient, WsClient};
use crate::token;
use crate::transport::{Tcp, Transport, Ws};

/// How long the broker may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the broker may take to exit after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every test broker starts with, before the test's own (which override them):
/// two shards, so that connections and conversations land on different shards and cross-shard
/// routing is exercised; small log segments, so that start-up is quick and segment roll-over
/// happens; request rate limits out of the way of pipelined test senders.
pub const BASE_SETTINGS: &[&str] = &[
    "shards=2",
    "storage.segment_bytes=4194304",
    "limits.request_rate_per_sec=1000000",
    "limits.request_burst=1000000",
];

/// The length of the token secret the harness generates: the broker refuses secrets shorter
/// than 32 bytes.
const SECRET_LEN: usize = 48;

/// Environment variable naming the broker binary to test, instead of `target/<profile>/broker`.
pub const BROKER_BIN_ENV: &str = "PARLEY_BROKER_BIN";

/// A running (or stopped) broker process with its own data directory.
///
/// Dropping it kills the process. If the test is failing, the drop prints the broker's stderr;
/// if the test passed but the broker panicked or died on its own, the drop fails the test.
#[derive(Debug)]
pub struct Broker {
    bin: PathBuf,
    /// Holds `data/` and the broker's captured output.
    dir: TempDir,
    settings: Vec<String>,
    secret: String,
    child: Option<Child>,
    tcp: SocketAddr,
    ws: SocketAddr,
    /// The admin listener of the current run, if it printed one.
    admin: Option<SocketAddr>,
    /// The TLS listeners of the current run (`listen.tls`, `listen.wss`), if it printed them.
    tls: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    /// The UDP listener of the current run (`listen.udp`), if it printed one.
    udp: Option<SocketAddr>,
    starts: u32,
    stdout: Arc<Mutex<String>>,
    /// The soft and hard open-file limit (`ulimit -n`) the broker is started under, if not the
    /// test process's own.
    open_file_limit: Option<u32>,
    /// Environment variables set for the broker (see [`Broker::start_with_env`]).
    env: Vec<(String, String)>,
    /// The TCP and WebSocket addresses to listen on (see [`Broker::restart_on_same_ports`]);
    /// None: ephemeral ports.
    fixed_ports: Option<(SocketAddr, SocketAddr)>,
}

/// How a start of the broker that was expected to fail went (see
/// [`Broker::start_expecting_failure`]).
#[derive(Debug)]
pub struct FailedStart {
    /// The exit status; `None` if the broker did not exit but started (and was then killed).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout and stderr.
    pub output: String,
}

impl Broker {
    /// Starts a broker with [`BASE_SETTINGS`] and then `settings` (`key=value`, as for `--set`).
    pub fn start(settings: &[&str]) -> Broker {
        let mut broker = Broker::prepare(settings);
        broker.spawn();
        broker
    }

    /// Starts a broker like [`Broker::start`], under an open-file limit of `nofile` (soft and
    /// hard): it is spawned through `sh -c 'ulimit -n N && exec broker ...'`, so the limit
    /// applies to the broker alone. Restarts keep the limit.
    pub fn start_with_open_file_limit(nofile: u32, settings: &[&str]) -> Broker {
        let mut broker = Broker::prepare(settings);
        broker.open_file_limit = Some(nofile);
        broker.spawn();
        broker
    }

    /// Starts a broker like [`Broker::start`], with the environment variables `env` set for it
    /// (e.g. `RUST_LOG`). Restarts keep them.
    pub fn start_with_env(env: &[(&str, &str)], settings: &[&str]) -> Broker {
        let mut broker = Broker::prepare(settings);
        broker.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        broker.spawn();
        broker
    }

    /// Starts the broker binary with [`BASE_SETTINGS`] and `settings` expecting it to refuse to
    /// start: waits until it exits (returning its status and output) or prints its listening line
    /// or runs for the start-up timeout (then it is killed and the status is `None`).
    pub fn start_expecting_failure(settings: &[&str]) -> FailedStart {
        let broker = Broker::prepare(settings);
        let mut command = broker.command();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", broker.bin.display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let collected = Arc::new(Mutex::new(String::new()));
        let readers: Vec<_> = [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ]
        .into_iter()
        .map(|pipe| {
            let collected = Arc::clone(&collected);
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut all) = collected.lock() {
                        all.push_str(&line);
                        all.push('\n');
                    }
                }
            })
        })
        .collect();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let started = || {
            collected
                .lock()
                .map(|all| all.contains("parley listening"))
                .unwrap_or(false)
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline && !started() => {
                    thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Err(e) => panic!("cannot wait for the broker: {e}"),
            }
        };
        for reader in readers {
            let _ = reader.join();
        }
        let output = collected.lock().map(|s| s.clone()).unwrap_or_default();
        FailedStart { status, output }
    }

    /// A broker not started yet: its temp dir, secret and settings.
    fn prepare(settings: &[&str]) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("parley-test-")
            .tempdir()
            .expect("create a temp dir for the broker");
        fs::create_dir_all(dir.path().join("data")).expect("create the data dir");
        let base = format!(
            "parley-test-secret-{}-{}-",
            std::process::id(),
            crate::client::fresh_client_msg_id()
        );
        // Padded to SECRET_LEN bytes: the broker refuses short secrets.
        let secret = format!("{base:x<SECRET_LEN$}");
        Broker {
            bin: broker_bin().to_owned(),
            dir,
            settings: BASE_SETTINGS
                .iter()
                .chain(settings)
                .map(|s| (*s).to_owned())
                .collect(),
            secret,
            child: None,
            tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
            ws: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            tls: None,
            wss: None,
            udp: None,
            starts: 0,
            stdout: Arc::default(),
            open_file_limit: None,
            env: Vec::new(),
            fixed_ports: None,
        }
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("broker.stderr")
    }

    /// The TCP listening address of the current run.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// The WebSocket listening address of the current run.
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws
    }

    /// The admin HTTP listener of the current run (`admin=` of the listening line); panics if
    /// the broker has none (a test disabled it).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .expect("the broker printed no admin= address (admin.listen disabled?)")
    }

    /// The TLS listener (`tls=` of the listening line); panics if the broker has none.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls
            .expect("the broker printed no tls= address (listen.tls not set?)")
    }

    /// The WebSocket-over-TLS listener (`wss=` of the listening line); panics if it has none.
    pub fn wss_addr(&self) -> SocketAddr {
        self.wss
            .expect("the broker printed no wss= address (listen.wss not set?)")
    }

    /// The UDP listener (`udp=` of the listening line); panics if the broker has none.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
            .expect("the broker printed no udp= address (listen.udp not set?)")
    }

    /// Sends the running broker SIGHUP (it reloads its TLS certificate).
    pub fn hangup(&self) {
        let child = self
            .child
            .as_ref()
            .expect("hangup: the broker is not running");
        signal(child, libc::SIGHUP);
    }

    /// The token secret the broker was started with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A valid token for `user` on `device`.
    pub fn token(&self, user: &str, device: &str) -> String {
        token::mint_valid(self.secret.as_bytes(), user, device)
    }

    /// The process id of the running broker; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("pid: the broker is not running")
            .id()
    }

    /// The broker's resident set size (`VmRSS` of `/proc/PID/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status:\n{status}"))
    }

    /// How many lines the broker wrote to stderr so far, across restarts (the harness adds one
    /// `==== broker start #N ====` line per start).
    pub fn stderr_lines(&self) -> usize {
        fs::read_to_string(self.stderr_path())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The broker's stderr lines from index `from` on (see [`Broker::stderr_lines`]).
    pub fn stderr_since(&self, from: usize) -> Vec<String> {
        fs::read_to_string(self.stderr_path())
            .map(|s| s.lines().skip(from).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Everything the broker wrote to stderr and stdout so far, across restarts.
    pub fn output(&self) -> String {
        let stderr = fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let stdout = self.stdout.lock().map(|s| s.clone()).unwrap_or_default();
        format!("---- stdout ----\n{stdout}---- stderr ----\n{stderr}")
    }

    // ---------------------------------------------------------------------------------------
    // Clients
    // ---------------------------------------------------------------------------------------

    /// A TCP connection, not logged in.
    pub fn tcp(&self) -> Client {
        Client::connect(self.tcp, &self.secret)
    }

    /// A TCP connection with a receive buffer of `bytes`, not logged in: a reader that stops
    /// reading then stalls the broker's writes after little data.
    pub fn tcp_with_recv_buffer(&self, bytes: usize) -> Client {
        let conn = Tcp::open_with_recv_buffer(self.tcp, bytes)
            .unwrap_or_else(|e| panic!("cannot connect to the broker at {}: {e}", self.tcp));
        Client::with_conn(conn, self.tcp, &self.secret)
    }

    /// A ready TCP client: connected, logged in as `user` on `device`, and synced (so it is
    /// caught up and live push is on).
    pub fn connect(&self, user: &str, device: &str) -> Client {
        let mut client = self.tcp();
        client.login(user, device);
        client.sync();
        client
    }

    /// A WebSocket connection (upgrade without a token), not logged in.
    pub fn ws(&self) -> WsClient {
        Client::connect(self.ws, &self.secret)
    }

    /// A ready WebSocket client that logged in with a `Login` frame, and synced.
    pub fn connect_ws(&self, user: &str, device: &str) -> WsClient {
        let mut client = self.ws();
        client.login(user, device);
        client.sync();
        client
    }

    /// A ready WebSocket client speaking the JSON text form, logged in and synced.
    pub fn connect_ws_json(&self, user: &str, device: &str) -> WsClient {
        let conn = Ws::open(self.ws, None)
            .unwrap_or_else(|e| panic!("cannot open a WebSocket: {e}"))
            .speaking_json();
        let mut client = Client::with_conn(conn, self.ws, &self.secret);
        client.login(user, device);
        client.sync();
        client
    }

    /// A ready WebSocket client whose token came in the upgrade URL (`?token=`), and synced. The
    /// sync doubles as the proof that the upgrade logged it in.
    pub fn connect_ws_url_token(&self, user: &str, device: &str) -> WsClient {
        let token = self.token(user, device);
        let conn = Ws::open(self.ws, Some(&token))
            .unwrap_or_else(|e| panic!("cannot open a WebSocket with a token: {e}"));
        let mut client = Client::with_conn(conn, self.ws, &self.secret);
        client.assume_logged_in(user, device);
        client.sync();
        client
    }

    /// A UDP client (a socket of its own, no session yet): its first frame must be a `Login`.
    /// Panics if the broker has no UDP listener.
    pub fn udp(&self) -> UdpClient {
        Client::connect(self.udp_addr(), &self.secret)
    }

    /// A ready UDP client: logged in as `user` on `device` (the LOGIN, RETRY, LOGIN exchange)
    /// and synced.
    pub fn connect_udp(&self, user: &str, device: &str) -> UdpClient {
        let mut client = self.udp();
        client.login(user, device);
        client.sync();
        client
    }

    // ---------------------------------------------------------------------------------------
    // Process control
    // ---------------------------------------------------------------------------------------

    /// Kills the broker with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the broker to shut down with SIGTERM and waits for it to exit; returns its status.
    /// Panics if it is still running after a while.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("terminate: the broker is not running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the broker did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM");
                }
                Err(e) => panic!("cannot wait for the broker: {e}"),
            }
        }
    }

    /// Starts the broker again on the same data directory and settings (after
    /// [`Broker::kill9`] or [`Broker::terminate`]; a running broker is terminated first). The
    /// listening ports change.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.spawn();
    }

    /// Starts the broker again like [`Broker::restart`], but listening on the same TCP and
    /// WebSocket addresses as the run before (so clients that reconnect to the address they
    /// know find it again). The listeners set `SO_REUSEADDR`, so a port left in `TIME_WAIT` by
    /// the killed run can be bound again.
    pub fn restart_on_same_ports(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        self.fixed_ports = Some((self.tcp, self.ws));
        self.spawn();
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("open the broker's stderr file");
        writeln!(stderr, "==== broker start #{} ====", self.starts).expect("write stderr file");
        let mut command = self.command();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);
        self.await_listening(stdout);
    }

    /// The command line that starts the broker (under `sh -c 'ulimit -n N && exec ...'` if an
    /// open-file limit is set), without its standard streams.
    fn command(&self) -> Command {
        let mut command = match self.open_file_limit {
            None => Command::new(&self.bin),
            Some(nofile) => {
                let mut sh = Command::new("sh");
                // `$0` is the broker binary and `$@` its arguments: nothing is interpolated into
                // the script but the number.
                sh.arg("-c")
                    .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
                    .arg(&self.bin);
                sh
            }
        };
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(match self.fixed_ports {
                Some((tcp, ws)) => [
                    "--tcp".to_owned(),
                    tcp.to_string(),
                    "--ws".to_owned(),
                    ws.to_string(),
                ],
                None => ["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"].map(str::to_owned),
            })
            .arg("--set")
            // Quoted, so the secret is a string whatever its characters look like.
            .arg(format!("auth.secret=\"{}\"", self.secret))
            // An ephemeral admin port, so that brokers started in parallel never collide on
            // the default 7402 (a test's own settings may override it).
            .args(["--set", "admin.listen=\"127.0.0.1:0\""])
            // The harness's own variable must not reach the broker, which reads PARLEY_* as config.
            .env_remove(BROKER_BIN_ENV)
            // Nor the test run's `RUST_LOG`, which would replace `log.level`: tests that count
            // the broker's lines need its default level. A test sets it with `start_with_env`.
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        for setting in &self.settings {
            command.arg("--set").arg(setting);
        }
        command
    }

    /// Reads the broker's stdout until its listening line, and takes its addresses from it.
    fn await_listening(&mut self, stdout: std::process::ChildStdout) {
        // A thread reads stdout for the whole run, so the broker never blocks on a full pipe;
        // it hands the listening line over.
        let (line_tx, line_rx) = mpsc::channel();
        let log = Arc::clone(&self.stdout);
        let start = self.starts;
        thread::spawn(move || {
            let mut line_tx = Some(line_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut log) = log.lock() {
                    log.push_str(&format!("[start #{start}] {line}\n"));
                }
                if line.starts_with("parley listening")
                    && let Some(tx) = line_tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match line_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill9();
                panic!(
                    "the broker printed no listening line within {STARTUP_TIMEOUT:?}\n{}",
                    self.output()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.take().map(|mut c| c.wait());
                panic!(
                    "the broker closed stdout without a listening line (exit: {status:?})\n{}",
                    self.output()
                );
            }
        };
        let (tcp, ws) = parse_listening_line(&line).unwrap_or_else(|| {
            panic!("cannot parse the listening line {line:?}: expected `parley listening tcp=ADDR ws=ADDR`")
        });
        self.tcp = tcp;
        self.ws = ws;
        self.admin = parse_named_address(&line, "admin");
        self.tls = parse_named_address(&line, "tls");
        self.wss = parse_named_address(&line, "wss");
        self.udp = parse_named_address(&line, "udp");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "==== broker output (data dir {}) ====\n{}",
                self.data_dir().display(),
                self.output()
            );
            return;
        }
        let output = self.output();
        if let Some(status) = exited {
            panic!("the broker exited on its own during the test ({status})\n{output}");
        }
        if output.contains("panicked at") {
            panic!("the broker panicked during the test (it must never panic)\n{output}");
        }
    }
}

/// Sends `sig` to the child.
fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits in pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child, not yet
    // reaped (we hold its `Child` and have not waited on it), so the pid cannot have been reused.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Parses `parley listening tcp=127.0.0.1:PORT ws=127.0.0.1:PORT`.
fn parse_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut tcp = None;
    let mut ws = None;
    for word in line.split_whitespace() {
        if let Some(addr) = word.strip_prefix("tcp=") {
            tcp = addr.parse().ok();
        } else if let Some(addr) = word.strip_prefix("ws=") {
            ws = addr.parse().ok();
        }
    }
    Some((tcp?, ws?))
}

/// The `NAME=ADDR` of a listening line (`admin`, `tls`, `wss`), if it has one.
fn parse_named_address(line: &str, name: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|a| a.parse().ok())
}

/// The broker binary: `$PARLEY_BROKER_BIN`, else `broker` in the target directory of this test
/// executable (`target/<profile>/`), built with cargo once if it is not there.
///
/// An existing binary is used as it is: run `cargo build -p parley-broker` first when testing
/// changed broker code with `cargo test -p parley-tests` (`cargo test --workspace` builds it).
pub fn broker_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_or_build_broker) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn find_or_build_broker() -> Result<PathBuf, String> {
    find_or_build(BROKER_BIN_ENV, "parley-broker", "broker")
}

/// The workspace binary `bin` of package `package`: the file named by the environment variable
/// `env` if set, else `target/<profile>/<bin>` next to the running test, built with cargo (same
/// profile and target dir) once per test process: `cargo test` does not rebuild another package's
/// binary, and a stale one would test old code (cargo does nothing if it is up to date).
pub(crate) fn find_or_build(env: &str, package: &str, bin: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{env}={} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("no target directory above {}", exe.display()))?;
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("no target directory above {}", profile_dir.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the tests package has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "-p", package, "--bin", bin])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    if !path.is_file() {
        eprintln!("{} is missing; building it: {command:?}", path.display());
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{command:?} failed ({status})"));
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{command:?} succeeded but {} is still missing",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_parses_both_addresses() {
        let (tcp, ws) =
            parse_listening_line("parley listening tcp=127.0.0.1:4000 ws=127.0.0.1:4001")
                .expect("parses");
        assert_eq!(tcp, SocketAddr::from(([127, 0, 0, 1], 4000)));
        assert_eq!(ws, SocketAddr::from(([127, 0, 0, 1], 4001)));
    }

    #[test]
    fn listening_line_names_the_admin_address_when_enabled() {
        let line = "parley listening tcp=127.0.0.1:4000 ws=127.0.0.1:4001 admin=127.0.0.1:4002";
        assert!(parse_listening_line(line).is_some());
        assert_eq!(
            parse_named_address(line, "admin"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4002)))
        );
        assert_eq!(
            parse_named_address(
                "parley listening tcp=127.0.0.1:4000 ws=127.0.0.1:4001",
                "admin"
            ),
            None
        );
    }

    #[test]
    fn listening_line_without_ws_is_refused() {
        assert_eq!(
            parse_listening_line("parley listening tcp=127.0.0.1:4000"),
            None
        );
    }
}
