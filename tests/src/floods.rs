//! Floods at the agent's registration port, one copy for the `hostile_floods` test (which
//! holds the agent to what they must not change) and the bench's floods part (which reports
//! what they cost): the demo topology with s1 and s2 registered by the server daemon, s3
//! (this process) refreshing every 200 ms and timing each acknowledgement, a client
//! connecting every 20 ms, and a namespace of its own on the clients' link that writes
//! frames at the registration port at a steady pace.
//!
//! The flooder answers ARP for none of the addresses it sends from, so the agent's answers
//! to them wait for neighbours that never come (they must not hold up the refresh requests
//! to the servers). Every frame has a correct UDP checksum, so that every datagram reaches
//! the agent's socket. Runs as root.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anycast_common::wire::{self, Body, Key, LoadInfo, Message, Options, ServiceSelector};
use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    load::Load,
    logged_between,
    netns::{veth, FrameSender, Netns},
    packet::{ethernet, inet_checksum, udp, Ip},
    topology::{spi_of, ServerMode, Topology, ANYCAST_V4},
    wait_until,
};

/// The agent's address on the clients' link, where the floods go.
pub const AGENT: Ipv4Addr = Ipv4Addr::new(10, 71, 1, 2);
/// The agent's registration port.
pub const PORT: u16 = 4191;
/// The floods' pace: above 100 000 a second, the rate a flood must at least reach.
pub const PACE: u64 = 105_000;
pub const AT_LEAST: f64 = 100_000.0;
/// How often s3 refreshes its binding.
pub const REFRESH_EVERY: Duration = Duration::from_millis(200);
/// How often the binding table and the agent's memory are read during a flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How long a flood may overrun its duration before it counts as stuck.
const OVERRUN: Duration = Duration::from_secs(30);

/// Sends `frames` round-robin out of `dev` in `ns` at `rate` a second for `how_long`;
/// returns how many were sent.
pub fn flood(
    ns: &Netns,
    dev: &str,
    frames: Vec<Vec<u8>>,
    rate: u64,
    how_long: Duration,
) -> Result<u64> {
    let dev = dev.to_string();
    ns.in_ns(move || {
        let sender = FrameSender::open(&dev)?;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0usize;
        while start.elapsed() < how_long {
            // Keep to the rate, in steps of a millisecond's worth.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for _ in 0..(due - sent).min(1000) {
                let f = &frames[i % frames.len()];
                i += 1;
                if sender.send(f).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })
}

/// A well-formed binding update of `identity` for the anycast address via `real`, signed
/// with `secret`; for one UDP service (port 9999) when `service` is set.
pub fn update(identity: &str, real: Ipv4Addr, seq: u16, secret: &[u8], service: bool) -> Vec<u8> {
    let msg = Message {
        src: wire::to_mapped(ANYCAST_V4.into()),
        dst: wire::to_mapped(AGENT.into()),
        body: Body::BindingUpdate {
            seq,
            ack: true,
            lifetime: 2,
        },
        options: Options {
            alt_coa: Some(wire::to_mapped(real.into())),
            mn_id: Some(identity.into()),
            mesg_id: Some(wire::ntp_now()),
            load: Some(LoadInfo::default()),
            service: service.then_some(ServiceSelector {
                protocol: 17,
                port: 9999,
            }),
            ..Options::default()
        },
    };
    wire::encode(
        &msg,
        Some(Key {
            spi: spi_of(identity),
            secret,
        }),
    )
}

/// A well-formed binding update claiming `identity`, signed with a key that is not its own.
pub fn forged_update(identity: &str, seq: u16) -> Vec<u8> {
    let real = Ipv4Addr::new(10, 71, 2, 11);
    update(
        identity,
        real,
        seq,
        b"not the key of this server, sixteen+ bytes",
        false,
    )
}

/// A process's CPU time so far and its resident memory.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// User + system time, in clock ticks ([`clock_ticks_per_second`]).
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

/// The agent's (process `pid`'s) CPU time and resident memory.
pub fn agent_usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let cpu_ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(Usage { cpu_ticks, rss_kib })
}

/// The unit of [`Usage::cpu_ticks`].
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// When each refresh went out, and its round trip or why it failed.
pub type RefreshLog = Arc<Mutex<Vec<(Instant, Result<Duration, String>)>>>;

