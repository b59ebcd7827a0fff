//! A sweep of a million-entry flow table by the agent's sweeper thread while the data path
//! refreshes flows of that table: no live entry is deleted and every expired one that saw
//! no packet is.
//!
//! The table is written directly (`BPF_MAP_UPDATE_BATCH`) with three groups of flows, their
//! ages chosen against short timeouts (TCP 60 s, UDP 30 s): live (seen at the fill), edge
//! (exactly at their timeout at the tick the sweep reads: live for that reading, expired
//! for the data path from the next tick on) and expired (a thousand ticks old). Live and
//! edge entries are pinned to a server of weight 0, which is in no consistent-hash table:
//! a packet of such a flow goes to that server only if its entry is still there, so every
//! packet tells whether the sweeper deleted its flow, and so does every entry left at the
//! end. The sweep is started shortly before a tick of the flow clock so that its reading of
//! the table runs across the tick, where the data path writes a tick later than the one
//! the sweep read: an entry refreshed there is live.
use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use anycast_common::{
    flow_tick, flow_ticks, maps, verdict, words_addr, FlowKey, FlowValue, ServerInfo,
    FLOW_CLOCK_SHIFT, PROTO_TCP, PROTO_UDP, SERVER_UP,
};
use anycast_ctl::dataplane::{flow_clock_now, Dataplane, DesiredService, FlowTimeouts};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::maps::{Array, Map, MapData};

use crate::harness::*;

/// Entries pinned live at the fill.
const LIVE: u32 = 480_000;
/// Entries exactly at their timeout at the tick the sweep reads.
const EDGE: u32 = 40_000;
/// Entries a thousand ticks old.
const EXPIRED: u32 = 480_000;
const ENTRIES: u32 = LIVE + EDGE + EXPIRED;
/// Room to spare in the LRU table, so that no insertion (the fill, the data path's
/// re-choices, the sweeper's restores) evicts an entry and passes for a deletion.
const CAPACITY: u32 = 1_250_000;
const TCP_IDLE: u32 = 60;
const UDP_IDLE: u32 = 30;
const ADDR: &str = "192.0.2.95";
/// In every consistent-hash table: where a flow without an entry goes.
const RING_SERVER: &str = SERVER_A;
/// Weight 0, up: in no table, yet honoured for the entries pinned to it.
const PINNED_SERVER: &str = SERVER_B;
/// Tick distance of the expired group's last packet before the fill.
const EXPIRED_AGE: u32 = 1000;
/// Attempts at starting the sweep before a tick (a busy machine may start it late).
const ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Group {
    Live,
    Edge,
    Expired,
}

fn group(i: u32) -> Group {
    if i < LIVE {
        Group::Live
    } else if i < LIVE + EDGE {
        Group::Edge
    } else {
        Group::Expired
    }
}

/// Flow `i`: client 198.51.0.0/16 + i / 256, port 20000 + i % 256; every fourth UDP.
fn flow(i: u32) -> Flow {
    let (proto, dport) = if i % 4 == 3 {
        (PROTO_UDP, 53)
    } else {
        (PROTO_TCP, 80)
    };
    Flow {
        src: IpAddr::V4(Ipv4Addr::from(0xc633_0000 | (i >> 8))),
        ..Flow::v4(ADDR, proto, 20000 + (i & 0xff) as u16, dport)
    }
}

fn key(f: &Flow) -> FlowKey {
    FlowKey::new(f.src, f.dst, f.proto, f.sport, f.dport)
}

/// The index of the flow whose key this is, if it is one of the test's.
fn index(k: &FlowKey) -> Option<u32> {
    let IpAddr::V4(src) = words_addr(k.src, k.family) else {
        return None;
    };
    let port = u32::from(k.sport.checked_sub(20000)?);
    let i = ((u32::from(src) & 0xffff) << 8) | port;
    (port < 256 && i < ENTRIES && key(&flow(i)) == *k).then_some(i)
}

fn timeout(proto: u8) -> u32 {
    flow_ticks(if proto == PROTO_UDP {
        UDP_IDLE
    } else {
        TCP_IDLE
    })
}

fn services() -> Vec<DesiredService> {
    let servers = [(RING_SERVER, 1), (PINNED_SERVER, 0)];
    vec![
        service("sweep-tcp", ADDR, PROTO_TCP, 80, &servers),
        service("sweep-udp", ADDR, PROTO_UDP, 53, &servers),
    ]
}

