//! The Prometheus endpoint (`metrics.listen`): `/metrics` in the Prometheus text format.
//!
//! Two sources, neither of which makes the owner wait:
//! - a [`Snapshot`] the owner publishes once a second (`Publisher`): the data path's counters
//!   as `status` reads them, the sweeper's account, bindings, registration counters, health
//!   states, routing; swapped in behind a mutex held only for the swap and the clone of an
//!   `Arc`;
//! - live metrics ([`Live`]: atomics) the owner and the health checker update where things
//!   happen: check results and latencies, table build and publish times.
//!
//! The endpoint runs on a thread of its own with its own runtime (`http.rs`), so a slow or
//! hostile scraper never takes the owner's thread, and an owner busy with a flood of
//! binding updates never delays an answer (the snapshot is then up to a few seconds old:
//! `anycast_metrics_snapshot_age_seconds` says how old).
mod http;
mod snapshot;
#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

pub(super) use self::http::spawn;
pub use self::snapshot::Snapshot;

/// The health method label of refresh-request probes.
const PROBE_METHOD: &str = "refresh_request";

/// Misses observed one by one into the histogram (more are only counted).
const MAX_OBSERVED_MISSES: u64 = 4096;

/// How often the owner publishes a new snapshot.
pub(super) const PUBLISH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CheckResultLabels {
    pub method: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HealthTransitionLabels {
    pub method: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: String,
}

/// Latency buckets of health checks: 0.5 ms to 5 s (timeouts are 10 ms to a minute).
const CHECK_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Table build and publish times: 50 us to 2.5 s (a million-entry table takes about 0.1 s).
const TABLE_BUCKETS: [f64; 11] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0, 2.5,
];

/// Metrics updated where their events happen (all atomics: cheap, never waiting).
#[derive(Clone, Debug)]
pub struct Live {
    health_checks: Family<CheckResultLabels, Counter>,
    health_check_seconds: Family<MethodLabels, Histogram>,
    health_transitions: Family<HealthTransitionLabels, Counter>,
    table_build_seconds: Histogram,
    table_publish_seconds: Histogram,
    /// Connections and requests the endpoint refused or cut, by reason.
    pub(crate) refused: Family<ReasonLabels, Counter>,
    pub(crate) scrapes: Counter,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            health_checks: Family::default(),
            health_check_seconds: Family::new_with_constructor(|| {
                Histogram::new(CHECK_BUCKETS.iter().copied())
            }),
            health_transitions: Family::default(),
            table_build_seconds: Histogram::new(TABLE_BUCKETS.iter().copied()),
            table_publish_seconds: Histogram::new(TABLE_BUCKETS.iter().copied()),
            refused: Family::default(),
            scrapes: Counter::default(),
        }
    }
}

impl Live {
    /// A health check's result: `method` (`icmp`, `tcp`, `http`, `command`), whether it
    /// passed, how long it took.
    pub fn check_done(&self, method: &str, ok: bool, took: Duration) {
        self.health_checks
            .get_or_create(&CheckResultLabels {
                method: method.into(),
                result: if ok { "success" } else { "failure" }.into(),
            })
            .inc();
        self.health_check_seconds
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Refresh-request probes (`registration.probe`) answered and missed: method
    /// `refresh_request`, a miss counted with the probes' timeout as its duration.
    pub fn probes_done(
        &self,
        outcomes: &crate::registration::agent::ProbeOutcomes,
        timeout: Duration,
    ) {
        for rtt in &outcomes.round_trips {
            self.check_done(PROBE_METHOD, true, *rtt);
        }
        self.health_checks
            .get_or_create(&CheckResultLabels {
                method: PROBE_METHOD.into(),
                result: "success".into(),
            })
            .inc_by(outcomes.answered_unkept);
        for _ in 0..outcomes.missed.min(MAX_OBSERVED_MISSES) {
            self.check_done(PROBE_METHOD, false, timeout);
        }
        if outcomes.missed > MAX_OBSERVED_MISSES {
            self.health_checks
                .get_or_create(&CheckResultLabels {
                    method: PROBE_METHOD.into(),
                    result: "failure".into(),
                })
                .inc_by(outcomes.missed - MAX_OBSERVED_MISSES);
        }
    }

    /// A target's health changed to `to` (`up`, `suspect`, `down`).
    pub fn health_transition(&self, method: &str, to: &str) {
        self.health_transitions
            .get_or_create(&HealthTransitionLabels {
                method: method.into(),
                to: to.into(),
            })
            .inc();
    }

    /// Building the forwarding plans (selection, tables' inputs) took `took`.
    pub fn table_built(&self, took: Duration) {
        self.table_build_seconds.observe(took.as_secs_f64());
    }

    /// Writing the tables and services into the maps took `took`.
    pub fn table_published(&self, took: Duration) {
        self.table_publish_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

/// The owner's end: publishes snapshots for the endpoint.
pub struct Publisher {
    pub live: Live,
    latest: Arc<Mutex<Arc<Snapshot>>>,
    last: Option<Instant>,
}

impl Publisher {
    /// Whether a snapshot is due (one a second).
    pub(super) fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.duration_since(t) >= PUBLISH_EVERY)
    }

    pub(super) fn publish(&mut self, snapshot: Snapshot) {
        self.last = Some(snapshot.taken);
        let snapshot = Arc::new(snapshot);
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}

/// The registry the endpoint encodes: the live metrics and a collector of the latest
/// snapshot. Returns the owner's end beside it.
pub fn registry() -> (Registry, Publisher) {
    let live = Live::default();
    let latest = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
    let mut r = Registry::with_prefix("anycast");
    r.register(
        "health_checks",
        "Health checks done, by method and result",
        live.health_checks.clone(),
    );
    r.register_with_unit(
        "health_check_duration",
        "How long health checks took, by method (a timed-out check counts its timeout)",
        Unit::Seconds,
        live.health_check_seconds.clone(),
    );
    r.register(
        "health_transitions",
        "Health changes of checked real addresses, by method and new state",
        live.health_transitions.clone(),
    );
    r.register_with_unit(
        "table_build_duration",
        "Time to compute the forwarding plans (servers, weights, preferences) of a rebuild",
        Unit::Seconds,
        live.table_build_seconds.clone(),
    );
    r.register_with_unit(
        "table_publish_duration",
        "Time to write a rebuild's tables and services into the data path's maps",
        Unit::Seconds,
        live.table_publish_seconds.clone(),
    );
    r.register(
        "metrics_refused",
        "Connections to the metrics endpoint refused or cut, by reason",
        live.refused.clone(),
    );
    r.register(
        "metrics_scrapes",
        "Requests for /metrics answered",
        live.scrapes.clone(),
    );
    r.register_collector(Box::new(snapshot::Collect(latest.clone())));
    (
        r,
        Publisher {
            live,
            latest,
            last: None,
        },
    )
}
