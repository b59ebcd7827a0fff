//! Consistent-hash tables as the controller tracks them, without touching a map: what a table
//! is built from, and its two halves in `RINGS` (one live, one written, then switched).
use std::{net::IpAddr, sync::Arc};

use anycast_common::{table, NO_SERVER};

use super::plan::InstalledServer;

/// Entries of `RINGS` to write: entry `i` of `table` at index `base + i`, for every `i` in
/// `changed` (all of them when `None`). The table is shared with what the controller keeps
/// of it, not copied: a whole table is 65537 entries by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableWrite {
    pub base: u32,
    pub table: Arc<Vec<u32>>,
    pub changed: Option<Vec<u32>>,
}

impl TableWrite {
    /// The `(RINGS index, value)` pairs to write, in increasing index order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let whole = self.changed.is_none().then(|| 0..self.table.len() as u32);
        let offsets = whole
            .into_iter()
            .flatten()
            .chain(self.changed.iter().flatten().copied());
        offsets.map(|i| (self.base + i, self.table[i as usize]))
    }

    /// How many entries are written.
    pub fn len(&self) -> usize {
        self.changed.as_ref().map_or(self.table.len(), Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a consistent-hash table is a function of: the ring size and, in order, each
/// server's address (its member key), its weight as a member (0 when it is down or not a
/// member of this table) and its slot (what the entries hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInputs {
    ring: u32,
    members: Vec<(IpAddr, u32, u32)>,
}

impl TableInputs {
    /// The inputs of the table over the `servers` that `member` admits.
    pub(crate) fn new(
        servers: &[InstalledServer],
        member: impl Fn(&InstalledServer) -> bool,
        ring: u32,
    ) -> Self {
        TableInputs {
            ring,
            members: servers
                .iter()
                .map(|s| {
                    let weight = if s.up && member(s) { s.weight } else { 0 };
                    (s.address, weight, s.slot)
                })
                .collect(),
        }
    }

    /// The consistent-hash table, as server slots.
    pub(crate) fn build(&self, memo: &mut TableMemo) -> Vec<u32> {
        let members: Vec<table::Member> = self
            .members
            .iter()
            .map(|&(address, weight, _)| table::Member {
                key: table::member_key_of(address),
                weight,
            })
            .collect();
        memo.build(&members, self.ring)
            .iter()
            .map(|&i| {
                if i == NO_SERVER {
                    NO_SERVER
                } else {
                    self.members[i as usize].2
                }
            })
            .collect()
    }
}

/// The tables built during one plan, by what a table is a function of (the ring size and
/// the members' keys and weights, in order): services with the same servers (a registered
/// address's TCP and UDP services, say) share one build. Entries are member indexes, so
/// each service maps them to its own slots.
#[derive(Default)]
pub(crate) struct TableMemo {
    built: Vec<(u32, Vec<table::Member>, Arc<Vec<u32>>)>,
}

impl TableMemo {
    fn build(&mut self, members: &[table::Member], ring: u32) -> Arc<Vec<u32>> {
        if let Some((_, _, t)) = self
            .built
            .iter()
            .find(|(r, m, _)| *r == ring && m.as_slice() == members)
        {
            return Arc::clone(t);
        }
        let t = Arc::new(table::build(members, ring));
        self.built.push((ring, members.to_vec(), Arc::clone(&t)));
        t
    }
}

/// A consistent-hash table's two areas in `RINGS`: the data path reads one (live), the
/// controller writes the other, then switches.
#[derive(Default, Clone)]
pub(crate) struct TableArea {
    /// Which half the data path reads.
    pub(crate) live_half: u32,
    /// What each half holds, if known (a half never written is unknown and written whole).
    /// Shared (not copied) with the flow-pin thread's view of the live tables.
    halves: [Option<Arc<Vec<u32>>>; 2],
    /// What the live half was built from, if known.
    live_inputs: Option<TableInputs>,
}

impl TableArea {
    /// A fresh area whose first table goes into half 0.
    pub(crate) fn new() -> Self {
        TableArea {
            live_half: 1,
            halves: [None, None],
            live_inputs: None,
        }
    }

    /// An area written by an earlier controller: the data path reads `live_half`; what
    /// either half holds is unknown, so the next table is written whole into the other.
    pub(crate) fn adopted(live_half: u32) -> Self {
        TableArea {
            live_half,
            halves: [None, None],
            live_inputs: None,
        }
    }

    pub(crate) fn live(&self) -> Option<&[u32]> {
        self.halves[self.live_half as usize]
            .as_deref()
            .map(Vec::as_slice)
    }

    /// The live table, shared.
    pub(crate) fn live_shared(&self) -> Option<Arc<Vec<u32>>> {
        self.halves[self.live_half as usize].clone()
    }

    /// Makes the live half hold the table of `inputs`. When the live half was built from the
    /// same inputs, or holds the same entries, nothing is built, written or switched (`None`).
    /// Otherwise the table goes into the half the data path is not reading, which becomes the
    /// live half: the entries to write there (only those that differ from what it holds, at
    /// `base(half)` onwards) are returned, and the caller points the data path at
    /// `base(live_half)` once they are written.
    pub(crate) fn publish(
        &mut self,
        base: impl Fn(u32) -> u32,
        inputs: TableInputs,
        memo: &mut TableMemo,
    ) -> Option<TableWrite> {
        if self.live().is_some() && self.live_inputs.as_ref() == Some(&inputs) {
            return None;
        }
        let entries = inputs.build(memo);
        if self.live() == Some(&entries[..]) {
            self.live_inputs = Some(inputs);
            return None;
        }
        let half = 1 - self.live_half;
        let known = self.halves[half as usize].take();
        let table = Arc::new(entries);
        let changed = known.map(|k| {
            (0..table.len() as u32)
                .filter(|&i| k[i as usize] != table[i as usize])
                .collect()
        });
        self.halves[half as usize] = Some(Arc::clone(&table));
        self.live_half = half;
        self.live_inputs = Some(inputs);
        Some(TableWrite {
            base: base(half),
            table,
            changed,
        })
    }

    /// Forgets what the halves hold (after a failed write): the next table is written whole.
    pub(crate) fn forget(&mut self) {
        self.halves = [None, None];
        self.live_inputs = None;
    }
}
