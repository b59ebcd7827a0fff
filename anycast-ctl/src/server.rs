//! `anycast-ctl server`: the server side. Decapsulates IP-in-IP packets for the anycast
//! addresses this server answers for (the kernel here has no ipip module), holds those
//! addresses on `lo` so replies leave with the anycast address as source, straight to the
//! client, and undoes all of it on exit.
//!
//! With `--reverse-tunnel`, a TC egress program on the interfaces sends each connection's
//! SYN-ACK back through the agent, IP-in-IP (from the server's real address to the first
//! `--agent` address), so the agent sees that the server answers the flows it is given.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anycast_common::{
    addr_words, decap, maps, programs, syn_ack_tunnel, wire::ServiceSelector, AddressKey,
    SynAckTunnelConfig,
};
use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};

use crate::{
    config::XdpModeName,
    dataplane::{attach, attach_tc_egress, load_object, spawn_ebpf_logger, Sizes},
    host::{self as sys, HostChanges},
    registration::server::{
        established_sessions, AnycastBinding, Client, ClientConfig, LoadSource,
    },
};

pub struct ServerOptions {
    pub interfaces: Vec<String>,
    pub anycast: Vec<AnycastSpec>,
    pub xdp_mode: XdpModeName,
    /// Register with these agents (none: the agents are configured with this server).
    pub registration: Option<RegistrationOptions>,
    /// Send clients signed bindings to our real address (route optimization).
    pub route_optimization: Option<RouteOptimization>,
}

/// `--certificate FILE --signing-key FILE [--client-binding-lifetime SECS]`.
pub struct RouteOptimization {
    pub certificate: anycast_common::pki::Certificate,
    pub key: anycast_common::pki::SigningKey,
    pub lifetime: Duration,
}

/// `--anycast ADDR[:PROTO:PORT]`: an address, or one service of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnycastSpec {
    pub address: IpAddr,
    pub selector: Option<ServiceSelector>,
}

impl std::str::FromStr for AnycastSpec {
    type Err = String;
    /// `10.0.0.1`, `10.0.0.1:tcp:80`, `fd00::1`, `[fd00::1]:udp:53`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(address) = s.parse::<IpAddr>() {
            return Ok(AnycastSpec {
                address,
                selector: None,
            });
        }
        let (addr, rest) = if let Some(r) = s.strip_prefix('[') {
            r.split_once("]:")
                .ok_or_else(|| format!("'{s}': expected [IPV6]:PROTO:PORT"))?
        } else {
            s.split_once(':')
                .ok_or_else(|| format!("'{s}': expected ADDR or ADDR:PROTO:PORT"))?
        };
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IP address"))?;
        let (proto, port) = rest
            .split_once(':')
            .ok_or_else(|| format!("'{s}': expected ADDR:PROTO:PORT"))?;
        let protocol = match proto {
            "tcp" => anycast_common::PROTO_TCP,
            "udp" => anycast_common::PROTO_UDP,
            p => return Err(format!("'{p}' is not tcp or udp")),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{port}' is not a port (0 for any)"))?;
        Ok(AnycastSpec {
            address,
            selector: Some(ServiceSelector { protocol, port }),
        })
    }
}

pub struct RegistrationOptions {
    pub agents: Vec<SocketAddr>,
    /// The address all agents share: register with every agent it lists.
    pub discovery: Option<SocketAddr>,
    pub identity: String,
    pub spi: u32,
    /// Empty when registering with the certificate.
    pub key: Vec<u8>,
    /// Register with `--certificate`/`--signing-key` instead of a key (`--key` not given).
    pub certificate: Option<crate::registration::server::RegistrationCertificate>,
    /// Real addresses to bind through; empty: the global addresses of the interfaces.
    pub real: Vec<IpAddr>,
    pub lifetime: Duration,
    pub priority: u16,
    pub load: LoadSource,
    /// After deregistering, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// Send each connection's SYN-ACK back through the first agent (IP-in-IP from the real
    /// address of the agent's family), so the agent can watch that we answer new flows.
    pub reverse_tunnel: bool,
}

/// The server side's maps are tiny; the agent's share the object and are shrunk to nothing.
const SERVER_SIZES: Sizes = Sizes {
    ring_size: 1,
    max_services: 1,
    max_flows: 1,
    max_preference_tables: 1,
    max_client_flows: 1,
    max_server_udp_flows: anycast_common::MAX_SERVER_UDP_FLOWS,
};

