//! Client message ids and request ids.
//!
//! A client message id must be unique per (user, device) within the server's de-duplication
//! window, also across restarts of the client process: a reused id would make the server take a
//! new message for a retry of an old one and drop it. Ids here count up from a random start in
//! `1..2^62` (the driver seeds it from the operating system's randomness), so two runs of a
//! device collide only if their ranges overlap: with n sends per run, a chance of about
//! n / 2^61 per pair of runs.
//!
//! Request ids (for `Frame.request_id` of the session's own requests) have the top bit set, so
//! they never equal a client message id (the session uses a send's client message id as its
//! request id).

/// Largest client message id handed out (exclusive), leaving the top two bits clear.
const ID_SPACE: u64 = 1 << 62;

/// Hands out client message ids: never 0, never repeated within a run.
#[derive(Debug, Clone)]
pub struct ClientMsgIds {
    /// The next id.
    next: u64,
}

impl ClientMsgIds {
    /// Ids counting up from a start derived from `seed` (any value; use a random one).
    ///
    /// ```
    /// let mut ids = parley_client::ids::ClientMsgIds::new(42);
    /// let a = ids.next_id();
    /// assert_ne!(a, 0);
    /// assert_eq!(ids.next_id(), a + 1);
    /// ```
    pub fn new(seed: u64) -> Self {
        Self {
            next: (seed % ID_SPACE).max(1),
        }
    }

    /// The next id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next;
        self.next = if id + 1 >= ID_SPACE { 1 } else { id + 1 };
        id
    }
}

/// The top bit, set on every request id.
const REQUEST_BIT: u64 = 1 << 63;

/// Hands out request ids for the session's own requests (login, sync, history, pings, ...).
#[derive(Debug, Clone, Default)]
pub struct RequestIds {
    /// The counter.
    counter: u64,
}

impl RequestIds {
    /// The next request id (top bit set, never 0).
    ///
    /// ```
    /// let mut ids = parley_client::ids::RequestIds::default();
    /// assert!(ids.next_id() >= 1 << 63);
    /// ```
    pub fn next_id(&mut self) -> u64 {
        self.counter = (self.counter + 1) & !REQUEST_BIT;
        REQUEST_BIT | self.counter
    }

    /// Whether `id` is a request id (rather than a client message id).
    pub fn is_request_id(id: u64) -> bool {
        id & REQUEST_BIT != 0
    }
}

/// A random 64-bit seed from the operating system, falling back to the clock and process id.
pub fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // Truncation intended: the low bits of the clock vary most.
        (nanos as u64) ^ (u64::from(std::process::id()) << 32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_wrap_without_zero_and_stay_below_the_request_bit() {
        let mut ids = ClientMsgIds::new(ID_SPACE - 1);
        assert_eq!(ids.next_id(), ID_SPACE - 1);
        assert_eq!(ids.next_id(), 1);
        assert_eq!(ClientMsgIds::new(0).next_id(), 1);
        assert!(!RequestIds::is_request_id(
            ClientMsgIds::new(u64::MAX).next_id()
        ));
    }
}
