//! The agent's view of its BPF maps: loads the XDP program, attaches it, and turns a desired
//! set of services and servers into map contents. Consistent-hash tables are double-buffered
//! per service: the new table is written into the half the data path is not reading, then
//! one `SERVICES` update switches the data path over, so no lookup sees a half-written table.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use anycast_common::{
    maps, programs, table, verdict, AgentInfo, ServerInfo, ServiceInfo, ServiceKey, Traffic,
    AGENT_HAS_V4, AGENT_HAS_V6, MAX_SERVERS, NO_SERVER, SERVER_UP,
};
use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpMode, Xdp},
    Ebpf, EbpfLoader,
};
use serde::Serialize;

use crate::config::XdpModeName;

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/anycast"));

/// Map sizes chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub ring_size: u32,
    pub max_services: u32,
    pub max_flows: u32,
}

/// Loads the eBPF object with the agent's maps sized as asked.
pub fn load_object(sizes: Sizes) -> Result<Ebpf> {
    EbpfLoader::new()
        .map_max_entries(maps::RINGS, 2 * sizes.max_services * sizes.ring_size)
        .map_max_entries(maps::FLOWS, sizes.max_flows)
        .map_max_entries(maps::SERVICES, sizes.max_services)
        .map_max_entries(maps::SERVICE_STATS, sizes.max_services)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (are you root, with BPF and XDP available?)")
}

pub fn xdp_mode(mode: XdpModeName) -> XdpMode {
    match mode {
        XdpModeName::Native => XdpMode::Driver,
        XdpModeName::Generic => XdpMode::Skb,
        XdpModeName::Auto => XdpMode::Default,
    }
}

/// Loads (once) and attaches an XDP program of the object to an interface.
pub fn attach(ebpf: &mut Ebpf, program: &str, iface: &str, mode: XdpModeName) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel refused to load {program}"))?;
    }
    prog.attach(iface, xdp_mode(mode)).with_context(|| {
        format!("attaching {program} to {iface} in {mode:?} mode failed (is XDP supported there, and no other program attached?)")
    })?;
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// A service as the control plane wants it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DesiredService {
    pub name: String,
    pub key: ServiceKey,
    pub servers: Vec<DesiredServer>,
    /// Topology preferences: clients in these prefixes go to these servers first.
    pub preferences: Vec<Preference>,
}

/// Clients whose source address is in one of `clients` are sent to `servers` (real
/// addresses among the service's servers) while any of those can take new flows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Preference {
    pub clients: Vec<(IpAddr, u8)>,
    pub servers: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredServer {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    pub up: bool,
}

struct InstalledService {
    name: String,
    id: u32,
    /// Which half of the service's ring area the data path reads.
    live_half: u32,
    /// What each half holds, if known (a half never written, or written by an earlier holder
    /// of this id, is unknown and rewritten whole).
    halves: [Option<Vec<u32>>; 2],
    servers: Vec<InstalledServer>,
}

#[derive(Clone)]
struct InstalledServer {
    name: String,
    address: IpAddr,
    weight: u32,
    up: bool,
    slot: u32,
}

pub struct Dataplane {
    pub ebpf: Ebpf,
    sizes: Sizes,
    services_map: BpfHashMap<MapData, ServiceKey, ServiceInfo>,
    rings: Array<MapData, u32>,
    servers_map: Array<MapData, ServerInfo>,
    agent_map: Array<MapData, AgentInfo>,
    tx_ports: DevMapHash<MapData>,
    verdicts: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Traffic>,
    server_stats: PerCpuArray<MapData, Traffic>,
    installed: HashMap<ServiceKey, InstalledService>,
    free_service_ids: Vec<u32>,
    /// Server slots not in use, oldest freed first, so a slot is reused as late as possible.
    free_slots: VecDeque<u32>,
    generations: Vec<u32>,
}

