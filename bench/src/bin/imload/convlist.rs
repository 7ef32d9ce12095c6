//! `imload convlist`: a user with many conversations asks for its list; round trips against
//! the ping floor.

use super::*;

/// One blocking connection, for request/response timing.
struct Client {
    s: StdStream,
    rbuf: BytesMut,
    codec: FrameCodec,
    scratch: Vec<u8>,
}

impl Client {
    fn login(addr: SocketAddr, secret: &[u8], user: &str) -> io::Result<Self> {
        let s = StdStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Client {
            s,
            rbuf: BytesMut::new(),
            codec: FrameCodec::default(),
            scratch: vec![0; 128 * 1024],
        };
        match c.call(&login(secret, user))?.0.body {
            Some(Body::LoginResult(_)) => Ok(c),
            other_body => Err(other(format!("login of {user}: {other_body:?}"))),
        }
    }

    fn send(&mut self, f: &pb::Frame) -> io::Result<()> {
        let mut out = BytesMut::new();
        self.codec
            .encode(f, &mut out)
            .map_err(|e| other(e.to_string()))?;
        self.s.write_all(&out)
    }

    /// The next frame, and when the read that completed it returned.
    fn recv(&mut self) -> io::Result<(pb::Frame, Instant, usize)> {
        let mut at = Instant::now();
        loop {
            let before = self.rbuf.len();
            if let Some(f) = self
                .codec
                .decode_frame(&mut self.rbuf)
                .map_err(|e| other(e.to_string()))?
            {
                return Ok((f, at, before - self.rbuf.len()));
            }
            let n = self.s.read(&mut self.scratch)?;
            at = Instant::now();
            if n == 0 {
                return Err(other("closed by the broker"));
            }
            self.rbuf.extend_from_slice(&self.scratch[..n]);
        }
    }

    /// Sends `f` and waits for the frame with its request id (others are skipped): the
    /// answer, the round trip, and the answer's size in bytes.
    fn call(&mut self, f: &pb::Frame) -> io::Result<(pb::Frame, Duration, usize)> {
        let t = Instant::now();
        self.send(f)?;
        loop {
            let (a, at, len) = self.recv()?;
            if a.request_id == f.request_id {
                return Ok((a, at.duration_since(t), len));
            }
        }
    }
}

fn fill(o: &ConvOpts, secret: &[u8]) -> io::Result<()> {
    let t = Instant::now();
    let body = vec![b'x'; o.body_bytes];
    for s in 0..o.senders {
        let mut c = Client::login(o.common.addr, secret, &format!("s{s:04}"))?;
        let send = Body::Send(pb::Send {
            to: Some(pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: "owner".to_owned(),
            }),
            client_msg_id: 1,
            content_type: 1,
            body: body.clone().into(),
            ..Default::default()
        });
        match c.call(&frame(7, send))?.0.body {
            Some(Body::SendAck(_)) => {}
            b => return Err(other(format!("send of s{s:04}: {b:?}"))),
        }
    }
    println!(
        "RESULT convlist phase=fill senders={} secs={:.2}",
        o.senders,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn list(limit: u32, rid: u64) -> pb::Frame {
    frame(
        rid,
        Body::ConversationListRequest(pb::ConversationListRequest {
            limit,
            ..Default::default()
        }),
    )
}

fn measure(o: &ConvOpts, secret: &[u8]) -> io::Result<()> {
    let mut c = Client::login(o.common.addr, secret, "owner")?;
    let mut rid = 100;
    let mut shape = Vec::new();
    for &limit in &o.limits {
        rid += 1;
        let (a, rtt, bytes) = c.call(&list(limit, rid))?;
        let Some(Body::ConversationList(l)) = a.body else {
            return Err(other(format!("list answer: {a:?}")));
        };
        let filled = l
            .conversations
            .iter()
            .filter(|s| s.last_message.is_some())
            .count();
        println!(
            "RESULT convlist label={} phase=first-{limit} rtt_us={} entries={} with_last_message={filled} more={} bytes={bytes}",
            o.label,
            rtt.as_micros(),
            l.conversations.len(),
            l.more,
        );
        shape.push((l.conversations.len(), bytes));
    }
    let mut ping = Vec::with_capacity(o.requests);
    let mut lists: Vec<Vec<u64>> = vec![Vec::with_capacity(o.requests); o.limits.len()];
    for i in 0..o.requests {
        rid += 1;
        let (a, rtt, _) = c.call(&frame(rid, Body::Ping(pb::Ping { nonce: i as u64 })))?;
        if !matches!(a.body, Some(Body::Pong(_))) {
            return Err(other(format!("ping answer: {a:?}")));
        }
        ping.push(rtt.as_micros() as u64);
        for (k, &limit) in o.limits.iter().enumerate() {
            rid += 1;
            let (a, rtt, _) = c.call(&list(limit, rid))?;
            if !matches!(a.body, Some(Body::ConversationList(_))) {
                return Err(other(format!("list answer: {a:?}")));
            }
            lists[k].push(rtt.as_micros() as u64);
        }
    }
    ping.sort_unstable();
    let (p50, p99) = (quantile(&ping, 0.5), quantile(&ping, 0.99));
    println!(
        "RESULT convlist label={} phase=ping n={} p50_us={p50} p99_us={p99}",
        o.label, o.requests
    );
    for (k, &limit) in o.limits.iter().enumerate() {
        let v = &mut lists[k];
        v.sort_unstable();
        let (m, p) = (quantile(v, 0.5), quantile(v, 0.99));
        println!(
            "RESULT convlist label={} phase=list-{limit} n={} entries={} bytes={} p50_us={m} p99_us={p} server_p50_us={} server_p99_us={}",
            o.label,
            o.requests,
            shape[k].0,
            shape[k].1,
            m.saturating_sub(p50),
            p.saturating_sub(p50),
        );
    }
    Ok(())
}

pub(crate) fn run(o: &ConvOpts) -> io::Result<()> {
    let secret = read_secret(&o.common)?;
    if o.phase != ConvPhase::Measure {
        fill(o, &secret)?;
    }
    if o.phase != ConvPhase::Fill {
        measure(o, &secret)?;
    }
    Ok(())
}
