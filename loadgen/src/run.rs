//! The orchestrator: plans the run, starts the worker processes, relays their progress, samples
//! the broker, merges the results and prints the report.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::check::Verdict;
use crate::cli::{Command, Common, FanoutConversation, GroupsArgs, System, Transport};
use crate::driver::Names;
use crate::procstat::{self, Sample};
use crate::stats::{Progress, Summary, Tally};
use crate::worker::{self, Plan, Report, Scenario};

/// Connections one source address is given before another is used.
pub const CONNS_PER_SOURCE: usize = 20_000;

/// The scenario's name, group size and per-client connection needs.
struct Shape {
    name: &'static str,
    clients: usize,
    group: usize,
    conns: usize,
}

fn shape(cmd: &Command, common: &Common) -> Result<Shape, String> {
    let s = common.system;
    if s == System::Parley
        && common.transport == Transport::Udp
        && matches!(
            cmd,
            Command::Fanout(_) | Command::Groups(_) | Command::Offline(_)
        )
    {
        return Err(
            "--transport udp runs pairs, storm and idle: loadgen does not yet retry \
             over UDP the room joins, group requests and syncs those scenarios rely on"
                .into(),
        );
    }
    let per = |sends, receives| worker::conns_per_client(s, sends, receives);
    Ok(match cmd {
        Command::Pairs(a) => {
            let clients = a.conns / 2 * 2;
            if clients == 0 {
                return Err("pairs needs at least 2 clients".into());
            }
            Shape {
                name: "pairs",
                clients,
                group: 2,
                conns: clients * per(true, true),
            }
        }
        Command::Fanout(a) => {
            if a.subscribers == 0 || a.publishers == 0 {
                return Err("fanout needs at least one publisher and one subscriber".into());
            }
            if a.conversation == FanoutConversation::Group && s != System::Parley {
                return Err("fanout --conversation group is parley's (groups)".into());
            }
            let group = a.subscribers + 1;
            Shape {
                name: "fanout",
                clients: group * a.publishers,
                group,
                conns: a.publishers * per(true, false)
                    + a.publishers * a.subscribers * per(false, true),
            }
        }
        Command::Groups(a) => {
            let online = online_members(a)?;
            Shape {
                name: "groups",
                clients: a.groups * a.members,
                group: a.members,
                conns: a.groups * online,
            }
        }
        Command::Storm(a) => Shape {
            name: "storm",
            clients: a.conns,
            group: 1,
            conns: a.conns * per(false, false),
        },
        Command::Idle(a) => Shape {
            name: "idle",
            clients: a.conns,
            group: 1,
            conns: a.conns * per(false, false),
        },
        Command::Offline(a) => {
            let clients = a.conns / 2 * 2;
            if clients == 0 {
                return Err("offline needs at least 2 clients".into());
            }
            Shape {
                name: "offline",
                clients,
                group: 2,
                conns: clients,
            }
        }
        Command::Relay(_) => return Err("relay is not a load scenario".into()),
    })
}

/// How many members of each group of `a` connect, checking `a` makes sense.
fn online_members(a: &GroupsArgs) -> Result<usize, String> {
    if a.common.system != System::Parley {
        return Err("groups are parley's: use --system parley".into());
    }
    if a.groups == 0 || a.members < 2 {
        return Err("groups needs at least one group of at least 2 members".into());
    }
    if !(a.online > 0.0 && a.online <= 1.0) {
        return Err("--online must be a fraction in (0, 1]".into());
    }
    if !(a.churn.is_finite() && a.churn >= 0.0) {
        return Err("--churn must be a non-negative number of changes per second".into());
    }
    if a.publishers == 0 || a.publishers > a.members {
        return Err("--publishers must be between 1 and --members".into());
    }
    let online = ((a.members as f64 * a.online).round() as usize).clamp(1, a.members);
    if online < a.publishers.max(2) {
        return Err(format!(
            "{online} of {} members online: at least the {} publisher(s) and one more member              must be online",
            a.members, a.publishers
        ));
    }
    if a.churn > 0.0 && online <= a.publishers {
        return Err(format!(
            "--churn needs an online member that does not publish to remove and add back, but              all {online} online members publish (lower --publishers, raise --online or use              --churn 0)"
        ));
    }
    Ok(online)
}

