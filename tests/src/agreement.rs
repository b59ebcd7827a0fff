//! What agents that sync their bindings must agree on, read from their `bindings --json` and
//! `status --json`: the bindings (everything but ages, times left, each agent's own
//! observations and who relayed them) and the consistent-hash tables.
use std::collections::BTreeMap;

/// What both agents must agree on, per binding: everything but ages, times left, the
/// condition (each agent's own observation) and who relayed it.
pub fn agreed(bindings: &serde_json::Value) -> BTreeMap<String, String> {
    bindings["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                format!(
                    "{} {} {} {}",
                    b["anycast"], b["selector"], b["server"], b["real"]
                ),
                format!(
                    "{} seq {} weight {} load {}",
                    b["state"], b["seq"], b["weight"], b["load"]
                ),
            )
        })
        .collect()
}

pub fn has_server(bindings: &serde_json::Value, server: &str) -> bool {
    of_server(bindings, server) > 0
}

/// How many bindings `server` has.
pub fn of_server(bindings: &serde_json::Value, server: &str) -> usize {
    bindings["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["server"] == server)
        .count()
}

/// Each server of the test topologies binds both anycast addresses (IPv4, IPv6) through both
/// its real addresses.
pub const PER_SERVER: usize = 4;

/// Per service: its table digest and each server's table entries.
pub fn tables(status: &serde_json::Value) -> BTreeMap<String, String> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let entries: Vec<String> = s["servers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{}={}", x["address"], x["table_entries"]))
                .collect();
            (
                format!("{} {} {}", s["address"], s["protocol"], s["port"]),
                format!("{} {}", s["table_digest"], entries.join(",")),
            )
        })
        .collect()
}
