//! What `anycast-ctl status` and the reverse-tunnel monitor read from the maps.
use super::*;

impl Dataplane {
    /// Per installed server real address: the TCP SYNs forwarded to it (over all its
    /// services) and the packets it reverse-tunnelled through us.
    pub fn reverse_counters(&self) -> Result<BTreeMap<IpAddr, ReverseCounters>> {
        let mut out: BTreeMap<IpAddr, ReverseCounters> = BTreeMap::new();
        for svc in self.installed.services.values() {
            for s in &svc.servers {
                let t = sum_server(&self.server_stats.get(&s.slot, 0)?);
                out.entry(s.address).or_default().syns += t.syns;
            }
        }
        for a in &self.installed.reverse_keys {
            let values = match self.reverse_map.get(&AddressKey::new(*a), 0) {
                Ok(v) => v,
                Err(e) if is_enoent(&e) => continue,
                Err(e) => return Err(e).context("reading the reverse-tunnel map"),
            };
            let c = out.entry(*a).or_default();
            for v in values.iter() {
                c.reverse_packets += v.packets;
                c.last_reverse_ns = c.last_reverse_ns.max(v.last_seen_ns);
            }
        }
        Ok(out)
    }

    /// Counters and the installed state, for `anycast-ctl status`.
    pub fn report(&self) -> Result<DataplaneReport> {
        let mut verdicts = Vec::new();
        for (i, name) in verdict::NAMES.iter().enumerate() {
            let v = self.verdicts.get(&(i as u32), 0)?;
            verdicts.push((name.to_string(), v.iter().sum()));
        }
        let mut services = Vec::new();
        for (key, svc) in &self.installed.services {
            let live = svc.area.live().unwrap_or(&[]);
            let mut servers = Vec::new();
            for s in &svc.servers {
                let t = sum_server(&self.server_stats.get(&s.slot, 0)?);
                servers.push(ServerReport {
                    name: s.name.clone(),
                    address: s.address,
                    weight: s.weight,
                    state: if s.up { "up" } else { "down" }.to_string(),
                    slot: s.slot,
                    table_entries: live.iter().filter(|&&e| e == s.slot).count() as u32,
                    packets: t.packets,
                    bytes: t.bytes,
                    syns: t.syns,
                    flows: t.flows,
                });
            }
            servers.sort_by(|a, b| a.name.cmp(&b.name));
            let t = sum(&self.service_stats.get(&svc.id, 0)?);
            let table_digest = table_digest(live, &svc.servers);
            let syns = servers.iter().map(|s| s.syns).sum();
            let flows = servers.iter().map(|s| s.flows).sum();
            services.push(ServiceReport {
                name: svc.name.clone(),
                address: key.ip(),
                protocol: protocol_name(key.proto),
                port: key.port,
                id: svc.id,
                ring_size: self.sizes.ring_size,
                table_digest,
                packets: t.packets,
                bytes: t.bytes,
                syns,
                flows,
                servers,
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DataplaneReport {
            services,
            verdicts,
            flow_table: self
                .sweep_report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            table_write_path: self.table_write_path().to_string(),
        })
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DataplaneReport {
    pub services: Vec<ServiceReport>,
    /// (reason, packets), in the order of `anycast_common::verdict`.
    pub verdicts: Vec<(String, u64)>,
    /// What the flow sweeper saw (zeros when no sweeper runs).
    #[serde(default)]
    pub flow_table: SweepReport,
    /// How consistent-hash tables reach the kernel ([`Dataplane::table_write_path`]).
    #[serde(default)]
    pub table_write_path: String,
}

/// The flow sweeper's account, for `anycast-ctl status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SweepReport {
    /// Sweeps done since the agent started.
    pub sweeps: u64,
    /// Entries in the flow table at the last sweep.
    pub entries: u64,
    /// Entries deleted since the agent started.
    pub swept: u64,
    /// How long the last sweep took, in milliseconds.
    pub last_sweep_ms: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ServiceReport {
    pub name: String,
    pub address: IpAddr,
    pub protocol: String,
    pub port: u16,
    pub id: u32,
    pub ring_size: u32,
    /// SHA-256 (hex) of the live consistent-hash table as this controller wrote it, each
    /// entry as its server's real address (16 bytes, IPv4-mapped; zeros for no server):
    /// slots are local, addresses are not, so agents with the same inputs show the same
    /// digest. Empty while the live table is not known (adopted, not yet rebuilt).
    #[serde(default)]
    pub table_digest: String,
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYNs (without ACK) forwarded, over its servers.
    #[serde(default)]
    pub syns: u64,
    /// New flows (flow-table misses given a server), over its servers.
    #[serde(default)]
    pub flows: u64,
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
    /// TCP SYNs (without ACK) among `packets`.
    #[serde(default)]
    pub syns: u64,
    /// New flows given this server (flow-table misses: a first packet, or one whose entry
    /// had ended or whose server went).
    #[serde(default)]
    pub flows: u64,
}

/// What the reverse-tunnel monitor reads for one server real address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReverseCounters {
    /// TCP SYNs (without ACK) forwarded to the address, over all its services.
    pub syns: u64,
    /// Packets the server reverse-tunnelled from this address (its SYN-ACKs).
    pub reverse_packets: u64,
    /// `CLOCK_MONOTONIC_COARSE` nanoseconds of the newest of them; 0: none yet.
    pub last_reverse_ns: u64,
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of [`ReverseCounters::last_reverse_ns`].
pub fn coarse_clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC_COARSE always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A flow-table entry.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct FlowReport {
    pub client: IpAddr,
    pub client_port: u16,
    /// The anycast address and port the client sends to.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// The installed service the flow belongs to, if any.
    pub service: Option<String>,
    /// The server slot the flow is pinned to.
    pub server_slot: u32,
    /// The server's real address, if the slot still holds the server the flow was pinned
    /// to (else the flow is re-chosen at its next packet).
    pub server: Option<IpAddr>,
    /// When the flow last sent a packet, in ticks of [`flow_clock_now`].
    pub last_seen: u32,
    /// Seconds since the flow's last packet.
    pub age: u32,
    /// The client sent a FIN or RST.
    pub closing: bool,
    /// Past its timeout: the next packet re-chooses, the next sweep deletes it.
    pub expired: bool,
    /// Installed from a peer agent's pin (the flow was pinned there; see `pins.rs`).
    #[serde(default)]
    pub learned: bool,
}

/// The digest of a live table (see [`ServiceReport::table_digest`]).
fn table_digest(live: &[u32], servers: &[super::plan::InstalledServer]) -> String {
    use sha2::{Digest as _, Sha256};
    if live.is_empty() {
        return String::new();
    }
    let by_slot: BTreeMap<u32, IpAddr> = servers.iter().map(|s| (s.slot, s.address)).collect();
    let mut h = Sha256::new();
    for e in live {
        let octets = by_slot
            .get(e)
            .map_or([0u8; 16], |a| anycast_common::wire::to_mapped(*a).octets());
        h.update(octets);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
