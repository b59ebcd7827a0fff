//! The agent's view of its BPF maps: loads the XDP program, attaches it, and turns a desired
//! set of services and servers into map contents. Consistent-hash tables are double-buffered
//! per service: the new table is written into the half the data path is not reading, then
//! one `SERVICES` update switches the data path over, so no lookup sees a half-written table.
//! Topology preferences get tables of their own (double-buffered the same way) that the
//! `PREFERENCES` LPM trie points to by client prefix.
//!
//! The flow table ages: each entry carries the tick it was last seen on the flow clock
//! (`CLOCK_MONOTONIC_COARSE` in ticks of 2^30 ns; [`flow_clock_now`]), entries idle past their
//! protocol's timeout ([`FlowTimeouts`]) are re-chosen by the data path and deleted by
//! [`Dataplane::sweep_flows`].
//!
//! Reverse tunnel: `REVERSE` holds one entry per installed server real address (written
//! here, counted into by the data path), so only known servers' reverse-tunnelled packets
//! are decapsulated; [`Dataplane::reverse_counters`] reads them with the SYNs forwarded to
//! each address.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use crate::config::XdpModeName;
use anycast_common::{
    address_filter_bit, maps, programs, verdict, AddressKey, AgentInfo, FlowConfig, FlowKey,
    FlowValue, PreferenceKey, PreferenceTable, ReverseStats, ServerInfo, ServerTraffic,
    ServiceInfo, ServiceKey, Traffic, ADDRESS_FILTER_WORDS, AGENT_ANSWER_PING,
    AGENT_ANSWER_TOO_BIG, AGENT_FORWARD_ICMP_ERRORS, AGENT_HAS_V4, AGENT_HAS_V6,
    AGENT_REVERSE_TUNNEL, DEFAULT_MAX_FLOWS, DEFAULT_MAX_PREFERENCE_TABLES, DEFAULT_MAX_SERVICES,
    DEFAULT_RING_SIZE, DEFAULT_TCP_CLOSING, DEFAULT_TCP_IDLE, DEFAULT_UDP_IDLE, FAMILY_V4,
    FLOW_CLOSING, MAX_PREFERENCE_PREFIXES, MAX_SERVERS, SERVER_UP, SERVICE_HAS_PREFERENCES,
};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMapHash, HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapError,
        PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::{xdp::XdpMode, Xdp},
    Ebpf, EbpfLoader,
};
use serde::Serialize;

mod apply;
mod bpf_sys;
mod flows;
mod icmp;
mod loader;
mod pinning;
pub mod pins;
mod plan;
mod report;
mod rings;
mod tables;
mod too_big;
mod unseen_pins;

pub use crate::model::{DesiredServer, DesiredService, Preference};
pub use flows::{flow_clock_now, FlowSnapshot, FlowSweeper, FlowTimeouts};
use loader::take;
pub use loader::{
    attach, attach_tc_egress, load_object, spawn_ebpf_logger, xdp_mode, Sizes, EBPF_OBJECT,
};
pub use pinning::{check_layout, show_tag, Attached};
pub use pins::{pins_channel, FlowPin, PinView, PinsFound, PinsHandle, FLOW_LEARNED};
pub use plan::{Installed, InstalledRecord, MapTruth, Op};
pub use report::{
    coarse_clock_ns, DataplaneReport, FlowReport, ReverseCounters, ServerReport, ServiceReport,
    SweepReport,
};
use rings::Rings;
pub use tables::TableWrite;
pub use too_big::{DEFAULT_TOO_BIG_ANSWERS_PER_SECOND, MAX_TOO_BIG_ANSWERS_PER_SECOND};
pub use unseen_pins::{DEFAULT_UNSEEN_PINS_PER_SECOND, MAX_UNSEEN_PINS_PER_SECOND};

pub struct Dataplane {
    pub ebpf: Ebpf,
    sizes: Sizes,
    services_map: BpfHashMap<MapData, ServiceKey, ServiceInfo>,
    address_filter: Array<MapData, u64>,
    rings: Rings,
    servers_map: Array<MapData, ServerInfo>,
    agent_map: Array<MapData, AgentInfo>,
    /// Written by the sweeper thread, read by [`Dataplane::report`].
    sweep_report: std::sync::Arc<std::sync::Mutex<SweepReport>>,
    /// What `AGENT` holds.
    agent_info: AgentInfo,
    flows_map: BpfHashMap<MapData, FlowKey, FlowValue>,
    flow_config: Array<MapData, FlowConfig>,
    preferences_map: LpmTrie<MapData, [u32; 5], PreferenceTable>,
    tx_ports: DevMapHash<MapData>,
    verdicts: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Traffic>,
    server_stats: PerCpuArray<MapData, ServerTraffic>,
    reverse_map: PerCpuHashMap<MapData, AddressKey, ReverseStats>,
    /// Every service's anycast address (see `icmp.rs`).
    service_addrs: BpfHashMap<MapData, AddressKey, u32>,
    /// What the maps hold, as far as the controller knows.
    installed: Installed,
    timeouts: FlowTimeouts,
    /// The XDP links this controller holds (pinned ones stay attached when it goes).
    links: Vec<pinning::HeldLink>,
    /// Services an adopted map holds that the adopted record does not know: removed after
    /// the next apply.
    stray_services: Vec<ServiceKey>,
}

impl Dataplane {
    /// The data plane on maps of its own, which go with it.
    pub fn new(sizes: Sizes) -> Result<Self> {
        Self::open(sizes, None)
    }

