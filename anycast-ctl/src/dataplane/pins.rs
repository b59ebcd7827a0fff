//! Flows that move between agents: which flow-table entries are *exceptions* (pinned to a
//! server that is no longer their table's choice, after a table change or a drain), and
//! installing the pins peer agents send for theirs.
//!
//! Every agent builds the same tables from the same bindings, so a flow that a router moves
//! to another agent lands on the same server there, except for these: their server is
//! chosen by the entry, not the table. The flow sweeper's thread finds them (after each
//! table publish and at each sweep, off the owner task) against a [`PinView`] of the live
//! tables; the owner relays them to the peers, whose sweeper threads install them as pins
//! with their own slot for the server's real address ([`install`]).
use std::sync::{Arc, Mutex};

use super::*;

/// `FlowValue::flags`: the entry was installed from a peer agent's pin, not chosen here.
/// Such entries are never relayed on (no loops), and a newer pin from a peer may replace
/// them. The data path keeps the bit (it only ever adds `FLOW_CLOSING`) and ignores it.
pub const FLOW_LEARNED: u32 = 2;

/// One flow pinned to a server: what travels between agents (relay envelope kind 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowPin {
    pub key: FlowKey,
    /// The server's real address (slot numbers are local to an agent).
    pub server: IpAddr,
    /// The client sent a FIN or RST: the entry lives only the closing timeout.
    pub closing: bool,
    /// Seconds before the entry expires at the sender if no packet comes (rounded down).
    pub idle_left_secs: u16,
}

/// A server slot as the view knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ViewSlot {
    service: ServiceKey,
    address: IpAddr,
    generation: u32,
    up: bool,
}

#[derive(Debug, Clone)]
struct ViewService {
    id: u32,
    /// The live table (server slots), shared with the controller's record.
    table: Option<Arc<Vec<u32>>>,
    /// Topology preferences: the client prefix (as its `PREFERENCES` key) and its table.
    preferences: Vec<(PreferenceKey, Arc<Vec<u32>>)>,
    /// Real address -> slot.
    servers: HashMap<IpAddr, u32>,
}

/// Tables compare by identity: a table the controller did not rebuild is the same `Arc`,
/// and comparing 65537 entries per service at every publish would cost more than a scan.
impl PartialEq for ViewService {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Arc<Vec<u32>>, b: &Arc<Vec<u32>>| Arc::ptr_eq(a, b);
        self.id == other.id
            && self.servers == other.servers
            && match (&self.table, &other.table) {
                (Some(a), Some(b)) => same(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.preferences.len() == other.preferences.len()
            && self
                .preferences
                .iter()
                .zip(&other.preferences)
                .all(|(a, b)| a.0 == b.0 && same(&a.1, &b.1))
    }
}

/// The live tables and server slots, as the controller last published them: what the
/// sweeper's thread needs to tell a flow's pinned server from its table's choice, and to
/// translate a peer's real address into a slot here. Cheap to build (tables are shared).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PinView {
    services: HashMap<ServiceKey, ViewService>,
    slots: HashMap<u32, ViewSlot>,
}

/// What became of one pin offered to [`install`]: the counter it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// Written into the flow table (new, or replacing a learned or dead entry).
    Installed,
    /// The flow table already pins the flow to that server (a learned entry's idle time is
    /// brought up to date).
    Kept,
    /// No service here for the flow's anycast address, protocol and port.
    UnknownService,
    /// The real address is not a server of that service here.
    UnknownServer,
    /// The server is down here: the flow is re-chosen here anyway.
    ServerDown,
    /// This agent's data path has a live entry of its own for the flow, to another server:
    /// it wins (see [`install`]).
    Local,
}

impl PinOutcome {
    pub fn counter(self) -> &'static str {
        match self {
            PinOutcome::Installed => "pins_installed",
            PinOutcome::Kept => "pins_kept",
            PinOutcome::UnknownService => "pins_refused_unknown_service",
            PinOutcome::UnknownServer => "pins_refused_unknown_server",
            PinOutcome::ServerDown => "pins_refused_server_down",
            PinOutcome::Local => "pins_refused_local",
        }
    }
}

