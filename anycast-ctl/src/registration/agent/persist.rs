//! The registry's state across agent restarts. The data path keeps forwarding while no agent
//! runs; a restarted agent takes its bindings back from a state file at once, so that its
//! first forwarding tables are the ones it left, and confirms them within one round trip,
//! rather than starting empty and waiting for every server's next update.
//!
//! How the agent uses it:
//!
//! 1. At start, before the first publish of the forwarding tables: [`read_state_file`]; if it
//!    holds a state, [`Registry::restore`] it (at the same `now` and `wall` as the rest of
//!    the start) and log the [`RestoreReport`] (its `Display` is one line). A file that
//!    cannot be read is logged, and the agent starts empty: its servers register again.
//! 2. Then [`Registry::refresh_all`], and send what it returns: a refresh request to every
//!    active binding at once. The answers are ordinary updates; a request unanswered within
//!    the probe timeout is an ordinary missed probe.
//! 3. Whenever [`Registry::take_dirty`] says so, after handling a batch of datagrams and
//!    after housekeeping, and before the replies go out: [`write_state_file`] with
//!    [`Registry::snapshot`]. Written before the acknowledgements are sent, the file never
//!    lags behind what a server was told was accepted.
//!
//! Times are absolute on the agent's wall clock (NTP format, as `wall` everywhere in the
//! registry): `Instant`s do not survive a process. A restored binding is checked against the
//! policy the agent has now, exactly as a new update would be: the file may be stale (the
//! configuration changed while no agent ran) or tampered with. The start-time check
//! ([`Registry::refusing_mesg_ids_before`]) stays: the restored replay state only adds to it
//! (it matters for servers whose clocks run ahead of the agent's). A server whose clock runs
//! behind the agent's answers the first refresh request with a MESG-ID older than the
//! agent's start: refused with the agent's time, it resends at once, a second round trip.
use std::{
    fmt,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::Path,
};

use anyhow::{bail, Context, Result};

use super::*;

/// The state file's format; a file of another format is refused, not guessed at.
pub const STATE_FORMAT: u32 = 1;

/// A bound on what is read (a binding takes a few hundred bytes), against a runaway file.
const MAX_STATE_FILE_BYTES: u64 = 256 << 20;

/// What the registry needs to take its bindings and replay state back after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryState {
    format: u32,
    /// The agent's clock (NTP) when the state was taken.
    saved_ntp: u64,
    bindings: Vec<SavedBinding>,
    /// Per identity, the newest MESG-ID accepted from it.
    last_mesg_id: BTreeMap<String, u64>,
}

/// One binding as the state file holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SavedBinding {
    binding: BindingId,
    state: BindingState,
    /// The newest accepted sequence number.
    seq: u16,
    /// Where its last update came from: where refresh requests go.
    source: SocketAddr,
    /// The lifetime granted by the last update (for a draining binding, the one it had).
    lifetime_secs: u64,
    /// The agent's clock (NTP) at registration, at the last update, and when the binding
    /// expires (for a draining one: when its drain time ends).
    registered_ntp: u64,
    updated_ntp: u64,
    expires_ntp: u64,
    load: Option<SavedLoad>,
    /// The smoother: the smoothed load and the published weight.
    smoothed_load: Option<f64>,
    weight: u32,
    /// Refresh requests unanswered in a row, up to the number that makes it down.
    probe_misses: u32,
    /// The peer agent that relayed its last update (absent: the server sent it here).
    #[serde(default)]
    relayed_by: Option<String>,
    /// Its last accepted message, verbatim, for snapshots to peer agents.
    #[serde(default)]
    message: Option<StoredMessage>,
}

/// The last Load Information option (RFC 6463) of a binding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct SavedLoad {
    priority: u16,
    sessions_in_use: u32,
    max_sessions: u32,
    used_capacity: u32,
    max_capacity: u32,
}

impl From<LoadInfo> for SavedLoad {
    fn from(l: LoadInfo) -> Self {
        SavedLoad {
            priority: l.priority,
            sessions_in_use: l.sessions_in_use,
            max_sessions: l.max_sessions,
            used_capacity: l.used_capacity,
            max_capacity: l.max_capacity,
        }
    }
}

