//! Route optimization, client side: the TC egress program tunnels the client's packets for
//! bound services to their server's real address, the inner packet untouched, and leaves
//! everything else to the normal path (the agent); as a fixture table with exact bytes.
//! A binding moves only the connections it covers: those that open while it is held (a
//! TCP SYN, a UDP flow never seen) and those its server named (`CLIENT_FLOWS`).
use std::net::IpAddr;

use anycast_common::{
    addr_words, client_tunnel, maps, programs, ClientBinding, FlowKey, ServiceKey, PROTO_TCP,
    PROTO_UDP,
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
    flows: HashMap<MapData, FlowKey, u32>,
    stats: PerCpuArray<MapData, u64>,
    _ns: Netns,
}

/// A binding row: (anycast address, protocol, port) -> (real address, client's source).
/// Its generation is [`GENERATION`].
type Bound = (&'static str, u8, u16, &'static str, &'static str);
/// The bindings' generation in these fixtures.
const GENERATION: u32 = 3;
/// A connection entry: (the request's anycast address, protocol, destination port) as
/// [`request`] sends it -> generation.
type Flow = (&'static str, u8, u16, u32);

/// What a fixture starts from: the bindings and the connection entries.
#[derive(Clone, Default)]
struct Setup {
    bound: Vec<Bound>,
    flows: Vec<Flow>,
}

fn bound(rows: Vec<Bound>) -> Setup {
    Setup {
        bound: rows,
        flows: vec![],
    }
}

fn with_flows(rows: Vec<Bound>, flows: Vec<Flow>) -> Setup {
    Setup { bound: rows, flows }
}

/// The tunnel's key of [`request`]'s packet.
fn flow_key(service: &str, proto: u8, dport: u16) -> Result<FlowKey> {
    let dst: IpAddr = service.parse()?;
    let src = match dst {
        IpAddr::V4(_) => IpAddr::V4(CLIENT_V4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT_V6),
    };
    let (dst, family) = addr_words(dst);
    Ok(FlowKey {
        src: addr_words(src).0,
        dst,
        sport: request_sport(proto),
        dport,
        proto,
        family,
        _pad: [0; 2],
    })
}

impl ClientSide {
    fn new() -> Result<Self> {
        let ns = Netns::new()?;
        let mut ebpf = load_object(Sizes {
            ring_size: 1,
            max_services: 1,
            max_flows: 1,
            max_preference_tables: 1,
            max_client_flows: 64,
            max_server_udp_flows: 1,
        })?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the object has no map {name}"))
        };
        let bindings = HashMap::try_from(take(maps::CLIENT_BINDINGS)?)?;
        let flows = HashMap::try_from(take(maps::CLIENT_FLOWS)?)?;
        let stats = PerCpuArray::try_from(take(maps::CLIENT_STATS)?)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(programs::CLIENT_TUNNEL)
            .ok_or_else(|| anyhow!("no program {}", programs::CLIENT_TUNNEL))?
            .try_into()?;
        tc.load().context("loading the client's tunnel")?;
        Ok(ClientSide {
            ebpf,
            bindings,
            flows,
            stats,
            _ns: ns,
        })
    }
}

impl Program for ClientSide {
    type Setup = Setup;

    fn set_up(&mut self, setup: &Setup) -> Result<()> {
        let old: Vec<ServiceKey> = self.bindings.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.bindings.remove(&k)?;
        }
        let old: Vec<FlowKey> = self.flows.keys().collect::<Result<_, _>>()?;
        for k in old {
            self.flows.remove(&k)?;
        }
        for &(service, proto, dport, generation) in &setup.flows {
            self.flows
                .insert(flow_key(service, proto, dport)?, generation, 0)?;
        }
        for &(anycast, proto, port, real, source) in &setup.bound {
            let (real, family) = addr_words(real.parse()?);
            let key = ServiceKey::new(anycast.parse()?, proto, port);
            let value = ClientBinding {
                real,
                source: addr_words(source.parse()?).0,
                family,
                _pad: [0; 3],
                generation: GENERATION,
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

fn request_sport(proto: u8) -> u16 {
    if proto == PROTO_UDP {
        40501
    } else {
        40500
    }
}

/// A packet the client sends to `service`:`dport` (from its own address of that family).
fn request(service: &str, proto: u8, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = match proto {
        PROTO_TCP => tcp(request_sport(proto), dport, flags, PAYLOAD),
        PROTO_UDP => udp(request_sport(proto), dport, PAYLOAD),
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
    setup: Setup,
    description: impl Into<String>,
    input: Vec<u8>,
    action: u32,
    output: Vec<u8>,
    counted: u32,
) -> Fixture<Setup> {
    Fixture::new(description, setup, input, action, counted, output)
}

#[test]
fn the_client_tunnels_bound_services_to_their_server_and_nothing_else() -> Result<()> {
    let mut client = ClientSide::new()?;
    let web4 = request("192.0.2.10", PROTO_TCP, 80, TCP_PSH | TCP_ACK);
    let syn4 = request("192.0.2.10", PROTO_TCP, 80, TCP_SYN);
    let syn_ack4 = request("192.0.2.10", PROTO_TCP, 80, TCP_SYN | TCP_ACK);
    let other_port = request("192.0.2.10", PROTO_TCP, 443, TCP_SYN);
    let dns4 = request("192.0.2.10", PROTO_UDP, 53, 0);
    let web6 = request("2001:db8::10", PROTO_TCP, 443, TCP_PSH | TCP_ACK);
    let icmp4 = request("192.0.2.10", 1, 0, 0);
    // The server 10.9.3.11 is reached through fy0 (a permanent neighbour).
    let s4 = neighbour_mac("10.9.3.11");
    let s6 = neighbour_mac("fd09:2::11");
    let web_bound: Vec<Bound> = vec![("192.0.2.10", PROTO_TCP, 80, "10.9.3.11", "10.9.2.1")];
    // The web connection of `web4`, named by the server (this binding's generation).
    let web_named =
        |rows: Vec<Bound>| with_flows(rows, vec![("192.0.2.10", PROTO_TCP, 80, GENERATION)]);
    let mut v = vec![
        row(
            Setup::default(),
            "no binding -> untouched, through the agent",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            web_named(web_bound.clone()),
            "a connection the server named -> IPv4-in-IPv4 to the server's real address, \
             redirected via fy0",
            client_frame(&web4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &web4),
            client_tunnel::TUNNELLED,
        ),
        row(
            bound(web_bound.clone()),
            "a connection open before the binding, not named -> untouched (the agent may have \
             given it to another server)",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_OPENED_BEFORE,
        ),
        row(
            with_flows(
                web_bound.clone(),
                vec![("192.0.2.10", PROTO_TCP, 80, GENERATION - 1)],
            ),
            "a connection of an earlier binding (another server's) -> untouched",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_OPENED_BEFORE,
        ),
        row(
            bound(web_bound.clone()),
            "a new connection's SYN to a bound service -> tunnelled from its first packet",
            client_frame(&syn4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn4),
            client_tunnel::TUNNELLED,
        ),
        row(
            with_flows(
                web_bound.clone(),
                vec![("192.0.2.10", PROTO_TCP, 80, GENERATION - 1)],
            ),
            "a SYN on the 5-tuple of an earlier binding's connection: a new connection -> \
             tunnelled",
            client_frame(&syn4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &syn4),
            client_tunnel::TUNNELLED,
        ),
        row(
            bound(web_bound.clone()),
            "a SYN-ACK (SYN and ACK) is no opening -> untouched",
            client_frame(&syn_ack4),
            TC_ACT_OK,
            client_frame(&syn_ack4),
            client_tunnel::PASS_OPENED_BEFORE,
        ),
        row(
            bound(web_bound.clone()),
            "another port of the bound address -> untouched",
            client_frame(&other_port),
            TC_ACT_OK,
            client_frame(&other_port),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            bound(web_bound.clone()),
            "UDP to the bound address (a TCP binding) -> untouched",
            client_frame(&dns4),
            TC_ACT_OK,
            client_frame(&dns4),
            client_tunnel::PASS_NOT_BOUND,
        ),
        row(
            bound(vec![("192.0.2.10", PROTO_UDP, 0, "10.9.3.11", "10.9.2.1")]),
            "a UDP flow never seen, to a service bound for every port -> tunnelled",
            client_frame(&dns4),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &dns4),
            client_tunnel::TUNNELLED,
        ),
        row(
            with_flows(
                vec![("192.0.2.10", PROTO_UDP, 0, "10.9.3.11", "10.9.2.1")],
                vec![("192.0.2.10", PROTO_UDP, 53, 0)],
            ),
            "a UDP flow running before the binding (generation 0) -> untouched",
            client_frame(&dns4),
            TC_ACT_OK,
            client_frame(&dns4),
            client_tunnel::PASS_OPENED_BEFORE,
        ),
        row(
            bound(vec![("192.0.2.10", 0, 0, "10.9.3.11", "10.9.2.1")]),
            "a SYN to an address bound whole (protocol 0, every port) -> tunnelled",
            client_frame(&other_port),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &other_port),
            client_tunnel::TUNNELLED,
        ),
        row(
            bound(vec![("192.0.2.10", 0, 0, "10.9.3.11", "10.9.2.1")]),
            "ICMP to a bound address -> untouched",
            client_frame(&icmp4),
            TC_ACT_OK,
            client_frame(&icmp4),
            client_tunnel::PASS_OTHER,
        ),
        row(
            with_flows(
                vec![("2001:db8::10", PROTO_TCP, 443, "fd09:2::11", "fd09:2::1")],
                vec![("2001:db8::10", PROTO_TCP, 443, GENERATION)],
            ),
            "IPv6 TCP, an IPv6 server -> IPv6-in-IPv6 (41), redirected via fx0",
            client_frame(&web6),
            TC_ACT_REDIRECT,
            tunnelled(s6, FX0_MAC, "fd09:2::1", "fd09:2::11", &web6),
            client_tunnel::TUNNELLED,
        ),
        row(
            bound(vec![(
                "2001:db8::10",
                PROTO_TCP,
                443,
                "fd09:2::11",
                "fd09:2::1",
            )]),
            "IPv6 TCP open before the binding -> untouched",
            client_frame(&web6),
            TC_ACT_OK,
            client_frame(&web6),
            client_tunnel::PASS_OPENED_BEFORE,
        ),
        row(
            with_flows(
                vec![("2001:db8::10", PROTO_TCP, 443, "10.9.3.11", "10.9.2.1")],
                vec![("2001:db8::10", PROTO_TCP, 443, GENERATION)],
            ),
            "IPv6 TCP, an IPv4 server -> IPv6-in-IPv4 (41), redirected via fy0",
            client_frame(&web6),
            TC_ACT_REDIRECT,
            tunnelled(s4, FY0_MAC, "10.9.2.1", "10.9.3.11", &web6),
            client_tunnel::TUNNELLED,
        ),
        row(
            web_named(vec![("192.0.2.10", PROTO_TCP, 80, "10.9.2.99", "10.9.2.1")]),
            "a server without a neighbour entry -> tunnelled, redirect_neigh, MACs unchanged",
            client_frame(&web4),
            TC_ACT_REDIRECT,
            tunnelled(ROUTER_MAC, CLIENT_MAC, "10.9.2.1", "10.9.2.99", &web4),
            client_tunnel::TUNNELLED_RESOLVING,
        ),
        row(
            web_named(vec![("192.0.2.10", PROTO_TCP, 80, "10.99.0.1", "10.9.2.1")]),
            "no route to the server -> untouched, through the agent",
            client_frame(&web4),
            TC_ACT_OK,
            client_frame(&web4),
            client_tunnel::PASS_NO_ROUTE,
        ),
        row(
            bound(web_bound.clone()),
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
        web_named(web_bound.clone()),
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
            web_named(web_bound.clone()),
            format!("a bound service's packet truncated to {len} bytes -> untouched"),
            cut.clone(),
            TC_ACT_OK,
            cut,
            client_tunnel::PASS_OTHER,
        ));
    }
    fixtures::run(&mut client, &v)
}

/// A connection that opens while the binding is held is recorded at its SYN and goes
/// direct to its end; one open before stays on the agent's path; a new binding of another
/// server (another generation) moves neither.
#[test]
fn a_binding_moves_the_connections_it_saw_open_and_no_other() -> Result<()> {
    let mut client = ClientSide::new()?;
    let web_bound: Vec<Bound> = vec![("192.0.2.10", PROTO_TCP, 80, "10.9.3.11", "10.9.2.1")];
    let ack = |sport: u16| {
        let ip = client_ip(
            IpAddr::V4(CLIENT_V4),
            "192.0.2.10".parse().unwrap(),
            PROTO_TCP,
        )
        .packet(&tcp(sport, 80, TCP_PSH | TCP_ACK, PAYLOAD));
        client_frame(&ip)
    };
    let syn = |sport: u16| {
        let ip = client_ip(
            IpAddr::V4(CLIENT_V4),
            "192.0.2.10".parse().unwrap(),
            PROTO_TCP,
        )
        .packet(&tcp(sport, 80, TCP_SYN, PAYLOAD));
        client_frame(&ip)
    };
    client.set_up(&bound(web_bound.clone()))?;
    let counted = |c: &ClientSide, i: u32| -> Result<u64> { Ok(c.counters()?[i as usize]) };
    // Port 41000 was open before the binding; port 41001 opens now.
    let (action, _) = client.run(&ack(41000))?;
    assert_eq!(action, TC_ACT_OK, "open before: through the agent");
    let (action, _) = client.run(&syn(41001))?;
    assert_eq!(action, TC_ACT_REDIRECT, "its SYN goes direct");
    for _ in 0..3 {
        assert_eq!(
            client.run(&ack(41001))?.0,
            TC_ACT_REDIRECT,
            "and the rest of it"
        );
        assert_eq!(client.run(&ack(41000))?.0, TC_ACT_OK, "the older one stays");
    }
    let recorded: Vec<(FlowKey, u32)> = client.flows.iter().collect::<Result<_, _>>()?;
    assert_eq!(
        recorded.len(),
        1,
        "only the connection that opened: {recorded:?}"
    );
    assert_eq!(recorded[0].0.sport, 41001);
    assert_eq!(recorded[0].1, GENERATION);
    assert_eq!(counted(&client, client_tunnel::PASS_OPENED_BEFORE)?, 4);
    // Another server's binding replaces it (the next generation): the old direct
    // connection is not carried to that server.
    let key = ServiceKey::new("192.0.2.10".parse()?, PROTO_TCP, 80);
    let mut b = client.bindings.get(&key, 0)?;
    b.generation = GENERATION + 1;
    b.real = addr_words("10.9.2.99".parse()?).0;
    client.bindings.insert(key, b, 0)?;
    assert_eq!(client.run(&ack(41001))?.0, TC_ACT_OK);
    assert_eq!(client.run(&syn(41002))?.0, TC_ACT_REDIRECT);
    assert_eq!(client.run(&ack(41002))?.0, TC_ACT_REDIRECT);
    Ok(())
}
