//! A client that keeps opening connections to the anycast address, for failover tests.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    netns::Netns,
    topology::{http_get_within, Topology, HTTP_PORT},
};

/// When each connection started, and who answered (or why it failed).
pub type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

/// Opens IPv4 HTTP connections one after another (with `pause` between them) from a
/// client namespace until dropped, logging each.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub log: Log,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(client: &str, pause: Duration) -> Load {
        Load::start_to(client, Topology::anycast(false, HTTP_PORT), pause)
    }

    /// The same, to another address (an HTTP server must answer there).
    pub fn start_to(client: &str, to: std::net::SocketAddr, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Log = Arc::default();
        let (s, l, name) = (stop.clone(), log.clone(), client.to_string());
        let thread = std::thread::spawn(move || {
            let ns = Netns { name };
            let _ = ns.in_ns(move || {
                while !s.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let r = http_get_within(to, Duration::from_millis(500));
                    l.lock()
                        .unwrap()
                        .push((started, r.map_err(|e| format!("{e:#}"))));
                    std::thread::sleep(pause);
                }
                Ok(())
            });
            std::mem::forget(ns); // the topology owns it
        });
        Load {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// How long after `t` the last failed connection started, if any failed.
    pub fn last_failure_since(
        after: &[(Instant, Result<String, String>)],
        t: Instant,
    ) -> Option<Duration> {
        after
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(at, _)| at.duration_since(t))
            .max()
    }

    /// The outcomes of the connections started in `from..to`, once each has one.
    pub fn between(
        &self,
        from: Instant,
        to: Instant,
    ) -> anyhow::Result<Vec<Result<String, String>>> {
        // Each step of a connection (connecting, sending, reading) gives up after 500 ms.
        crate::logged_between(&self.log, from, to, Duration::from_secs(5))
    }

    /// The failed connections started at or after `t`, each with how long after `t`.
    pub fn failures_since(&self, t: Instant) -> Vec<String> {
        self.since(t)
            .iter()
            .filter_map(|(at, r)| {
                let e = r.as_ref().err()?;
                Some(format!("{:?} after: {e}", at.duration_since(t)))
            })
            .collect()
    }

    /// The connections started at or after `t`.
    pub fn since(&self, t: Instant) -> Vec<(Instant, Result<String, String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= t)
            .cloned()
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
