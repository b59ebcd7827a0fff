//! `anycast-ctl server`: the server side. Decapsulates IP-in-IP packets for the anycast
//! addresses this server answers for (the kernel here has no ipip module), holds those
//! addresses on `lo` so replies leave with the anycast address as source, straight to the
//! client, and undoes all of it on exit.
use std::net::IpAddr;

use anycast_common::{decap, maps, programs, ServedKey};
use anyhow::{anyhow, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};

use crate::{
    config::XdpModeName,
    dataplane::{attach, load_object, Sizes},
    sys::{self, HostChanges},
};

pub struct ServerOptions {
    pub interfaces: Vec<String>,
    pub anycast: Vec<IpAddr>,
    pub xdp_mode: XdpModeName,
}

/// The server side's maps are tiny; the agent's share the object and are shrunk to nothing.
const SERVER_SIZES: Sizes = Sizes {
    ring_size: 1,
    max_services: 1,
    max_flows: 1,
};

pub async fn run(opts: ServerOptions) -> Result<()> {
    if opts.anycast.is_empty() {
        return Err(anyhow!("give at least one --anycast address"));
    }
    for (i, name) in opts.interfaces.iter().enumerate() {
        sys::ifindex(name).with_context(|| format!("--iface #{}", i + 1))?;
    }
    let mut ebpf = load_object(SERVER_SIZES)?;
    let mut served: BpfHashMap<MapData, ServedKey, u32> = BpfHashMap::try_from(
        ebpf.take_map(maps::SERVED)
            .ok_or_else(|| anyhow!("no SERVED map"))?,
    )?;
    for &a in &opts.anycast {
        served
            .insert(ServedKey::new(a), 1, 0)
            .context("writing the served addresses")?;
    }
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
        ebpf.take_map(maps::DECAP_STATS)
            .ok_or_else(|| anyhow!("no DECAP_STATS map"))?,
    )?;

    let mut host = HostChanges::default();
    if opts.anycast.iter().any(|a| a.is_ipv4()) {
        // The anycast address is on lo: never answer ARP for it or use it as an ARP source,
        // or the server would steal the address from the agent on a shared segment.
        host.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        host.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    }
    for &a in &opts.anycast {
        host.add_address(a, "lo")?;
    }
    for name in &opts.interfaces {
        attach(&mut ebpf, programs::SERVER_DECAP, name, opts.xdp_mode)?;
        tracing::info!("decapsulating on {name} in {:?} XDP mode", opts.xdp_mode);
    }
    let list: Vec<String> = opts.anycast.iter().map(|a| a.to_string()).collect();
    tracing::info!("server ready: answering for {}", list.join(", "));

    let why = sys::shutdown_signal().await?;
    let mut counts = Vec::new();
    for (i, name) in decap::NAMES.iter().enumerate() {
        let v: u64 = stats.get(&(i as u32), 0)?.iter().sum();
        counts.push(format!("{name}={v}"));
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