impl From<SavedLoad> for LoadInfo {
    fn from(l: SavedLoad) -> Self {
        LoadInfo {
            priority: l.priority,
            sessions_in_use: l.sessions_in_use,
            max_sessions: l.max_sessions,
            used_capacity: l.used_capacity,
            max_capacity: l.max_capacity,
        }
    }
}

/// What [`Registry::restore`] did with a state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestoreReport {
    /// Seconds between the snapshot and the restore (0 if the clock went back).
    pub saved_secs_ago: f64,
    pub restored: Vec<BindingId>,
    /// Their lifetime (or drain time) ended while no agent ran.
    pub expired: Vec<BindingId>,
    /// Not allowed by the policy as it is now, with the reason.
    pub refused: Vec<(BindingId, String)>,
    /// Identities whose replay state (newest accepted MESG-ID) was restored.
    pub replay_restored: usize,
    /// Identities whose replay state was not, with the reason.
    pub replay_dropped: Vec<(String, String)>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {} binding(s) from a state saved {:.1} s ago, {} expired, {} refused",
            self.restored.len(),
            self.saved_secs_ago,
            self.expired.len(),
            self.refused.len()
        )?;
        for (id, why) in &self.refused {
            write!(
                f,
                "; refused '{}' for {} via {}: {why}",
                id.server, id.anycast, id.real
            )?;
        }
        write!(f, "; replay state of {} identities", self.replay_restored)?;
        for (identity, why) in &self.replay_dropped {
            write!(f, "; replay state of '{identity}' dropped: {why}")?;
        }
        Ok(())
    }
}

