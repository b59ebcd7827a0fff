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

use anycast_common::{
    address_filter_bit, maps, programs, table, verdict, AddressKey, AgentInfo, FlowConfig, FlowKey,
    FlowValue, PreferenceKey, PreferenceTable, ReverseStats, ServerInfo, ServerTraffic,
    ServiceInfo, ServiceKey, Traffic, ADDRESS_FILTER_WORDS, AGENT_HAS_V4, AGENT_HAS_V6,
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_PREFERENCE_TABLES, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE,
    DEFAULT_TCP_CLOSING, DEFAULT_TCP_IDLE, DEFAULT_UDP_IDLE, FAMILY_V4, FLOW_CLOSING,
    MAX_PREFERENCE_PREFIXES, MAX_SERVERS, NO_SERVER, SERVER_UP, SERVICE_HAS_PREFERENCES,
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

use crate::config::XdpModeName;

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/anycast"));

/// Map sizes chosen at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub ring_size: u32,
    pub max_services: u32,
    pub max_flows: u32,
    /// Consistent-hash tables for topology preferences (one per preference that has servers
    /// able to take new flows), over all services. Each costs two tables of `ring_size`
    /// entries in `RINGS`, like a service.
    pub max_preference_tables: u32,
}

impl Sizes {
    /// Sizes with the default number of preference tables.
    pub const fn new(ring_size: u32, max_services: u32, max_flows: u32) -> Self {
        Sizes {
            ring_size,
            max_services,
            max_flows,
            max_preference_tables: DEFAULT_MAX_PREFERENCE_TABLES,
        }
    }

    /// Entries of `RINGS`: two tables per service and per preference table.
    pub fn ring_entries(&self) -> Option<u32> {
        self.max_services
            .checked_add(self.max_preference_tables)?
            .checked_mul(2)?
            .checked_mul(self.ring_size)
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes::new(DEFAULT_RING_SIZE, DEFAULT_MAX_SERVICES, DEFAULT_MAX_FLOWS)
    }
}

/// Loads the eBPF object with the agent's maps sized as asked.
pub fn load_object(sizes: Sizes) -> Result<Ebpf> {
    let ring_entries = sizes.ring_entries().ok_or_else(|| {
        anyhow!(
            "the consistent-hash tables do not fit one map: 2 x (max_services {} + \
             max_preference_tables {}) x ring_size {} entries",
            sizes.max_services,
            sizes.max_preference_tables,
            sizes.ring_size
        )
    })?;
    EbpfLoader::new()
        .map_max_entries(maps::RINGS, ring_entries)
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

/// Loads (once) a TC program of the object and attaches it to an interface's egress through
/// the clsact qdisc (which the caller adds), as a netlink `cls_bpf` filter in direct-action
/// mode, so `tc filter show dev IF egress` lists it. Filters of the same program name left
/// by an earlier run that was killed are removed first. Dropping the object detaches it.
pub fn attach_tc_egress(ebpf: &mut Ebpf, program: &str, iface: &str) -> Result<()> {
    use aya::programs::{
        tc::{qdisc_detach_program, NlOptions, TcAttachOptions, TcError},
        SchedClassifier, TcAttachType,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel refused to load {program}"))?;
    }
    match qdisc_detach_program(iface, TcAttachType::Egress, program) {
        Ok(()) => tracing::info!("removed a stale {program} filter from {iface}"),
        Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("looking for stale {program} filters on {iface}"))
        }
    }
    prog.attach_with_options(
        iface,
        TcAttachType::Egress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
    .with_context(|| format!("attaching {program} to {iface} egress"))?;
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

/// Flow-table idle timeouts, in seconds. An entry idle for longer than its timeout is
/// re-chosen at its next packet (counted as `flow_expired`) and deleted by
/// [`Dataplane::sweep_flows`]. The clock ticks every 2^30 ns and timeouts are rounded up to
/// whole ticks: an entry lives at least its timeout after its last packet, and at most
/// about 1.07 s more (plus the rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FlowTimeouts {
    /// TCP flows.
    pub tcp_idle: u32,
    /// UDP flows.
    pub udp_idle: u32,
    /// TCP flows after the client's FIN or RST.
    pub tcp_closing: u32,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_idle: DEFAULT_TCP_IDLE,
            udp_idle: DEFAULT_UDP_IDLE,
            tcp_closing: DEFAULT_TCP_CLOSING,
        }
    }
}

impl FlowTimeouts {
    fn config(&self) -> FlowConfig {
        FlowConfig::new(self.tcp_idle, self.udp_idle, self.tcp_closing)
    }
}

/// The flow clock, as the data path reads it (`bpf_ktime_get_coarse_ns() >> 30`): ticks of
/// about 1.07 s of `CLOCK_MONOTONIC_COARSE`. Pass it to [`Dataplane::sweep_flows`].
pub fn flow_clock_now() -> u32 {
    anycast_common::flow_tick(coarse_clock_ns())
}

/// What a consistent-hash table is a function of: the ring size and, in order, each
/// server's address (its member key), its weight as a member (0 when it is down or not a
/// member of this table) and its slot (what the entries hold).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableInputs {
    ring: u32,
    members: Vec<(IpAddr, u32, u32)>,
}

