//! The driver's closing sockets: a connection the core is done with writes its last words,
//! shuts its write side, and is dropped once the peer closed or its linger passed (what it
//! sends meanwhile is discarded, up to a bound). A child of the driver, so it works on its tables.

use mio::{Interest, Token};

use super::{CLOSING_BIT, CloseStep, Closing, Driver, Stream};
use crate::core::Now;

impl Driver {
    pub(super) fn begin_closing(&mut self, mut stream: Stream, last: bytes::BytesMut, now: Now) {
        let idx = self.closing_free.pop().unwrap_or_else(|| {
            self.closing.push(None);
            self.closing.len() - 1
        });
        if self
            .poll
            .registry()
            .reregister(
                stream.tcp_mut(),
                Token(CLOSING_BIT | idx),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.closing_free.push(idx);
            self.admission.closed();
            return;
        }
        let deadline = now.ms + self.close_linger_ms;
        self.closing[idx] = Some(Closing::new(
            stream,
            last,
            deadline,
            self.close_discard_bytes,
        ));
        self.closing_order.push_back((deadline, idx));
        self.step_closing(idx);
    }

    pub(super) fn step_closing(&mut self, idx: usize) {
        let budget = self.read_budget;
        let Some(Some(c)) = self.closing.get_mut(idx) else {
            return;
        };
        match c.step(budget) {
            CloseStep::Pending => {}
            CloseStep::More => self.closing_more.push(idx),
            CloseStep::Done => self.end_closing(idx),
        }
    }

    pub(super) fn end_closing(&mut self, idx: usize) {
        if let Some(Some(mut c)) = self.closing.get_mut(idx).map(Option::take) {
            let _ = self.poll.registry().deregister(c.stream.tcp_mut());
            self.closing_free.push(idx);
            // The descriptor closes here: the connection stops counting.
            self.admission.closed();
        }
    }

    pub(super) fn step_closings(&mut self, now: Now) {
        for idx in std::mem::take(&mut self.closing_more) {
            self.step_closing(idx);
        }
        while let Some(&(deadline, idx)) = self.closing_order.front() {
            let live = self
                .closing
                .get(idx)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.deadline == deadline);
            if live && now.ms < deadline {
                break;
            }
            self.closing_order.pop_front();
            if live {
                self.end_closing(idx);
            }
        }
    }
}
