//! The command line of the `broker` binary: `serve`, `token`, `chat`, `stats` and `devcert`.
//!
//! Every command that needs the configuration loads it the same way: defaults, then `--config
//! FILE`, then `PARLEY_*` environment variables, then `--set key=value` flags and the named flags
//! (`--data-dir`, and for `serve` `--tcp`, `--ws`, `--shards`, `--durability`), which are
//! shorthands for `--set` keys and applied after them. Human-readable messages go to stderr;
//! stdout carries only what a script reads (the `listening` line, a token, chat messages).

mod chat;
mod devcert;
mod log;
mod serve;
mod stats;
mod token;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use parley_broker::config::{Config, ENV_PREFIX};
use parley_broker::secret::{self, SecretSource};

/// The `broker` command line.
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about = "parley: a raw-socket instant-messaging broker",
    propagate_version = true
)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM (SIGHUP reloads the TLS certificate).
    ///
    /// Prints the effective configuration to stderr, then one line to stdout:
    /// `parley listening tcp=ADDR ws=ADDR tls=ADDR wss=ADDR udp=ADDR admin=ADDR` (a disabled one is
    /// left out).
    Serve(serve::ServeArgs),
    /// Print a signed token for a user and device, for clients to log in with.
    ///
    /// Uses the node's secret (generating it if the data dir has none yet).
    Token(token::TokenArgs),
    /// Chat with another user from the terminal, over TCP.
    ///
    /// Each line typed is sent to --to; messages received are printed as
    /// `[seq N] from: text`. Ctrl-D quits.
    Chat(chat::ChatArgs),
    /// Watch a running node: connections and rates, refreshed every second from its admin
    /// listener's /metrics (--once: print one snapshot and exit).
    Stats(stats::StatsArgs),
    /// Write a self-signed certificate and key for localhost (development only) and print the
    /// settings that turn TLS on with them.
    Devcert(devcert::DevcertArgs),
}

/// Where the configuration comes from: the flags every command that reads it shares.
#[derive(Debug, Clone, Default, Args)]
struct ConfigArgs {
    /// TOML configuration file (same shape as the defaults printed by `broker serve`).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Data directory for the logs and the secret (shorthand for --set data_dir=DIR).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Set any configuration key, e.g. --set limits.max_page=100 (repeatable). Values are read as
    /// TOML (64, true, "text"); a bare word is a string.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// `--durability`: the values of `storage.durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DurabilityArg {
    /// Acknowledge after the flush that covers the message (survives power loss).
    Always,
    /// Flush every storage.flush_interval_ms; acknowledge at once.
    Interval,
    /// Never flush explicitly; acknowledge at once.
    Never,
}

impl DurabilityArg {
    /// The configuration value's name.
    fn as_str(self) -> &'static str {
        match self {
            DurabilityArg::Always => "always",
            DurabilityArg::Interval => "interval",
            DurabilityArg::Never => "never",
        }
    }
}

/// The flags that become configuration settings, as [`settings_from_flags`] reads them.
#[derive(Debug, Default, Clone, Copy)]
struct SettingFlags<'a> {
    /// `--data-dir`.
    data_dir: Option<&'a str>,
    /// `--tcp ADDR`.
    tcp: Option<SocketAddr>,
    /// `--ws ADDR`.
    ws: Option<SocketAddr>,
    /// `--shards N`.
    shards: Option<usize>,
    /// `--durability`.
    durability: Option<DurabilityArg>,
    /// `--set key=value`, in order.
    set: &'a [String],
}

/// The `key=value` settings the flags stand for, in the order they apply: every `--set` first,
/// then the named flags (so `--data-dir` beats `--set data_dir=...`). String values are written
/// as quoted TOML strings, so a data dir named `123` or holding quotes stays a string.
fn settings_from_flags(flags: &SettingFlags<'_>) -> Vec<String> {
    let quoted = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = flags.set.to_vec();
    if let Some(dir) = flags.data_dir {
        out.push(format!("data_dir={}", quoted(dir)));
    }
    if let Some(addr) = flags.tcp {
        out.push(format!("listen.tcp={}", quoted(&addr.to_string())));
    }
    if let Some(addr) = flags.ws {
        out.push(format!("listen.ws={}", quoted(&addr.to_string())));
    }
    if let Some(n) = flags.shards {
        out.push(format!("shards={n}"));
    }
    if let Some(d) = flags.durability {
        out.push(format!("storage.durability={}", quoted(d.as_str())));
    }
    out
}

/// A command failed; the message says why, for a person.
#[derive(Debug)]
struct CliError(String);

impl CliError {
    /// An error with this message.
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The environment as `(name, value)` pairs for [`Config::load`]. A `PARLEY_*` variable that is
/// not UTF-8 is an error (it could not mean anything); other variables are not looked at.
fn env_vars() -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| CliError::new(format!("environment variable {name} is not UTF-8")))?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Loads the configuration: defaults, `file`, the `PARLEY_*` environment, then `settings`.
fn load_config(file: Option<&Path>, settings: &[String]) -> Result<Config, CliError> {
    let env = env_vars()?;
    for name in Config::foreign_env(env.iter().map(|(k, _)| k.as_str())) {
        eprintln!("note: {name} names no setting; it is left alone");
    }
    Config::load(file, env, settings).map_err(|e| CliError::new(format!("configuration: {e}")))
}