fn common(cmd: &Command) -> Option<&Common> {
    match cmd {
        Command::Pairs(a) => Some(&a.common),
        Command::Fanout(a) => Some(&a.common),
        Command::Groups(a) => Some(&a.common),
        Command::Storm(a) => Some(&a.common),
        Command::Idle(a) => Some(&a.common),
        Command::Offline(a) => Some(&a.common),
        Command::Relay(_) => None,
    }
}

fn addr(common: &Common) -> SocketAddr {
    common
        .addr
        .or_else(|| common.nodes.first().copied())
        .unwrap_or_else(|| common.system.default_addr(common.transport))
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| format!("{what} must be a non-negative number of seconds"))
}

/// Worker `index` of `count`'s plan.
fn plan(
    cmd: &Command,
    common: &Common,
    index: usize,
    count: usize,
    run_id: &str,
) -> Result<Plan, String> {
    let shape = shape(cmd, common)?;
    if !common.nodes.is_empty() && common.system != System::Parley {
        return Err("--nodes spreads clients over the nodes of a parley cluster only".into());
    }
    if !common.node_ids.is_empty() && common.node_ids.len() != common.nodes.len() {
        return Err("--node-ids names each address of --nodes, in the same order".into());
    }
    let units = shape.clients / shape.group;
    let (lo, hi) = (units * index / count, units * (index + 1) / count);
    let clients = (lo * shape.group) as u32..(hi * shape.group) as u32;
    let per_client = shape.conns as f64 / shape.clients.max(1) as f64;
    let target = addr(common);
    let sources = match common.sources {
        Some(n) if n >= 2 => worker::source_addresses(n),
        Some(_) => Vec::new(),
        None if target.ip().is_loopback() && shape.conns > CONNS_PER_SOURCE => {
            worker::source_addresses(shape.conns.div_ceil(CONNS_PER_SOURCE))
        }
        None => Vec::new(),
    };
    let scenario = match cmd {
        Command::Pairs(a) => traffic(&a.load, 2, false, shape.clients / 2, clients.len() / 2)?,
        Command::Fanout(a) if a.conversation == FanoutConversation::Group => groups(
            &a.load,
            GroupShape {
                members: shape.group as u32,
                online: shape.group as u32,
                publishers: 1,
                churn: 0.0,
            },
            a.publishers,
            hi - lo,
        )?,
        Command::Fanout(a) => traffic(&a.load, shape.group as u32, true, a.publishers, hi - lo)?,
        Command::Groups(a) => groups(
            &a.load(),
            GroupShape {
                members: a.members as u32,
                online: online_members(a)? as u32,
                publishers: a.publishers as u32,
                churn: a.churn,
            },
            a.groups,
            hi - lo,
        )?,
        Command::Storm(_) => Scenario::Storm,
        Command::Idle(a) => Scenario::Idle {
            duration: secs(a.duration, "--duration")?,
        },
        Command::Offline(a) => Scenario::Offline {
            messages: a.messages,
            window: a.window.max(1),
            body_bytes: a.body_bytes,
            timeout: secs(a.timeout, "--timeout")?,
        },
        Command::Relay(_) => return Err("relay is not a load scenario".into()),
    };
    let homes = match &scenario {
        Scenario::Traffic { group, .. } if common.split && !common.node_ids.is_empty() => {
            Some(std::sync::Arc::new(crate::driver::Homes {
                nodes: common.node_ids.clone(),
                group: *group,
            }))
        }
        _ => None,
    };
    Ok(Plan {
        scenario,
        first_conn: (clients.start as f64 * per_client) as usize,
        clients,
        sources,
        names: Names {
            prefix: format!("lg{run_id}-"),
            // With --split and --node-ids, each user is homed on the node its client connects
            // to (pairs and fan-outs: the unit's size is the scenario's group).
            homes,
        },
        addr: target,
        nodes: common.nodes.clone(),
        split: common.split,
    })
}

