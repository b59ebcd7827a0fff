//! What the owner publishes once a second, and how it becomes metric families.
//!
//! Label values come from the configuration and the registration policy (service, server
//! and identity names, check methods, fixed reason names, the configured BGP neighbours and
//! the anycast prefixes), never from a client: no label set grows with traffic.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        MetricType::{self, Counter, Gauge},
    },
    registry::Unit,
};

use crate::{control_socket::Status, model::Condition, registration::agent::BindingState};

/// The owner's view, as of `taken`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    /// `status` as the control socket answers it (`None` until the first publish, or when
    /// reading the maps failed).
    pub status: Option<Status>,
    /// Entries the flow table holds at most (`max_flows`).
    pub flow_capacity: u64,
    /// Bindings by state and condition (registration on).
    pub bindings: BTreeMap<(BindingState, Condition), u64>,
    /// The registration counters, by their `anycast-ctl bindings` names.
    pub registration: BTreeMap<String, u64>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            taken: Instant::now(),
            status: None,
            flow_capacity: 0,
            bindings: BTreeMap::new(),
            registration: BTreeMap::new(),
        }
    }
}

impl super::super::state::Agent {
    /// The snapshot the metrics endpoint serves until the next one.
    pub(in crate::agent) fn metrics_snapshot(&self) -> Snapshot {
        let status = match self.status() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("metrics: reading the data path's counters: {e:#}");
                None
            }
        };
        Snapshot {
            taken: Instant::now(),
            status,
            flow_capacity: self.config.max_flows as u64,
            bindings: self
                .registry
                .as_ref()
                .map(|r| r.binding_counts())
                .unwrap_or_default(),
            registration: self
                .registry
                .as_ref()
                .map(|r| r.counters().clone())
                .unwrap_or_default(),
        }
    }
}

/// A registration counter's place among the metrics.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RegistrationCounter {
    /// `anycast_registration_messages_total{message, via, result, reason}`.
    Message {
        message: &'static str,
        via: &'static str,
        result: &'static str,
        reason: String,
    },
    /// `anycast_binding_transitions_total{via, reason}`: a binding came, went or changed.
    Transition { via: &'static str, reason: String },
    /// `anycast_registration_events_total{event}`: everything else (probes, replies).
    Event(String),
}

/// Sorts a registration counter name (`refused_146`, `relayed_registered`, ...).
pub(crate) fn classify(name: &str) -> RegistrationCounter {
    let (via, rest) = match name.strip_prefix("relayed_") {
        Some(r) => ("relayed", r),
        None => ("direct", name),
    };
    let (message, rest) = match rest.strip_prefix("discovery_") {
        Some(r) => ("discovery_request", r),
        None => ("binding_update", rest),
    };
    let msg = |result, reason: &str| RegistrationCounter::Message {
        message,
        via,
        result,
        reason: reason.to_string(),
    };
    match rest {
        "registered" | "refreshed" | "deregistered" if message == "binding_update" => {
            msg("accepted", rest)
        }
        "answered" if message == "discovery_request" => msg("accepted", rest),
        _ => {
            if let Some(r) = rest.strip_prefix("refused_") {
                return msg("refused", &status_name(r));
            }
            if let Some(r) = rest.strip_prefix("dropped_") {
                return msg("dropped", r);
            }
            match rest {
                "expired" | "reverse_suspected" | "reverse_silent" => {
                    RegistrationCounter::Transition {
                        via,
                        reason: rest.to_string(),
                    }
                }
                _ => RegistrationCounter::Event(name.to_string()),
            }
        }
    }
}

/// A refusal's status code (RFC 6275 section 6.1.8, RFC 4285) by name.
fn status_name(code: &str) -> String {
    use anycast_common::wire::status;
    let Ok(n) = code.parse::<u8>() else {
        return code.to_string();
    };
    match n {
        status::PROHIBITED => "prohibited".into(),
        status::INSUFFICIENT_RESOURCES => "insufficient_resources".into(),
        status::SEQUENCE_OUT_OF_WINDOW => "sequence_out_of_window".into(),
        status::ID_MISMATCH => "id_mismatch".into(),
        status::MESG_ID_REQUIRED => "mesg_id_required".into(),
        status::AUTH_FAILED => "auth_failed".into(),
        status::INVALID_COA => "invalid_care_of_address".into(),
        n => format!("status_{n}"),
    }
}

fn binding_state(s: BindingState) -> &'static str {
    match s {
        BindingState::Active => "active",
        BindingState::Draining => "draining",
    }
}

