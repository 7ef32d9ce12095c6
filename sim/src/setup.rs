//! The simulated node's settings and its token verifier.

use parley_broker::auth::{AuthError, Identity, TokenVerifier};
use parley_broker::config::Config;

/// Tokens are `user/device`, accepted as they are (the simulation checks delivery, not auth).
#[derive(Debug)]
pub(crate) struct SimVerifier;

impl TokenVerifier for SimVerifier {
    fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, AuthError> {
        let (user, device) = token
            .split_once('/')
            .ok_or(AuthError::Malformed("sim token"))?;
        Ok(Identity {
            user: user.to_owned(),
            device: device.to_owned(),
            // Longer than any run: sessions do not expire in the simulation.
            expires_at: now_secs + 24 * 3600,
        })
    }
}

/// The node configuration of every simulated run: short timeouts and small limits, so that
/// retransmits, `Behind`, slow-consumer closes, paging and checkpoints all happen within seconds.
pub(crate) fn sim_config() -> Config {
    let mut c = Config::default();
    c.timeouts.login_ms = 2_000;
    c.timeouts.heartbeat_ms = 2_000;
    c.timeouts.idle_ms = 10_000;
    c.timeouts.write_stall_ms = 3_000;
    c.timeouts.retransmit_initial_ms = 200;
    c.timeouts.retransmit_max_ms = 1_000;
    c.timeouts.retransmit_tries = 3;
    c.limits.max_frame_bytes = 8_192;
    c.limits.max_body_bytes = 1_024;
    c.limits.max_outbound_bytes = 1_500;
    c.limits.max_page = 16;
    c.limits.dedup_window = 256;
    c.limits.request_rate_per_sec = 100_000;
    c.limits.request_burst = 100_000;
    // Small reads and few frames per turn, so held and backlogged input happen often.
    c.limits.read_budget_bytes = 2_048;
    c.limits.frames_per_turn = 4;
    // Checkpoints often, so restarts start from them.
    c.storage.checkpoint_every_bytes = 16 * 1024;
    c
}
