//! Active health checks of the servers' real addresses, for sub-second detection.
//!
//! The kinds of check follow keepalived's checkers: ICMP echo (`ICMP_CHECK`), TCP connect
//! (`TCP_CHECK`), an HTTP GET judged by its status code (`HTTP_GET` with `status_code`) and an
//! operator's command judged by its exit status (`MISC_CHECK`). Like keepalived's
//! `delay_loop`/`connect_timeout`, each check has an interval and a timeout, and like its
//! `retry`/alpha mode a target only goes down after `fall` failures in a row and comes back
//! after `rise` successes in a row. Unlike keepalived's alpha mode, a new target starts up: a
//! server that has just registered is presumed healthy until a check fails.
//!
//! Health is `Up`, `Suspect` (the last check failed, fewer than `fall` in a row) or `Down`:
//!
//! ```text
//!   Up --1 failure--> Suspect --`fall` failures in a row--> Down --`rise` successes in a row--> Up
//!   Suspect --1 success--> Up          (with fall = 1, Up goes straight to Down)
//! ```
//!
//! The [`Checker`] holds the configuration, the targets and their state; [`run`] is the task
//! that checks them (on a current-thread runtime's `LocalSet`, never blocking the thread:
//! sockets and raw ICMP sockets are registered with tokio, commands run through
//! `tokio::process`). The agent shares the checker with the task as `Rc<RefCell<Checker>>`,
//! calls [`Checker::set_targets`] when the bindings change, reads [`Checker::health`] and
//! [`Checker::report`], and receives every [`Transition`] on a channel.
use std::{
    cell::{Cell, RefCell},
    collections::{hash_map::RandomState, BTreeMap, BTreeSet, HashMap},
    fmt,
    future::Future,
    hash::BuildHasher,
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::process::ExitStatusExt},
    pin::Pin,
    process::Stdio,
    rc::Rc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc::UnboundedSender, oneshot, Notify},
    task::{Id, JoinHandle, JoinSet},
};

mod check_config;
mod checker;
mod probes;
#[cfg(test)]
mod tests;

pub use check_config::*;
pub use checker::{run, spawn, Checker};
use probes::Probes;

/// What the checker tells its observer (the metrics): each check's result and duration, and
/// each transition, by method.
pub enum Observed {
    Result {
        method: &'static str,
        ok: bool,
        took: Duration,
    },
    Transition {
        method: &'static str,
        to: Condition,
    },
}

/// A target's health is the agent-wide condition: up, suspect or down.
pub use crate::model::Condition;

/// What is checked: a server's real address for one service port, with one check config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub server: String,
    pub real: IpAddr,
    /// The service port (what TCP and HTTP checks connect to unless their config names one).
    pub port: u16,
    /// Index of the check config in the checker's list.
    pub check: usize,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (check {})",
            self.server,
            SocketAddr::new(self.real, self.port),
            self.check
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub target: Target,
    pub from: Condition,
    pub to: Condition,
    pub at: Instant,
    /// The result of the check that made the transition ("connection refused", "timeout 150ms").
    pub detail: String,
}

/// The fall/rise state machine of one target, pure: results in, transitions out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    pub health: Condition,
    /// Consecutive failures (while up or suspect).
    pub failures: u32,
    /// Consecutive successes (while down).
    pub successes: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            health: Condition::Up,
            failures: 0,
            successes: 0,
        }
    }
}

impl Tracker {
    /// Takes one check result; returns (from, to) when the health changes.
    pub fn observe(&mut self, ok: bool, fall: u32, rise: u32) -> Option<(Condition, Condition)> {
        let from = self.health;
        if ok {
            self.failures = 0;
            match self.health {
                Condition::Up => {}
                Condition::Suspect => self.health = Condition::Up,
                Condition::Down => {
                    self.successes = self.successes.saturating_add(1);
                    if self.successes >= rise.max(1) {
                        self.health = Condition::Up;
                        self.successes = 0;
                    }
                }
            }
        } else {
            self.successes = 0;
            if self.health != Condition::Down {
                self.failures = self.failures.saturating_add(1);
                self.health = if self.failures >= fall.max(1) {
                    self.failures = 0;
                    Condition::Down
                } else {
                    Condition::Suspect
                };
            }
        }
        (self.health != from).then_some((from, self.health))
    }
}