/// The traffic scenario for a worker with `local_senders` of `senders` senders (pairs: every
/// client sends, so both counts are per pair ×2; only the ratio matters).
fn traffic(
    load: &crate::cli::Load,
    group: u32,
    fanout: bool,
    senders: usize,
    local_senders: usize,
) -> Result<Scenario, String> {
    let rate = match load.rate {
        Some(r) if !(r.is_finite() && r > 0.0) => {
            return Err("--rate must be a positive number of messages per second".into());
        }
        Some(r) => Some(r * local_senders as f64 / senders.max(1) as f64),
        None => None,
    };
    Ok(Scenario::Traffic {
        group,
        fanout,
        window: load.window.max(1),
        rate,
        body_bytes: load.body_bytes.max(crate::body::MIN_LEN),
        warmup: secs(load.warmup, "--warmup")?,
        duration: secs(load.duration, "--duration")?,
        drain: secs(load.drain, "--drain")?,
    })
}

/// The groups of a groups scenario.
#[derive(Debug, Clone, Copy)]
struct GroupShape {
    members: u32,
    online: u32,
    publishers: u32,
    churn: f64,
}

/// The groups scenario for a worker with `local` of `groups` groups (`load.rate` is over all
/// groups).
fn groups(
    load: &crate::cli::Load,
    shape: GroupShape,
    groups: usize,
    local: usize,
) -> Result<Scenario, String> {
    let Scenario::Traffic {
        window,
        rate,
        body_bytes,
        warmup,
        duration,
        drain,
        ..
    } = traffic(load, shape.members, false, groups, local)?
    else {
        return Err("not a traffic load".into());
    };
    Ok(Scenario::Groups {
        members: shape.members,
        online: shape.online,
        publishers: shape.publishers,
        churn: shape.churn,
        window,
        rate,
        body_bytes,
        warmup,
        duration,
        drain,
    })
}

/// The broker's figures over the run.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerFigures {
    /// Its process id.
    pub pid: u32,
    /// CPU seconds it used over the measured span.
    pub cpu_s: f64,
    /// Cores it kept busy on average over that span.
    pub cores: f64,
    /// Resident memory before the clients connected, bytes.
    pub rss_before: u64,
    /// Resident memory with every client connected (idle) or at the end, bytes.
    pub rss_after: u64,
    /// (rss_after − rss_before) / connections, bytes (idle).
    pub rss_per_conn: Option<f64>,
    /// The same for anonymous memory only (heap: mapped files such as a broker's log, which the
    /// kernel may fault in meanwhile, left out), bytes (idle).
    pub anon_per_conn: Option<f64>,
    /// Delivered messages per broker CPU-second (traffic scenarios).
    pub delivered_per_cpu_s: Option<f64>,
    /// Logins per broker CPU-second (storm).
    pub logins_per_cpu_s: Option<f64>,
}

