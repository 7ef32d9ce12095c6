//! The load generator under test: the real `loadgen` binary as a child process, run to
//! completion with a deadline ([`Loadgen`]), or kept running as a relay ([`Relay`]).
//!
//! Every child runs in its own process group, so that killing it (on a timeout, or when its
//! handle is dropped) also kills the worker processes a multi-process run starts.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::Broker;
use crate::broker::BROKER_BIN_ENV;

/// Environment variable naming the loadgen binary to test, instead of `target/<profile>/loadgen`.
pub const LOADGEN_BIN_ENV: &str = "PARLEY_LOADGEN_BIN";

/// How long one loadgen run may take before it is killed and the test fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the relay may take to print its listening line.
const RELAY_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A loadgen invocation, built up with [`Loadgen::arg`] and run with [`Loadgen::run`].
#[derive(Debug)]
pub struct Loadgen {
    args: Vec<String>,
}

impl Loadgen {
    /// `loadgen <args...>`.
    pub fn new<I, S>(args: I) -> Loadgen
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Loadgen {
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// A scenario against the harness broker `broker` over TCP: `loadgen <scenario> --addr
    /// <tcp> --secret <secret> --json`.
    pub fn against(scenario: &str, broker: &Broker) -> Loadgen {
        Loadgen::new([scenario, "--json", "--secret", broker.secret()])
            .arg("--addr")
            .arg(broker.tcp_addr().to_string())
    }

    /// Appends one argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Loadgen {
        self.args.push(arg.into());
        self
    }

    /// Appends several arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Loadgen
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs loadgen to completion (within [`RUN_TIMEOUT`], else it is killed and this panics)
    /// and returns what it did.
    pub fn run(&self) -> Outcome {
        let dir = tempfile::Builder::new()
            .prefix("parley-loadgen-")
            .tempdir()
            .expect("create a temp dir for loadgen's output");
        let file = |name: &str| {
            fs::File::create(dir.path().join(name))
                .unwrap_or_else(|e| panic!("create loadgen's {name} file: {e}"))
        };
        let mut command = command(loadgen_bin());
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"));
        let started = Instant::now();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut guard = Group(Some(child));
        let deadline = started + RUN_TIMEOUT;
        let status = loop {
            let child = guard.0.as_mut().expect("the child is held until it exits");
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    drop(guard);
                    panic!(
                        "loadgen {:?} did not finish within {RUN_TIMEOUT:?}\n{}",
                        self.args,
                        read_output(&dir)
                    );
                }
                Err(e) => panic!("cannot wait for loadgen: {e}"),
            }
        };
        guard.0 = None;
        let elapsed = started.elapsed();
        let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        Outcome {
            args: self.args.clone(),
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
            elapsed,
        }
    }
}

/// What one loadgen run did.
#[derive(Debug)]
pub struct Outcome {
    /// The arguments it ran with.
    pub args: Vec<String>,
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (the report).
    pub stdout: String,
    /// Everything it wrote to stderr (progress, failures, errors).
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Outcome {
    /// The exit code; panics if it was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("loadgen was killed by a signal ({})\n{self}", self.status))
    }

    /// Asserts the exit code, explaining `promise` (with the whole output) if it differs.
    pub fn assert_code(&self, want: i32, promise: &str) {
        assert_eq!(self.code(), want, "{promise}\n{self}");
    }