impl PinView {
    /// The view of what `installed` says the maps hold.
    pub(crate) fn of(installed: &Installed) -> PinView {
        let ring = installed.sizes.ring_size;
        let mut view = PinView::default();
        for (key, svc) in &installed.services {
            let mut preferences: Vec<(PreferenceKey, Arc<Vec<u32>>)> = svc
                .preference_keys
                .iter()
                .filter_map(|(k, t)| {
                    let area = (t.ring_base / ring.max(1) / 2)
                        .checked_sub(installed.sizes.max_services)?;
                    let table = installed
                        .preference_areas
                        .get(area as usize)?
                        .live_shared()?;
                    Some((*k, table))
                })
                .collect();
            // Longest prefix first: the first match is the trie's answer.
            preferences.sort_by(|a, b| b.0.prefixlen.cmp(&a.0.prefixlen).then(a.0.cmp(&b.0)));
            let mut servers = HashMap::new();
            for s in &svc.servers {
                servers.insert(s.address, s.slot);
                view.slots.insert(
                    s.slot,
                    ViewSlot {
                        service: *key,
                        address: s.address,
                        generation: installed.generations[s.slot as usize],
                        up: s.up,
                    },
                );
            }
            view.services.insert(
                *key,
                ViewService {
                    id: svc.id,
                    table: svc.area.live_shared(),
                    preferences,
                    servers,
                },
            );
        }
        view
    }

    /// The service the data path finds for a flow on a miss: its port, else every port.
    fn service_of(&self, key: &FlowKey) -> Option<(&ServiceKey, &ViewService)> {
        let mut k = ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
        };
        if let Some(s) = self.services.get_key_value(&k) {
            return Some(s);
        }
        k.port = anycast_common::ANY_PORT;
        self.services.get_key_value(&k)
    }

    /// The slot the data path would choose for a new flow `key` of `service` (the client's
    /// preferred table when it is in a preference's prefix), or `NO_SERVER`.
    fn table_choice(&self, service: &ViewService, key: &FlowKey) -> Option<u32> {
        let client = anycast_common::words_addr(key.src, key.family);
        let table = service
            .preferences
            .iter()
            .find(|(k, _)| {
                let len = (k.prefixlen - 32) as u8;
                PreferenceKey::new(service.id, client, len) == *k
            })
            .map(|(_, t)| t)
            .or(service.table.as_ref())?;
        if table.is_empty() {
            return None;
        }
        Some(table[(anycast_common::flow_hash(key) % table.len() as u32) as usize])
    }

    /// Whether the entry is an exception: live, chosen here (not learned), pinned to a
    /// server that is up (a down server's flows are re-chosen anyway) and that is not the
    /// table's choice for the flow's hash now. Returns the pin to send.
    pub fn exception(
        &self,
        config: &FlowConfig,
        now: u32,
        key: &FlowKey,
        value: &FlowValue,
    ) -> Option<FlowPin> {
        if value.flags & FLOW_LEARNED != 0 || config.expired(key.proto, value, now) {
            return None;
        }
        let slot = self.slots.get(&value.server)?;
        if !slot.up || slot.generation != value.generation {
            return None;
        }
        let service = self.services.get(&slot.service)?;
        if self.table_choice(service, key) == Some(value.server) {
            return None;
        }
        let timeout = config.timeout(key.proto, value.flags);
        let idle = now.wrapping_sub(value.last_seen).min(timeout);
        let left = anycast_common::flow_ticks_as_secs(timeout - idle);
        Some(FlowPin {
            key: *key,
            server: slot.address,
            closing: value.flags & FLOW_CLOSING != 0,
            idle_left_secs: left.min(u16::MAX as u32) as u16,
        })
    }

    /// The value to write for `pin` at `now`, or why not. The pin's entry gets this
    /// agent's slot for the real address and a last-seen tick that makes it expire when
    /// the sender's would (not before the pin arrived: at least `now - timeout`).
    pub fn pin_value(
        &self,
        config: &FlowConfig,
        now: u32,
        pin: &FlowPin,
    ) -> Result<FlowValue, PinOutcome> {
        let (_, service) = self
            .service_of(&pin.key)
            .ok_or(PinOutcome::UnknownService)?;
        let slot = *service
            .servers
            .get(&pin.server)
            .ok_or(PinOutcome::UnknownServer)?;
        let info = self.slots.get(&slot).ok_or(PinOutcome::UnknownServer)?;
        if !info.up {
            return Err(PinOutcome::ServerDown);
        }
        let flags = FLOW_LEARNED | if pin.closing { FLOW_CLOSING } else { 0 };
        let timeout = config.timeout(pin.key.proto, flags);
        let left = anycast_common::flow_ticks(pin.idle_left_secs as u32).min(timeout);
        Ok(FlowValue {
            server: slot,
            generation: info.generation,
            last_seen: now.wrapping_sub(timeout - left),
            flags,
        })
    }

    /// Whether `value` is a live entry this agent's data path would still use: its slot
    /// holds the same server, up, and it has not expired.
    fn usable(&self, config: &FlowConfig, now: u32, key: &FlowKey, value: &FlowValue) -> bool {
        self.slots
            .get(&value.server)
            .is_some_and(|s| s.up && s.generation == value.generation)
            && !config.expired(key.proto, value, now)
    }
}

