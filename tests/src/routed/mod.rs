//! Several agents behind a router, each announcing the anycast addresses with its own BIRD 2
//! speaker; the router runs BIRD too and installs the agents' routes as one multipath route.
//! Everything in namespaces this code creates, addresses in 10.73.0.0/16 and fd73::/16:
//!
//! ```text
//!  client 1 ── rc  router (BIRD, ECMP)  ra1 ── eth0 agent 1 (BIRD, anycast-ctl agent) eth1 ─┐
//!  10.73.1.10      10.73.1.1            ra2 ── eth0 agent 2 (BIRD, anycast-ctl agent) eth1 ─┤
//!  client 2 ── rc2 10.73.3.1            ...                                                 │
//!  10.73.3.10      brs 10.73.2.1 ───────────────────────────────────────────────────────────┴── s1 s2 s3
//! ```
//! Agent k talks BGP and BFD with the router over 10.73.1k.0/24 and fd73:1k::/64, tunnels to
//! the servers on the servers' bridge (10.73.2.0/24, fd73:2::/64), whose replies go to the
//! clients through the router.
//!
//! Two ways to tell the agents about the servers ([`Options::registering`]): configured
//! (static services, each agent its own server for B), or registering: the servers run
//! `anycast-ctl server` and register with one agent, which relays every binding to the
//! others (binding sync, `registration.relay`), so every agent builds the same tables.
mod bird;
mod config;
mod servers;

pub use bird::{Bird, RouteMonitor};
pub use config::{pair_key_file, Registering};

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    netns::{veth, Netns, Proc},
    wait_until, workspace_bin,
};

/// Served by every server through every agent.
pub const A4: Ipv4Addr = Ipv4Addr::new(10, 73, 100, 1);
pub const A6: Ipv6Addr = Ipv6Addr::new(0xfd73, 0x100, 0, 0, 0, 0, 0, 1);
/// Configured servers: served through agent k by server k only, so each agent's health view
/// of it is its own. Registering servers: served by the last server only.
pub const B4: Ipv4Addr = Ipv4Addr::new(10, 73, 100, 2);
/// The UDP port the servers' test service answers on (registering servers only).
pub const UDP_PORT: u16 = crate::topology::UDP_PORT;
const ROUTER_AS: u32 = 65000;
const AGENT_AS: u32 = 65001;
const MTU: u32 = 1600;

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    pub servers: usize,
    /// 1 or 2 client namespaces.
    pub clients: usize,
    /// The servers register themselves (and the agents relay their bindings) instead of
    /// being configured on every agent.
    pub registering: Option<Registering>,
}

pub struct Agent {
    pub agent: Option<Proc>,
    pub bird: Option<Bird>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub include: PathBuf,
    /// The router's port towards this agent: how its routes' next hops are told apart.
    pub router_port: String,
    pub ns: Netns,
}

pub struct Routed {
    pub agents: Vec<Agent>,
    /// Per server: `anycast-ctl server`, the test service, the namespace.
    pub servers: Vec<(Option<Proc>, Option<Proc>, Netns)>,
    pub router_bird: Option<Bird>,
    pub passthrough: Option<Proc>,
    /// Client 1 behind the router's `rc`, client 2 behind `rc2`.
    pub clients: Vec<Netns>,
    pub router: Netns,
    pub dir: PathBuf,
    pub options: Options,
}

impl Routed {
    /// Builds the namespaces, starts the router's BIRD, every configured server and every
    /// agent's BIRD; the agents themselves start with `start_agent` (then registering
    /// servers with `start_server`). Static servers, one client.
    pub fn build(prefix: &str, agents: usize, servers: usize) -> Result<Routed> {
        Routed::build_with(
            prefix,
            Options {
                agents,
                servers,
                clients: 1,
                registering: None,
            },
        )
    }

