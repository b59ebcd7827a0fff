//! A second agent, B, on the servers' bridge of a [`Topology`] (its own namespace, link,
//! state and pins; the topology's agent A is its relay peer), for the binding sync tests:
//! its configuration is A's with its own addresses and `registration.relay`.
use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    netns::{veth, Netns, Proc},
    topology::{remove_pins, Topology},
    workspace_bin,
};

/// Agent A: the topology's agent (its relay listens on its agent addresses).
pub const A_ADDR: &str = "10.71.1.2";
/// Agent B's addresses on the servers' bridge.
pub const B_ADDR: &str = "10.71.2.3";
pub const B_ADDR6: &str = "fd71:2::3";
pub const RELAY_PORT: u16 = 4192;

pub struct SecondAgent {
    pub ns: Netns,
    pub proc: Option<Proc>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pins: PathBuf,
    pub state: PathBuf,
}

impl SecondAgent {
    /// B in namespace `name` (also its pins' name), with A's configuration but for its
    /// addresses and `relay` (`registration.relay`), started and ready.
    pub fn start(topo: &Topology, name: &str, relay: serde_json::Value) -> Result<SecondAgent> {
        Self::start_with(topo, name, relay, |_, _| Ok(()))
    }

    /// As [`SecondAgent::start`], with `prepare` given B's namespace (its link up and
    /// addressed) and configuration before B starts.
    pub fn start_with(
        topo: &Topology,
        name: &str,
        relay: serde_json::Value,
        prepare: impl FnOnce(&Netns, &mut serde_json::Value) -> Result<()>,
    ) -> Result<SecondAgent> {
        let pins = PathBuf::from(format!("/sys/fs/bpf/anycast-tests/{name}-anycast"));
        remove_pins(&pins);
        let ns = Netns::new(name)?;
        veth(&ns, "eth0", &topo.net, "agb", 1600)?;
        topo.net.ip(&["link", "set", "agb", "master", "brs"])?;
        ns.ip(&["addr", "add", &format!("{B_ADDR}/24"), "dev", "eth0"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{B_ADDR6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["route", "add", "default", "via", "10.71.2.1"])?;
        ns.ip(&["-6", "route", "add", "default", "via", "fd71:2::1"])?;
        let mut config: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&topo.config_path)?)?;
        config["interfaces"] = serde_json::json!(["eth0"]);
        config["xdp_mode"] = serde_json::json!("generic");
        config["agent_address"] = serde_json::json!({"v4": B_ADDR, "v6": B_ADDR6});
        let state = topo.dir.join(format!("{name}-state"));
        config["state_directory"] = serde_json::json!(state);
        config["pin_directory"] = serde_json::json!(pins);
        config["registration"]["relay"] = relay;
        prepare(&ns, &mut config)?;
        let path = topo.dir.join(format!("{name}.json"));
        fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        let mut b = SecondAgent {
            ns,
            proc: None,
            config: path,
            socket: topo.dir.join(format!("{name}.sock")),
            pins,
            state,
        };
        b.spawn()?;
        Ok(b)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let ctl = workspace_bin("anycast-ctl")?;
        let mut proc = self.ns.spawn(
            "agent b",
            &ctl,
            &[
                "agent",
                "--config",
                &self.config.to_string_lossy(),
                "--socket",
                &self.socket.to_string_lossy(),
            ],
        )?;
        proc.wait_for_line("agent ready", Duration::from_secs(30))?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops B (SIGTERM) and starts it again without its bindings file: it starts empty,
    /// as a new agent would.
    pub fn restart_empty(&mut self) -> Result<()> {
        self.proc
            .take()
            .context("B runs")?
            .stop_with(libc::SIGTERM, Duration::from_secs(10))?;
        fs::remove_file(self.state.join("bindings.json"))?;
        self.spawn()
    }

    /// `anycast-ctl WHAT --json` against B.
    pub fn ctl_json(&self, what: &str) -> Result<serde_json::Value> {
        let ctl = workspace_bin("anycast-ctl")?;
        let socket = self.socket.to_string_lossy().into_owned();
        let out = self.ns.exec(
            &ctl.to_string_lossy(),
            &[what, "--json", "--socket", &socket],
        )?;
        serde_json::from_str(&out).with_context(|| format!("B: {what} --json"))
    }
}

impl Drop for SecondAgent {
    fn drop(&mut self) {
        // SIGTERM: a full stop removes its pins; whatever a failure left goes too.
        drop(self.proc.take());
        remove_pins(&self.pins);
    }
}

/// Sends `datagrams` to B's relay socket from address `from` of namespace `ns` (A's
/// namespace for envelopes from the peer, another for a stranger's).
pub fn send_to_b(ns: &Netns, from: &str, datagrams: Vec<Vec<u8>>) -> Result<()> {
    let from: std::net::IpAddr = from.parse()?;
    let to = std::net::SocketAddr::new(B_ADDR.parse()?, RELAY_PORT);
    ns.in_ns(move || {
        let sock = std::net::UdpSocket::bind(std::net::SocketAddr::new(from, 0))?;
        for d in datagrams {
            sock.send_to(&d, to)?;
        }
        Ok(())
    })
}

/// Sends an envelope in A's name, from A's address, until B takes it (`taken` on B's
/// `bindings --json`). B refuses as a replay any envelope from A not newer than the last it
/// took from A, and A's own digests go out every interval: one may reach B between the
/// moment the test stamps its envelope and its arrival. So each try is made afresh by
/// `make`, and a try B counts as a replay is made again (at most five tries).
pub fn send_as_a(
    b: &SecondAgent,
    a_ns: &Netns,
    make: impl Fn() -> Vec<u8>,
    taken: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    let replays = |v: &serde_json::Value| {
        v["relay"]["counters"]["relay_refused_replay"]
            .as_u64()
            .unwrap_or(0)
    };
    for _ in 0..5 {
        let before = replays(&b.ctl_json("bindings")?);
        send_to_b(a_ns, A_ADDR, vec![make()])?;
        let mut took = false;
        crate::wait_until(
            "B takes the envelope or refuses it as a replay",
            Duration::from_secs(2),
            || {
                let now = b.ctl_json("bindings")?;
                took = taken(&now);
                Ok(took || replays(&now) > before)
            },
        )?;
        if took {
            return Ok(());
        }
    }
    anyhow::bail!("B refused five fresh envelopes from A as replays")
}
