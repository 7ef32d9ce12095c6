//! `broker serve`: run a node until SIGINT or SIGTERM; SIGHUP reloads the TLS certificate.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use parley_broker::config::Config;
use parley_broker::{Broker, Handle, TlsError};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{CliError, ConfigArgs, DurabilityArg, SettingFlags, load_config, load_secret};

/// Flags of `broker serve`.
#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Where the configuration comes from.
    #[command(flatten)]
    pub(super) config: ConfigArgs,
    /// TCP listening address, e.g. 127.0.0.1:7400 (port 0: any free port), or `none` to disable
    /// (shorthand for --set listen.tcp=ADDR).
    #[arg(long, value_name = "ADDR|none", value_parser = parse_listener)]
    tcp: Option<Listener>,
    /// WebSocket listening address, e.g. 127.0.0.1:7401, or `none` to disable
    /// (shorthand for --set listen.ws=ADDR).
    #[arg(long, value_name = "ADDR|none", value_parser = parse_listener)]
    ws: Option<Listener>,
    /// Admin HTTP listening address (/healthz, /readyz, /metrics), e.g. 127.0.0.1:7402, or `none`
    /// to disable (shorthand for --set admin.listen=ADDR).
    #[arg(long, value_name = "ADDR|none", value_parser = parse_listener)]
    admin: Option<Listener>,
    /// Disable the TCP listener (same as --tcp none).
    #[arg(long, conflicts_with = "tcp")]
    no_tcp: bool,
    /// Disable the WebSocket listener (same as --ws none).
    #[arg(long, conflicts_with = "ws")]
    no_ws: bool,
    /// Number of shard threads, 0 for one per core (shorthand for --set shards=N).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// When a message counts as stored (shorthand for --set storage.durability=...).
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// Join the cluster on this Redis, e.g. redis://127.0.0.1:6379 (shorthand for --set
    /// cluster.redis=URL).
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's id in the cluster; default: the node's name (shorthand for --set
    /// cluster.node_id=ID).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// The address other nodes will reach this node at, HOST:PORT (shorthand for --set
    /// cluster.advertise=ADDR).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Where this node accepts links from the other nodes, IP:PORT (shorthand for --set
    /// cluster.listen=ADDR).
    #[arg(long, value_name = "ADDR")]
    cluster_listen: Option<String>,
    /// The cluster's nodes, by node id, comma-separated, the same on every node (shorthand for
    /// --set cluster.nodes=[...]): conversations and users are placed over them and messages
    /// cross nodes.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    cluster_nodes: Vec<String>,
}

/// `--tcp` / `--ws`: an address to listen on, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// Listen here.
    At(SocketAddr),
    /// Do not listen.
    Disabled,
}

/// Reads `--tcp` / `--ws`: `none` (or `off`) disables the listener, anything else must be a
/// socket address.
fn parse_listener(s: &str) -> Result<Listener, String> {
    match s.trim() {
        "none" | "off" => Ok(Listener::Disabled),
        t => t.parse().map(Listener::At).map_err(|_| {
            "expected IP:PORT (e.g. 127.0.0.1:7400, [::1]:7400, port 0 for any) or `none`"
                .to_owned()
        }),
    }
}

impl ServeArgs {
    /// Loads the configuration these flags ask for, listeners disabled as asked.
    fn load(&self) -> Result<Config, CliError> {
        let at = |l: Option<Listener>| match l {
            Some(Listener::At(a)) => Some(a),
            _ => None,
        };
        let mut settings = super::settings_from_flags(&SettingFlags {
            data_dir: self.config.data_dir.as_deref(),
            tcp: at(self.tcp),
            ws: at(self.ws),
            shards: self.shards,
            durability: self.durability,
            set: &self.config.set,
        });
        let quoted = |s: &str| toml::Value::String(s.to_owned()).to_string();
        for (key, value) in [
            ("cluster.redis", &self.cluster),
            ("cluster.node_id", &self.node_id),
            ("cluster.advertise", &self.advertise),
            ("cluster.listen", &self.cluster_listen),
        ] {
            if let Some(v) = value {
                settings.push(format!("{key}={}", quoted(v)));
            }
        }
        if !self.cluster_nodes.is_empty() {
            let list: Vec<String> = self.cluster_nodes.iter().map(|n| quoted(n)).collect();
            settings.push(format!("cluster.nodes=[{}]", list.join(",")));
        }
        let mut config = load_config(self.config.config.as_deref(), &settings)?;
        if self.no_tcp || self.tcp == Some(Listener::Disabled) {
            config.listen.tcp = None;
        }
        if self.no_ws || self.ws == Some(Listener::Disabled) {
            config.listen.ws = None;
        }
        match self.admin {
            Some(Listener::At(a)) => config.admin.listen = Some(a),
            Some(Listener::Disabled) => config.admin.listen = None,
            None => {}
        }
        config
            .validate()
            .map_err(|e| CliError::new(format!("configuration: {e}")))?;
        Ok(config)
    }
}

