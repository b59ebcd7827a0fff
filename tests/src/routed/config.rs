//! The routed topology's agent configurations: configured servers, or registering servers
//! with the binding relay between every pair of agents; keys for both.
use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf};

use anyhow::Result;

use super::{Routed, A4, A6, AGENT_AS, B4, ROUTER_AS};
use crate::topology::{spi_of, HTTP_PORT};

/// Servers that register themselves, all with one agent, which relays every binding to
/// the others (every agent is every other's relay peer).
#[derive(Debug, Clone)]
pub struct Registering {
    /// The agent (0-based) the servers send their binding updates to.
    pub agent: usize,
    /// The lifetime the servers ask for.
    pub lifetime_secs: u64,
    /// The agents' `registration.drain_time` (a deregistered server keeps its open flows).
    pub drain_time_secs: u64,
    /// The servers' `--drain-timeout` (how long a deregistered server waits for its open
    /// connections before it exits).
    pub server_drain_secs: u64,
    /// The relay's `digest_interval_ms`.
    pub digest_interval_ms: u64,
}

impl Default for Registering {
    fn default() -> Self {
        Registering {
            agent: 0,
            lifetime_secs: 60,
            drain_time_secs: 30,
            server_drain_secs: 60,
            digest_interval_ms: 200,
        }
    }
}

/// The key file agents `a` and `b` (0-based) share, named after the pair.
pub fn pair_key_file(a: usize, b: usize) -> String {
    let (x, y) = (a.min(b) + 1, a.max(b) + 1);
    format!("a{x}a{y}.key")
}

/// 32 bytes of hex, different for every `seed`.
fn key_hex(seed: usize) -> String {
    (0..32)
        .map(|b| format!("{:02x}", (b * 11 + seed * 37 + 5) % 256))
        .collect()
}

impl Routed {
    /// Server `i`'s (from 1) key file.
    pub(super) fn server_key(&self, i: usize) -> PathBuf {
        self.dir.join(format!("s{i}.key"))
    }

    /// Registering servers: each server's key and each pair of agents' key, private to root
    /// (the agent and the server refuse anything else), each its own.
    pub(super) fn write_keys(&self) -> Result<()> {
        if self.options.registering.is_none() {
            return Ok(());
        }
        let mut files: Vec<(PathBuf, String)> = (1..=self.servers.len())
            .map(|i| (self.server_key(i), key_hex(i)))
            .collect();
        for a in 0..self.agents.len() {
            for b in a + 1..self.agents.len() {
                files.push((
                    self.dir.join(pair_key_file(a, b)),
                    key_hex(100 + 10 * a + b),
                ));
            }
        }
        for (path, key) in files {
            fs::write(&path, key)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    /// Agent k's (0-based) configuration: TCP health checks, routing towards the router
    /// (`routing_extra` merged into the `routing` section) and either the configured
    /// services (A on every server, B on server k only) or, with registering servers, only
    /// the policy of who may register for what and the relay to every other agent.
    pub fn write_config(&self, k: usize, routing_extra: serde_json::Value) -> Result<()> {
        let n = k + 1;
        let a = &self.agents[k];
        let pins = self.pin_directory(n);
        crate::topology::remove_pins(&pins);
        let mut routing = serde_json::json!({
            "local_as": AGENT_AS,
            "neighbors": [{"address": format!("10.73.1{n}.1"), "as": ROUTER_AS},
                          {"address": format!("fd73:1{n}::1"), "as": ROUTER_AS}],
            "bird_socket": a.bird.as_ref().map(|b| b.ctl.clone()),
            "bird_include": a.include,
            "poll_ms": 200,
        });
        if let (Some(r), Some(extra)) = (routing.as_object_mut(), routing_extra.as_object()) {
            for (key, v) in extra {
                r.insert(key.clone(), v.clone());
            }
        }
        let mut config = serde_json::json!({
            "interfaces": ["eth0", "eth1"],
            "agent_address": {"v4": format!("10.73.2.{}", 1 + n), "v6": format!("fd73:2::{}", 1 + n)},
            "state_directory": self.dir.join(format!("a{n}-state")),
            "pin_directory": pins,
            "health_checks": [{"type": "tcp", "interval_ms": 100, "timeout_ms": 80, "fall": 2, "rise": 2}],
            "routing": routing,
        });
        match &self.options.registering {
            None => config["services"] = self.static_services(n),
            Some(r) => config["registration"] = self.registration(k, r),
        }
        fs::write(&a.config, serde_json::to_string_pretty(&config)?)?;
        Ok(())
    }

    fn static_services(&self, n: usize) -> serde_json::Value {
        let all4: Vec<_> = (1..=self.servers.len())
            .map(|i| serde_json::json!({"name": format!("s{i}"), "address": format!("10.73.2.{}", 10 + i)}))
            .collect();
        let all6: Vec<_> = (1..=self.servers.len())
            .map(|i| serde_json::json!({"name": format!("s{i}"), "address": format!("fd73:2::{}", 10 + i)}))
            .collect();
        serde_json::json!([
            {"name": "a4", "address": A4.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": all4},
            {"name": "a6", "address": A6.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": all6},
            {"name": "b4", "address": B4.to_string(), "protocol": "tcp", "port": HTTP_PORT,
             "servers": [{"name": format!("s{n}"), "address": format!("10.73.2.{}", 10 + n)}]},
        ])
    }

    /// Who may register for what (A for every server, B for the last one), and the relay:
    /// every other agent a peer, on its servers' side address.
    fn registration(&self, k: usize, r: &Registering) -> serde_json::Value {
        let count = self.servers.len();
        let servers: Vec<_> = (1..=count)
            .map(|i| {
                let mut allow = vec![format!("{A4}/32"), format!("{A6}/128")];
                if i == count {
                    allow.push(format!("{B4}/32"));
                }
                let name = format!("s{i}");
                serde_json::json!({"id": name, "spi": spi_of(&name), "key_file": format!("s{i}.key"),
                    "allow": allow,
                    "real": [format!("10.73.2.{}/32", 10 + i), format!("fd73:2::{}/128", 10 + i)]})
            })
            .collect();
        let peers: Vec<_> = (0..self.agents.len())
            .filter(|&p| p != k)
            .map(|p| {
                serde_json::json!({"id": format!("a{}", p + 1), "address": format!("10.73.2.{}", 2 + p),
                    "key_file": pair_key_file(k, p)})
            })
            .collect();
        serde_json::json!({
            "drain_time": r.drain_time_secs,
            "servers": servers,
            "relay": {"id": format!("a{}", k + 1), "digest_interval_ms": r.digest_interval_ms,
                      "peers": peers},
        })
    }
}