    /// The `--json` report on stdout; panics (with the output) if there is none.
    pub fn report(&self) -> Report {
        let value = serde_json::from_str::<Value>(&self.stdout).unwrap_or_else(|e| {
            panic!("loadgen's stdout is not one JSON report ({e})\n{self}");
        });
        Report {
            value,
            context: self.to_string(),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "---- loadgen {} ({}, {:.2} s) ----\n---- stdout ----\n{}\n---- stderr ----\n{}",
            self.args.join(" "),
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// loadgen's final `--json` report, with typed getters that fail the test (printing the whole
/// run) when a field is missing or of the wrong type.
#[derive(Debug)]
pub struct Report {
    /// The parsed report.
    pub value: Value,
    /// The run's output, for failure messages.
    context: String,
}

impl Report {
    /// The value at `path` (`/`-separated, e.g. `verdict/lost`); panics if it is missing.
    pub fn get(&self, path: &str) -> &Value {
        let pointer = format!("/{path}");
        self.value
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("the report has no `{path}`\n{}", self.context))
    }

    /// An unsigned integer field.
    pub fn u64(&self, path: &str) -> u64 {
        self.get(path).as_u64().unwrap_or_else(|| {
            panic!(
                "`{path}` is not an unsigned integer: {}\n{}",
                self.get(path),
                self.context
            )
        })
    }

    /// A number field.
    pub fn f64(&self, path: &str) -> f64 {
        self.get(path).as_f64().unwrap_or_else(|| {
            panic!(
                "`{path}` is not a number: {}\n{}",
                self.get(path),
                self.context
            )
        })
    }

    /// A boolean field.
    pub fn bool(&self, path: &str) -> bool {
        self.get(path).as_bool().unwrap_or_else(|| {
            panic!(
                "`{path}` is not a boolean: {}\n{}",
                self.get(path),
                self.context
            )
        })
    }

    /// A string field.
    pub fn str(&self, path: &str) -> &str {
        self.get(path).as_str().unwrap_or_else(|| {
            panic!(
                "`{path}` is not a string: {}\n{}",
                self.get(path),
                self.context
            )
        })
    }

    /// The verdict counters as `(lost, duplicated, out_of_order, corrupt, gaps)`.
    pub fn failures(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.u64("verdict/lost"),
            self.u64("verdict/duplicated"),
            self.u64("verdict/out_of_order"),
            self.u64("verdict/corrupt"),
            self.u64("verdict/gaps"),
        )
    }

    /// Asserts `condition`, explaining `promise` with the whole run if it does not hold.
    pub fn check(&self, condition: bool, promise: &str) {
        assert!(condition, "{promise}\n{}", self.context);
    }

    /// Asserts two values are equal, explaining `promise` with the whole run if not.
    pub fn check_eq<T: PartialEq + std::fmt::Debug>(&self, got: T, want: T, promise: &str) {
        assert_eq!(got, want, "{promise}\n{}", self.context);
    }
}

/// `loadgen relay` running in the background; dropping it kills it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    child: Group,
}

impl Relay {
    /// Starts a relay on an ephemeral loopback port, with `--fault <fault>` if given, and waits
    /// for its `relay listening <addr>` line.
    pub fn start(fault: Option<&str>) -> Relay {
        let mut command = command(loadgen_bin());
        command.args(["relay", "--listen", "127.0.0.1:0"]);
        if let Some(fault) = fault {
            command.args(["--fault", fault]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let child = Group(Some(child));
        // A thread reads stdout for the relay's whole life, so it never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("relay listening ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let line = rx.recv_timeout(RELAY_STARTUP_TIMEOUT).unwrap_or_else(|e| {
            panic!("the relay printed no `relay listening <addr>` line within {RELAY_STARTUP_TIMEOUT:?} ({e})")
        });
        let addr = line
            .parse()
            .unwrap_or_else(|e| panic!("the relay's address {line:?} does not parse: {e}"));
        Relay { addr, child }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it is still running (it must survive every run against it).
    pub fn is_running(&mut self) -> bool {
        self.child
            .0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// A child process that leads its own process group; dropping it SIGKILLs the whole group and
/// reaps the child.
#[derive(Debug)]
struct Group(Option<Child>);

impl Drop for Group {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None))
            && let Ok(pgid) = libc::pid_t::try_from(child.id())
        {
            // SAFETY: kill(2) has no memory-safety preconditions. `pgid` is the id of our own
            // child, not yet reaped, which leads its own group (`process_group(0)`), so the group
            // holds it and the processes it started, and cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A command for `bin` in a process group of its own, without the harness's variables (nor
/// `LOADGEN_SECRET`, which would stand in for `--secret`).
fn command(bin: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .env_remove(LOADGEN_BIN_ENV)
        .env_remove(BROKER_BIN_ENV)
        .env_remove("LOADGEN_SECRET")
        .process_group(0);
    command
}

fn read_output(dir: &TempDir) -> String {
    let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    format!(
        "---- stdout ----\n{}\n---- stderr ----\n{}",
        read("stdout"),
        read("stderr")
    )
}

/// The broker's process id, found by its unique data directory on its command line (the harness
/// does not hand the pid out). `None` if no such process is found (not on Linux, say).
pub fn broker_pid(broker: &Broker) -> Option<u32> {
    let data_dir = broker.data_dir();
    let data_dir = data_dir.to_str()?;
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        let serves = args.clone().any(|a| a == b"serve");
        let has_dir = args.any(|a| a == data_dir.as_bytes());
        (serves && has_dir).then_some(pid)
    })
}

/// The loadgen binary: `$PARLEY_LOADGEN_BIN`, else `loadgen` in the target directory of this
/// test executable (`target/<profile>/`), built with cargo once if it is not there.
///
/// An existing binary is used as it is: run `cargo build -p parley-loadgen` first when testing
/// changed loadgen code with `cargo test -p parley-tests` (`cargo test --workspace` builds it).
pub fn loadgen_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_or_build_loadgen) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn find_or_build_loadgen() -> Result<PathBuf, String> {
    crate::broker::find_or_build(LOADGEN_BIN_ENV, "parley-loadgen", "loadgen")
}