impl TableInputs {
    /// The inputs of the table over the `servers` that `member` admits.
    fn new(
        servers: &[InstalledServer],
        member: impl Fn(&InstalledServer) -> bool,
        ring: u32,
    ) -> Self {
        TableInputs {
            ring,
            members: servers
                .iter()
                .map(|s| {
                    let weight = if s.up && member(s) { s.weight } else { 0 };
                    (s.address, weight, s.slot)
                })
                .collect(),
        }
    }

    /// The consistent-hash table, as server slots.
    fn build(&self) -> Vec<u32> {
        let members: Vec<table::Member> = self
            .members
            .iter()
            .map(|&(address, weight, _)| table::Member {
                key: table::member_key(&address.to_string()),
                weight,
            })
            .collect();
        table::build(&members, self.ring)
            .into_iter()
            .map(|i| {
                if i == NO_SERVER {
                    NO_SERVER
                } else {
                    self.members[i as usize].2
                }
            })
            .collect()
    }
}

/// A consistent-hash table's two areas in `RINGS`: the data path reads one (live), the
/// controller writes the other, then switches.
#[derive(Default)]
struct TableArea {
    /// Which half the data path reads.
    live_half: u32,
    /// What each half holds, if known (a half never written is unknown and written whole).
    halves: [Option<Vec<u32>>; 2],
    /// What the live half was built from, if known.
    live_inputs: Option<TableInputs>,
}

impl TableArea {
    /// A fresh area whose first table goes into half 0.
    fn new() -> Self {
        TableArea {
            live_half: 1,
            halves: [None, None],
            live_inputs: None,
        }
    }

    fn live(&self) -> Option<&[u32]> {
        self.halves[self.live_half as usize].as_deref()
    }

    /// Makes the live half hold the table of `inputs`. When the live half was built from the
    /// same inputs, or holds the same entries, nothing is built, written or switched.
    /// Otherwise the table is written into the half the data path is not reading (only the
    /// entries that differ from what it holds), which becomes the live half; the caller then
    /// points the data path at `base(live_half)`. Returns whether the live half changed.
    fn publish(
        &mut self,
        rings: &mut Rings,
        base: impl Fn(u32) -> u32,
        inputs: TableInputs,
    ) -> Result<bool> {
        if self.live().is_some() && self.live_inputs.as_ref() == Some(&inputs) {
            return Ok(false);
        }
        let entries = inputs.build();
        if self.live() == Some(&entries[..]) {
            self.live_inputs = Some(inputs);
            return Ok(false);
        }
        let half = 1 - self.live_half;
        let start = base(half);
        let known = self.halves[half as usize].take();
        let mut indices = Vec::new();
        let mut values = Vec::new();
        for (i, &e) in entries.iter().enumerate() {
            if known.as_ref().is_some_and(|k| k[i] == e) {
                continue;
            }
            indices.push(start + i as u32);
            values.push(e);
        }
        rings
            .write(&indices, &values)
            .context("writing a consistent-hash table")?;
        self.halves[half as usize] = Some(entries);
        self.live_half = half;
        self.live_inputs = Some(inputs);
        Ok(true)
    }
}

/// `bpf(cmd, attr, sizeof attr)`; returns the raw result (negative on error, see errno).
///
/// # Safety
///
/// `attr` must be the `union bpf_attr` member that `cmd` takes, and every pointer in it
/// valid for what the kernel reads or writes through it for the duration of the call.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> libc::c_long {
    // SAFETY: upheld by the caller.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            std::mem::size_of::<A>() as libc::c_uint,
        )
    }
}

/// `bpf(2)` command `BPF_MAP_UPDATE_BATCH` (Linux 5.6).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `bpf(2)` command `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// Map update flag: only create, never replace.
const BPF_NOEXIST: u64 = 1;