/// The pinned server's slot and generation in the service of `proto`.
fn pinned_slot(dp: &Dataplane, proto: u8) -> Result<(u32, u32)> {
    let name = if proto == PROTO_UDP { "udp" } else { "tcp" };
    let report = dp.report()?;
    let slot = report
        .services
        .iter()
        .filter(|s| s.protocol == name)
        .flat_map(|s| &s.servers)
        .find(|s| s.address == PINNED_SERVER.parse::<IpAddr>().unwrap())
        .ok_or_else(|| anyhow!("no {PINNED_SERVER} in the {name} service"))?
        .slot;
    let servers: Array<MapData, ServerInfo> = Array::try_from(agent_map(dp, maps::SERVERS)?)?;
    let info = servers.get(&slot, 0)?;
    ensure!(
        info.flags & SERVER_UP != 0,
        "{PINNED_SERVER} is not up in its slot"
    );
    Ok((slot, info.generation))
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC`, of which the flow clock's `CLOCK_MONOTONIC_COARSE` is the value at
/// the last timer interrupt: the coarse clock passes a value at most a jiffy after this one.
fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Waits until `CLOCK_MONOTONIC` reaches `t`, which is at most `bound` away.
fn wait_until(t: u64, bound: Duration) -> Result<()> {
    let start = Instant::now();
    while mono_ns() < t {
        ensure!(
            start.elapsed() < bound,
            "CLOCK_MONOTONIC did not reach {t} within {bound:?}"
        );
        let left = Duration::from_nanos(t.saturating_sub(mono_ns()));
        std::thread::sleep(left.min(Duration::from_millis(1)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Batch access to the flow table (one `bpf()` call per few thousand entries).

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const CHUNK: usize = 8192;

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

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a `bpf_attr.batch` of its own size; the callers point its keys,
    // values and tokens at buffers of `count` entries that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes the entries (created or replaced).
fn write_flows(fd: RawFd, entries: &[(FlowKey, FlowValue)]) -> Result<()> {
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<FlowKey> = chunk.iter().map(|e| e.0).collect();
        let values: Vec<FlowValue> = chunk.iter().map(|e| e.1).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr).context("BPF_MAP_UPDATE_BATCH")?;
        ensure!(
            attr.count as usize == chunk.len(),
            "BPF_MAP_UPDATE_BATCH wrote {} of {} entries",
            attr.count,
            chunk.len()
        );
    }
    Ok(())
}

/// Every entry of the table.
fn read_flows(fd: RawFd) -> Result<Vec<(FlowKey, FlowValue)>> {
    let mut out = Vec::new();
    let mut keys = vec![FlowKey::default(); CHUNK];
    let mut values = vec![FlowValue::default(); CHUNK];
    // The hash map's batch token: a bucket index.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    // A million entries take about 250 calls; the bound only stops a runaway.
    for call in 0..(CAPACITY as usize / CHUNK + 1) * 64 {
        let mut attr = BatchAttr {
            in_batch: if call == 0 {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        match result {
            Ok(()) => {}
            // The last batch.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(
                    keys[..got]
                        .iter()
                        .copied()
                        .zip(values[..got].iter().copied()),
                );
                return Ok(out);
            }
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        }
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        token_in = token_out;
    }
    bail!("reading the flow table did not end")
}

// ---------------------------------------------------------------------------------------

/// splitmix64: which flows the traffic refreshes, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

/// Where the agent tunnelled a frame (an IPv4 outer header).
fn tunnelled_to(out: &[u8]) -> Option<IpAddr> {
    (out.len() >= 34 && out[12..14] == [0x08, 0x00])
        .then(|| IpAddr::from([out[30], out[31], out[32], out[33]]))
}

/// Runs one packet of flow `i`: the server it was tunnelled to.
fn run_flow(dp: &Dataplane, ingress: u32, i: u32) -> Result<IpAddr> {
    let f = flow(i);
    let (action, out) = run_xdp(dp, ingress, &client_frame(None, &ip_packet(&f)))?;
    ensure!(
        action == XDP_TX,
        "flow {i}: {} instead of XDP_TX",
        action_name(action)
    );
    tunnelled_to(&out).ok_or_else(|| anyhow!("flow {i}: not a tunnelled frame"))
}

/// What one attempt measured.
#[derive(Debug, Default)]
struct Figures {
    fill: Duration,
    scan: Duration,
    /// How long before the tick the sweep was started (planned), and how long before it the
    /// sweep read the clock at least.
    lead: Duration,
    early: Duration,
    sweep_ms: f64,
    /// The sweep's time past the tick, at least.
    past_tick: Duration,
    packets: u64,
    live_packets: u64,
    /// Packets of live flows run in the tick after the one the sweep read: the data path
    /// wrote that later tick into their entries.
    live_after_tick: u64,
    /// Packets of live flows that found no entry (went to the ring server).
    live_missed: u64,
    expired_packets: u64,
    hits: u64,
    misses: u64,
    expired_verdicts: u64,
    swept: u64,
    live_left: u32,
    live_deleted: u32,
    edge_left: u32,
    /// Edge entries the data path chose again (expired for it after the tick).
    edge_rechosen: u32,
    edge_refreshed: u32,
    expired_refreshed: u32,
    expired_deleted: u32,
}

/// One fill, sweep and count. `None` when the sweeper did not read the clock before the
/// tick it was meant to straddle (the live and expired groups are checked all the same).
fn attempt(h: &Harness, seed: u64) -> Result<Option<Figures>> {
    let mut fig = Figures::default();
    let mut dp = new_dataplane_with_flows(h.fy0, CAPACITY)?;
    dp.apply(&services())?;
    dp.set_flow_timeouts(FlowTimeouts {
        tcp_idle: TCP_IDLE,
        udp_idle: UDP_IDLE,
        tcp_closing: 10,
    })?;
    let pins = [pinned_slot(&dp, PROTO_TCP)?, pinned_slot(&dp, PROTO_UDP)?];
    let pin = |i: u32, last_seen: u32| {
        let (server, generation) = pins[usize::from(flow(i).proto == PROTO_UDP)];
        FlowValue {
            server,
            generation,
            last_seen,
            flags: 0,
        }
    };
    let table = match agent_map(&dp, maps::FLOWS)? {
        Map::LruHashMap(m) => m,
        _ => bail!("FLOWS is not an LRU hash map"),
    };
    let fd = table.fd().as_fd().as_raw_fd();
    let (ring, pinned): (IpAddr, IpAddr) = (RING_SERVER.parse()?, PINNED_SERVER.parse()?);

    // Live and expired groups; the edge group is written once the sweep's tick is known.
    let started = Instant::now();
    let fill_tick = flow_clock_now();
    let entries: Vec<(FlowKey, FlowValue)> = (0..ENTRIES)
        .filter(|&i| group(i) != Group::Edge)
        .map(|i| {
            let seen = match group(i) {
                Group::Live => fill_tick,
                _ => fill_tick.wrapping_sub(EXPIRED_AGE),
            };
            (key(&flow(i)), pin(i, seen))
        })
        .collect();
    write_flows(fd, &entries)?;
    drop(entries);
    fig.fill = started.elapsed();
    // A whole read of the table, as the sweep's first phase does it: how long the sweep
    // reads for, to start it so that the tick falls in that reading.
    let started = Instant::now();
    let filled = read_flows(fd)?.len();
    fig.scan = started.elapsed();
    ensure!(
        filled == (LIVE + EXPIRED) as usize,
        "the table holds {filled} entries after writing {}",
        LIVE + EXPIRED
    );
    ensure!(
        run_flow(&dp, h.fx0, 0)? == pinned,
        "a live entry pinned to {PINNED_SERVER} (weight 0) is not honoured"
    );

    // The tick to straddle: the sweep starts `lead` before it, and the edge group is written
    // before that with ages exactly at their timeout at the tick before it (`read_tick`).
    fig.lead = (fig.scan / 3).clamp(Duration::from_millis(10), Duration::from_millis(400));
    let every = Duration::from_millis(5);
    // Time to write the edge group before the sweep starts.
    let margin = Duration::from_millis(150);
    let tick_ns = 1u64 << FLOW_CLOCK_SHIFT;
    let boundary =
        ((mono_ns() + (margin + fig.lead + every).as_nanos() as u64) / tick_ns + 1) * tick_ns;
    let read_tick = flow_tick(boundary) - 1;
    let edge: Vec<(FlowKey, FlowValue)> = (LIVE..LIVE + EDGE)
        .map(|i| {
            let f = flow(i);
            (key(&f), pin(i, read_tick.wrapping_sub(timeout(f.proto))))
        })
        .collect();
    write_flows(fd, &edge)?;
    drop(edge);
    ensure!(
        flow_clock_now() <= read_tick,
        "writing the edge group ran into the tick meant to fall in the sweep"
    );
    let spawn_at = boundary - (fig.lead + every).as_nanos() as u64;
    wait_until(spawn_at, Duration::from_secs(3))?;

    let before = counters(&dp)?;
    let spawned = mono_ns();
    let sweeper = dp.spawn_sweeper(every)?;
    let mut rng = Rng(seed);
    let mut refreshed = vec![false; ENTRIES as usize];
    // Well within the UDP timeout of the live entries' last packet at the fill: past it, a
    // live flow's packet would be re-chosen by the data path, not find its entry gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let sweep_ended = loop {
        for _ in 0..256 {
            // Mostly live flows; some edge flows (refreshed across the tick) and some
            // expired ones (re-chosen by the data path, so live again).
            let i = match rng.below(10) {
                0 => LIVE + rng.below(EDGE),
                1 => LIVE + EDGE + rng.below(EXPIRED),
                _ => rng.below(LIVE),
            };
            let tick_before = flow_clock_now();
            let to = run_flow(&dp, h.fx0, i)?;
            let tick_after = flow_clock_now();
            fig.packets += 1;
            ensure!(to == ring || to == pinned, "flow {i} tunnelled to {to}");
            match group(i) {
                Group::Live => {
                    fig.live_packets += 1;
                    if tick_before > read_tick {
                        fig.live_after_tick += 1;
                    }
                    if to != pinned {
                        // Its entry was gone: counted, and asserted on after the sweep.
                        fig.live_missed += 1;
                    }
                }
                Group::Edge => {
                    refreshed[i as usize] = true;
                    ensure!(
                        to == pinned || tick_after > read_tick,
                        "edge flow {i} was re-chosen within the tick it was still live in"
                    );
                }
                Group::Expired => {
                    refreshed[i as usize] = true;
                    fig.expired_packets += 1;
                    ensure!(to == ring, "expired flow {i} kept its pinned server");
                }
            }
        }
        if dp.report()?.flow_table.sweeps > 0 {
            break mono_ns();
        }
        ensure!(
            Instant::now() < deadline,
            "the sweep did not end within 20 s ({} packets run)",
            fig.packets
        );
    };
    drop(sweeper);
    let after = counters(&dp)?;
    let d = |v: u32| after[v as usize] - before[v as usize];
    (fig.hits, fig.misses, fig.expired_verdicts) = (
        d(verdict::FLOW_HIT),
        d(verdict::FLOW_MISS),
        d(verdict::FLOW_EXPIRED),
    );
    let report = dp.report()?.flow_table;
    ensure!(
        report.sweeps == 1,
        "{} sweeps ran; the counts are for one",
        report.sweeps
    );
    fig.sweep_ms = report.last_sweep_ms;
    fig.swept = report.swept;
    let sweep_ns = (report.last_sweep_ms * 1e6) as u64;
    // The sweep started after the spawn plus `every`, and ended before it was seen ended:
    // it read the clock before `sweep_ended - sweep_ns` (plus the read of FLOW_CONFIG).
    let read_clock_by = sweep_ended.saturating_sub(sweep_ns) + 1_000_000;
    let read_clock_before_tick = read_clock_by < boundary;
    fig.early = Duration::from_nanos(boundary.saturating_sub(read_clock_by));
    fig.past_tick = Duration::from_nanos(
        (spawned + every.as_nanos() as u64 + sweep_ns).saturating_sub(boundary),
    );

    // Count what is left.
    let mut present = vec![None; ENTRIES as usize];
    let mut strangers = Vec::new();
    for (k, v) in read_flows(fd)? {
        match index(&k) {
            Some(i) => present[i as usize] = Some(v),
            None => strangers.push(k),
        }
    }
    ensure!(
        strangers.is_empty(),
        "{} entries that are none of the test's flows, e.g. {:?}",
        strangers.len(),
        strangers.first()
    );
    let mut edge_lost = Vec::new();
    let mut refreshed_lost = Vec::new();
    let mut expired_kept = Vec::new();
    for i in 0..ENTRIES {
        let v = present[i as usize];
        let r = refreshed[i as usize];
        match group(i) {
            Group::Live => match v {
                Some(v) if (v.server, v.generation) == (pin(i, 0).server, pin(i, 0).generation) => {
                    fig.live_left += 1
                }
                // Gone, or gone and chosen again by a later packet.
                _ => fig.live_deleted += 1,
            },
            Group::Edge => {
                fig.edge_refreshed += u32::from(r);
                match v {
                    Some(v) => {
                        fig.edge_left += 1;
                        fig.edge_rechosen += u32::from(v.server != pin(i, 0).server);
                    }
                    None => edge_lost.push((i, r)),
                }
            }
            Group::Expired => {
                fig.expired_refreshed += u32::from(r);
                match (v, r) {
                    (Some(_), true) => {}
                    (None, true) => refreshed_lost.push(i),
                    (Some(_), false) => expired_kept.push(i),
                    (None, false) => fig.expired_deleted += 1,
                }
            }
        }
    }
    println!(
        "figures: {fig:?}; the sweep read the clock before the tick: {read_clock_before_tick}"
    );
    assert_eq!(
        (fig.live_deleted, fig.live_missed),
        (0, 0),
        "live entries deleted by the sweep (of {LIVE}), and packets of live flows that found \
         no entry (of {} packets of live flows, {} of them in the tick after the sweep's \
         reading)",
        fig.live_packets,
        fig.live_after_tick
    );
    assert!(
        refreshed_lost.is_empty(),
        "{} expired entries refreshed by a packet during the sweep were deleted, e.g. flow {}",
        refreshed_lost.len(),
        refreshed_lost[0]
    );
    assert!(
        expired_kept.is_empty(),
        "{} expired entries that saw no packet were kept, e.g. flow {}",
        expired_kept.len(),
        expired_kept[0]
    );
    ensure!(
        fig.swept >= u64::from(fig.expired_deleted) && fig.swept <= u64::from(EXPIRED),
        "the sweeper counts {} deletions; {} expired entries went",
        fig.swept,
        fig.expired_deleted
    );
    // Refreshed edge entries are live whenever the sweep read the clock.
    assert!(
        !edge_lost.iter().any(|&(_, r)| r),
        "edge entries refreshed during the sweep were deleted: {:?}",
        edge_lost.iter().filter(|e| e.1).take(5).collect::<Vec<_>>()
    );
    if !read_clock_before_tick {
        // The sweep read the tick after `read_tick`, at which the edge group is expired.
        return Ok(None);
    }
    assert!(
        edge_lost.is_empty(),
        "{} edge entries, live at the sweep's reading, were deleted, e.g. {:?}",
        edge_lost.len(),
        edge_lost.first()
    );
    ensure!(
        fig.live_after_tick > 0 && fig.past_tick > Duration::ZERO,
        "the sweep did not run past the tick with traffic ({:?} past it, {} live packets \
         after it)",
        fig.past_tick,
        fig.live_after_tick
    );
    Ok(Some(fig))
}

/// A sweep over a million flows while traffic refreshes random flows of the table, across
/// a tick of the flow clock: not one live entry is deleted (counted entry by entry, and
/// every packet of a live flow still finds its entry), every expired entry without a
/// packet goes, and every expired one a packet revived stays. The sweep is the agent's
/// sweeper thread; the packets are the XDP program's, run with `BPF_PROG_TEST_RUN` on this
/// thread meanwhile.
#[test]
fn a_sweep_of_a_million_flows_under_traffic_deletes_no_live_entry() -> Result<()> {
    let h = Harness::new()?;
    let started = Instant::now();
    for n in 1..=ATTEMPTS {
        let seed = 0x5eed_0000 + u64::from(n);
        if let Some(f) = attempt(&h, seed)? {
            println!(
                "entries: {ENTRIES} ({LIVE} live, {EDGE} at their timeout, {EXPIRED} expired); \
                 fill {:.0} ms, read of the table {:.0} ms; sweep {:.0} ms, started {:.0} ms \
                 before a tick (read the clock at least {:.0} ms before it) and ran at least \
                 {:.0} ms past it; packets run during the \
                 sweep: {} ({} of live flows, {} of them after the tick; {} of expired flows); \
                 flow_hit {} flow_miss {} flow_expired {}; live deleted: {} ({} left); edge \
                 entries left: {} ({} refreshed, {} of them chosen again by the data path after \
                 the tick); expired deleted: {} (sweeper: {} deletions), expired kept because a \
                 packet revived them: {}; attempt {n}, {:.1} s in all",
                f.fill.as_secs_f64() * 1e3,
                f.scan.as_secs_f64() * 1e3,
                f.sweep_ms,
                f.lead.as_secs_f64() * 1e3,
                f.early.as_secs_f64() * 1e3,
                f.past_tick.as_secs_f64() * 1e3,
                f.packets,
                f.live_packets,
                f.live_after_tick,
                f.expired_packets,
                f.hits,
                f.misses,
                f.expired_verdicts,
                f.live_deleted,
                f.live_left,
                f.edge_left,
                f.edge_refreshed,
                f.edge_rechosen,
                f.expired_deleted,
                f.swept,
                f.expired_refreshed,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        println!("attempt {n}: the sweeper read the clock after the tick; again");
    }
    bail!("in {ATTEMPTS} attempts the sweeper never read the clock before the tick it was started for")
}
