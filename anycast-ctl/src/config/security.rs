//! What a local mistake or a hostile member could turn against the agent, refused (or warned
//! about) before anything runs: prefixes with host bits, services on the agent's own
//! addresses, real addresses that are anycast addresses, keys and SPIs shared by two
//! identities, allow lists wider than the configured bound; and the control socket's groups.
use std::ffi::CString;

use super::*;

/// Who may use the control socket, besides root (see [`Config::control_access`]).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Group of the control socket (created 0660): its members may read (`status`,
    /// `bindings`, `flows`). Absent: the agent's own group.
    #[serde(default)]
    pub group: Option<String>,
    /// Members of this group may also change things (`drain`, `reload`). Absent: root only.
    #[serde(default)]
    pub admin_group: Option<String>,
}

/// The control groups resolved to group ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlAccess {
    pub group: Option<u32>,
    pub admin_group: Option<u32>,
}

pub const DEFAULT_WIDEST_ALLOW_V4: u8 = 24;
pub const DEFAULT_WIDEST_ALLOW_V6: u8 = 48;

pub(super) fn default_widest_allow_v4() -> u8 {
    DEFAULT_WIDEST_ALLOW_V4
}
pub(super) fn default_widest_allow_v6() -> u8 {
    DEFAULT_WIDEST_ALLOW_V6
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl Prefix {
    /// The prefix without host bits (`10.1.2.3/8` -> `10.0.0.0/8`), when it has any.
    pub fn without_host_bits(&self) -> Option<Prefix> {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        let host = width - self.len as u32;
        let mask = if host >= 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        let b = bits(self.addr);
        if b & mask == 0 {
            return None;
        }
        let net = b & !mask;
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4((net as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(net.into()),
        };
        Some(Prefix {
            addr,
            len: self.len,
        })
    }
}

fn host_bits(field: String, p: &Prefix) -> Result<(), ConfigError> {
    match p.without_host_bits() {
        Some(net) => Err(err(
            field,
            format!("{p} has host bits set; write {net} (or the single address)"),
        )),
        None => Ok(()),
    }
}

impl Config {
    /// The addresses the agent answers on: its own, and the discovery addresses all agents
    /// share (neither may be a service's, in an allow list or a real address).
    fn agent_addresses(&self) -> impl Iterator<Item = (&'static str, IpAddr)> + '_ {
        let discovery = self
            .registration
            .as_ref()
            .and_then(|r| r.discovery_address.clone())
            .unwrap_or_default();
        [
            ("agent_address.v4", self.agent_address.v4),
            ("agent_address.v6", self.agent_address.v6),
            ("registration.discovery_address.v4", discovery.v4),
            ("registration.discovery_address.v6", discovery.v6),
        ]
        .into_iter()
        .filter_map(|(f, a)| a.map(|a| (f, a)))
    }

    /// Whether `ip` is an anycast address of this configuration: a service's address, or an
    /// address a registered server may bind.
    pub fn is_anycast(&self, ip: IpAddr) -> bool {
        self.services.iter().any(|s| s.address == ip)
            || self
                .registration
                .iter()
                .flat_map(|r| &r.servers)
                .flat_map(|s| &s.allow)
                .any(|p| p.contains(ip))
    }

    /// The refusals of this module (called by `validate`).
    pub(super) fn validate_security(&self) -> Result<(), ConfigError> {
        for (i, p) in self.preferences.iter().enumerate() {
            for (j, c) in p.clients.iter().enumerate() {
                host_bits(format!("preferences[{i}].clients[{j}]"), c)?;
            }
        }
        // The policy first: a static server inside an allow list of everything is the
        // allow list's mistake.
        if let Some(r) = &self.registration {
            self.validate_policy(r)?;
        }
        for (i, s) in self.services.iter().enumerate() {
            // Traffic to the agent's own address (its binding updates among it) would be
            // tunnelled away.
            if let Some((f, _)) = self.agent_addresses().find(|&(_, a)| a == s.address) {
                return Err(err(
                    format!("services[{i}].address"),
                    format!("{} is the agent's own address ({f})", s.address),
                ));
            }
            for (j, srv) in s.servers.iter().enumerate() {
                let g = format!("services[{i}].servers[{j}].address");
                if let Some((f, _)) = self.agent_addresses().find(|&(_, a)| a == srv.address) {
                    return Err(err(
                        g,
                        format!("{} is the agent's own address ({f})", srv.address),
                    ));
                }
                // A packet tunnelled to an anycast address would come back to the agent, or
                // go to whoever binds that address.
                if self.is_anycast(srv.address) {
                    return Err(err(
                        g,
                        format!(
                            "{} is an anycast address (a service's, or one a registered \
                             server may bind): a real address must not be",
                            srv.address
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_policy(&self, r: &Registration) -> Result<(), ConfigError> {
        if !(1..=32).contains(&r.widest_allow_v4) {
            return Err(err(
                "registration.widest_allow_v4",
                format!("{} is not a prefix length 1-32", r.widest_allow_v4),
            ));
        }
        if !(1..=128).contains(&r.widest_allow_v6) {
            return Err(err(
                "registration.widest_allow_v6",
                format!("{} is not a prefix length 1-128", r.widest_allow_v6),
            ));
        }
        let mut spis = std::collections::HashMap::new();
        for (i, s) in r.servers.iter().enumerate() {
            // RFC 4285 section 5: the SPI names the security association (the key) between
            // one mobile node and the home agent; two identities must not share one.
            if let Some(other) = spis.insert(s.spi, s.id.as_str()) {
                return Err(err(
                    format!("registration.servers[{i}].spi"),
                    format!(
                        "{} is already the SPI of '{other}': each identity needs its own",
                        s.spi
                    ),
                ));
            }
            for (j, p) in s.allow.iter().enumerate() {
                let f = format!("registration.servers[{i}].allow[{j}]");
                host_bits(f.clone(), p)?;
                if p.len == 0 {
                    return Err(err(
                        f,
                        format!(
                            "{p} allows every address, the agent's and every server's real \
                             address among them: list the anycast addresses or prefixes"
                        ),
                    ));
                }
                if let Some((g, a)) = self.agent_addresses().find(|&(_, a)| p.contains(a)) {
                    return Err(err(
                        f,
                        format!(
                            "{p} holds the agent's own address {a} ({g}): a server could bind it"
                        ),
                    ));
                }
            }
            // A real address is where the agent tunnels to: never itself, never an anycast
            // address (the packets would come back to the agent, or go to its binder).
            for (j, p) in s.real.iter().enumerate() {
                let f = format!("registration.servers[{i}].real[{j}]");
                host_bits(f.clone(), p)?;
                if let Some((g, a)) = self.agent_addresses().find(|&(_, a)| p.contains(a)) {
                    return Err(err(
                        f,
                        format!("{p} holds the agent's own address {a} ({g})"),
                    ));
                }
                let anycast = self
                    .services
                    .iter()
                    .map(|svc| svc.address)
                    .chain(r.servers.iter().flat_map(|o| &o.allow).map(|q| q.addr))
                    .find(|&a| p.contains(a));
                if let Some(a) = anycast {
                    return Err(err(
                        f,
                        format!(
                            "{p} holds the anycast address {a}: a real address must not be one"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What is accepted but probably a mistake, each naming its field: allow lists wider
    /// than `registration.widest_allow_v4` / `widest_allow_v6`. `check` prints them, the
    /// agent logs them.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut out = self.routing_warnings();
        if let Some(a) = self.metrics.as_ref().and_then(|m| m.address().ok()) {
            // The endpoint has no authentication: every interface is likely more than meant.
            if a.ip().is_unspecified() {
                out.push(err(
                    "metrics.listen",
                    format!(
                        "{a} serves the metrics on every address of the host, without \
                         authentication; give a loopback or management address"
                    ),
                ));
            }
        }
        let Some(r) = &self.registration else {
            return out;
        };
        for (i, s) in r.servers.iter().enumerate() {
            for (j, p) in s.allow.iter().enumerate() {
                let (bound, key) = match p.addr {
                    IpAddr::V4(_) => (r.widest_allow_v4, "widest_allow_v4"),
                    IpAddr::V6(_) => (r.widest_allow_v6, "widest_allow_v6"),
                };
                if p.len < bound {
                    out.push(err(
                        format!("registration.servers[{i}].allow[{j}]"),
                        format!(
                            "{p} is wider than /{bound} (registration.{key}): '{}' may bind \
                             any of its {} addresses",
                            s.id,
                            if p.addr.is_ipv4() {
                                format!("2^{}", 32 - p.len as u32)
                            } else {
                                format!("2^{}", 128 - p.len as u32)
                            }
                        ),
                    ));
                }
            }
        }
        out
    }

    /// Resolves `control.group` and `control.admin_group` (names, or numeric ids) with the
    /// system's group database.
    pub fn control_access(&self) -> Result<ControlAccess, ConfigError> {
        let resolve = |field: &str, name: &Option<String>| -> Result<Option<u32>, ConfigError> {
            let Some(name) = name else {
                return Ok(None);
            };
            match group_id(name) {
                Some(gid) => Ok(Some(gid)),
                None => match name.parse::<u32>() {
                    Ok(gid) => Ok(Some(gid)),
                    Err(_) => Err(err(field, format!("no group named '{name}'"))),
                },
            }
        };
        Ok(ControlAccess {
            group: resolve("control.group", &self.control.group)?,
            admin_group: resolve("control.admin_group", &self.control.admin_group)?,
        })
    }
}

/// The id of the group `name` (getgrnam_r), if there is one.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `grp` and `buf` outlive the call; getgrnam_r writes only into them.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        return Some(grp.gr_gid);
    }
}
