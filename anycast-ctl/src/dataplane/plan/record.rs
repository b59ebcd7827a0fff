//! The controller's record of what the maps hold, kept beside the pinned maps so that a new
//! controller can plan against them: service ids, server slots and their generations, which
//! half of each table the data path reads, preference tables. Written after every apply;
//! adopted after checking it against the maps themselves (they win where they disagree:
//! which half is live, slot generations, services the record does not know).
use serde::{Deserialize, Serialize};

use super::*;

/// The record's format; another is refused.
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledRecord {
    format: u32,
    ring_size: u32,
    max_services: u32,
    max_preference_tables: u32,
    services: Vec<ServiceRecord>,
    free_service_ids: Vec<u32>,
    free_slots: Vec<u32>,
    generations: Vec<u32>,
    preference_live_halves: Vec<u32>,
    free_preference_tables: Vec<u32>,
    reverse_keys: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServiceRecord {
    key: ([u32; 4], u16, u8, u8),
    name: String,
    id: u32,
    live_half: u32,
    servers: Vec<ServerRecord>,
    preference_tables: Vec<Option<u32>>,
    preference_keys: Vec<(u32, u32, [u32; 4], u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServerRecord {
    name: String,
    address: IpAddr,
    weight: u32,
    up: bool,
    slot: u32,
}

/// What the maps say, for checking a record against them.
#[derive(Debug, Default)]
pub struct MapTruth {
    pub services: Vec<(ServiceKey, ServiceInfo)>,
    pub servers: Vec<ServerInfo>,
    pub preferences: Vec<(PreferenceKey, PreferenceTable)>,
}

fn key_of(k: &ServiceKey) -> ([u32; 4], u16, u8, u8) {
    (k.addr, k.port, k.proto, k.family)
}

fn service_key((addr, port, proto, family): ([u32; 4], u16, u8, u8)) -> ServiceKey {
    ServiceKey {
        addr,
        port,
        proto,
        family,
    }
}

impl Installed {
    pub fn record(&self) -> InstalledRecord {
        let mut services: Vec<ServiceRecord> = self
            .services
            .iter()
            .map(|(k, s)| {
                let mut preference_keys: Vec<_> = s
                    .preference_keys
                    .iter()
                    .map(|(k, t)| (k.prefixlen, k.service, k.addr, t.ring_base, t.ring_size))
                    .collect();
                preference_keys.sort();
                ServiceRecord {
                    key: key_of(k),
                    name: s.name.clone(),
                    id: s.id,
                    live_half: s.area.live_half,
                    servers: s
                        .servers
                        .iter()
                        .map(|s| ServerRecord {
                            name: s.name.clone(),
                            address: s.address,
                            weight: s.weight,
                            up: s.up,
                            slot: s.slot,
                        })
                        .collect(),
                    preference_tables: s.preference_tables.clone(),
                    preference_keys,
                }
            })
            .collect();
        services.sort_by_key(|s| s.id);
        InstalledRecord {
            format: FORMAT,
            ring_size: self.sizes.ring_size,
            max_services: self.sizes.max_services,
            max_preference_tables: self.sizes.max_preference_tables,
            services,
            free_service_ids: self.free_service_ids.clone(),
            free_slots: self.free_slots.iter().copied().collect(),
            generations: self.generations.clone(),
            preference_live_halves: self.preference_areas.iter().map(|a| a.live_half).collect(),
            free_preference_tables: self.free_preference_tables.iter().copied().collect(),
            reverse_keys: self.reverse_keys.iter().copied().collect(),
        }
    }

    /// The installed state of a record left by an earlier controller, checked against the
    /// maps. Every slot, filter word, table and service entry counts as unknown, so the
    /// first plan writes them all again (tables into the half the data path is not
    /// reading, as the maps say). Returns the state and the services the maps hold that the
    /// record does not know (written after the record was saved): the caller removes them
    /// once the first plan is carried out.
    pub fn adopt(
        sizes: Sizes,
        record: InstalledRecord,
        maps: &MapTruth,
    ) -> Result<(Installed, Vec<ServiceKey>)> {
        if record.format != FORMAT {
            bail!(
                "the record of the pinned maps has format {}, this build reads {FORMAT}",
                record.format
            );
        }
        let recorded = (
            record.ring_size,
            record.max_services,
            record.max_preference_tables,
        );
        let now = (
            sizes.ring_size,
            sizes.max_services,
            sizes.max_preference_tables,
        );
        if recorded != now {
            bail!(
                "the pinned maps were laid out for ring_size {}, max_services {}, \
                 max_preference_tables {}; the configuration now says {}, {}, {}",
                recorded.0,
                recorded.1,
                recorded.2,
                now.0,
                now.1,
                now.2
            );
        }
        let slots = MAX_SERVERS as usize;
        if record.generations.len() != slots
            || record.preference_live_halves.len() != sizes.max_preference_tables as usize
        {
            bail!("the record of the pinned maps is inconsistent (slot or table counts)");
        }
        let mut installed = Installed::new(sizes);
        installed.free_service_ids = record.free_service_ids;
        installed.free_slots = record.free_slots.into_iter().collect();
        installed.generations = record.generations;
        installed.free_preference_tables = record.free_preference_tables.into_iter().collect();
        installed.reverse_keys = record.reverse_keys.into_iter().collect();
        installed.preference_areas = record
            .preference_live_halves
            .iter()
            .map(|&h| TableArea::adopted(h))
            .collect();
        let ring = sizes.ring_size;
        for s in record.services {
            let key = service_key(s.key);
            if s.id >= sizes.max_services || s.live_half > 1 {
                bail!(
                    "the record of the pinned maps names service id {} half {}",
                    s.id,
                    s.live_half
                );
            }
            // The half the data path reads is the one the map points to.
            let live_half = match maps.services.iter().find(|(k, _)| *k == key) {
                Some((_, info)) if info.id != s.id => bail!(
                    "the pinned SERVICES map gives service {} id {}, the record {}",
                    s.name,
                    info.id,
                    s.id
                ),
                Some((_, info)) => (info.ring_base / ring).saturating_sub(s.id * 2).min(1),
                None => s.live_half,
            };
            let mut servers = Vec::with_capacity(s.servers.len());
            for r in s.servers {
                if r.slot >= MAX_SERVERS {
                    bail!("the record of the pinned maps names server slot {}", r.slot);
                }
                servers.push(InstalledServer {
                    name: r.name,
                    address: r.address,
                    weight: r.weight,
                    up: r.up,
                    slot: r.slot,
                });
            }
            let preference_keys = s
                .preference_keys
                .into_iter()
                .map(|(prefixlen, service, addr, ring_base, ring_size)| {
                    (
                        PreferenceKey {
                            prefixlen,
                            service,
                            addr,
                        },
                        PreferenceTable {
                            ring_base,
                            ring_size,
                        },
                    )
                })
                .collect();
            installed.services.insert(
                key,
                InstalledService {
                    name: s.name,
                    id: s.id,
                    area: TableArea::adopted(live_half),
                    servers,
                    preference_tables: s.preference_tables,
                    preference_keys,
                    published: None,
                },
            );
        }
        // A preference table's live half, as its entries in the map point to it.
        for (_, t) in &maps.preferences {
            let area = t.ring_base / ring / 2;
            if let Some(i) = area.checked_sub(sizes.max_services) {
                if let Some(a) = installed.preference_areas.get_mut(i as usize) {
                    a.live_half = (t.ring_base / ring) % 2;
                }
            }
        }
        // A slot taken again after the record was saved has a newer generation in the map:
        // the next holder's must be newer still, so no flow follows a slot to a stranger.
        for (slot, info) in maps.servers.iter().enumerate().take(slots) {
            let g = &mut installed.generations[slot];
            if info.generation.wrapping_sub(*g) as i32 > 0 {
                *g = info.generation;
            }
        }
        installed.forget_written();
        // The preference entries are what the map holds (forgetting them would leave those
        // no longer wanted in place).
        for svc in installed.services.values_mut() {
            svc.preference_keys = maps
                .preferences
                .iter()
                .filter(|(k, _)| k.service == svc.id)
                .copied()
                .collect();
        }
        let strays = maps
            .services
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !installed.services.contains_key(k))
            .collect();
        Ok((installed, strays))
    }
}
