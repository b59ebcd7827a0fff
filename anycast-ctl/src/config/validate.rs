//! Everything that can be checked without the running system (interfaces are checked when
//! attaching); every error names its field.
use super::*;

impl Config {
    /// Checks everything that does not need the running system (interfaces are checked when
    /// attaching).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interfaces.is_empty() {
            return Err(err("interfaces", "at least one interface is needed"));
        }
        if let Some(m) = &self.metrics {
            m.address()?;
        }
        if let Some(name) = &self.instance {
            if !valid_instance_name(name) {
                return Err(err(
                    "instance",
                    format!(
                        "'{name}' is not a valid instance name: 1 to 64 letters, digits, '_' \
                         or '-'"
                    ),
                ));
            }
        }
        for (field, dir) in [
            ("state_directory", &self.state_directory),
            ("pin_directory", &self.pin_directory),
        ] {
            if dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                return Err(err(field, "must be an absolute path"));
            }
        }
        let mut seen = HashSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains('/') {
                return Err(err(
                    format!("interfaces[{i}]"),
                    format!("'{name}' is not a valid interface name"),
                ));
            }
            if !seen.insert(name) {
                return Err(err(
                    format!("interfaces[{i}]"),
                    format!("'{name}' is listed twice"),
                ));
            }
        }
        match self.agent_address.v4 {
            Some(IpAddr::V6(a)) => {
                return Err(err(
                    "agent_address.v4",
                    format!("{a} is not an IPv4 address"),
                ))
            }
            Some(a) if a.is_unspecified() || a.is_multicast() => {
                return Err(err(
                    "agent_address.v4",
                    format!("{a} cannot be a tunnel source"),
                ))
            }
            _ => {}
        }
        match self.agent_address.v6 {
            Some(IpAddr::V4(a)) => {
                return Err(err(
                    "agent_address.v6",
                    format!("{a} is not an IPv6 address"),
                ))
            }
            Some(a) if a.is_unspecified() || a.is_multicast() => {
                return Err(err(
                    "agent_address.v6",
                    format!("{a} cannot be a tunnel source"),
                ))
            }
            _ => {}
        }
        if self.agent_address.v4.is_none() && self.agent_address.v6.is_none() {
            return Err(err("agent_address", "give at least one of v4 and v6"));
        }
        if !(2..=MAX_RING_SIZE).contains(&self.ring_size) || !table::is_prime(self.ring_size) {
            return Err(err(
                "ring_size",
                format!(
                    "{} is not a prime between 2 and {MAX_RING_SIZE}",
                    self.ring_size
                ),
            ));
        }
        if self.max_services == 0 {
            return Err(err("max_services", "must be at least 1"));
        }
        if self.max_services > 65536 {
            // A server slot names its service in 16 bits.
            return Err(err("max_services", "must be at most 65536"));
        }
        let ring_entries = 2u64 * self.max_services as u64 * self.ring_size as u64;
        if ring_entries > u32::MAX as u64 {
            return Err(err(
                "max_services",
                "max_services * ring_size * 2 exceeds the map's index range",
            ));
        }
        if self.max_flows == 0 {
            return Err(err("max_flows", "must be at least 1"));
        }
        let most = crate::dataplane::MAX_TOO_BIG_ANSWERS_PER_SECOND;
        if !(1..=most).contains(&self.too_big_answers_per_second) {
            return Err(err(
                "too_big_answers_per_second",
                format!("must be 1 to {most} (set answer_too_big to false for none)"),
            ));
        }
        let most = crate::dataplane::MAX_UNSEEN_PINS_PER_SECOND;
        if !(1..=most).contains(&self.unseen_pins_per_second) {
            return Err(err(
                "unseen_pins_per_second",
                format!("must be 1 to {most}"),
            ));
        }
        if self.services.len() > self.max_services as usize {
            return Err(err(
                "services",
                format!(
                    "{} services but max_services is {}",
                    self.services.len(),
                    self.max_services
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        let mut server_count = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let f = |field: &str| format!("services[{i}].{field}");
            if s.name.is_empty() {
                return Err(err(f("name"), "must not be empty"));
            }
            if !names.insert(s.name.as_str()) {
                return Err(err(
                    f("name"),
                    format!("'{}' is used by another service", s.name),
                ));
            }
            if s.address.is_unspecified() || s.address.is_multicast() || s.address.is_loopback() {
                return Err(err(
                    f("address"),
                    format!("{} cannot be an anycast address", s.address),
                ));
            }
            if !keys.insert((s.address, s.protocol, s.port)) {
                return Err(err(
                    f("address"),
                    format!(
                        "{} {} port {} is already another service",
                        s.address, s.protocol, s.port
                    ),
                ));
            }
            let mut server_names = HashSet::new();
            let mut server_addrs = HashSet::new();
            for (j, srv) in s.servers.iter().enumerate() {
                let g = |field: &str| format!("services[{i}].servers[{j}].{field}");
                if srv.name.is_empty() {
                    return Err(err(g("name"), "must not be empty"));
                }
                if !server_names.insert(srv.name.as_str()) {
                    return Err(err(
                        g("name"),
                        format!("'{}' is used by another server of this service", srv.name),
                    ));
                }
                if srv.address.is_unspecified()
                    || srv.address.is_multicast()
                    || srv.address.is_loopback()
                {
                    return Err(err(
                        g("address"),
                        format!("{} cannot be a server's real address", srv.address),
                    ));
                }
                if !server_addrs.insert(srv.address) {
                    return Err(err(
                        g("address"),
                        format!("{} is already another server of this service", srv.address),
                    ));
                }
                let (family, have) = match srv.address {
                    IpAddr::V4(_) => ("v4", self.agent_address.v4.is_some()),
                    IpAddr::V6(_) => ("v6", self.agent_address.v6.is_some()),
                };
                if !have {
                    return Err(err(
                        g("address"),
                        format!("{} needs an IP{family} tunnel source, but agent_address.{family} is not set", srv.address),
                    ));
                }
                if srv.weight > MAX_WEIGHT {
                    return Err(err(
                        g("weight"),
                        format!("{} is above the maximum {MAX_WEIGHT}", srv.weight),
                    ));
                }
            }
            for (j, c) in s.health_checks.iter().flatten().enumerate() {
                c.validate(&format!("services[{i}].health_checks[{j}]"))
                    .map_err(|e| match e.split_once(": ") {
                        Some((f, why)) => err(f, why),
                        None => err(format!("services[{i}].health_checks[{j}]"), e),
                    })?;
                let needs_port = matches!(
                    c.kind,
                    crate::health::CheckKind::Tcp { port: None }
                        | crate::health::CheckKind::Http { port: None, .. }
                );
                if needs_port && s.port == 0 {
                    return Err(err(
                        format!("services[{i}].health_checks[{j}].port"),
                        "a TCP or HTTP check of an every-port service needs a port",
                    ));
                }
            }
            server_count += s.servers.len();
        }
        if server_count > MAX_SERVERS as usize {
            return Err(err(
                "services",
                format!("{server_count} servers in all, the maximum is {MAX_SERVERS}"),
            ));
        }
        let t = &self.flow_timeouts;
        for (name, v) in [
            ("tcp_idle", t.tcp_idle),
            ("udp_idle", t.udp_idle),
            ("tcp_closing", t.tcp_closing),
        ] {
            if v == 0 {
                return Err(err(
                    format!("flow_timeouts.{name}"),
                    "must be at least 1 second",
                ));
            }
        }
        for (i, p) in self.preferences.iter().enumerate() {
            if p.clients.is_empty() || p.servers.is_empty() {
                return Err(err(
                    format!("preferences[{i}]"),
                    "needs at least one client prefix and one server",
                ));
            }
        }
        if self.preferences.len() > self.max_preference_tables as usize {
            return Err(err(
                "preferences",
                format!(
                    "{} preferences but max_preference_tables is {}",
                    self.preferences.len(),
                    self.max_preference_tables
                ),
            ));
        }
        let entries = 2u64
            * (self.max_services as u64 + self.max_preference_tables as u64)
            * self.ring_size as u64;
        if entries > u32::MAX as u64 {
            return Err(err("max_services", "2 * (max_services + max_preference_tables) * ring_size exceeds the map's index range"));
        }
        for (i, c) in self.health_checks.iter().enumerate() {
            c.validate(&format!("health_checks[{i}]"))
                .map_err(|e| match e.split_once(": ") {
                    Some((f, why)) => err(f, why),
                    None => err(format!("health_checks[{i}]"), e),
                })?;
        }
        if let Some(r) = &self.registration {
            r.validate()?;
            if let Some(relay) = &r.relay {
                self.validate_relay(relay, r.port)?;
            }
            if let Some(d) = &r.discovery_address {
                self.validate_discovery(d)?;
            }
            if let Some(c) = &r.certificates {
                self.validate_certificates(c)?;
            }
        }
        self.validate_security()?;
        self.validate_routing()
    }
}

impl Config {
    /// `registration.discovery_address`: unicast addresses of their fields' families, not
    /// the agent's own (the checks against services, allow and real lists are the agent
    /// addresses', in `security`).
    fn validate_discovery(&self, d: &super::AgentAddress) -> Result<(), ConfigError> {
        if d.v4.is_none() && d.v6.is_none() {
            return Err(err(
                "registration.discovery_address",
                "give at least one of v4 and v6",
            ));
        }
        // A reply lists this agent and every peer, in a bounded reply.
        let peers = self
            .registration
            .as_ref()
            .and_then(|r| r.relay.as_ref())
            .map_or(0, |r| r.peers.len());
        let most = anycast_common::wire::MAX_DISCOVERY_AGENTS - 1;
        if peers > most {
            return Err(err(
                "registration.discovery_address",
                format!("a discovery reply lists at most {most} peers beside this agent; registration.relay.peers has {peers}"),
            ));
        }
        for (family, a, v4) in [("v4", d.v4, true), ("v6", d.v6, false)] {
            let Some(a) = a else { continue };
            let f = format!("registration.discovery_address.{family}");
            if a.is_ipv4() != v4 {
                return Err(err(f, format!("{a} is not an IP{family} address")));
            }
            let broadcast = matches!(a, IpAddr::V4(x) if x.is_broadcast());
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() || broadcast {
                return Err(err(f, format!("{a} is not a unicast address")));
            }
            if Some(a) == self.agent_address.v4 || Some(a) == self.agent_address.v6 {
                return Err(err(
                    f,
                    format!("{a} is this agent's own address: give the address all agents share"),
                ));
            }
        }
        Ok(())
    }

    fn validate_relay(
        &self,
        relay: &super::RelayConfig,
        registration_port: u16,
    ) -> Result<(), ConfigError> {
        if relay.id.is_empty() || relay.id.len() > 64 {
            return Err(err("registration.relay.id", "must be 1-64 bytes"));
        }
        if relay.port == 0 || relay.port == registration_port {
            return Err(err(
                "registration.relay.port",
                "must be neither 0 nor registration.port",
            ));
        }
        if !(100..=60_000).contains(&relay.digest_interval_ms) {
            return Err(err(
                "registration.relay.digest_interval_ms",
                format!("{} is not between 100 and 60000", relay.digest_interval_ms),
            ));
        }
        if relay.peers.is_empty() {
            return Err(err("registration.relay.peers", "lists no peer"));
        }
        let ours: Vec<IpAddr> = self
            .agent_address
            .v4
            .into_iter()
            .chain(self.agent_address.v6)
            .collect();
        let mut ids = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, p) in relay.peers.iter().enumerate() {
            let f = |field: &str| format!("registration.relay.peers[{i}].{field}");
            if p.id.is_empty() || p.id.len() > 64 {
                return Err(err(f("id"), "must be 1-64 bytes"));
            }
            if p.id == relay.id {
                return Err(err(f("id"), "is this agent's own registration.relay.id"));
            }
            if !ids.insert(p.id.as_str()) {
                return Err(err(f("id"), format!("'{}' is listed twice", p.id)));
            }
            // Relay messages are told apart by their source address.
            if !addresses.insert(p.address) {
                return Err(err(f("address"), format!("{} is listed twice", p.address)));
            }
            if ours.contains(&p.address) {
                return Err(err(f("address"), "is this agent's own address"));
            }
            if !ours.iter().any(|a| a.is_ipv4() == p.address.is_ipv4()) {
                return Err(err(
                    f("address"),
                    format!(
                        "{} needs an agent_address of its family to send from",
                        p.address
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Registration {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(err("registration.port", "must not be 0"));
        }
        // Lifetimes travel in 4-second units in a 16-bit field.
        if self.max_lifetime < 4 || self.max_lifetime > 65535 * 4 {
            return Err(err(
                "registration.max_lifetime",
                format!(
                    "{} is not between 4 and {} seconds",
                    self.max_lifetime,
                    65535 * 4
                ),
            ));
        }
        if self.replay_window == 0 {
            return Err(err(
                "registration.replay_window",
                "must be at least 1 second",
            ));
        }
        let l = &self.limits;
        for (name, v) in [
            ("bindings_per_address", l.bindings_per_address),
            ("bindings_per_server", l.bindings_per_server),
            ("messages_per_second", l.messages_per_second),
            (
                "unauthenticated_replies_per_second",
                l.unauthenticated_replies_per_second,
            ),
        ] {
            if v == 0 {
                return Err(err(
                    format!("registration.limits.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if !(65_536..=1 << 30).contains(&l.socket_buffer_bytes) {
            return Err(err(
                "registration.limits.socket_buffer_bytes",
                format!("{} is not between 65536 and 1 GiB", l.socket_buffer_bytes),
            ));
        }
        if let Some(p) = self.probe {
            if p.interval_ms < 10
                || p.timeout_ms == 0
                || p.timeout_ms >= p.interval_ms
                || p.misses == 0
            {
                return Err(err(
                    "registration.probe",
                    "needs interval_ms >= 10, 0 < timeout_ms < interval_ms and misses >= 1",
                ));
            }
        }
        if let Some(r) = self.reverse_tunnel {
            if !(MIN_SUSPECT_AFTER_MS..=3_600_000).contains(&r.suspect_after_ms) {
                return Err(err(
                    "registration.reverse_tunnel.suspect_after_ms",
                    format!(
                        "{} is not between {MIN_SUSPECT_AFTER_MS} and 3600000",
                        r.suspect_after_ms
                    ),
                ));
            }
            if self.probe.is_none() {
                return Err(err(
                    "registration.reverse_tunnel",
                    "needs registration.probe: its refresh requests confirm a suspicion",
                ));
            }
        }
        let mut ids = HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let f = |field: &str| format!("registration.servers[{i}].{field}");
            if s.id.is_empty() || s.id.len() > 254 {
                return Err(err(f("id"), "must be 1-254 characters"));
            }
            if !ids.insert(s.id.as_str()) {
                return Err(err(f("id"), format!("'{}' is listed twice", s.id)));
            }
            if s.allow.is_empty() {
                return Err(err(
                    f("allow"),
                    "lists no address: the server could bind nothing",
                ));
            }
            if s.real.is_empty() {
                return Err(err(
                    f("real"),
                    "lists no address: the server could bind through nothing",
                ));
            }
        }
        Ok(())
    }
}

/// An instance name is a single path component of a few safe characters (bpffs refuses
/// dots).
pub fn valid_instance_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}
