//! What the live bindings bring to the forwarding state: services and candidate servers.
use super::*;

impl Registry {
    /// The configured services plus those the bindings bring, with every binding as a
    /// candidate server (weight from its load, tier from its priority, probe condition).
    pub fn plan(&self, configured: &[ServicePlan]) -> Vec<ServicePlan> {
        let mut services: BTreeMap<ServiceKey, ServicePlan> =
            configured.iter().map(|s| (s.key, s.clone())).collect();
        let configured_keys: Vec<ServiceKey> = configured.iter().map(|s| s.key).collect();
        for (id, b) in &self.bindings {
            for key in service_keys(id, &configured_keys) {
                let svc = services.entry(key).or_insert_with(|| ServicePlan {
                    name: service_name(&key),
                    key,
                    candidates: Vec::new(),
                    preferences: Vec::new(),
                });
                if svc.candidates.iter().any(|s| s.address == id.real) {
                    continue;
                }
                svc.candidates.push(Candidate {
                    name: id.server.clone(),
                    address: id.real,
                    weight: b.smoother.weight(),
                    priority: b.load.map_or(0, |l| l.priority),
                    condition: self.condition(id, b),
                    draining: b.state == BindingState::Draining,
                });
            }
        }
        services.into_values().collect()
    }

    /// `plan` and selection, without health checks or operator drains.
    pub fn selected(&self, configured: &[ServicePlan]) -> Vec<DesiredService> {
        self.plan(configured)
            .iter()
            .map(ServicePlan::select)
            .collect()
    }

    /// The binding's condition: its probes', made at least suspect while the reverse-tunnel
    /// monitor suspects its server (suspect keeps the share; only probe misses take it).
    pub(crate) fn condition(&self, id: &BindingId, b: &Binding) -> Condition {
        let reverse = match self.reverse.get(&id.server) {
            Some(w) if w.state == ReverseState::Suspect && b.state == BindingState::Active => {
                Condition::Suspect
            }
            _ => Condition::Up,
        };
        b.condition().max(reverse)
    }
}
