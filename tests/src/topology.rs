//! The demo and end-to-end topology, all in network namespaces this code creates:
//!
//! ```text
//!   c1 ─┐                                   ┌─ s1
//!   c2 ─┤ brc (10.71.1.0/24)  router  brs ──┼─ s2      (10.71.2.0/24)
//!  agent eth0 ┘   in namespace "net"    └───┼─ s3 ...
//!  agent eth1 ──────────────────────────────┘
//! ```
//! Clients route the anycast addresses to the agent; everything else (the servers' replies)
//! goes through the router, so replies never pass the agent. Two-armed mode: the agent reaches
//! the servers on its own eth1 (XDP_REDIRECT). On-a-stick mode: the agent's route to the
//! servers goes back out of eth0 via the router (XDP_TX).
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    netns::{veth, Netns, Proc},
    wait_until, workspace_bin,
};

/// The SPI of server `sN` in the topology's policy: 256 + N (each identity its own, as the
/// agent requires); 256 for any other name.
pub fn spi_of(identity: &str) -> u32 {
    256 + identity
        .strip_prefix('s')
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0)
}

pub const ANYCAST_V4: Ipv4Addr = Ipv4Addr::new(10, 71, 100, 1);
pub const ANYCAST_V6: Ipv6Addr = Ipv6Addr::new(0xfd71, 0x100, 0, 0, 0, 0, 0, 1);
pub const HTTP_PORT: u16 = 80;
/// The UDP service is a port wildcard; clients ask on this port.
pub const UDP_PORT: u16 = 5353;
const AGENT_V4: &str = "10.71.1.2";
const AGENT_V6: &str = "fd71:1::2";
/// MTU of every link but the clients' own, so a full-size client packet fits in a tunnel.
const CORE_MTU: u32 = 1600;

/// How the agent learns about the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// Listed in the agent's configuration.
    Static,
    /// They register themselves with binding updates (lifetime in seconds).
    Registering { lifetime_secs: u64 },
}

pub struct Server {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The second link's addresses, for a multi-homed server (see `add_second_link`).
    pub second: Option<(Ipv4Addr, Ipv6Addr)>,
    pub decap: Option<Proc>,
    pub app: Option<Proc>,
    pub ns: Netns,
}

pub struct Topology {
    pub agent_proc: Option<Proc>,
    pub passthrough: Option<Proc>,
    pub servers: Vec<Server>,
    pub clients: Vec<Netns>,
    pub agent: Netns,
    pub net: Netns,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    /// How many of `servers` the agent's configuration lists.
    pub configured: usize,
    pub xdp_mode: String,
    pub mode: ServerMode,
    /// Merged into the agent's configuration (top level), e.g. `health_checks`.
    pub config_extra: serde_json::Value,
    /// Merged into the configuration's `registration` object, e.g. `probe`.
    pub registration_extra: serde_json::Value,
    /// Extra arguments for every `anycast-ctl server`.
    pub server_args: Vec<String>,
    /// What runs `anycast-ctl server` instead of the workspace's build (e.g. a wrapper that
    /// limits its capabilities).
    pub server_ctl: Option<PathBuf>,
    /// Whether `start_agent` ran: its instance may have left state pinned in bpffs.
    agent_started: bool,
}

