//! `broker token`: print a signed token for a user and device.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;
use parley_broker::auth::{Hs256, MAX_DEVICE_BYTES, MAX_USER_BYTES};

use super::{CliError, ConfigArgs, load_config_from, load_secret, now_secs};

/// Default lifetime of a minted token: one day.
pub(super) const DEFAULT_TTL_SECS: u64 = 86_400;

/// Flags of `broker token`.
#[derive(Debug, Args)]
pub(super) struct TokenArgs {
    /// The user id the token names (1 to 128 bytes).
    #[arg(long, value_name = "USER")]
    user: String,
    /// The device id the token names (1 to 64 bytes).
    #[arg(long, value_name = "DEVICE")]
    device: String,
    /// Lifetime of the token in seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TTL_SECS)]
    ttl: u64,
    /// Where the configuration (and so the secret) comes from.
    #[command(flatten)]
    config: ConfigArgs,
}

/// Checks that `user` and `device` are ids a token may carry, and `ttl` is positive.
pub(super) fn check_claims(user: &str, device: &str, ttl: u64) -> Result<(), CliError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(CliError::new(format!(
            "the user id must be 1 to {MAX_USER_BYTES} bytes"
        )));
    }
    if device.is_empty() || device.len() > MAX_DEVICE_BYTES {
        return Err(CliError::new(format!(
            "the device id must be 1 to {MAX_DEVICE_BYTES} bytes"
        )));
    }
    if ttl == 0 {
        return Err(CliError::new("--ttl must be at least 1 second"));
    }
    Ok(())
}

/// Mints an HS256 token under `secret` for `user` on `device`, valid for `ttl` seconds from now.
pub(super) fn mint(secret: Vec<u8>, user: &str, device: &str, ttl: u64) -> String {
    Hs256::new(secret).mint(user, device, now_secs().saturating_add(ttl))
}

/// Runs `broker token`.
pub(super) fn run(args: TokenArgs) -> Result<ExitCode, CliError> {
    check_claims(&args.user, &args.device, args.ttl)?;
    let config = load_config_from(&args.config)?;
    let secret = load_secret(&config)?;
    let token = mint(secret, &args.user, &args.device, args.ttl);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{token}")
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::new(format!("cannot write the token to stdout: {e}")))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use parley_broker::auth::TokenVerifier as _;

    use super::*;

    #[test]
    fn minted_token_verifies_under_the_same_secret() {
        let token = mint(b"s3cret".to_vec(), "alice", "cli", 60);
        let id = Hs256::new(b"s3cret".to_vec())
            .verify(&token, now_secs())
            .expect("valid");
        assert_eq!((id.user.as_str(), id.device.as_str()), ("alice", "cli"));
        assert!(id.expires_at > now_secs() && id.expires_at <= now_secs() + 60);
    }

    #[test]
    fn bad_claims_are_refused_before_anything_is_loaded() {
        assert!(check_claims("alice", "cli", 1).is_ok());
        assert!(check_claims("", "cli", 1).is_err());
        assert!(check_claims("alice", "", 1).is_err());
        assert!(check_claims(&"u".repeat(MAX_USER_BYTES + 1), "cli", 1).is_err());
        assert!(check_claims("alice", &"d".repeat(MAX_DEVICE_BYTES + 1), 1).is_err());
        assert!(check_claims("alice", "cli", 0).is_err());
    }
}