    /// The data plane on the maps pinned in `maps_dir` (made and pinned there when missing,
    /// adopted with their contents when present: check them first with [`check_layout`]).
    pub fn open(sizes: Sizes, maps_dir: Option<&std::path::Path>) -> Result<Self> {
        let pins = maps_dir.map(pinning::pin_paths).unwrap_or_default();
        let mut ebpf = loader::load_object_pinned(sizes, &pins)?;
        let mut dp = Dataplane {
            services_map: take(&mut ebpf, maps::SERVICES)?,
            address_filter: take(&mut ebpf, maps::ADDRESS_FILTER)?,
            rings: Rings::new(take(&mut ebpf, maps::RINGS)?),
            servers_map: take(&mut ebpf, maps::SERVERS)?,
            agent_map: take(&mut ebpf, maps::AGENT)?,
            // Published with the addresses: too-big answers are on unless turned off.
            agent_info: AgentInfo {
                flags: AGENT_ANSWER_TOO_BIG,
                too_big_cost_ns: too_big::cost_ns(DEFAULT_TOO_BIG_ANSWERS_PER_SECOND),
                unseen_pin_cost_ns: unseen_pins::cost_ns(DEFAULT_UNSEEN_PINS_PER_SECOND),
                ..AgentInfo::default()
            },
            sweep_report: Default::default(),
            flows_map: take(&mut ebpf, maps::FLOWS)?,
            flow_config: take(&mut ebpf, maps::FLOW_CONFIG)?,
            preferences_map: take(&mut ebpf, maps::PREFERENCES)?,
            tx_ports: take(&mut ebpf, maps::TX_PORTS)?,
            verdicts: take(&mut ebpf, maps::VERDICTS)?,
            service_stats: take(&mut ebpf, maps::SERVICE_STATS)?,
            server_stats: take(&mut ebpf, maps::SERVER_STATS)?,
            reverse_map: take(&mut ebpf, maps::REVERSE)?,
            service_addrs: take(&mut ebpf, maps::SERVICE_ADDRS)?,
            ebpf,
            sizes,
            installed: Installed::new(sizes),
            timeouts: FlowTimeouts::default(),
            links: Vec::new(),
            stray_services: Vec::new(),
        };
        if pins.is_empty() {
            dp.set_flow_timeouts(FlowTimeouts::default())?;
        }
        // The logarithms every table build of this size uses, computed now rather than in
        // the first publish (a server's first binding update waits for that publish).
        if anycast_common::table::is_prime(sizes.ring_size) {
            anycast_common::table::prepare(sizes.ring_size);
        }
        Ok(dp)
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// How consistent-hash tables reach the kernel: `"memory mapping"` (plain stores into
    /// the mapped `RINGS`), `"batch updates"` or `"single updates"`.
    pub fn table_write_path(&self) -> &'static str {
        if self.rings.mapped.is_some() {
            "memory mapping"
        } else if self.rings.batch {
            "batch updates"
        } else {
            "single updates"
        }
    }

    pub fn set_agent_addresses(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>) -> Result<()> {
        let mut info = AgentInfo {
            fib_generation: self.agent_info.fib_generation,
            flags: self.agent_info.flags
                & (AGENT_REVERSE_TUNNEL
                    | AGENT_ANSWER_PING
                    | AGENT_FORWARD_ICMP_ERRORS
                    | AGENT_ANSWER_TOO_BIG),
            too_big_cost_ns: self.agent_info.too_big_cost_ns,
            unseen_pin_cost_ns: self.agent_info.unseen_pin_cost_ns,
            ..AgentInfo::default()
        };
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
            .context("writing the agent's addresses")?;
        self.agent_info = info;
        Ok(())
    }

    /// Whether the data path decapsulates servers' reverse-tunnelled packets
    /// (`registration.reverse_tunnel` is configured). Off, it passes them untouched
    /// (`pass_reverse_off`).
    pub fn set_reverse_tunnel(&mut self, on: bool) -> Result<()> {
        let mut info = self.agent_info;
        if on {
            info.flags |= AGENT_REVERSE_TUNNEL;
        } else {
            info.flags &= !AGENT_REVERSE_TUNNEL;
        }
        if info == self.agent_info {
            return Ok(());
        }
        self.agent_map
            .set(0, info, 0)
            .context("writing the reverse-tunnel flag")?;
        self.agent_info = info;
        Ok(())
    }

    /// The kernel's routes, neighbours, addresses or links changed: the data path stops
    /// using the next hops it cached (it asks the FIB again at each server's next packet).
    pub fn fib_changed(&mut self) -> Result<()> {
        let info = AgentInfo {
            fib_generation: self.agent_info.fib_generation.wrapping_add(1),
            ..self.agent_info
        };
        self.agent_map
            .set(0, info, 0)
            .context("writing the FIB generation")?;
        self.agent_info = info;
        Ok(())
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
}

fn protocol_name(proto: u8) -> String {
    match proto {
        anycast_common::PROTO_TCP => "tcp".into(),
        anycast_common::PROTO_UDP => "udp".into(),
        p => p.to_string(),
    }
}

fn is_enoent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting possible CPUs: {e}"))
}

fn sum_server(values: &PerCpuValues<ServerTraffic>) -> ServerTraffic {
    values
        .iter()
        .fold(ServerTraffic::default(), |a, t| ServerTraffic {
            packets: a.packets + t.packets,
            bytes: a.bytes + t.bytes,
            syns: a.syns + t.syns,
            flows: a.flows + t.flows,
        })
}

fn sum(values: &PerCpuValues<Traffic>) -> Traffic {
    values.iter().fold(Traffic::default(), |a, t| Traffic {
        packets: a.packets + t.packets,
        bytes: a.bytes + t.bytes,
    })
}