/// A duration in NTP units (2^-32 s).
fn ntp_units(d: Duration) -> u64 {
    (d.as_secs().min(u64::from(u32::MAX)) << 32)
        + ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// How long after `earlier` `later` is on the NTP clock (across an era rollover); None if
/// it is before.
fn ntp_since(later: u64, earlier: u64) -> Option<Duration> {
    let d = later.wrapping_sub(earlier) as i64;
    (d >= 0).then(|| {
        let d = d as u64;
        Duration::from_secs(d >> 32)
            + Duration::from_nanos(((d & 0xffff_ffff) * 1_000_000_000) >> 32)
    })
}

impl Registry {
    /// The bindings and the replay state, with times made absolute: `now` on the monotonic
    /// clock is `wall` (NTP) on the agent's clock.
    pub fn snapshot(&self, now: Instant, wall: u64) -> RegistryState {
        let at = |t: Instant| {
            if t >= now {
                wall.wrapping_add(ntp_units(t - now))
            } else {
                wall.wrapping_sub(ntp_units(now - t))
            }
        };
        let bindings = self
            .bindings
            .iter()
            .map(|(id, b)| {
                let (smoothed_load, weight) = b.smoother.saved();
                SavedBinding {
                    binding: id.clone(),
                    state: b.state,
                    seq: b.seq,
                    source: b.source,
                    lifetime_secs: b.lifetime.as_secs(),
                    registered_ntp: at(b.registered),
                    updated_ntp: at(b.updated),
                    expires_ntp: at(b.expires),
                    load: b.load.map(SavedLoad::from),
                    smoothed_load,
                    weight,
                    probe_misses: b.probe_misses.min(b.probe_limit),
                    relayed_by: b.relayed_by.clone(),
                    message: b.message.clone(),
                }
            })
            .collect();
        RegistryState {
            format: STATE_FORMAT,
            saved_ntp: wall,
            bindings,
            last_mesg_id: self
                .last_mesg_id
                .iter()
                .map(|(k, &v)| (k.clone(), v))
                .collect(),
        }
    }

    /// Takes back the bindings of `state` that have not expired and that the policy allows
    /// now, as it would allow a new update (identity configured, anycast address allowed,
    /// real address and source its own and no other identity's, limits), and the replay
    /// state of configured identities (the newer of the saved and the present one). Bindings
    /// already present (updates since the start) stay as they are. `now` and `wall` are the
    /// same moment on the monotonic and the agent's clock.
    pub fn restore(&mut self, state: RegistryState, now: Instant, wall: u64) -> RestoreReport {
        // The registry's state changed, and the file may hold what was refused: rewrite it.
        self.dirty = true;
        let mut report = RestoreReport {
            saved_secs_ago: ntp_since(wall, state.saved_ntp).map_or(0.0, |d| d.as_secs_f64()),
            ..RestoreReport::default()
        };
        if state.format != STATE_FORMAT {
            let why = format!(
                "state format {}, this agent reads format {STATE_FORMAT}",
                state.format
            );
            report.refused = state
                .bindings
                .into_iter()
                .map(|b| (b.binding, why.clone()))
                .collect();
            report.replay_dropped = state
                .last_mesg_id
                .into_keys()
                .map(|identity| (identity, why.clone()))
                .collect();
            return report;
        }
        let mut saved = state.bindings;
        // Active bindings first: when a limit is tight, those that take new flows win.
        saved.sort_by_key(|b| b.state != BindingState::Active);
        let probe_limit = self.probe.map_or(u32::MAX, |p| p.misses);
        for s in saved {
            let lifetime = Duration::from_secs(s.lifetime_secs).min(self.max_lifetime);
            // No longer than a new update (or deregistration) would get now.
            let longest = match s.state {
                BindingState::Active => lifetime,
                BindingState::Draining => self.drain_time,
            };
            let Some(left) = ntp_since(s.expires_ntp, wall)
                .map(|left| left.min(longest))
                .filter(|left| !left.is_zero())
            else {
                report.expired.push(s.binding);
                continue;
            };
            let smoother = match self.restorable(&s) {
                Ok(smoother) => smoother,
                Err(why) => {
                    report.refused.push((s.binding, why));
                    continue;
                }
            };
            let ago = |t: u64| {
                let age = ntp_since(wall, t).unwrap_or_default();
                now.checked_sub(age).unwrap_or(now)
            };
            let b = Binding {
                seq: s.seq,
                registered: ago(s.registered_ntp),
                updated: ago(s.updated_ntp),
                expires: now + left,
                lifetime,
                load: s.load.map(LoadInfo::from),
                state: s.state,
                source: s.source,
                refresh_requested: false,
                smoother,
                probe_sent: None,
                probe_next: now,
                probe_misses: s.probe_misses.min(probe_limit),
                probe_limit,
                probe_urgent: false,
                relayed_by: s.relayed_by,
                message: s.message,
            };
            report.restored.push(s.binding.clone());
            self.bindings.insert(s.binding, b);
        }
        // A legitimate MESG-ID is at most the replay window ahead of the agent's clock when
        // accepted; one further ahead would refuse the identity's every update until then.
        let ahead = (self.replay_window + 1) << 32;
        for (identity, ts) in state.last_mesg_id {
            if !self.servers.contains_key(&identity) {
                report
                    .replay_dropped
                    .push((identity, "not configured".into()));
            } else if ts.wrapping_sub(wall) as i64 > ahead as i64 {
                report.replay_dropped.push((
                    identity,
                    "its MESG-ID is further ahead of the agent's clock than the replay window"
                        .into(),
                ));
            } else {
                let last = self.last_mesg_id.entry(identity).or_insert(ts);
                *last = (*last).max(ts);
                report.replay_restored += 1;
            }
        }
        report
    }

    /// The checks of a new update, for a saved binding; its smoother if it passes.
    fn restorable(&self, s: &SavedBinding) -> std::result::Result<Smoother, String> {
        let id = &s.binding;
        let Some(policy) = self.servers.get(&id.server) else {
            return Err(format!("'{}' is not configured", id.server));
        };
        if !policy.allow.iter().any(|p| p.contains(id.anycast)) {
            return Err(format!(
                "'{}' is not authorized to bind {}",
                id.server, id.anycast
            ));
        }
        if self.bindings.contains_key(id) {
            return Err("already bound (updated since the start, or listed twice)".into());
        }
        if let Some(why) = self.invalid_care_of(&id.server, id.real, s.source.ip()) {
            return Err(why);
        }
        if let Some(why) = self.over_limit(id) {
            return Err(why);
        }
        Smoother::restored(s.smoothed_load, s.weight).ok_or_else(|| {
            format!(
                "implausible weight {} or smoothed load {:?}",
                s.weight, s.smoothed_load
            )
        })
    }

    /// A refresh request to every active binding now (one per identity, anycast address and
    /// source, as probes go): after a restart, each answers with an update within one round
    /// trip. With probing configured these are outstanding probes: an update within the
    /// probe timeout answers one, none is a miss.
    pub fn refresh_all(&mut self, now: Instant) -> Vec<Reply> {
        // Draining bindings are deregistered: their servers no longer refresh them.
        let due: BTreeSet<(String, IpAddr, SocketAddr)> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.state == BindingState::Active && b.relayed_by.is_none())
            .map(|(id, b)| (id.server.clone(), id.anycast, b.source))
            .collect();
        let out = match self.probe {
            Some(p) => self.send_probes(due, now, Duration::from_millis(p.interval_ms)),
            None => due
                .into_iter()
                .filter_map(|(server, anycast, source)| {
                    let to = self.addressed_to(&server, anycast, source);
                    let (servers, agent) = (&self.servers, &self.agent);
                    liveness::refresh_request(servers, agent, (&server, anycast, source), to)
                })
                .collect(),
        };
        *self
            .counters
            .entry("refresh_requests_sent".into())
            .or_default() += out.len() as u64;
        out
    }

    /// True once after anything the state file holds changed: an accepted update (binding,
    /// refresh, deregistration), an expiry, a missed probe that moves a binding towards
    /// down, a reload that removed bindings, a restore. Refused messages never set it.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }
}

