//! The address filter: a bitmap of the service addresses, read before any hash lookup.
use std::{collections::BTreeSet, net::Ipv4Addr};

use anycast_common::{addr_words, maps, verdict, PROTO_TCP};
use anycast_ctl::dataplane::Dataplane;
use anyhow::Result;
use aya::maps::{Array, MapData};

use crate::harness::*;

/// The bits of `ADDRESS_FILTER` that are set.
fn filter_bits(dp: &Dataplane) -> Result<BTreeSet<(u32, u64)>> {
    let map: Array<MapData, u64> = Array::try_from(agent_map(dp, maps::ADDRESS_FILTER)?)?;
    let mut bits = BTreeSet::new();
    for i in 0..anycast_common::ADDRESS_FILTER_WORDS {
        let w = map.get(&i, 0)?;
        for b in 0..64 {
            if w & (1u64 << b) != 0 {
                bits.insert((i, 1u64 << b));
            }
        }
    }
    Ok(bits)
}

fn filter_bit(addr: &str) -> (u32, u64) {
    let (words, family) = addr_words(addr.parse().unwrap());
    anycast_common::address_filter_bit(family, &words)
}

/// `ADDRESS_FILTER` holds exactly the bits of the installed services' addresses; an address
/// whose bit is clear passes untouched, and so does one whose bit it shares with a service
/// address (the filter only says "maybe").
#[test]
fn the_address_filter_holds_the_service_addresses_and_only_says_maybe() -> Result<()> {
    let h = Harness::new()?;
    let mut dp = h.dataplane;
    let mut both = web_and_dns();
    both.extend(web6());
    dp.apply(&both)?;
    let want: BTreeSet<_> = [filter_bit("192.0.2.10"), filter_bit("2001:db8::10")].into();
    assert_eq!(filter_bits(&dp)?, want, "two service addresses");
    dp.apply(&web6())?;
    assert_eq!(
        filter_bits(&dp)?,
        [filter_bit("2001:db8::10")].into(),
        "the IPv4 address's bit cleared with its services"
    );
    dp.apply(&web_and_dns())?;
    // An address that shares the service address's bit: looked up, not a service, passed.
    let service_bit = filter_bit("192.0.2.10");
    let twin = (0u32..1 << 24)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | i).to_string())
        .find(|a| a != "192.0.2.10" && filter_bit(a) == service_bit)
        .expect("some 10/8 address shares the bit");
    let clear = (0u32..1 << 24)
        .map(|i| Ipv4Addr::from(0x0a00_0000 | i).to_string())
        .find(|a| !filter_bits(&dp).unwrap().contains(&filter_bit(a)))
        .expect("some 10/8 address has a clear bit");
    for (what, addr) in [("shares the bit", &twin), ("clear bit", &clear)] {
        let inner = ip_packet(&Flow::v4(addr, PROTO_TCP, 41001, 80));
        let input = client_frame(None, &inner);
        let before = counter(&dp, verdict::PASS_NOT_SERVICE)?;
        let (action, out) = run_xdp(&dp, h.fx0, &input)?;
        assert_eq!(
            (action, &out),
            (XDP_PASS, &input),
            "{what} ({addr}): passed untouched"
        );
        assert_eq!(counter(&dp, verdict::PASS_NOT_SERVICE)?, before + 1);
    }
    // The service address itself is still forwarded.
    let flow = Flow::v4("192.0.2.10", PROTO_TCP, 41002, 80);
    let inner = ip_packet(&flow);
    let (action, out) = run_xdp(&dp, h.fx0, &client_frame(None, &inner))?;
    assert_eq!(
        (action, out),
        (XDP_TX, tx_to("10.9.2.11", None, &flow, &inner))
    );
    Ok(())
}
