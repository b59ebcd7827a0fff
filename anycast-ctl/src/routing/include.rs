//! The file the agent writes for BIRD (`routing.bird_include`). Deterministic: the same
//! wants give the same bytes, so an unchanged file is neither rewritten nor reloaded.
use std::{fmt::Write as _, net::IpAddr};

use super::Desired;
use crate::config::Routing;

/// Names of what the file defines; status and tests find the protocols by them.
pub const BFD_PROTOCOL: &str = "anycast_bfd";
pub const STATIC_V4: &str = "anycast_live4";
pub const STATIC_V6: &str = "anycast_live6";

/// The BGP protocol of `routing.neighbors[i]`.
pub fn bgp_protocol(i: usize) -> String {
    format!("anycast_bgp{i}")
}

/// The include text: `announce` lists the addresses whose static routes it holds (each
/// family's static protocol is there, empty or not, so BIRD keeps one protocol per family
/// across changes).
pub fn render(r: &Routing, desired: &Desired, announce: &[IpAddr]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by anycast-ctl agent from its `routing` configuration; rewritten on every \
         change.\n# Include it from bird.conf, e.g. include \"{}/*.conf\";\n",
        r.bird_include
            .parent()
            .map_or(String::new(), |p| p.display().to_string())
    );
    for (v4, set) in [(true, "ANYCAST_V4"), (false, "ANYCAST_V6")] {
        let mut members: Vec<String> = desired
            .exportable
            .iter()
            .filter(|p| p.addr.is_ipv4() == v4)
            .map(|p| {
                let host = if v4 { 32 } else { 128 };
                // A registration prefix lets through every address inside it.
                if p.len == host {
                    p.to_string()
                } else {
                    format!("{p}+")
                }
            })
            .collect();
        members.sort();
        members.dedup();
        if !members.is_empty() {
            let _ = writeln!(out, "define {set} = [ {} ];", members.join(", "));
        }
    }
    let _ = writeln!(
        out,
        "\n# BFD on every session: a silent agent is withdrawn in interval x multiplier.\n\
         protocol bfd {BFD_PROTOCOL} {{\n  interface \"*\" {{ min rx interval {i} ms; min tx \
         interval {i} ms; multiplier {m}; }};\n}}",
        i = r.bfd.interval_ms,
        m = r.bfd.multiplier
    );
    let _ = writeln!(
        out,
        "\n# The announced addresses, through the liveness device: they go with the agent."
    );
    for (v4, name, channel) in [(true, STATIC_V4, "ipv4"), (false, STATIC_V6, "ipv6")] {
        let _ = writeln!(out, "protocol static {name} {{\n  {channel};");
        let mut routes: Vec<IpAddr> = announce
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == v4)
            .collect();
        routes.sort();
        routes.dedup();
        for a in routes {
            let len = if v4 { 32 } else { 128 };
            let _ = writeln!(out, "  route {a}/{len} via \"{}\";", r.liveness_device);
        }
        let _ = writeln!(out, "}}");
    }
    for (i, n) in r.neighbors.iter().enumerate() {
        let v4 = n.address.is_ipv4();
        let (channel, set) = if v4 {
            ("ipv4", "ANYCAST_V4")
        } else {
            ("ipv6", "ANYCAST_V6")
        };
        let any = desired.exportable.iter().any(|p| p.addr.is_ipv4() == v4);
        let export = if any {
            format!("export where net ~ {set};")
        } else {
            "export none;".to_string()
        };
        // Identical attributes on every agent (same AS, same origin) let routers merge the
        // agents' routes into one multipath route; graceful restart off, or a router keeps
        // a dead agent's route for the restart time; short error waits, or a session that
        // BFD took down stays down for minutes.
        let _ = writeln!(
            out,
            "\nprotocol bgp {} {{\n  local as {};\n  neighbor {} as {};\n  bfd on;\n  \
             graceful restart off;\n  error wait time 5, 30;\n  {channel} {{ import none; \
             {export} }};\n}}",
            bgp_protocol(i),
            r.local_as,
            n.address,
            n.asn
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::PrefixWant;

    fn routing() -> Routing {
        serde_json::from_str(
            r#"{ "local_as": 65001, "neighbors": [ { "address": "10.73.11.1", "as": 65000 },
                 { "address": "fd73:11::1", "as": 65000 } ] }"#,
        )
        .unwrap()
    }

    #[test]
    fn announces_only_what_it_is_told_and_exports_only_anycast_prefixes() {
        let r = routing();
        let desired = Desired {
            exportable: vec![
                "10.73.100.1".parse().unwrap(),
                "10.73.100.1".parse().unwrap(),
                "fd73:100::/64".parse().unwrap(),
            ],
            prefixes: vec![PrefixWant {
                address: "10.73.100.1".parse().unwrap(),
                announce: true,
                why: String::new(),
            }],
        };
        let text = render(&r, &desired, &["10.73.100.1".parse().unwrap()]);
        assert!(
            text.contains("define ANYCAST_V4 = [ 10.73.100.1/32 ];"),
            "{text}"
        );
        assert!(
            text.contains("define ANYCAST_V6 = [ fd73:100::/64+ ];"),
            "{text}"
        );
        assert!(
            text.contains("route 10.73.100.1/32 via \"aclive0\";"),
            "{text}"
        );
        assert_eq!(text.matches("route ").count(), 1, "{text}");
        assert!(text.contains("min rx interval 100 ms; min tx interval 100 ms; multiplier 3;"));
        for needle in [
            "protocol bgp anycast_bgp0 {\n  local as 65001;\n  neighbor 10.73.11.1 as 65000;",
            "ipv4 { import none; export where net ~ ANYCAST_V4; }",
            "neighbor fd73:11::1 as 65000;",
            "ipv6 { import none; export where net ~ ANYCAST_V6; }",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        assert_eq!(text.matches("graceful restart off;").count(), 2);
        assert_eq!(text.matches("error wait time 5, 30;").count(), 2);
        assert_eq!(text.matches("bfd on;").count(), 2);
        // Withdrawn: the static protocols stay, empty.
        let none = render(&r, &desired, &[]);
        assert!(!none.contains("route "), "{none}");
        assert!(none.contains("protocol static anycast_live4 {\n  ipv4;\n}"));
        assert_eq!(render(&r, &desired, &[]), none, "deterministic");
    }

    #[test]
    fn a_family_without_anycast_addresses_exports_nothing() {
        let r = routing();
        let desired = Desired {
            exportable: vec!["10.73.100.1".parse().unwrap()],
            prefixes: Vec::new(),
        };
        let text = render(&r, &desired, &[]);
        assert!(!text.contains("ANYCAST_V6 ="), "{text}");
        assert!(
            text.contains("ipv6 { import none; export none; }"),
            "{text}"
        );
    }
}
