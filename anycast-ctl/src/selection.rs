//! How servers share a service's new flows: weights from capacity and reported load, standby
//! tiers by priority, and health. The data path only sees the result: a weight per server
//! (its share of the consistent-hash table) and whether it is up (may keep its flows).
//!
//! The formula, per server:
//! - capacity `C` = reported max capacity, else max sessions, else (nothing reported, or a
//!   static server) its configured weight with no load;
//! - load `L` = reported used capacity (or sessions in use), smoothed (see [`Smoother`]);
//! - weight = max(C - L, 0), scaled to at most [`MAX_WEIGHT`] — the free capacity.
//!
//! Only the lowest priority value among servers that can take new flows gets them
//! (0 = primary; 1, 2, ... = standby tiers used only when every better tier is gone).
//! A server that is down (health) loses its flows; one that is drained or deregistering
//! keeps its open flows but gets no new ones. A suspect server (one failed check) keeps
//! its share until the failure is confirmed: on a busy machine a single late answer is
//! common, and taking every such server out of the table at once could leave none.
use anycast_common::wire::LoadInfo;

use crate::model::{Candidate, Condition, DesiredServer, DesiredService, ServicePlan};

pub const MAX_WEIGHT: u32 = 1_000_000;

impl ServicePlan {
    /// What the data path gets for this service: its servers after selection.
    pub fn select(&self) -> DesiredService {
        DesiredService {
            name: self.name.clone(),
            key: self.key,
            servers: choose(&self.candidates),
            preferences: self.preferences.clone(),
        }
    }
}

/// The servers as the data path gets them.
pub fn choose(candidates: &[Candidate]) -> Vec<DesiredServer> {
    let takes_new = |c: &Candidate| c.condition != Condition::Down && !c.draining && c.weight > 0;
    let tier = candidates
        .iter()
        .filter(|c| takes_new(c))
        .map(|c| c.priority)
        .min();
    candidates
        .iter()
        .map(|c| DesiredServer {
            name: c.name.clone(),
            address: c.address,
            weight: if takes_new(c) && Some(c.priority) == tier {
                c.weight
            } else {
                0
            },
            up: c.condition != Condition::Down,
        })
        .collect()
}

/// Capacity and free capacity from a load report, in the report's own units.
pub fn free_capacity(load: &LoadInfo, smoothed_used: f64) -> Option<u32> {
    let capacity = if load.max_capacity > 0 {
        load.max_capacity
    } else if load.max_sessions > 0 {
        load.max_sessions
    } else {
        return None;
    };
    let free = (capacity as f64 - smoothed_used).max(0.0);
    Some(free.round().min(MAX_WEIGHT as f64) as u32)
}

/// The used amount a load report says (capacity units if a capacity is given, else sessions).
pub fn used(load: &LoadInfo) -> f64 {
    if load.max_capacity > 0 {
        load.used_capacity as f64
    } else {
        load.sessions_in_use as f64
    }
}

/// Smooths load reports and holds the published weight until it moves by enough to matter,
/// so that shares move smoothly and a noisy report does not rebuild the table every time.
#[derive(Debug, Clone, PartialEq)]
pub struct Smoother {
    used: Option<f64>,
    published: u32,
}

/// Weight of the newest report in the running average.
const ALPHA: f64 = 0.3;
/// Relative change of the weight below which the published weight stays.
const HYSTERESIS: f64 = 0.10;
/// Weight of a server that reports no capacity.
pub const DEFAULT_WEIGHT: u32 = 100;

impl Default for Smoother {
    fn default() -> Self {
        Smoother {
            used: None,
            published: DEFAULT_WEIGHT,
        }
    }
}

