//! Confirmed failures shared between agents (see `crate::relay::health`): which real
//! addresses this agent holds down by its own observation, the marks its peers sent, and
//! how both go into the tables, the digest and the reports.
use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest as _, Sha256};

use super::state::Agent;
use crate::{
    model::{Condition, ServicePlan},
    registration::agent::{BindingsReport, Registry},
    relay::{HealthEntry, HeldDown, RelayReport},
};

fn entry(plan: &ServicePlan, real: std::net::IpAddr) -> HealthEntry {
    HealthEntry {
        anycast: plan.key.ip(),
        protocol: plan.key.proto,
        port: plan.key.port,
        real,
    }
}

/// Every real address of a service that is down (confirmed, not suspect) in `plans`.
pub(super) fn down_in(plans: &[ServicePlan]) -> BTreeSet<HealthEntry> {
    plans
        .iter()
        .flat_map(|p| {
            p.candidates
                .iter()
                .filter(|c| c.condition == Condition::Down)
                .map(|c| entry(p, c.address))
        })
        .collect()
}

/// The digest the agents compare: the binding table's inputs and, when some real address
/// of a binding is down (here or by a peer's mark), those addresses in order. Every agent
/// drops the union of what all of them hold down, so once the health envelopes have
/// arrived the digests agree; an agent that still differs is out of sync in its tables.
pub(super) fn table_inputs_digest(
    registry: &Registry,
    down: &BTreeSet<HealthEntry>,
) -> (u32, [u8; 32]) {
    with_health(registry.inputs_digest(), down)
}

/// The bindings' digest, extended by the real addresses of bindings down in the tables.
fn with_health((n, bindings): (u32, [u8; 32]), down: &BTreeSet<HealthEntry>) -> (u32, [u8; 32]) {
    if down.is_empty() {
        return (n, bindings);
    }
    let mut h = Sha256::new();
    h.update(bindings);
    for e in down {
        h.update(e.bytes());
    }
    (n, h.finalize().into())
}

impl Agent {
    /// Marks the candidates some peer holds down as down: dropped from the tables exactly
    /// as a local down is.
    pub(super) fn apply_peer_marks(&self, plans: &mut [ServicePlan]) {
        let Some(relay) = &self.relay else { return };
        let marks = relay.peer_marks();
        if marks.is_empty() {
            return;
        }
        for p in plans.iter_mut() {
            let (ip, proto, port) = (p.key.ip(), p.key.proto, p.key.port);
            for c in &mut p.candidates {
                let e = HealthEntry {
                    anycast: ip,
                    protocol: proto,
                    port,
                    real: c.address,
                };
                if marks.contains_key(&e) {
                    c.condition = Condition::Down;
                }
            }
        }
    }

    /// After the tables are rebuilt: remembers what is down here and for the digest, and
    /// tells the peers when our own list changed.
    pub(super) fn share_health(&mut self, own: BTreeSet<HealthEntry>, all: &[ServicePlan]) {
        self.down_inputs = match &self.registry {
            Some(r) => down_in(all)
                .into_iter()
                .filter(|e| r.binds(e.anycast, e.real))
                .collect(),
            None => BTreeSet::new(),
        };
        let out = match self.relay.as_mut() {
            Some(relay) => relay.announce_health(&own, anycast_common::wire::ntp_now()),
            None => Vec::new(),
        };
        self.own_down = own;
        self.send_relay(out);
    }

    /// The server of each real address of each service here (bindings and configured
    /// servers): what a peer may mark down.
    pub(super) fn known_real_addresses(&self) -> BTreeMap<HealthEntry, String> {
        self.service_plans()
            .iter()
            .flat_map(|p| {
                p.candidates
                    .iter()
                    .map(move |c| (entry(p, c.address), c.name.clone()))
            })
            .collect()
    }

    /// Who holds each real address down: "local" and/or "peer ID".
    fn holders(&self) -> BTreeMap<HealthEntry, Vec<String>> {
        let mut out: BTreeMap<HealthEntry, Vec<String>> = self
            .own_down
            .iter()
            .map(|e| (*e, vec!["local".to_string()]))
            .collect();
        if let Some(relay) = &self.relay {
            for (e, peers) in relay.peer_marks() {
                out.entry(e)
                    .or_default()
                    .extend(peers.into_iter().map(|p| format!("peer {p}")));
            }
        }
        out
    }

    /// The relay's report with the real addresses held down and by whom, and the flow pins'
    /// counters.
    pub(super) fn relay_report(&self, now: std::time::Instant) -> Option<RelayReport> {
        let (relay, registry) = (self.relay.as_ref()?, self.registry.as_ref()?);
        let mut report = relay.report(table_inputs_digest(registry, &self.down_inputs), now);
        let known = self.known_real_addresses();
        report.held_down = self
            .holders()
            .into_iter()
            .map(|(entry, down_by)| HeldDown {
                server: known.get(&entry).cloned(),
                entry,
                down_by,
            })
            .collect();
        // The flow pins' counters live on the sweeper's thread.
        if let Some(p) = &self.pins {
            report.counters.extend(p.handle.counters());
        }
        Some(report)
    }

    /// Each binding's `down_by`: who holds its real address down for a service it serves.
    pub(super) fn fill_down_by(&self, report: &mut BindingsReport) {
        let holders = self.holders();
        if holders.is_empty() {
            return;
        }
        for b in &mut report.bindings {
            let mut by: BTreeSet<String> = BTreeSet::new();
            for (e, who) in &holders {
                let serves = e.anycast == b.id.anycast
                    && e.real == b.id.real
                    && b.id
                        .selector
                        .is_none_or(|(proto, port)| proto == e.protocol && port == e.port);
                if serves {
                    by.extend(who.iter().cloned());
                }
            }
            b.down_by = by.into_iter().collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use anycast_common::maps::ServiceKey;

    use super::*;
    use crate::model::Candidate;

    fn e(real: &str) -> HealthEntry {
        HealthEntry {
            anycast: "10.0.100.1".parse().unwrap(),
            protocol: 6,
            port: 80,
            real: real.parse().unwrap(),
        }
    }

    #[test]
    fn only_confirmed_downs_are_shared_and_the_digest_follows_them_not_their_order() {
        let candidate = |real: &str, condition| Candidate {
            name: "s".into(),
            address: real.parse().unwrap(),
            weight: 1,
            priority: 0,
            condition,
            draining: false,
        };
        let plan = ServicePlan {
            name: "web".into(),
            key: ServiceKey::new("10.0.100.1".parse().unwrap(), 6, 80),
            candidates: vec![
                candidate("10.0.2.11", Condition::Down),
                candidate("10.0.2.12", Condition::Suspect),
                candidate("10.0.2.13", Condition::Up),
            ],
            preferences: Vec::new(),
        };
        assert_eq!(down_in(&[plan]), BTreeSet::from([e("10.0.2.11")]));
        let base = (3, [7; 32]);
        assert_eq!(
            with_health(base, &BTreeSet::new()),
            base,
            "nothing down: as before"
        );
        let one = with_health(base, &BTreeSet::from([e("10.0.2.11")]));
        assert_ne!(one, base);
        assert_eq!(one.0, 3);
        let two = with_health(base, &BTreeSet::from([e("10.0.2.12"), e("10.0.2.11")]));
        assert_eq!(
            two,
            with_health(base, &BTreeSet::from([e("10.0.2.11"), e("10.0.2.12")]))
        );
        assert_ne!(two, one);
    }
}
