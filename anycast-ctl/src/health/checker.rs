//! The checker: targets, their check configs and fall/rise state, and the task that runs the
//! checks when they are due.
use super::*;

pub(crate) struct Slot {
    tracker: Tracker,
    detail: String,
    /// When the next check starts.
    due: Instant,
    in_flight: bool,
    /// Tells this target's results from those of an earlier target of the same name that was
    /// removed and added again while its check was running.
    generation: u64,
}

/// A check to start.
pub(crate) struct Start {
    pub(crate) target: Target,
    pub(crate) generation: u64,
    pub(crate) check: CheckConfig,
}

/// The targets, their check configs and their state; shared with [`run`].
pub struct Checker {
    pub(crate) checks: Vec<CheckConfig>,
    pub(crate) targets: BTreeMap<Target, Slot>,
    pub(crate) wake: Rc<Notify>,
    /// ICMP echo identifier and payload cookie of this checker.
    pub(crate) ident: u16,
    pub(crate) cookie: u64,
    pub(crate) generation: u64,
    pub(crate) jitter: RandomState,
    /// Told of every result and transition (the metrics), on the checker's task.
    pub observer: Option<Box<dyn Fn(Observed)>>,
}

impl Checker {
    /// A checker with these check configs (validated beforehand with
    /// [`CheckConfig::validate`]; out-of-range timings are clamped) and no target.
    pub fn new(checks: Vec<CheckConfig>) -> Checker {
        let jitter = RandomState::new();
        let random = jitter.hash_one((std::process::id(), Instant::now()));
        Checker {
            checks,
            targets: BTreeMap::new(),
            wake: Rc::new(Notify::new()),
            ident: (random >> 48) as u16,
            cookie: RandomState::new().hash_one(random),
            generation: 0,
            jitter,
            observer: None,
        }
    }

    pub fn checks(&self) -> &[CheckConfig] {
        &self.checks
    }

    /// Sets the targets to check: added targets start up (a server that just registered is
    /// presumed healthy until a check fails) and are first checked at a random point of their
    /// first interval, so checks spread out; removed ones are forgotten. A target whose check
    /// index has no config is ignored (and logged).
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = Target>) {
        let now = Instant::now();
        let wanted: BTreeSet<Target> = targets
            .into_iter()
            .filter(|t| {
                let known = t.check < self.checks.len();
                if !known {
                    tracing::error!("health: {t}: no check config {}, not checked", t.check);
                }
                known
            })
            .collect();
        self.targets.retain(|t, _| wanted.contains(t));
        for target in wanted {
            if self.targets.contains_key(&target) {
                continue;
            }
            self.generation += 1;
            let due = now + self.first_delay(&target);
            self.targets.insert(
                target,
                Slot {
                    tracker: Tracker::default(),
                    detail: "not checked yet".into(),
                    due,
                    in_flight: false,
                    generation: self.generation,
                },
            );
        }
        self.wake.notify_one();
    }

    /// Replaces the check configs (on a reload). Targets whose index no longer has a config
    /// are forgotten; targets whose config changed keep their health, restart their counts
    /// and are rescheduled.
    pub fn set_checks(&mut self, checks: Vec<CheckConfig>) {
        let now = Instant::now();
        let old = std::mem::replace(&mut self.checks, checks);
        let checks = &self.checks;
        self.targets.retain(|t, _| t.check < checks.len());
        let changed: Vec<Target> = self
            .targets
            .keys()
            .filter(|t| old.get(t.check) != self.checks.get(t.check))
            .cloned()
            .collect();
        for t in changed {
            let delay = self.first_delay(&t);
            if let Some(slot) = self.targets.get_mut(&t) {
                slot.tracker.failures = 0;
                slot.tracker.successes = 0;
                slot.due = now + delay;
            }
        }
        self.wake.notify_one();
    }

    pub(crate) fn first_delay(&self, target: &Target) -> Duration {
        let interval = self.checks[target.check].interval();
        let r = self.jitter.hash_one((target, self.generation));
        Duration::from_nanos(r % interval.as_nanos().max(1) as u64)
    }

    pub fn health(&self, target: &Target) -> Option<Condition> {
        self.targets.get(target).map(|s| s.tracker.health)
    }

    /// All targets, their health and the last check's result, in target order.
    pub fn report(&self) -> Vec<(Target, Condition, String)> {
        self.targets
            .iter()
            .map(|(t, s)| (t.clone(), s.tracker.health, s.detail.clone()))
            .collect()
    }

    /// The checks due at `now` (marked in flight and rescheduled one interval later), and
    /// when the next idle target is due.
    pub(crate) fn take_due(&mut self, now: Instant) -> (Vec<Start>, Option<Instant>) {
        let mut starts = Vec::new();
        let mut next: Option<Instant> = None;
        for (target, slot) in &mut self.targets {
            if slot.in_flight {
                continue;
            }
            if slot.due <= now {
                let check = self.checks[target.check].clone();
                slot.due += check.interval();
                if slot.due <= now {
                    // Late by more than an interval (the thread was busy): no catching up.
                    slot.due = now + check.interval();
                }
                slot.in_flight = true;
                starts.push(Start {
                    target: target.clone(),
                    generation: slot.generation,
                    check,
                });
                continue;
            }
            next = Some(next.map_or(slot.due, |n| n.min(slot.due)));
        }
        (starts, next)
    }

    /// Takes a check's result; returns the transition it makes, if any.
    pub(crate) fn record(
        &mut self,
        target: &Target,
        generation: u64,
        ok: bool,
        detail: String,
        at: Instant,
    ) -> Option<Transition> {
        let check = self.checks.get(target.check)?;
        let (fall, rise) = (check.fall, check.rise);
        let slot = self.targets.get_mut(target)?;
        if slot.generation != generation {
            return None;
        }
        slot.in_flight = false;
        let change = slot.tracker.observe(ok, fall, rise);
        slot.detail = detail;
        change.map(|(from, to)| Transition {
            target: target.clone(),
            from,
            to,
            at,
            detail: slot.detail.clone(),
        })
    }
}

