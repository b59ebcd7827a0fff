//! Making the maps say what the desired state says.
use super::*;

impl Dataplane {
    /// Makes the maps say what `desired` says. Order matters for packets in flight: new
    /// servers first, then tables, then the switch to the new tables, then the removals.
    ///
    /// Topology preferences: for each preference, a table over the service's servers that
    /// are listed in it and can take new flows (up, weight > 0), and one `PREFERENCES` entry
    /// per client prefix pointing to it. A preference without such servers gets no entries,
    /// so its clients use the service's table. A client prefix listed by two preferences of
    /// a service belongs to the first. Invalid preferences (a client prefix of the other
    /// family than the service, or longer than its address) are refused before anything
    /// changes, as is a set that needs more preference tables or prefixes than the maps
    /// hold.
    ///
    /// Servers that stay but go up or down get their `SERVERS` slot written first, for every
    /// service, before any table is built: flows pinned to a server that went down are
    /// re-chosen at once. A table whose inputs (servers, weights, states, slots) did not
    /// change since it was published is neither rebuilt nor rewritten nor switched.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<()> {
        let ring = self.sizes.ring_size;
        self.check_preferences(desired)?;
        // Servers that stay and change state, first.
        let mut changed = Vec::new();
        for want in desired {
            let Some(svc) = self.installed.get(&want.key) else {
                continue;
            };
            for w in &want.servers {
                if let Some(s) = svc.servers.iter().find(|s| s.address == w.address) {
                    if s.up != w.up {
                        changed.push((s.slot, svc.id, w.address, w.up));
                    }
                }
            }
        }
        for (slot, service, address, up) in changed {
            self.write_server(slot, service, address, up)?;
        }
        // Services no longer wanted give up their preference tables first (their clients use
        // the service's table until the service goes), so others can take them.
        let gone: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !desired.iter().any(|d| d.key == **k))
            .copied()
            .collect();
        for key in &gone {
            let svc = self.installed.get_mut(key).expect("listed above");
            if svc.preference_keys.is_empty() && svc.preference_tables.iter().all(Option::is_none) {
                continue;
            }
            let info = svc.info(ring, 0);
            let keys = std::mem::take(&mut svc.preference_keys);
            let tables: Vec<u32> = std::mem::take(&mut svc.preference_tables)
                .into_iter()
                .flatten()
                .collect();
            if svc.published != Some(info) {
                self.services_map
                    .insert(key, info, 0)
                    .context("publishing a service")?;
                svc.published = Some(info);
            }
            for k in keys.keys() {
                self.remove_preference_key(k)?;
            }
            self.free_preference_tables.extend(tables);
        }
        // Services that give back preference tables before those that take more.
        let mut order: Vec<&DesiredService> = desired.iter().collect();
        order.sort_by_key(|want| {
            let held = self
                .installed
                .get(&want.key)
                .map_or(0, |s| s.preference_tables.iter().flatten().count() as i64);
            preference_tables_needed(want) as i64 - held
        });
        // Every address about to be published passes the filter before its service exists;
        // addresses that go keep their bits until their services are gone.
        self.write_address_filter(
            self.installed
                .keys()
                .chain(desired.iter().map(|d| &d.key))
                .copied()
                .collect(),
        )?;
        for want in order {
            let mut svc = match self.installed.remove(&want.key) {
                Some(s) => s,
                None => {
                    let id = self.free_service_ids.pop().ok_or_else(|| {
                        anyhow!(
                            "no room for service {}: max_services is {}",
                            want.name,
                            self.sizes.max_services
                        )
                    })?;
                    self.service_stats.set(
                        id,
                        PerCpuValues::try_from(vec![Traffic::default(); nr_cpus()?])?,
                        0,
                    )?;
                    InstalledService {
                        name: want.name.clone(),
                        id,
                        area: TableArea::new(),
                        servers: Vec::new(),
                        preference_tables: Vec::new(),
                        preference_keys: HashMap::new(),
                        published: None,
                    }
                }
            };
            svc.name = want.name.clone();
            // Servers: keep the slots of those that stay, take new slots for new ones.
            let mut servers = Vec::with_capacity(want.servers.len());
            for w in &want.servers {
                let slot = match svc.servers.iter().position(|s| s.address == w.address) {
                    Some(i) => svc.servers.swap_remove(i).slot,
                    None => self.take_slot()?,
                };
                self.write_server(slot, svc.id, w.address, w.up)?;
                servers.push(InstalledServer {
                    name: w.name.clone(),
                    address: w.address,
                    weight: w.weight,
                    up: w.up,
                    slot,
                });
            }
            let leaving = std::mem::replace(&mut svc.servers, servers);
            // The table, into the half the data path is not reading (unless unchanged).
            let inputs = TableInputs::new(&svc.servers, |_| true, ring);
            let id = svc.id;
            svc.area
                .publish(&mut self.rings, |half| (id * 2 + half) * ring, inputs)?;
            // Preference tables and their prefixes, before the switch that may start using
            // them.
            let (tables, keys, spare) = self.write_preferences(&svc, want)?;
            let old_keys = std::mem::replace(&mut svc.preference_keys, keys);
            svc.preference_tables = tables;
            let flags = if svc.preference_keys.is_empty() {
                0
            } else {
                SERVICE_HAS_PREFERENCES
            };
            let info = svc.info(ring, flags);
            if svc.published != Some(info) {
                self.services_map
                    .insert(want.key, info, 0)
                    .context("publishing a service")?;
                svc.published = Some(info);
            }
            for k in old_keys.keys() {
                if !svc.preference_keys.contains_key(k) {
                    self.remove_preference_key(k)?;
                }
            }
            self.free_preference_tables.extend(spare);
            for s in leaving {
                self.release_slot(s.slot)?;
            }
            self.installed.insert(want.key, svc);
        }
        // Services no longer wanted.
        for key in gone {
            let svc = self.installed.remove(&key).expect("listed above");
            self.services_map
                .remove(&key)
                .context("removing a service")?;
            for s in svc.servers {
                self.release_slot(s.slot)?;
            }
            self.free_service_ids.push(svc.id);
        }
        self.write_address_filter(self.installed.keys().copied().collect())?;
        self.sync_reverse_keys()
    }

    /// Sets `ADDRESS_FILTER` to the bits of exactly these services' addresses, writing only
    /// the words that change.
    fn write_address_filter(&mut self, services: Vec<ServiceKey>) -> Result<()> {
        let mut words = vec![0u64; ADDRESS_FILTER_WORDS as usize];
        for key in services {
            let (word, bit) = address_filter_bit(key.family, &key.addr);
            words[word as usize] |= bit;
        }
        for (i, (&want, have)) in words.iter().zip(self.filter_written.iter_mut()).enumerate() {
            if want != *have {
                self.address_filter
                    .set(i as u32, want, 0)
                    .context("writing the address filter")?;
                *have = want;
            }
        }
        Ok(())
    }

    /// One `REVERSE` entry per installed server address: new addresses get a zeroed entry
    /// (counting starts), addresses no longer installed lose theirs.
    fn sync_reverse_keys(&mut self) -> Result<()> {
        let want: BTreeSet<IpAddr> = self
            .installed
            .values()
            .flat_map(|s| s.servers.iter().map(|x| x.address))
            .collect();
        for &a in want.difference(&self.reverse_keys) {
            let zero = PerCpuValues::try_from(vec![ReverseStats::default(); nr_cpus()?])?;
            self.reverse_map
                .insert(RealKey::new(a), zero, 0)
                .context("adding a server to the reverse-tunnel map")?;
        }
        for a in self.reverse_keys.difference(&want) {
            match self.reverse_map.remove(&RealKey::new(*a)) {
                Err(e) if !is_enoent(&e) => {
                    return Err(e).context("removing a server from the reverse-tunnel map")
                }
                _ => {}
            }
        }
        self.reverse_keys = want;
        Ok(())
    }

    /// Refuses preference sets the maps cannot hold, before anything changes.
    fn check_preferences(&self, desired: &[DesiredService]) -> Result<()> {
        let mut tables = 0;
        let mut prefixes = 0;
        for want in desired {
            for (i, pref) in want.preferences.iter().enumerate() {
                for (addr, len) in &pref.clients {
                    let (_, family) = anycast_common::addr_words(*addr);
                    let max = if family == FAMILY_V4 { 32 } else { 128 };
                    if family != want.key.family {
                        bail!(
                            "service {}: preferences[{i}]: client prefix {addr}/{len} is not of \
                             the service address's family",
                            want.name
                        );
                    }
                    if *len > max {
                        bail!(
                            "service {}: preferences[{i}]: client prefix {addr}/{len} is longer \
                             than the address ({max} bits)",
                            want.name
                        );
                    }
                }
            }
            if preference_tables_needed(want) > 0 {
                prefixes += want
                    .preferences
                    .iter()
                    .flat_map(|p| &p.clients)
                    .map(|(a, l)| PreferenceKey::new(0, *a, *l))
                    .collect::<HashSet<_>>()
                    .len();
            }
            tables += preference_tables_needed(want);
        }
        if tables > self.sizes.max_preference_tables as usize {
            bail!(
                "the services' topology preferences need {tables} tables, but \
                 max_preference_tables is {}",
                self.sizes.max_preference_tables
            );
        }
        if prefixes > MAX_PREFERENCE_PREFIXES as usize {
            bail!(
                "the services' topology preferences have {prefixes} client prefixes, more than \
                 the {MAX_PREFERENCE_PREFIXES} the map holds"
            );
        }
        Ok(())
    }

    /// Writes the tables of `want`'s preferences (into halves the data path is not reading)
    /// and the `PREFERENCES` entries that change, for a service whose servers are already
    /// `svc.servers`. Returns the table of each preference, the service's entries, and the
    /// tables it no longer uses (to be freed once nothing points to them).
    #[allow(clippy::type_complexity)]
    fn write_preferences(
        &mut self,
        svc: &InstalledService,
        want: &DesiredService,
    ) -> Result<(
        Vec<Option<u32>>,
        HashMap<PreferenceKey, PreferenceTable>,
        Vec<u32>,
    )> {
        let ring = self.sizes.ring_size;
        let able = |s: &InstalledServer, pref: &Preference| {
            s.up && s.weight > 0 && pref.servers.contains(&s.address)
        };
        let wanted: Vec<bool> = want
            .preferences
            .iter()
            .map(|p| svc.servers.iter().any(|s| able(s, p)))
            .collect();
        // A preference keeps its table; the service's other tables are reused before free ones.
        let mut tables: Vec<Option<u32>> = wanted
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                svc.preference_tables
                    .get(i)
                    .copied()
                    .flatten()
                    .filter(|_| w)
            })
            .collect();
        let mut spare: Vec<u32> = svc
            .preference_tables
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.filter(|_| !wanted.get(i).copied().unwrap_or(false)))
            .collect();
        let mut keys = HashMap::new();
        for (i, pref) in want.preferences.iter().enumerate() {
            if !wanted[i] {
                continue;
            }
            let t = match tables[i] {
                Some(t) => t,
                None => {
                    let t = match spare.pop() {
                        Some(t) => t,
                        None => self.free_preference_tables.pop_front().ok_or_else(|| {
                            anyhow!(
                                "service {}: no room for a preference table: \
                                 max_preference_tables is {}",
                                want.name,
                                self.sizes.max_preference_tables
                            )
                        })?,
                    };
                    tables[i] = Some(t);
                    t
                }
            };
            let inputs = TableInputs::new(&svc.servers, |s| able(s, pref), ring);
            let area_index = self.sizes.max_services + t;
            let area = &mut self.preference_areas[t as usize];
            area.publish(
                &mut self.rings,
                |half| (area_index * 2 + half) * ring,
                inputs,
            )?;
            let value = PreferenceTable {
                ring_base: (area_index * 2 + area.live_half) * ring,
                ring_size: ring,
            };
            for (addr, len) in &pref.clients {
                keys.entry(PreferenceKey::new(svc.id, *addr, *len))
                    .or_insert(value);
            }
        }
        for (k, v) in &keys {
            if svc.preference_keys.get(k) != Some(v) {
                self.preferences_map
                    .insert(&LpmKey::new(k.prefixlen, k.data()), v, 0)
                    .context("writing a topology preference")?;
            }
        }
        Ok((tables, keys, spare))
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

    fn take_slot(&mut self) -> Result<u32> {
        let slot = self
            .free_slots
            .pop_front()
            .ok_or_else(|| anyhow!("all {MAX_SERVERS} server slots are in use"))?;
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.server_stats.set(
            slot,
            PerCpuValues::try_from(vec![ServerTraffic::default(); nr_cpus()?])?,
            0,
        )?;
        Ok(slot)
    }

    fn write_server(&mut self, slot: u32, service: u32, address: IpAddr, up: bool) -> Result<()> {
        let (addr, family) = anycast_common::addr_words(address);
        let info = ServerInfo {
            addr,
            family,
            flags: if up { SERVER_UP } else { 0 },
            service: u16::try_from(service).context("service id beyond 65535")?,
            generation: self.generations[slot as usize],
        };
        self.set_server(slot, info).context("writing a server")
    }

    /// Writes a `SERVERS` slot, unless it already holds `info`.
    fn set_server(&mut self, slot: u32, info: ServerInfo) -> Result<(), MapError> {
        if self.servers_written[slot as usize] != info {
            self.servers_map.set(slot, info, 0)?;
            self.servers_written[slot as usize] = info;
        }
        Ok(())
    }

    /// Marks the slot down, so flows pinned to it are re-chosen, and queues it for reuse.
    fn release_slot(&mut self, slot: u32) -> Result<()> {
        self.set_server(slot, ServerInfo::default())
            .context("removing a server")?;
        self.free_slots.push_back(slot);
        Ok(())
    }
}

/// Preferences of `want` that get a table: those with a server able to take new flows.
pub(crate) fn preference_tables_needed(want: &DesiredService) -> usize {
    want.preferences
        .iter()
        .filter(|p| {
            want.servers
                .iter()
                .any(|s| s.up && s.weight > 0 && p.servers.contains(&s.address))
        })
        .count()
}