/// The final report.
#[derive(Debug, Serialize)]
pub struct FinalReport {
    /// pairs, fanout, storm, idle or offline.
    pub scenario: &'static str,
    /// The system under test.
    pub system: System,
    /// Its address.
    pub addr: String,
    /// Parley transport.
    pub transport: Transport,
    /// MQTT QoS.
    pub qos: Option<u8>,
    /// Worker processes.
    pub procs: usize,
    /// Clients.
    pub clients: usize,
    /// Connections opened.
    pub conns: u64,
    /// `closed window=W`, `open rate=R/s`, or empty.
    pub mode: String,
    /// Body bytes.
    pub body_bytes: Option<usize>,
    /// Measured seconds.
    pub measured_s: f64,
    /// Messages written.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// Messages delivered (every receiver's copy).
    pub delivered: u64,
    /// Delivered inside the measured span, per second.
    pub delivered_per_s: f64,
    /// Storm: logins per second (all connections up / wall time).
    pub logins_per_s: Option<f64>,
    /// Offline: catch-up wall time, seconds, and messages per second.
    pub sync_s: Option<f64>,
    /// Offline: messages per second through the catch-up.
    pub sync_msgs_per_s: Option<f64>,
    /// Groups (`groups`, `fanout --conversation group`): membership changes made during the
    /// run (the set-up not counted).
    pub membership_changes: Option<u64>,
    /// Groups: messages that came in sync pages (after a `Behind`, or in the final sync of
    /// every member) instead of live.
    pub synced_messages: Option<u64>,
    /// Groups: `Behind`s the members received (live push paused, caught up by sync).
    pub behind: Option<u64>,
    /// The first few violations, described (groups: which member lacks or holds which seqs).
    pub violation_samples: Vec<String>,
    /// UDP: `Send`s sent again because their ack did not come in time, and datagrams dropped
    /// unread (forged, replayed, stray).
    pub udp: Option<UdpFigures>,
    /// Errors.
    pub errors: u64,
    /// First error texts.
    pub error_samples: Vec<String>,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Whether the run passed: no error and a clean verdict.
    pub passed: bool,
    /// Send → ack latency.
    pub ack_latency: Summary,
    /// Send → deliver latency (from the intended send time).
    pub e2e_latency: Summary,
    /// TCP connect latency.
    pub connect_latency: Summary,
    /// Connected → ready latency.
    pub login_latency: Summary,
    /// Offline catch-up latency per client.
    pub sync_latency: Summary,
    /// The broker, with `--broker-pid`.
    pub broker: Option<BrokerFigures>,
}

/// What the UDP sessions had to make good.
#[derive(Debug, Serialize)]
pub struct UdpFigures {
    /// `Send`s sent again for want of a `SendAck`.
    pub resent: u64,
    /// Datagrams dropped unread.
    pub dropped: u64,
}

struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Reports from the workers, tagged with the worker's index.
type Reports = mpsc::Receiver<(usize, Report)>;

fn spawn_workers(
    count: usize,
    run_id: &str,
    has_run_id: bool,
) -> Result<(Vec<WorkerProc>, Reports), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (tx, rx) = mpsc::channel();
    let mut procs = Vec::new();
    for i in 0..count {
        let mut cmd = Process::new(&exe);
        cmd.args(&args).arg("--worker").arg(format!("{i}/{count}"));
        if !has_run_id {
            cmd.arg("--run-id").arg(run_id);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker {i}: {e}"))?;
        let stdout = child.stdout.take().ok_or("worker has no stdout")?;
        let stdin = child.stdin.take();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Report>(&line) {
                    Ok(r) => {
                        if tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ =
                            tx.send((i, Report::Fatal(format!("bad worker output ({e}): {line}"))));
                    }
                }
            }
            let _ = tx.send((i, Report::Fatal("worker exited".into())));
        });
        procs.push(WorkerProc { child, stdin });
    }
    Ok((procs, rx))
}

fn kill_all(procs: &mut [WorkerProc]) {
    for p in procs {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}

fn sample(pid: Option<u32>) -> Result<Option<Sample>, String> {
    pid.map(procstat::sample).transpose()
}

fn random_run_id() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Runs the command: a worker if `--worker` is set, else the orchestrator. Returns the exit code.
pub fn main(cmd: Command) -> i32 {
    let Some(common) = common(&cmd) else {
        return 2;
    };
    let run_id = common.run_id.clone().unwrap_or_else(random_run_id);
    if let Some(w) = &common.worker {
        let parsed = w
            .split_once('/')
            .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)));
        let Some((i, k)) = parsed.filter(|&(i, k)| i < k) else {
            eprintln!("loadgen: bad --worker {w}");
            return 2;
        };
        return match plan(&cmd, common, i, k, &run_id) {
            Ok(p) => worker::run(common, p),
            Err(e) => {
                eprintln!("loadgen: {e}");
                2
            }
        };
    }
    match orchestrate(&cmd, common, &run_id) {
        Ok(report) => {
            print_report(&report, common.json);
            if report.passed { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            2
        }
    }
}

