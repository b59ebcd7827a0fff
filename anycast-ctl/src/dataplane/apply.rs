//! Carrying out a plan (`plan.rs`): each operation is one map write, in the plan's order.
use super::plan::Op;
use super::*;

impl Dataplane {
    /// Makes the maps say what `desired` says: plans on a copy of the installed state
    /// ([`Installed::plan`]: the ordering rules are there), carries the plan out, and keeps
    /// the new state. A refused plan changes nothing; a write that fails part-way leaves the
    /// controller's record of the maps marked unknown, so the next apply writes them all.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<()> {
        let mut next = self.installed.clone();
        let ops = next.plan(desired)?;
        let done = self.execute(ops);
        if done.is_err() {
            next.forget_written();
        }
        self.installed = next;
        done?;
        self.sync_service_addresses(desired)?;
        for key in std::mem::take(&mut self.stray_services) {
            match self.services_map.remove(&key) {
                Err(e) if !is_enoent(&e) => {
                    return Err(e).context("removing a service the adopted record did not know")
                }
                _ => tracing::info!("removed a service the adopted record did not know"),
            }
        }
        Ok(())
    }

    /// Carries out `ops` in order; stops at the first that fails.
    fn execute(&mut self, ops: Vec<Op>) -> Result<()> {
        for op in ops {
            match op {
                Op::ResetServiceCounters { id } => self
                    .service_stats
                    .set(
                        id,
                        PerCpuValues::try_from(vec![Traffic::default(); nr_cpus()?])?,
                        0,
                    )
                    .context("zeroing a service's counters")?,
                Op::ResetServerCounters { slot } => self
                    .server_stats
                    .set(
                        slot,
                        PerCpuValues::try_from(vec![ServerTraffic::default(); nr_cpus()?])?,
                        0,
                    )
                    .context("zeroing a server's counters")?,
                Op::WriteServer { slot, info } => self
                    .servers_map
                    .set(slot, info, 0)
                    .context("writing a server")?,
                Op::WriteFilterWord { word, value } => self
                    .address_filter
                    .set(word, value, 0)
                    .context("writing the address filter")?,
                Op::WriteTable(w) => self
                    .rings
                    .write_table(&w)
                    .context("writing a consistent-hash table")?,
                Op::PublishService { key, info } => self
                    .services_map
                    .insert(key, info, 0)
                    .context("publishing a service")?,
                Op::WritePreference { key, table } => self
                    .preferences_map
                    .insert(&LpmKey::new(key.prefixlen, key.data()), table, 0)
                    .context("writing a topology preference")?,
                Op::RemovePreference { key } => self.remove_preference_key(&key)?,
                Op::RemoveService { key } => self
                    .services_map
                    .remove(&key)
                    .context("removing a service")?,
                Op::AddReverseAddress { address } => {
                    let zero = PerCpuValues::try_from(vec![ReverseStats::default(); nr_cpus()?])?;
                    self.reverse_map
                        .insert(AddressKey::new(address), zero, 0)
                        .context("adding a server to the reverse-tunnel map")?
                }
                Op::RemoveReverseAddress { address } => {
                    match self.reverse_map.remove(&AddressKey::new(address)) {
                        Err(e) if !is_enoent(&e) => {
                            return Err(e).context("removing a server from the reverse-tunnel map")
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// What `PREFERENCES` holds: each client prefix (with its service id) and the table it
    /// points to (unordered).
    pub fn preference_entries(&self) -> Result<Vec<(PreferenceKey, PreferenceTable)>> {
        let mut out = Vec::new();
        for entry in self.preferences_map.iter() {
            let (k, v) = entry.context("reading the topology preferences")?;
            let d = k.data();
            out.push((
                PreferenceKey {
                    prefixlen: k.prefix_len(),
                    service: d[0],
                    addr: [d[1], d[2], d[3], d[4]],
                },
                v,
            ));
        }
        Ok(out)
    }

    fn remove_preference_key(&mut self, k: &PreferenceKey) -> Result<()> {
        match self
            .preferences_map
            .remove(&LpmKey::new(k.prefixlen, k.data()))
        {
            Err(e) if !is_enoent(&e) => Err(e).context("removing a topology preference"),
            _ => Ok(()),
        }
    }
}
