//! Route optimization, client side: the TC egress program tunnels the client's packets for
//! bound services to their server's real address, the inner packet untouched, and leaves
//! everything else to the normal path (the agent); as a fixture table with exact bytes.
use std::net::IpAddr;

use anycast_common::{
    addr_words, client_tunnel, maps, programs, ClientBinding, ServiceKey, PROTO_TCP, PROTO_UDP,
};
use anycast_ctl::dataplane::{load_object, Sizes};
use anycast_tests::packet::{ethernet, tcp, udp, TCP_ACK, TCP_PSH, TCP_SYN};
use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};

use crate::fixtures::{self, Fixture, Program};
use crate::harness::*;

/// The client's object with its tunnel loaded, in a test namespace of its own.
struct ClientSide {
    ebpf: aya::Ebpf,
    bindings: HashMap<MapData, ServiceKey, ClientBinding>,
    stats: PerCpuArray<MapData, u64>,
    _ns: Netns,
}

/// A binding row: (anycast address, protocol, port) -> (real address, client's source).
type Bound = (&'static str, u8, u16, &'static str, &'static str);

impl ClientSide {
    fn new() -> Result<Self> {
        let ns = Netns::new()?;
        let mut ebpf = load_object(Sizes {
            ring_size: 1,
            max_services: 1,
            max_flows: 1,
            max_preference_tables: 1,
        })?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the object has no map {name}"))
        };
        let bindings = HashMap::try_from(take(maps::CLIENT_BINDINGS)?)?;
        let stats = PerCpuArray::try_from(take(maps::CLIENT_STATS)?)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(programs::CLIENT_TUNNEL)
            .ok_or_else(|| anyhow!("no program {}", programs::CLIENT_TUNNEL))?
            .try_into()?;
        tc.load().context("loading the client's tunnel")?;
        Ok(ClientSide {
            ebpf,
            bindings,
            stats,
            _ns: ns,
        })
    }
}

impl Program for ClientSide {
    type Setup = Vec<Bound>;

    fn set_up(&mut self, rows: &Vec<Bound>) -> Result<()> {
        let old: Vec<ServiceKey> = self.bindings.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.bindings.remove(&k)?;
        }
        for &(anycast, proto, port, real, source) in rows {
            let (real, family) = addr_words(real.parse()?);
            let key = ServiceKey::new(anycast.parse()?, proto, port);
            let value = ClientBinding {
                real,
                source: addr_words(source.parse()?).0,
                family,
                _pad: [0; 3],
            };
            self.bindings.insert(key, value, 0)?;
        }
        Ok(())
    }

    fn run(&self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(programs::CLIENT_TUNNEL)
            .ok_or_else(|| anyhow!("no program"))?
            .try_into()?;
        let mut out = vec![0u8; input.len() + 128];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (sched_cls)")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn counters(&self) -> Result<Vec<u64>> {
        (0..client_tunnel::COUNT)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    fn counter_names(&self) -> &'static [&'static str] {
        &client_tunnel::NAMES
    }
}

/// A packet the client sends to `service`:`dport` (from its own address of that family).
fn request(service: &str, proto: u8, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = match proto {
        PROTO_TCP => tcp(40500, dport, flags, PAYLOAD),
        PROTO_UDP => udp(40501, dport, PAYLOAD),
        _ => PAYLOAD.to_vec(),
    };
    let dst: IpAddr = service.parse().unwrap();
    let src = match dst {
        IpAddr::V4(_) => IpAddr::V4(CLIENT_V4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT_V6),
    };
    client_ip(src, dst, proto).packet(&l4)
}

/// As the client's stack sends it: to its router.
fn client_frame(ip: &[u8]) -> Vec<u8> {
    ethernet(ROUTER_MAC, CLIENT_MAC, None, ip)
}

fn row(
    bound: Vec<Bound>,
    description: impl Into<String>,
    input: Vec<u8>,
    action: u32,
    output: Vec<u8>,
    counted: u32,
) -> Fixture<Vec<Bound>> {
    Fixture::new(description, bound, input, action, counted, output)
}