fn orchestrate(cmd: &Command, common: &Common, run_id: &str) -> Result<FinalReport, String> {
    let shape = shape(cmd, common)?;
    // Validate the plan here, where errors can still be told plainly.
    let first = plan(cmd, common, 0, common.procs.max(1), run_id)?;
    let procs = common
        .procs
        .clamp(1, shape.clients.max(1) / shape.group.max(1))
        .max(1);
    let pid = common.broker_pid;
    let before = sample(pid)?;
    eprintln!(
        "loadgen: {} against {:?} at {}: {} clients, {} connections, {} process(es), run id {run_id}{}",
        shape.name,
        common.system,
        if first.nodes.is_empty() {
            first.addr.to_string()
        } else {
            first
                .nodes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        },
        shape.clients,
        shape.conns,
        procs,
        if first.sources.is_empty() {
            String::new()
        } else {
            format!(", {} source addresses", first.sources.len())
        }
    );
    let (mut workers, rx) = spawn_workers(procs, run_id, common.run_id.is_some())?;
    let result = drive(cmd, common, &shape, &mut workers, &rx, before);
    if result.is_err() {
        kill_all(&mut workers);
    } else {
        for w in &mut workers {
            let _ = w.child.wait();
        }
    }
    result
}

#[allow(clippy::too_many_lines)]
fn drive(
    cmd: &Command,
    common: &Common,
    shape: &Shape,
    workers: &mut [WorkerProc],
    rx: &mpsc::Receiver<(usize, Report)>,
    before: Option<Sample>,
) -> Result<FinalReport, String> {
    let n = workers.len();
    let pid = common.broker_pid;
    // 1. Every worker sets up.
    let mut ready = vec![false; n];
    let mut progress = vec![Progress::default(); n];
    let setup_started = Instant::now();
    let mut last_line = Instant::now();
    while !ready.iter().all(|&r| r) {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok((i, Report::Ready { .. })) => ready[i] = true,
            Ok((i, Report::Progress(p))) => progress[i] = p,
            Ok((i, Report::Fatal(e))) => return Err(format!("worker {i}: {e}")),
            Ok((i, Report::Done(_))) => return Err(format!("worker {i} finished before go")),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("workers went away".into()),
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            eprintln!(
                "[setup {:>4.0}s] {}/{} workers ready",
                setup_started.elapsed().as_secs_f64(),
                ready.iter().filter(|&&r| r).count(),
                n
            );
        }
    }
    let is_idle = matches!(cmd, Command::Idle(_));
    if is_idle {
        // Let the broker settle (buffers released after login) before reading its memory.
        std::thread::sleep(Duration::from_secs(2));
    }
    let at_ready = sample(pid)?;
    // 2. Go.
    for w in workers.iter_mut() {
        if let Some(stdin) = w.stdin.as_mut() {
            writeln!(stdin, "go").map_err(|e| format!("cannot start a worker: {e}"))?;
            let _ = stdin.flush();
        }
    }
    let go = Instant::now();
    let (measure_from, measure_for) = match cmd {
        Command::Pairs(a) => (a.load.warmup, a.load.duration),
        Command::Fanout(a) => (a.load.warmup, a.load.duration),
        Command::Groups(a) => (a.warmup, a.duration),
        Command::Idle(a) => (0.0, a.duration),
        _ => (0.0, f64::INFINITY),
    };
    let mut s_start = if measure_from == 0.0 { at_ready } else { None };
    let mut s_end = None;
    let mut done: Vec<Option<Tally>> = vec![None; n];
    let mut last_line = Instant::now();
    while done.iter().any(Option::is_none) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, Report::Progress(p))) => progress[i] = p,
            Ok((i, Report::Done(t))) => {
                done[i] = Some(*t);
                if let Some(w) = workers.get_mut(i) {
                    w.stdin = None;
                }
            }
            Ok((i, Report::Fatal(e))) => {
                if done[i].is_none() {
                    return Err(format!("worker {i}: {e}"));
                }
            }
            Ok((_, Report::Ready { .. })) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("workers went away".into()),
        }
        let t = go.elapsed().as_secs_f64();
        if s_start.is_none() && t >= measure_from {
            s_start = sample(pid)?;
        }
        if s_end.is_none() && t >= measure_from + measure_for {
            s_end = sample(pid)?;
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            let p = progress.iter().fold(Progress::default(), |mut a, p| {
                a.ready += p.ready;
                a.sent += p.sent;
                a.acked += p.acked;
                a.delivered += p.delivered;
                a.errors += p.errors;
                a.p99_us = a.p99_us.max(p.p99_us);
                a
            });
            eprintln!(
                "[{t:>5.0}s] ready {:>7}  sent {:>11}  acked {:>11}  delivered {:>11}  errors {:>5}  p99 {:>9.0} µs",
                p.ready, p.sent, p.acked, p.delivered, p.errors, p.p99_us
            );
        }
    }
    if s_end.is_none() {
        s_end = sample(pid)?;
    }
    let mut tally = Tally::default();
    for t in done.iter().flatten() {
        tally.merge(t);
    }
    Ok(build_report(
        cmd, common, shape, n, tally, before, at_ready, s_start, s_end,
    ))
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    cmd: &Command,
    common: &Common,
    shape: &Shape,
    procs: usize,
    tally: Tally,
    before: Option<Sample>,
    at_ready: Option<Sample>,
    s_start: Option<Sample>,
    s_end: Option<Sample>,
) -> FinalReport {
    let (mode, body_bytes, measured_s) = match cmd {
        Command::Pairs(a) => load_mode(&a.load),
        Command::Fanout(a) => load_mode(&a.load),
        Command::Groups(a) => {
            let (mode, body, measured) = load_mode(&a.load());
            let mode = match a.rate {
                Some(r) => format!("open rate={r}/s per group"),
                None => mode,
            };
            let online = online_members(a).unwrap_or(0);
            (
                format!(
                    "{} groups × {} members ({online} online, {} publishing), churn {}/s per group, {mode}",
                    a.groups, a.members, a.publishers, a.churn
                ),
                body,
                measured,
            )
        }
        Command::Offline(a) => (format!("window={}", a.window), Some(a.body_bytes), 0.0),
        Command::Idle(a) => (String::new(), None, a.duration),
        _ => (String::new(), None, 0.0),
    };
    let phase_s = tally.phase_ns as f64 / 1e9;
    let delivered_per_s = if measured_s > 0.0 {
        tally.delivered_measured as f64 / measured_s
    } else {
        0.0
    };
    let is_storm = matches!(cmd, Command::Storm(_));
    let is_offline = matches!(cmd, Command::Offline(_));
    let is_traffic = matches!(
        cmd,
        Command::Pairs(_) | Command::Fanout(_) | Command::Groups(_)
    );
    let is_groups = matches!(cmd, Command::Groups(_))
        || matches!(cmd, Command::Fanout(a) if a.conversation == FanoutConversation::Group);
    let logins_per_s = (is_storm && phase_s > 0.0).then(|| tally.conns as f64 / phase_s);
    let broker = match (common.broker_pid, s_start, s_end) {
        (Some(pid), Some(a), Some(b)) => {
            let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
            let span = if measured_s > 0.0 {
                measured_s
            } else {
                phase_s
            };
            let rss_before = before.map(|s| s.rss_bytes).unwrap_or(0);
            let rss_after = at_ready.map(|s| s.rss_bytes).unwrap_or(b.rss_bytes);
            let per_cpu = |n: f64| (cpu_s > 0.0).then(|| n / cpu_s);
            Some(BrokerFigures {
                pid,
                cpu_s,
                cores: if span > 0.0 { cpu_s / span } else { 0.0 },
                rss_before,
                rss_after,
                rss_per_conn: matches!(cmd, Command::Idle(_))
                    .then(|| (rss_after as f64 - rss_before as f64) / tally.conns.max(1) as f64),
                anon_per_conn: match (before, at_ready) {
                    (Some(x), Some(y)) if matches!(cmd, Command::Idle(_)) && x.anon_bytes > 0 => {
                        Some(
                            (y.anon_bytes as f64 - x.anon_bytes as f64) / tally.conns.max(1) as f64,
                        )
                    }
                    _ => None,
                },
                delivered_per_cpu_s: if is_traffic {
                    per_cpu(tally.delivered_measured as f64)
                } else if is_offline {
                    per_cpu(tally.synced_messages as f64)
                } else {
                    None
                },
                logins_per_cpu_s: if is_storm {
                    per_cpu(tally.conns as f64)
                } else {
                    None
                },
            })
        }
        _ => None,
    };
    let passed = tally.errors == 0 && tally.verdict.passed();
    FinalReport {
        scenario: shape.name,
        system: common.system,
        addr: addr(common).to_string(),
        transport: common.transport,
        qos: (common.system == System::Mqtt).then_some(common.qos),
        procs,
        clients: shape.clients,
        conns: tally.conns,
        mode,
        body_bytes,
        measured_s: if measured_s > 0.0 {
            measured_s
        } else {
            phase_s
        },
        sent: tally.sent,
        acked: tally.acked,
        delivered: tally.delivered,
        delivered_per_s,
        logins_per_s,
        sync_s: is_offline.then_some(phase_s),
        sync_msgs_per_s: (is_offline && phase_s > 0.0)
            .then(|| tally.synced_messages as f64 / phase_s),
        membership_changes: is_groups.then_some(tally.membership_changes),
        synced_messages: is_groups.then_some(tally.synced_messages),
        behind: is_groups.then_some(tally.behind),
        violation_samples: tally.violation_samples.clone(),
        udp: (common.system == System::Parley && common.transport == Transport::Udp).then_some(
            UdpFigures {
                resent: tally.udp_resent,
                dropped: tally.udp_dropped,
            },
        ),
        errors: tally.errors,
        error_samples: tally.error_samples.clone(),
        verdict: tally.verdict,
        passed,
        ack_latency: tally.ack.summary(),
        e2e_latency: tally.e2e.summary(),
        connect_latency: tally.connect.summary(),
        login_latency: tally.login.summary(),
        sync_latency: tally.sync.summary(),
        broker,
    }
}

