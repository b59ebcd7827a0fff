//! Several agents behind a router, each announcing the anycast addresses with its own BIRD 2
//! speaker; the router runs BIRD too and installs the agents' routes as one multipath route.
//! Everything in namespaces this code creates, addresses in 10.73.0.0/16 and fd73::/16:
//!
//! ```text
//!  client ── rc   router (BIRD, ECMP)  ra1 ── eth0 agent 1 (BIRD, anycast-ctl agent) eth1 ─┐
//!  10.73.1.10     10.73.1.1            ra2 ── eth0 agent 2 (BIRD, anycast-ctl agent) eth1 ─┤
//!                 brs 10.73.2.1 ───────────────────────────────────────────────────────────┴── s1 s2 s3
//! ```
//! Agent k talks BGP and BFD with the router over 10.73.1k.0/24 and fd73:1k::/64, tunnels to
//! the servers on the servers' bridge (10.73.2.0/24, fd73:2::/64), whose replies go to the
//! client through the router.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    netns::{run, veth, Netns, Proc},
    topology::HTTP_PORT,
    wait_until, workspace_bin,
};

/// Served by every server through both agents.
pub const A4: Ipv4Addr = Ipv4Addr::new(10, 73, 100, 1);
pub const A6: Ipv6Addr = Ipv6Addr::new(0xfd73, 0x100, 0, 0, 0, 0, 0, 1);
/// Served through agent k by server k only: each agent's health view of it is its own.
pub const B4: Ipv4Addr = Ipv4Addr::new(10, 73, 100, 2);
const ROUTER_AS: u32 = 65000;
const AGENT_AS: u32 = 65001;
const MTU: u32 = 1600;

/// A `bird -f` in a namespace, with its control socket.
pub struct Bird {
    pub proc: Proc,
    pub ctl: PathBuf,
}

impl Bird {
    pub fn start(ns: &Netns, label: &str, conf: &Path, ctl: &Path) -> Result<Bird> {
        let _ = fs::remove_file(ctl);
        let pid = ctl.with_extension("pid");
        let proc = ns.spawn(
            label,
            Path::new("/usr/sbin/bird"),
            &[
                "-f",
                "-c",
                &conf.to_string_lossy(),
                "-s",
                &ctl.to_string_lossy(),
                "-P",
                &pid.to_string_lossy(),
            ],
        )?;
        let bird = Bird {
            proc,
            ctl: ctl.to_path_buf(),
        };
        wait_until(
            &format!("{label} answering"),
            Duration::from_secs(10),
            || Ok(bird.birdc("show status")?.contains("Daemon is up")),
        )?;
        Ok(bird)
    }

    pub fn birdc(&self, command: &str) -> Result<String> {
        let mut args = vec!["-s", self.ctl.to_str().unwrap_or_default()];
        args.extend(command.split_whitespace());
        run("birdc", &args)
    }
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
    pub servers: Vec<(Option<Proc>, Option<Proc>, Netns)>,
    pub router_bird: Option<Bird>,
    pub passthrough: Option<Proc>,
    pub client: Netns,
    pub router: Netns,
    pub dir: PathBuf,
}

