//! In-process clients: an embedding application's connections to its own node, without a
//! socket (like rumqttd's links or NATS's in-process connection).
//!
//! A [`LocalClient`] is a real connection of the node: it speaks the protocol's frames
//! ([`crate::proto::pb::Frame`]) and gets everything a socket client gets (acks, deliveries,
//! sync, history, presence, groups), under the same budgets; only the bytes travel over
//! in-memory channels instead of a socket. Open one with [`crate::Handle::connect`] (a device
//! of a user: delivered to, online while open) or [`crate::Handle::act_as`] (the application
//! acting as a user: not a device, delivered nothing, no presence). Both are trusted: they need
//! no token, may send SYSTEM messages, and no gate asks about their requests.
//!
//! Its methods block the calling thread (with a timeout). Never call them from a hook: hooks
//! run on the node's shard threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parley_proto::pb;
use parley_proto::pb::frame::Body;
use parley_proto::tcp::FrameCodec;

use crate::node::local::LOCAL_WINDOW;
use crate::node::shard::Mail;

/// How long [`LocalClient`]'s convenience calls wait for their answer.
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a local client's call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LocalError {
    /// The connection is closed; the node's last `Error` frame, if it sent one, says why
    /// (e.g. `KICKED`, `SHUTTING_DOWN`).
    #[error("the connection is closed{}", .0.as_ref().map(|e| format!(": {} {}", e.code().as_str_name(), e.message)).unwrap_or_default())]
    Closed(Option<pb::Error>),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The node refused the request.
    #[error("refused: {} {}", .0.code().as_str_name(), .0.message)]
    Refused(pb::Error),
    /// The request is not valid, or the node sent something that does not decode.
    #[error("{0}")]
    Invalid(String),
}

/// The client's end of the link (made by the node's control).
pub(crate) struct Link {
    pub(crate) id: u64,
    pub(crate) tx: Sender<Mail>,
    pub(crate) waker: Arc<mio::Waker>,
    pub(crate) rx: Receiver<Bytes>,
    pub(crate) queued: Arc<AtomicUsize>,
}

/// An in-process connection (see the module documentation).
pub struct LocalClient {
    link: Link,
    codec: FrameCodec,
    inbuf: BytesMut,
    /// Frames received while waiting for another one, in order.
    early: VecDeque<pb::Frame>,
    next_request: u64,
    login: pb::LoginResult,
    /// The node's last Error frame, once closed.
    closed: Option<Option<pb::Error>>,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("user", &self.login.user)
            .field("device", &self.login.device)
            .field("closed", &self.closed.is_some())
            .finish()
    }
}

impl LocalClient {
    /// Waits for the node's `LoginResult` on a freshly opened link.
    pub(crate) fn open(link: Link) -> Result<LocalClient, LocalError> {
        let mut client = LocalClient {
            link,
            codec: FrameCodec::new(usize::MAX >> 1),
            inbuf: BytesMut::new(),
            early: VecDeque::new(),
            next_request: 1,
            login: pb::LoginResult::default(),
            closed: None,
        };
        let deadline = Instant::now() + LOCAL_TIMEOUT;
        loop {
            match client.next_frame(deadline)? {
                Some(pb::Frame {
                    body: Some(Body::LoginResult(r)),
                    ..
                }) => {
                    client.login = r;
                    return Ok(client);
                }
                Some(f) => client.early.push_back(f),
                None => return Err(LocalError::Timeout(LOCAL_TIMEOUT)),
            }
        }
    }

    /// What the node answered the login with (user, device, limits, server time).
    pub fn login_result(&self) -> &pb::LoginResult {
        &self.login
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &pb::Frame) -> Result<(), LocalError> {
        if let Some(last) = &self.closed {
            return Err(LocalError::Closed(last.clone()));
        }
        let mut out = BytesMut::new();
        self.codec
            .encode(frame, &mut out)
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let mail = Mail::LocalInput {
            id: self.link.id,
            bytes: out.freeze(),
        };
        // Blocks while the shard's inbox is full: the node's backpressure.
        self.link
            .tx
            .send(mail)
            .map_err(|_| LocalError::Closed(None))?;
        let _ = self.link.waker.wake();
        Ok(())
    }