    pub fn build_with(prefix: &str, options: Options) -> Result<Routed> {
        let dir = std::env::temp_dir().join(format!("{prefix}-routed"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let router = Netns::new(&format!("{prefix}r"))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // Deterministic 5-tuple hashing (policy 1 on veth hashes the sending socket's
            // skb->hash instead): source and destination address, protocol, ports.
            ("net.ipv4.fib_multipath_hash_policy", "3"),
            ("net.ipv4.fib_multipath_hash_fields", "0x0037"),
            ("net.ipv6.fib_multipath_hash_policy", "3"),
            ("net.ipv6.fib_multipath_hash_fields", "0x0037"),
        ] {
            router.sysctl(k, v)?;
        }
        let mut clients = Vec::new();
        for c in 1..=options.clients.clamp(1, 2) {
            // Client 1 on 10.73.1.0/24 (as it always was), client 2 on 10.73.3.0/24.
            let (name, port, net) = match c {
                1 => (format!("{prefix}c"), "rc".to_string(), 1),
                _ => (format!("{prefix}c{c}"), format!("rc{c}"), 3),
            };
            let client = Netns::new(&name)?;
            veth(&client, "eth0", &router, &port, 1500)?;
            // Full checksums from the client (see topology.rs: veth leaves them to "hardware").
            client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
            client.ip(&["addr", "add", &format!("10.73.{net}.10/24"), "dev", "eth0"])?;
            client.ip(&[
                "addr",
                "add",
                &format!("fd73:{net}::10/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            client.ip(&["route", "add", "default", "via", &format!("10.73.{net}.1")])?;
            client.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd73:{net}::1"),
            ])?;
            router.ip(&["addr", "add", &format!("10.73.{net}.1/24"), "dev", &port])?;
            router.ip(&[
                "addr",
                "add",
                &format!("fd73:{net}::1/64"),
                "dev",
                &port,
                "nodad",
            ])?;
            clients.push(client);
        }
        router.ip(&[
            "link",
            "add",
            "brs",
            "mtu",
            &MTU.to_string(),
            "type",
            "bridge",
        ])?;
        router.ip(&["link", "set", "brs", "up"])?;
        router.ip(&["addr", "add", "10.73.2.1/24", "dev", "brs"])?;
        router.ip(&["addr", "add", "fd73:2::1/64", "dev", "brs", "nodad"])?;

        let (agents, servers) = (options.agents, options.servers);
        let mut routed = Routed {
            agents: Vec::new(),
            servers: Vec::new(),
            router_bird: None,
            passthrough: None,
            clients,
            router,
            dir,
            options,
        };
        let mut peers = String::new();
        let mut xdp_peers = Vec::new();
        for k in 1..=agents {
            let ns = Netns::new(&format!("{prefix}a{k}"))?;
            let (rp, sp) = (format!("ra{k}"), format!("sa{k}"));
            veth(&ns, "eth0", &routed.router, &rp, MTU)?;
            veth(&ns, "eth1", &routed.router, &sp, MTU)?;
            routed.router.ip(&["link", "set", &sp, "master", "brs"])?;
            routed
                .router
                .ip(&["addr", "add", &format!("10.73.1{k}.1/24"), "dev", &rp])?;
            routed.router.ip(&[
                "addr",
                "add",
                &format!("fd73:1{k}::1/64"),
                "dev",
                &rp,
                "nodad",
            ])?;
            ns.ip(&["addr", "add", &format!("10.73.1{k}.2/24"), "dev", "eth0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("fd73:1{k}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("10.73.2.{}/24", 1 + k),
                "dev",
                "eth1",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("fd73:2::{}/64", 1 + k),
                "dev",
                "eth1",
                "nodad",
            ])?;
            // Frames the agent redirects to eth1 reach the peer only if it runs XDP.
            xdp_peers.push(sp);
            peers.push_str(&format!(
                "protocol bgp a{k}v4 from agent4 {{ neighbor 10.73.1{k}.2 as {AGENT_AS}; }}\n\
                 protocol bgp a{k}v6 from agent6 {{ neighbor fd73:1{k}::2 as {AGENT_AS}; }}\n"
            ));
            let include_dir = routed.dir.join(format!("a{k}-bird.d"));
            fs::create_dir_all(&include_dir)?;
            let conf = routed.dir.join(format!("a{k}-bird.conf"));
            fs::write(
                &conf,
                format!(
                    "router id 10.73.1{k}.2;\nprotocol device {{}}\ninclude \"{}/*.conf\";\n",
                    include_dir.display()
                ),
            )?;
            let bird = Bird::start(
                &ns,
                &format!("bird a{k}"),
                &conf,
                &routed.dir.join(format!("a{k}-bird.ctl")),
            )?;
            routed.agents.push(Agent {
                agent: None,
                bird: Some(bird),
                config: routed.dir.join(format!("a{k}.json")),
                socket: routed.dir.join(format!("a{k}.sock")),
                include: include_dir.join("anycast.conf"),
                router_port: rp,
                ns,
            });
        }
        let conf = routed.dir.join("router-bird.conf");
        fs::write(
            &conf,
            format!(
                "router id 10.73.1.1;\nprotocol device {{}}\n\
                 protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
                 protocol kernel k6 {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
                 protocol bfd {{ interface \"ra*\" {{ min rx interval 100 ms; min tx interval \
                 100 ms; multiplier 3; }}; }}\n\
                 template bgp agent4 {{ local as {ROUTER_AS}; bfd on; error wait time 5, 30;\n  \
                 ipv4 {{ import where net ~ [ 10.73.100.0/24+ ]; export none; }}; }}\n\
                 template bgp agent6 {{ local as {ROUTER_AS}; bfd on; error wait time 5, 30;\n  \
                 ipv6 {{ import where net ~ [ fd73:100::/64+ ]; export none; }}; }}\n{peers}"
            ),
        )?;
        routed.router_bird = Some(Bird::start(
            &routed.router,
            "bird router",
            &conf,
            &routed.dir.join("router-bird.ctl"),
        )?);
        let mut args = vec!["passthrough", "--xdp-mode", "native"];
        for p in &xdp_peers {
            args.extend(["--iface", p.as_str()]);
        }
        let mut pass = routed
            .router
            .spawn("passthrough", &workspace_bin("anycast-ctl")?, &args)?;
        pass.wait_for_line("passthrough ready", Duration::from_secs(20))?;
        routed.passthrough = Some(pass);
        for i in 1..=servers {
            routed.add_server(prefix, i)?;
        }
        routed.write_keys()?;
        Ok(routed)
    }

    /// Agent `n`'s (from 1) pinned maps and links.
    fn pin_directory(&self, n: usize) -> PathBuf {
        Path::new("/sys/fs/bpf/anycast-tests").join(format!(
            "{}-a{n}",
            self.dir.file_name().unwrap_or_default().to_string_lossy()
        ))
    }

    pub fn start_agent(&mut self, k: usize) -> Result<()> {
        let a = &mut self.agents[k];
        let mut p = a.ns.spawn(
            &format!("agent a{}", k + 1),
            &workspace_bin("anycast-ctl")?,
            &[
                "agent",
                "--config",
                &a.config.to_string_lossy(),
                "--socket",
                &a.socket.to_string_lossy(),
            ],
        )?;
        p.wait_for_line("agent ready", Duration::from_secs(30))?;
        a.agent = Some(p);
        Ok(())
    }

    /// Follows the router's routing table (see [`RouteMonitor`]).
    pub fn monitor(&self) -> Result<RouteMonitor> {
        RouteMonitor::start(&self.router)
    }

    /// Agent k's answer to a control request (`status`, `bindings`, `flows`), read from its
    /// control socket directly: one JSON line each way, a millisecond or so, where running
    /// `anycast-ctl status --json` costs a process. The same JSON as `--json` prints, with
    /// the answer's `result` beside it (`flows` under the key `flows`).
    pub fn query(&self, k: usize, request: &str) -> Result<serde_json::Value> {
        let socket = &self.agents[k].socket;
        let mut s = UnixStream::connect(socket)
            .with_context(|| format!("agent a{}'s control socket", k + 1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        writeln!(s, "{}", serde_json::json!({ "request": request }))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("a{}: {request}", k + 1))?;
        if v["result"] == "error" {
            bail!("a{}: {request}: {}", k + 1, v["message"]);
        }
        Ok(v)
    }

    /// Agent k's `status --json`.
    pub fn status(&self, k: usize) -> Result<serde_json::Value> {
        self.query(k, "status")
    }

    /// Agent k's `bindings --json`.
    pub fn bindings(&self, k: usize) -> Result<serde_json::Value> {
        self.query(k, "bindings")
    }

    /// Agent k's `anycast-ctl` with `args` and its control socket, as an operator runs it.
    pub fn ctl(&self, k: usize, args: &[&str]) -> Result<String> {
        let a = &self.agents[k];
        let socket = a.socket.to_string_lossy().into_owned();
        let mut args = args.to_vec();
        args.extend(["--socket", &socket]);
        a.ns.exec(&workspace_bin("anycast-ctl")?.to_string_lossy(), &args)
    }

    /// Stops agent k's controller with `signal` (SIGKILL: its data path stays pinned and
    /// forwarding, its liveness device goes, its routes are withdrawn).
    pub fn stop_agent(&mut self, k: usize, signal: i32) -> Result<()> {
        let mut p = self.agents[k]
            .agent
            .take()
            .with_context(|| format!("agent a{} does not run", k + 1))?;
        p.stop_with(signal, Duration::from_secs(10))?;
        Ok(())
    }

    /// SIGKILLs agent k's BIRD.
    pub fn kill_bird(&mut self, k: usize) -> Result<()> {
        self.agents[k]
            .bird
            .take()
            .with_context(|| format!("BIRD of a{} does not run", k + 1))?
            .proc
            .stop_with(libc::SIGKILL, Duration::from_secs(5))?;
        Ok(())
    }

    /// Starts agent k's BIRD again (same configuration and control socket).
    pub fn start_bird(&mut self, k: usize) -> Result<()> {
        let n = k + 1;
        let (conf, ctl) = (
            self.dir.join(format!("a{n}-bird.conf")),
            self.dir.join(format!("a{n}-bird.ctl")),
        );
        self.agents[k].bird = Some(Bird::start(
            &self.agents[k].ns,
            &format!("bird a{n}"),
            &conf,
            &ctl,
        )?);
        Ok(())
    }

    /// Agent k goes silent towards the router, or speaks again: every frame it sends on its
    /// uplink dropped (`tc qdisc replace dev eth0 root blackhole`: no BGP, no BFD), while
    /// what reaches it is still forwarded to the servers on eth1.
    pub fn silence(&self, k: usize, silent: bool) -> Result<()> {
        let ns = &self.agents[k].ns;
        if silent {
            ns.exec(
                "tc",
                &["qdisc", "replace", "dev", "eth0", "root", "blackhole"],
            )?;
        } else {
            ns.exec("tc", &["qdisc", "del", "dev", "eth0", "root"])?;
        }
        Ok(())
    }

    /// The router port (`ra1`, ...) the router sends a TCP flow from client `c` (0-based),
    /// port `sport`, to `dst` through: its FIB's answer for the 5-tuple, which with hash
    /// policy 3 is the agent the flow's packets reach (IPv4: `ip -6 route get` ignores
    /// ports).
    pub fn agent_of(&self, c: usize, sport: u16, dst: SocketAddr) -> Result<String> {
        let (client, iif) = match c {
            0 => ("10.73.1.10", "rc".to_string()),
            _ => ("10.73.3.10", format!("rc{}", c + 1)),
        };
        let out = self.router.ip(&[
            "route",
            "get",
            &dst.ip().to_string(),
            "from",
            client,
            "iif",
            &iif,
            "ipproto",
            "tcp",
            "sport",
            &sport.to_string(),
            "dport",
            &dst.port().to_string(),
        ])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "dev")
            .map(|w| w[1].to_string())
            .with_context(|| format!("no device in {out:?}"))
    }

    /// The announcement state agent k reports for a prefix (`10.73.100.1/32`).
    pub fn prefix_state(&self, k: usize, prefix: &str) -> Result<String> {
        let s = self.status(k)?;
        Ok(s["routing"]["prefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["prefix"] == prefix)
            .and_then(|p| p["state"].as_str())
            .unwrap_or("absent")
            .to_string())
    }

    /// Packets agent k forwarded for a service.
    pub fn service_packets(&self, k: usize, service: &str) -> Result<u64> {
        let s = self.status(k)?;
        s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == service)
            .and_then(|x| x["packets"].as_u64())
            .with_context(|| format!("no service {service} in agent {k}'s status"))
    }

    /// The router's ports its route to `addr` leads through (one per agent announcing it).
    pub fn next_hops(&self, addr: IpAddr) -> Result<Vec<String>> {
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let out = self
            .router
            .ip(&[family, "route", "show", &addr.to_string()])?;
        let mut ports: Vec<String> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "dev")
            .map(|w| w[1].to_string())
            .collect();
        ports.sort();
        ports.dedup();
        Ok(ports)
    }

    /// Waits until the router's route to `addr` leads through exactly `ports`.
    pub fn wait_next_hops(&self, addr: IpAddr, ports: &[&str], timeout: Duration) -> Result<()> {
        let want: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        wait_until(
            &format!("the router's route to {addr} through {ports:?}"),
            timeout,
            || Ok(self.next_hops(addr)? == want),
        )
    }

    /// Makes `count` HTTP connections to `addr` from client 1, each from a new port;
    /// returns the servers that answered, or the first failure.
    pub fn connect_many(&self, addr: SocketAddr, count: usize) -> Result<Vec<String>> {
        self.connect_many_from(0, addr, count)
    }

    /// The same from client `c` (0-based).
    pub fn connect_many_from(
        &self,
        c: usize,
        addr: SocketAddr,
        count: usize,
    ) -> Result<Vec<String>> {
        let ns = Netns {
            name: self.clients[c].name.clone(),
        };
        let r = ns.in_ns(move || {
            (0..count)
                .map(|_| crate::topology::http_get_within(addr, Duration::from_secs(2)))
                .collect::<Result<Vec<_>>>()
        });
        std::mem::forget(ns); // the topology owns it
        r
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        // Agents stop fully first (SIGTERM), then whatever a test that killed one left.
        for k in 0..self.agents.len() {
            self.agents[k].agent = None;
            crate::topology::remove_pins(&self.pin_directory(k + 1));
        }
        // A registering server stopped with SIGTERM would deregister and wait for its open
        // connections (up to its drain timeout) with no agent left to answer: kill it (its
        // namespace goes with it).
        for s in self
            .servers
            .iter_mut()
            .filter(|_| self.options.registering.is_some())
        {
            if let Some(mut p) = s.0.take() {
                let _ = p.stop_with(libc::SIGKILL, Duration::from_secs(5));
            }
        }
    }
}

/// Whether a process still runs (not exited, not a zombie).
pub fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Fails unless every outcome succeeded, naming the failures.
pub fn all_succeeded(outcomes: &[Result<String, String>]) -> Result<()> {
    let failed: Vec<&String> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} connections failed: {failed:?}",
            failed.len(),
            outcomes.len()
        );
    }
    Ok(())
}