impl Routed {
    /// Builds the namespaces, starts the router's BIRD, every server and every agent's BIRD;
    /// the agents themselves start with `start_agent`.
    pub fn build(prefix: &str, agents: usize, servers: usize) -> Result<Routed> {
        let dir = std::env::temp_dir().join(format!("{prefix}-routed"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let router = Netns::new(&format!("{prefix}r"))?;
        let client = Netns::new(&format!("{prefix}c"))?;
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
        veth(&client, "eth0", &router, "rc", 1500)?;
        // Full checksums from the client (see topology.rs: veth leaves them to "hardware").
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        client.ip(&["addr", "add", "10.73.1.10/24", "dev", "eth0"])?;
        client.ip(&["addr", "add", "fd73:1::10/64", "dev", "eth0", "nodad"])?;
        client.ip(&["route", "add", "default", "via", "10.73.1.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd73:1::1"])?;
        router.ip(&["addr", "add", "10.73.1.1/24", "dev", "rc"])?;
        router.ip(&["addr", "add", "fd73:1::1/64", "dev", "rc", "nodad"])?;
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

        let mut routed = Routed {
            agents: Vec::new(),
            servers: Vec::new(),
            router_bird: None,
            passthrough: None,
            client,
            router,
            dir,
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
        Ok(routed)
    }

    fn add_server(&mut self, prefix: &str, i: usize) -> Result<()> {
        let s = Netns::new(&format!("{prefix}s{i}"))?;
        let port = format!("sp{i}");
        veth(&s, "eth0", &self.router, &port, MTU)?;
        self.router.ip(&["link", "set", &port, "master", "brs"])?;
        s.ip(&[
            "addr",
            "add",
            &format!("10.73.2.{}/24", 10 + i),
            "dev",
            "eth0",
        ])?;
        s.ip(&[
            "addr",
            "add",
            &format!("fd73:2::{}/64", 10 + i),
            "dev",
            "eth0",
            "nodad",
        ])?;
        s.ip(&["route", "add", "default", "via", "10.73.2.1"])?;
        s.ip(&["-6", "route", "add", "default", "via", "fd73:2::1"])?;
        let (a4, a6, b4) = (A4.to_string(), A6.to_string(), B4.to_string());
        let mut decap = s.spawn(
            &format!("server s{i}"),
            &workspace_bin("anycast-ctl")?,
            &[
                "server",
                "--iface",
                "eth0",
                "--anycast",
                &a4,
                "--anycast",
                &a6,
                "--anycast",
                &b4,
                "--xdp-mode",
                "native",
            ],
        )?;
        decap.wait_for_line("server ready", Duration::from_secs(20))?;
        self.servers.push((Some(decap), None, s));
        self.start_app(i - 1)
    }

    /// Starts server `i`'s (0-based) HTTP service on every address, port 80.
    pub fn start_app(&mut self, i: usize) -> Result<()> {
        let name = format!("s{}", i + 1);
        let (_, app, ns) = &mut self.servers[i];
        let tcp = format!("[::]:{HTTP_PORT}");
        let mut p = ns.spawn(
            &format!("testsrv {name}"),
            &workspace_bin("anycast-testsrv")?,
            &["--name", &name, "--tcp", &tcp],
        )?;
        p.wait_for_line("listening", Duration::from_secs(10))?;
        *app = Some(p);
        Ok(())
    }

    /// Agent k's (0-based) configuration: A on every server, B on server k only, TCP
    /// health checks, routing towards the router.
    pub fn write_config(&self, k: usize, routing_extra: serde_json::Value) -> Result<()> {
        let n = k + 1;
        let all4: Vec<_> = (1..=self.servers.len())
            .map(|i| serde_json::json!({"name": format!("s{i}"), "address": format!("10.73.2.{}", 10 + i)}))
            .collect();
        let all6: Vec<_> = (1..=self.servers.len())
            .map(|i| serde_json::json!({"name": format!("s{i}"), "address": format!("fd73:2::{}", 10 + i)}))
            .collect();
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
        let config = serde_json::json!({
            "interfaces": ["eth0", "eth1"],
            "agent_address": {"v4": format!("10.73.2.{}", 1 + n), "v6": format!("fd73:2::{}", 1 + n)},
            "state_directory": self.dir.join(format!("a{n}-state")),
            "pin_directory": pins,
            "services": [
                {"name": "a4", "address": A4.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": all4},
                {"name": "a6", "address": A6.to_string(), "protocol": "tcp", "port": HTTP_PORT, "servers": all6},
                {"name": "b4", "address": B4.to_string(), "protocol": "tcp", "port": HTTP_PORT,
                 "servers": [{"name": format!("s{n}"), "address": format!("10.73.2.{}", 10 + n)}]},
            ],
            "health_checks": [{"type": "tcp", "interval_ms": 100, "timeout_ms": 80, "fall": 2, "rise": 2}],
            "routing": routing,
        });
        fs::write(&a.config, serde_json::to_string_pretty(&config)?)?;
        Ok(())
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

    /// Agent k's `status --json`.
    pub fn status(&self, k: usize) -> Result<serde_json::Value> {
        let a = &self.agents[k];
        let ctl = workspace_bin("anycast-ctl")?;
        let out = a.ns.exec(
            &ctl.to_string_lossy(),
            &["status", "--json", "--socket", &a.socket.to_string_lossy()],
        )?;
        serde_json::from_str(&out).context("status --json")
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

    /// Follows the router's routing table (`ip monitor route`), each event with the time it
    /// was read: the convergence times come from here, not from polling.
    pub fn monitor(&self) -> Result<RouteMonitor> {
        let mut child = std::process::Command::new("ip")
            .args(["-n", &self.router.name, "monitor", "route"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("ip monitor route")?;
        let out = child.stdout.take().context("piped")?;
        let events: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let e = events.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                e.lock().unwrap().push((Instant::now(), line));
            }
        });
        // Started before the events it must see: `ip monitor` subscribes at once, but make
        // sure it runs by waiting for its process to be past exec.
        wait_until("ip monitor started", Duration::from_secs(5), || {
            Ok(fs::read_to_string(format!("/proc/{}/comm", child.id()))?.trim() == "ip")
        })?;
        Ok(RouteMonitor { child, events })
    }

    /// Makes `count` HTTP connections to `addr` from the client, each from a new port;
    /// returns the servers that answered, or the first failure.
    pub fn connect_many(&self, addr: SocketAddr, count: usize) -> Result<Vec<String>> {
        let ns = Netns {
            name: self.client.name.clone(),
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

pub struct RouteMonitor {
    child: std::process::Child,
    events: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl RouteMonitor {
    /// When the first route event for `addr` after `since` was seen, waiting up to
    /// `timeout` for one.
    pub fn first_event(&self, addr: IpAddr, since: Instant, timeout: Duration) -> Result<Instant> {
        let needle = addr.to_string();
        let mut at = None;
        wait_until(&format!("a route event for {addr}"), timeout, || {
            at = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|(t, l)| *t >= since && mentions(l, &needle))
                .map(|(t, _)| *t);
            Ok(at.is_some())
        })?;
        at.context("no event")
    }
}

impl RouteMonitor {
    /// The route events for `addr` seen since `since`.
    pub fn events_since(&self, addr: IpAddr, since: Instant) -> Vec<String> {
        let needle = addr.to_string();
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, l)| *t >= since && mentions(l, &needle))
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// Whether an `ip monitor` line is about this destination (`10.73.100.1 ...`,
/// `Deleted 10.73.100.1 ...`).
fn mentions(line: &str, addr: &str) -> bool {
    let l = line.strip_prefix("Deleted ").unwrap_or(line);
    l.split_whitespace().next() == Some(addr)
}

impl Drop for Routed {
    fn drop(&mut self) {
        // Agents stop fully first (SIGTERM), then whatever a test that killed one left.
        for k in 0..self.agents.len() {
            self.agents[k].agent = None;
            crate::topology::remove_pins(&self.pin_directory(k + 1));
        }
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