    /// The next frame from the node, waiting at most `timeout` (`None`: nothing came).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<pb::Frame>, LocalError> {
        if let Some(f) = self.early.pop_front() {
            return Ok(Some(f));
        }
        self.next_frame(Instant::now() + timeout)
    }

    /// Sends a request with a fresh request id and waits for its answer (other frames that
    /// arrive meanwhile are kept for [`LocalClient::recv`]). An `Error` answer is
    /// [`LocalError::Refused`].
    pub fn request(&mut self, body: Body, timeout: Duration) -> Result<pb::Frame, LocalError> {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(&pb::Frame {
            request_id,
            body: Some(body),
        })?;
        let deadline = Instant::now() + timeout;
        let mut kept = Vec::new();
        let answer = loop {
            match self.next_frame(deadline) {
                Ok(Some(f)) if f.request_id == request_id => break Ok(f),
                Ok(Some(f)) => kept.push(f),
                Ok(None) => break Err(LocalError::Timeout(timeout)),
                Err(e) => break Err(e),
            }
        };
        self.early.extend(kept);
        match answer? {
            pb::Frame {
                body: Some(Body::Error(e)),
                ..
            } => Err(LocalError::Refused(e)),
            f => Ok(f),
        }
    }

    /// Sends a message to `to` (as this client's user names it: a direct conversation by the
    /// other user, a group by its id) and waits until it is stored. `client_msg_id` (not 0) is
    /// the message's idempotency key for this device: sending it again returns the first
    /// send's ack and stores nothing. `system`: a SYSTEM message.
    pub fn send_message(
        &mut self,
        to: pb::Conversation,
        body: impl Into<Bytes>,
        client_msg_id: u64,
        system: bool,
    ) -> Result<pb::SendAck, LocalError> {
        let kind = if system {
            pb::MessageKind::System
        } else {
            pb::MessageKind::Normal
        };
        let send = pb::Send {
            to: Some(to),
            client_msg_id,
            body: body.into(),
            kind: kind as i32,
            ..Default::default()
        };
        match self.request(Body::Send(send), LOCAL_TIMEOUT)?.body {
            Some(Body::SendAck(ack)) => Ok(ack),
            other => Err(LocalError::Invalid(format!(
                "a send answered with {}",
                other.as_ref().map_or("nothing", body_name)
            ))),
        }
    }

    /// Acknowledges every message of `deliver` (the newest seq of each conversation), so the
    /// node stops retransmitting them.
    pub fn ack(&mut self, deliver: &pb::Deliver) -> Result<(), LocalError> {
        let mut acks: Vec<pb::AckCursor> = Vec::new();
        for m in &deliver.messages {
            let Some(conv) = m.conversation.clone() else {
                continue;
            };
            match acks
                .iter_mut()
                .find(|a| a.conversation.as_ref() == Some(&conv))
            {
                Some(a) => a.seq = a.seq.max(m.seq),
                None => acks.push(pb::AckCursor {
                    conversation: Some(conv),
                    seq: m.seq,
                }),
            }
        }
        if acks.is_empty() {
            return Ok(());
        }
        self.send(&pb::Frame {
            request_id: 0,
            body: Some(Body::DeliverAck(pb::DeliverAck { acks })),
        })
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<pb::Frame>, LocalError> {
        loop {
            match self.codec.decode_frame(&mut self.inbuf) {
                Ok(Some(frame)) => {
                    if let Some(Body::Error(e)) = &frame.body
                        && e.fatal
                    {
                        self.closed = Some(Some(e.clone()));
                    }
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(LocalError::Invalid(e.to_string())),
            }
            if let Some(last) = &self.closed
                && self.inbuf.is_empty()
                && self.link.rx.is_empty()
            {
                return Err(LocalError::Closed(last.clone()));
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.link.rx.recv_timeout(wait) {
                Ok(chunk) => {
                    self.inbuf.extend_from_slice(&chunk);
                    let before = self.link.queued.fetch_sub(chunk.len(), Ordering::AcqRel);
                    if before >= LOCAL_WINDOW && before - chunk.len() < LOCAL_WINDOW {
                        // The node holds output for us: tell it there is room again.
                        let _ = self
                            .link
                            .tx
                            .send_timeout(Mail::LocalDrained { id: self.link.id }, LOCAL_TIMEOUT);
                        let _ = self.link.waker.wake();
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    if self.inbuf.is_empty() {
                        let last = self.closed.clone().flatten();
                        self.closed = Some(last.clone());
                        return Err(LocalError::Closed(last));
                    }
                    if let Ok(Some(frame)) = self.codec.decode_frame(&mut self.inbuf) {
                        return Ok(Some(frame));
                    }
                    self.inbuf.clear();
                }
            }
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        if self.closed.is_none() {
            let _ = self
                .link
                .tx
                .send_timeout(Mail::LocalClose { id: self.link.id }, LOCAL_TIMEOUT);
            let _ = self.link.waker.wake();
        }
    }
}

fn body_name(b: &Body) -> &'static str {
    parley_proto::frame::body_name(&pb::Frame {
        request_id: 0,
        body: Some(b.clone()),
    })
}