/// The line `broker serve` prints on stdout once it listens: integration tests and scripts read
/// the actual (ephemeral) ports from it.
fn listening_line(node: &Handle) -> String {
    listening_line_of(&[
        ("tcp", node.tcp_addr()),
        ("ws", node.ws_addr()),
        ("tls", node.tls_addr()),
        ("wss", node.wss_addr()),
        ("udp", node.udp_addr()),
        ("admin", node.admin_addr()),
    ])
}

/// The listening line for these (name, address) pairs, the disabled ones left out.
fn listening_line_of(listeners: &[(&str, Option<SocketAddr>)]) -> String {
    let mut line = String::from("parley listening");
    for &(name, addr) in listeners {
        if let Some(a) = addr {
            line.push_str(&format!(" {name}={a}"));
        }
    }
    line
}

/// Runs `broker serve`.
pub(super) fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
    let config = args.load()?;
    let rust_log = std::env::var(super::log::RUST_LOG).ok();
    let filter = super::log::filter(&config.log.level, rust_log.as_deref())
        .map_err(|e| CliError::new(format!("configuration: {e}")))?;
    super::log::install(&config.log, filter);
    // The start-up banner is plain text, not log events (see `cli/log.rs`).
    eprintln!("parley: effective configuration (secrets redacted):");
    eprintln!("{}", config.display_redacted().trim_end());
    let secret = load_secret(&config)?;
    let node_name = config.node.clone();
    let shards = config.shard_count();
    let node = Broker::new(config)
        .secret(secret)
        .start()
        .map_err(|e| CliError::new(format!("cannot start the node: {e}")))?;

    // Plain stderr, not log events: scripts and tests read these lines (bench/restart.sh greps
    // `ready in`; tests/abuse.rs looks for `max_connections` and the lowered value), so their
    // text and stream stay the same whatever `log.format` says.
    let report = node.startup_report();
    eprintln!(
        "parley: ready in {} ms (logs opened in {} ms, state rebuilt in {} ms)",
        report.ready_ms, report.logs_opened_ms, report.rebuilt_ms
    );
    if let Some(l) = report.max_connections_lowered {
        eprintln!(
            "parley: limits.max_connections {} lowered to {}: the open-file limit is {}, and {} \
             descriptors are kept for the node's own files",
            l.configured,
            l.effective,
            l.open_files,
            l.open_files.saturating_sub(l.effective as u64),
        );
    }

    // The handlers must be in place before the `listening` line: whoever reads it may send
    // SIGTERM (or SIGHUP) at once.
    if let Err(e) = watch_signals(node.clone()) {
        node.shutdown();
        let joined = node.join();
        let mut message = format!("cannot install the signal handlers: {e}");
        if let Err(e) = joined {
            message.push_str(&format!("; the node then failed to stop cleanly: {e}"));
        }
        return Err(CliError::new(message));
    }

    let line = listening_line(&node);
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        // Whoever started us stopped reading; the node serves on regardless.
        tracing::warn!("cannot write to stdout ({e}); {line}");
    }
    drop(stdout);
    tracing::info!(
        "node {node_name} running with {shards} shard(s); Ctrl-C or SIGTERM stops it, SIGHUP \
         reloads the TLS certificate"
    );

    node.join()
        .map_err(|e| CliError::new(format!("the node stopped with an error: {e}")))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Starts the thread that handles the process's signals: SIGINT and SIGTERM stop the node
/// gracefully (a second one exits at once, status 130); SIGHUP reloads the TLS certificate
/// (a failed reload keeps the old one and says why).
fn watch_signals(node: Handle) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("parley-signals".into())
        .spawn(move || {
            let mut asked = false;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    reload(&node);
                    continue;
                }
                if asked {
                    tracing::warn!("second signal, exiting without waiting for the shutdown");
                    std::process::exit(130);
                }
                asked = true;
                tracing::info!("shutting down (signal again to force)");
                node.shutdown();
            }
        })?;
    Ok(())
}