#[test]
fn the_client_tunnels_bound_services_to_their_server_and_nothing_else() -> Result<()> {
    let mut client = ClientSide::new()?;
    let web4 = request("192.0.2.10", PROTO_TCP, 80, TCP_PSH | TCP_ACK);
    let syn4 = request("192.0.2.10", PROTO_TCP, 80, TCP_SYN);
    let other_port = request("192.0.2.10", PROTO_TCP, 443, TCP_SYN);
    let dns4 = request("192.0.2.10", PROTO_UDP, 53, 0);
    let web6 = request("2001:db8::10", PROTO_TCP, 443, TCP_PSH | TCP_ACK);
    let icmp4 = request("192.0.2.10", 1, 0, 0);
    // The server 10.9.3.11 is reached through fy0 (a permanent neighbour).
    let s4 = neighbour_mac("10.9.3.11");
    let s6 = neighbour_mac("fd09:2::11");
    let web_bound: Vec<Bound> = vec![("192.0.2.10", PROTO_TCP, 80, "10.9.3.11", "10.9.2.1")];
    let mut v = vec![
        row(
            vec![],
            "no binding -> untouched, through the agent",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            web_bound.clone(),
            "TCP to a bound service -> IPv4-in-IPv4 to the server's real address, redirected via fy0",
            client_frame(&web4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &web4),
            client_tunnel::TUNNELLED,
        ),
        row(
            web_bound.clone(),
            "a new connection's SYN to a bound service -> tunnelled from its first packet",
            client_frame(&syn4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn4),
            client_tunnel::TUNNELLED,
        ),
        row(
            web_bound.clone(),
            "another port of the bound address -> untouched",
            client_frame(&other_port),
            TC_ACT_OK,
            client_frame(&other_port),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            web_bound.clone(),
            "UDP to the bound address (a TCP binding) -> untouched",
            client_frame(&dns4),
            TC_ACT_OK,
            client_frame(&dns4),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            vec![("192.0.2.10", PROTO_UDP, 0, "10.9.3.11", "10.9.2.1")],
            "UDP to a service bound for every port -> tunnelled",
            client_frame(&dns4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &dns4),
            client_tunnel::TUNNELLED,
        ),
        row(
            vec![("192.0.2.10", 0, 0, "10.9.3.11", "10.9.2.1")],
            "TCP to an address bound whole (protocol 0, every port) -> tunnelled",
            client_frame(&other_port),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &other_port),
            client_tunnel::TUNNELLED,
        ),
        row(
            vec![("192.0.2.10", 0, 0, "10.9.3.11", "10.9.2.1")],
            "ICMP to a bound address -> untouched",
            client_frame(&icmp4),
            TC_ACT_OK,
            client_frame(&icmp4),
            client_tunnel::PASS_OTHER,
        ),
        row(
            vec![("2001:db8::10", PROTO_TCP, 443, "fd09:2::11", "fd09:2::1")],
            "IPv6 TCP, an IPv6 server -> IPv6-in-IPv6 (41), redirected via fx0",
            client_frame(&web6),
            TC_ACT_REDIRECT,
            tunnelled(s6, FX0_MAC, "fd09:2::1", "fd09:2::11", &web6),
            client_tunnel::TUNNELLED,
        ),
        row(
            vec![("2001:db8::10", PROTO_TCP, 443, "10.9.3.11", "10.9.2.1")],
            "IPv6 TCP, an IPv4 server -> IPv6-in-IPv4 (41), redirected via fy0",
            client_frame(&web6),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &web6),
            client_tunnel::TUNNELLED,
        ),
        row(
            vec![("192.0.2.10", PROTO_TCP, 80, "10.9.2.99", "10.9.2.1")],
            "a server without a neighbour entry -> tunnelled, redirect_neigh, MACs unchanged",
            client_frame(&web4),
            TC_ACT_REDIRECT,
            tunnelled(ROUTER_MAC, CLIENT_MAC, "10.9.2.1", "10.9.2.99", &web4),
            client_tunnel::TUNNELLED_RESOLVING,
        ),
        row(
            vec![("192.0.2.10", PROTO_TCP, 80, "10.99.0.1", "10.9.2.1")],
            "no route to the server -> untouched, through the agent",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_NO_ROUTE,
        ),
        row(
            web_bound.clone(),
            "ARP -> untouched",
            arp_request(),
            TC_ACT_OK,
            arp_request(),
            client_tunnel::PASS_OTHER,
        ),
    ];
    // A fragment (more fragments set) of a bound service's packet: all pieces of a packet
    // take one path, and the later ones carry no ports.
    let mut fragment = web4.clone();
    fragment[6] |= 0x20;
    v.push(row(
        web_bound.clone(),
        "an IPv4 fragment to a bound service -> untouched",
        client_frame(&fragment),
        TC_ACT_OK,
        client_frame(&fragment),
        client_tunnel::PASS_OTHER,
    ));
    // The kernel refuses sched_cls test frames of the IPv4 ether type shorter than an IPv4
    // header (14 + 20 bytes); 37 ends inside the destination port.
    for len in [34usize, 37] {
        let cut = client_frame(&web4)[..len].to_vec();
        v.push(row(
            web_bound.clone(),
            format!("a bound service's packet truncated to {len} bytes -> untouched"),
            cut.clone(),
            TC_ACT_OK,
            cut,
            client_tunnel::PASS_OTHER,
        ));
    }
    fixtures::run(&mut client, &v)
}
