//! The flow table: idle timeouts, the flow clock, the sweeper thread and the listing.
use super::bpf_sys::{lookup_batch, take_flow, BPF_NOEXIST, ENOTSUPP};
use super::pins::{PinWork, PinsWorkerEnd};
use super::*;

/// Flow-table idle timeouts, in seconds. An entry idle for longer than its timeout is
/// re-chosen at its next packet (counted as `flow_expired`) and deleted by
/// [`Dataplane::sweep_flows`]. The clock ticks every 2^30 ns and timeouts are rounded up to
/// whole ticks: an entry lives at least its timeout after its last packet, and at most
/// about 1.07 s more (plus the rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FlowTimeouts {
    /// TCP flows.
    pub tcp_idle: u32,
    /// UDP flows.
    pub udp_idle: u32,
    /// TCP flows after the client's FIN or RST.
    pub tcp_closing: u32,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_idle: DEFAULT_TCP_IDLE,
            udp_idle: DEFAULT_UDP_IDLE,
            tcp_closing: DEFAULT_TCP_CLOSING,
        }
    }
}

impl FlowTimeouts {
    pub(crate) fn config(&self) -> FlowConfig {
        FlowConfig::new(self.tcp_idle, self.udp_idle, self.tcp_closing)
    }
}

/// The flow clock, as the data path reads it (`bpf_ktime_get_coarse_ns() >> 30`): ticks of
/// about 1.07 s of `CLOCK_MONOTONIC_COARSE`. Pass it to [`Dataplane::sweep_flows`].
pub fn flow_clock_now() -> u32 {
    anycast_common::flow_tick(coarse_clock_ns())
}

/// The flow sweeper's thread (see [`Dataplane::spawn_sweeper`]); stops and joins on drop.
pub struct FlowSweeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::mpsc::SyncSender<PinWork>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FlowSweeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // A full queue: the thread looks at the flag after each item it takes.
        let _ = self.wake.try_send(PinWork::Wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Exceptions kept from one scan at most: a bound on the memory and on what is relayed.
pub const MAX_EXCEPTIONS: usize = 65536;

/// Deletes the flow-table entries past their timeout at `now`; see
/// [`Dataplane::sweep_flows`].
/// Returns how many entries it saw and how many it deleted.
/// `live` sees every entry that is not expired (the flow-pin exceptions are found in the
/// same pass).
pub(crate) fn sweep(
    flows: &mut BpfHashMap<MapData, FlowKey, FlowValue>,
    config: &FlowConfig,
    clock: impl Fn() -> u32,
    mut live: impl FnMut(&FlowKey, &FlowValue, u32),
) -> Result<(usize, usize)> {
    let mut candidates: Vec<FlowKey> = Vec::new();
    let mut seen = 0;
    let now = clock();
    for_each_flow(flows, |key, value| {
        seen += 1;
        if config.expired(key.proto, value, now) {
            candidates.push(*key);
        } else {
            live(key, value, now);
        }
    })?;
    let mut removed = 0;
    for key in candidates {
        // The data path may have reused the entry since it was read (a new connection on
        // the same 5-tuple): take it out atomically and put a live one back, so a flow is
        // never dropped from under its connection.
        let value = match take_flow(flows, &key) {
            Ok(Some(value)) => value,
            Ok(None) => continue,
            Err(e) => return Err(e).context("deleting a flow-table entry"),
        };
        // Read the clock again: a sweep of a large table spans ticks, and an entry the
        // data path refreshed meanwhile is live.
        if config.expired(key.proto, &value, clock()) {
            removed += 1;
            continue;
        }
        match flows.insert(key, value, BPF_NOEXIST) {
            // EEXIST: the data path has written a newer entry meanwhile; it wins.
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).context("restoring a live flow-table entry"),
        }
    }
    Ok((seen, removed))
}

/// Every entry of the flow table.
pub(crate) fn flow_entries(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
) -> Result<Vec<(FlowKey, FlowValue)>> {
    let mut out = Vec::new();
    for_each_flow(flows, |k, v| out.push((*k, *v)))?;
    Ok(out)
}

/// Calls `f` on every entry of the flow table, read `LOOKUP_CHUNK` entries per `bpf()`
/// call (a million-entry table in a few hundred calls, where key-by-key iteration takes
/// two calls per entry); key by key where the kernel refuses batches.
pub(crate) fn for_each_flow(
    flows: &BpfHashMap<MapData, FlowKey, FlowValue>,
    mut f: impl FnMut(&FlowKey, &FlowValue),
) -> Result<()> {
    match lookup_batch(flows, &mut f) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
            ) =>
        {
            for entry in flows.iter() {
                let (k, v) = entry.context("reading the flow table")?;
                f(&k, &v);
            }
            Ok(())
        }
        Err(e) => Err(e).context("reading the flow table (BPF_MAP_LOOKUP_BATCH)"),
    }
}