/// The rule for a pin against what this agent's flow table holds for the flow (`existing`),
/// given the value the pin would write (`wanted`). Returns the value to write, or why not.
///
/// - No entry, or one the data path would not use (expired, its server down or its slot
///   reused): the pin is written.
/// - An entry learned from a peer: the newer word wins (written, or kept when it names the
///   same server and is not older).
/// - An entry of this agent's own naming the same server: kept.
/// - An entry of this agent's own naming another server: kept, and the pin refused
///   (`pins_refused_local`). Either the flow moved here before the pin arrived and its
///   first packets already went to the table's choice (for TCP that server has no socket
///   for it and answers with a reset: switching now would not save the connection), or it
///   is a new flow on the same 5-tuple that started here (switching it would break it).
///   This agent cannot tell the two apart, so its own choice stands.
pub fn decide(
    view: &PinView,
    config: &FlowConfig,
    now: u32,
    key: &FlowKey,
    existing: Option<&FlowValue>,
    wanted: FlowValue,
) -> Result<Option<FlowValue>, PinOutcome> {
    let Some(old) = existing.filter(|v| view.usable(config, now, key, v)) else {
        return Ok(Some(wanted));
    };
    let same = old.server == wanted.server && old.generation == wanted.generation;
    if old.flags & FLOW_LEARNED == 0 {
        return if same {
            Err(PinOutcome::Kept)
        } else {
            Err(PinOutcome::Local)
        };
    }
    // Serial comparison, as the data path's clock.
    let newer = (wanted.last_seen.wrapping_sub(old.last_seen) as i32) > 0;
    if same && !newer && old.flags == wanted.flags {
        return Err(PinOutcome::Kept);
    }
    Ok(Some(wanted))
}

/// Installs `pins` (from a peer) into the flow table by [`decide`]'s rule; returns each
/// pin's outcome. A new entry is written only if none appeared meanwhile (the data path
/// choosing on its own between the read and the write wins).
pub(crate) fn install(
    view: &PinView,
    flows: &mut BpfHashMap<MapData, FlowKey, FlowValue>,
    config: &FlowConfig,
    now: u32,
    pins: &[FlowPin],
) -> Vec<PinOutcome> {
    let mut out = Vec::with_capacity(pins.len());
    for pin in pins {
        let wanted = match view.pin_value(config, now, pin) {
            Ok(v) => v,
            Err(why) => {
                out.push(why);
                continue;
            }
        };
        let existing = flows.get(&pin.key, 0).ok();
        let outcome = match decide(view, config, now, &pin.key, existing.as_ref(), wanted) {
            Err(why) => why,
            Ok(None) => PinOutcome::Kept,
            Ok(Some(v)) => {
                let flag = if existing.is_some() {
                    0
                } else {
                    bpf_sys::BPF_NOEXIST
                };
                match flows.insert(pin.key, v, flag) {
                    Ok(()) => PinOutcome::Installed,
                    Err(_) => PinOutcome::Local,
                }
            }
        };
        out.push(outcome);
    }
    out
}

/// Work for the sweeper's thread from the owner task.
pub enum PinWork {
    /// A new view was published (or the agent stops): look again.
    Wake,
    /// Pins from a peer, already authenticated and within the rate.
    Install(Vec<FlowPin>),
}

/// What the sweeper's thread found: every exception in the flow table.
pub struct PinsFound {
    pub pins: Vec<FlowPin>,
    /// Found right after a table publish (else at a periodic sweep).
    pub after_publish: bool,
}

/// The owner's end of the pin work on the sweeper's thread.
pub struct PinsHandle {
    pub(crate) work: std::sync::mpsc::SyncSender<PinWork>,
    /// The current view and its number (bumped at each new view).
    pub(crate) view: Arc<Mutex<(u64, Option<Arc<PinView>>)>>,
    /// Install outcomes and the number of exceptions at the last scan.
    pub(crate) counters: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// Pins from peers waiting for the sweeper's thread (in envelopes of up to 20).
pub const PIN_QUEUE: usize = 256;

impl PinsHandle {
    /// Gives the thread a new view (when it differs from the last) and wakes it.
    pub fn publish(&self, view: PinView) {
        {
            let mut slot = self.view.lock().unwrap_or_else(|e| e.into_inner());
            if slot.1.as_deref() == Some(&view) {
                return;
            }
            slot.0 += 1;
            slot.1 = Some(Arc::new(view));
        }
        // Full: the thread is busy with queued work and looks at the view after it.
        let _ = self.work.try_send(PinWork::Wake);
    }