impl Topology {
    /// Creates the namespaces and links for `clients` clients and `servers` servers and starts
    /// the server side on every server. Nothing is forwarded until `start_agent`.
    /// In `Static` mode the servers' side is started here; in `Registering` mode start the
    /// agent first, then each server with `start_server`.
    pub fn build(
        prefix: &str,
        clients: usize,
        servers: usize,
        mode: ServerMode,
    ) -> Result<Topology> {
        let dir = std::env::temp_dir().join(format!("{prefix}-anycast"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // What an agent of an earlier run that was killed left pinned (its links are
        // defunct: their interfaces went with the namespaces).
        remove_pins(&pin_directory_of(&dir));
        let net = Netns::new(&format!("{prefix}net"))?;
        let agent = Netns::new(&format!("{prefix}ag"))?;
        net.ip(&[
            "link",
            "add",
            "brc",
            "mtu",
            &CORE_MTU.to_string(),
            "type",
            "bridge",
        ])?;
        net.ip(&[
            "link",
            "add",
            "brs",
            "mtu",
            &CORE_MTU.to_string(),
            "type",
            "bridge",
        ])?;
        for (br, v4, v6) in [
            ("brc", "10.71.1.1/24", "fd71:1::1/64"),
            ("brs", "10.71.2.1/24", "fd71:2::1/64"),
        ] {
            net.ip(&["link", "set", br, "up"])?;
            net.ip(&["addr", "add", v4, "dev", br])?;
            net.ip(&["addr", "add", v6, "dev", br, "nodad"])?;
        }
        net.sysctl("net.ipv4.ip_forward", "1")?;
        net.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        // The agent: eth0 on the clients' side, eth1 on the servers' side.
        veth(&agent, "eth0", &net, "agc", CORE_MTU)?;
        veth(&agent, "eth1", &net, "ags", CORE_MTU)?;
        net.ip(&["link", "set", "agc", "master", "brc"])?;
        net.ip(&["link", "set", "ags", "master", "brs"])?;
        agent.ip(&["addr", "add", &format!("{AGENT_V4}/24"), "dev", "eth0"])?;
        agent.ip(&[
            "addr",
            "add",
            &format!("{AGENT_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        agent.ip(&["addr", "add", "10.71.2.2/24", "dev", "eth1"])?;
        agent.ip(&["addr", "add", "fd71:2::2/64", "dev", "eth1", "nodad"])?;

        let mut client_ns = Vec::new();
        for i in 1..=clients {
            let c = Netns::new(&format!("{prefix}c{i}"))?;
            // The client's own link has a normal MTU; the tunnel needs 20-40 bytes more.
            veth(&c, "eth0", &net, &format!("c{i}p"), 1500)?;
            net.ip(&[
                "link",
                "set",
                &format!("c{i}p"),
                "mtu",
                &CORE_MTU.to_string(),
                "master",
                "brc",
            ])?;
            // A veth hands TCP/UDP packets on with the checksum left to "hardware"
            // (CHECKSUM_PARTIAL); XDP_TX/XDP_REDIRECT turn the packet into a raw frame and
            // that promise is lost, so the server would see a bad checksum. Real NICs deliver
            // complete checksums; make the clients' veths do the same.
            c.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
            c.ip(&[
                "addr",
                "add",
                &format!("10.71.1.{}/24", 10 + i),
                "dev",
                "eth0",
            ])?;
            c.ip(&[
                "addr",
                "add",
                &format!("fd71:1::{:x}/64", 0x10 + i),
                "dev",
                "eth0",
                "nodad",
            ])?;
            c.ip(&["route", "add", "default", "via", "10.71.1.1"])?;
            c.ip(&["-6", "route", "add", "default", "via", "fd71:1::1"])?;
            c.ip(&["route", "add", &format!("{ANYCAST_V4}/32"), "via", AGENT_V4])?;
            c.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ANYCAST_V6}/128"),
                "via",
                AGENT_V6,
            ])?;
            client_ns.push(c);
        }

        let mut topo = Topology {
            agent_proc: None,
            passthrough: None,
            servers: Vec::new(),
            clients: client_ns,
            agent,
            net,
            config_path: dir.join("agent.json"),
            socket: dir.join("agent.sock"),
            dir,
            configured: 0,
            xdp_mode: "native".into(),
            mode,
            config_extra: serde_json::json!({}),
            registration_extra: serde_json::json!({}),
            server_args: Vec::new(),
            server_ctl: None,
            agent_started: false,
        };
        for i in 1..=servers {
            topo.add_server_ns(prefix, i)?;
        }
        // Frames the agent sends with XDP_TX/XDP_REDIRECT in native mode reach a veth peer
        // only if the peer runs an XDP program.
        let mut pass = topo.net.spawn(
            "passthrough",
            &workspace_bin("anycast-ctl")?,
            &[
                "passthrough",
                "--iface",
                "agc",
                "--iface",
                "ags",
                "--xdp-mode",
                "native",
            ],
        )?;
        pass.wait_for_line("passthrough ready", Duration::from_secs(20))?;
        topo.passthrough = Some(pass);
        if mode == ServerMode::Static {
            for i in 0..servers {
                topo.start_server(i)?;
            }
        }
        // Wait for the links to settle (bridge ports forwarding, routes usable).
        let net = &topo.net;
        wait_until("bridge ports forwarding", Duration::from_secs(10), || {
            let out = net.ip(&["-o", "link", "show", "master", "brc"])?;
            Ok(!out.contains("LOWERLAYERDOWN") && !out.is_empty())
        })?;
        Ok(topo)
    }

    fn add_server_ns(&mut self, prefix: &str, i: usize) -> Result<()> {
        let s = Netns::new(&format!("{prefix}s{i}"))?;
        veth(&s, "eth0", &self.net, &format!("s{i}p"), CORE_MTU)?;
        self.net
            .ip(&["link", "set", &format!("s{i}p"), "master", "brs"])?;
        let v4 = Ipv4Addr::new(10, 71, 2, 10 + i as u8);
        let v6 = Ipv6Addr::new(0xfd71, 2, 0, 0, 0, 0, 0, 0x10 + i as u16);
        s.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        s.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        s.ip(&["route", "add", "default", "via", "10.71.2.1"])?;
        s.ip(&["-6", "route", "add", "default", "via", "fd71:2::1"])?;
        // The agent's own address through the agent's port on this link, as the agent
        // reaches the server: a reverse-tunnelled SYN-ACK is only taken on the interface the
        // agent reaches its sender through. (Client replies still go through the router.)
        s.ip(&[
            "route",
            "add",
            &format!("{AGENT_V4}/32"),
            "via",
            "10.71.2.2",
        ])?;
        s.ip(&[
            "-6",
            "route",
            "add",
            &format!("{AGENT_V6}/128"),
            "via",
            "fd71:2::2",
        ])?;
        // Each server its own key (never one per group).
        let key: String = (0..32)
            .map(|b| format!("{:02x}", (b * 7 + i * 31 + 1) % 256))
            .collect();
        // Readable by root only: the agent and the server refuse a key file others could
        // read or write.
        fs::write(self.key_file(i), key)?;
        fs::set_permissions(self.key_file(i), fs::Permissions::from_mode(0o600))?;
        self.servers.push(Server {
            name: format!("s{i}"),
            v4,
            v6,
            second: None,
            decap: None,
            app: None,
            ns: s,
        });
        Ok(())
    }

    /// Starts the server side (decapsulation, anycast addresses on lo) and the test service.
    pub fn start_server(&mut self, i: usize) -> Result<()> {
        let ctl = match &self.server_ctl {
            Some(ctl) => ctl.clone(),
            None => workspace_bin("anycast-ctl")?,
        };
        let app = workspace_bin("anycast-testsrv")?;
        let s = &mut self.servers[i];
        let v4 = ANYCAST_V4.to_string();
        let v6 = ANYCAST_V6.to_string();
        let key = self
            .dir
            .join(format!("{}.key", s.name))
            .to_string_lossy()
            .into_owned();
        let mut args = vec![
            "server",
            "--iface",
            "eth0",
            "--anycast",
            &v4,
            "--anycast",
            &v6,
            "--xdp-mode",
            "native",
        ];
        if s.second.is_some() {
            args.extend(["--iface", "eth1"]);
        }
        let (lifetime, spi);
        if let ServerMode::Registering { lifetime_secs } = self.mode {
            lifetime = lifetime_secs.to_string();
            spi = spi_of(&s.name).to_string();
            args.extend([
                "--agent",
                AGENT_V4,
                "--id",
                &s.name,
                "--key",
                &key,
                "--spi",
                &spi,
                "--lifetime",
                &lifetime,
            ]);
            args.extend(["--drain-timeout", "30"]);
        }
        let extra: Vec<String> = self
            .server_args
            .iter()
            .map(|a| a.replace("{name}", &s.name))
            .collect();
        args.extend(extra.iter().map(String::as_str));
        let mut decap = s.ns.spawn(&format!("server {}", s.name), &ctl, &args)?;
        decap.wait_for_line("server ready", Duration::from_secs(20))?;
        // TCP on the wildcard address: it answers on the anycast addresses (replies leave
        // from the address the client used) and on the real addresses, for health checks.
        let tcp = format!("[::]:{HTTP_PORT}");
        let udp4 = format!("{v4}:{UDP_PORT}");
        let udp6 = format!("[{v6}]:{UDP_PORT}");
        let mut proc = s.ns.spawn(
            &format!("testsrv {}", s.name),
            &app,
            &[
                "--name", &s.name, "--tcp", &tcp, "--udp", &udp4, "--udp", &udp6,
            ],
        )?;
        proc.wait_for_line("listening", Duration::from_secs(10))?;
        s.decap = Some(decap);
        s.app = Some(proc);
        Ok(())
    }

    /// Gives server `i` (0-based) a second link, on its own bridge `brt` (10.71.3.0/24,
    /// fd71:3::/64) behind the router, so it can bind through two real addresses. Call before
    /// `start_server`.
    pub fn add_second_link(&mut self, i: usize) -> Result<()> {
        let n = i + 1;
        if !self.net.ip(&["link", "show"])?.contains("brt:") {
            self.net.ip(&[
                "link",
                "add",
                "brt",
                "mtu",
                &CORE_MTU.to_string(),
                "type",
                "bridge",
            ])?;
            self.net.ip(&["link", "set", "brt", "up"])?;
            self.net
                .ip(&["addr", "add", "10.71.3.1/24", "dev", "brt"])?;
            self.net
                .ip(&["addr", "add", "fd71:3::1/64", "dev", "brt", "nodad"])?;
            // The agent reaches the second server network through the router.
            self.agent
                .ip(&["route", "add", "10.71.3.0/24", "via", "10.71.2.1"])?;
            self.agent
                .ip(&["-6", "route", "add", "fd71:3::/64", "via", "fd71:2::1"])?;
        }
        let s = &mut self.servers[i];
        veth(&s.ns, "eth1", &self.net, &format!("s{n}t"), CORE_MTU)?;
        self.net
            .ip(&["link", "set", &format!("s{n}t"), "master", "brt"])?;
        let v4 = Ipv4Addr::new(10, 71, 3, 10 + n as u8);
        let v6 = Ipv6Addr::new(0xfd71, 3, 0, 0, 0, 0, 0, 0x10 + n as u16);
        s.ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth1"])?;
        s.ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth1", "nodad"])?;
        s.second = Some((v4, v6));
        Ok(())
    }

    /// The key file of server number `i` (1-based, as in `s1`).
    pub fn key_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("s{i}.key"))
    }

