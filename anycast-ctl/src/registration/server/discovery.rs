//! Agent discovery, the server's end: ask the address all agents share for the list of
//! agents (a request signed with our key, its MESG-ID the nonce), take only a reply signed
//! with our key that echoes the nonce of our outstanding request, and register with every
//! agent it lists that we do not know yet. Asked again at half the list's lifetime (or our
//! binding lifetime, whichever is shorter), so an agent added later is found; an unanswered
//! request is sent again, anew, with backoff.
//!
//! An agent no longer listed is kept: its bindings there lapse by themselves if it is gone.
use super::load::canonical;
use super::*;

/// Never ask again sooner than this after a reply.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Discovery {
    pub(crate) addr: SocketAddr,
    pub(crate) sock: UdpSocket,
    /// Our own address of the discovery address's family (the request's inner source).
    local: Ipv6Addr,
    /// The MESG-ID of the request awaiting its reply.
    outstanding: Option<u64>,
    pub(crate) next: Instant,
    timeout: Duration,
    /// Agents a verified reply listed that are not registered with yet.
    found: Vec<SocketAddr>,
    bad: RateLimit,
    pub(crate) io_errors: RateLimit,
}

impl Discovery {
    pub(crate) async fn open(addr: SocketAddr, real: &[IpAddr]) -> Result<Discovery> {
        let local = real.iter().copied().find(|r| r.is_ipv4() == addr.is_ipv4());
        let sock = bind_socket(local, addr.is_ipv4())
            .await
            .with_context(|| format!("opening the socket toward the discovery address {addr}"))?;
        let local = local.unwrap_or(if addr.is_ipv4() {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
        Ok(Discovery {
            addr,
            sock,
            local: wire::to_mapped(local),
            outstanding: None,
            next: Instant::now(),
            timeout: Duration::ZERO,
            found: Vec::new(),
            bad: RateLimit::default(),
            io_errors: RateLimit::default(),
        })
    }
}

impl Client {
    /// Sends a discovery request when one is due (first, again after a lifetime, or a
    /// retransmission: each one a new request with a fresh MESG-ID).
    pub(crate) async fn send_discovery_request(&mut self) {
        let now = Instant::now();
        let (initial, max) = (self.initial_timeout, self.max_timeout);
        if self.phase != Phase::Run {
            return;
        }
        let Some(d) = self.discovery.as_mut() else {
            return;
        };
        if d.next > now {
            return;
        }
        if d.outstanding.is_some() {
            tracing::warn!(
                "no answer from the discovery address {}: asking again",
                d.addr
            );
        }
        d.timeout = if d.outstanding.is_some() {
            (d.timeout * 2).clamp(initial, max)
        } else {
            initial
        };
        d.next = now + d.timeout;
        // Strictly newer than the last request's (the agent refuses replays).
        let ts = wire::ntp_now().max(d.outstanding.map_or(0, |t| t + 1));
        d.outstanding = Some(ts);
        let msg = Message {
            src: d.local,
            dst: wire::to_mapped(d.addr.ip()),
            body: Body::DiscoveryRequest,
            options: Options {
                mn_id: Some(self.identity.clone()),
                mesg_id: Some(ts),
                ..Options::default()
            },
        };
        let payload = wire::encode(
            &msg,
            Some(Key {
                spi: self.spi,
                secret: &self.key,
            }),
        );
        tracing::debug!("agent discovery request to {}", d.addr);
        if let Err(e) = d.sock.send_to(&payload, d.addr).await {
            if let Some(n) = d.io_errors.allow(now) {
                tracing::warn!("sending to {}: {e}{}", d.addr, held_back(n));
            }
        }
    }

    /// A datagram on the discovery socket: a verified reply to our outstanding request
    /// schedules the next request and lists agents to register with; anything else is
    /// dropped (and logged, sparingly).
    pub(crate) fn on_discovery_reply(&mut self, payload: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let (spi, lifetime_units) = (self.spi, self.lifetime_units);
        let known: Vec<SocketAddr> = self.agents.iter().map(|a| a.addr).collect();
        let Some(d) = self.discovery.as_mut() else {
            return;
        };
        let why = match check_reply(d, payload, from, spi, &self.key) {
            Ok((lifetime, agents)) => {
                d.outstanding = None;
                let listed = u64::from(lifetime.min(lifetime_units)) * LIFETIME_UNIT_SECS;
                d.next = now + (Duration::from_secs(listed) / 2).max(MIN_INTERVAL);
                let port = d.addr.port();
                let v4 = d.addr.is_ipv4();
                for a in &agents {
                    // The discovery address's family first, else the other one.
                    let ip = match (v4, a.v4, a.v6) {
                        (true, Some(x), _) | (false, Some(x), None) => IpAddr::V4(x),
                        (_, _, Some(y)) => IpAddr::V6(y),
                        (_, None, None) => continue,
                    };
                    let addr = SocketAddr::new(ip, port);
                    if !known.contains(&addr) && !d.found.contains(&addr) {
                        tracing::info!(
                            "agent discovery: {} lists agent '{}' at {addr}",
                            d.addr,
                            a.id
                        );
                        d.found.push(addr);
                    }
                }
                return;
            }
            Err(why) => why,
        };
        if let Some(n) = d.bad.allow(now) {
            tracing::warn!(
                "ignoring a datagram from {from} on the discovery socket: {why}{}",
                held_back(n)
            );
        }
    }

    /// Registers with the agents discovery found.
    pub(crate) async fn add_discovered(&mut self) {
        let Some(d) = self.discovery.as_mut() else {
            return;
        };
        if self.phase != Phase::Run {
            return;
        }
        let found = std::mem::take(&mut d.found);
        for addr in found {
            if let Err(e) = self.add_agent(addr).await {
                tracing::warn!("agent discovery: {e:#}");
            }
        }
    }
}

/// A discovery reply's lifetime and agents, if it is the verified answer to our
/// outstanding request; else why not.
fn check_reply(
    d: &Discovery,
    payload: &[u8],
    from: SocketAddr,
    spi: u32,
    key: &[u8],
) -> Result<(u16, Vec<wire::AgentEntry>), String> {
    if canonical(from.ip()) != canonical(d.addr.ip()) || from.port() != d.addr.port() {
        return Err("not from the discovery address".into());
    }
    let msg = wire::decode(payload).map_err(|e| e.to_string())?;
    let Body::DiscoveryReply { lifetime, agents } = msg.body else {
        return Err("not a discovery reply".into());
    };
    if !wire::verify(payload, Key { spi, secret: key }) {
        return Err("unsigned or wrongly signed discovery reply".into());
    }
    match (d.outstanding, msg.options.mesg_id) {
        (Some(want), Some(got)) if want == got => Ok((lifetime, agents)),
        _ => Err("a discovery reply to no outstanding request (replayed or late)".into()),
    }
}