pub(crate) fn log_transition(t: &Transition) {
    if t.to == Condition::Up {
        tracing::info!("health: {} {} -> {}: {}", t.target, t.from, t.to, t.detail);
    } else {
        tracing::warn!("health: {} {} -> {}: {}", t.target, t.from, t.to, t.detail);
    }
}

/// Starts [`run`] on the current `LocalSet` (call it from inside one).
pub fn spawn(checker: &Rc<RefCell<Checker>>, tx: UnboundedSender<Transition>) -> JoinHandle<()> {
    tokio::task::spawn_local(run(checker.clone(), tx))
}

/// Checks the targets forever, logging every transition once and sending it on `tx` (a
/// closed channel is ignored: health stays readable through the checker). Runs on a
/// `LocalSet`; dropping or aborting it cancels the checks in flight (and kills their
/// commands). The checker must not be borrowed across an await by its other users.
pub async fn run(checker: Rc<RefCell<Checker>>, tx: UnboundedSender<Transition>) {
    let (wake, ident, cookie) = {
        let c = checker.borrow();
        (c.wake.clone(), c.ident, c.cookie)
    };
    let mut probes = Probes {
        ident,
        cookie,
        v4: None,
        v6: None,
        readers: JoinSet::new(),
    };
    let mut running: JoinSet<(bool, String, Duration)> = JoinSet::new();
    let mut owners: HashMap<Id, (Target, u64, &'static str)> = HashMap::new();
    loop {
        let (starts, next) = checker.borrow_mut().take_due(Instant::now());
        for start in starts {
            let probe = probes.probe(&start.target, &start.check.kind);
            let limit = start.check.timeout();
            let task = running.spawn_local(async move {
                let began = Instant::now();
                let (ok, detail) = match tokio::time::timeout(limit, probe).await {
                    Ok(Ok(detail)) => (true, detail),
                    Ok(Err(detail)) => (false, detail),
                    Err(_) => (false, format!("timeout {}ms", limit.as_millis())),
                };
                (ok, detail, began.elapsed())
            });
            let method = start.check.kind.name();
            owners.insert(task.id(), (start.target, start.generation, method));
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = wake.notified() => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let (id, ok, detail, took) = match done {
                    Ok((id, (ok, detail, took))) => (id, ok, detail, took),
                    Err(e) => (e.id(), false, format!("check failed: {e}"), Duration::ZERO),
                };
                if let Some((target, generation, method)) = owners.remove(&id) {
                    let now = Instant::now();
                    let mut c = checker.borrow_mut();
                    let change = c.record(&target, generation, ok, detail, now);
                    if let Some(observe) = &c.observer {
                        observe(Observed::Result { method, ok, took });
                        if let Some(t) = &change {
                            observe(Observed::Transition { method, to: t.to });
                        }
                    }
                    drop(c);
                    if let Some(t) = change {
                        log_transition(&t);
                        let _ = tx.send(t);
                    }
                }
            }
        }
    }
}
