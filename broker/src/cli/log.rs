//! The log subscriber `broker serve` installs (the library only emits `tracing` events; an
//! application that embeds it installs its own subscriber).
//!
//! Lines go to stderr, filtered by `log.level` (or `RUST_LOG`, which replaces it when set), as
//! text or as one JSON object per line (`log.format`). A few start-up lines are not log events
//! but plain text on a fixed stream, because tests and scripts read them: the effective
//! configuration, `parley: ready in ...`, `parley: limits.max_connections ... lowered to ...`
//! (stderr) and `parley listening ...` (stdout); so are the command line's own messages printed
//! before the subscriber exists (`note: ...`, `broker: error: ...`).

use std::io::IsTerminal as _;

use parley_broker::config::{Log, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The environment variable that, when set (and not blank), replaces `log.level`.
pub(super) const RUST_LOG: &str = "RUST_LOG";

/// The filter for `level` (the `log.level` setting), or for `rust_log` (the value of
/// `RUST_LOG`) if it is set and not blank. An error names the setting and says what is wrong.
///
/// `log.level` is read strictly: each comma-separated directive must be a level
/// (`error`..`trace`, `off`) or hold a `=` (`parley_broker::core=debug`), so a misspelt level
/// (`loud`, `warning`) is an error instead of a filter that selects a module of that name.
/// `RUST_LOG` keeps `tracing`'s usual reading.
pub(super) fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, String> {
    let parse = |s: &str| EnvFilter::builder().parse(s).map_err(|e| e.to_string());
    if let Some(rust_log) = rust_log.filter(|s| !s.trim().is_empty()) {
        return parse(rust_log).map_err(|e| format!("{RUST_LOG}={rust_log:?}: {e}"));
    }
    let bad = |why: String| format!("log.level {level:?}: {why}");
    if level.trim().is_empty() {
        return Err(bad(
            "empty (e.g. `info`, or `info,parley_broker::core=debug`)".into(),
        ));
    }
    for directive in level.split(',').map(str::trim) {
        if !directive.contains('=')
            && !directive.contains('[')
            && directive.parse::<LevelFilter>().is_err()
        {
            return Err(bad(format!(
                "{directive:?} is neither a level (error, warn, info, debug, trace, off) nor a \
                 target=level directive"
            )));
        }
    }
    parse(level).map_err(bad)
}

/// Installs the subscriber for `config` with `filter`, writing to stderr. Does nothing if one is
/// installed already.
pub(super) fn install(config: &Log, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init`: a second subscriber is refused, which only happens in tests.
    let _ = match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_or_target_directives_are_accepted() {
        for level in [
            "info",
            "debug",
            "off",
            "warn,parley_broker::core=debug",
            " info ",
        ] {
            assert!(filter(level, None).is_ok(), "{level}");
        }
    }

    #[test]
    fn a_misspelt_level_is_an_error_naming_the_setting() {
        for level in ["loud", "warning", "", "info,parley_broker=loud"] {
            let e = filter(level, None).expect_err(level);
            assert!(e.starts_with("log.level "), "{e}");
        }
    }

    #[test]
    fn rust_log_replaces_the_setting_unless_blank() {
        // A bad log.level is not even looked at when RUST_LOG is set.
        let f = filter("loud", Some("debug")).expect("RUST_LOG wins");
        assert_eq!(f.max_level_hint(), Some(LevelFilter::DEBUG));
        let f = filter("warn", Some("  ")).expect("blank RUST_LOG is unset");
        assert_eq!(f.max_level_hint(), Some(LevelFilter::WARN));
        let e = filter("info", Some("x=loud")).expect_err("bad RUST_LOG");
        assert!(e.starts_with("RUST_LOG="), "{e}");
    }
}