impl Dataplane {
    /// Sets the flow table's idle timeouts; they apply at once, to existing entries too.
    pub fn set_flow_timeouts(&mut self, timeouts: FlowTimeouts) -> Result<()> {
        self.flow_config
            .set(0, timeouts.config(), 0)
            .context("writing the flow timeouts")?;
        self.timeouts = timeouts;
        Ok(())
    }

    pub fn flow_timeouts(&self) -> FlowTimeouts {
        self.timeouts
    }

    /// Deletes the flow-table entries that are past their timeout at `now` (ticks of
    /// [`flow_clock_now`]): idle longer than their protocol's timeout, or closing for longer
    /// than the closing timeout. Returns how many it deleted.
    ///
    /// Each entry is read again just before it is deleted, so one the data path refreshed
    /// meanwhile stays; one refreshed in the microseconds between that read and the delete
    /// is re-chosen at its next packet (by the same consistent hash, so normally onto the
    /// same server).
    pub fn sweep_flows(&mut self, now: u32) -> Result<usize> {
        Ok(sweep(
            &mut self.flows_map,
            &self.timeouts.config(),
            || now,
            |_, _, _| {},
        )?
        .1)
    }

    /// Starts a thread that sweeps the flow table every `every` (less often when a sweep
    /// takes more than a tenth of that), with the timeouts the
    /// data path has (read from `FLOW_CONFIG` at each sweep), on handles of its own: a
    /// sweep of a large table takes long enough that it must not hold up the agent's
    /// event loop (binding updates, health transitions). Stops when dropped.
    pub fn spawn_sweeper(&self, every: std::time::Duration) -> Result<FlowSweeper> {
        self.spawn_sweeper_with(every, None)
    }

