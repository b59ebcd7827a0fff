//! The routing task: the only part of the agent that talks to BIRD. The owner sends it
//! what should be announced ([`Desired`], only when that changes) and, before a planned
//! exit, [`RoutingCommand::Leave`]; the task writes BIRD's include file, reloads BIRD
//! (`configure`), drives the liveness device and reads the sessions' states for `status`
//! through a watch channel the owner reads without waiting.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    config::Routing,
    routing::{
        bird::{self, Bird},
        include,
        tun::Liveness,
        Desired, PrefixStatus, ProtocolStatus, RoutingStatus,
    },
};

pub(super) enum RoutingCommand {
    Want(Desired),
    /// Before a planned exit: withdraw every route (or keep them: the liveness device is
    /// made persistent for the next agent), then answer.
    Leave {
        withdraw: bool,
        done: oneshot::Sender<()>,
    },
}

/// What the task last saw, for `status`.
#[derive(Debug, Clone, Default)]
pub(super) struct Seen {
    bird: String,
    last_configure: String,
    /// The addresses BIRD holds routes for through the liveness device (link up).
    announced: BTreeSet<IpAddr>,
    protocols: Vec<ProtocolStatus>,
    bfd_sessions: Vec<crate::routing::BfdSession>,
}

/// The owner's end.
pub(super) struct RoutingHandle {
    config: Routing,
    tx: mpsc::UnboundedSender<RoutingCommand>,
    seen: watch::Receiver<Seen>,
    last: Option<Desired>,
}

/// How long a planned exit waits for BIRD to take the withdrawal (beyond the grace time).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

impl RoutingHandle {
    /// Starts the routing task on `local` with the liveness device (opened by the caller,
    /// before anything else changed).
    pub(super) fn spawn(
        local: &tokio::task::LocalSet,
        config: Routing,
        liveness: Liveness,
    ) -> RoutingHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let (seen_tx, seen) = watch::channel(Seen::default());
        let task = Task {
            link_up: liveness.taken_over,
            config: config.clone(),
            liveness,
            bird: None,
            reboot: None,
            desired: None,
            written: None,
            configured: None,
            refused: None,
            written_announce: BTreeSet::new(),
            seen: Seen::default(),
            seen_tx,
        };
        local.spawn_local(task.run(rx));
        RoutingHandle {
            config,
            tx,
            seen,
            last: None,
        }
    }

    /// Hands the task a new want, if it differs from the last one.
    pub(super) fn want(&mut self, desired: Desired) {
        if self.last.as_ref() == Some(&desired) {
            return;
        }
        for p in &desired.prefixes {
            let before = self
                .last
                .as_ref()
                .and_then(|l| l.prefixes.iter().find(|q| q.address == p.address))
                .map(|q| q.announce);
            if before != Some(p.announce) {
                tracing::info!(
                    "routing: {} {} ({})",
                    if p.announce {
                        "announcing"
                    } else {
                        "withdrawing"
                    },
                    p.address,
                    p.why
                );
            }
        }
        self.last = Some(desired.clone());
        if self.tx.send(RoutingCommand::Want(desired)).is_err() {
            tracing::error!("routing: the routing task has stopped");
        }
    }

    /// Before a planned exit: withdraw (or keep) and wait until BIRD took it, within
    /// `LEAVE_TIMEOUT`.
    pub(super) async fn leave(self, withdraw: bool) {
        let (done, wait) = oneshot::channel();
        if self
            .tx
            .send(RoutingCommand::Leave { withdraw, done })
            .is_err()
        {
            return;
        }
        let grace = Duration::from_millis(self.config.withdraw_grace_ms);
        if tokio::time::timeout(LEAVE_TIMEOUT + grace, wait)
            .await
            .is_err()
        {
            tracing::warn!(
                "routing: BIRD did not take the withdrawal within {LEAVE_TIMEOUT:?}; the \
                 liveness device goes with this process"
            );
        }
    }

    pub(super) fn status(&self) -> RoutingStatus {
        let seen = self.seen.borrow().clone();
        let prefixes = self
            .last
            .iter()
            .flat_map(|d| &d.prefixes)
            .map(|p| {
                let held = seen.announced.contains(&p.address);
                let len = if p.address.is_ipv4() { 32 } else { 128 };
                PrefixStatus {
                    prefix: format!("{}/{len}", p.address),
                    state: match (p.announce, held) {
                        (true, true) => "announced",
                        (false, false) => "withdrawn",
                        (true, false) => "pending announcement",
                        (false, true) => "pending withdrawal",
                    }
                    .to_string(),
                    why: p.why.clone(),
                }
            })
            .collect();
        let mut protocols = seen.protocols;
        for p in &mut protocols {
            p.neighbor = (0..self.config.neighbors.len())
                .find(|&i| include::bgp_protocol(i) == p.name)
                .map(|i| self.config.neighbors[i].address);
        }
        RoutingStatus {
            bird_socket: self.config.bird_socket.clone(),
            bird_include: self.config.bird_include.clone(),
            bird: seen.bird,
            last_configure: seen.last_configure,
            prefixes,
            protocols,
            bfd_sessions: seen.bfd_sessions,
        }
    }
}