/// Writes the state file atomically (see [`crate::files::write_atomically`]).
pub fn write_state_file(path: &Path, state: &RegistryState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).context("encoding the registry state")?;
    crate::files::write_atomically(path, &bytes)
}

/// Reads a state written by [`write_state_file`]. No file: `Ok(None)`. A file that is not a
/// regular file, that others could have written (writable by group or others, or owned by
/// another user than root or this process's), too large, malformed, or of another format:
/// an error naming the file and what is wrong with it.
pub fn read_state_file(path: &Path) -> Result<Option<RegistryState>> {
    let shown = path.display();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening the state file {shown}")),
    };
    // Checked on the open file: what was checked is what is read.
    let meta = file
        .metadata()
        .with_context(|| format!("reading the state file {shown}"))?;
    if !meta.is_file() {
        bail!("state file {shown}: not a regular file");
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "state file {shown}: writable by group or others (mode {mode:04o}): anyone who can \
             write it can add bindings; refused (the agent writes it with mode 0600)"
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        bail!(
            "state file {shown}: owned by uid {}, neither root nor this process's uid {euid}; \
             refused",
            meta.uid()
        );
    }
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the state file {shown}"))?;
    if bytes.len() as u64 > MAX_STATE_FILE_BYTES {
        bail!("state file {shown}: larger than {MAX_STATE_FILE_BYTES} bytes");
    }
    // The format number first, so that a file of another format says so rather than
    // failing on whatever field changed.
    #[derive(Deserialize)]
    struct Format {
        format: Option<u32>,
    }
    let format = serde_json::from_slice::<Format>(&bytes)
        .with_context(|| format!("state file {shown}: not JSON of a registry state"))?
        .format;
    match format {
        Some(STATE_FORMAT) => {}
        Some(other) => bail!(
            "state file {shown}: state format {other}, this agent reads format {STATE_FORMAT}"
        ),
        None => bail!("state file {shown}: no format number: not a registry state"),
    }
    let state = serde_json::from_slice(&bytes)
        .with_context(|| format!("state file {shown}: malformed registry state"))?;
    Ok(Some(state))
}
