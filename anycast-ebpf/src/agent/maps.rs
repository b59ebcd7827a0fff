//! The agent's maps (names, keys and values from `anycast_common::maps`), and the counters
//! it writes into them.
use anycast_common::{
    maps as names, verdict, AddressKey, AgentInfo, EmbryoSlot, FlowConfig, FlowKey, FlowValue,
    NextHop, PreferenceTable, ReverseStats, ServerInfo, ServerTraffic, ServiceInfo, ServiceKey,
    TokenBucket, Traffic, ADDRESS_FILTER_WORDS, BUCKET_BURST_NS, DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_PREFERENCE_TABLES, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, EMBRYO_SLOTS,
    MAX_PREFERENCE_PREFIXES, MAX_SERVERS, MAX_TX_PORTS, RATE_BUCKET_COUNT,
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};

#[map]
pub(super) static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
map_name!(SERVICES, names::SERVICES);
/// All consistent-hash tables, two areas (live and next) per service, then two per
/// preference table. Memory-mappable: the controller writes a table with plain stores.
#[map]
pub(super) static RINGS: Array<u32> = Array::with_max_entries(
    (DEFAULT_MAX_SERVICES + DEFAULT_MAX_PREFERENCE_TABLES) * 2 * DEFAULT_RING_SIZE,
    BPF_F_MMAPABLE,
);
map_name!(RINGS, names::RINGS);
/// Topology preferences: (service id, client prefix) -> the preferred table. Only looked up
/// for services with `SERVICE_HAS_PREFERENCES`.
#[map]
pub(super) static PREFERENCES: LpmTrie<[u32; 5], PreferenceTable> =
    LpmTrie::with_max_entries(MAX_PREFERENCE_PREFIXES, 0);
map_name!(PREFERENCES, names::PREFERENCES);
#[map]
pub(super) static SERVERS: Array<ServerInfo> = Array::with_max_entries(MAX_SERVERS, 0);
map_name!(SERVERS, names::SERVERS);
/// Set bits: addresses that may be services (written by the controller before their
/// `SERVICES` entries, cleared after). Other traffic passes without a hash lookup.
#[map]
pub(super) static ADDRESS_FILTER: Array<u64> = Array::with_max_entries(ADDRESS_FILTER_WORDS, 0);
map_name!(ADDRESS_FILTER, names::ADDRESS_FILTER);
/// Per CPU and server slot, the FIB's last answer, reused within its tick of the flow clock
/// (about a second) unless a routing change was reported: a FIB lookup costs more than all
/// the rest of a flow-table hit.
#[map]
pub(super) static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_SERVERS, 0);
map_name!(NEXT_HOPS, names::NEXT_HOPS);
#[map]
pub(super) static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);
map_name!(FLOWS, names::FLOWS);
/// TCP handshakes in progress: a SYN writes its flow and server into the slot its flow
/// hash names, without touching `FLOWS`; the first packet after it is pinned to that server
/// (`select.rs`). A flood of SYNs only overwrites slots here. Not pinned in bpffs: a restart
/// forgets handshakes in progress, whose ACKs then take the table's choice.
#[map]
pub(super) static EMBRYOS: Array<EmbryoSlot> = Array::with_max_entries(EMBRYO_SLOTS, 0);
map_name!(EMBRYOS, names::EMBRYOS);
#[map]
pub(super) static AGENT: Array<AgentInfo> = Array::with_max_entries(1, 0);
map_name!(AGENT, names::AGENT);
/// Flow idle timeouts; the controller writes them before attaching.
#[map]
pub(super) static FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, 0);
map_name!(FLOW_CONFIG, names::FLOW_CONFIG);
#[map]
pub(super) static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
map_name!(TX_PORTS, names::TX_PORTS);
#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(verdict::COUNT, 0);
map_name!(VERDICTS, names::VERDICTS);
#[map]
static SERVICE_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);
map_name!(SERVICE_STATS, names::SERVICE_STATS);
#[map]
static SERVER_STATS: PerCpuArray<ServerTraffic> = PerCpuArray::with_max_entries(MAX_SERVERS, 0);
map_name!(SERVER_STATS, names::SERVER_STATS);
/// The installed servers' real addresses (keys written by the controller) and the SYN-ACKs
/// relayed for each. A packet from any other outer source is not decapsulated: the agent
/// does not relay anycast-sourced packets for strangers.
#[map]
pub(super) static REVERSE: PerCpuHashMap<AddressKey, ReverseStats> =
    PerCpuHashMap::with_max_entries(MAX_SERVERS, 0);
map_name!(REVERSE, names::REVERSE);
/// Per CPU, the token buckets of the rate limits: answers to packets too big for the tunnel
/// (`too_big.rs`), pins of flows not seen opening (`select.rs`).
#[map]
static RATE_BUCKETS: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(RATE_BUCKET_COUNT, 0);
map_name!(RATE_BUCKETS, names::RATE_BUCKETS);

/// Every anycast address of a service: the addresses whose echo requests are answered.
#[map]
pub(super) static SERVICE_ADDRS: HashMap<AddressKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
map_name!(SERVICE_ADDRS, names::SERVICE_ADDRS);

/// Counts a verdict (or a flow-table event) in `VERDICTS`.
#[inline(always)]
pub(super) fn count(reason: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

/// Counts a forwarded packet of `bytes` for its service.
#[inline(always)]
pub(super) fn add_service_traffic(index: u32, bytes: u64) {
    if let Some(t) = SERVICE_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
}

/// Counts a forwarded packet of `bytes` for its server slot (and whether it opened a
/// connection: a SYN without ACK; and whether it was a flow-table miss: a new flow).
#[inline(always)]
pub(super) fn add_server_traffic(index: u32, bytes: u64, syn: bool, new_flow: bool) {
    if let Some(t) = SERVER_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            (*t).syns += syn as u64;
            (*t).flows += new_flow as u64;
        }
    }
}

/// Takes one token from this CPU's bucket `bucket` of `RATE_BUCKETS`: credit in
/// nanoseconds, refilled by the time elapsed (up to one second's worth, the burst), `cost_ns`
/// a token (0: no limit).
#[inline(always)]
pub(super) fn take_token(bucket: u32, cost_ns: u32) -> bool {
    let Some(bucket) = RATE_BUCKETS.get_ptr_mut(bucket) else {
        return false;
    };
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot; no concurrent writer.
    let b = unsafe { &mut *bucket };
    let elapsed = now.wrapping_sub(b.last_ns).min(BUCKET_BURST_NS);
    let credit = (b.credit_ns + elapsed).min(BUCKET_BURST_NS);
    b.last_ns = now;
    let cost = cost_ns as u64;
    if credit < cost {
        b.credit_ns = credit;
        return false;
    }
    b.credit_ns = credit - cost;
    true
}