impl Smoother {
    /// Takes a report; returns true if the published weight changed.
    pub fn update(&mut self, load: Option<&LoadInfo>) -> bool {
        let target = match load {
            Some(l) => {
                let u = used(l);
                let s = match self.used {
                    Some(prev) => prev + ALPHA * (u - prev),
                    None => u,
                };
                self.used = Some(s);
                free_capacity(l, s).unwrap_or(DEFAULT_WEIGHT)
            }
            None => DEFAULT_WEIGHT,
        };
        let old = self.published;
        let moved = (target as f64 - old as f64).abs() >= HYSTERESIS * old.max(1) as f64;
        // Reaching or leaving zero always counts: zero means no new flows at all.
        if moved || (target == 0) != (old == 0) {
            self.published = target;
        }
        self.published != old
    }

    pub fn weight(&self) -> u32 {
        self.published
    }

    /// The smoothed load and the published weight: what [`Self::restored`] takes back.
    pub fn saved(&self) -> (Option<f64>, u32) {
        (self.used, self.published)
    }

    /// A smoother as [`Self::saved`] left it, or None if the values cannot have come from
    /// one (a negative or non-finite load, a weight above [`MAX_WEIGHT`]).
    pub fn restored(used: Option<f64>, published: u32) -> Option<Smoother> {
        let plausible = used.is_none_or(|u| u.is_finite() && u >= 0.0) && published <= MAX_WEIGHT;
        plausible.then_some(Smoother { used, published })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, weight: u32, priority: u16, condition: Condition) -> Candidate {
        Candidate {
            name: name.into(),
            address: format!("10.0.0.{}", name.len() + priority as usize)
                .parse()
                .unwrap(),
            weight,
            priority,
            condition,
            draining: false,
        }
    }

    #[test]
    fn standby_tier_takes_flows_only_when_the_primary_tier_is_gone() {
        let mut c = vec![
            cand("a", 10, 0, Condition::Up),
            cand("bb", 10, 1, Condition::Up),
        ];
        let w: Vec<u32> = choose(&c).iter().map(|s| s.weight).collect();
        assert_eq!(w, vec![10, 0]);
        c[0].condition = Condition::Down;
        let s = choose(&c);
        assert_eq!((s[0].weight, s[0].up, s[1].weight), (0, false, 10));
        c[0].condition = Condition::Suspect;
        let s = choose(&c);
        assert_eq!(
            (s[0].weight, s[0].up, s[1].weight),
            (10, true, 0),
            "suspect keeps its share until confirmed"
        );
        c[0].condition = Condition::Up;
        c[0].draining = true;
        let s = choose(&c);
        assert_eq!(
            (s[0].weight, s[0].up, s[1].weight),
            (0, true, 10),
            "draining keeps flows"
        );
    }

    #[test]
    fn weight_is_free_capacity_and_moves_smoothly() {
        let report = |used, max| LoadInfo {
            used_capacity: used,
            max_capacity: max,
            ..Default::default()
        };
        let mut s = Smoother::default();
        assert!(s.update(Some(&report(0, 1000))));
        assert_eq!(s.weight(), 1000);
        // A jump to 90% load moves the weight toward 100 over a few reports, not at once.
        s.update(Some(&report(900, 1000)));
        let first = s.weight();
        assert!(first < 1000 && first > 100, "smoothed: {first}");
        for _ in 0..20 {
            s.update(Some(&report(900, 1000)));
        }
        assert!(
            (100..=130).contains(&s.weight()),
            "converges near the free capacity: {}",
            s.weight()
        );
        // Small wobbles do not change the published weight.
        let w = s.weight();
        assert!(!s.update(Some(&report(905, 1000))));
        assert_eq!(s.weight(), w);
        // Full load means no new flows.
        for _ in 0..40 {
            s.update(Some(&report(1000, 1000)));
        }
        assert_eq!(s.weight(), 0);
        // Sessions count when no capacity is given; nothing reported means the default.
        let mut t = Smoother::default();
        t.update(Some(&LoadInfo {
            sessions_in_use: 10,
            max_sessions: 50,
            ..Default::default()
        }));
        assert_eq!(t.weight(), 40);
        let mut u = Smoother::default();
        assert!(!u.update(Some(&LoadInfo::default())));
        assert_eq!(u.weight(), DEFAULT_WEIGHT);
    }
}