struct Task {
    config: Routing,
    liveness: Liveness,
    link_up: bool,
    bird: Option<Bird>,
    /// When the BIRD we talk to started: another value means it restarted.
    reboot: Option<String>,
    desired: Option<Desired>,
    /// The include file's text as last written, and what BIRD last accepted.
    written: Option<String>,
    configured: Option<String>,
    /// A text BIRD refused: not offered again until it changes or BIRD restarts.
    refused: Option<String>,
    written_announce: BTreeSet<IpAddr>,
    seen: Seen,
    seen_tx: watch::Sender<Seen>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<RoutingCommand>) {
        let mut poll = tokio::time::interval(Duration::from_millis(self.config.poll_ms));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(RoutingCommand::Want(d)) => {
                        self.desired = Some(d);
                        self.apply().await;
                    }
                    Some(RoutingCommand::Leave { withdraw, done }) => {
                        self.leave(withdraw).await;
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
                _ = poll.tick() => self.poll().await,
            }
            self.publish();
        }
    }

    fn publish(&mut self) {
        self.seen.announced = if self.link_up && self.configured == self.written {
            self.written_announce.clone()
        } else {
            BTreeSet::new()
        };
        self.seen_tx.send_replace(self.seen.clone());
    }

    /// Writes the include for the current want (when it changed), has BIRD reload it, and
    /// brings the liveness device up once BIRD holds this agent's own configuration (before
    /// that, a BIRD configured by an earlier agent would announce its stale routes).
    async fn apply(&mut self) {
        let Some(d) = &self.desired else { return };
        let announce: Vec<IpAddr> = d.announced().collect();
        let text = include::render(&self.config, d, &announce);
        if self.written.as_ref() != Some(&text) {
            // Off this thread: the owner task shares it, and must not wait on the disk.
            let (path, t) = (self.config.bird_include.clone(), text.clone());
            let written = tokio::task::spawn_blocking(move || write_include(&path, &t))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("writing the include: {e}")));
            match written {
                Ok(()) => {
                    self.written = Some(text);
                    self.written_announce = announce.into_iter().collect();
                }
                Err(e) => {
                    tracing::error!("routing: {e:#}");
                    self.seen.last_configure = format!("not written: {e:#}");
                    return;
                }
            }
        }
        if self.configured != self.written && self.refused != self.written {
            self.configure().await;
        }
        if !self.link_up && self.configured.is_some() && self.configured == self.written {
            match self.liveness.set_up(true) {
                Ok(()) => {
                    self.link_up = true;
                    tracing::info!("routing: liveness device {} up", self.liveness.name);
                }
                Err(e) => tracing::error!("routing: {e:#}"),
            }
        }
    }

    async fn connected(&mut self) -> anyhow::Result<&mut Bird> {
        if self.bird.is_none() {
            let mut b = Bird::connect(&self.config.bird_socket).await?;
            let status = b.command("show status").await?;
            let reboot = bird::parse_last_reboot(&status);
            if self.reboot.is_some() && reboot != self.reboot {
                // A restarted BIRD read the include as it is on disk: told again, to be sure
                // it holds this agent's current state (a `disable` would be forgotten too).
                tracing::warn!("routing: BIRD restarted; re-asserting the announcements");
            }
            if reboot != self.reboot {
                self.configured = None;
                self.refused = None;
            }
            self.reboot = reboot;
            self.seen.bird = format!("connected ({})", b.greeting);
            self.bird = Some(b);
        }
        Ok(self.bird.as_mut().expect("just connected"))
    }

    async fn configure(&mut self) {
        let started = std::time::Instant::now();
        let result = match self.connected().await {
            Ok(b) => b.command("configure").await,
            Err(e) => Err(e),
        };
        match result {
            Ok(reply) if !reply.is_error() => {
                tracing::debug!(
                    "routing: BIRD reconfigured in {:.1} ms: {}",
                    started.elapsed().as_secs_f64() * 1e3,
                    reply.last()
                );
                self.seen.last_configure = reply.last().to_string();
                self.configured = self.written.clone();
            }
            Ok(reply) => {
                let text: Vec<&str> = reply.lines.iter().map(|(_, t)| t.as_str()).collect();
                tracing::error!(
                    "routing: BIRD refused its configuration: {}",
                    text.join(" / ")
                );
                self.seen.last_configure = format!("refused: {}", text.join(" / "));
                self.refused = self.written.clone();
            }
            Err(e) => self.lost(e),
        }
    }

    fn lost(&mut self, e: anyhow::Error) {
        if self.bird.take().is_some() || self.seen.bird.is_empty() {
            tracing::warn!("routing: {e:#}");
        }
        self.seen.bird = format!("unreachable: {e:#}");
    }

    async fn poll(&mut self) {
        let read = async {
            let b = self.connected().await?;
            let protocols = b.command("show protocols").await?;
            let bfd = b.command("show bfd sessions").await?;
            anyhow::Ok((protocols, bfd))
        }
        .await;
        match read {
            Ok((protocols, bfd)) => {
                self.seen.protocols = bird::parse_protocols(&protocols);
                self.seen.bfd_sessions = bird::parse_bfd_sessions(&bfd);
            }
            Err(e) => {
                self.lost(e);
                self.seen.protocols.clear();
                self.seen.bfd_sessions.clear();
            }
        }
        // After a (re)connection, or a failed write or reload.
        self.apply().await;
    }

    async fn leave(&mut self, withdraw: bool) {
        if !withdraw {
            match self.liveness.persist(true) {
                Ok(()) => tracing::info!(
                    "routing: handoff keeps the routes: {} stays for the next agent",
                    self.liveness.name
                ),
                Err(e) => tracing::error!("routing: {e:#}; the routes go with this process"),
            }
            return;
        }
        let started = std::time::Instant::now();
        if let Some(d) = &mut self.desired {
            for p in &mut d.prefixes {
                if p.announce {
                    p.announce = false;
                    p.why = "the agent is stopping".into();
                }
            }
            self.apply().await;
        }
        // Whatever BIRD did, the routes through a device that is down are withdrawn.
        if let Err(e) = self.liveness.set_up(false) {
            tracing::warn!("routing: {e:#}");
        }
        self.link_up = false;
        tracing::info!(
            "routing: every route withdrawn before exit ({:.1} ms); forwarding {} ms more \
             while the routers move the traffic",
            started.elapsed().as_secs_f64() * 1e3,
            self.config.withdraw_grace_ms
        );
        tokio::time::sleep(Duration::from_millis(self.config.withdraw_grace_ms)).await;
    }
}

/// Atomically, mode 0644: BIRD may run as its own user (Debian's does) and must read it.
fn write_include(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path
        .parent()
        .context("routing.bird_include has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or("anycast".into(), |n| n.to_string_lossy())
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // Whatever the umask: readable by BIRD's user.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