/// Loads the configuration from the shared flags alone (for `token` and `chat`).
fn load_config_from(args: &ConfigArgs) -> Result<Config, CliError> {
    let settings = settings_from_flags(&SettingFlags {
        data_dir: args.data_dir.as_deref(),
        set: &args.set,
        ..SettingFlags::default()
    });
    load_config(args.config.as_deref(), &settings)
}

/// The token secret for `config` (see [`secret::load_or_generate`]); says on stderr if a new
/// one was generated. Never prints the secret.
fn load_secret(config: &Config) -> Result<Vec<u8>, CliError> {
    let (secret, source) = secret::load_or_generate(config)
        .map_err(|e| CliError::new(format!("token secret: {e}")))?;
    if let SecretSource::Generated(path) = &source {
        eprintln!(
            "generated a new token secret in {} (mint tokens with: broker token --user U --device D)",
            path.display()
        );
    }
    Ok(secret)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the command line and returns the process's exit code.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Token(args) => token::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Devcert(args) => devcert::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("broker: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(settings: &[String]) -> Config {
        Config::load(None, Vec::new(), settings).expect("valid configuration")
    }

    #[test]
    fn no_flags_no_settings() {
        assert!(settings_from_flags(&SettingFlags::default()).is_empty());
    }

    #[test]
    fn named_flags_map_to_their_keys() {
        let settings = settings_from_flags(&SettingFlags {
            data_dir: Some("/srv/parley"),
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 9000))),
            ws: Some("[::1]:9001".parse().expect("addr")),
            shards: Some(3),
            durability: Some(DurabilityArg::Interval),
            set: &[],
        });
        assert_eq!(
            settings,
            [
                r#"data_dir="/srv/parley""#,
                r#"listen.tcp="0.0.0.0:9000""#,
                r#"listen.ws="[::1]:9001""#,
                "shards=3",
                r#"storage.durability="interval""#,
            ]
        );
        let c = load(&settings);
        assert_eq!(c.data_dir, Path::new("/srv/parley"));
        assert_eq!(c.listen.tcp, Some(SocketAddr::from(([0, 0, 0, 0], 9000))));
        assert_eq!(c.listen.ws, "[::1]:9001".parse().ok());
        assert_eq!(c.shards, 3);
        assert_eq!(
            c.storage.durability,
            parley_broker::config::DurabilityPolicy::Interval
        );
    }

    #[test]
    fn every_durability_value_is_a_valid_setting() {
        for d in [
            DurabilityArg::Always,
            DurabilityArg::Interval,
            DurabilityArg::Never,
        ] {
            let settings = settings_from_flags(&SettingFlags {
                durability: Some(d),
                ..SettingFlags::default()
            });
            let c = load(&settings);
            let shown = toml::Value::try_from(c.storage.durability).expect("serializes");
            assert_eq!(shown.as_str(), Some(d.as_str()));
        }
    }

    #[test]
    fn set_comes_first_so_named_flags_win() {
        let set = vec!["shards=2".to_owned(), "data_dir=/a".to_owned()];
        let settings = settings_from_flags(&SettingFlags {
            data_dir: Some("/b"),
            set: &set,
            ..SettingFlags::default()
        });
        assert_eq!(settings, ["shards=2", "data_dir=/a", r#"data_dir="/b""#]);
        let c = load(&settings);
        assert_eq!(c.data_dir, Path::new("/b"));
        assert_eq!(c.shards, 2);
    }

    #[test]
    fn data_dir_stays_a_string_whatever_it_looks_like() {
        for dir in [
            "123",
            "true",
            "a \"quoted\" dir",
            r"C:\data",
            "[1, 2]",
            " spaced ",
        ] {
            let settings = settings_from_flags(&SettingFlags {
                data_dir: Some(dir),
                ..SettingFlags::default()
            });
            assert_eq!(load(&settings).data_dir, Path::new(dir), "{dir}");
        }
    }

    #[test]
    fn command_line_parses() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "broker",
            "serve",
            "--data-dir",
            "/d",
            "--tcp",
            "127.0.0.1:0",
            "--ws",
            "none",
            "--set",
            "node=n2",
            "--set",
            "limits.max_page=9",
            "--durability",
            "never",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.config.data_dir.as_deref(), Some("/d"));
        assert_eq!(args.config.set, ["node=n2", "limits.max_page=9"]);
        assert!(Cli::try_parse_from(["broker", "serve", "--durability", "sometimes"]).is_err());
        assert!(Cli::try_parse_from(["broker", "serve", "--tcp", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["broker", "token", "--user", "u"]).is_err());
        assert!(Cli::try_parse_from(["broker", "chat", "--to", "bob"]).is_err());
        assert!(Cli::try_parse_from(["broker", "chat", "--to", "bob", "--token", "t"]).is_ok());
        assert!(
            Cli::try_parse_from(["broker", "stats", "--admin", "127.0.0.1:1", "--once"]).is_ok()
        );
        assert!(Cli::try_parse_from(["broker", "stats", "--admin", "nowhere"]).is_err());
    }
}