/// A server without the server daemon, refreshing its binding every [`REFRESH_EVERY`] and
/// timing each acknowledgement (any update also answers the agent's refresh requests), until
/// dropped.
pub struct Refresher {
    on: Arc<AtomicBool>,
    pub log: RefreshLog,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    /// Refreshes as `topo.servers[i]` from its real IPv4 address.
    pub fn start(topo: &Topology, i: usize) -> Result<Refresher> {
        let identity = topo.servers[i].name.clone();
        let key = anycast_ctl::registration::keys::read_key(&topo.key_file(i + 1))?;
        let real = topo.servers[i].v4;
        let socket = topo.servers[i]
            .ns
            .in_ns(move || Ok(UdpSocket::bind(SocketAddr::new(real.into(), 0))?))?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let log: RefreshLog = Arc::default();
        let on = Arc::new(AtomicBool::new(true));
        let thread = {
            let (log, on) = (log.clone(), on.clone());
            std::thread::spawn(move || {
                let mut seq = 0u16;
                let mut buf = [0u8; 2048];
                while on.load(Ordering::Relaxed) {
                    seq = seq.wrapping_add(1);
                    let started = Instant::now();
                    let sent = socket.send_to(
                        // A UDP service of its own: the client's connections (TCP port 80)
                        // are not sent to this server, which runs no service.
                        &update(&identity, real, seq, &key, true),
                        SocketAddr::new(AGENT.into(), PORT),
                    );
                    let outcome = match sent {
                        Err(e) => Err(format!("sending: {e}")),
                        Ok(_) => loop {
                            match socket.recv_from(&mut buf) {
                                Err(e) => break Err(format!("no acknowledgement: {e}")),
                                Ok((n, _)) => match wire::decode(&buf[..n]).map(|m| m.body) {
                                    Ok(Body::BindingAck { status, seq: s, .. }) if s == seq => {
                                        break if status < 128 {
                                            Ok(started.elapsed())
                                        } else {
                                            Err(format!("refused with {status}"))
                                        };
                                    }
                                    _ => continue,
                                },
                            }
                        },
                    };
                    log.lock().unwrap().push((started, outcome));
                    std::thread::sleep(REFRESH_EVERY.saturating_sub(started.elapsed()));
                }
            })
        };
        Ok(Refresher {
            on,
            log,
            thread: Some(thread),
        })
    }

    /// The outcomes of the refreshes that went out in `from..to`, once each has one.
    pub fn between(&self, from: Instant, to: Instant) -> Result<Vec<Result<Duration, String>>> {
        // An unanswered refresh waits a second for its acknowledgement.
        logged_between(&self.log, from, to, Duration::from_secs(5))
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.on.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one flood sends: `frames`, round-robin; none for a period without a flood.
pub struct Flood {
    pub what: &'static str,
    pub frames: Vec<Vec<u8>>,
}

impl Flood {
    /// No flood: the baseline the floods are compared with.
    pub fn none() -> Flood {
        Flood {
            what: "no flood",
            frames: Vec::new(),
        }
    }
}

/// What a flood did to the agent, to s3's refreshes and to the client's connections.
#[derive(Clone, Debug)]
pub struct Figures {
    pub what: String,
    /// Datagrams sent, and over how many seconds.
    pub sent: u64,
    pub secs: f64,
    /// The agent's CPU time during the flood, in % of one core.
    pub cpu_percent: f64,
    /// The agent's resident memory before the flood, at most while it lasted, and after.
    pub rss_before_kib: u64,
    pub rss_max_kib: u64,
    pub rss_after_kib: u64,
    /// Refresh requests the agent sent, and those that went unanswered.
    pub probes: u64,
    pub probes_missed: u64,
    /// Refreshes the agent accepted (s3's and the server daemons').
    pub refreshed: u64,
    /// Datagrams the agent dropped or refused (the flood's, counted).
    pub counted: u64,
    /// How often the binding table was read during the flood, and every reading that
    /// differed from the table before the floods.
    pub samples: usize,
    pub changed_states: Vec<Vec<String>>,
    /// s3's refreshes: the acknowledged ones' round trips (sorted), and why the others
    /// failed.
    pub round_trips: Vec<Duration>,
    pub unanswered: Vec<String>,
    /// The client's connections, and why the failed ones failed.
    pub connections: usize,
    pub failed_connections: Vec<String>,
}

impl Figures {
    /// Datagrams a second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.secs
    }

    /// The round trip at quantile `q` (0.5 the median, 1 the longest), if any was
    /// acknowledged.
    pub fn round_trip(&self, q: f64) -> Option<Duration> {
        let n = self.round_trips.len();
        (n > 0).then(|| self.round_trips[((n - 1) as f64 * q) as usize])
    }
}

/// A round trip, or "none" where no refresh was acknowledged.
fn shown(d: Option<Duration>) -> String {
    d.map_or("none".into(), |d| format!("{d:?}"))
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} datagrams in {:.1} s ({:.0}/s); agent CPU {:.0}%, RSS {} KiB (before {}, \
             max {}); {} refresh requests, {} missed; {} refreshes; {} flood datagrams \
             counted by the agent; {} samples; s3's refreshes: {} answered, {} not, latency \
             median {}, max {}; client connections: {} ({} failed)",
            self.what,
            self.sent,
            self.secs,
            self.rate(),
            self.cpu_percent,
            self.rss_after_kib,
            self.rss_before_kib,
            self.rss_max_kib,
            self.probes,
            self.probes_missed,
            self.refreshed,
            self.counted,
            self.samples,
            self.round_trips.len(),
            self.unanswered.len(),
            shown(self.round_trip(0.5)),
            shown(self.round_trip(1.0)),
            self.connections,
            self.failed_connections.len(),
        )
    }
}