/// Encodes the latest snapshot on each scrape.
#[derive(Debug)]
pub(super) struct Collect(pub(super) Arc<Mutex<Arc<Snapshot>>>);

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor, then each label set's value.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (labels, v) in rows {
        let e = m.encode_family(labels)?;
        // Whole numbers (every count) are written as integers.
        let whole = v.fract() == 0.0 && v.abs() < (1u64 << 53) as f64;
        match (kind, whole) {
            (Counter, true) => ConstCounter::new(*v as u64).encode(e)?,
            (Counter, false) => ConstCounter::new(*v).encode(e)?,
            (_, true) => ConstGauge::new(*v as i64).encode(e)?,
            (_, false) => ConstGauge::new(*v).encode(e)?,
        }
    }
    Ok(())
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let e = &mut encoder;
        family(
            e,
            "metrics_snapshot_age",
            "Age of the agent's state these metrics show (published once a second)",
            Some(Unit::Seconds),
            Gauge,
            &[(vec![], snap.taken.elapsed().as_secs_f64())],
        )?;
        let Some(status) = &snap.status else {
            return Ok(());
        };
        let dp = &status.dataplane;
        let mut verdicts = Vec::new();
        let mut lookups = Vec::new();
        for (name, v) in &dp.verdicts {
            match name.strip_prefix("flow_") {
                Some(result) => lookups.push((l(&[("result", result)]), *v as f64)),
                None => verdicts.push((l(&[("reason", name)]), *v as f64)),
            }
        }
        family(
            e,
            "verdicts",
            "Packets the data path decided on, by verdict (see README, Data path)",
            None,
            Counter,
            &verdicts,
        )?;
        family(
            e,
            "flow_lookups",
            "Flow-table lookups of service packets: hit, miss, and expired (part of miss)",
            None,
            Counter,
            &lookups,
        )?;

        // Per service and per server traffic.
        let mut info = Vec::new();
        let (mut sp, mut sb, mut ss, mut sf) = (vec![], vec![], vec![], vec![]);
        let (mut vp, mut vb, mut vs, mut vf) = (vec![], vec![], vec![], vec![]);
        let (mut weight, mut up, mut entries) = (vec![], vec![], vec![]);
        for svc in &dp.services {
            let s = l(&[("service", &svc.name)]);
            let mut port = String::new();
            let _ = write!(port, "{}", svc.port);
            info.push((
                l(&[
                    ("service", &svc.name),
                    ("address", &svc.address.to_string()),
                    ("protocol", &svc.protocol),
                    ("port", &port),
                ]),
                1.0,
            ));
            sp.push((s.clone(), svc.packets as f64));
            sb.push((s.clone(), svc.bytes as f64));
            ss.push((s.clone(), svc.syns as f64));
            sf.push((s, svc.flows as f64));
            for srv in &svc.servers {
                let x = l(&[("service", &svc.name), ("server", &srv.name)]);
                vp.push((x.clone(), srv.packets as f64));
                vb.push((x.clone(), srv.bytes as f64));
                vs.push((x.clone(), srv.syns as f64));
                vf.push((x.clone(), srv.flows as f64));
                weight.push((x.clone(), srv.weight as f64));
                up.push((x.clone(), (srv.state == "up") as u8 as f64));
                entries.push((x, srv.table_entries as f64));
            }
        }
        family(
            e,
            "service_info",
            "A service's anycast address, protocol and port (0: every port); value 1",
            None,
            Gauge,
            &info,
        )?;
        family(
            e,
            "service_packets",
            "Packets forwarded for a service",
            None,
            Counter,
            &sp,
        )?;
        family(
            e,
            "service",
            "Bytes forwarded for a service (client frames, before encapsulation)",
            Some(Unit::Bytes),
            Counter,
            &sb,
        )?;
        family(
            e,
            "service_syns",
            "TCP SYNs (without ACK) forwarded for a service",
            None,
            Counter,
            &ss,
        )?;
        family(
            e,
            "service_new_flows",
            "New flows of a service (flow-table misses given a server)",
            None,
            Counter,
            &sf,
        )?;
        family(
            e,
            "server_packets",
            "Packets forwarded to a server of a service",
            None,
            Counter,
            &vp,
        )?;
        family(
            e,
            "server",
            "Bytes forwarded to a server of a service (client frames, before encapsulation)",
            Some(Unit::Bytes),
            Counter,
            &vb,
        )?;
        family(
            e,
            "server_syns",
            "TCP SYNs (without ACK) forwarded to a server of a service",
            None,
            Counter,
            &vs,
        )?;
        family(
            e,
            "server_new_flows",
            "New flows given to a server of a service",
            None,
            Counter,
            &vf,
        )?;
        family(
            e,
            "server_weight",
            "A server's published weight (0: no new flows)",
            None,
            Gauge,
            &weight,
        )?;
        family(
            e,
            "server_up",
            "1 while a server's slot is up in the data path, 0 while down",
            None,
            Gauge,
            &up,
        )?;
        family(
            e,
            "server_table_entries",
            "Entries of the service's live consistent-hash table that name the server",
            None,
            Gauge,
            &entries,
        )?;

        // The flow table and its sweeper.
        let ft = &dp.flow_table;
        family(
            e,
            "flow_table_entries",
            "Flow-table entries at the last sweep",
            None,
            Gauge,
            &[(vec![], ft.entries as f64)],
        )?;
        family(
            e,
            "flow_table_capacity",
            "Entries the flow table holds at most (max_flows)",
            None,
            Gauge,
            &[(vec![], snap.flow_capacity as f64)],
        )?;
        family(
            e,
            "flow_sweeps",
            "Sweeps of the flow table",
            None,
            Counter,
            &[(vec![], ft.sweeps as f64)],
        )?;
        family(
            e,
            "flows_swept",
            "Expired flow-table entries the sweeper deleted",
            None,
            Counter,
            &[(vec![], ft.swept as f64)],
        )?;
        family(
            e,
            "flow_sweep_last_duration",
            "How long the last sweep took",
            Some(Unit::Seconds),
            Gauge,
            &[(vec![], ft.last_sweep_ms / 1e3)],
        )?;

        // Bindings and registration.
        let mut bindings = Vec::new();
        for state in [BindingState::Active, BindingState::Draining] {
            for cond in [Condition::Up, Condition::Suspect, Condition::Down] {
                let n = snap.bindings.get(&(state, cond)).copied().unwrap_or(0);
                bindings.push((
                    l(&[
                        ("state", binding_state(state)),
                        ("condition", &cond.to_string()),
                    ]),
                    n as f64,
                ));
            }
        }
        family(
            e,
            "bindings",
            "Servers' bindings, by state and condition",
            None,
            Gauge,
            &bindings,
        )?;
        let (mut messages, mut transitions, mut events) = (vec![], vec![], vec![]);
        for (name, v) in &snap.registration {
            let v = *v as f64;
            match classify(name) {
                RegistrationCounter::Message {
                    message,
                    via,
                    result,
                    reason,
                } => messages.push((
                    l(&[
                        ("message", message),
                        ("via", via),
                        ("result", result),
                        ("reason", &reason),
                    ]),
                    v,
                )),
                RegistrationCounter::Transition { via, reason } => {
                    transitions.push((l(&[("via", via), ("reason", &reason)]), v))
                }
                RegistrationCounter::Event(event) => events.push((l(&[("event", &event)]), v)),
            }
        }
        // Bindings that came and went are also transitions.
        for (name, v) in &snap.registration {
            let (via, rest) = match name.strip_prefix("relayed_") {
                Some(r) => ("relayed", r),
                None => ("direct", name.as_str()),
            };
            if rest == "registered" || rest == "deregistered" {
                transitions.push((l(&[("via", via), ("reason", rest)]), *v as f64));
            }
        }
        family(e, "registration_messages", "Registration messages handled, by message, path (direct or relayed by a peer agent), result and reason", None, Counter, &messages)?;
        family(e, "binding_transitions", "Bindings registered, deregistered (draining), expired or suspected by the reverse-tunnel monitor", None, Counter, &transitions)?;
        family(e, "registration_events", "Other registration counters (refresh requests and probes sent, probes missed, replies dropped), by name", None, Counter, &events)?;

        // Health checks.
        let mut targets: BTreeMap<(String, String), u64> = BTreeMap::new();
        for h in &status.health {
            *targets
                .entry((h.check.clone(), h.health.to_string()))
                .or_default() += 1;
        }
        let targets: Vec<_> = targets
            .into_iter()
            .map(|((m, s), n)| (l(&[("method", &m), ("state", &s)]), n as f64))
            .collect();
        family(
            e,
            "health_targets",
            "Checked real addresses, by method and state",
            None,
            Gauge,
            &targets,
        )?;
        family(
            e,
            "servers_drained",
            "Servers the operator drained",
            None,
            Gauge,
            &[(vec![], status.drained.len() as f64)],
        )?;

        // BGP and BFD (with `routing`).
        if let Some(r) = &status.routing {
            let connected = r.bird.starts_with("connected");
            family(
                e,
                "bird_connected",
                "1 while the agent reaches its BIRD's control socket",
                None,
                Gauge,
                &[(vec![], connected as u8 as f64)],
            )?;
            let prefixes: Vec<_> = r
                .prefixes
                .iter()
                .map(|p| {
                    (
                        l(&[("prefix", &p.prefix)]),
                        (p.state == "announced") as u8 as f64,
                    )
                })
                .collect();
            family(
                e,
                "bgp_prefix_announced",
                "1 while the agent has BIRD announce an anycast prefix",
                None,
                Gauge,
                &prefixes,
            )?;
            let sessions: Vec<_> = r
                .protocols
                .iter()
                .filter(|p| p.proto.eq_ignore_ascii_case("bgp"))
                .map(|p| {
                    let neighbor = p.neighbor.map(|a| a.to_string()).unwrap_or_default();
                    (
                        l(&[("protocol", &p.name), ("neighbor", &neighbor)]),
                        p.info.starts_with("Established") as u8 as f64,
                    )
                })
                .collect();
            family(
                e,
                "bgp_session_established",
                "1 while a BGP session is established (as BIRD reports it)",
                None,
                Gauge,
                &sessions,
            )?;
            let bfd: Vec<_> = r
                .bfd_sessions
                .iter()
                .map(|s| {
                    (
                        l(&[("address", &s.address), ("interface", &s.interface)]),
                        s.state.eq_ignore_ascii_case("up") as u8 as f64,
                    )
                })
                .collect();
            family(
                e,
                "bfd_session_up",
                "1 while a BFD session is up (as BIRD reports it)",
                None,
                Gauge,
                &bfd,
            )?;
        }
        Ok(())
    }
}