fn load_mode(load: &crate::cli::Load) -> (String, Option<usize>, f64) {
    let mode = match load.rate {
        Some(r) => format!("open rate={r}/s"),
        None => format!("closed window={}", load.window),
    };
    (
        mode,
        Some(load.body_bytes.max(crate::body::MIN_LEN)),
        load.duration,
    )
}

fn print_report(r: &FinalReport, json: bool) {
    // Failures first, whatever the format.
    if !r.passed {
        eprintln!("FAILED");
        if r.errors > 0 {
            eprintln!("  errors: {}", r.errors);
            for e in &r.error_samples {
                eprintln!("    {e}");
            }
        }
        for (name, n) in r.verdict.failures() {
            eprintln!("  {name}: {n}");
        }
        for v in &r.violation_samples {
            eprintln!("    {v}");
        }
    }
    if json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("loadgen: cannot print the report: {e}"),
        }
        return;
    }
    let mut out = String::new();
    let system = match r.qos {
        Some(q) => format!("{:?} qos{q}", r.system).to_lowercase(),
        None if r.system == System::Parley => format!("parley/{:?}", r.transport).to_lowercase(),
        None => format!("{:?}", r.system).to_lowercase(),
    };
    out.push_str(&format!(
        "\n{} · {} at {} · {} clients, {} connections, {} process(es){}\n",
        r.scenario,
        system,
        r.addr,
        r.clients,
        r.conns,
        r.procs,
        if r.mode.is_empty() {
            String::new()
        } else {
            format!(" · {}", r.mode)
        }
    ));
    out.push_str(&format!(
        "  verdict       {}\n",
        if r.passed { "PASSED" } else { "FAILED" }
    ));
    let v = &r.verdict;
    out.push_str(&format!(
        "  checked       lost {}  duplicated {}  out-of-order {}  corrupt {}  gaps {}{}  (redelivered {}{})\n",
        v.lost,
        v.duplicated,
        v.out_of_order,
        v.corrupt,
        v.gaps,
        if r.membership_changes.is_some() {
            format!(
                "  outside-window {}  misplaced {}",
                v.outside_window, v.misplaced
            )
        } else {
            String::new()
        },
        v.redelivered,
        if v.dropped > 0 {
            format!(", dropped for slow receivers as the system said {}", v.dropped)
        } else {
            String::new()
        }
    ));
    if r.sent > 0 || r.delivered > 0 {
        out.push_str(&format!(
            "  messages      sent {}  acked {}  delivered {}  errors {}\n",
            r.sent, r.acked, r.delivered, r.errors
        ));
    } else {
        out.push_str(&format!("  errors        {}\n", r.errors));
    }
    if let (Some(c), Some(s), Some(b)) = (r.membership_changes, r.synced_messages, r.behind) {
        out.push_str(&format!(
            "  groups        membership changes {c}  behind {b}  messages by sync {s} (not live)\n"
        ));
    }
    if let Some(u) = &r.udp {
        out.push_str(&format!(
            "  udp           sends resent {}  datagrams dropped {}\n",
            u.resent, u.dropped
        ));
    }
    if r.delivered_per_s > 0.0 {
        out.push_str(&format!(
            "  throughput    {:.0} delivered msgs/s over {} s\n",
            r.delivered_per_s, r.measured_s
        ));
    }
    if let Some(l) = r.logins_per_s {
        out.push_str(&format!(
            "  storm         {l:.0} logins/s ({} in {:.2} s)\n",
            r.conns, r.measured_s
        ));
    }
    if let (Some(s), Some(m)) = (r.sync_s, r.sync_msgs_per_s) {
        out.push_str(&format!(
            "  offline sync  {s:.3} s for all receivers, {m:.0} msgs/s\n"
        ));
    }
    let row = |name: &str, s: &Summary| {
        format!(
            "  {name:<13} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  p99.9 {:>9.1}  max {:>9.1} µs  (n={})\n",
            s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us, s.count
        )
    };
    for (name, s) in [
        ("send→ack", &r.ack_latency),
        ("send→deliver", &r.e2e_latency),
        ("connect", &r.connect_latency),
        ("login", &r.login_latency),
        ("sync", &r.sync_latency),
    ] {
        if s.count > 0 {
            out.push_str(&row(name, s));
        }
    }
    if let Some(b) = &r.broker {
        out.push_str(&format!(
            "  broker        pid {}  cpu {:.2} s ({:.2} cores)  rss {:.1} → {:.1} MiB",
            b.pid,
            b.cpu_s,
            b.cores,
            b.rss_before as f64 / 1048576.0,
            b.rss_after as f64 / 1048576.0
        ));
        if let Some(p) = b.rss_per_conn {
            out.push_str(&format!("  {p:.0} B/conn"));
        }
        if let Some(p) = b.anon_per_conn {
            out.push_str(&format!(" ({p:.0} B/conn anonymous)"));
        }
        if let Some(d) = b.delivered_per_cpu_s {
            out.push_str(&format!("  {d:.0} delivered/cpu-s"));
        }
        if let Some(d) = b.logins_per_cpu_s {
            out.push_str(&format!("  {d:.0} logins/cpu-s"));
        }
        out.push('\n');
    }
    print!("{out}");
}
