//! The pure half of making the maps say what is wanted: from what is installed (as the
//! controller knows it) and what is desired, the ordered map operations, with the installed
//! state updated as if they had been carried out. `apply.rs` carries them out.
//!
//! The order is what packets in flight need:
//! - servers that stay but go up or down are written first, for every service, before any
//!   table is built, so flows pinned to a server that went down are re-chosen at once;
//! - a new server's counters are zeroed and its slot written before any table points to it;
//! - a table (and a preference's table, and its prefixes) is written into the half the data
//!   path is not reading before the `SERVICES` entry switches to it;
//! - an address's filter bit is set before its service is published, and cleared only after
//!   its last service is removed;
//! - removals come last: leaving servers' slots after the switch away from them, services
//!   no longer wanted after every other service, reverse-tunnel entries of addresses no
//!   longer installed at the very end.
use super::tables::{TableArea, TableInputs, TableMemo, TableWrite};
use super::*;
pub use record::{InstalledRecord, MapTruth};

/// One write to the maps.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Zero a service id's `SERVICE_STATS` entry (a new service).
    ResetServiceCounters {
        id: u32,
    },
    /// Zero a slot's `SERVER_STATS` entry (a new server).
    ResetServerCounters {
        slot: u32,
    },
    /// Write a `SERVERS` slot (the default value frees it).
    WriteServer {
        slot: u32,
        info: ServerInfo,
    },
    /// Write one word of `ADDRESS_FILTER`.
    WriteFilterWord {
        word: u32,
        value: u64,
    },
    /// Write entries of `RINGS`.
    WriteTable(TableWrite),
    /// Write (or switch) a `SERVICES` entry.
    PublishService {
        key: ServiceKey,
        info: ServiceInfo,
    },
    /// Write a `PREFERENCES` entry.
    WritePreference {
        key: PreferenceKey,
        table: PreferenceTable,
    },
    RemovePreference {
        key: PreferenceKey,
    },
    RemoveService {
        key: ServiceKey,
    },
    /// Give a real address a zeroed `REVERSE` entry (counting starts).
    AddReverseAddress {
        address: IpAddr,
    },
    RemoveReverseAddress {
        address: IpAddr,
    },
}

#[derive(Clone)]
pub(crate) struct InstalledService {
    pub(crate) name: String,
    pub(crate) id: u32,
    pub(crate) area: TableArea,
    pub(crate) servers: Vec<InstalledServer>,
    /// Per preference (by index in `DesiredService::preferences`): its table, when it has
    /// servers able to take new flows.
    preference_tables: Vec<Option<u32>>,
    /// The service's entries in `PREFERENCES`.
    pub(crate) preference_keys: HashMap<PreferenceKey, PreferenceTable>,
    /// What its `SERVICES` entry holds, if written.
    published: Option<ServiceInfo>,
}

impl InstalledService {
    fn info(&self, ring: u32, flags: u32) -> ServiceInfo {
        ServiceInfo {
            id: self.id,
            ring_base: (self.id * 2 + self.area.live_half) * ring,
            ring_size: ring,
            flags,
        }
    }
}

#[derive(Clone)]
pub(crate) struct InstalledServer {
    pub(crate) name: String,
    pub(crate) address: IpAddr,
    pub(crate) weight: u32,
    pub(crate) up: bool,
    pub(crate) slot: u32,
}

/// What the maps hold, as far as the controller knows, and which ids, slots and preference
/// tables are free. Cheap to clone (tables are shared), so a plan is made on a copy and
/// kept only if it succeeds.
#[derive(Clone)]
pub struct Installed {
    pub(crate) sizes: Sizes,
    pub(crate) services: HashMap<ServiceKey, InstalledService>,
    free_service_ids: Vec<u32>,
    /// Server slots not in use, oldest freed first, so a slot is reused as late as possible.
    free_slots: VecDeque<u32>,
    /// Per slot: bumped each time the slot is taken, so flows pinned to an earlier server of
    /// the slot are re-chosen.
    pub(crate) generations: Vec<u32>,
    /// Preference table areas, by table index (after the services' areas in `RINGS`). An
    /// area keeps its state across owners, so a new owner writes the half the previous one
    /// was not reading.
    pub(crate) preference_areas: Vec<TableArea>,
    /// Preference tables not in use, oldest freed first.
    free_preference_tables: VecDeque<u32>,
    /// What each `ADDRESS_FILTER` word holds (`None`: unknown, written at the next plan).
    filter: Vec<Option<u64>>,
    /// What each `SERVERS` slot holds (`None`: unknown).
    servers: Vec<Option<ServerInfo>>,
    /// The real addresses that have an entry in `REVERSE`.
    pub(crate) reverse_keys: BTreeSet<IpAddr>,
}