    /// Queues pins for installing; false when the queue is full (dropped).
    pub fn install(&self, pins: Vec<FlowPin>) -> bool {
        self.work.try_send(PinWork::Install(pins)).is_ok()
    }

    /// Install outcomes and `flow_exceptions` (the exceptions at the last scan).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The thread's end: what it reads and where it reports.
pub(crate) struct PinsWorker {
    pub(crate) view: Arc<Mutex<(u64, Option<Arc<PinView>>)>>,
    pub(crate) counters: Arc<Mutex<BTreeMap<String, u64>>>,
    pub(crate) found: Box<dyn Fn(PinsFound) + Send>,
    /// The number of the view last scanned against.
    pub(crate) scanned: u64,
    /// When the last scan after a publish started, and how long until the next may: at
    /// most a tenth of a CPU when publishes come faster than a large table is read.
    pub(crate) last_scan: Option<(std::time::Instant, std::time::Duration)>,
}

impl PinsWorker {
    pub(crate) fn current(&self) -> (u64, Option<Arc<PinView>>) {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When a scan of a new view may start, if one is waiting.
    pub(crate) fn pending_scan(&self) -> Option<std::time::Instant> {
        let (number, view) = self.current();
        if number == self.scanned || view.is_none() {
            return None;
        }
        let now = std::time::Instant::now();
        Some(self.last_scan.map_or(now, |(at, pause)| at + pause))
    }

    /// Reads the flow table for the exceptions of a new view (when one is waiting and its
    /// turn has come) and reports them.
    pub(crate) fn scan_if_new(
        &mut self,
        flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
        config: &FlowConfig,
    ) {
        let Some(due) = self.pending_scan() else {
            return;
        };
        // Read after `due`: a scan due now (the first one) is not put off.
        let started = std::time::Instant::now();
        if due > started {
            return;
        }
        let (number, Some(view)) = self.current() else {
            return;
        };
        self.scanned = number;
        let now = super::flows::flow_clock_now();
        let mut found = Vec::new();
        let read = super::flows::for_each_flow(flows, |k, v| {
            if found.len() < super::flows::MAX_EXCEPTIONS {
                found.extend(view.exception(config, now, k, v));
            }
        });
        let pause = (started.elapsed() * 9).max(std::time::Duration::from_millis(10));
        self.last_scan = Some((started, pause));
        match read {
            Ok(()) => self.report(found, true),
            Err(e) => tracing::warn!("finding flow exceptions: {e:#}"),
        }
    }

    pub(crate) fn count(&self, outcomes: &[PinOutcome]) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for o in outcomes {
            *c.entry(o.counter().to_string()).or_default() += 1;
        }
    }

    pub(crate) fn report(&self, pins: Vec<FlowPin>, after_publish: bool) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert("flow_exceptions".into(), pins.len() as u64);
        (self.found)(PinsFound {
            pins,
            after_publish,
        });
    }
}

/// A pair of ends: the owner's handle and the worker for [`Dataplane::spawn_sweeper`].
pub fn pins_channel(found: Box<dyn Fn(PinsFound) + Send>) -> (PinsHandle, PinsWorkerEnd) {
    let (tx, rx) = std::sync::mpsc::sync_channel(PIN_QUEUE);
    let view = Arc::new(Mutex::new((0, None)));
    let counters = Arc::new(Mutex::new(BTreeMap::new()));
    (
        PinsHandle {
            work: tx.clone(),
            view: view.clone(),
            counters: counters.clone(),
        },
        PinsWorkerEnd {
            wake: tx.clone(),
            rx,
            worker: PinsWorker {
                view,
                counters,
                found,
                scanned: 0,
                last_scan: None,
            },
        },
    )
}

/// What the sweeper's thread takes: the work queue and the worker.
pub struct PinsWorkerEnd {
    pub(crate) wake: std::sync::mpsc::SyncSender<PinWork>,
    pub(crate) rx: std::sync::mpsc::Receiver<PinWork>,
    pub(crate) worker: PinsWorker,
}

impl Dataplane {
    /// The live tables and slots, for the sweeper's thread.
    pub fn pin_view(&self) -> PinView {
        PinView::of(&self.installed)
    }
}

#[cfg(test)]
#[path = "pins_tests.rs"]
mod tests;
