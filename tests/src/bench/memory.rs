//! Part 6: kernel map memory per flow, per service and per server, from the loaded maps
//! themselves (key and value sizes and max entries from `bpf_map_info`, kernel memory from
//! the `memlock` line of each map fd's `/proc/self/fdinfo`).
use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
};

use anycast_common::{maps, programs, MAX_SERVERS};
use anycast_ctl::dataplane::{Dataplane, Sizes};
use anyhow::{anyhow, Context as _, Result};
use aya::{maps::MapInfo, programs::Xdp};
use serde_json::json;

use super::report::{Row, Section};

#[derive(Clone, Debug)]
struct MapMem {
    key: u64,
    value: u64,
    entries: u64,
    memlock: u64,
}

fn memlock(info: &MapInfo) -> Result<u64> {
    let fd = info.fd()?;
    let raw = fd.as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no memlock line in fdinfo"))
}

/// The agent program's maps with these sizes, by name.
fn load(sizes: Sizes) -> Result<BTreeMap<String, MapMem>> {
    let mut dp = Dataplane::new(sizes)?;
    let prog: &mut Xdp = dp
        .ebpf
        .program_mut(programs::AGENT)
        .ok_or_else(|| anyhow!("no agent program"))?
        .try_into()?;
    prog.load().context("loading the agent program")?;
    let ids = prog
        .info()?
        .map_ids()?
        .ok_or_else(|| anyhow!("the kernel does not list the program's maps"))?;
    let mut out = BTreeMap::new();
    for id in ids {
        let info = MapInfo::from_id(id)?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        out.insert(
            name,
            MapMem {
                key: info.key_size().into(),
                value: info.value_size().into(),
                entries: info.max_entries().into(),
                memlock: memlock(&info)?,
            },
        );
    }
    Ok(out)
}

fn get<'a>(m: &'a BTreeMap<String, MapMem>, name: &str) -> Result<&'a MapMem> {
    m.get(name)
        .ok_or_else(|| anyhow!("map {name} not among the program's maps"))
}

pub fn memory() -> Result<Section> {
    let mut s = Section::new("memory", "6. Map memory");
    s.method = "The agent program loaded twice, with default sizes (65537-entry tables, 64 \
        services, 1M flows) and with 128 services and 2M flows; key/value sizes and max \
        entries from bpf_map_info, kernel memory from the memlock line of each map fd's \
        fdinfo. Per flow and per service: the growth of memlock between the two loads \
        divided by the added entries; per server: memlock of the server maps divided by \
        their 4096 slots. Per-CPU maps count every possible CPU."
        .into();
    let a = load(Sizes::default())?;
    let b_sizes = Sizes {
        max_services: 128,
        max_flows: 2_000_000,
        ..Sizes::default()
    };
    let b = load(b_sizes)?;
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("counting CPUs: {e}"))? as u64;

    let fa = get(&a, maps::FLOWS)?;
    let fb = get(&b, maps::FLOWS)?;
    let kv = (fa.key + fa.value) as f64;
    let per_flow = (fb.memlock - fa.memlock) as f64 / (fb.entries - fa.entries) as f64;
    s.rows.push(
        Row::new("flow table: key + value per flow", kv, "bytes")
            .target("<= 56 bytes of key and value", kv <= 56.0),
    );
    s.rows.push(
        Row::new(
            "flow table: kernel memory per flow (memlock growth)",
            per_flow,
            "bytes",
        )
        .baseline("key + value", kv),
    );

    let svc_maps = [maps::SERVICES, maps::RINGS, maps::SERVICE_STATS];
    let mut grow = 0u64;
    let mut kv_service = 0u64;
    for name in svc_maps {
        let (x, y) = (get(&a, name)?, get(&b, name)?);
        grow += y.memlock - x.memlock;
        let per_cpu = if name == maps::SERVICE_STATS { ncpu } else { 1 };
        let entries_per_service = (y.entries - x.entries) / 64;
        kv_service += (x.key + x.value * per_cpu) * entries_per_service;
    }
    let per_service = grow as f64 / 64.0;
    s.rows.push(
        Row::new(
            "per service: kernel memory (memlock growth per added service)",
            per_service,
            "bytes",
        )
        .baseline("key + value of its entries", kv_service as f64)
        .note("two 65537-entry tables of 4-byte server slots dominate"),
    );

    let (sv, st, nh) = (
        get(&a, maps::SERVERS)?,
        get(&a, maps::SERVER_STATS)?,
        get(&a, maps::NEXT_HOPS)?,
    );
    let per_server = (sv.memlock + st.memlock + nh.memlock) as f64 / f64::from(MAX_SERVERS);
    let kv_server =
        (sv.key + sv.value + st.key + st.value * ncpu + nh.key + nh.value * ncpu) as f64;
    s.rows.push(
        Row::new(
            "per server: kernel memory (server maps incl. per-CPU next hops / 4096 slots)",
            per_server,
            "bytes",
        )
        .baseline("key + value of its entries", kv_server),
    );
    let total: u64 = a.values().map(|m| m.memlock).sum();
    s.rows.push(Row::new(
        "all maps at default sizes (memlock)",
        total as f64 / (1 << 20) as f64,
        "MiB",
    ));
    let dump = |m: &BTreeMap<String, MapMem>| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({"key_size": v.key, "value_size": v.value,
                           "max_entries": v.entries, "memlock": v.memlock}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    };
    s.data = json!({"default_sizes": dump(&a), "doubled_sizes": dump(&b), "possible_cpus": ncpu});
    Ok(s)
}