    /// As [`Dataplane::spawn_sweeper`], and with `pins` the same thread finds the flow-pin
    /// exceptions (at once for each new view the owner publishes, and in each sweep's
    /// pass) and installs the pins peers send (`pins.rs`).
    pub fn spawn_sweeper_with(
        &self,
        every: std::time::Duration,
        pins: Option<PinsWorkerEnd>,
    ) -> Result<FlowSweeper> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<Map> {
            let owned = fd
                .try_clone_to_owned()
                .context("duplicating a map descriptor")?;
            Ok(Map::from_map_data(MapData::from_fd(owned)?)?)
        };
        let mut flows: BpfHashMap<MapData, FlowKey, FlowValue> =
            BpfHashMap::try_from(dup(self.flows_map.map().fd().as_fd())?)?;
        let config: Array<MapData, FlowConfig> =
            Array::try_from(dup(self.flow_config.map().fd().as_fd())?)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let (wake, rx, mut worker) = match pins {
            Some(end) => (end.wake, end.rx, Some(end.worker)),
            None => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                (tx, rx, None)
            }
        };
        let report = self.sweep_report.clone();
        let thread = std::thread::Builder::new()
            .name("flow-sweeper".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                let mut last_error = String::new();
                let mut next = std::time::Instant::now() + every;
                loop {
                    // The next sweep, or a scan of a new view that must wait its turn.
                    let until = worker
                        .as_ref()
                        .and_then(|w| w.pending_scan())
                        .map_or(next, |t| t.min(next));
                    let wait = until.saturating_duration_since(std::time::Instant::now());
                    let work = rx.recv_timeout(wait);
                    if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    match work {
                        Ok(PinWork::Wake) | Err(RecvTimeoutError::Timeout) => {}
                        Ok(PinWork::Install(pins)) => {
                            if let (Some(w), Ok(c)) = (&worker, config.get(&0, 0)) {
                                if let (_, Some(view)) = w.current() {
                                    let outcomes = super::pins::install(
                                        &view,
                                        &mut flows,
                                        &c,
                                        flow_clock_now(),
                                        &pins,
                                    );
                                    w.count(&outcomes);
                                }
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // A new view (a table was published): its exceptions at once.
                    if let (Some(w), Ok(c)) = (&mut worker, config.get(&0, 0)) {
                        w.scan_if_new(&flows, &c);
                    }
                    if std::time::Instant::now() < next {
                        continue;
                    }
                    let started = std::time::Instant::now();
                    let view = worker.as_ref().and_then(|w| w.current().1);
                    let mut found = Vec::new();
                    let outcome = config
                        .get(&0, 0)
                        .context("reading the flow timeouts")
                        .and_then(|c| {
                            sweep(&mut flows, &c, flow_clock_now, |k, v, now| {
                                if let Some(view) = &view {
                                    if found.len() < MAX_EXCEPTIONS {
                                        found.extend(view.exception(&c, now, k, v));
                                    }
                                }
                            })
                        });
                    // At most a tenth of a CPU: a huge table is swept less often (the
                    // data path re-chooses expired entries by itself meanwhile).
                    next = std::time::Instant::now() + every.max(started.elapsed() * 9);
                    if let Ok((seen, removed)) = outcome {
                        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                        r.sweeps += 1;
                        r.entries = (seen - removed) as u64;
                        r.swept += removed as u64;
                        r.last_sweep_ms = started.elapsed().as_secs_f64() * 1e3;
                        drop(r);
                        if let (Some(w), Some(_)) = (&worker, &view) {
                            w.report(found, false);
                        }
                    }
                    match outcome {
                        Ok((_, 0)) => {}
                        Ok((_, n)) => tracing::debug!("swept {n} expired flows"),
                        Err(e) => {
                            // Once per distinct error, not once a second.
                            let e = format!("{e:#}");
                            if e != last_error {
                                tracing::warn!("sweeping the flow table: {e}");
                                last_error = e;
                            }
                        }
                    }
                }
            })
            .context("starting the flow sweeper")?;
        Ok(FlowSweeper {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// The flow table's entries, for `anycast-ctl flows` (unordered).
    pub fn flows(&self) -> Result<Vec<FlowReport>> {
        self.flow_snapshot()?.read()
    }

    /// What listing the flow table needs, taken at once: its own handle on the table and the
    /// installed servers and services. Reading a large table takes long, so the listing is
    /// read off the agent's owner task ([`FlowSnapshot::read`]).
    pub fn flow_snapshot(&self) -> Result<FlowSnapshot> {
        let owned = self
            .flows_map
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the flow table's descriptor")?;
        let flows = BpfHashMap::try_from(Map::from_map_data(MapData::from_fd(owned)?)?)?;
        let mut servers = HashMap::new();
        let mut services = Vec::new();
        for (key, svc) in &self.installed.services {
            services.push((*key, svc.name.clone()));
            for s in &svc.servers {
                let generation = self.installed.generations[s.slot as usize];
                servers.insert(s.slot, (s.address, generation));
            }
        }
        Ok(FlowSnapshot {
            flows,
            config: self.timeouts.config(),
            servers,
            services,
        })
    }
}

/// The flow table's handle and the installed state it is read against.
pub struct FlowSnapshot {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    config: FlowConfig,
    /// Installed server slots: real address and the slot's generation.
    servers: HashMap<u32, (IpAddr, u32)>,
    services: Vec<(ServiceKey, String)>,
}

impl FlowSnapshot {
    /// Reads every entry of the flow table (unordered).
    pub fn read(self) -> Result<Vec<FlowReport>> {
        let now = flow_clock_now();
        let mut out = Vec::new();
        for (key, value) in flow_entries(&self.flows)? {
            let service_of = |port: u16| {
                self.services.iter().find(|(k, _)| {
                    k.addr == key.dst
                        && k.family == key.family
                        && k.proto == key.proto
                        && k.port == port
                })
            };
            let service = service_of(key.dport)
                .or_else(|| service_of(anycast_common::ANY_PORT))
                .map(|(_, name)| name.clone());
            let server = self
                .servers
                .get(&value.server)
                .filter(|(_, generation)| *generation == value.generation)
                .map(|(address, _)| *address);
            out.push(FlowReport {
                client: anycast_common::words_addr(key.src, key.family),
                client_port: key.sport,
                address: anycast_common::words_addr(key.dst, key.family),
                port: key.dport,
                protocol: protocol_name(key.proto),
                service,
                server_slot: value.server,
                server,
                last_seen: value.last_seen,
                age: anycast_common::flow_ticks_as_secs(now.saturating_sub(value.last_seen)),
                closing: value.flags & FLOW_CLOSING != 0,
                expired: self.config.expired(key.proto, &value, now),
                learned: value.flags & super::pins::FLOW_LEARNED != 0,
            });
        }
        Ok(out)
    }
}