/// The agent under flood (see the module's documentation). Dropping it stops the client,
/// s3 and the flooder, then the topology.
pub struct FloodedAgent {
    pub load: Load,
    pub refresher: Refresher,
    pub flooder: Netns,
    pub topo: Topology,
    pub pid: u32,
    /// Every binding (as [`Topology::binding_states`]) once all three registered: what no flood may
    /// change.
    pub states: Vec<String>,
    own_mac: [u8; 6],
    agent_mac: [u8; 6],
}

impl FloodedAgent {
    /// Builds the topology in namespaces named `{prefix}*`, with refresh requests every
    /// 500 ms (two missed mean down), and waits for s1, s2 and s3 to be registered.
    pub fn start(prefix: &str) -> Result<FloodedAgent> {
        FloodedAgent::start_with(prefix, serde_json::json!({}))
    }

    /// `start`, with `config_extra` merged into the agent's configuration (e.g. `metrics`).
    pub fn start_with(prefix: &str, config_extra: serde_json::Value) -> Result<FloodedAgent> {
        let mut topo = Topology::build(prefix, 1, 3, ServerMode::Registering { lifetime_secs: 8 })?;
        topo.config_extra = config_extra;
        topo.registration_extra =
            serde_json::json!({"probe": {"interval_ms": 500, "timeout_ms": 400, "misses": 2}});
        topo.start_agent(0)?;
        for i in 0..2 {
            topo.start_server(i)?;
        }
        let refresher = Refresher::start(&topo, 2)?;
        wait_until("three servers registered", Duration::from_secs(30), || {
            Ok(topo.active_servers()?.len() == 3)
        })?;
        let states = topo.binding_states()?;
        let pid = topo
            .agent_proc
            .as_ref()
            .and_then(|p| p.pid())
            .context("the agent's pid")?;
        // The flooder sits on the clients' link; it never answers ARP for what it spoofs.
        let flooder = Netns::new(&format!("{prefix}sp"))?;
        veth(&flooder, "eth0", &topo.net, "flp", 1600)?;
        topo.net.ip(&["link", "set", "flp", "master", "brc"])?;
        flooder.sysctl("net.ipv4.conf.all.arp_ignore", "8")?;
        let own_mac = flooder.mac("eth0")?;
        let agent_mac = topo.agent.mac("eth0")?;
        let load = Load::start(&topo.clients[0].name, Duration::from_millis(20));
        Ok(FloodedAgent {
            load,
            refresher,
            flooder,
            topo,
            pid,
            states,
            own_mac,
            agent_mac,
        })
    }