pub async fn run(opts: ServerOptions) -> Result<()> {
    if opts.anycast.is_empty() {
        return Err(anyhow!("give at least one --anycast address"));
    }
    for (i, name) in opts.interfaces.iter().enumerate() {
        sys::ifindex(name).with_context(|| format!("--iface #{}", i + 1))?;
    }
    let mut ebpf = load_object(SERVER_SIZES)?;
    spawn_ebpf_logger(&mut ebpf);
    let mut served: BpfHashMap<MapData, AddressKey, u32> = BpfHashMap::try_from(
        ebpf.take_map(maps::SERVED)
            .ok_or_else(|| anyhow!("no SERVED map"))?,
    )?;
    let addresses: Vec<IpAddr> = {
        let mut a: Vec<IpAddr> = opts.anycast.iter().map(|s| s.address).collect();
        a.sort();
        a.dedup();
        a
    };
    for &a in &addresses {
        served
            .insert(AddressKey::new(a), 1, 0)
            .context("writing the served addresses")?;
    }
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        ebpf.take_map(maps::DECAP_STATS)
            .ok_or_else(|| anyhow!("no DECAP_STATS map"))?,
    )?;
    let reverse_stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        ebpf.take_map(maps::REVERSE_STATS)
            .ok_or_else(|| anyhow!("no REVERSE_STATS map"))?,
    )?;
    // The real addresses to bind through (and the reverse tunnel's source).
    let real = match &opts.registration {
        Some(reg) if reg.real.is_empty() => sys::global_addresses(&opts.interfaces)?,
        Some(reg) => reg.real.clone(),
        None => Vec::new(),
    };
    let tunnel = match &opts.registration {
        Some(reg) if reg.reverse_tunnel => {
            let agent = reg
                .agents
                .first()
                .ok_or_else(|| anyhow!("--reverse-tunnel needs --agent"))?
                .ip();
            let source = real
                .iter()
                .copied()
                .find(|r| r.is_ipv4() == agent.is_ipv4())
                .ok_or_else(|| {
                    anyhow!(
                        "--reverse-tunnel: no real address of the agent {agent}'s family to \
                         send from; give --real"
                    )
                })?;
            Some((agent, source))
        }
        _ => None,
    };
    // Held until exit: closing a map's last descriptor before the program that uses it is
    // loaded would free it.
    let mut _reverse_config: Option<Array<MapData, SynAckTunnelConfig>> = None;
    if let Some((agent, source)) = tunnel {
        let (agent_words, family) = addr_words(agent);
        let mut config: Array<MapData, SynAckTunnelConfig> = Array::try_from(
            ebpf.take_map(maps::REVERSE_CONFIG)
                .ok_or_else(|| anyhow!("no REVERSE_CONFIG map"))?,
        )?;
        config
            .set(
                0,
                SynAckTunnelConfig {
                    agent: agent_words,
                    source: addr_words(source).0,
                    family,
                    _pad: [0; 3],
                },
                0,
            )
            .context("writing the reverse tunnel's configuration")?;
        _reverse_config = Some(config);
    }

    let mut host = HostChanges::default();
    if addresses.iter().any(|a| a.is_ipv4()) {
        // The anycast address is on lo: never answer ARP for it or use it as an ARP source,
        // or the server would steal the address from the agent on a shared segment.
        host.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        host.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    }
    for &a in &addresses {
        host.add_address(a, "lo")?;
    }
    if let Some((agent, _)) = tunnel {
        // The program asks the FIB for the route to the agent as for a packet sent from this
        // host, i.e. entering on lo, and the kernel only answers such lookups for an
        // interface that forwards. lo never receives a packet for another host, so this
        // makes the server forward nothing.
        if agent.is_ipv4() {
            host.sysctl("net.ipv4.conf.lo.forwarding", "1")?;
        } else {
            host.sysctl("net.ipv6.conf.lo.forwarding", "1")?;
        }
    }
    for name in &opts.interfaces {
        attach(&mut ebpf, programs::SERVER_DECAP, name, opts.xdp_mode)?;
        tracing::info!("decapsulating on {name} in {:?} XDP mode", opts.xdp_mode);
    }
    if let Some((agent, source)) = tunnel {
        for name in &opts.interfaces {
            host.add_clsact(name)?;
            attach_tc_egress(&mut ebpf, programs::SERVER_REVERSE, name)?;
            tracing::info!(
                "reverse tunnel on {name} egress: SYN-ACKs from the anycast addresses go to \
                 the agent {agent}, IP-in-IP from {source}"
            );
        }
    }
    let (stop_binding, stop_rx) = tokio::sync::watch::channel(false);
    let binder = match opts.route_optimization {
        Some(ro) => {
            let real = if real.is_empty() {
                sys::global_addresses(&opts.interfaces)?
            } else {
                real.clone()
            };
            let b = crate::server_binding::BindingOptions {
                certificate: ro.certificate,
                key: ro.key,
                anycast: opts.anycast.clone(),
                real,
                lifetime: ro.lifetime,
                port: anycast_common::wire::CLIENT_PORT,
            };
            // Refused here (wrong key, no certified real address) rather than in the task.
            crate::server_binding::Binder::new(b.clone())?;
            // The UDP flows the decapsulator saw: how UDP clients are found.
            let udp = match ebpf.take_map(maps::SERVER_UDP_FLOWS) {
                Some(m) => Some(BpfHashMap::try_from(m)?),
                None => {
                    tracing::warn!("no SERVER_UDP_FLOWS map: UDP clients are not bound");
                    None
                }
            };
            Some(tokio::spawn(crate::server_binding::run(b, udp, stop_rx)))
        }
        None => None,
    };
    let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    tracing::info!("server ready: answering for {}", list.join(", "));
    crate::service_manager::notify("READY=1\nSTATUS=server ready");

    let why = match opts.registration {
        None => {
            let why = sys::shutdown_signal().await?;
            crate::service_manager::notify("STOPPING=1");
            let _ = stop_binding.send(true);
            why
        }
        Some(reg) => {
            let client = Client::new(ClientConfig {
                agents: reg.agents.clone(),
                discovery: reg.discovery,
                identity: reg.identity.clone(),
                spi: reg.spi,
                key: reg.key.clone(),
                certificate: reg.certificate.clone(),
                bindings: opts
                    .anycast
                    .iter()
                    .map(|s| AnycastBinding {
                        anycast: s.address,
                        selector: s.selector,
                    })
                    .collect(),
                real_addresses: real,
                lifetime: reg.lifetime,
                priority: reg.priority,
                load: reg.load,
                initial_timeout: Duration::from_secs(1),
                max_timeout: Duration::from_secs(32),
            })
            .await?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let signal = tokio::spawn(async move {
                let why = sys::shutdown_signal().await;
                // Deregistering and draining take a while: systemd shows it stopping.
                crate::service_manager::notify("STOPPING=1");
                // Bound clients go back to the agent first (claim 15).
                let _ = stop_binding.send(true);
                let _ = tx.send(());
                why
            });
            let removed = client
                .run(
                    async {
                        let _ = rx.await;
                    },
                    Duration::from_secs(5),
                )
                .await?;
            let why = signal.await.context("signal task")??;
            tracing::info!("{why}: deregistered {removed} bindings; draining open connections");
            // Graceful drain: the agent keeps our open flows on us for its drain time; keep
            // decapsulating until they are done (or the drain timeout ends).
            let deadline = tokio::time::Instant::now() + reg.drain_timeout;
            loop {
                let open = established_sessions(&addresses);
                if open == 0 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!("drain timeout: {open} connections still open");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            why
        }
    };
    if let Some(b) = binder {
        match tokio::time::timeout(Duration::from_secs(2), b).await {
            Ok(Ok(Err(e))) => tracing::warn!("route optimization: {e:#}"),
            Err(_) => tracing::warn!("route optimization: the withdrawals took over 2 s"),
            _ => {}
        }
    }
    let mut counts = Vec::new();
    for (i, name) in decap::NAMES.iter().enumerate() {
        let v: u64 = stats.get(&(i as u32), 0)?.iter().sum();
        counts.push(format!("{name}={v}"));
    }
    if tunnel.is_some() {
        for (i, name) in syn_ack_tunnel::NAMES.iter().enumerate() {
            let v: u64 = reverse_stats.get(&(i as u32), 0)?.iter().sum();
            counts.push(format!("reverse_{name}={v}"));
        }
    }
    tracing::info!("{why}: stopping ({})", counts.join(" "));
    drop(ebpf);
    host.undo();
    tracing::info!("server stopped");
    Ok(())
}

/// `anycast-ctl passthrough`: attaches a program that passes every frame. In native XDP mode
/// a veth only receives frames another veth sent with XDP_TX/XDP_REDIRECT if it has an XDP
/// program itself; test and demo topologies put this on the agent's peers.
pub async fn passthrough(interfaces: &[String], mode: XdpModeName) -> Result<()> {
    let mut ebpf = load_object(SERVER_SIZES)?;
    for name in interfaces {
        attach(&mut ebpf, programs::PASS, name, mode)?;
    }
    tracing::info!("passthrough ready on {}", interfaces.join(", "));
    let why = sys::shutdown_signal().await?;
    tracing::info!("{why}: passthrough stopped");
    Ok(())
}