/// The element-command member of `union bpf_attr` (lookup, update, delete).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `ENOTSUPP`, the kernel-internal "operation not supported" `bpf(2)` may return.
const ENOTSUPP: i32 = 524;
/// Entries per `BPF_MAP_UPDATE_BATCH` call.
const BATCH_CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `RINGS`, written through a shared memory mapping of the map (plain stores: a whole
/// 65537-entry table in tens of microseconds, where map updates take milliseconds), else
/// with `BPF_MAP_UPDATE_BATCH` where the kernel takes it, else one update per entry.
struct Rings {
    map: Array<MapData, u32>,
    /// The map's values, mapped into our memory (an array map's values are 8 bytes apart).
    mapped: Option<MappedArray>,
    /// False once the kernel refused a batch update.
    batch: bool,
}

/// A shared mapping of a `BPF_F_MMAPABLE` array map's values.
struct MappedArray {
    base: *mut u8,
    len: usize,
    entries: u32,
}

/// An array map's value stride: value sizes are rounded up to 8 bytes.
const ARRAY_STRIDE: usize = 8;

impl MappedArray {
    fn new(map: &Array<MapData, u32>) -> std::io::Result<Self> {
        let entries = map.len();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * ARRAY_STRIDE).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks size and flags.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedArray {
            base: base as *mut u8,
            len,
            entries,
        })
    }

    fn write(&self, indices: &[u32], values: &[u32]) -> Result<(), MapError> {
        for (&i, &v) in indices.iter().zip(values) {
            if i >= self.entries {
                return Err(MapError::OutOfBounds {
                    index: i,
                    max_entries: self.entries,
                });
            }
            // SAFETY: in bounds of the mapping, 4-aligned; the data path reads each entry
            // as one 32-bit load, so a 32-bit store is never seen half-written.
            unsafe {
                (self.base.add(i as usize * ARRAY_STRIDE) as *const std::sync::atomic::AtomicU32)
                    .as_ref()
                    .expect("mapped")
                    .store(v, std::sync::atomic::Ordering::Relaxed)
            };
        }
        // Every entry is stored before the caller switches the service to the table.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

impl Rings {
    fn new(map: Array<MapData, u32>) -> Self {
        let mapped = match MappedArray::new(&map) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::debug!("RINGS cannot be memory-mapped ({e}); writing it by map updates");
                None
            }
        };
        Rings {
            map,
            mapped,
            batch: true,
        }
    }

    /// Sets `map[indices[i]] = values[i]` for every i.
    fn write(&mut self, indices: &[u32], values: &[u32]) -> Result<(), MapError> {
        debug_assert_eq!(indices.len(), values.len());
        if let Some(m) = &self.mapped {
            return m.write(indices, values);
        }
        for (keys, vals) in indices.chunks(BATCH_CHUNK).zip(values.chunks(BATCH_CHUNK)) {
            if self.batch {
                match self.update_batch(keys, vals) {
                    Ok(()) => continue,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
                        ) =>
                    {
                        tracing::debug!(
                            "BPF_MAP_UPDATE_BATCH refused ({e}); writing tables entry by entry"
                        );
                        self.batch = false;
                    }
                    Err(io_error) => {
                        return Err(MapError::SyscallError(aya::sys::SyscallError {
                            call: "BPF_MAP_UPDATE_BATCH",
                            io_error,
                        }))
                    }
                }
            }
            // Entry by entry (the whole chunk again, if a batch stopped part-way: the writes
            // are idempotent).
            for (&k, &v) in keys.iter().zip(vals) {
                self.map.set(k, v, 0)?;
            }
        }
        Ok(())
    }

    fn update_batch(&self, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
        let fd = self.map.map().fd().as_fd().as_raw_fd();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of its own size; `keys` and `values`
        // hold `count` u32 keys and values (the map's key and value size) and outlive the
        // call; the kernel only reads them and writes `attr.count`.
        let rc = unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The flow sweeper's thread (see [`Dataplane::spawn_sweeper`]); stops and joins on drop.
pub struct FlowSweeper {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FlowSweeper {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Deletes the flow-table entries past their timeout at `now`; see
/// [`Dataplane::sweep_flows`].
/// Returns how many entries it saw and how many it deleted.
fn sweep(
    flows: &mut BpfHashMap<MapData, FlowKey, FlowValue>,
    config: &FlowConfig,
    now: u32,
) -> Result<(usize, usize)> {
    let mut candidates: Vec<FlowKey> = Vec::new();
    let mut seen = 0;
    for_each_flow(flows, |key, value| {
        seen += 1;
        if config.expired(key.proto, value, now) {
            candidates.push(*key);
        }
    })?;
    let mut removed = 0;
    for key in candidates {
        // The data path may have reused the entry since it was read (a new connection on
        // the same 5-tuple): take it out atomically and put a live one back, so a flow is
        // never dropped from under its connection.
        let value = match take_flow(flows, &key) {
            Ok(Some(value)) => value,
            Ok(None) => continue,
            Err(e) => return Err(e).context("deleting a flow-table entry"),
        };
        if config.expired(key.proto, &value, now) {
            removed += 1;
            continue;
        }
        match flows.insert(key, value, BPF_NOEXIST) {
            // EEXIST: the data path has written a newer entry meanwhile; it wins.
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("restoring a live flow-table entry"),
        }
    }
    Ok((seen, removed))
}

/// `bpf(2)` command `BPF_MAP_LOOKUP_BATCH` (Linux 5.6; hash maps, LRU included).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const LOOKUP_CHUNK: usize = 4096;

/// Every entry of the flow table.
fn flow_entries(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
) -> Result<Vec<(FlowKey, FlowValue)>> {
    let mut out = Vec::new();
    for_each_flow(flows, |k, v| out.push((*k, *v)))?;
    Ok(out)
}

/// Calls `f` on every entry of the flow table, read `LOOKUP_CHUNK` entries per `bpf()`
/// call (a million-entry table in a few hundred calls, where key-by-key iteration takes
/// two calls per entry); key by key where the kernel refuses batches.
fn for_each_flow(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    mut f: impl FnMut(&FlowKey, &FlowValue),
) -> Result<()> {
    match lookup_batch(flows, &mut f) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
            ) =>
        {
            for entry in flows.iter() {
                let (k, v) = entry.context("reading the flow table")?;
                f(&k, &v);
            }
            Ok(())
        }
        Err(e) => Err(e).context("reading the flow table (BPF_MAP_LOOKUP_BATCH)"),
    }
}

fn lookup_batch(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    f: &mut impl FnMut(&FlowKey, &FlowValue),
) -> std::io::Result<()> {
    let fd = flows.map().fd().as_fd().as_raw_fd();
    let mut keys = vec![FlowKey::default(); LOOKUP_CHUNK];
    let mut values = vec![FlowValue::default(); LOOKUP_CHUNK];
    // The hash map's batch token: a bucket index.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of its own size; `keys` and `values`
        // hold `count` map keys and values and outlive the call; the tokens are u32.
        let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let got = attr.count as usize;
        match error.as_ref().and_then(|e| e.raw_os_error()) {
            None | Some(libc::ENOENT) => {
                for (k, v) in keys[..got].iter().zip(&values[..got]) {
                    f(k, v);
                }
            }
            _ => return Err(error.expect("an error")),
        }
        if error.is_some() {
            // ENOENT: that was the last batch.
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Removes one flow entry and returns what it held, in one step
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, Linux 5.14 for hash maps).
fn take_flow(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    key: &FlowKey,
) -> std::io::Result<Option<FlowValue>> {
    let fd = flows.map().fd().as_fd().as_raw_fd();
    let mut value = std::mem::MaybeUninit::<FlowValue>::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key as *const FlowKey as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` element command of its own size; `key` and
    // `value` are the map's key and value types and outlive the call; the kernel reads the
    // key and writes the value.
    let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled the value (a plain `repr(C)` struct of integers).
    Ok(Some(unsafe { value.assume_init() }))
}

struct InstalledService {
    name: String,
    id: u32,
    area: TableArea,
    servers: Vec<InstalledServer>,
    /// Per preference (by index in `DesiredService::preferences`): its table, when it has
    /// servers able to take new flows.
    preference_tables: Vec<Option<u32>>,
    /// The service's entries in `PREFERENCES`.
    preference_keys: HashMap<PreferenceKey, PreferenceTable>,
    /// What its `SERVICES` entry holds, if written.
    published: Option<ServiceInfo>,
}

impl InstalledService {
    fn info(&self, ring: u32, flags: u32) -> ServiceInfo {
        ServiceInfo {
            id: self.id,
            ring_base: (self.id * 2 + self.area.live_half) * ring,
            ring_size: ring,
            flags,
        }
    }
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
    address_filter: Array<MapData, u64>,
    /// What `ADDRESS_FILTER` holds, word by word.
    filter_written: Vec<u64>,
    rings: Rings,
    servers_map: Array<MapData, ServerInfo>,
    /// What each `SERVERS` slot holds (all written through [`Dataplane::set_server`]).
    servers_written: Vec<ServerInfo>,
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
    /// The real addresses that have an entry in `REVERSE`.
    reverse_keys: BTreeSet<IpAddr>,
    installed: HashMap<ServiceKey, InstalledService>,
    free_service_ids: Vec<u32>,
    /// Server slots not in use, oldest freed first, so a slot is reused as late as possible.
    free_slots: VecDeque<u32>,
    generations: Vec<u32>,
    timeouts: FlowTimeouts,
    /// Preference table areas, by table index (after the services' areas in `RINGS`). An
    /// area keeps its state across owners, so a new owner writes the half the previous one
    /// was not reading.
    preference_areas: Vec<TableArea>,
    /// Preference tables not in use, oldest freed first.
    free_preference_tables: VecDeque<u32>,
}

impl Dataplane {
    pub fn new(sizes: Sizes) -> Result<Self> {
        let mut ebpf = load_object(sizes)?;
        let mut dp = Dataplane {
            services_map: take(&mut ebpf, maps::SERVICES)?,
            address_filter: take(&mut ebpf, maps::ADDRESS_FILTER)?,
            filter_written: vec![0; ADDRESS_FILTER_WORDS as usize],
            rings: Rings::new(take(&mut ebpf, maps::RINGS)?),
            servers_map: take(&mut ebpf, maps::SERVERS)?,
            servers_written: vec![ServerInfo::default(); MAX_SERVERS as usize],
            agent_map: take(&mut ebpf, maps::AGENT)?,
            agent_info: AgentInfo::default(),
            sweep_report: Default::default(),
            flows_map: take(&mut ebpf, maps::FLOWS)?,
            flow_config: take(&mut ebpf, maps::FLOW_CONFIG)?,
            preferences_map: take(&mut ebpf, maps::PREFERENCES)?,
            tx_ports: take(&mut ebpf, maps::TX_PORTS)?,
            verdicts: take(&mut ebpf, maps::VERDICTS)?,
            service_stats: take(&mut ebpf, maps::SERVICE_STATS)?,
            server_stats: take(&mut ebpf, maps::SERVER_STATS)?,
            reverse_map: take(&mut ebpf, maps::REVERSE)?,
            reverse_keys: BTreeSet::new(),
            ebpf,
            sizes,
            installed: HashMap::new(),
            free_service_ids: (0..sizes.max_services).rev().collect(),
            free_slots: (0..MAX_SERVERS).collect(),
            generations: vec![0; MAX_SERVERS as usize],
            timeouts: FlowTimeouts::default(),
            preference_areas: (0..sizes.max_preference_tables)
                .map(|_| TableArea::new())
                .collect(),
            free_preference_tables: (0..sizes.max_preference_tables).collect(),
        };
        dp.set_flow_timeouts(FlowTimeouts::default())?;
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

    /// Sets the flow table's idle timeouts; they apply at once, to existing entries too.
    pub fn set_flow_timeouts(&mut self, timeouts: FlowTimeouts) -> Result<()> {
        self.flow_config
            .set(0, timeouts.config(), 0)
            .context("writing the flow timeouts")?;
        self.timeouts = timeouts;
        Ok(())
    }

    pub fn flow_timeouts(&self) -> FlowTimeouts {
        self.timeouts
    }

    /// Deletes the flow-table entries that are past their timeout at `now` (ticks of
    /// [`flow_clock_now`]): idle longer than their protocol's timeout, or closing for longer
    /// than the closing timeout. Returns how many it deleted.
    ///
    /// Each entry is read again just before it is deleted, so one the data path refreshed
    /// meanwhile stays; one refreshed in the microseconds between that read and the delete
    /// is re-chosen at its next packet (by the same consistent hash, so normally onto the
    /// same server).
    pub fn sweep_flows(&mut self, now: u32) -> Result<usize> {
        Ok(sweep(&mut self.flows_map, &self.timeouts.config(), now)?.1)
    }

    /// Starts a thread that sweeps the flow table every `every` (less often when a sweep
    /// takes more than a tenth of that), with the timeouts the
    /// data path has (read from `FLOW_CONFIG` at each sweep), on handles of its own: a
    /// sweep of a large table takes long enough that it must not hold up the agent's
    /// event loop (binding updates, health transitions). Stops when dropped.
    pub fn spawn_sweeper(&self, every: std::time::Duration) -> Result<FlowSweeper> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<Map> {
            let owned = fd
                .try_clone_to_owned()
                .context("duplicating a map descriptor")?;
            Ok(Map::from_map_data(MapData::from_fd(owned)?)?)
        };
        let mut flows: BpfHashMap<MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(dup(self.flows_map.map().fd().as_fd())?)?;
        let config: Array<MapData, FlowConfig> =
            Array::try_from(dup(self.flow_config.map().fd().as_fd())?)?;
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let stopped = stop.clone();
        let report = self.sweep_report.clone();
        let thread = std::thread::Builder::new()
            .name("flow-sweeper".into())
            .spawn(move || {
                let (lock, wake) = &*stopped;
                let mut last_error = String::new();
                let mut pause = every;
                loop {
                    let done = wake
                        .wait_timeout_while(
                            lock.lock().unwrap_or_else(|e| e.into_inner()),
                            pause,
                            |s| !*s,
                        )
                        .map(|(s, _)| *s)
                        .unwrap_or(true);
                    if done {
                        return;
                    }
                    let started = std::time::Instant::now();
                    let outcome = config
                        .get(&0, 0)
                        .context("reading the flow timeouts")
                        .and_then(|c| sweep(&mut flows, &c, flow_clock_now()));
                    // At most a tenth of a CPU: a huge table is swept less often (the
                    // data path re-chooses expired entries by itself meanwhile).
                    pause = every.max(started.elapsed() * 9);
                    if let Ok((seen, removed)) = outcome {
                        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                        r.sweeps += 1;
                        r.entries = (seen - removed) as u64;
                        r.swept += removed as u64;
                        r.last_sweep_ms = started.elapsed().as_secs_f64() * 1e3;
                    }
                    match outcome {
                        Ok((_, 0)) => {}
                        Ok((_, n)) => tracing::debug!("swept {n} expired flows"),
                        Err(e) => {
                            // Once per distinct error, not once a second.
                            let e = format!("{e:#}");
                            if e != last_error {
                                tracing::warn!("sweeping the flow table: {e}");
                                last_error = e;
                            }
                        }
                    }
                }
            })
            .context("starting the flow sweeper")?;
        Ok(FlowSweeper {
            stop,
            thread: Some(thread),
        })
    }

    /// The flow table's entries, for `anycast-ctl flows` (unordered).
    pub fn flows(&self) -> Result<Vec<FlowReport>> {
        let now = flow_clock_now();
        let config = self.timeouts.config();
        let mut servers: HashMap<u32, IpAddr> = HashMap::new();
        let mut services: Vec<(&ServiceKey, &str)> = Vec::new();
        for (key, svc) in &self.installed {
            services.push((key, &svc.name));
            for s in &svc.servers {
                servers.insert(s.slot, s.address);
            }
        }
        let mut out = Vec::new();
        for (key, value) in flow_entries(&self.flows_map)? {
            let service_of = |port: u16| {
                services.iter().find(|(k, _)| {
                    k.addr == key.dst
                        && k.family == key.family
                        && k.proto == key.proto
                        && k.port == port
                })
            };
            let service = service_of(key.dport)
                .or_else(|| service_of(anycast_common::ANY_PORT))
                .map(|(_, name)| name.to_string());
            let server = servers
                .get(&value.server)
                .copied()
                .filter(|_| self.generations.get(value.server as usize) == Some(&value.generation));
            out.push(FlowReport {
                client: anycast_common::words_addr(key.src, key.family),
                client_port: key.sport,
                address: anycast_common::words_addr(key.dst, key.family),
                port: key.dport,
                protocol: protocol_name(key.proto),
                service,
                server_slot: value.server,
                server,
                last_seen: value.last_seen,
                age: anycast_common::flow_ticks_as_secs(now.saturating_sub(value.last_seen)),
                closing: value.flags & FLOW_CLOSING != 0,
                expired: config.expired(key.proto, &value, now),
            });
        }
        Ok(out)
    }

    pub fn set_agent_addresses(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>) -> Result<()> {
        let mut info = AgentInfo {
            fib_generation: self.agent_info.fib_generation,
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

    /// Makes the maps say what `desired` says. Order matters for packets in flight: new
    /// servers first, then tables, then the switch to the new tables, then the removals.
    ///
    /// Topology preferences: for each preference, a table over the service's servers that
    /// are listed in it and can take new flows (up, weight > 0), and one `PREFERENCES` entry
    /// per client prefix pointing to it. A preference without such servers gets no entries,
    /// so its clients use the service's table. A client prefix listed by two preferences of
    /// a service belongs to the first. Invalid preferences (a client prefix of the other
    /// family than the service, or longer than its address) are refused before anything
    /// changes, as is a set that needs more preference tables or prefixes than the maps
    /// hold.
    ///
    /// Servers that stay but go up or down get their `SERVERS` slot written first, for every
    /// service, before any table is built: flows pinned to a server that went down are
    /// re-chosen at once. A table whose inputs (servers, weights, states, slots) did not
    /// change since it was published is neither rebuilt nor rewritten nor switched.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<()> {
        let ring = self.sizes.ring_size;
        self.check_preferences(desired)?;
        // Servers that stay and change state, first.
        let mut changed = Vec::new();
        for want in desired {
            let Some(svc) = self.installed.get(&want.key) else {
                continue;
            };
            for w in &want.servers {
                if let Some(s) = svc.servers.iter().find(|s| s.address == w.address) {
                    if s.up != w.up {
                        changed.push((s.slot, svc.id, w.address, w.up));
                    }
                }
            }
        }
        for (slot, service, address, up) in changed {
            self.write_server(slot, service, address, up)?;
        }
        // Services no longer wanted give up their preference tables first (their clients use
        // the service's table until the service goes), so others can take them.
        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !desired.iter().any(|d| d.key == **k))
            .copied()
            .collect();
        for key in &gone {
            let svc = self.installed.get_mut(key).expect("listed above");
            if svc.preference_keys.is_empty() && svc.preference_tables.iter().all(Option::is_none) {
                continue;
            }
            let info = svc.info(ring, 0);
            let keys = std::mem::take(&mut svc.preference_keys);
            let tables: Vec<u32> = std::mem::take(&mut svc.preference_tables)
                .into_iter()
                .flatten()
                .collect();
            if svc.published != Some(info) {
                self.services_map
                    .insert(key, info, 0)
                    .context("publishing a service")?;
                svc.published = Some(info);
            }
            for k in keys.keys() {
                self.remove_preference_key(k)?;
            }
            self.free_preference_tables.extend(tables);
        }
        // Services that give back preference tables before those that take more.
        let mut order: Vec<&DesiredService> = desired.iter().collect();
        order.sort_by_key(|want| {
            let held = self
                .installed
                .get(&want.key)
                .map_or(0, |s| s.preference_tables.iter().flatten().count() as i64);
            preference_tables_needed(want) as i64 - held
        });
        // Every address about to be published passes the filter before its service exists;
        // addresses that go keep their bits until their services are gone.
        self.write_address_filter(
            self.installed
                .keys()
                .chain(desired.iter().map(|d| &d.key))
                .copied()
                .collect(),
        )?;
        for want in order {
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
                        area: TableArea::new(),
                        servers: Vec::new(),
                        preference_tables: Vec::new(),
                        preference_keys: HashMap::new(),
                        published: None,
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
                self.write_server(slot, svc.id, w.address, w.up)?;
                servers.push(InstalledServer {
                    name: w.name.clone(),
                    address: w.address,
                    weight: w.weight,
                    up: w.up,
                    slot,
                });
            }
            let leaving = std::mem::replace(&mut svc.servers, servers);
            // The table, into the half the data path is not reading (unless unchanged).
            let inputs = TableInputs::new(&svc.servers, |_| true, ring);
            let id = svc.id;
            svc.area
                .publish(&mut self.rings, |half| (id * 2 + half) * ring, inputs)?;
            // Preference tables and their prefixes, before the switch that may start using
            // them.
            let (tables, keys, spare) = self.write_preferences(&svc, want)?;
            let old_keys = std::mem::replace(&mut svc.preference_keys, keys);
            svc.preference_tables = tables;
            let flags = if svc.preference_keys.is_empty() {
                0
            } else {
                SERVICE_HAS_PREFERENCES
            };
            let info = svc.info(ring, flags);
            if svc.published != Some(info) {
                self.services_map
                    .insert(want.key, info, 0)
                    .context("publishing a service")?;
                svc.published = Some(info);
            }
            for k in old_keys.keys() {
                if !svc.preference_keys.contains_key(k) {
                    self.remove_preference_key(k)?;
                }
            }
            self.free_preference_tables.extend(spare);
            for s in leaving {
                self.release_slot(s.slot)?;
            }
            self.installed.insert(want.key, svc);
        }
        // Services no longer wanted.
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
        self.write_address_filter(self.installed.keys().copied().collect())?;
        self.sync_reverse_keys()
    }

    /// Sets `ADDRESS_FILTER` to the bits of exactly these services' addresses, writing only
    /// the words that change.
    fn write_address_filter(&mut self, services: Vec<ServiceKey>) -> Result<()> {
        let mut words = vec![0u64; ADDRESS_FILTER_WORDS as usize];
        for key in services {
            let (word, bit) = address_filter_bit(key.family, &key.addr);
            words[word as usize] |= bit;
        }
        for (i, (&want, have)) in words.iter().zip(self.filter_written.iter_mut()).enumerate() {
            if want != *have {
                self.address_filter
                    .set(i as u32, want, 0)
                    .context("writing the address filter")?;
                *have = want;
            }
        }
        Ok(())
    }

    /// One `REVERSE` entry per installed server address: new addresses get a zeroed entry
    /// (counting starts), addresses no longer installed lose theirs.
    fn sync_reverse_keys(&mut self) -> Result<()> {
        let want: BTreeSet<IpAddr> = self
            .installed
            .values()
            .flat_map(|s| s.servers.iter().map(|x| x.address))
            .collect();
        for &a in want.difference(&self.reverse_keys) {
            let zero = PerCpuValues::try_from(vec![ReverseStats::default(); nr_cpus()?])?;
            self.reverse_map
                .insert(AddressKey::new(a), zero, 0)
                .context("adding a server to the reverse-tunnel map")?;
        }
        for a in self.reverse_keys.difference(&want) {
            match self.reverse_map.remove(&AddressKey::new(*a)) {
                Err(e) if !is_enoent(&e) => {
                    return Err(e).context("removing a server from the reverse-tunnel map")
                }
                _ => {}
            }
        }
        self.reverse_keys = want;
        Ok(())
    }

    /// Per installed server real address: the TCP SYNs forwarded to it (over all its
    /// services) and the packets it reverse-tunnelled through us.
    pub fn reverse_counters(&self) -> Result<BTreeMap<IpAddr, ReverseCounters>> {
        let mut out: BTreeMap<IpAddr, ReverseCounters> = BTreeMap::new();
        for svc in self.installed.values() {
            for s in &svc.servers {
                let t = sum_server(&self.server_stats.get(&s.slot, 0)?);
                out.entry(s.address).or_default().syns += t.syns;
            }
        }
        for a in &self.reverse_keys {
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

    /// Refuses preference sets the maps cannot hold, before anything changes.
    fn check_preferences(&self, desired: &[DesiredService]) -> Result<()> {
        let mut tables = 0;
        let mut prefixes = 0;
        for want in desired {
            for (i, pref) in want.preferences.iter().enumerate() {
                for (addr, len) in &pref.clients {
                    let (_, family) = anycast_common::addr_words(*addr);
                    let max = if family == FAMILY_V4 { 32 } else { 128 };
                    if family != want.key.family {
                        bail!(
                            "service {}: preferences[{i}]: client prefix {addr}/{len} is not of \
                             the service address's family",
                            want.name
                        );
                    }
                    if *len > max {
                        bail!(
                            "service {}: preferences[{i}]: client prefix {addr}/{len} is longer \
                             than the address ({max} bits)",
                            want.name
                        );
                    }
                }
            }
            if preference_tables_needed(want) > 0 {
                prefixes += want
                    .preferences
                    .iter()
                    .flat_map(|p| &p.clients)
                    .map(|(a, l)| PreferenceKey::new(0, *a, *l))
                    .collect::<HashSet<_>>()
                    .len();
            }
            tables += preference_tables_needed(want);
        }
        if tables > self.sizes.max_preference_tables as usize {
            bail!(
                "the services' topology preferences need {tables} tables, but \
                 max_preference_tables is {}",
                self.sizes.max_preference_tables
            );
        }
        if prefixes > MAX_PREFERENCE_PREFIXES as usize {
            bail!(
                "the services' topology preferences have {prefixes} client prefixes, more than \
                 the {MAX_PREFERENCE_PREFIXES} the map holds"
            );
        }
        Ok(())
    }

    /// Writes the tables of `want`'s preferences (into halves the data path is not reading)
    /// and the `PREFERENCES` entries that change, for a service whose servers are already
    /// `svc.servers`. Returns the table of each preference, the service's entries, and the
    /// tables it no longer uses (to be freed once nothing points to them).
    #[allow(clippy::type_complexity)]
    fn write_preferences(
        &mut self,
        svc: &InstalledService,
        want: &DesiredService,
    ) -> Result<(
        Vec<Option<u32>>,
        HashMap<PreferenceKey, PreferenceTable>,
        Vec<u32>,
    )> {
        let ring = self.sizes.ring_size;
        let able = |s: &InstalledServer, pref: &Preference| {
            s.up && s.weight > 0 && pref.servers.contains(&s.address)
        };
        let wanted: Vec<bool> = want
            .preferences
            .iter()
            .map(|p| svc.servers.iter().any(|s| able(s, p)))
            .collect();
        // A preference keeps its table; the service's other tables are reused before free ones.
        let mut tables: Vec<Option<u32>> = wanted
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                svc.preference_tables
                    .get(i)
                    .copied()
                    .flatten()
                    .filter(|_| w)
            })
            .collect();
        let mut spare: Vec<u32> = svc
            .preference_tables
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.filter(|_| !wanted.get(i).copied().unwrap_or(false)))
            .collect();
        let mut keys = HashMap::new();
        for (i, pref) in want.preferences.iter().enumerate() {
            if !wanted[i] {
                continue;
            }
            let t = match tables[i] {
                Some(t) => t,
                None => {
                    let t = match spare.pop() {
                        Some(t) => t,
                        None => self.free_preference_tables.pop_front().ok_or_else(|| {
                            anyhow!(
                                "service {}: no room for a preference table: \
                                 max_preference_tables is {}",
                                want.name,
                                self.sizes.max_preference_tables
                            )
                        })?,
                    };
                    tables[i] = Some(t);
                    t
                }
            };
            let inputs = TableInputs::new(&svc.servers, |s| able(s, pref), ring);
            let area_index = self.sizes.max_services + t;
            let area = &mut self.preference_areas[t as usize];
            area.publish(
                &mut self.rings,
                |half| (area_index * 2 + half) * ring,
                inputs,
            )?;
            let value = PreferenceTable {
                ring_base: (area_index * 2 + area.live_half) * ring,
                ring_size: ring,
            };
            for (addr, len) in &pref.clients {
                keys.entry(PreferenceKey::new(svc.id, *addr, *len))
                    .or_insert(value);
            }
        }
        for (k, v) in &keys {
            if svc.preference_keys.get(k) != Some(v) {
                self.preferences_map
                    .insert(&LpmKey::new(k.prefixlen, k.data()), v, 0)
                    .context("writing a topology preference")?;
            }
        }
        Ok((tables, keys, spare))
    }

    /// What `PREFERENCES` holds: each client prefix (with its service id) and the table it
    /// points to (unordered).
    pub fn preference_entries(&self) -> Result<Vec<(PreferenceKey, PreferenceTable)>> {
        let mut out = Vec::new();
        for entry in self.preferences_map.iter() {
            let (k, v) = entry.context("reading the topology preferences")?;
            let d = k.data();
            out.push((
                PreferenceKey {
                    prefixlen: k.prefix_len(),
                    service: d[0],
                    addr: [d[1], d[2], d[3], d[4]],
                },
                v,
            ));
        }
        Ok(out)
    }

    fn remove_preference_key(&mut self, k: &PreferenceKey) -> Result<()> {
        match self
            .preferences_map
            .remove(&LpmKey::new(k.prefixlen, k.data()))
        {
            Err(e) if !is_enoent(&e) => Err(e).context("removing a topology preference"),
            _ => Ok(()),
        }
    }

    fn take_slot(&mut self) -> Result<u32> {
        let slot = self
            .free_slots
            .pop_front()
            .ok_or_else(|| anyhow!("all {MAX_SERVERS} server slots are in use"))?;
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.server_stats.set(
            slot,
            PerCpuValues::try_from(vec![ServerTraffic::default(); nr_cpus()?])?,
            0,
        )?;
        Ok(slot)
    }

    fn write_server(&mut self, slot: u32, service: u32, address: IpAddr, up: bool) -> Result<()> {
        let (addr, family) = anycast_common::addr_words(address);
        let info = ServerInfo {
            addr,
            family,
            flags: if up { SERVER_UP } else { 0 },
            service: u16::try_from(service).context("service id beyond 65535")?,
            generation: self.generations[slot as usize],
        };
        self.set_server(slot, info).context("writing a server")
    }

    /// Writes a `SERVERS` slot, unless it already holds `info`.
    fn set_server(&mut self, slot: u32, info: ServerInfo) -> Result<(), MapError> {
        if self.servers_written[slot as usize] != info {
            self.servers_map.set(slot, info, 0)?;
            self.servers_written[slot as usize] = info;
        }
        Ok(())
    }

    /// Marks the slot down, so flows pinned to it are re-chosen, and queues it for reuse.
    fn release_slot(&mut self, slot: u32) -> Result<()> {
        self.set_server(slot, ServerInfo::default())
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
                });
            }
            servers.sort_by(|a, b| a.name.cmp(&b.name));
            let t = sum(&self.service_stats.get(&svc.id, 0)?);
            services.push(ServiceReport {
                name: svc.name.clone(),
                address: key.ip(),
                protocol: protocol_name(key.proto),
                port: key.port,
                id: svc.id,
                ring_size: self.sizes.ring_size,
                packets: t.packets,
                bytes: t.bytes,
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

/// Preferences of `want` that get a table: those with a server able to take new flows.
fn preference_tables_needed(want: &DesiredService) -> usize {
    want.preferences
        .iter()
        .filter(|p| {
            want.servers
                .iter()
                .any(|s| s.up && s.weight > 0 && p.servers.contains(&s.address))
        })
        .count()
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
        })
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
    /// TCP SYNs (without ACK) among `packets`.
    #[serde(default)]
    pub syns: u64,
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
}
