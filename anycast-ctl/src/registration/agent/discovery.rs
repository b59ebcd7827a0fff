//! Agent discovery: a server configured with only the address all agents share (the
//! discovery address, routed by anycast to the nearest agent) asks it for the list of
//! agents, and registers with each of them (or sends its binding updates to the discovery
//! address itself: the agent that gets one relays it to its peers like any other).
//!
//! Mobile IPv6 has a discovery of its own (dynamic home agent address discovery, ICMPv6
//! types 144 and 145, RFC 6275 sections 6.5 and 6.6), but it cannot serve here: ICMPv6 does
//! not travel over IPv4, our messages travel in UDP (RFC 5555 framing) for both families,
//! and its messages carry no authentication. So the request and the reply are Mobility
//! Header messages like the binding messages (RFC 5096's Experimental Mobility Header, see
//! `anycast_common::wire`), on the registration port, in the same framing, signed with the
//! same per-server key. As in DHAAD, the reply echoes an identifier of the request (here
//! its MESG-ID) and lists the agents in order of preference: the answering agent first.
//!
//! Who learns the list: only a configured server, proven by its signature, asking from one
//! of its own real addresses (the reply goes there, so it is never reflected to a third
//! party), within its rate budget, with a fresh timestamp (within the replay window, newer
//! than its last request's, not older than the agent's start). Everything else is counted
//! and not answered: a request costs a sender that cannot sign nothing but our HMAC check,
//! and an answer goes only to a source the identity owns.
use super::*;

/// The discovery address(es) and the agents a reply lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiscoveryConfig {
    pub addresses: Vec<IpAddr>,
    /// This agent first, then its relay peers (at most `wire::MAX_DISCOVERY_AGENTS`).
    pub agents: Vec<wire::AgentEntry>,
}

impl Registry {
    /// Turns discovery on: requests to `cfg.addresses` are answered with `cfg.agents`, and
    /// binding updates addressed to them are taken (and relayed) as if addressed to us.
    pub fn with_discovery(mut self, cfg: DiscoveryConfig) -> Self {
        self.discovery = cfg.addresses.iter().map(|&a| wire::to_mapped(a)).collect();
        for &d in &self.discovery {
            if !self.agent.contains(&d) {
                self.agent.push(d);
            }
        }
        self.discovery_agents = cfg.agents;
        self.discovery_agents.truncate(wire::MAX_DISCOVERY_AGENTS);
        self
    }

    /// A discovery request: answered with the signed list of agents, or counted and dropped.
    pub(super) fn discovery_request(
        &mut self,
        msg: &Message,
        payload: &[u8],
        from: SocketAddr,
        now: Instant,
        wall: u64,
    ) -> Outcome {
        let none = |counted: String| Outcome {
            reply: None,
            changed: false,
            counted,
        };
        if self.discovery.is_empty() {
            return none(self.count("discovery_dropped_off"));
        }
        if !self.agent.contains(&msg.dst) {
            return none(self.count("dropped_not_for_this_agent"));
        }
        // Authenticated first: an unknown, unsigned or forged request learns nothing, and
        // is not answered at all (not even an unsigned refusal: nothing to amplify).
        let identity = msg.options.mn_id.clone().unwrap_or_default();
        // An identity known by its certificate has no key: it cannot use discovery.
        let sa = self
            .servers
            .get(&identity)
            .filter(|p| p.certificate.is_none())
            .map(|p| (p.spi, p.key.clone()));
        let key = sa.as_ref().map(|(spi, secret)| Key { spi: *spi, secret });
        if !key.is_some_and(|k| wire::verify(payload, k)) {
            self.warn("discovery authentication failed", now, || {
                format!("agent discovery request from {from} (identity {identity:?}) failed authentication")
            });
            return none(self.count("discovery_refused_auth"));
        }
        // The reply goes where the request came from: only to the identity's own address.
        let source = from.ip().to_canonical();
        if !self.servers[&identity]
            .real
            .iter()
            .any(|p| p.contains(source))
        {
            self.warn("discovery source", now, || {
                format!(
                    "agent discovery request of '{identity}' from {source}, not among its real \
                     addresses: refused"
                )
            });
            return none(self.count("discovery_refused_source"));
        }
        if !self.allow_rate(&format!("{identity}\0discovery"), now) {
            return none(self.count("discovery_dropped_rate_limited"));
        }
        let last = self.last_discovery.get(&identity).copied();
        let fresh = msg.options.mesg_id.is_some_and(|ts| {
            (ts >> 32).abs_diff(wall >> 32) <= self.replay_window
                && last.is_none_or(|l| ts > l)
                && ts >= self.started
        });
        if !fresh {
            self.warn("discovery replay", now, || {
                format!(
                    "agent discovery request of '{identity}' from {from} refused: no, a \
                     replayed or a stale timestamp"
                )
            });
            return none(self.count("discovery_refused_replay"));
        }
        let ts = msg.options.mesg_id.unwrap_or_default();
        self.last_discovery.insert(identity.clone(), ts);
        let lifetime = (self.max_lifetime.as_secs() / 4).clamp(1, u16::MAX as u64) as u16;
        let reply = Message {
            src: msg.dst,
            dst: msg.src,
            body: Body::DiscoveryReply {
                lifetime,
                agents: self.discovery_agents.clone(),
            },
            options: Options {
                mesg_id: Some(ts),
                ..Options::default()
            },
        };
        let key = key.expect("verified above");
        let payload = match wire::try_encode(&reply, Some(key)) {
            Ok(p) => p,
            Err(e) => {
                self.warn("discovery reply", now, || {
                    format!("agent discovery reply: {e}")
                });
                return none(self.count("discovery_reply_unencodable"));
            }
        };
        let counted = self.count("discovery_answered");
        Outcome {
            reply: Some(Reply { to: from, payload }),
            changed: false,
            counted,
        }
    }
}