impl Dataplane {
    pub fn new(sizes: Sizes) -> Result<Self> {
        let mut ebpf = load_object(sizes)?;
        Ok(Dataplane {
            services_map: take(&mut ebpf, maps::SERVICES)?,
            rings: take(&mut ebpf, maps::RINGS)?,
            servers_map: take(&mut ebpf, maps::SERVERS)?,
            agent_map: take(&mut ebpf, maps::AGENT)?,
            tx_ports: take(&mut ebpf, maps::TX_PORTS)?,
            verdicts: take(&mut ebpf, maps::VERDICTS)?,
            service_stats: take(&mut ebpf, maps::SERVICE_STATS)?,
            server_stats: take(&mut ebpf, maps::SERVER_STATS)?,
            ebpf,
            sizes,
            installed: HashMap::new(),
            free_service_ids: (0..sizes.max_services).rev().collect(),
            free_slots: (0..MAX_SERVERS).collect(),
            generations: vec![0; MAX_SERVERS as usize],
        })
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    pub fn set_agent_addresses(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>) -> Result<()> {
        let mut info = AgentInfo::default();
        if let Some(a) = v4 {
            info.v4 = anycast_common::addr_words(a).0[0];
            info.flags |= AGENT_HAS_V4;
        }
        if let Some(a) = v6 {
            info.v6 = anycast_common::addr_words(a).0;
            info.flags |= AGENT_HAS_V6;
        }
        self.agent_map
            .set(0, info, 0)
            .context("writing the agent's addresses")
    }

    /// Lets the data path redirect tunnelled packets to this interface.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .context("adding an interface to the device map")
    }

    pub fn attach(&mut self, iface: &str, mode: XdpModeName) -> Result<()> {
        attach(&mut self.ebpf, programs::AGENT, iface, mode)
    }

