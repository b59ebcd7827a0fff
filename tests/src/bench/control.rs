//! Part 4 (in process): consistent-hash table rebuild time and authenticated binding updates
//! per second, each beside a baseline measured in the same run.
use std::{
    collections::HashMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use anycast_common::{
    table::{self, Member},
    wire::{self, Body, Key, LoadInfo, Message, Options},
    DEFAULT_RING_SIZE,
};
use anycast_ctl::{
    config::Registration,
    dataplane::{Dataplane, Sizes},
    registration::agent::Registry,
};
use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::perpacket::{server_v4, service};
use super::report::{median, Rng, Row, Section};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn members(n: u32) -> Vec<Member> {
    (1..=n)
        .map(|i| Member {
            key: table::member_key(&server_v4(i).to_string()),
            weight: 100,
        })
        .collect()
}

/// The baseline: sort 65537 (hash, index) pairs and fill a table from them, the plainest
/// work of the same size as a table build.
fn sort_and_fill(rng: &mut Rng, n: u32) -> Vec<u32> {
    let size = DEFAULT_RING_SIZE as usize;
    let mut pairs: Vec<(u64, u32)> = (0..size as u32).map(|i| (rng.next_u64(), i)).collect();
    pairs.sort_unstable();
    let mut table = vec![0u32; size];
    for (j, (_, i)) in pairs.iter().enumerate() {
        table[j] = i % n;
    }
    table
}

pub fn control_plane(quick: bool) -> Result<Section> {
    let mut s = Section::new("control", "4. Control plane");
    s.method = "Table rebuild: anycast_common::table::build for n servers of weight 100 into \
        a 65537-entry table, median of repeated builds, each beside the baseline (sort 65537 \
        random (hash, index) pairs and fill a 65537-entry table from them) run in the same \
        loop. Publishing: Dataplane::apply after one server of 1000 leaves (new table built \
        and only the changed entries written to the map, then the switch), the same with \
        nothing changed, and a new service (its table written whole); tables are written \
        through the memory-mapped RINGS map (the row notes say if the kernel refused the \
        mapping and map updates were used). Binding updates: \
        anycast_ctl::registration::agent::Registry::handle on one core over pre-built, distinct, valid, \
        signed BUs (256 servers, all for one anycast address, each registering once and \
        then refreshing with increasing sequence numbers and timestamps; every one \
        verified, accepted and answered with a signed BA), beside wire::decode and \
        wire::verify alone on the same messages."
        .into();
    let reps = if quick { 3 } else { 15 };
    let mut rng = Rng::new(42);
    let mut data = Vec::new();
    for n in [10u32, 100, 1000, 4096] {
        let m = members(n);
        let (mut build, mut base) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            black_box(sort_and_fill(&mut rng, n));
            base.push(ms(t));
            let t = Instant::now();
            black_box(table::build(&m, DEFAULT_RING_SIZE));
            build.push(ms(t));
        }
        let (b, bl) = (median(&build), median(&base));
        let mut row = Row::new(format!("table rebuild, {n} servers"), b, "ms")
            .baseline("sort+fill of 65537 entries", bl);
        if n == 1000 {
            row = row.target("<= 0.5 ms for 1000 servers", b <= 0.5);
        }
        s.rows.push(row);
        data.push(json!({"servers": n, "build_ms": build, "baseline_ms": base}));
    }

    // Publishing a change through the maps.
    let servers: Vec<IpAddr> = (1..=1000).map(server_v4).collect();
    let svc = |list: &[IpAddr]| service("svc", IpAddr::V4(Ipv4Addr::new(10, 9, 100, 1)), list);
    let mut dp = Dataplane::new(Sizes::default())?;
    dp.apply(&[svc(&servers)])?;
    let (mut publish, mut build_only) = (Vec::new(), Vec::new());
    for r in 0..reps.min(7) {
        // Alternately without and with the last server.
        let list = if r % 2 == 0 {
            &servers[..999]
        } else {
            &servers[..]
        };
        let m = members(list.len() as u32);
        let t = Instant::now();
        black_box(table::build(&m, DEFAULT_RING_SIZE));
        build_only.push(ms(t));
        let t = Instant::now();
        dp.apply(&[svc(list)])?;
        publish.push(ms(t));
    }
    s.rows.push(
        Row::new(
            "rebuild + publish, 1 of 1000 servers leaves/returns (Dataplane::apply)",
            median(&publish),
            "ms",
        )
        .baseline("table::build alone", median(&build_only)),
    );
    // Publishing when nothing changed.
    let mut same = Vec::new();
    for _ in 0..reps.min(5) {
        let t = Instant::now();
        dp.apply(&[svc(&servers)])?;
        same.push(ms(t));
    }
    s.rows.push(
        Row::new(
            "republish with nothing changed, one 1000-server service (Dataplane::apply)",
            median(&same),
            "ms",
        )
        .baseline("table::build alone", median(&build_only)),
    );
    drop(dp);
    // A new service: its table is written whole.
    let mut dp = Dataplane::new(Sizes::default())?;
    s.notes.push(format!(
        "consistent-hash tables written by {}",
        dp.table_write_path()
    ));
    let one = [server_v4(1)];
    let (mut install, mut build_one) = (Vec::new(), Vec::new());
    for _ in 0..reps.min(5) {
        let t = Instant::now();
        black_box(table::build(&members(1), DEFAULT_RING_SIZE));
        build_one.push(ms(t));
        let t = Instant::now();
        dp.apply(&[svc(&one)])?;
        install.push(ms(t));
        dp.apply(&[])?;
    }
    s.rows.push(
        Row::new(
            "publish a new service with 1 server (65537 entries written)",
            median(&install),
            "ms",
        )
        .baseline("table::build alone", median(&build_one)),
    );
    drop(dp);

    // Binding updates.
    let ids = 256u32;
    let key = |i: u32| format!("bench-key-{i:04}-0123456789abcdef").into_bytes();
    // From JSON, so settings added to the configuration later take their defaults.
    let servers: Vec<serde_json::Value> = (0..ids)
        .map(|i| {
            json!({"id": format!("s{i}"), "spi": 256 + i, "key_file": "unused",
            "allow": ["192.0.2.0/24"], "real": ["10.1.0.0/16"]})
        })
        .collect();
    let registration: Registration = serde_json::from_value(json!({
        "port": 4191,
        "max_lifetime": 600,
        "drain_time": 30,
        "replay_window": 30,
        "limits": {
            "bindings_per_address": 1_000_000,
            "bindings_per_server": 16,
            "messages_per_second": 1_000_000_000,
        },
        "probe": null,
        "servers": servers,
    }))
    .context("the benchmark's registration settings")?;
    let keys: HashMap<String, Vec<u8>> = (0..ids).map(|i| (format!("s{i}"), key(i))).collect();
    let agent = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let mut registry = Registry::new(&registration, &keys, &[agent], 64);
    let wall = wire::ntp_now() & !0xffff_ffff;
    let count: u32 = if quick { 20_000 } else { 200_000 };
    let bus: Vec<(Vec<u8>, SocketAddr)> = (0..count)
        .map(|n| {
            let i = n % ids;
            let real = IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, (i & 0xff) as u8));
            let msg = Message {
                src: wire::to_mapped(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
                dst: wire::to_mapped(agent),
                body: Body::BindingUpdate {
                    seq: (n / ids + 1) as u16,
                    ack: true,
                    lifetime: 15,
                },
                options: Options {
                    alt_coa: Some(wire::to_mapped(real)),
                    mn_id: Some(format!("s{i}")),
                    mesg_id: Some(wall + u64::from(n) + 1),
                    load: Some(LoadInfo {
                        sessions_in_use: 10,
                        max_sessions: 100,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            };
            let k = key(i);
            let bytes = wire::encode(
                &msg,
                Some(Key {
                    spi: 256 + i,
                    secret: &k,
                }),
            );
            (bytes, SocketAddr::new(real, 4191))
        })
        .collect();
    let t = Instant::now();
    let mut accepted = 0u32;
    for (bytes, from) in &bus {
        let o = registry.handle(bytes, *from, Instant::now(), wall);
        if o.counted == "registered" || o.counted == "refreshed" {
            accepted += 1;
        }
        black_box(o);
    }
    let handle_secs = t.elapsed().as_secs_f64();
    if accepted != count {
        bail!("only {accepted} of {count} binding updates were accepted");
    }
    let t = Instant::now();
    for (bytes, _) in &bus {
        black_box(wire::decode(bytes).ok());
    }
    let decode_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (n, (bytes, _)) in bus.iter().enumerate() {
        let i = n as u32 % ids;
        let k = key(i);
        let ok = wire::verify(
            bytes,
            Key {
                spi: 256 + i,
                secret: &k,
            },
        );
        black_box(ok);
    }
    let verify_secs = t.elapsed().as_secs_f64();
    let rate = |secs: f64| f64::from(count) / secs;
    s.rows.push(
        Row::new(
            "authenticated binding updates processed (Registry::handle)",
            rate(handle_secs),
            "BU/s",
        )
        .baseline("wire::verify (HMAC) alone", rate(verify_secs))
        .other("wire::decode alone", rate(decode_secs))
        .target("> 100000 BU/s on one core", rate(handle_secs) > 100_000.0),
    );
    s.data = json!({"table": data, "publish_ms": publish, "build_999_1000_ms": build_only,
        "republish_unchanged_ms": same, "install_new_service_ms": install,
        "binding_updates": {"count": count, "handle_secs": handle_secs,
            "decode_secs": decode_secs, "verify_secs": verify_secs}});
    Ok(s)
}
