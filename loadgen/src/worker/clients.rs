//! Laying the clients out over the scenario's roles and connecting them: which client sends
//! to whom, which driver speaks to the system under test, and the connection of each client.

use super::*;

impl<'a> Worker<'a> {
    pub(super) fn new_client(&self, dest: Option<u32>, fan: u32, from: Option<u32>) -> Client {
        Client {
            send_conn: None,
            recv_conn: None,
            dest,
            fan,
            last_seq: 0,
            pending: VecDeque::new(),
            base: 1,
            in_flight: 0,
            stream: from.map(|sender| {
                let stream = Stream::new(sender);
                // Over UDP a sender's lost-and-resent message is stored after later ones: the
                // broker's seqs define the order.
                if self.common.system == System::Parley && self.common.transport == Transport::Udp {
                    stream.ordered_by_system()
                } else {
                    stream
                }
            }),
            ready_conns: 0,
            conns: 0,
            synced: false,
            started_ns: 0,
            group: None,
        }
    }

    pub(super) fn lay_out_traffic(&mut self, group: u32, fanout: bool) {
        for c in self.plan.clients.clone() {
            let first = c - (c - self.plan.clients.start) % group;
            let client = if fanout {
                if c == first {
                    self.new_client(Some(first), group - 1, None)
                } else {
                    self.new_client(None, 0, Some(first))
                }
            } else {
                let partner = c ^ 1;
                self.new_client(Some(partner), 1, Some(partner))
            };
            self.clients.push(client);
        }
    }

    pub(super) fn lay_out_idle(&mut self) {
        for _ in self.plan.clients.clone() {
            let c = self.new_client(None, 0, None);
            self.clients.push(c);
        }
    }

    pub(super) fn lay_out_offline(&mut self) {
        for c in self.plan.clients.clone() {
            let partner = c ^ 1;
            let client = if c % 2 == 0 {
                self.new_client(Some(partner), 1, None)
            } else {
                self.new_client(None, 0, Some(partner))
            };
            self.clients.push(client);
        }
    }

    /// Where client `local` connects: `--addr`, or with `--nodes` the node of its pair,
    /// fan-out or group (round robin), so that its messages stay on one node; with `--split`,
    /// member i of unit u on node u + i, so that every message crosses nodes.
    pub(super) fn node_of(&self, local: u32) -> std::net::SocketAddr {
        let nodes = &self.plan.nodes;
        if nodes.is_empty() {
            return self.plan.addr;
        }
        let me = self.global(local);
        let (unit, size) = match (self.clients[local as usize].group, &self.plan.scenario) {
            (Some(group), _) => (group, 0),
            (None, Scenario::Traffic { group, .. }) => (me / (*group).max(1), (*group).max(1)),
            (None, _) => (me / 2, 2),
        };
        let member = if self.plan.split && size > 0 {
            me % size
        } else {
            0
        };
        nodes[(unit + member) as usize % nodes.len()]
    }

    pub(super) fn global(&self, local: u32) -> u32 {
        self.plan.clients.start + local
    }

    pub(super) fn local(&self, global: u32) -> Option<usize> {
        self.plan
            .clients
            .contains(&global)
            .then(|| (global - self.plan.clients.start) as usize)
    }

    /// The connections client `local` needs: (role, listen).
    pub(super) fn roles(&self, local: u32) -> Vec<(Role, Option<u32>)> {
        let c = &self.clients[local as usize];
        if let Some(group) = c.group {
            // A group member: one connection that sends (if it publishes) and receives.
            return vec![(Role::Both, Some(group))];
        }
        let me = self.global(local);
        // Pairs: a client listens on its own channel; a fan-out subscriber (which sends nothing)
        // on its publisher's. Parley ignores it: a user receives what is sent to it.
        let listen = c
            .stream
            .as_ref()
            .map(|s| if c.dest.is_none() { s.sender } else { me });
        let sends = c.dest.is_some();
        let receives = c.stream.is_some();
        match self.common.system {
            System::Redis => {
                let mut v = Vec::new();
                if sends || !receives {
                    v.push((Role::Publish, None));
                }
                if receives {
                    v.push((Role::Subscribe, listen));
                }
                v
            }
            _ => {
                let role = match (sends, receives) {
                    (true, false) => Role::Publish,
                    (false, true) => Role::Subscribe,
                    _ => Role::Both,
                };
                let listen = if receives { listen } else { None };
                vec![(role, listen)]
            }
        }
    }