impl Installed {
    /// Nothing installed, on maps as they are created (zeroed).
    pub fn new(sizes: Sizes) -> Self {
        Installed {
            sizes,
            services: HashMap::new(),
            free_service_ids: (0..sizes.max_services).rev().collect(),
            free_slots: (0..MAX_SERVERS).collect(),
            generations: vec![0; MAX_SERVERS as usize],
            preference_areas: (0..sizes.max_preference_tables)
                .map(|_| TableArea::new())
                .collect(),
            free_preference_tables: (0..sizes.max_preference_tables).collect(),
            filter: vec![Some(0); ADDRESS_FILTER_WORDS as usize],
            servers: vec![Some(ServerInfo::default()); MAX_SERVERS as usize],
            reverse_keys: BTreeSet::new(),
        }
    }

    /// Forgets what the maps hold (after writes that failed part-way): the next plan writes
    /// every slot, filter word, table and service entry again.
    pub fn forget_written(&mut self) {
        self.filter.iter_mut().for_each(|w| *w = None);
        self.servers.iter_mut().for_each(|s| *s = None);
        for svc in self.services.values_mut() {
            svc.area.forget();
            svc.published = None;
            // Written again only if they differ from this: nothing known, all written.
            svc.preference_keys.clear();
        }
        self.preference_areas.iter_mut().for_each(TableArea::forget);
    }