    /// Server `i`'s key, as bytes.
    pub fn server_key(&self, i: usize) -> Result<Vec<u8>> {
        crate::unhex(&fs::read_to_string(self.key_file(i))?)
    }

    /// Writes the agent's configuration: static mode lists the first `count` servers; in
    /// registering mode no server is configured, only who may register for what.
    /// The agent's state files, inside the topology's directory (removed when it is built),
    /// so no run restores the bindings of an earlier one.
    pub fn state_directory(&self) -> PathBuf {
        self.dir.join("agent-state")
    }

    /// The agent's pinned maps and links, one directory per topology.
    pub fn pin_directory(&self) -> PathBuf {
        pin_directory_of(&self.dir)
    }

    pub fn write_config(&mut self, count: usize) -> Result<()> {
        if self.mode != ServerMode::Static {
            let servers: Vec<serde_json::Value> = (1..=self.servers.len())
                .map(|i| {
                    // Its own addresses on both server networks (see `add_server_ns` and
                    // `add_second_link`): the only care-of addresses it may bind through.
                    let real = [
                        format!("{}/32", Ipv4Addr::new(10, 71, 2, 10 + i as u8)),
                        format!("{}/128", Ipv6Addr::new(0xfd71, 2, 0, 0, 0, 0, 0, 0x10 + i as u16)),
                        format!("{}/32", Ipv4Addr::new(10, 71, 3, 10 + i as u8)),
                        format!("{}/128", Ipv6Addr::new(0xfd71, 3, 0, 0, 0, 0, 0, 0x10 + i as u16)),
                    ];
                    serde_json::json!({"id": format!("s{i}"), "spi": spi_of(&format!("s{i}")), "key_file": format!("s{i}.key"),
                        "allow": [format!("{ANYCAST_V4}/32"), format!("{ANYCAST_V6}/128")],
                        "real": real})
                })
                .collect();
            let mut registration = serde_json::json!({"drain_time": 30, "servers": servers});
            merge(&mut registration, &self.registration_extra);
            let mut config = serde_json::json!({
                "interfaces": ["eth0", "eth1"],
                "xdp_mode": self.xdp_mode,
                "agent_address": {"v4": AGENT_V4, "v6": AGENT_V6},
                "registration": registration,
                "state_directory": self.state_directory(),
                "pin_directory": self.pin_directory(),
            });
            merge(&mut config, &self.config_extra);
            fs::write(&self.config_path, serde_json::to_string_pretty(&config)?)?;
            self.configured = 0;
            return Ok(());
        }
        let servers: Vec<serde_json::Value> = self.servers[..count]
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "address": s.v4.to_string()}))
            .collect();
        let servers6: Vec<serde_json::Value> = self.servers[..count]
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "address": s.v6.to_string()}))
            .collect();
        let mut config = serde_json::json!({
            "interfaces": ["eth0", "eth1"],
            "xdp_mode": self.xdp_mode,
            "agent_address": {"v4": AGENT_V4, "v6": AGENT_V6},
            "state_directory": self.state_directory(),
            "pin_directory": self.pin_directory(),
            "services": [
                {"name": "web4", "address": ANYCAST_V4.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": servers},
                {"name": "web6", "address": ANYCAST_V6.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": servers6},
                {"name": "udp4", "address": ANYCAST_V4.to_string(), "protocol": "udp", "port": 0, "servers": servers},
                {"name": "udp6", "address": ANYCAST_V6.to_string(), "protocol": "udp", "port": 0, "servers": servers6},
            ]
        });
        merge(&mut config, &self.config_extra);
        fs::write(&self.config_path, serde_json::to_string_pretty(&config)?)?;
        self.configured = count;
        Ok(())
    }

    pub fn start_agent(&mut self, servers: usize) -> Result<()> {
        self.start_agent_with(servers, &workspace_bin("anycast-ctl")?)
    }

    /// `start_agent` with another build of anycast-ctl (the control commands stay the
    /// workspace's).
    pub fn start_agent_with(&mut self, servers: usize, ctl: &std::path::Path) -> Result<()> {
        self.write_config(servers)?;
        let config = self.config_path.to_string_lossy().into_owned();
        let socket = self.socket.to_string_lossy().into_owned();
        let mut agent = self.agent.spawn(
            "agent",
            ctl,
            &["agent", "--config", &config, "--socket", &socket],
        )?;
        self.agent_started = true;
        agent.wait_for_line("agent ready", Duration::from_secs(30))?;
        self.agent_proc = Some(agent);
        Ok(())
    }

    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let ctl = workspace_bin("anycast-ctl")?;
        let socket = self.socket.to_string_lossy().into_owned();
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--socket", &socket]);
        self.agent.exec(&ctl.to_string_lossy(), &a)
    }

    /// The agent's status, as `anycast-ctl status --json` prints it.
    pub fn status(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.ctl(&["status", "--json"])?).context("status --json")
    }

    /// The agent's binding table, as `anycast-ctl bindings --json` prints it.
    pub fn bindings(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.ctl(&["bindings", "--json"])?).context("bindings --json")
    }

    /// Every binding as "server anycast real state condition", sorted: what must not change
    /// while the agent is under load or attack.
    pub fn binding_states(&self) -> Result<Vec<String>> {
        let b = self.bindings()?;
        let mut out: Vec<String> = b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                format!(
                    "{} {} {} {} {}",
                    x["server"], x["anycast"], x["real"], x["state"], x["condition"]
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Names of the servers with an active binding.
    pub fn active_servers(&self) -> Result<std::collections::BTreeSet<String>> {
        let b = self.bindings()?;
        Ok(b["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["state"] == "active")
            .filter_map(|x| x["server"].as_str().map(str::to_string))
            .collect())
    }

    /// A verdict counter of the agent's data path.
    pub fn verdict(&self, name: &str) -> Result<u64> {
        let s = self.status()?;
        s["verdicts"]
            .as_array()
            .and_then(|v| v.iter().find(|p| p[0] == name))
            .and_then(|p| p[1].as_u64())
            .ok_or_else(|| anyhow!("no verdict {name} in status"))
    }

    /// Switches the agent to "load balancer on a stick": servers reached back through eth0.
    pub fn use_stick_mode(&self) -> Result<()> {
        // The servers reach the agent through the router too.
        for s in &self.servers {
            s.ns.ip(&["route", "del", &format!("{AGENT_V4}/32")])?;
            s.ns.ip(&["-6", "route", "del", &format!("{AGENT_V6}/128")])?;
        }
        self.agent
            .ip(&["addr", "del", "10.71.2.2/24", "dev", "eth1"])?;
        self.agent
            .ip(&["addr", "del", "fd71:2::2/64", "dev", "eth1"])?;
        self.agent.ip(&[
            "route",
            "add",
            "10.71.2.0/24",
            "via",
            "10.71.1.1",
            "dev",
            "eth0",
        ])?;
        self.agent.ip(&[
            "-6",
            "route",
            "add",
            "fd71:2::/64",
            "via",
            "fd71:1::1",
            "dev",
            "eth0",
        ])?;
        Ok(())
    }

    pub fn anycast(v6: bool, port: u16) -> SocketAddr {
        if v6 {
            SocketAddr::new(IpAddr::V6(ANYCAST_V6), port)
        } else {
            SocketAddr::new(IpAddr::V4(ANYCAST_V4), port)
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // A full stop (SIGTERM) while the namespaces still exist.
        self.agent_proc = None;
        if !self.agent_started {
            return;
        }
        // A test that failed after killing or handing off the agent leaves its data path
        // pinned in bpffs, which outlives the namespaces: remove it (nothing when the agent
        // stopped fully). Through nsenter, as the agent runs: `ip netns exec` would remount
        // /sys, and with it hide bpffs.
        if let Ok(ctl) = workspace_bin("anycast-ctl") {
            let _ = std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.agent.name))
                .arg(ctl)
                .args(["agent", "--cleanup", "--config"])
                .arg(&self.config_path)
                .arg("--socket")
                .arg(&self.socket)
                .output();
        }
        remove_pins(&self.pin_directory());
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP GET to the anycast address; returns the name of the server that answered.
/// (Call from a thread inside a client namespace.)
pub fn http_get(addr: SocketAddr) -> Result<String> {
    http_get_within(addr, IO_TIMEOUT)
}

/// `http_get` with its own connect/read timeout.
pub fn http_get_within(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    if s.peer_addr()? != addr {
        bail!("connected to {} instead of {addr}", s.peer_addr()?);
    }
    s.write_all(b"GET / HTTP/1.0\r\nHost: anycast\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .with_context(|| format!("reading the answer from {addr}"))?;
    if !body.starts_with("HTTP/1.0 200") {
        bail!("unexpected answer from {addr}: {body:?}");
    }
    body.lines()
        .find_map(|l| l.strip_prefix("server="))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no server= line in {body:?}"))
}

/// One UDP question; returns the answering server's name and the reply's source address.
pub fn udp_ask(addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 512];
    for _ in 0..6 {
        sock.send_to(b"who\n", addr)?;
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            let name = text
                .trim()
                .strip_prefix("server=")
                .ok_or_else(|| anyhow!("bad UDP answer {text:?}"))?;
            return Ok((name.to_string(), from));
        }
    }
    bail!("no UDP answer from {addr}")
}

/// A long-lived TCP connection: the server answers each line with its name.
pub struct Held {
    stream: BufReader<TcpStream>,
    pub server: String,
}

impl Held {
    pub fn open(addr: SocketAddr) -> Result<Held> {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut h = Held {
            stream: BufReader::new(s),
            server: String::new(),
        };
        h.server = h.ask()?;
        Ok(h)
    }

    /// The client's port of this connection.
    pub fn local_port(&self) -> u16 {
        self.stream.get_ref().local_addr().map_or(0, |a| a.port())
    }

    /// Closes the connection with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                self.stream.get_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Sends a line and returns the server name it answers with.
    pub fn ask(&mut self) -> Result<String> {
        self.stream.get_mut().write_all(b"who\n")?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }
}

fn pin_directory_of(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or("topology".into(), |n| n.to_string_lossy());
    Path::new("/sys/fs/bpf/anycast-tests").join(name.as_ref())
}

/// Removes a pinned directory's objects and the directories (missing ones are fine).
pub fn remove_pins(dir: &Path) {
    for sub in ["links", "maps"] {
        if let Ok(entries) = fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(dir.join(sub));
    }
    let _ = fs::remove_dir(dir);
    // The tests' root, once no topology uses it.
    if let Some(root) = dir.parent() {
        let _ = fs::remove_dir(root);
    }
}

/// Sets every key of `extra` (an object) in `into`.
fn merge(into: &mut serde_json::Value, extra: &serde_json::Value) {
    if let (Some(into), Some(extra)) = (into.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            into.insert(k.clone(), v.clone());
        }
    }
}