    pub(super) fn driver(&mut self, endpoint: Endpoint) -> Box<dyn Driver> {
        match self.common.system {
            System::Parley => {
                let user = endpoint.names.of(endpoint.client);
                let token = self
                    .minter
                    .as_ref()
                    .map(|m| m.mint(&user, "d0"))
                    .unwrap_or_default();
                // Fan-out over a room named after the publisher (its subscribers listen on it).
                let room = match self.plan.scenario {
                    Scenario::Traffic { fanout: true, .. } => Some(
                        endpoint
                            .names
                            .of(endpoint.listen.unwrap_or(endpoint.client)),
                    ),
                    _ => None,
                };
                // Groups: the member's group.
                let group = match self.plan.scenario {
                    Scenario::Groups { .. } => endpoint.listen.map(|g| endpoint.names.group(g)),
                    _ => None,
                };
                let framing = match self.common.transport {
                    Transport::Tcp | Transport::Tls | Transport::Udp => Framing::Tcp,
                    Transport::Ws | Transport::Wss => {
                        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let host = self.plan.addr.to_string();
                        Framing::Ws(Box::new(WsClient::new(&host, "/", &[], self.seed)))
                    }
                };
                let mut driver = ParleyDriver::new(&endpoint, token, framing);
                if self.common.transport == Transport::Udp {
                    // Datagrams may be lost or come late: deliver in seq order, ack only what
                    // is held without a hole (the broker sends the rest again).
                    driver = driver.reordering();
                }
                match (room, group) {
                    (Some(room), _) => Box::new(driver.in_room(room)),
                    (None, Some(group)) => Box::new(driver.in_group(group)),
                    (None, None) => Box::new(driver),
                }
            }
            System::Mqtt => Box::new(MqttDriver::new(
                endpoint,
                self.common.qos,
                (self.common.heartbeat * 3.0).clamp(5.0, 600.0) as u16,
            )),
            System::Redis => Box::new(RedisDriver::new(endpoint)),
            System::Relay => Box::new(RelayDriver::new(endpoint)),
        }
    }

    pub(super) fn open(&mut self, local: u32) -> Result<(), String> {
        let me = self.global(local);
        let now = self.engine.now_ns();
        self.clients[local as usize].started_ns = now;
        for (role, listen) in self.roles(local) {
            let endpoint = Endpoint {
                names: self.plan.names.clone(),
                client: me,
                listen,
                role,
            };
            let driver = self.driver(endpoint);
            let source = if self.plan.sources.is_empty() {
                None
            } else {
                let i = (self.plan.first_conn + self.conns_opened) % self.plan.sources.len();
                Some(self.plan.sources[i])
            };
            self.conns_opened += 1;
            let addr = self.node_of(local);
            let conn = self
                .engine
                .connect(addr, source, me, role, driver)
                .map_err(|e| format!("cannot open connection {}: {e}", self.conns_opened))?;
            if self.owner.len() <= conn {
                self.owner.resize(conn + 1, u32::MAX);
            }
            self.owner[conn] = local;
            let c = &mut self.clients[local as usize];
            c.conns += 1;
            match role {
                Role::Publish => c.send_conn = Some(conn),
                Role::Subscribe => c.recv_conn = Some(conn),
                Role::Both => {
                    c.send_conn = Some(conn);
                    c.recv_conn = Some(conn);
                }
            }
            self.tally.conns += 1;
        }
        Ok(())
    }

    /// Opens the connections of `locals` (at most `--concurrency` setting up at once) and waits
    /// until all are ready. Records connect and login latency.
    pub(super) fn connect(
        &mut self,
        locals: &[u32],
        stdout: &std::io::Stdout,
        timed: bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.common.connect_timeout);
        let mut next = 0;
        let mut setting_up = 0usize;
        let mut ready = 0usize;
        let mut failed = 0usize;
        let mut last_progress = Instant::now();
        let want: usize = locals.iter().map(|&l| self.roles(l).len()).sum();
        while ready + failed < want {
            while next < locals.len() && setting_up < self.common.concurrency.max(1) {
                let l = locals[next];
                let before = self.tally.conns;
                self.open(l)?;
                setting_up += (self.tally.conns - before) as usize;
                next += 1;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "set-up timed out: {ready} of {want} connections ready after {} s",
                    self.common.connect_timeout
                ));
            }
            let events = self
                .engine
                .turn(Some(Duration::from_millis(50)))
                .map_err(|e| format!("poll: {e}"))?;
            for h in &events {
                match h {
                    Happening::Connected { connect_ns, .. } => {
                        self.tally.connect.record(*connect_ns)
                    }
                    Happening::Event {
                        conn,
                        event: Event::Ready,
                        since_connect_ns,
                    } => {
                        self.tally.login.record(*since_connect_ns);
                        let l = self.owner[*conn] as usize;
                        self.clients[l].ready_conns += 1;
                        ready += 1;
                        setting_up = setting_up.saturating_sub(1);
                    }
                    Happening::Event {
                        event: Event::Error { text, .. },
                        ..
                    } => self.tally.error(format!("set-up: {text}")),
                    Happening::Event { .. } => {}
                    Happening::Closed { conn, reason } => {
                        if self.engine.state(*conn) == State::Closed {
                            self.tally.error(format!("set-up: {reason}"));
                            failed += 1;
                            setting_up = setting_up.saturating_sub(1);
                        }
                    }
                }
            }
            self.engine.recycle(events);
            self.engine.finish_turn();
            if timed && last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                emit(
                    stdout,
                    &Report::Progress(Progress {
                        ready: ready as u64,
                        errors: self.tally.errors,
                        ..Progress::default()
                    }),
                );
            }
        }
        if failed > 0 && !timed {
            return Err(format!(
                "{failed} of {want} connections failed during set-up; first: {}",
                self.tally
                    .error_samples
                    .first()
                    .cloned()
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }
}