    /// The operations that make the maps say what `desired` says, in order, and this state
    /// updated as if they were done. Refuses (changing nothing) what the maps cannot hold.
    ///
    /// Topology preferences: for each preference, a table over the service's servers that
    /// are listed in it and can take new flows (up, weight > 0), and one `PREFERENCES` entry
    /// per client prefix pointing to it. A preference without such servers gets no entries,
    /// so its clients use the service's table. A client prefix listed by two preferences of
    /// a service belongs to the first. Invalid preferences (a client prefix of the other
    /// family than the service, or longer than its address) are refused, as is a set that
    /// needs more preference tables or prefixes than the maps hold.
    ///
    /// A table whose inputs (servers, weights, states, slots) did not change since it was
    /// published is neither rebuilt nor rewritten nor switched.
    pub fn plan(&mut self, desired: &[DesiredService]) -> Result<Vec<Op>> {
        self.check(desired)?;
        let mut ops = Vec::new();
        let ring = self.sizes.ring_size;
        // Servers that stay and change state, first.
        let mut changed = Vec::new();
        for want in desired {
            let Some(svc) = self.services.get(&want.key) else {
                continue;
            };
            let installed = first_by_address(&svc.servers);
            for w in &want.servers {
                if let Some(&i) = installed.get(&w.address) {
                    let s = &svc.servers[i];
                    if s.up != w.up {
                        changed.push((s.slot, svc.id, w.address, w.up));
                    }
                }
            }
        }
        for (slot, service, address, up) in changed {
            self.write_server(&mut ops, slot, service, address, up)?;
        }
        // Services no longer wanted give up their preference tables first (their clients use
        // the service's table until the service goes), so others can take them.
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !desired.iter().any(|d| d.key == **k))
            .copied()
            .collect();
        for key in &gone {
            let svc = self.services.get_mut(key).expect("listed above");
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
                ops.push(Op::PublishService { key: *key, info });
                svc.published = Some(info);
            }
            ops.extend(keys.into_keys().map(|key| Op::RemovePreference { key }));
            self.free_preference_tables.extend(tables);
        }
        // Services that give back preference tables before those that take more.
        let mut order: Vec<&DesiredService> = desired.iter().collect();
        order.sort_by_key(|want| {
            let held = self
                .services
                .get(&want.key)
                .map_or(0, |s| s.preference_tables.iter().flatten().count() as i64);
            preference_tables_needed(want) as i64 - held
        });
        // Every address about to be published passes the filter before its service exists;
        // addresses that go keep their bits until their services are gone.
        let passing: Vec<ServiceKey> = self
            .services
            .keys()
            .chain(desired.iter().map(|d| &d.key))
            .copied()
            .collect();
        self.write_address_filter(&mut ops, &passing);
        let mut memo = TableMemo::default();
        for want in order {
            self.plan_service(&mut ops, want, &mut memo)?;
        }
        // Services no longer wanted.
        for key in gone {
            let svc = self.services.remove(&key).expect("listed above");
            ops.push(Op::RemoveService { key });
            for s in svc.servers {
                self.release_slot(&mut ops, s.slot);
            }
            self.free_service_ids.push(svc.id);
        }
        let installed: Vec<ServiceKey> = self.services.keys().copied().collect();
        self.write_address_filter(&mut ops, &installed);
        self.sync_reverse_keys(&mut ops);
        Ok(ops)
    }

    /// One desired service: its servers' slots, its table, its preferences, the switch, then
    /// what it no longer uses.
    fn plan_service(
        &mut self,
        ops: &mut Vec<Op>,
        want: &DesiredService,
        memo: &mut TableMemo,
    ) -> Result<()> {
        let ring = self.sizes.ring_size;
        let mut svc = match self.services.remove(&want.key) {
            Some(s) => s,
            None => {
                let id = self
                    .free_service_ids
                    .pop()
                    .expect("room checked before planning");
                ops.push(Op::ResetServiceCounters { id });
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
        // Servers: keep the slots of those that stay, take new slots for new ones. (Each
        // one that stays is swap-removed from the installed list, found through an index of
        // it kept up to date: what is left, in that order, leaves.)
        let mut servers = Vec::with_capacity(want.servers.len());
        let mut installed = first_by_address(&svc.servers);
        for w in &want.servers {
            let slot = match installed.remove(&w.address) {
                Some(i) => {
                    let last = svc.servers.len() - 1;
                    if i != last {
                        let moved = svc.servers[last].address;
                        if installed.get(&moved) == Some(&last) {
                            installed.insert(moved, i);
                        }
                    }
                    svc.servers.swap_remove(i).slot
                }
                None => self.take_slot(ops),
            };
            self.write_server(ops, slot, svc.id, w.address, w.up)?;
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
        if let Some(w) = svc
            .area
            .publish(|half| (id * 2 + half) * ring, inputs, memo)
        {
            ops.push(Op::WriteTable(w));
        }
        // Preference tables and their prefixes, before the switch that may start using them.
        let (tables, keys, spare) = self.plan_preferences(ops, &svc, want, memo)?;
        let old_keys = std::mem::replace(&mut svc.preference_keys, keys);
        svc.preference_tables = tables;
        let flags = if svc.preference_keys.is_empty() {
            0
        } else {
            SERVICE_HAS_PREFERENCES
        };
        let info = svc.info(ring, flags);
        if svc.published != Some(info) {
            ops.push(Op::PublishService {
                key: want.key,
                info,
            });
            svc.published = Some(info);
        }
        for key in old_keys.into_keys() {
            if !svc.preference_keys.contains_key(&key) {
                ops.push(Op::RemovePreference { key });
            }
        }
        self.free_preference_tables.extend(spare);
        for s in leaving {
            self.release_slot(ops, s.slot);
        }
        self.services.insert(want.key, svc);
        Ok(())
    }

    /// Refuses, before anything changes, what the maps cannot hold: more services, servers,
    /// preference tables or prefixes than they have room for, and invalid preferences.
    fn check(&self, desired: &[DesiredService]) -> Result<()> {
        let new_services = desired
            .iter()
            .filter(|d| !self.services.contains_key(&d.key))
            .collect::<Vec<_>>();
        if new_services.len() > self.free_service_ids.len() {
            bail!(
                "no room for service {}: max_services is {}",
                new_services[self.free_service_ids.len()].name,
                self.sizes.max_services
            );
        }
        // New servers take slots before any leaving server's slot is freed.
        let new_servers: usize = desired
            .iter()
            .map(|d| match self.services.get(&d.key) {
                None => d.servers.len(),
                Some(svc) => {
                    let installed = first_by_address(&svc.servers);
                    d.servers
                        .iter()
                        .filter(|w| !installed.contains_key(&w.address))
                        .count()
                }
            })
            .sum();
        if new_servers > self.free_slots.len() {
            bail!("all {MAX_SERVERS} server slots are in use");
        }
        check_preferences(desired, self.sizes)
    }

    /// Plans the tables of `want`'s preferences (into halves the data path is not reading)
    /// and the `PREFERENCES` entries that change, for a service whose servers are already
    /// `svc.servers`. Returns the table of each preference, the service's entries, and the
    /// tables it no longer uses (to be freed once nothing points to them).
    #[allow(clippy::type_complexity)]
    fn plan_preferences(
        &mut self,
        ops: &mut Vec<Op>,
        svc: &InstalledService,
        want: &DesiredService,
        memo: &mut TableMemo,
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
            if let Some(w) = area.publish(|half| (area_index * 2 + half) * ring, inputs, memo) {
                ops.push(Op::WriteTable(w));
            }
            let value = PreferenceTable {
                ring_base: (area_index * 2 + area.live_half) * ring,
                ring_size: ring,
            };
            for (addr, len) in &pref.clients {
                keys.entry(PreferenceKey::new(svc.id, *addr, *len))
                    .or_insert(value);
            }
        }
        // In a stable order, so plans are reproducible.
        let mut changed: Vec<(&PreferenceKey, &PreferenceTable)> = keys
            .iter()
            .filter(|(k, v)| svc.preference_keys.get(k) != Some(v))
            .collect();
        changed.sort_by_key(|(k, _)| (k.prefixlen, k.addr));
        ops.extend(
            changed
                .into_iter()
                .map(|(k, v)| Op::WritePreference { key: *k, table: *v }),
        );
        Ok((tables, keys, spare))
    }

    /// Sets `ADDRESS_FILTER` to the bits of exactly these services' addresses, writing only
    /// the words that change.
    fn write_address_filter(&mut self, ops: &mut Vec<Op>, services: &[ServiceKey]) {
        let mut words = vec![0u64; ADDRESS_FILTER_WORDS as usize];
        for key in services {
            let (word, bit) = address_filter_bit(key.family, &key.addr);
            words[word as usize] |= bit;
        }
        for (i, (&want, have)) in words.iter().zip(self.filter.iter_mut()).enumerate() {
            if *have != Some(want) {
                ops.push(Op::WriteFilterWord {
                    word: i as u32,
                    value: want,
                });
                *have = Some(want);
            }
        }
    }

    /// One `REVERSE` entry per installed server address: new addresses get a zeroed entry
    /// (counting starts), addresses no longer installed lose theirs.
    fn sync_reverse_keys(&mut self, ops: &mut Vec<Op>) {
        let want: BTreeSet<IpAddr> = self
            .services
            .values()
            .flat_map(|s| s.servers.iter().map(|x| x.address))
            .collect();
        for &address in want.difference(&self.reverse_keys) {
            ops.push(Op::AddReverseAddress { address });
        }
        for &address in self.reverse_keys.difference(&want) {
            ops.push(Op::RemoveReverseAddress { address });
        }
        self.reverse_keys = want;
    }

    fn take_slot(&mut self, ops: &mut Vec<Op>) -> u32 {
        let slot = self
            .free_slots
            .pop_front()
            .expect("room checked before planning");
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        ops.push(Op::ResetServerCounters { slot });
        slot
    }

    fn write_server(
        &mut self,
        ops: &mut Vec<Op>,
        slot: u32,
        service: u32,
        address: IpAddr,
        up: bool,
    ) -> Result<()> {
        let (addr, family) = anycast_common::addr_words(address);
        let info = ServerInfo {
            addr,
            family,
            flags: if up { SERVER_UP } else { 0 },
            service: u16::try_from(service).context("service id beyond 65535")?,
            generation: self.generations[slot as usize],
        };
        self.set_server(ops, slot, info);
        Ok(())
    }

    /// Writes a `SERVERS` slot, unless it already holds `info`.
    fn set_server(&mut self, ops: &mut Vec<Op>, slot: u32, info: ServerInfo) {
        if self.servers[slot as usize] != Some(info) {
            ops.push(Op::WriteServer { slot, info });
            self.servers[slot as usize] = Some(info);
        }
    }

    /// Marks the slot down, so flows pinned to it are re-chosen, and queues it for reuse.
    fn release_slot(&mut self, ops: &mut Vec<Op>, slot: u32) {
        self.set_server(ops, slot, ServerInfo::default());
        self.free_slots.push_back(slot);
    }
}

/// Refuses preference sets the maps cannot hold.
fn check_preferences(desired: &[DesiredService], sizes: Sizes) -> Result<()> {
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
    if tables > sizes.max_preference_tables as usize {
        bail!(
            "the services' topology preferences need {tables} tables, but \
             max_preference_tables is {}",
            sizes.max_preference_tables
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

/// Preferences of `want` that get a table: those with a server able to take new flows.
fn preference_tables_needed(want: &DesiredService) -> usize {
    want.preferences
        .iter()
        .filter(|p| {
            want.servers
                .iter()
                .any(|s| s.up && s.weight > 0 && p.servers.contains(&s.address))
        })
        .count()
}

mod record;

/// Each address's first position in `servers`: lookups in constant time, where a search of
/// the list for every wanted server made a plan quadratic in the servers of a service
/// (about a millisecond for 1000).
fn first_by_address(servers: &[InstalledServer]) -> HashMap<IpAddr, usize> {
    let mut index = HashMap::with_capacity(servers.len());
    for (i, s) in servers.iter().enumerate() {
        index.entry(s.address).or_insert(i);
    }
    index
}

#[cfg(test)]
mod tests;