    /// Makes the maps say what `desired` says. Order matters for packets in flight: new
    /// servers first, then tables, then the switch to the new tables, then the removals.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<()> {
        let ring = self.sizes.ring_size;
        for want in desired {
            let mut svc = match self.installed.remove(&want.key) {
                Some(s) => s,
                None => {
                    let id = self.free_service_ids.pop().ok_or_else(|| {
                        anyhow!(
                            "no room for service {}: max_services is {}",
                            want.name,
                            self.sizes.max_services
                        )
                    })?;
                    self.service_stats.set(
                        id,
                        PerCpuValues::try_from(vec![Traffic::default(); nr_cpus()?])?,
                        0,
                    )?;
                    InstalledService {
                        name: want.name.clone(),
                        id,
                        live_half: 1,
                        halves: [None, None],
                        servers: Vec::new(),
                    }
                }
            };
            svc.name = want.name.clone();
            // Servers: keep the slots of those that stay, take new slots for new ones.
            let mut servers = Vec::with_capacity(want.servers.len());
            for w in &want.servers {
                let slot = match svc.servers.iter().position(|s| s.address == w.address) {
                    Some(i) => svc.servers.swap_remove(i).slot,
                    None => self.take_slot()?,
                };
                self.write_server(slot, w.address, w.up)?;
                servers.push(InstalledServer {
                    name: w.name.clone(),
                    address: w.address,
                    weight: w.weight,
                    up: w.up,
                    slot,
                });
            }
            let leaving = std::mem::replace(&mut svc.servers, servers);
            // The table, into the half the data path is not reading.
            let members: Vec<table::Member> = svc
                .servers
                .iter()
                .map(|s| table::Member {
                    key: table::member_key(&s.address.to_string()),
                    weight: if s.up { s.weight } else { 0 },
                })
                .collect();
            let entries: Vec<u32> = table::build(&members, ring)
                .into_iter()
                .map(|i| {
                    if i == NO_SERVER {
                        NO_SERVER
                    } else {
                        svc.servers[i as usize].slot
                    }
                })
                .collect();
            let half = 1 - svc.live_half;
            let base = (svc.id * 2 + half) * ring;
            let known = svc.halves[half as usize].take();
            for (i, &e) in entries.iter().enumerate() {
                if known.as_ref().is_some_and(|k| k[i] == e) {
                    continue;
                }
                self.rings
                    .set(base + i as u32, e, 0)
                    .context("writing a consistent-hash table")?;
            }
            svc.halves[half as usize] = Some(entries);
            let info = ServiceInfo {
                id: svc.id,
                ring_base: base,
                ring_size: ring,
                flags: 0,
            };
            self.services_map
                .insert(want.key, info, 0)
                .context("publishing a service")?;
            svc.live_half = half;
            for s in leaving {
                self.release_slot(s.slot)?;
            }
            self.installed.insert(want.key, svc);
        }
        // Services no longer wanted.
        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !desired.iter().any(|d| d.key == **k))
            .copied()
            .collect();
        for key in gone {
            let svc = self.installed.remove(&key).expect("listed above");
            self.services_map
                .remove(&key)
                .context("removing a service")?;
            for s in svc.servers {
                self.release_slot(s.slot)?;
            }
            self.free_service_ids.push(svc.id);
        }
        Ok(())
    }

    fn take_slot(&mut self) -> Result<u32> {
        let slot = self
            .free_slots
            .pop_front()
            .ok_or_else(|| anyhow!("all {MAX_SERVERS} server slots are in use"))?;
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.server_stats.set(
            slot,
            PerCpuValues::try_from(vec![Traffic::default(); nr_cpus()?])?,
            0,
        )?;
        Ok(slot)
    }

    fn write_server(&mut self, slot: u32, address: IpAddr, up: bool) -> Result<()> {
        let (addr, family) = anycast_common::addr_words(address);
        let info = ServerInfo {
            addr,
            family,
            flags: if up { SERVER_UP } else { 0 },
            _pad: [0; 2],
            generation: self.generations[slot as usize],
        };
        self.servers_map
            .set(slot, info, 0)
            .context("writing a server")
    }

    /// Marks the slot down, so flows pinned to it are re-chosen, and queues it for reuse.
    fn release_slot(&mut self, slot: u32) -> Result<()> {
        self.servers_map
            .set(slot, ServerInfo::default(), 0)
            .context("removing a server")?;
        self.free_slots.push_back(slot);
        Ok(())
    }

    /// Counters and the installed state, for `anycast-ctl status`.
    pub fn report(&self) -> Result<DataplaneReport> {
        let mut verdicts = Vec::new();
        for (i, name) in verdict::NAMES.iter().enumerate() {
            let v = self.verdicts.get(&(i as u32), 0)?;
            verdicts.push((name.to_string(), v.iter().sum()));
        }
        let mut services = Vec::new();
        for (key, svc) in &self.installed {
            let live = svc.halves[svc.live_half as usize].as_deref().unwrap_or(&[]);
            let mut servers = Vec::new();
            for s in &svc.servers {
                let t = sum(&self.server_stats.get(&s.slot, 0)?);
                servers.push(ServerReport {
                    name: s.name.clone(),
                    address: s.address,
                    weight: s.weight,
                    state: if s.up { "up" } else { "down" }.to_string(),
                    slot: s.slot,
                    table_entries: live.iter().filter(|&&e| e == s.slot).count() as u32,
                    packets: t.packets,
                    bytes: t.bytes,
                });
            }
            servers.sort_by(|a, b| a.name.cmp(&b.name));
            let t = sum(&self.service_stats.get(&svc.id, 0)?);
            services.push(ServiceReport {
                name: svc.name.clone(),
                address: key.ip(),
                protocol: match key.proto {
                    anycast_common::PROTO_TCP => "tcp".into(),
                    anycast_common::PROTO_UDP => "udp".into(),
                    p => p.to_string(),
                },
                port: key.port,
                id: svc.id,
                ring_size: self.sizes.ring_size,
                packets: t.packets,
                bytes: t.bytes,
                servers,
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DataplaneReport { services, verdicts })
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting possible CPUs: {e}"))
}

fn sum(values: &PerCpuValues<Traffic>) -> Traffic {
    values.iter().fold(Traffic::default(), |a, t| Traffic {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
    })
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DataplaneReport {
    pub services: Vec<ServiceReport>,
    /// (reason, packets), in the order of `anycast_common::verdict`.
    pub verdicts: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ServiceReport {
    pub name: String,
    pub address: IpAddr,
    pub protocol: String,
    pub port: u16,
    pub id: u32,
    pub ring_size: u32,
    pub packets: u64,
    pub bytes: u64,
    pub servers: Vec<ServerReport>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ServerReport {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
    pub state: String,
    pub slot: u32,
    /// Entries of the live consistent-hash table that point to this server.
    pub table_entries: u32,
    pub packets: u64,
    pub bytes: u64,
}