    /// A frame from the flooder to the agent's registration port, as if from `src`.
    pub fn frame(&self, src: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut datagram = udp(40000, PORT, payload);
        datagram[6..8].copy_from_slice(&[0, 0]);
        let mut pseudo = Vec::with_capacity(12 + datagram.len());
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&AGENT.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&datagram);
        let sum = match inet_checksum(&pseudo) {
            0 => 0xffff,
            s => s,
        };
        datagram[6..8].copy_from_slice(&sum.to_be_bytes());
        let ip = Ip::new(src.into(), AGENT.into(), 17).packet(&datagram);
        ethernet(self.agent_mac, self.own_mac, None, &ip)
    }

    /// The floods: garbage and forged binding updates, from one source, from 1 000 spoofed
    /// sources and from the servers' own addresses.
    pub fn kinds(&self) -> Vec<Flood> {
        let mut garbage = vec![0u8; 64];
        for (i, b) in garbage.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let one = Ipv4Addr::new(10, 71, 1, 200);
        // 1 000 sources in 10.71.10.0-10.71.13.255, no host of the topology's.
        let spoofed: Vec<Ipv4Addr> = (0..1000u32)
            .map(|i| Ipv4Addr::new(10, 71, 10 + (i / 250) as u8, (i % 250 + 1) as u8))
            .collect();
        let servers: Vec<Ipv4Addr> = self.topo.servers.iter().map(|s| s.v4).collect();
        vec![
            Flood {
                what: "garbage from one source",
                frames: vec![self.frame(one, &garbage)],
            },
            Flood {
                what: "forged updates from one source",
                frames: (0..64)
                    .map(|i| self.frame(one, &forged_update("s1", i)))
                    .collect(),
            },
            Flood {
                what: "garbage from 1 000 spoofed sources",
                frames: spoofed.iter().map(|s| self.frame(*s, &garbage)).collect(),
            },
            Flood {
                what: "forged updates from 1 000 spoofed sources",
                frames: spoofed
                    .iter()
                    .enumerate()
                    .map(|(i, s)| self.frame(*s, &forged_update("s2", i as u16)))
                    .collect(),
            },
            Flood {
                what: "forged updates spoofing the servers' own addresses",
                frames: (0..64)
                    .map(|i| {
                        let who = i % servers.len();
                        self.frame(
                            servers[who],
                            &forged_update(&format!("s{}", who + 1), i as u16),
                        )
                    })
                    .collect(),
            },
        ]
    }

    /// Sends `kind` at `pace` for `how_long` (nothing, for a flood without frames) and
    /// measures what it did.
    pub fn measure(&self, kind: Flood, pace: u64, how_long: Duration) -> Result<Figures> {
        let topo = &self.topo;
        let before = agent_usage(self.pid)?;
        let counters0 = topo.bindings()?["counters"].clone();
        let started = Instant::now();
        let flooder = self.flooder.name.clone();
        let frames = kind.frames;
        let sender = std::thread::spawn(move || {
            let t = Instant::now();
            let sent = if frames.is_empty() {
                std::thread::sleep(how_long);
                Ok(0)
            } else {
                let ns = Netns { name: flooder };
                let r = flood(&ns, "eth0", frames, pace, how_long);
                // The namespace is the caller's to delete.
                std::mem::forget(ns);
                r
            };
            sent.map(|n| (n, t.elapsed().as_secs_f64()))
        });
        let (mut samples, mut rss_max_kib, mut changed_states) = (0, 0, Vec::new());
        let mut next_sample = started;
        while !sender.is_finished() {
            if started.elapsed() > how_long + OVERRUN {
                bail!("{}: the flood did not stop", kind.what);
            }
            if Instant::now() >= next_sample {
                let now = topo.binding_states()?;
                if now != self.states {
                    changed_states.push(now);
                }
                rss_max_kib = rss_max_kib.max(agent_usage(self.pid)?.rss_kib);
                samples += 1;
                next_sample += SAMPLE_EVERY;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (sent, secs) = sender
            .join()
            .map_err(|_| anyhow!("the flood thread panicked"))??;
        let after = agent_usage(self.pid)?;
        let ended = Instant::now();
        let counters = topo.bindings()?["counters"].clone();
        let delta = |name: &str| {
            counters[name]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(counters0[name].as_u64().unwrap_or(0))
        };
        let counted = counters
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("dropped_") || k.starts_with("refused_"))
            .map(|(k, _)| delta(k))
            .sum();
        let (mut round_trips, mut unanswered) = (Vec::new(), Vec::new());
        for outcome in self.refresher.between(started, ended)? {
            match outcome {
                Ok(rtt) => round_trips.push(rtt),
                Err(e) => unanswered.push(e),
            }
        }
        round_trips.sort();
        let connections = self.load.between(started, ended)?;
        let failed_connections = connections
            .iter()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        let window = ended.duration_since(started).as_secs_f64();
        Ok(Figures {
            what: kind.what.to_string(),
            sent,
            secs,
            cpu_percent: (after.cpu_ticks - before.cpu_ticks) as f64
                / clock_ticks_per_second()
                / window
                * 100.0,
            rss_before_kib: before.rss_kib,
            rss_max_kib,
            rss_after_kib: after.rss_kib,
            probes: delta("probes_sent"),
            probes_missed: delta("probes_missed"),
            refreshed: delta("refreshed"),
            counted,
            samples,
            changed_states,
            round_trips,
            unanswered,
            connections: connections.len(),
            failed_connections,
        })
    }
}