/// SIGHUP: reloads the TLS certificate and says how it went.
fn reload(node: &Handle) {
    match node.reload_tls() {
        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded; new connections use it"),
        Err(TlsError::NotEnabled) => tracing::info!("SIGHUP: TLS is off, nothing to reload"),
        Err(e) => tracing::warn!("SIGHUP: TLS reload failed, the old certificate stays: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_names_only_enabled_listeners() {
        let tcp = SocketAddr::from(([127, 0, 0, 1], 40001));
        let ws = SocketAddr::from(([127, 0, 0, 1], 40002));
        assert_eq!(
            listening_line_of(&[("tcp", Some(tcp)), ("ws", Some(ws)), ("admin", None)]),
            "parley listening tcp=127.0.0.1:40001 ws=127.0.0.1:40002"
        );
        assert_eq!(
            listening_line_of(&[("tcp", None), ("ws", Some(ws)), ("tls", None)]),
            "parley listening ws=127.0.0.1:40002"
        );
        assert_eq!(
            listening_line_of(&[("tcp", Some(tcp)), ("tls", Some(ws))]),
            "parley listening tcp=127.0.0.1:40001 tls=127.0.0.1:40002"
        );
    }

    #[test]
    fn listener_flag_accepts_addresses_and_none() {
        assert_eq!(parse_listener("none"), Ok(Listener::Disabled));
        assert_eq!(
            parse_listener("127.0.0.1:0"),
            Ok(Listener::At(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert!(parse_listener("localhost").is_err());
    }

    fn parse(args: &[&str]) -> ServeArgs {
        use clap::Parser as _;
        let cli =
            super::super::Cli::try_parse_from(["broker", "serve"].iter().chain(args).copied())
                .expect("parses");
        match cli.command {
            super::super::Command::Serve(a) => a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn disabling_a_listener_unsets_it_after_the_other_layers() {
        let c = parse(&["--ws", "none", "--set", "listen.ws=127.0.0.1:9"])
            .load()
            .expect("valid");
        assert_eq!(c.listen.ws, None);
        assert!(c.listen.tcp.is_some());
        let c = parse(&["--no-tcp", "--ws", "127.0.0.1:0"])
            .load()
            .expect("valid");
        assert_eq!(c.listen.tcp, None);
        assert_eq!(c.listen.ws, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    }

    #[test]
    fn admin_flag_sets_or_disables_the_admin_listener() {
        let c = parse(&["--admin", "none"]).load().expect("valid");
        assert_eq!(c.admin.listen, None);
        let c = parse(&["--admin", "127.0.0.1:0"]).load().expect("valid");
        assert_eq!(c.admin.listen, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    }

    #[test]
    fn cluster_flags_set_the_cluster_section() {
        let c = parse(&["--cluster", "redis://127.0.0.1:6379", "--node-id", "n2"])
            .load()
            .expect("valid");
        assert_eq!(c.cluster.redis.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.cluster.node_id.as_deref(), Some("n2"));
        assert_eq!(c.cluster.advertise, None);
        let c = parse(&["--advertise", "10.0.0.2:7400"])
            .load()
            .expect("valid");
        assert_eq!(c.cluster.advertise.as_deref(), Some("10.0.0.2:7400"));
        assert_eq!(c.cluster.redis, None);
        let c = parse(&[
            "--cluster",
            "redis://127.0.0.1:6379",
            "--node-id",
            "n2",
            "--cluster-listen",
            "127.0.0.1:0",
            "--cluster-nodes",
            "n1,n2,n3",
        ])
        .load()
        .expect("nodes");
        assert_eq!(c.cluster.nodes, ["n1", "n2", "n3"]);
        let e = parse(&["--cluster", "http://x"])
            .load()
            .expect_err("invalid");
        assert!(e.to_string().contains("cluster.redis"), "{e}");
    }

    #[test]
    fn disabling_both_listeners_is_an_error() {
        let e = parse(&["--no-tcp", "--no-ws"]).load().expect_err("invalid");
        assert!(
            e.to_string()
                .contains("at least one of tcp, ws, tls, wss and udp"),
            "{e}"
        );
    }
}
